"""Honest throughput: what was computed, what was useful, and how close to the hardware's peak.

Definitions (per logged window, over all processes, over the seconds spent in training steps only):
- tokens_per_second: real input tokens (prompt and response; padding excluded) the policy ran on.
- supervised_tokens_per_second: tokens that carry a label (the ones the loss learns from).
- padding_fraction: padded slots / all slots of the micro-batches (0 when packed without padding).
- mfu: model FLOPs / (seconds x peak FLOP/s x processes), the useful work that ran. A trainer says, per micro-batch,
  which sequences went through which pass (`Work`, from `BasicTrainer.batch_work`): the policy's forward and backward
  (trained), the policy's forward alone (KTO's mismatched sequences, for its KL estimate), and a frozen reference
  model's forward. Each pass costs (`PassFlops`), per real token, 2 FLOPs per weight of the body in a forward, and
  in a backward 4 more per trained weight (input and weight gradients; the PaLM convention) or 2 more per frozen one
  (LoRA's base: input gradients only); the output head the same per position where it runs (the supervised ones);
  attention 4 x layers x hidden FLOPs per attended (query, key) pair in a forward (QK^T and the weighted sum of V),
  12 with its backward. Attended pairs are counted from what each token sees: in a causal sequence of length T,
  T (T + 1) / 2; a shared-prompt row's rejected response sees the prompt and itself, not the chosen response.
  Embeddings (a lookup), padding, recomputation and the head at unsupervised positions are not counted. The peak is
  `peak_flops_per_second`, or the GPU's datasheet dense bf16 rate, or on CPU the best rate of warmed-up matmuls of
  several sizes in the training dtype and thread count, measured once per machine and cached (`PeakFlops.source`
  says which).
"""

from __future__ import annotations

import json
import logging
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from train.batching.collate import Batch
from train.batching.layout import Layout
from train.data.store import IGNORE_INDEX
from train.files import write_text_atomically
from train.objectives.losses import supervised_positions

logger = logging.getLogger(__name__)

# Dense (no sparsity) bf16 tensor-core peaks from the vendors' datasheets, FLOP/s.
GPU_PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12, "L4": 121e12}
PEAK_CACHE_FILE = "peak_flops.json"  # in cache_dir: measured CPU peaks, per processor, dtype and thread count


@dataclass
class PeakFlops:
    flops_per_second: float  # per process
    source: str  # how it was obtained, for summary.json


@dataclass(frozen=True)
class PassCounts:
    """What one kind of pass (a forward, or a forward and backward) ran on, summed over its sequences."""

    tokens: int = 0  # real tokens: the body runs once on each
    head_positions: int = 0  # positions where the output head runs: those whose next token is supervised
    attended_pairs: int = 0  # (query, key) pairs attention computes: each real token with itself and all it sees

    def __add__(self, other: PassCounts) -> PassCounts:
        return PassCounts(*(a + b for a, b in zip(_values(self), _values(other), strict=True)))


@dataclass(frozen=True)
class Work:
    """What the passes of some micro-batches ran on: one micro-batch's (`BasicTrainer.batch_work`), a step's, or a
    logged window's over all processes."""

    trained: PassCounts = field(default_factory=PassCounts)  # the policy's forward and backward
    forward_only: PassCounts = field(default_factory=PassCounts)  # the policy's forward without gradients
    reference: PassCounts = field(default_factory=PassCounts)  # a frozen reference model's forward
    supervised_tokens: int = 0  # tokens that carry a label, in every sequence the policy ran on
    slots: int = 0  # positions of the micro-batches' rows, padding included
    sequences: int = 0  # sequences the policy ran on (a pair is two; KTO's example and its mismatched one are two)

    @property
    def tokens(self) -> int:
        """Real tokens the policy ran on (the input tokens of tokens_per_second)."""
        return self.trained.tokens + self.forward_only.tokens

    def __add__(self, other: Work) -> Work:
        return Work.from_tensor(self.as_tensor() + other.as_tensor())

    def as_tensor(self) -> torch.Tensor:
        """(12,) float64, to all-reduce over processes: each pass's three counts, then the three others."""
        passes = (self.trained, self.forward_only, self.reference)
        return torch.tensor(
            [value for counts in passes for value in _values(counts)]
            + [self.supervised_tokens, self.slots, self.sequences],
            dtype=torch.float64,
        )

    @classmethod
    def from_tensor(cls, values: torch.Tensor) -> Work:
        v = [round(x) for x in values.double().cpu().tolist()]  # all-reduced in float32: exact below 2^24 per step
        return cls(PassCounts(*v[0:3]), PassCounts(*v[3:6]), PassCounts(*v[6:9]), *v[9:12])


def _values(counts: PassCounts) -> tuple[int, int, int]:
    return counts.tokens, counts.head_positions, counts.attended_pairs


