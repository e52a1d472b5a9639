"""Benchmarks. Results go to docs/BENCHMARKS.md with the command that produced them.

    python scripts/benchmark.py preprocess [--rows 20000] [--repeats 3] [--tokenizer DIR]
    python scripts/benchmark.py sft [--model smollm2|qwen-shape] [--dtype float32|bfloat16] [--steps 6]
                                    [--fused-head] [--compile] [--runs default packed trl-pf ...]
    python scripts/benchmark.py dpo [--model smollm2|qwen-shape] [--pairs 4] [--steps 5]
    python scripts/benchmark.py shared-prompt [--pairs 32] [--batch 4] [--long-prompts]
    python scripts/benchmark.py cpu-options [--repeats 3] [--compile]
    python scripts/benchmark.py reference-memory [--steps 6]
    python scripts/benchmark.py scale [--rows 10000 100000 1000000] [--work DIR]
    python scripts/benchmark.py eval-cost [--batch-sizes 8 32] [--repeats 1]
    python scripts/benchmark.py qlora [--dtype float32|bfloat16] [--steps 6]
    python scripts/benchmark.py profile [--loss sft|dpo] [--dtype float32|bfloat16] [--steps 4]
    python scripts/benchmark.py compile [--dtypes float32 bfloat16] [--layouts grouped packed] [--steps 12]

This file is the command line; each benchmark is a module of scripts/bench/ (the table RUNNERS names it).

sft: supervised fine-tuning, each run its own process, one after the other: Halyard's default (grouped by length,
passes within the token budget model.micro_batch_tokens), grouped without the budget, unpacked with random batches
and packed (rows sized to the same tokens per step), TRL 1.16's SFTTrainer padded and padding-free (its padding-free
step-1 loss is compared with the padded one on the same batch: equal means the examples stayed apart), and a bare
PyTorch loop over the exact forward passes of Halyard's default and packed runs (rebuilt by scripts/bench/replay.py
with Halyard's own plan and collation; the table says whether its tokens per step equal the run's) with the model's
own loss, its process with Halyard's default keep_freed_host_memory as a run's has it. --compile adds Halyard's
default and packed runs with model.compile=true (the first step, its compilation, falls in the warm-up); --runs picks
a subset, among them the default with keep_freed_host_memory=false (returned: what the kept heap is worth), TRL
padding-free with the Trainer's torch_compile=True (trl-pf-compiled: not by default, it recompiles the whole model at
new shapes), TRL padding-free with Halyard's keep_freed_host_memory applied to its process (trl-pf-kept: how much
of a gap is the allocator; not counted as TRL's best, which is among its own configurations) and the default with
model.attention_float32=false (autocast-attention: what attention in float32 is worth); TRL padded still runs
one step where a padding-free run needs it (the correctness check). The model is SmolLM2-135M's real weights, or
Qwen2.5-0.5B's layer shape at reduced depth; the data synthetic multi-turn chat with skewed lengths; the same tokens
and labels for every run. Rates: the timed steps' supervised tokens over their seconds (steps differ in size, grouped
by length most); the median step time is shown beside them, and each run's minor page faults.

dpo: DPO pairs/s and peak RSS, Halyard padded and packed, each with a live and a precomputed reference, against TRL's
DPOTrainer (padded, with and without precompute_ref_log_probs), on the same tokenized pairs (TRL is handed Halyard's
token ids) and the same pairs per step.

shared-prompt: a pair's prompt run once (one row `prompt, chosen, rejected`, a 4D mask keeping rejected from chosen)
vs twice (two rows), same log-probs (checked), policy forward + backward time.

cpu-options: threads, bfloat16 autocast (with attention in float32 too) and torch.compile on one SmolLM2 training
step; each of its matmul shapes, and one layer's attention, in float32 against bfloat16.

scale: the data path at 10k, 100k and 1M synthetic multi-turn rows (lognormal lengths, ~300 tokens on average) on the
tiny 2-layer model: seconds from the command to the end of step 1 (`max_steps=1`) and peak memory of all its
processes, for the first (uncached, data.num_proc=2) run and cached runs with and without packing, on 1 and 2
processes; and the packing plan's time over all examples.

eval-cost: what a benchmark evaluation costs (benchmarks.*, scripts/evaluate.py): the demo task (data/demo/benchmark,
two choices per question) on SmolLM2-135M's live float32 model, through train/loop/benchmarks.py as training runs it,
in seconds per 100 questions, with and without the chat template, at each batch size, and in training steps of the
demo timed in the same process (the ratio to choose benchmarks.every_steps by, also on a busy machine).

qlora: LoRA over a 16-bit base vs QLoRA (4-bit NF4 base, double quantization) on SmolLM2-135M's real weights
through the CLI, batch 8: median step seconds after the warm-up, peak RSS, the first losses.

profile: where the time of a step of Halyard's default goes (profile_steps: data wait, to_device, forward, reference,
loss, backward, reduce, clip, optimizer, log), beside the bare loop's forward, backward and optimizer on the same
passes (SFT), both under torch.profiler; for DPO, Halyard's phases alone.

compile: model.compile (each decoder layer compiled) vs eager on SmolLM2-135M's real weights, float32 and bfloat16
autocast, grouped padded batches (a new length every step) and packed rows: the same batches in turn in one process;
first-step seconds (the compilation), graphs compiled and at which steps, median steady step seconds, speed-up.

preprocess: tokenization throughput (rows/s) of the data pipeline on a synthetic multi-turn chat set, uncached with
1 and 2 processes (data.num_proc) and cached (a second run with the same inputs), medians over repeats, measured
side by side in one invocation.
"""

