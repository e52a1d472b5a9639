"""sft: supervised fine-tuning, Halyard (unpacked, grouped by length, packed) against TRL's SFTTrainer (padded,
padding-free) and a bare PyTorch loop, each in its own process, on the same model, tokens and labels."""

from __future__ import annotations

import itertools
import json
import statistics
import tempfile
from pathlib import Path

import numpy as np
from safetensors.torch import save_file
from transformers import AutoTokenizer

from train.app.config import DataConfig
from train.batching.collate import collate_packed
from train.data.preprocess import load_examples
from train.data.store import concatenate, pack_plan

from .data import synthetic_chat_rows
from .models import model_for
from .runs import run_child, run_halyard


def bench_sft(args) -> str:
    """Halyard (unpacked, grouped by length, packed), TRL (padded, padding-free) and a bare loop, each in its own
    process, on the same model, tokens and labels, at equal tokens per optimizer step."""
    work = Path(tempfile.mkdtemp(prefix="halyard-bench-sft-"))
    tokenizer = AutoTokenizer.from_pretrained(args.smollm2)
    model_dir, model_text = model_for(args, work, tokenizer)
    steps = args.steps + args.warmup_steps
    data = work / "chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in synthetic_chat_rows(steps * 8 * 4, seed=1)))
    examples = list(load_examples([str(data)], tokenizer, DataConfig(), max_length=args.max_length)[0])
    (work / "sft.jsonl").write_text(
        "".join(json.dumps({"input_ids": e.input_ids, "labels": e.labels}) + "\n" for e in examples)
    )
    lengths = [len(e.input_ids) for e in examples]
    # Equal tokens per optimizer step: packed rows of max_length, as many per step as 8 examples' mean tokens fill.
    members, row_starts = pack_plan(np.array(lengths, dtype=np.int64), args.max_length)  # best-fit decreasing
    rows = [concatenate([examples[i] for i in members[a:b]]) for a, b in itertools.pairwise(row_starts.tolist())]
    efficiency = sum(lengths) / (len(rows) * args.max_length)
    rows_per_step = max(1, round(8 * statistics.mean(lengths) / (args.max_length * efficiency)))
    batches = [collate_packed(rows[i : i + rows_per_step], 0) for i in range(0, len(rows), rows_per_step)]
    save_file({f"{i}.{key}": batch[key].contiguous() for i, batch in enumerate(batches)
               for key in ("input_ids", "position_ids", "labels")}, work / "packed_batches.safetensors")  # fmt: skip
    base = ["model=smollm2", f"++model.name_or_path={model_dir}", f"datasets=[{data}]", f"model.dtype={args.dtype}",
            f"model.max_length={args.max_length}", f"max_steps={steps}", "lr=1e-5"]  # fmt: skip
    results = {
        "Halyard, unpacked, random batches": run_halyard(
            work, "unpacked", [*base, "model.batch_size=8", "data.group_by_length=false"], args.warmup_steps,
            "supervised_tokens"),
        "Halyard, grouped by length (default)": run_halyard(
            work, "grouped", [*base, "model.batch_size=8", "data.group_by_length=true"], args.warmup_steps,
            "supervised_tokens"),
        f"Halyard, packed ({rows_per_step} rows of {args.max_length} per step)": run_halyard(
            work, "packed", [*base, f"model.batch_size={rows_per_step}", "data.packing=true"], args.warmup_steps,
            "supervised_tokens"),
    }  # fmt: skip
    settings = {"model": str(model_dir), "dtype": args.dtype, "lr": 1e-5, "steps": steps,
                "warmup_steps": args.warmup_steps}  # fmt: skip
    trl_padded = run_child("trl-sft", work, settings)
    trl_free = run_child("trl-sft-pf", work, settings)
    # Padding-free is correct only if each example still attends only to itself: its first loss must equal the
    # padded run's on the same batch.
    free_ok = abs(trl_free["losses"][0] - trl_padded["losses"][0]) <= 1e-3 * abs(trl_padded["losses"][0])
    results["TRL 1.16 SFTTrainer, padded"] = trl_padded
    label = "correct" if free_ok else "WRONG: examples attend to each other"
    results[f"TRL 1.16 SFTTrainer, padding_free ({label}: step-1 loss {trl_free['losses'][0]:.4f} vs padded "
            f"{trl_padded['losses'][0]:.4f})"] = trl_free  # fmt: skip
    results["bare PyTorch loop, Halyard's packed batches, model's own loss"] = run_child("bare", work, settings)
    best_trl = max(trl_padded["rate"], trl_free["rate"] if free_ok else 0.0)
    lines = [
        f"Model: {model_text}, {args.dtype}. Data: {len(examples)} synthetic multi-turn chat examples, "
        f"{min(lengths)}-{max(lengths)} tokens (median {statistics.median(lengths):.0f}, mean "
        f"{statistics.mean(lengths):.0f}); 8 examples per step (packed: {rows_per_step} rows of {args.max_length}, "
        f"efficiency {efficiency:.0%}); AdamW lr 1e-5, no clipping, no gradient checkpointing; "
        f"{args.warmup_steps} warm-up + {args.steps} timed steps per run; rate = their tokens / their seconds.",
        "",
        "| run | supervised tokens/s | vs best TRL | median step (s) | supervised tokens per step | peak RSS (MB) |",
        "|---|---|---|---|---|---|",
        *(
            f"| {name} | {r['rate']:,.0f} | {r['rate'] / best_trl:.2f}x | {r['step_seconds']:.2f} | "
            f"{r['units_per_step']:,.0f} | {r['peak_mb']:,.0f} |"
            for name, r in results.items()
        ),
    ]
    mfus = {name: r["mfu"] for name, r in results.items() if "mfu" in r}
    lines += [
        "",
        "Halyard's logged MFU (median over timed steps): " + ", ".join(f"{n}: {m:.3f}" for n, m in mfus.items()),
    ]
    return "\n".join(lines)
