"""sft: supervised fine-tuning, Halyard (its default, grouped by length without the token budget, unpacked, packed)
against TRL's SFTTrainer (padded, padding-free) and a bare PyTorch loop over Halyard's own forward passes, each in its
own process, on the same model, tokens and labels."""

from __future__ import annotations

import json
import statistics
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
from transformers import AutoTokenizer

from train.app.config import DataConfig
from train.data.preprocess import load_examples
from train.data.store import pack_plan

from .data import synthetic_chat_rows
from .models import model_for
from .replay import halyard_passes, save_passes
from .runs import halyard_overrides, run_child, run_halyard

SAME_EXAMPLES_EPOCHS = 2  # --same-examples: the first epoch warms up, the second is timed
NO_BUDGET = 10**9  # model.micro_batch_tokens that never splits a micro-batch: the default before the token budget
TRL_FREE_RUNS = (  # (child mode, run name, what the table's label adds) of TRL's padding-free runs
    ("trl-sft-pf", "trl-pf", ""),
    ("trl-sft-pf-compiled", "trl-pf-compiled", ", torch_compile=True"),
    ("trl-sft-pf", "trl-pf-kept", ", its process with Halyard's keep_freed_host_memory (not a TRL setting)"),
)


def bench_sft(args) -> str:
    """Halyard (its default: grouped by length in passes within the token budget; without the budget; unpacked;
    packed), TRL (padded, padding-free) and a bare loop over Halyard's own passes (the default's and packed's), each
    in its own process, on the same model, tokens and labels, at equal tokens per optimizer step."""
    work = Path(tempfile.mkdtemp(prefix="halyard-bench-sft-"))
    tokenizer = AutoTokenizer.from_pretrained(args.smollm2)
    model_dir, model_text = model_for(args, work, tokenizer)
    steps = args.steps + args.warmup_steps
    # --same-examples: exactly the timed steps' examples, two epochs per run, the first its warm-up, so that every run
    # times the very same examples once each (equal tokens per step on average, not merely similar ones)
    rows = args.steps * 8 if args.same_examples else steps * 8 * 4
    data = work / "chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in synthetic_chat_rows(rows, seed=1)))
    examples = list(load_examples([str(data)], tokenizer, DataConfig(), max_length=args.max_length)[0])
    (work / "sft.jsonl").write_text(
        "".join(json.dumps({"input_ids": e.input_ids, "labels": e.labels}) + "\n" for e in examples)
    )
    lengths = [len(e.input_ids) for e in examples]
    # Equal tokens per optimizer step: packed rows of max_length, as many per step as 8 examples' mean tokens fill.
    _, row_starts = pack_plan(np.array(lengths, dtype=np.int64), args.max_length)  # best-fit decreasing
    efficiency = sum(lengths) / ((len(row_starts) - 1) * args.max_length)
    rows_per_step = max(1, round(8 * statistics.mean(lengths) / (args.max_length * efficiency)))
    base = ["model=smollm2", f"++model.name_or_path={model_dir}", f"datasets=[{data}]", f"model.dtype={args.dtype}",
            f"model.max_length={args.max_length}", f"n_epochs={SAME_EXAMPLES_EPOCHS}" if args.same_examples else f"max_steps={steps}",
            "lr=1e-5"]  # fmt: skip
    runs = {  # name: (label, overrides)
        "default": ("Halyard, grouped by length, passes within the token budget (default)", ["model.batch_size=8"]),
        "returned": ("Halyard default, keep_freed_host_memory=false (glibc returns freed memory)",
                     ["model.batch_size=8", "keep_freed_host_memory=false"]),
        "grouped": ("Halyard, grouped by length, no token budget (the default before)",
                    ["model.batch_size=8", f"model.micro_batch_tokens={NO_BUDGET}"]),
        "unpacked": ("Halyard, unpacked, random batches", ["model.batch_size=8", "data.group_by_length=false"]),
        "packed": (f"Halyard, packed ({rows_per_step} rows of {args.max_length} per step)",
                   [f"model.batch_size={rows_per_step}", "data.packing=true"]),
        "fused": ("Halyard default, model.head_loss=fused", ["model.batch_size=8", "model.head_loss=fused"]),
        "autocast-attention": ("Halyard default, model.attention_float32=false (attention in the autocast dtype)",
                               ["model.batch_size=8", "model.attention_float32=false"]),
        "compiled": ("Halyard default, model.compile=true", ["model.batch_size=8", "model.compile=true"]),
        "packed-compiled": ("Halyard packed, model.compile=true",
                            [f"model.batch_size={rows_per_step}", "data.packing=true", "model.compile=true"]),
    }  # fmt: skip
    chosen = set(args.runs) | ({"fused"} if args.fused_head else set())
    chosen |= {"compiled", "packed-compiled"} if args.compile else set()
    runs = {name: run for name, run in runs.items() if name in chosen}
    warmup = None if args.same_examples else args.warmup_steps  # None: the first epoch
    settings = {"model": str(model_dir), "dtype": args.dtype, "lr": 1e-5, "steps": steps,
                "warmup_steps": args.warmup_steps}  # fmt: skip
    if args.same_examples:
        settings |= {"steps": args.steps, "epochs": SAME_EXAMPLES_EPOCHS, "warmup_steps": args.steps}
    jobs: dict[str, Callable[[int], dict]] = {  # run name: the run, given its repeat's number
        name: lambda r, name=name, extra=extra: run_halyard(
            work, name if r == 0 else f"{name}-{r + 1}", [*base, *extra], warmup, "supervised_tokens"
        )
        for name, (_, extra) in runs.items()
    }
    # Padding-free is correct only if each example still attends only to itself: its first loss must equal the
    # padded run's on the same batch (the padded run is the check even where it is not in the table: one step).
    free_runs = [(mode, name, extra) for mode, name, extra in TRL_FREE_RUNS if name in chosen]
    if "trl-padded" in chosen:
        jobs["trl-padded"] = lambda r: run_child("trl-sft", work, settings)
    elif free_runs:
        check = run_child("trl-sft", work, settings | {"steps": 1, "warmup_steps": 0, "epochs": 1})
    for mode, name, _ in free_runs:
        kept = name.endswith("-kept")
        jobs[name] = lambda r, mode=mode, kept=kept: run_child(mode, work, settings | {"keep_freed_host_memory": kept})
    bare_runs = [name for name in ("default", "packed") if f"bare-{name}" in chosen and name in runs]
    for name in bare_runs:  # on the passes of the run's first repeat (the same in every repeat)
        overrides = [*base, *runs[name][1]]
        jobs[f"bare-{name}"] = lambda r, n=name, o=overrides: bare_loop_on(work, n, o, every[n][0], settings)
    every: dict[str, list[dict]] = {name: [] for name in jobs}
    for r in range(args.repeats):  # in turn, so that a change in the machine's load falls on every run
        for name, job in jobs.items():
            every[name].append(job(r))
    median = {name: median_repeat(repeats) for name, repeats in every.items()}
    results = {label: median[name] for name, (label, _) in runs.items()}
    if "trl-padded" in chosen:
        results["TRL 1.16 SFTTrainer, padded"] = check = median["trl-padded"]
    trl_rates = [check["rate"]] if "trl-padded" in chosen else []
    for _, name, extra in free_runs:
        free = median[name]
        free_ok = abs(free["losses"][0] - check["losses"][0]) <= 1e-3 * abs(check["losses"][0])
        label = "correct" if free_ok else "WRONG: examples attend to each other"
        results[f"TRL 1.16 SFTTrainer, padding_free{extra} ({label}: step-1 loss {free['losses'][0]:.4f} vs "
                f"padded {check['losses'][0]:.4f})"] = free  # fmt: skip
        # TRL's best among its own configurations: Halyard's allocator setting applied to its process is not one
        trl_rates += [free["rate"]] if free_ok and not name.endswith("-kept") else []
    for name in bare_runs:
        halyard, bare = median[name], median[f"bare-{name}"]
        same = "same" if bare["per_step"] == halyard["per_step"] else "DIFFERENT"
        results[f"bare PyTorch loop on the passes of '{runs[name][0]}', model's own loss ({same} tokens per step)"] = (
            bare
        )
    best_trl = max(trl_rates, default=0.0)  # of the TRL runs in the table, correct ones only
    budget = results[runs["default"][0]]["micro_batch_tokens"] if "default" in runs else "(not run)"
    lines = [
        f"Model: {model_text}, {args.dtype}. Data: {len(examples)} synthetic multi-turn chat examples, "
        f"{min(lengths)}-{max(lengths)} tokens (median {statistics.median(lengths):.0f}, mean "
        f"{statistics.mean(lengths):.0f}); 8 examples per step (packed: {rows_per_step} rows of {args.max_length}, "
        f"efficiency {efficiency:.0%}); AdamW lr 1e-5, no clipping, no gradient checkpointing; "
        f"{timing(args)}; rate = their tokens / their seconds{repeats_text(args.repeats)}; "
        f"the default's token budget: {budget} tokens per pass.",
        "",
        "| run | supervised tokens/s | vs best TRL | median step (s) | supervised tokens per step | peak RSS (MB) | "
        "page faults (M) |",
        "|---|---|---|---|---|---|---|",
        *(
            f"| {name} | {rate_text(r)} | {vs_trl(r['rate'], best_trl)} | {r['step_seconds']:.2f} | "
            f"{r['units_per_step']:,.0f} | {r['peak_mb']:,.0f} | {r['page_faults'] / 1e6:.2f} |"
            for name, r in results.items()
        ),
        "",
        "Page faults: minor faults of the run's processes, start-up and warm-up included (each a page the kernel "
        "mapped and zeroed on first touch).",
    ]
    mfus = {name: r["mfu"] for name, r in results.items() if "mfu" in r}
    lines += [
        "",
        "Halyard's logged MFU (median over timed steps): " + ", ".join(f"{n}: {m:.3f}" for n, m in mfus.items()),
    ]
    return "\n".join(lines)