from __future__ import annotations

import argparse
import importlib
import os
import platform
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# Each subcommand's module in scripts/bench/ and its function (args -> the Markdown table). A module is imported only
# when its subcommand runs: torch, transformers and lm-eval take seconds to import, and --help needs none of them.
RUNNERS = {
    "preprocess": ("preprocess", "bench_preprocess"),
    "reference-memory": ("reference_memory", "bench_reference_memory"),
    "sft": ("sft", "bench_sft"),
    "dpo": ("dpo", "bench_dpo"),
    "shared-prompt": ("shared_prompt", "bench_shared_prompt"),
    "cpu-options": ("cpu", "bench_cpu_options"),
    "scale": ("scale", "bench_scale"),
    "eval-cost": ("eval_cost", "bench_eval_cost"),
    "qlora": ("qlora", "bench_qlora"),
    "profile": ("step_profile", "bench_profile"),
    "compile": ("compile", "bench_compile"),
}
# The sft benchmark's runs (scripts/bench/sft.py): Halyard's, TRL's, and the bare loop on Halyard's default's and
# packed's passes.
SFT_RUNS = ("default", "returned", "grouped", "unpacked", "packed", "fused", "autocast-attention", "compiled",
            "packed-compiled", "trl-padded", "trl-pf", "trl-pf-compiled", "trl-pf-kept", "bare-default",
            "bare-packed")  # fmt: skip
SFT_OPTIONAL_RUNS = ("fused", "autocast-attention", "compiled", "packed-compiled", "trl-pf-compiled", "returned")
SFT_DEFAULT_RUNS = [run for run in SFT_RUNS if run not in SFT_OPTIONAL_RUNS]


