"""Where a training step's time goes: `profile_steps` optimizer steps timed phase by phase and recorded by
torch.profiler.

Each phase is wall-clock time with the device synchronized at its boundaries (only while profiling), so that
asynchronous GPU work lands in the phase that queued it. The phases, in step order:

    data       waiting for the step's collated micro-batches (collation itself, with data.num_workers=0)
    to_device  copying them to the training device
    forward    the model's forward passes (the loss's head included where the model computes it)
    reference  the frozen reference model's forward passes (preference losses with a live reference)
    loss       the loss from the model's output: the float32 log-softmax, the loss function
    backward   the backward passes (with DDP, the gradient all-reduce overlapping them)
    reduce     all-reducing the step's unit counts, loss and metrics over processes
    clip       the global gradient norm (and clipping)
    optimizer  the optimizer step, the schedule, zeroing the gradients
    log        the metrics line: metrics.jsonl, trackers, console

What is left of the step's wall time (an evaluation or checkpoint that falls in a profiled step, Python between the
phases) is "other". The run directory gets profile.md (the phase table and torch.profiler's top operators) and
profile_trace.json (a Chrome trace: chrome://tracing or https://ui.perfetto.dev); summary.json gets the medians.
"""

from __future__ import annotations

import contextlib
import logging
import statistics
import time
from collections import defaultdict
from pathlib import Path

import torch

from train.loop.run_files import PROFILE_FILE
from train.loop.run_files import PROFILE_TRACE_FILE as TRACE_FILE

logger = logging.getLogger(__name__)

PHASES = ("data", "to_device", "forward", "reference", "loss", "backward", "reduce", "clip", "optimizer", "log")
FIRST_PROFILED_STEP = 2  # step 1 pays one-time costs (allocator growth, lazy initialization, compilation)
TOP_OPERATORS = 20

_active: StepProfiler | None = None  # the profiler of the step being profiled; `phase` is free otherwise


@contextlib.contextmanager
def phase(name: str, whole: bool = False):
    """Time the enclosed code as phase `name` of the step being profiled; does nothing when none is. A phase inside
    another (forward inside loss) is subtracted from the outer one, unless the outer one is `whole` (the reference
    model's forward is the reference phase, not a forward)."""
    if _active is None:
        yield
        return
    with _active.timed(name, whole):
        yield