def median_repeat(repeats: list[dict]) -> dict:
    """The repeat of a run with the median rate (the lower of the middle two), with every repeat's rate."""
    ranked = sorted(repeats, key=lambda result: result["rate"])
    return ranked[(len(ranked) - 1) // 2] | {"rates": [result["rate"] for result in repeats]}


def rate_text(result: dict) -> str:
    """A run's rate, with the range of its repeats where it ran more than once."""
    rates = result["rates"]
    return f"{result['rate']:,.0f}" + (f" ({min(rates):,.0f}-{max(rates):,.0f})" if len(rates) > 1 else "")


def repeats_text(repeats: int) -> str:
    if repeats == 1:
        return ""
    return (f"; each run {repeats} times, the runs in turn, the repeat with the median rate shown (the range of the "
            "rates in brackets)")  # fmt: skip


def vs_trl(rate: float, best_trl: float) -> str:
    """A run's rate as a multiple of TRL's best; "-" where no TRL run is in the table."""
    return f"{rate / best_trl:.2f}x" if best_trl else "-"


def timing(args) -> str:
    """Which steps of a run its rate counts."""
    if args.same_examples:
        return (f"each run {SAME_EXAMPLES_EPOCHS} epochs of these examples, the first its warm-up, so every run's "
                "timed steps hold the same examples")  # fmt: skip
    return f"{args.warmup_steps} warm-up + {args.steps} timed steps per run"


def bare_loop_on(work: Path, name: str, overrides: list[str], halyard: dict, settings: dict) -> dict:
    """The bare loop (child.py) over the exact forward passes of Halyard's run `name` (replay.py): its steps, its
    warm-up."""
    settings = settings | {"steps": len(halyard["per_step"]), "warmup_steps": halyard["warmup_steps"], "epochs": 1}
    path = work / f"{name}.passes.safetensors"
    if not path.exists():  # the same run's passes again: its plan is a pure function of its config and data
        save_passes(halyard_passes(halyard_overrides(work, name, overrides), settings["steps"]), path)
    # the process setting Halyard's run had (keep_freed_host_memory, its default): the loops differ only in the loop
    return run_child("bare", work, {**settings, "passes": f"{name}.passes.safetensors", "keep_freed_host_memory": True})