def use_repository_root() -> None:
    """The repository root first on the path, in place of scripts/: run as a script, Python puts scripts/ there, where
    scripts/evaluate.py would shadow the `evaluate` package (transformers probes it, lm-eval's tasks import it).
    train and the benchmarks (scripts.bench) are imported from the root."""
    scripts = REPO / "scripts"
    sys.path[:] = [str(REPO), *(p for p in sys.path if Path(p or os.curdir).resolve() != scripts)]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    pre = sub.add_parser("preprocess")
    pre.add_argument("--rows", type=int, default=20000)
    pre.add_argument("--repeats", type=int, default=3)
    default_tokenizer = Path.home() / ".cache" / "halyard" / "models" / "SmolLM2-135M-Instruct"
    pre.add_argument("--tokenizer", default=str(default_tokenizer), help="tokenizer folder (default: SmolLM2's)")
    memory = sub.add_parser("reference-memory")
    memory.add_argument("--steps", type=int, default=6)
    for name, steps in (("sft", 6), ("dpo", 5)):
        bench = sub.add_parser(name)
        bench.add_argument("--steps", type=int, default=steps, help="timed steps per run")
        bench.add_argument("--warmup-steps", type=int, default=2)
        bench.add_argument("--model", choices=["smollm2", "qwen-shape"], default="smollm2")
        bench.add_argument("--smollm2", default=str(default_tokenizer), help="SmolLM2-135M-Instruct's folder")
        bench.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
        bench.add_argument("--max-length", type=int, default=512)
        if name == "sft":
            bench.add_argument("--runs", nargs="+", choices=SFT_RUNS, default=SFT_DEFAULT_RUNS,
                               help="the runs to compare (default: all but fused and the compiled ones)")  # fmt: skip
            bench.add_argument("--fused-head", action="store_true", help="also the default with model.head_loss=fused")
            bench.add_argument("--compile", action="store_true",
                               help="also the default and packed with model.compile=true")  # fmt: skip
            bench.add_argument("--repeats", type=int, default=1,
                               help="run each run this many times, the runs in turn; the median rate is shown")  # fmt: skip
            bench.add_argument("--same-examples", action="store_true",
                               help="every run times the same examples: --steps x 8 of them, two epochs per run, the "
                                    "first its warm-up (--warmup-steps unused)")  # fmt: skip
        if name == "dpo":
            bench.add_argument("--pairs", type=int, default=4, help="pairs per optimizer step")
    shared = sub.add_parser("shared-prompt")
    shared.add_argument("--pairs", type=int, default=32)
    shared.add_argument("--batch", type=int, default=4)
    shared.add_argument("--repeats", type=int, default=6)
    shared.add_argument("--long-prompts", action="store_true", help="the pairs with the longest prompts")
    shared.add_argument("--smollm2", default=str(default_tokenizer))
    cpu = sub.add_parser("cpu-options")
    cpu.add_argument("--repeats", type=int, default=3)
    cpu.add_argument("--compile", action="store_true", help="also torch.compile (minutes of compilation on a CPU)")
    cpu.add_argument("--smollm2", default=str(default_tokenizer))
    scale = sub.add_parser("scale")
    scale.add_argument("--rows", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    scale.add_argument("--mean-words", type=float, default=92.0, help="words per row (~300 tiny-model tokens)")
    scale.add_argument("--work", help="folder for data and caches (kept; default: a new temporary folder)")
    qlora = sub.add_parser("qlora")
    qlora.add_argument("--steps", type=int, default=6, help="timed steps per run")
    qlora.add_argument("--warmup-steps", type=int, default=2)
    qlora.add_argument("--dtype", choices=["float32", "bfloat16"], default="bfloat16")
    profile = sub.add_parser("profile")
    profile.add_argument("--loss", choices=["sft", "dpo"], default="sft")
    profile.add_argument("--steps", type=int, default=4, help="profiled steps, after an unprofiled first step")
    profile.add_argument("--pairs", type=int, default=4, help="DPO: pairs per optimizer step")
    profile.add_argument("--model", choices=["smollm2", "qwen-shape"], default="smollm2")
    profile.add_argument("--smollm2", default=str(default_tokenizer), help="SmolLM2-135M-Instruct's folder")
    profile.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    profile.add_argument("--max-length", type=int, default=512)
    comp = sub.add_parser("compile")
    comp.add_argument("--model-dir", default=str(default_tokenizer), help="model folder (default: SmolLM2-135M's)")
    comp.add_argument("--dtypes", nargs="+", choices=["float32", "bfloat16"], default=["float32", "bfloat16"])
    comp.add_argument("--layouts", nargs="+", choices=["grouped", "packed"], default=["grouped", "packed"])
    comp.add_argument("--steps", type=int, default=12, help="steps per setting, each on a new batch")
    comp.add_argument("--warmup-steps", type=int, default=3, help="first steps left out of the medians")
    comp.add_argument("--rows", type=int, default=512, help="synthetic chat rows the batches are drawn from")
    comp.add_argument("--batch-size", type=int, default=8, help="grouped: examples per batch")
    comp.add_argument("--packed-rows", type=int, default=2, help="packed: rows per batch")
    comp.add_argument("--max-length", type=int, default=512)
    cost = sub.add_parser("eval-cost")
    cost.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 32])
    cost.add_argument("--repeats", type=int, default=1)
    cost.add_argument("--smollm2", default=str(default_tokenizer))
    return parser


def main() -> None:
    use_repository_root()
    args = build_parser().parse_args()
    module, function = RUNNERS[args.what]
    table = getattr(importlib.import_module(f"scripts.bench.{module}"), function)(args)
    command = "python scripts/benchmark.py " + " ".join(sys.argv[1:])
    print(f"`{command}` on {platform.processor() or platform.machine()}\n")
    print(table)


if __name__ == "__main__":
    main()
