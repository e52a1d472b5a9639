"""qlora: LoRA over a 16-bit base against QLoRA (a 4-bit base) on SmolLM2-135M, through the CLI."""

from __future__ import annotations

import tempfile
from pathlib import Path

from .runs import run_halyard


def bench_qlora(args) -> str:
    """LoRA over a 16-bit base vs QLoRA (4-bit NF4 base) on SmolLM2-135M's real weights through the CLI: median step
    seconds after the warm-up, peak RSS of the training process, the base's weights as loaded, the first losses."""
    work = Path(tempfile.mkdtemp(prefix="halyard-bench-"))
    common = ["loss=sft", "model=smollm2", "datasets=[data/demo/train.jsonl]", f"model.dtype={args.dtype}",
              f"max_steps={args.steps + args.warmup_steps}", "model.batch_size=8"]  # fmt: skip
    runs = (("LoRA (base in model.dtype)", "lora", ["method=lora"]),
            ("QLoRA nf4, double quantization", "qlora", ["method=qlora"]))  # fmt: skip
    lines = [f"| SFT, SmolLM2-135M, {args.dtype}, batch 8 | seconds per step (median) | peak RSS (MB) | first losses |",
             "|---|---|---|---|"]  # fmt: skip
    for label, name, extra in runs:
        result = run_halyard(work, name, [*common, *extra], args.warmup_steps, "supervised_tokens")
        losses = ", ".join(f"{loss:.4f}" for loss in result["losses"])
        lines.append(f"| {label} | {result['step_seconds']:.2f} | {result['peak_mb']:,.0f} | {losses} |")
    return "\n".join(lines)
