"""Honest throughput: what was computed, what was useful, and how close to the hardware's peak.

Definitions (per logged window, over all processes, over the seconds spent in training steps only):
- tokens_per_second: real input tokens (prompt and response; padding excluded).
- supervised_tokens_per_second: tokens that carry a label (the ones the loss learns from).
- padding_fraction: padded slots / all slots of the micro-batches (0 when packed without padding).
- mfu: model FLOPs / (seconds x peak FLOP/s x processes), the useful work (`ModelFlops`): per real token, 6 FLOPs per
  trained weight of the body (forward, input and weight gradients; the PaLM convention) and 4 per frozen one (LoRA's
  base: no weight gradient); the output head only at supervised positions (6 or 4 x vocabulary x hidden); causal
  attention, 6 x layers x hidden size x the sum over examples of length^2; plus a frozen reference model's forward
  (2 per weight, 2 x layers x hidden x length^2) for preference losses that run one live. Embeddings (a lookup),
  padding, recomputation and the head at unsupervised positions are not counted. The peak is `peak_flops_per_second`,
  or the GPU's datasheet dense bf16 rate, or on CPU the best rate of warmed-up matmuls of several sizes in the
  training dtype and thread count, measured once per machine and cached (`PeakFlops.source` says which).
"""

from __future__ import annotations

import json
import logging
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from train.files import write_text_atomically

logger = logging.getLogger(__name__)

# Dense (no sparsity) bf16 tensor-core peaks from the vendors' datasheets, FLOP/s.
GPU_PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12, "L4": 121e12}
PEAK_CACHE_FILE = "peak_flops.json"  # in cache_dir: measured CPU peaks, per processor, dtype and thread count


@dataclass
class PeakFlops:
    flops_per_second: float  # per process
    source: str  # how it was obtained, for summary.json


@dataclass
class ModelFlops:
    """FLOPs of the useful work of a training step, per unit of what `step_counts` counts."""

    per_token: float  # body weights, per real token
    per_supervised_token: float  # the output head, per supervised token
    per_length_squared: float  # causal attention, per squared example length


def model_flops(model, lm_head: bool, reference_forward: bool) -> ModelFlops:
    """The FLOP coefficients of `model` (see the module docstring): trained and frozen weights told apart by
    requires_grad, the head only for a causal LM (a score head is one output: ~0 FLOPs), plus a live frozen
    reference model's forward when `reference_forward`."""
    config = model.config
    embeddings = {id(p) for m in model.modules() if isinstance(m, torch.nn.Embedding) for p in m.parameters()}
    head = [p for p in model.get_output_embeddings().parameters()] if lm_head else []
    skip = embeddings | {id(p) for p in head}
    trained = sum(p.numel() for p in model.parameters() if id(p) not in skip and p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters() if id(p) not in skip and not p.requires_grad)
    head_size = config.vocab_size * config.hidden_size if lm_head else 0
    head_factor = 6 if any(p.requires_grad for p in head) else 4
    reference = 2 if reference_forward else 0
    return ModelFlops(
        per_token=6 * trained + 4 * frozen + reference * (trained + frozen),
        per_supervised_token=(head_factor + reference) * head_size,
        per_length_squared=(6 + reference) * config.num_hidden_layers * config.hidden_size,
    )


def peak_flops_per_second(
    configured: float | None, device: torch.device, bf16: bool, cache_dir: Path | None = None
) -> PeakFlops:
    if configured:
        return PeakFlops(configured, "config: peak_flops_per_second")
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, flops in GPU_PEAK_BF16.items():
            if key in name:
                return PeakFlops(flops, f"datasheet: {key} dense bf16")
    dtype = torch.bfloat16 if bf16 else torch.float32
    key = f"{device.type}|{platform.processor() or platform.machine()}|{torch.get_num_threads()} threads|{dtype}"
    path = Path(cache_dir) / PEAK_CACHE_FILE if cache_dir else None
    known = json.loads(path.read_text()) if path and path.exists() else {}
    if key not in known:
        known[key] = {"flops_per_second": measure_matmul_flops(device, dtype), "measured_at": time.strftime("%F %T")}
        if path:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_text_atomically(path, json.dumps(known, indent=1))  # every process may measure and write it
    entry = known[key]
    return PeakFlops(
        entry["flops_per_second"],
        f"measured {entry['measured_at']}: best of warmed-up matmuls {MATMUL_SIZES} ({key})"
        + (f", cached in {path}" if path else ""),
    )


