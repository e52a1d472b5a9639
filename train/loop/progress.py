"""What the main process shows while training: a tqdm bar on a terminal, short plain lines elsewhere.

Every metric goes to metrics.jsonl; the console gets what a person watches: the step, the loss, the learning rate,
tokens/s and the time left (and, at evaluations, the eval loss and, for preference losses, the eval accuracy). On a
terminal the bar shows them, updating in place, and evaluation results are printed above it. In a non-interactive
log (CI, a cluster's job log) there is no bar: every logged step is one short line. `verbose=true` prints every
metric instead, and lets the libraries' own warnings and progress bars through (see `quiet_libraries`).
"""

from __future__ import annotations

import logging
import sys
import time
import warnings

from tqdm.auto import tqdm

from train.loop.benchmarks import is_benchmark_metric, task_and_metric

logger = logging.getLogger(__name__)

# Warnings that libraries print on every run and that the user can do nothing about.
KNOWN_LIBRARY_WARNINGS = (
    (FutureWarning, r".*`is_gradient_checkpointing` is deprecated"),  # transformers 5, called by peft
)
QUIET_LOGGERS = ("transformers", "accelerate", "datasets", "huggingface_hub", "peft")
# bitsandbytes (imported by peft) and kernels warn at every start, offline, that an optional faster CPU kernel cannot
# be fetched from the Hub ("pip install kernels", which is installed): nothing to act on, verbose or not. The
# pure-torch path they fall back to is the one Halyard tests.
KERNEL_NOTICE_LOGGERS = ("bitsandbytes", "kernels")


def silence_kernel_notices() -> None:
    """Before anything imports peft or bitsandbytes: launch.py, the scripts, and every run (quiet_libraries)."""
    for name in KERNEL_NOTICE_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)


def quiet_libraries(verbose: bool) -> None:
    """Keep the libraries' known warnings, info logs and nested progress bars (loading weights, writing shards) out
    of the run's output, unless `verbose`. Errors still show."""
    silence_kernel_notices()
    if verbose:
        return
    for category, message in KNOWN_LIBRARY_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    import datasets
    import huggingface_hub.utils
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    datasets.utils.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    huggingface_hub.utils.disable_progress_bars()


def short_line(row: dict[str, float], total_steps: int, seconds_left: float | None) -> str:
    """`step 5/45  loss 1.532  lr 3e-05  812 tok/s  eval loss 1.41  eval acc 0.75  0:01:02 left` (what is present)."""
    parts = [f"step {row['step']}/{total_steps}"]
    if "loss/train" in row:
        parts.append(f"loss {row['loss/train']:.4g}")
    if "lr" in row:
        parts.append(f"lr {row['lr']:.3g}")
    if "tokens_per_second" in row:
        parts.append(f"{row['tokens_per_second']:,.0f} tok/s")
    if "loss/eval" in row:
        parts.append(f"eval loss {row['loss/eval']:.4g}")
    if "rewards_eval/accuracies" in row:
        parts.append(f"eval acc {row['rewards_eval/accuracies']:.3g}")
    if "samples/reward" in row:
        parts.append(f"samples reward {row['samples/reward']:.3g}")
    parts += [f"{name} {value:.3g}" for name, value in benchmark_headlines(row).items()]
    if seconds_left is not None:
        parts.append(f"{format_seconds(seconds_left)} left")
    return "  ".join(parts)


def benchmark_headlines(row: dict[str, float]) -> dict[str, float]:
    """The first metric of each benchmark task in a row ("halyard_demo acc" -> 0.75), stderrs and the rest aside:
    metrics.jsonl has them all."""
    shown: dict[str, float] = {}
    for key, value in row.items():
        named = task_and_metric(key)
        if named and not any(k.startswith(named[0] + " ") for k in shown):
            shown[" ".join(named)] = value
    return shown


def full_line(row: dict[str, float]) -> str:
    return "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items())


class Progress:
    def __init__(
        self, total_steps: int, start_step: int, is_main: bool, interactive: bool | None = None, verbose: bool = False
    ):
        self.total_steps, self.start_step = total_steps, start_step
        self.verbose = verbose
        self.started = time.perf_counter()
        self.interactive = sys.stderr.isatty() if interactive is None else interactive
        self.bar = None
        if is_main and self.interactive:
            self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True, file=sys.stderr)

    def seconds_left(self, step: int) -> float:
        done = step - self.start_step
        return (time.perf_counter() - self.started) / done * (self.total_steps - step) if done > 0 else float("nan")

    def advance(self, step: int, row: dict[str, float]) -> None:
        """Called after every step with whatever was logged for it (possibly only the step number)."""
        if self.bar is None:
            return
        self.bar.update(step - self.bar.n)
        shown = {"loss": row.get("loss/train"), "lr": row.get("lr"), "tok/s": row.get("tokens_per_second")}
        if any(v is not None for v in shown.values()):
            self.bar.set_postfix({k: f"{v:.4g}" for k, v in shown.items() if v is not None}, refresh=False)

    def show(self, row: dict[str, float]) -> None:
        """Print a logged row: above the bar on a terminal (evaluations only), as one line elsewhere."""
        left = self.seconds_left(row["step"]) if row["step"] > self.start_step else None
        text = full_line(row) if self.verbose else short_line(row, self.total_steps, left)
        if self.bar is not None:
            if any(k.endswith("/eval") or is_benchmark_metric(k) for k in row):
                self.bar.write(text, file=sys.stderr)
            return
        if self.verbose and left is not None:
            text += f"  time_left={format_seconds(left)}"
        logger.info(text)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def format_seconds(seconds: float) -> str:
    if seconds != seconds:  # nan: nothing measured yet
        return "?"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"
