"""Benchmarks. Results go to docs/BENCHMARKS.md with the command that produced them.

    python scripts/benchmark.py preprocess [--rows 20000] [--repeats 3] [--tokenizer DIR]

    python scripts/benchmark.py reference-memory [--steps 6]

preprocess: tokenization throughput (rows/s) of the data pipeline on a synthetic multi-turn chat set, uncached with
1 and 2 processes (data.num_proc) and cached (a second run with the same inputs), medians over repeats, measured
side by side in one invocation.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def synthetic_chat_rows(n_rows: int, seed: int = 0) -> list[dict]:
    """Multi-turn chat rows with skewed lengths (most short, a long tail), like real chat data."""
    rng = random.Random(seed)
    words = [
        "the",
        "a",
        "ship",
        "sails",
        "over",
        "sea",
        "wind",
        "rope",
        "knot",
        "deck",
        "crew",
        "captain",
        "harbor",
        "storm",
        "calm",
        "north",
        "south",
    ]

    def sentence() -> str:
        return " ".join(rng.choice(words) for _ in range(int(rng.lognormvariate(2.5, 0.8)) + 1)) + "."

    rows = []
    for _ in range(n_rows):
        messages = []
        for _turn in range(rng.choice([1, 1, 1, 2, 3])):
            messages.append({"role": "user", "content": sentence()})
            messages.append({"role": "assistant", "content": " ".join(sentence() for _ in range(rng.randint(1, 4)))})
        rows.append({"messages": messages})
    return rows


def bench_preprocess(args) -> str:
    import contextlib
    import logging

    from train.config import DataConfig, ModelConfig
    from train.data import preprocess
    from train.models import build_tokenizer

    logging.disable(logging.INFO)
    tokenizer = build_tokenizer(ModelConfig(name_or_path=args.tokenizer))
    work = Path(tempfile.mkdtemp(prefix="halyard-bench-"))
    data = work / "chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in synthetic_chat_rows(args.rows)))
    results: dict[str, list[float]] = {"uncached, num_proc=1": [], "uncached, num_proc=2": [], "cached": []}
    for repeat in range(args.repeats):
        for label, num_proc in (("uncached, num_proc=1", 1), ("uncached, num_proc=2", 2)):
            cache = work / f"cache-{label[-1]}-{repeat}"
            started = time.perf_counter()
            preprocess(
                [str(data)], tokenizer, DataConfig(num_proc=num_proc), 1024, "sft", cache, contextlib.nullcontext
            )
            results[label].append(args.rows / (time.perf_counter() - started))
        started = time.perf_counter()
        preprocess(
            [str(data)],
            tokenizer,
            DataConfig(num_proc=1),
            1024,
            "sft",
            work / f"cache-1-{repeat}",
            contextlib.nullcontext,
        )
        results["cached"].append(args.rows / (time.perf_counter() - started))
    base = statistics.median(results["uncached, num_proc=1"])
    lines = [
        "| preprocessing | rows/s (median) | vs uncached num_proc=1 |",
        "|---|---|---|",
        *(
            f"| {label} | {statistics.median(v):,.0f} | {statistics.median(v) / base:.2f}x |"
            for label, v in results.items()
        ),
    ]
    return "\n".join(lines)


def bench_reference_memory(args) -> str:
    """DPO on SmolLM2-135M: peak memory with a live reference model vs reference log-probs precomputed and cached."""
    import subprocess

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    pre = sub.add_parser("preprocess")
    pre.add_argument("--rows", type=int, default=20000)
    pre.add_argument("--repeats", type=int, default=3)
    default_tokenizer = Path.home() / ".cache" / "halyard" / "models" / "SmolLM2-135M-Instruct"
    pre.add_argument("--tokenizer", default=str(default_tokenizer), help="tokenizer folder (default: SmolLM2's)")
    memory = sub.add_parser("reference-memory")
    memory.add_argument("--steps", type=int, default=6)
    args = parser.parse_args()
    table = bench_preprocess(args) if args.what == "preprocess" else bench_reference_memory(args)
    command = "python scripts/benchmark.py " + " ".join(sys.argv[1:])
    print(f"`{command}` on {platform.processor() or platform.machine()}\n")
    print(table)


if __name__ == "__main__":
    main()
