"""The memory plan of a run (train/app/memory_plan.py), before anything loads; and, with --measure, the peak of real
training steps beside it.

    python scripts/memory_plan.py loss=sft model=smollm2 method=lora          # the plan, the device, what would fit
    python scripts/memory_plan.py --measure loss=sft model=smollm2 method=lora model.batch_size=4
    python scripts/memory_plan.py --table                                     # docs/BENCHMARKS.md's cases

Takes the same overrides as launch.py (datasets default to the demo data: the plan does not read them).

--measure loads the model as a run does (train/app/models.py build_model; a QLoRA base through transformers'
bitsandbytes), and runs `--steps` training steps of SFT on full rows (micro-batch x model.max_length tokens,
every position supervised: the plan's assumption) through the trainer's own forward and loss
(train/loop/trainer.py forward_supervised, train/objectives/losses.py selected_nll_sum) and the run's optimizer. The
peak is measured from just before the model loads: on a GPU torch's allocator peak (every tensor, nothing else); on
CPU the resident set's high-water mark (VmHWM, reset after loading so that the loader's transient copies do not
count) minus the resident set before loading (the interpreter and libraries). --table runs each case in its own
process, so that no case inherits another's memory.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

DEMO_DATA = str(REPO / "data" / "demo" / "train.jsonl")
SMOLLM2 = "model=smollm2"
TABLE_CASES = [  # (name, overrides): docs/BENCHMARKS.md's table
    ("tiny, full, float32", ["model=tiny", "model.batch_size=8", "model.max_length=128"]),
    ("tiny, full, float32, long rows", ["model=tiny", "model.batch_size=32", "model.max_length=512"]),
    ("SmolLM2-135M, full, float32", [SMOLLM2, "model.dtype=float32", "model.batch_size=4", "model.max_length=256"]),
    ("SmolLM2-135M, full, bfloat16", [SMOLLM2, "model.dtype=bfloat16", "model.batch_size=4", "model.max_length=256"]),
    ("SmolLM2-135M, full, bfloat16, checkpointing", [SMOLLM2, "model.dtype=bfloat16", "model.batch_size=4",
     "model.max_length=256", "model.gradient_checkpointing=true"]),
    ("SmolLM2-135M, LoRA, float32", [SMOLLM2, "method=lora", "model.dtype=float32", "model.batch_size=4",
     "model.max_length=256"]),
    ("SmolLM2-135M, LoRA, bfloat16", [SMOLLM2, "method=lora", "model.dtype=bfloat16", "model.batch_size=4",
     "model.max_length=256"]),
    ("SmolLM2-135M, QLoRA nf4, bfloat16", [SMOLLM2, "method=qlora", "model.dtype=bfloat16", "model.batch_size=4",
     "model.max_length=256"]),
]  # fmt: skip


def compose(overrides: list[str]):
    """The validated config and its loss of these overrides, as launch.py composes them."""
    import launch
    from train.app.loss_registry import loss_spec

    if not any(o.split("=", 1)[0].lstrip("+") == "datasets" for o in overrides):
        overrides = [*overrides, f"datasets=[{DEMO_DATA}]"]
    cfg = launch.compose_config(["memory_check=warn", *overrides], check_model_files=True)
    return cfg, loss_spec(cfg)


def show_plan(overrides: list[str]) -> dict:
    """Print the plan, the device and the advice; return the plan's numbers."""
    from train.app.memory_plan import plan_for_run, report

    cfg, spec = compose(overrides)
    planned = plan_for_run(cfg, spec)
    print(report(planned))
    return {"estimate_bytes": planned.plan.total, "moment": planned.plan.moment}


