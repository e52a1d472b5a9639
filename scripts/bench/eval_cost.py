"""eval-cost: what a benchmark evaluation during training costs, in seconds per 100 questions and in training
steps of the demo timed in the same process."""

from __future__ import annotations

import os
import statistics
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from train.loop.benchmarks import HARNESS_VERSION, BenchmarkSettings, evaluate_tasks

from .cpu import middling_chat_batch, training_step_seconds
from .runs import REPO


def bench_eval_cost(args) -> str:
    """Seconds per 100 questions of the demo benchmark task on SmolLM2-135M (float32, as the live model is evaluated
    during training), with and without the chat template, at each batch size; and the same cost in training steps
    of the demo (a float32 and a bfloat16-autocast forward + backward on 8 chat examples, timed in the same process
    between the evaluations), a ratio that holds on a busy machine where the seconds do not."""
    tokenizer = AutoTokenizer.from_pretrained(args.smollm2)
    model = AutoModelForCausalLM.from_pretrained(args.smollm2, dtype=torch.float32, attn_implementation="sdpa")
    batch = middling_chat_batch(tokenizer, "halyard-bench-eval-")
    step_times: dict[bool, list[float]] = {False: [], True: []}

    def time_training_steps() -> None:
        model.train()
        for bf16 in (False, True):
            step_times[bf16].append(training_step_seconds(model, batch, bf16))

    def settings(batch_size: int, chat: bool, limit: int | None = None) -> BenchmarkSettings:
        return BenchmarkSettings(
            tasks=("pirate_style",), include_path=str(REPO / "data" / "demo" / "benchmark"), num_fewshot=None,
            limit=limit, batch_size=batch_size, seed=0, apply_chat_template=chat,
        )  # fmt: skip

    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    evaluate_tasks(model, tokenizer, settings(8, False, limit=2))  # indexes and loads the task; not counted
    first = time.perf_counter() - started
    time_training_steps()  # warm-up, not counted
    for times in step_times.values():
        times.clear()
    measured = []
    for chat in (False, True):
        for batch_size in args.batch_sizes:
            times = []
            for _ in range(args.repeats):
                time_training_steps()
                started = time.perf_counter()
                results = evaluate_tasks(model, tokenizer, settings(batch_size, chat))
                times.append(time.perf_counter() - started)
            measured.append((chat, batch_size, results.samples["pirate_style"], statistics.median(times)))
    time_training_steps()
    step = {bf16: statistics.median(times) for bf16, times in step_times.items()}
    lines = [
        f"lm-eval {HARNESS_VERSION}, task pirate_style (data/demo/benchmark: questions of two choices), SmolLM2-135M "
        f"float32, {torch.get_num_threads()} threads, median of {args.repeats} timed run(s); the first evaluation "
        f"(task index and data loading, 2 questions) took {first:.1f} s. Load average {load_before:.1f} before, "
        f"{os.getloadavg()[0]:.1f} after. A training step of the demo (8 chat examples, forward + backward): "
        f"{step[False]:.2f} s in float32, {step[True]:.2f} s in bfloat16 autocast (medians, timed between the "
        f"evaluations).",
        "",
        "| prompts | batch size | questions | seconds | s per 100 questions | in float32 steps | in bf16 steps |",
        "|---|---|---|---|---|---|---|",
    ]
    for chat, batch_size, questions, seconds in measured:
        per_100 = 100 * seconds / questions
        lines.append(
            f"| {'chat template' if chat else 'plain'} | {batch_size} | {questions} | {seconds:.1f} | {per_100:.1f} | "
            f"{per_100 / step[False]:.1f} | {per_100 / step[True]:.1f} |"
        )
    return "\n".join(lines)
