"""profile: where a training step's time goes. Halyard's default through the CLI with `profile_steps` (its phases,
train/loop/profile.py) against the bare loop over the same forward passes (replay.py; forward with the model's own
loss, backward, optimizer), both under torch.profiler, each in its own process; for DPO, Halyard's default alone (the
reference model's forward is a phase of its own)."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from transformers import AutoTokenizer

from train.loop.profile import PHASES

from .data import synthetic_chat_rows, synthetic_pair_rows
from .models import model_for
from .runs import run_halyard
from .sft import bare_loop_on

BARE_PHASES = {"forward": ("forward", "loss"), "backward": ("backward",), "optimizer": ("optimizer",)}  # -> Halyard's


def bench_profile(args) -> str:
    """The phase table of Halyard's default step (SFT: beside the bare loop's on the same passes)."""
    work = Path(tempfile.mkdtemp(prefix="halyard-bench-profile-"))
    tokenizer = AutoTokenizer.from_pretrained(args.smollm2)
    model_dir, model_text = model_for(args, work, tokenizer)
    steps = args.steps + 1  # step 1, with its one-time costs, is not profiled
    data = work / "data.jsonl"
    rows = synthetic_chat_rows(steps * 8 * 4, seed=1) if args.loss == "sft" else synthetic_pair_rows(steps * 16, seed=2)
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    batch_size = 8 if args.loss == "sft" else args.pairs
    overrides = [f"loss={args.loss}", "model=smollm2", f"++model.name_or_path={model_dir}", f"datasets=[{data}]",
                 f"model.dtype={args.dtype}", f"model.max_length={args.max_length}", f"max_steps={steps}",
                 f"model.batch_size={batch_size}", f"profile_steps={args.steps}"]  # fmt: skip
    unit = "supervised_tokens" if args.loss == "sft" else "pairs"
    halyard = run_halyard(work, "profiled", overrides, 1, unit)
    profile = halyard["profile"]
    bare = None
    if args.loss == "sft":
        settings = {"model": str(model_dir), "dtype": args.dtype, "lr": 1e-5, "phases": True}
        bare = bare_loop_on(work, "profiled", overrides, halyard, settings)
    lines = [
        f"Model: {model_text}, {args.dtype}, loss={args.loss}, {batch_size} {'examples' if args.loss == 'sft' else 'pairs'} per step "
        f"(Halyard's default batching: grouped by length, passes of at most {halyard['micro_batch_tokens']} tokens); "
        f"steps 2-{steps} profiled; medians per step."
        + (
            f" The bare loop runs the same passes (same supervised tokens per step: "
            f"{bare['per_step'] == halyard['per_step']}) with the model's own loss, under torch.profiler too."
            if bare
            else ""
        ),
        "",
        "| phase | Halyard (s) | share of Halyard's step | bare loop (s) |",
        "|---|---|---|---|",
    ]
    for name in (*PHASES, "other"):
        matching = [bare_name for bare_name, ours in BARE_PHASES.items() if name == ours[0]]
        bare_value = f"{sum(bare['phases'][n] for n in matching):.3f}" if bare and matching else ""
        if name == "loss" and bare:
            bare_value = "(in forward)"
        lines.append(f"| {name} | {profile[name]:.3f} | {profile[name] / profile['step']:.1%} | {bare_value} |")
    lines.append(f"| whole step | {profile['step']:.3f} | 100% | {bare['step_seconds']:.3f} |" if bare else
                 f"| whole step | {profile['step']:.3f} | 100% | |")  # fmt: skip
    return "\n".join(lines)
