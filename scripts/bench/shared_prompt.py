"""shared-prompt: a preference pair's prompt run once (one row, a 4D mask) against twice (two rows, or packed), the
same log-probs checked, the policy's forward + backward timed in one process."""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from train.app.config import DataConfig
from train.batching.collate import collate, collate_sequences, collate_shared_prompt
from train.batching.sequences import forward_sequence_logps
from train.data.preprocess import load_examples
from train.data.store import IGNORE_INDEX

from .data import synthetic_pair_rows


def bench_shared_prompt(args) -> str:
    """The three layouts of DPO pairs through the trainer's own code (`forward_sequence_logps`): two padded rows
    per pair, the batch's pairs packed in one row, and each pair's prompt once (`collate_shared_prompt`); the same
    log-probs (checked), and the policy's forward + backward time on the same pairs, median over repeats."""
    tokenizer = AutoTokenizer.from_pretrained(args.smollm2)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    model = AutoModelForCausalLM.from_pretrained(args.smollm2, attn_implementation="sdpa", dtype=torch.float32)
    model.config.use_cache = False
    work = Path(tempfile.mkdtemp(prefix="halyard-bench-shared-"))
    data = work / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in synthetic_pair_rows(args.pairs * 4, seed=3)))
    pairs = list(load_examples([str(data)], tokenizer, DataConfig(), 512, kind="paired")[0])
    pairs = sorted(pairs, key=lambda p: len(p.chosen.input_ids))[-args.pairs :] if args.long_prompts else pairs

    def separate(batch_pairs):
        return collate([p.chosen for p in batch_pairs] + [p.rejected for p in batch_pairs], pad)

    def packed(batch_pairs):
        n = len(batch_pairs)
        sequences = [[s for p in batch_pairs for s in (p.chosen, p.rejected)]]
        return collate_sequences(sequences, [j + side * n for j in range(n) for side in (0, 1)], pad)

    layouts = {
        "two padded rows per pair (prompt twice)": separate,
        "packed: the batch's pairs in one row (prompt twice, no padding)": packed,
        "prompt once: one row per pair, 4D mask (the default)": lambda b: collate_shared_prompt(b, pad),
    }
    batches = [pairs[i : i + args.batch] for i in range(0, len(pairs) - args.batch + 1, args.batch)][: args.repeats]
    with torch.no_grad():
        reference = [forward_sequence_logps(model, separate(b))[0] for b in batches[:2]]
        difference = max(
            (forward_sequence_logps(model, layout(b))[0] - expected).abs().max().item()
            for layout in layouts.values()
            for b, expected in zip(batches[:2], reference, strict=True)
        )
    timings = {name: [] for name in layouts}
    for batch_pairs in batches:
        for name, layout in layouts.items():
            batch = layout(batch_pairs)
            started = time.perf_counter()
            forward_sequence_logps(model, batch)[0].sum().backward()
            model.zero_grad(set_to_none=True)
            timings[name].append(time.perf_counter() - started)
    prompt = statistics.mean(next(i for i, t in enumerate(p.chosen.labels) if t != IGNORE_INDEX) for p in pairs)
    tokens = statistics.mean(len(p.chosen.input_ids) + len(p.rejected.input_ids) for p in pairs)
    base = statistics.median(timings["two padded rows per pair (prompt twice)"][1:])
    lines = [
        f"{Path(args.smollm2).name}, float32, sdpa; {len(batches)} batches of {args.batch} pairs (the first a "
        f"warm-up), mean prompt {prompt:.0f} tokens of {tokens:.0f} per pair (both sequences); largest log-prob "
        f"difference between the layouts {difference:.1e}.",
        "",
        "| layout | policy forward + backward, median (s) | vs two rows |",
        "|---|---|---|",
        *(
            f"| {name} | {statistics.median(t[1:]):.3f} | {statistics.median(t[1:]) / base:.2f}x |"
            for name, t in timings.items()
        ),  # fmt: skip
    ]
    return "\n".join(lines)
