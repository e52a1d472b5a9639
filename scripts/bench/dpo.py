"""dpo: DPO pairs/s and peak RSS, Halyard's layouts and a precomputed reference against TRL's DPOTrainer, each in its
own process, on the same model, token ids and pairs per step."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
from transformers import AutoTokenizer

from train.app.config import DataConfig
from train.data.preprocess import load_examples
from train.data.store import IGNORE_INDEX, pack_plan, packed_row_tokens

from .data import synthetic_pair_rows
from .models import model_for
from .runs import run_child, run_halyard


def bench_dpo(args) -> str:
    """DPO: Halyard (each prompt once, the default; two rows per pair; packed; a precomputed reference) against
    TRL's DPOTrainer (padded, with and without precomputed reference; its padding_free is disabled in 1.16), each
    in its own process, on the same model, pairs and pairs per step."""
    work = Path(tempfile.mkdtemp(prefix="halyard-bench-dpo-"))
    tokenizer = AutoTokenizer.from_pretrained(args.smollm2)
    model_dir, model_text = model_for(args, work, tokenizer)
    steps = args.steps + args.warmup_steps
    data = work / "pairs-data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in synthetic_pair_rows(steps * args.pairs * 4, seed=2)))
    pairs = list(load_examples([str(data)], tokenizer, DataConfig(), args.max_length, kind="paired")[0])
    with (work / "pairs.jsonl").open("w") as out:
        for pair in pairs:
            prompt = next(i for i, label in enumerate(pair.chosen.labels) if label != IGNORE_INDEX)
            out.write(json.dumps({"prompt_ids": pair.chosen.input_ids[:prompt],
                                  "chosen_ids": pair.chosen.input_ids[prompt:],
                                  "rejected_ids": pair.rejected.input_ids[prompt:]}) + "\n")  # fmt: skip
    lengths = np.array([len(p.chosen.input_ids) + len(p.rejected.input_ids) for p in pairs])
    _, row_starts = pack_plan(lengths, packed_row_tokens("paired", args.max_length))
    n_rows = len(row_starts) - 1
    rows_per_step = max(1, round(args.pairs * n_rows / len(pairs)))
    base = ["loss=dpo", "model=smollm2", f"++model.name_or_path={model_dir}", f"datasets=[{data}]",
            f"model.dtype={args.dtype}", f"model.max_length={args.max_length}", f"max_steps={steps}", "lr=1e-6"]  # fmt: skip
    batch = [f"model.batch_size={args.pairs}"]
    packed = [f"model.batch_size={rows_per_step}", "data.packing=true"]
    separate = [*batch, "data.shared_prompt=false"]
    runs = {
        "Halyard, prompt once per pair (the default), live reference": ("shared", batch),
        "Halyard, prompt twice (two padded rows per pair), live reference": ("separate", separate),
        f"Halyard, packed ({rows_per_step} rows of {2 * args.max_length} per step), live reference": ("packed", packed),
        "Halyard, prompt once per pair, precomputed reference": ("shared-pre", [*batch, "reference.precompute=true"]),
    }
    results = {label: run_halyard(work, name, [*base, *extra], args.warmup_steps, "pairs")
               for label, (name, extra) in runs.items()}  # fmt: skip
    settings = {"model": str(model_dir), "dtype": args.dtype, "lr": 1e-6, "steps": steps, "pairs": args.pairs,
                "warmup_steps": args.warmup_steps}  # fmt: skip
    results["TRL 1.16 DPOTrainer, padded, live reference"] = run_child("trl-dpo", work, settings)
    results["TRL 1.16 DPOTrainer, padded, precompute_ref_log_probs"] = run_child("trl-dpo-pre", work, settings)
    best_trl = max(r["rate"] for name, r in results.items() if name.startswith("TRL"))
    mean_pair = lengths.mean()
    lines = [
        f"Model: {model_text}, {args.dtype}. Data: {len(pairs)} synthetic chat preference pairs, prompt + chosen + "
        f"prompt + rejected {lengths.min()}-{lengths.max()} tokens (mean {mean_pair:.0f}); {args.pairs} pairs per "
        f"step (packed: {rows_per_step} rows, ~{args.pairs} pairs); AdamW lr 1e-6, no clipping, no gradient "
        f"checkpointing; {args.warmup_steps} warm-up + {args.steps} timed steps per run; rate = their pairs / their "
        "seconds. TRL 1.16 "
        'disables DPO padding_free ("temporarily unavailable"), so padded is its best configuration here.',
        "",
        "| run | pairs/s | vs best TRL | median step (s) | pairs per step | peak RSS (MB) |",
        "|---|---|---|---|---|---|",
        *(
            f"| {name} | {r['rate']:.2f} | {r['rate'] / best_trl:.2f}x | {r['step_seconds']:.2f} | "
            f"{r['units_per_step']:.1f} | {r['peak_mb']:,.0f} |"
            for name, r in results.items()
        ),
    ]
    return "\n".join(lines)
