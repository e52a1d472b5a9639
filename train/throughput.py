"""Honest throughput: what was computed, what was useful, and how close to the hardware's peak.

Definitions (per logged window, over all processes, over the seconds spent in training steps only):
- tokens_per_second: real input tokens (prompt and response; padding excluded).
- supervised_tokens_per_second: tokens that carry a label (the ones the loss learns from).
- padding_fraction: padded slots / all slots of the micro-batches (0 when packed without padding).
- mfu: model FLOPs / (seconds x peak FLOP/s x processes). Model FLOPs per step = 6 x body parameters x real tokens
  (forward and backward of every weight but the embeddings and head, the PaLM convention) + 6 x vocabulary x hidden
  size x supervised tokens (the output head, which only supervised positions need) + 6 x layers x hidden size x the
  sum over examples of length^2 (causal attention, forward and backward). Padding, recomputation and the head at
  unsupervised positions are not counted: it is the useful work. The peak is `peak_flops_per_second`, or by default the GPU's datasheet dense bf16 rate, or
  on CPU a matmul rate measured at start-up.
"""

from __future__ import annotations

import logging
import statistics
import time

import torch

logger = logging.getLogger(__name__)

# Dense (no sparsity) bf16 tensor-core peaks from the vendors' datasheets, FLOP/s.
GPU_PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12, "L4": 121e12}


def peak_flops_per_second(configured: float | None, device: torch.device, bf16: bool) -> float:
    if configured:
        return configured
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, flops in GPU_PEAK_BF16.items():
            if key in name:
                return flops
    return measure_matmul_flops(device, torch.bfloat16 if bf16 else torch.float32)


def measure_matmul_flops(device: torch.device, dtype: torch.dtype, size: int = 1024, repeats: int = 5) -> float:
    """Median FLOP/s of a square matmul: the practical ceiling of this device for dense layers."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    times = []
    for _ in range(repeats + 1):
        started = time.perf_counter()
        (a @ b).sum().item()  # .item() waits for the device
        times.append(time.perf_counter() - started)
    return 2 * size**3 / statistics.median(times[1:])


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
        n_body_parameters: int = 0,
        head_parameters: int = 0,
        n_layers: int = 0,
        hidden_size: int = 0,
        peak_flops: float = 0.0,
        n_processes: int = 1,
        unit: str = "examples",
        rows_per_example: int = 1,
    ):
        self.unit, self.rows_per_example = unit, rows_per_example  # a pair is 2 rows of a batch, counted once
        self.flops_per_token = 6 * n_body_parameters
        self.flops_per_supervised_token = 6 * head_parameters
        self.attention_flops_per_length_squared = 6 * n_layers * hidden_size
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
            self.flops_per_token * tokens
            + self.flops_per_supervised_token * supervised
            + self.attention_flops_per_length_squared * lengths_squared
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