MATMUL_SIZES = (1024, 2048)


def measure_matmul_flops(device: torch.device, dtype: torch.dtype, repeats: int = 3) -> float:
    """The best FLOP/s of square matmuls of each size in MATMUL_SIZES, after a warm-up: the practical ceiling of
    this device for dense layers (the best, not the median: a peak must not be lowered by a busy machine)."""
    best = 0.0
    for size in MATMUL_SIZES:
        a = torch.randn(size, size, device=device, dtype=dtype)
        b = torch.randn(size, size, device=device, dtype=dtype)
        (a @ b).sum().item()  # warm-up: first-call allocation and kernel selection
        for _ in range(repeats):
            started = time.perf_counter()
            (a @ b).sum().item()  # .item() waits for the device
            best = max(best, 2 * size**3 / (time.perf_counter() - started))
    return best


def peak_memory() -> dict[str, object]:
    """Peak memory of this process: CUDA memory allocated by tensors on a GPU, else the resident set size."""
    if torch.cuda.is_available():
        return {"peak_memory_mb": torch.cuda.max_memory_allocated() / 2**20, "peak_memory_kind": "cuda_allocated"}
    import resource

    return {"peak_memory_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "peak_memory_kind": "cpu_rss"}


def example_lengths(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """(examples,) lengths of the examples in a micro-batch, padded or packed (position_ids restart per example)."""
    if "segment_lengths" in batch:
        return batch["segment_lengths"]
    return batch["attention_mask"].sum(dim=1)


def step_counts(batches: list[dict[str, torch.Tensor]]) -> torch.Tensor:
    """(5,) float: real tokens, supervised tokens, slots, the sum of squared example lengths, and examples."""
    totals = torch.zeros(5, dtype=torch.float64)
    for batch in batches:
        lengths = example_lengths(batch).double().cpu()
        supervised = (batch["labels"][..., 1:] != -100).sum().item()
        squares = (lengths**2).sum().item()
        totals += torch.tensor([lengths.sum().item(), supervised, batch["input_ids"].numel(), squares, len(lengths)])
    return totals


class Throughput:
    """Running totals and windowed rates, from the all-reduced counts of each step."""

    def __init__(
        self,
        flops: ModelFlops | None = None,
        peak_flops: float = 0.0,
        n_processes: int = 1,
        unit: str = "examples",
        rows_per_example: int = 1,
    ):
        self.unit, self.rows_per_example = unit, rows_per_example  # a pair is 2 rows of a batch, counted once
        self.flops = flops or ModelFlops(0.0, 0.0, 0.0)
        self.peak = peak_flops * n_processes
        self.examples = self.tokens = self.supervised_tokens = 0
        self.seconds = 0.0
        self.window = torch.zeros(5, dtype=torch.float64)
        self.window_seconds = 0.0

    def add(self, counts: torch.Tensor, seconds: float) -> None:
        counts = counts.double().cpu()
        self.examples += int(counts[4]) // self.rows_per_example
        self.tokens += int(counts[0])
        self.supervised_tokens += int(counts[1])
        self.seconds += seconds
        self.window += counts
        self.window_seconds += seconds

    def report(self) -> dict[str, float]:
        tokens, supervised, slots, lengths_squared, _examples = self.window.tolist()
        seconds = self.window_seconds or float("inf")
        flops = (
            self.flops.per_token * tokens
            + self.flops.per_supervised_token * supervised
            + self.flops.per_length_squared * lengths_squared
        )
        self.window.zero_()
        self.window_seconds = 0.0
        return {
            self.unit: self.examples,
            "tokens": self.tokens,
            "supervised_tokens": self.supervised_tokens,
            "tokens_per_second": tokens / seconds,
            "supervised_tokens_per_second": supervised / seconds,
            "padding_fraction": 1 - tokens / slots if slots else 0.0,
            "mfu": flops / seconds / self.peak if self.peak else 0.0,
            "train_seconds": self.seconds,
        }

    def state(self) -> dict[str, object]:
        return {
            "examples": self.examples,
            "tokens": self.tokens,
            "supervised_tokens": self.supervised_tokens,
            "seconds": self.seconds,
        }

    def restore(self, state: dict[str, object]) -> None:
        self.examples, self.tokens, self.seconds = state["examples"], state["tokens"], state["seconds"]
        self.supervised_tokens = state.get("supervised_tokens", 0)