def rss_bytes(field: str) -> int:
    """VmRSS or VmHWM of this process, in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def measure(overrides: list[str], steps: int, return_freed_memory: bool = True) -> dict:
    """Peak bytes of `steps` real training steps, above the process before the model loaded (see the docstring)."""
    import torch
    from accelerate import Accelerator

    from train.loop.optim import build_optimizer
    from train.loop.trainer import forward_supervised
    from train.objectives.losses import selected_nll_sum

    cfg, spec = compose(overrides)
    from train.app.memory_plan import plan_for_run

    planned = plan_for_run(cfg, spec)
    cuda = torch.cuda.is_available()
    if not cuda and return_freed_memory:
        release_freed_memory()
    baseline = torch.cuda.memory_allocated() if cuda else rss_bytes("VmRSS")
    model = load_model(cfg)
    accelerator = Accelerator(mixed_precision="bf16" if cfg.model.dtype == "bfloat16" else "no", cpu=not cuda)
    optimizer = build_optimizer(model, lr=1e-5, weight_decay=0.0, name=cfg.optimizer.name)
    model, optimizer = accelerator.prepare(model, optimizer)
    rows, length = planned.settings.rows_per_micro_batch, planned.settings.tokens_per_row
    generator = torch.Generator().manual_seed(0)
    vocab = accelerator.unwrap_model(model).config.vocab_size
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    else:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM: the loader's transient copies do not count
    model.train()
    seconds = time.perf_counter()
    for _ in range(steps):
        ids = torch.randint(0, vocab, (rows, length), generator=generator).to(accelerator.device)
        batch = {"input_ids": ids, "labels": ids, "attention_mask": torch.ones_like(ids)}
        logits, keep = forward_supervised(model, batch)
        loss = selected_nll_sum(logits, batch["labels"], keep)
        del logits
        accelerator.backward(loss.total / loss.count)
        accelerator.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    peak = torch.cuda.max_memory_allocated() if cuda else rss_bytes("VmHWM")
    measured = peak - baseline
    return {
        "estimate_bytes": planned.plan.total,
        "measured_bytes": measured,
        "error": planned.plan.total / measured - 1,
        "how": "cuda max_memory_allocated" if cuda else _rss_kind(return_freed_memory),
        "moment": planned.plan.moment,
        "breakdown": planned.plan.breakdown(),
        "seconds_per_step": (time.perf_counter() - seconds) / steps,
        "rows": rows,
        "tokens_per_row": length,
    }


def release_freed_memory() -> None:
    """Make glibc give freed memory back to the system at once (mallopt: no trim threshold, blocks of 64 KiB and
    more mapped on their own), so that the resident set follows the live tensors. By default glibc keeps freed
    blocks of up to 32 MiB in its heap for reuse: the resident set then also holds the step's freed temporaries
    (0.3-0.6 GB above the live tensors for SmolLM2 at 1,024 tokens), which depends on the allocator, not on what
    the run needs."""
    import ctypes

    libc = ctypes.CDLL("libc.so.6")
    m_trim_threshold, m_mmap_threshold = -1, -3  # malloc.h
    libc.mallopt(m_trim_threshold, 0)
    libc.mallopt(m_mmap_threshold, 64 * 1024)


def _rss_kind(return_freed_memory: bool) -> str:
    allocator = "glibc returning freed memory" if return_freed_memory else "glibc's defaults"
    return f"CPU VmHWM over VmRSS before loading, {allocator}"


def load_model(cfg):
    """The model as the run builds it (a QLoRA base quantized by bitsandbytes included)."""
    from train.app.models import build_model

    return build_model(cfg.model, cfg.seed)


def table(steps: int, glibc_defaults: bool) -> None:
    """Each case's estimate and measured peak, each measurement in its own process; a Markdown table on stdout.
    With `glibc_defaults`, also the resident set's peak with glibc keeping freed memory (each case runs twice)."""
    print("| case | micro-batch | estimate | measured | error | RSS, glibc defaults | peak at |")
    print("|---|---|---|---|---|---|---|")
    for name, overrides in TABLE_CASES:
        trimmed = _measure_in_process(overrides, steps, [])
        default = _measure_in_process(overrides, steps, ["--glibc-defaults"]) if glibc_defaults else None
        if isinstance(trimmed, str) or isinstance(default, str):
            print(f"| {name} | failed: {trimmed if isinstance(trimmed, str) else default} ||||||")
            continue
        plain = f"{default['measured_bytes'] / 1e9:.2f} GB ({default['error']:+.0%})" if default else "-"
        print(
            f"| {name} | {trimmed['rows']} x {trimmed['tokens_per_row']} | {trimmed['estimate_bytes'] / 1e9:.2f} GB | "
            f"{trimmed['measured_bytes'] / 1e9:.2f} GB | {trimmed['error']:+.0%} | {plain} | {trimmed['moment']} |",
            flush=True,
        )


def _measure_in_process(overrides: list[str], steps: int, flags: list[str]) -> dict | str:
    """--measure in a fresh process: its result, or the last line of its error."""
    command = [sys.executable, __file__, "--measure", "--json", "--steps", str(steps), *flags, *overrides]
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    if done.returncode:
        return (done.stderr.strip().splitlines() or ["no output"])[-1]
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--measure", action="store_true", help="also run real training steps and measure the peak")
    parser.add_argument("--table", action="store_true", help="measure docs/BENCHMARKS.md's cases")
    parser.add_argument("--steps", type=int, default=3, help="training steps measured (--measure, --table)")
    parser.add_argument("--json", action="store_true", help="print the result as one JSON line")
    parser.add_argument(
        "--glibc-defaults",
        action="store_true",
        help="on CPU, measure with glibc keeping freed memory (its default); with --table, as well",
    )
    args, overrides = parser.parse_known_args(argv)
    from train.errors import HalyardError
    from train.loop.progress import silence_kernel_notices

    silence_kernel_notices()
    try:
        if args.table:
            table(args.steps, args.glibc_defaults)
            return 0
        if args.measure:
            result = measure(overrides, args.steps, return_freed_memory=not args.glibc_defaults)
        else:
            result = show_plan(overrides)
    except HalyardError as error:
        print(f"memory_plan: {error}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result))
    elif args.measure:
        print(
            f"estimate {result['estimate_bytes'] / 1e9:.3f} GB, measured {result['measured_bytes'] / 1e9:.3f} GB "
            f"({result['how']}): error {result['error']:+.1%}; {result['breakdown']}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
