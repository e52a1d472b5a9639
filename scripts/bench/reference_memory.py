"""reference-memory: DPO's peak memory with a live reference model and with its log-probs precomputed, through the
CLI."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

from .runs import REPO


def bench_reference_memory(args) -> str:
    """DPO on SmolLM2-135M: peak memory with a live reference model vs reference log-probs precomputed and cached."""
    work = Path(tempfile.mkdtemp(prefix="halyard-bench-"))
    base = [sys.executable, str(REPO / "launch.py"), "loss=dpo", "model=smollm2", f"cache_dir={work}",
            "datasets=[data/demo/pref_train.jsonl]", f"max_steps={args.steps}", "log_every_steps=100"]  # fmt: skip
    runs = (("live reference model", ["exp_name=live"]),
            ("precompute (first run: computes and caches)", ["exp_name=pre1", "reference.precompute=true"]),
            ("precompute (cached: no reference model loaded)", ["exp_name=pre2", "reference.precompute=true"]))  # fmt: skip
    lines = ["| DPO, SmolLM2-135M | peak RSS (MB) | seconds per step |", "|---|---|---|"]
    for label, extra in runs:
        subprocess.run(base + extra, check=True, cwd=REPO, capture_output=True)
        summary = json.loads((work / extra[0].split("=")[1] / "summary.json").read_text())
        per_step = summary["train_seconds"] / summary["step"]
        lines.append(f"| {label} | {summary['peak_memory_mb']:,.0f} | {per_step:.2f} |")
    return "\n".join(lines)
