"""compile: model.compile (each decoder layer compiled, train/app/models.py compile_layers) against eager on SmolLM2's
training steps, float32 and bfloat16 autocast, on grouped padded batches (a new length every step) and packed rows.

For each dtype and layout the eager and the compiled model (the same weights, loaded twice) take the same batches
in turn, step by step in one process, so a change in the machine's load falls on both. Each setting starts with
torch._dynamo reset: its first compiled step pays its whole compilation. A step is one forward + backward with
Halyard's lean loss (logits at supervised positions only); the optimizer is not compiled and not timed."""

from __future__ import annotations

import json
import random
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch._dynamo.utils import counters
from transformers import AutoModelForCausalLM, AutoTokenizer

from train.app.config import DataConfig
from train.app.models import compile_layers
from train.batching.collate import collate, collate_packed
from train.data.preprocess import load_examples
from train.data.store import pack
from train.objectives.losses import selected_nll_sum, supervised_positions

from .data import synthetic_chat_rows

LAYOUTS = ("grouped", "packed")
DTYPES = ("float32", "bfloat16")


def grouped_batches(examples, batch_size: int, steps: int, pad_id: int, seed: int) -> list[dict]:
    """Padded batches of examples of similar length (sorted, cut into batches, the batches shuffled), as
    data.group_by_length gives them: the padded length changes from step to step."""
    order = np.argsort(examples.lengths(), kind="stable")
    chunks = [order[i : i + batch_size] for i in range(0, len(order) - batch_size + 1, batch_size)]
    random.Random(seed).shuffle(chunks)
    return [collate(examples.gather(chunk), pad_id) for chunk in chunks[:steps]]


def packed_batches(examples, rows: int, max_length: int, steps: int, pad_id: int, seed: int) -> list[dict]:
    """Micro-batches of `rows` packed rows (best-fit decreasing into max_length slots), padded to the longest row."""
    packed = pack(examples, max_length, cache=False)
    order = list(range(len(packed)))
    random.Random(seed).shuffle(order)
    return [collate_packed(packed.gather(order[i : i + rows]), pad_id) for i in range(0, rows * steps, rows)]


def step_seconds(model, batch: dict, bf16: bool) -> float:
    """Wall seconds of one forward + backward with the lean loss (the packed layout passes position_ids, no mask)."""
    inputs = {key: batch[key] for key in ("input_ids", "attention_mask", "position_ids") if key in batch}
    started = time.perf_counter()
    keep = supervised_positions(batch["labels"])
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        logits = model(**inputs, logits_to_keep=keep).logits
    loss = selected_nll_sum(logits, batch["labels"], keep)
    (loss.total / loss.count).backward()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - started


def load(model_dir: str):
    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="sdpa", dtype=torch.float32)
    model.config.use_cache = False
    return model.train()


def compare(model_dir: str, batches: list[dict], bf16: bool, warmup_steps: int) -> dict:
    """Eager and compiled models on the same batches, interleaved step by step; the compiled graphs counted."""
    torch._dynamo.reset()
    counters.clear()  # the graphs of this setting only
    eager, compiled = load(model_dir), load(model_dir)
    compile_layers(compiled)
    times = {"eager": [], "compiled": []}
    graphs_before, new_graph_steps = 0, []
    for step, batch in enumerate(batches, start=1):
        times["eager"].append(step_seconds(eager, batch, bf16))
        times["compiled"].append(step_seconds(compiled, batch, bf16))
        graphs = counters["stats"]["unique_graphs"]
        if graphs > graphs_before:
            new_graph_steps.append(step)
        graphs_before = graphs
    steady = {name: statistics.median(t[warmup_steps:]) for name, t in times.items()}
    return {
        "first_eager": times["eager"][0],
        "first_compiled": times["compiled"][0],
        "steady_eager": steady["eager"],
        "steady_compiled": steady["compiled"],
        "graphs": graphs_before,
        "new_graph_steps": new_graph_steps,
    }


def bench_compile(args) -> str:
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    data = Path(tempfile.mkdtemp(prefix="halyard-bench-compile-")) / "chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in synthetic_chat_rows(args.rows, seed=5)))
    examples = load_examples([str(data)], tokenizer, DataConfig(), args.max_length)[0]
    layouts = {
        "grouped": lambda: grouped_batches(examples, args.batch_size, args.steps, pad_id, seed=0),
        "packed": lambda: packed_batches(examples, args.packed_rows, args.max_length, args.steps, pad_id, seed=0),
    }
    results = {}
    for dtype in args.dtypes:
        for layout in args.layouts:
            batches = layouts[layout]()
            results[dtype, layout] = compare(args.model_dir, batches, dtype == "bfloat16", args.warmup_steps), batches
    return table(args, results)


def table(args, results: dict) -> str:
    lines = [
        f"{args.model_dir}: {args.steps} steps per setting, eager and compiled (model.compile) in turn on the same "
        f"batches, medians after {args.warmup_steps} warm-up steps; grouped: {args.batch_size} examples per "
        f"batch, packed: {args.packed_rows} rows of up to {args.max_length} tokens; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads.",
        "",
        "| dtype | layout | padded lengths | eager step (s) | compiled step (s) | speed-up | first step eager / "
        "compiled (s) | graphs compiled (recompilations) | at steps |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for (dtype, layout), (r, batches) in results.items():
        lengths = sorted({b["input_ids"].shape[1] for b in batches})
        shown = f"{len(lengths)} ({lengths[0]}-{lengths[-1]})"
        lines.append(
            f"| {dtype} | {layout} | {shown} | {r['steady_eager']:.3f} | {r['steady_compiled']:.3f} | "
            f"{r['steady_eager'] / r['steady_compiled']:.2f}x | {r['first_eager']:.1f} / {r['first_compiled']:.1f} | "
            f"{r['graphs']} ({max(0, r['graphs'] - 1)}) | {', '.join(map(str, r['new_graph_steps']))} |"
        )
    return "\n".join(lines)