def pass_counts(batch: Batch) -> PassCounts:
    """What a pass over every sequence of a collated micro-batch runs on, in any of its layouts: one sequence per row
    (a 2D attention_mask, right padding), packed rows (`example_ids`, -1 on padding; `position_ids` restart per
    sequence), or shared-prompt rows (a 4D attention_mask, `train.batching.collate.collate_shared_prompt`)."""
    if batch.layout is Layout.SHARED_PROMPT:  # (rows, 1, L, L) bool: count what the mask lets each real token see
        mask = batch["attention_mask"]
        rows, length = mask.shape[0], mask.shape[-1]
        sides = batch["segment_lengths"].view(2, rows)  # each row's chosen sequence and rejected rest, in tokens
        real = torch.arange(length) < sides.sum(dim=0, keepdim=True).T  # (rows, L) real tokens, before the padding
        tokens, pairs = real.sum(), (mask[:, 0] & real[:, :, None]).sum()
        heads = batch["keep"].sum()  # the prompt's last position runs the head once for both responses' first token
    elif batch.layout is Layout.PACKED:  # a token at position p of its sequence sees p + 1 tokens
        real = batch["example_ids"] >= 0
        tokens, pairs = real.sum(), ((batch["position_ids"] + 1) * real).sum()
        heads = supervised_positions(batch["labels"]).sum()
    else:  # one causal sequence of length T per row: T (T + 1) / 2 pairs
        lengths = batch["attention_mask"].sum(dim=1)
        tokens, pairs = lengths.sum(), (lengths * (lengths + 1) // 2).sum()
        heads = supervised_positions(batch["labels"]).sum()
    return PassCounts(int(tokens), int(heads), int(pairs))


def trained_work(batch: Batch) -> Work:
    """The work of the policy's forward and backward over every sequence of `batch` (see `pass_counts`)."""
    one_per_row = batch.layout is Layout.PADDED  # the other layouts list their sequences' lengths
    sequences = batch["input_ids"].shape[0] if one_per_row else len(batch["segment_lengths"])
    return Work(
        trained=pass_counts(batch),
        supervised_tokens=int((batch["labels"][..., 1:] != IGNORE_INDEX).sum()),
        slots=batch["input_ids"].numel(),
        sequences=sequences,
    )


@dataclass(frozen=True)
class PassFlops:
    """FLOPs of one kind of pass, per unit of what `PassCounts` counts."""

    per_token: float  # the body's weights
    per_head_position: float  # the output head (vocabulary x hidden weights)
    per_attended_pair: float  # attention

    def of(self, counts: PassCounts) -> float:
        return (
            self.per_token * counts.tokens
            + self.per_head_position * counts.head_positions
            + self.per_attended_pair * counts.attended_pairs
        )


@dataclass(frozen=True)
class ModelFlops:
    """The FLOP coefficients of each kind of pass of one model (see the module docstring)."""

    trained: PassFlops  # the policy's forward and backward
    forward_only: PassFlops  # the policy's forward without gradients
    reference: PassFlops  # the frozen reference's forward: the same model, or with LoRA the policy's base

    def of(self, work: Work) -> float:
        return (
            self.trained.of(work.trained) + self.forward_only.of(work.forward_only) + self.reference.of(work.reference)
        )


def model_flops(model, lm_head: bool) -> ModelFlops:
    """The FLOP coefficients of `model` (see the module docstring): trained and frozen weights told apart by
    requires_grad, the head only for a causal LM (a score head is one output: ~0 FLOPs). The reference is a frozen
    copy of the model, or, for a LoRA model, the model with its adapters switched off (its frozen weights)."""
    config = model.config
    embeddings = {id(p) for m in model.modules() if isinstance(m, torch.nn.Embedding) for p in m.parameters()}
    head = [p for p in model.get_output_embeddings().parameters()] if lm_head else []
    skip = embeddings | {id(p) for p in head}
    trained = sum(p.numel() for p in model.parameters() if id(p) not in skip and p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters() if id(p) not in skip and not p.requires_grad)
    reference = frozen if hasattr(model, "disable_adapter") else trained + frozen
    head_size = config.vocab_size * config.hidden_size if lm_head else 0
    head_factor = 6 if any(p.requires_grad for p in head) else 4
    attention = 4 * config.num_hidden_layers * config.hidden_size  # a forward's FLOPs per attended pair
    return ModelFlops(
        trained=PassFlops(6 * trained + 4 * frozen, head_factor * head_size, 3 * attention),
        forward_only=PassFlops(2 * (trained + frozen), 2 * head_size, attention),
        reference=PassFlops(2 * reference, 2 * head_size, attention),
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
    # A generator of its own: drawn from the global one, the operands would shift the run's random state (LoRA
    # dropout masks) in the one run per cache_dir that measures, and that run would not match the next.
    generator = torch.Generator(device).manual_seed(0)
    for size in MATMUL_SIZES:
        a = torch.randn(size, size, device=device, dtype=dtype, generator=generator)
        b = torch.randn(size, size, device=device, dtype=dtype, generator=generator)
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


class Throughput:
    """Running totals and windowed rates, from each step's `Work`, all-reduced over processes."""

    def __init__(
        self,
        flops: ModelFlops | None = None,
        peak_flops: float = 0.0,
        n_processes: int = 1,
        unit: str = "examples",
        rows_per_example: int = 1,
    ):
        self.unit, self.rows_per_example = unit, rows_per_example  # a pair is 2 rows of a batch, counted once
        self.flops = flops  # None: no MFU
        self.peak = peak_flops * n_processes
        self.examples = self.tokens = self.supervised_tokens = 0
        self.seconds = 0.0
        self.window = Work()
        self.window_seconds = 0.0

    def add(self, work: Work, seconds: float) -> None:
        self.examples += work.sequences // self.rows_per_example
        self.tokens += work.tokens
        self.supervised_tokens += work.supervised_tokens
        self.seconds += seconds
        self.window += work
        self.window_seconds += seconds

    def report(self) -> dict[str, float]:
        window, seconds = self.window, self.window_seconds or float("inf")
        flops = self.flops.of(window) if self.flops else 0.0
        self.window, self.window_seconds = Work(), 0.0
        return {
            self.unit: self.examples,
            "tokens": self.tokens,
            "supervised_tokens": self.supervised_tokens,
            "tokens_per_second": window.tokens / seconds,
            "supervised_tokens_per_second": window.supervised_tokens / seconds,
            "padding_fraction": 1 - window.tokens / window.slots if window.slots else 0.0,
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
