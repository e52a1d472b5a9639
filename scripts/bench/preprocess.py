"""preprocess: the data pipeline's tokenization throughput on synthetic chat rows, uncached and cached."""

from __future__ import annotations

import contextlib
import json
import logging
import statistics
import tempfile
import time
from pathlib import Path

from train.app.config import DataConfig, ModelConfig
from train.app.models import build_tokenizer
from train.data.preprocess import preprocess

from .data import synthetic_chat_rows


def bench_preprocess(args) -> str:
    """Rows/s of train.data.preprocess on args.rows synthetic chat rows: uncached with 1 and 2 processes, then cached
    (the same inputs again), median of args.repeats."""
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
