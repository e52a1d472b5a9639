"""scale: the data path at 10k to 1M synthetic rows on the tiny model through the real CLI: seconds to the end of
step 1 and the peak memory of all the run's processes, uncached and cached, packed or not, on 1 and 2 processes."""

from __future__ import annotations

import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

from scripts import make_tiny_model
from train.data.store import TokenTable, pack_plan

from .data import write_scale_rows
from .runs import REPO, timed_run


def bench_scale(args) -> str:
    """Start-up to the end of step 1 and peak memory at 10k, 100k and 1M rows, through the real CLI."""
    work = Path(args.work or tempfile.mkdtemp(prefix="halyard-bench-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    if not (work / "tiny-llama").exists():
        make_tiny_model.make(work / "tiny-llama", "chatml")
    single = [sys.executable, str(REPO / "launch.py")]
    double = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
              str(REPO / "accelerate_config" / "cpu_2proc.yaml"), str(REPO / "launch.py")]  # fmt: skip
    lines = [
        "| rows | run | processes | packing | seconds to the end of step 1 | peak PSS, all processes (MB) | "
        "peak RSS summed (MB) |",
        "|---|---|---|---|---|---|---|",
    ]
    notes = []
    for n_rows in args.rows:
        data = work / f"chat-{n_rows}.jsonl"
        if not data.exists():
            started = time.perf_counter()
            write_scale_rows(data, n_rows, mean_words=args.mean_words)
            notes.append(
                f"wrote {n_rows:,} rows ({data.stat().st_size / 2**20:,.0f} MB) in {time.perf_counter() - started:.0f} s"
            )
        cache = work / f"cache-{n_rows}"
        shutil.rmtree(cache / "preprocessed", ignore_errors=True)
        (cache).mkdir(exist_ok=True)
        if not (cache / "tiny-llama").exists():
            (cache / "tiny-llama").symlink_to(work / "tiny-llama")
        base = ["model=tiny", f"cache_dir={cache}", f"datasets=[{data}]", "model.max_length=1024", "max_steps=1",
                "model.batch_size=8", "data.num_proc=2", "log_every_steps=1"]  # fmt: skip
        runs = [("first (uncached)", single, "false"), ("cached", single, "false"), ("cached", single, "true"),
                ("cached", double, "false"), ("cached", double, "true")]  # fmt: skip
        for index, (label, launcher, packing) in enumerate(runs):
            result = timed_run([*launcher, *base, f"exp_name=run{index}", f"data.packing={packing}"])
            processes = 2 if launcher is double else 1
            lines.append(
                f"| {n_rows:,} | {label} | {processes} | {packing} | {result['seconds']:.1f} | "
                f"{result['pss_mb']:,.0f} | {result['rss_mb']:,.0f} |"
            )
            if index == 0:
                found = re.search(r"tokenized (\d+) rows in ([\d.]+) s \(([\d,]+) rows/s\)", result["stderr"])
                notes.append(f"{n_rows:,} rows, first run: preprocessing {found.group(0) if found else '?'}")
        folder = next((cache / "preprocessed").glob("*/stats.json")).parent
        lengths = TokenTable(folder, "sft").lengths()
        started = time.perf_counter()
        pack_plan(lengths, 1024)
        notes.append(
            f"{n_rows:,} rows: {len(lengths):,} examples, mean {lengths.mean():.0f} tokens (max {lengths.max()}); "
            f"packing plan in {time.perf_counter() - started:.2f} s"
        )
    return "\n".join(lines + [""] + [f"- {note}" for note in notes])
