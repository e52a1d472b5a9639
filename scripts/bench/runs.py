"""Running what a benchmark compares, each in its own process: a Halyard run through the CLI, a peer run (TRL, or the
bare loop) through child.py, a training command timed with the peak memory of its process tree."""

from __future__ import annotations

import itertools
import json
import os
import resource
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[2]
# The peer runs' program (a module, so that it is read and linted like the rest), run from the repository root:
# python -m scripts.bench.child MODE WORK SETTINGS
CHILD = "scripts.bench.child"
OFFLINE = {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "WANDB_MODE": "offline",
    "TOKENIZERS_PARALLELISM": "false",
}


def run_child(mode: str, work: Path, settings: dict) -> dict:
    """One peer run (TRL, or the bare loop) in its own process: median step seconds, units per step, peak RSS, page
    faults."""
    faults = children_page_faults()
    output = subprocess.run([sys.executable, "-m", CHILD, mode, str(work), json.dumps(settings)], cwd=REPO,
                            capture_output=True, text=True, env={**os.environ, **OFFLINE})  # fmt: skip
    if output.returncode != 0:
        raise RuntimeError(f"{mode} failed:\n{output.stderr[-3000:]}")
    result = json.loads(output.stdout.strip().splitlines()[-1])
    return {**result, "page_faults": children_page_faults() - faults}


def children_page_faults() -> int:
    """Minor page faults of this process's finished children (and theirs: a run's data loader workers): a page
    the kernel had to map, and zero, on first touch."""
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_minflt


def halyard_overrides(work: Path, name: str, overrides: list[str]) -> list[str]:
    """The whole command line of a benchmark's Halyard run: metrics every step, a constant learning rate, no
    clipping, epochs enough for max_steps unless the overrides set n_epochs."""
    epochs = [] if any(o.startswith("n_epochs=") for o in overrides) else ["n_epochs=100"]
    return [f"cache_dir={work}", f"exp_name={name}", "log_every_steps=1", "warmup_ratio=0", "model.max_grad_norm=null",
            *epochs, *overrides]  # fmt: skip


def warmup_of(rows: list[dict], warmup_steps: int | None) -> int:
    """How many of a run's first steps (its logged rows) are its warm-up: `warmup_steps`, or with None its whole first
    epoch (the steps whose logged epoch progress is at most 1)."""
    if warmup_steps is not None:
        return warmup_steps
    return sum(1 for row in rows if row["epoch"] <= 1 + 1e-9)


def run_halyard(work: Path, name: str, overrides: list[str], warmup_steps: int | None, unit: str) -> dict:
    """One Halyard run through the CLI: median step seconds after the warm-up (`warmup_steps`, None: the first
    epoch), `unit` (supervised_tokens or examples) per step (and of every step: per_step), peak RSS, page faults, the
    first losses, and the phase medians of profile_steps (profile) where it was set."""
    command = [sys.executable, str(REPO / "launch.py"), *halyard_overrides(work, name, overrides)]
    faults = children_page_faults()
    output = subprocess.run(command, cwd=REPO, capture_output=True, text=True, env={**os.environ, **OFFLINE})
    faults = children_page_faults() - faults
    if output.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{output.stderr[-3000:]}")
    rows = [json.loads(line) for line in (work / name / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "loss/train" in r]
    warmup_steps = warmup_of(rows, warmup_steps)
    seconds = [b["train_seconds"] - a["train_seconds"] for a, b in itertools.pairwise(rows)][warmup_steps - 1 :]
    units = [b[unit] - a[unit] for a, b in itertools.pairwise(rows)][warmup_steps - 1 :]
    summary = json.loads((work / name / "summary.json").read_text())
    step_seconds = statistics.median(seconds)
    per_step = [rows[0][unit]] + [b[unit] - a[unit] for a, b in itertools.pairwise(rows)]
    return {"step_seconds": step_seconds, "units_per_step": statistics.mean(units), "per_step": per_step,
            "profile": summary.get("profile"), "micro_batch_tokens": summary.get("micro_batch_tokens"),
            "rate": sum(units) / sum(seconds), "peak_mb": summary["peak_memory_mb"], "page_faults": faults,
            "losses": [r["loss/train"] for r in rows[:2]], "warmup_steps": warmup_steps, "mfu": statistics.median(r["mfu"] for r in rows[warmup_steps:])}  # fmt: skip


class TreeMemory:
    """Peak memory of a training command's processes (its training processes and their data loader workers, not
    the `accelerate launch` parent that only waits), sampled every 0.2 s: PSS (shared pages split among the processes
    that map them, so forked workers and a shared page cache are not counted twice) and RSS summed."""

    def __init__(self, process) -> None:
        self.root, self.peak_pss, self.peak_rss, self.done = psutil.Process(process.pid), 0, 0, False
        self.thread = threading.Thread(target=self.sample, daemon=True)
        self.thread.start()

    def sample(self) -> None:
        while not self.done:
            pss = rss = 0
            try:
                for p in [self.root, *self.root.children(recursive=True)]:
                    if "accelerate.commands.launch" in " ".join(p.cmdline()):
                        continue  # the launcher only waits for the training processes
                    info = p.memory_full_info()
                    pss, rss = pss + info.pss, rss + info.rss
            except psutil.Error:
                pass  # a process ended while sampled
            self.peak_pss, self.peak_rss = max(self.peak_pss, pss), max(self.peak_rss, rss)
            time.sleep(0.2)

    def stop(self) -> tuple[float, float]:
        self.done = True
        self.thread.join()
        return self.peak_pss / 2**20, self.peak_rss / 2**20


def timed_run(command: list[str]) -> dict:
    """Run a training command to its end; wall seconds, peak memory of its process tree, and its stderr."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "offline"}
    started = time.perf_counter()
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    memory = TreeMemory(process)
    _, stderr = process.communicate()
    seconds = time.perf_counter() - started
    pss, rss = memory.stop()
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{stderr[-3000:]}")
    return {"seconds": seconds, "pss_mb": pss, "rss_mb": rss, "stderr": stderr}