class StepProfiler:
    """Profiles optimizer steps FIRST_PROFILED_STEP .. FIRST_PROFILED_STEP + n_steps - 1 (1-based)."""

    def __init__(self, n_steps: int, total_steps: int, run_dir: Path, device: torch.device, is_main: bool) -> None:
        self.first = min(FIRST_PROFILED_STEP, total_steps)
        self.last = min(self.first + n_steps - 1, total_steps)
        self.run_dir, self.device, self.is_main = run_dir, device, is_main
        self.steps: list[dict[str, float]] = []  # per profiled step: phase -> seconds, "step" and "forward_passes"
        self.current: dict[str, float] = defaultdict(float)
        self.stack: list[float] = []  # the time nested phases took, one entry per open phase
        self.inside_whole = 0  # open `whole` phases: the phases inside them are not timed apart
        self.torch_profiler = None
        self.started = 0.0

    def covers(self, step: int) -> bool:
        return self.first <= step <= self.last

    def begin_step(self, step: int, data_seconds: float) -> None:
        """Called when step `step`'s micro-batches arrived, `data_seconds` after the previous step ended."""
        global _active
        if not self.covers(step):
            return
        if step == self.first:
            self.torch_profiler = torch.profiler.profile(activities=_activities(self.device), record_shapes=False)
            self.torch_profiler.__enter__()
        self.current = defaultdict(float, data=data_seconds)
        self.started = time.perf_counter() - data_seconds
        _active = self

    def end_step(self, step: int) -> dict[str, float] | None:
        """Called when step `step` is done (logged, checkpointed); after the last profiled step, writes the results
        (main process) and returns the medians."""
        global _active
        if not self.covers(step):
            return None
        self._synchronize()
        self.current["step"] = time.perf_counter() - self.started
        self.current.setdefault("forward_passes", 0)
        self.steps.append(dict(self.current))
        _active = None
        if step < self.last:
            return None
        self.torch_profiler.__exit__(None, None, None)
        medians = self.medians()
        if self.is_main:
            self.write(medians)
        self.torch_profiler = None
        return medians

    def close(self) -> None:
        """Stop profiling where a run ends inside the profiled steps (a stop signal, an error)."""
        global _active
        _active = None
        if self.torch_profiler is not None:
            self.torch_profiler.__exit__(None, None, None)
        self.torch_profiler = None

    @contextlib.contextmanager
    def timed(self, name: str, whole: bool = False):
        if self.inside_whole:
            yield
            return
        self.inside_whole += whole
        if name == "forward":
            self.current["forward_passes"] += 1
        self._synchronize()
        started = time.perf_counter()
        self.stack.append(0.0)
        try:
            with torch.profiler.record_function(f"halyard/{name}"):
                yield
        finally:
            self.inside_whole -= whole
            self._synchronize()
            elapsed = time.perf_counter() - started
            nested = self.stack.pop()
            self.current[name] += elapsed - nested
            if self.stack:
                self.stack[-1] += elapsed

    def medians(self) -> dict[str, float]:
        """Median seconds per step of each phase, "other" and the whole step, over the profiled steps."""
        rows = [{**step, "other": other_seconds(step)} for step in self.steps]
        return {key: statistics.median(r.get(key, 0.0) for r in rows) for key in (*PHASES, "other", "step")}

    def write(self, medians: dict[str, float]) -> None:
        trace = self.run_dir / TRACE_FILE
        self.torch_profiler.export_chrome_trace(str(trace))
        sort_key = "self_cuda_time_total" if self.device.type == "cuda" else "self_cpu_time_total"
        operators = self.torch_profiler.key_averages().table(sort_by=sort_key, row_limit=TOP_OPERATORS)
        (self.run_dir / PROFILE_FILE).write_text(
            f"# Profile of steps {self.first}-{self.last}\n\n{phase_table(medians)}\n\n"
            f"## Each profiled step (seconds)\n\n{step_table(self.first, self.steps)}\n\n"
            f"## Top operators (torch.profiler, all profiled steps)\n\n```\n{operators}\n```\n\n"
            f"Trace: {TRACE_FILE} (chrome://tracing or https://ui.perfetto.dev)\n"
        )
        logger.info(f"profile of steps {self.first}-{self.last}: {self.run_dir / PROFILE_FILE}, {trace}")

    def _synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def phase_table(medians: dict[str, float]) -> str:
    """The markdown table of a step's phases: median seconds per step and share of the step."""
    step = medians["step"] or float("inf")
    lines = ["| phase | seconds per step (median) | share of the step |", "|---|---|---|"]
    lines += [f"| {name} | {medians[name]:.3f} | {medians[name] / step:.1%} |" for name in (*PHASES, "other")]
    lines.append(f"| whole step | {medians['step']:.3f} | 100% |")
    return "\n".join(lines)


def other_seconds(step: dict[str, float]) -> float:
    """What of a profiled step's wall time no phase took (Python between the phases, an evaluation, a checkpoint)."""
    return step["step"] - sum(step.get(p, 0.0) for p in PHASES)


def step_table(first: int, steps: list[dict[str, float]]) -> str:
    """The markdown table of each profiled step's phases, from step `first` on: steps differ (their sizes, how many
    forward passes they run), and a median hides which ones are slow."""
    lines = [
        "| step | forward passes | " + " | ".join(PHASES) + " | other | whole step |",
        "|---|---|" + "---|" * (len(PHASES) + 2),
    ]
    for number, step in enumerate(steps, start=first):
        cells = [f"{step.get(p, 0.0):.3f}" for p in PHASES] + [f"{other_seconds(step):.3f}", f"{step['step']:.3f}"]
        lines.append(f"| {number} | {step['forward_passes']:.0f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _activities(device: torch.device) -> list:
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    return activities
