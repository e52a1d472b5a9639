"""Benchmarks. Results go to docs/BENCHMARKS.md with the command that produced them.

    python scripts/benchmark.py preprocess [--rows 20000] [--repeats 3] [--tokenizer DIR]

    python scripts/benchmark.py reference-memory [--steps 6]
    python scripts/benchmark.py scale [--rows 10000 100000 1000000] [--work DIR]
    python scripts/benchmark.py sft [--steps 12] [--out docs/BENCHMARKS.md]

sft: supervised fine-tuning throughput and peak memory, side by side, each run in its own process: Halyard unpacked,
Halyard packed, TRL's SFTTrainer (the optional `bench` extra) and a bare PyTorch loop over Halyard's packed batches
(the ceiling). Same ~28M-parameter Llama (random init, SmolLM2's 49k vocabulary), same tokenized multi-turn chat data
with skewed lengths, same labels, sequence length, batch of 8 and AdamW. Rates are supervised tokens per second:
the supervised tokens of the examples consumed, divided by steps, over the median step time (after 2 warm-up steps).

scale: the data path at 10k, 100k and 1M synthetic multi-turn rows (lognormal lengths, ~300 tokens on average) on the
tiny 2-layer model: seconds from the command to the end of step 1 (`max_steps=1`) and peak memory of all its
processes, for the first (uncached, data.num_proc=2) run and cached runs with and without packing, on 1 and 2
processes; and the packing plan's time over all examples.

preprocess: tokenization throughput (rows/s) of the data pipeline on a synthetic multi-turn chat set, uncached with
1 and 2 processes (data.num_proc) and cached (a second run with the same inputs), medians over repeats, measured
side by side in one invocation.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import random
import re
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))


SHIP_WORDS = ("the", "a", "ship", "sails", "over", "sea", "wind", "rope", "knot", "deck", "crew", "captain",
              "harbor", "storm", "calm", "north", "south")  # fmt: skip


def synthetic_chat_rows(n_rows: int, seed: int = 0) -> list[dict]:
    """Multi-turn chat rows with skewed lengths (most short, a long tail), like real chat data."""
    rng = random.Random(seed)
    words = list(SHIP_WORDS)

    def sentence() -> str:
        return " ".join(rng.choice(words) for _ in range(int(rng.lognormvariate(2.5, 0.8)) + 1)) + "."

    rows = []
    for _ in range(n_rows):
        messages = []
        for _turn in range(rng.choice([1, 1, 1, 2, 3])):
            messages.append({"role": "user", "content": sentence()})
            messages.append({"role": "assistant", "content": " ".join(sentence() for _ in range(rng.randint(1, 4)))})
        rows.append({"messages": messages})
    return rows


def bench_preprocess(args) -> str:
    import contextlib
    import logging

    from train.config import DataConfig, ModelConfig
    from train.data import preprocess
    from train.models import build_tokenizer

    logging.disable(logging.INFO)
    tokenizer = build_tokenizer(ModelConfig(name_or_path=args.tokenizer))
    work = Path(tempfile.mkdtemp(prefix="halyard-bench-"))
    data = work / "chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in synthetic_chat_rows(args.rows)))
    results: dict[str, list[float]] = {"uncached, num_proc=1": [], "uncached, num_proc=2": [], "cached": []}
    for repeat in range(args.repeats):
        for label, num_proc in (("uncached, num_proc=1", 1), ("uncached, num_proc=2", 2)):
            cache = work / f"cache-{label[-1]}-{repeat}"
            started = time.perf_counter()
            preprocess(
                [str(data)], tokenizer, DataConfig(num_proc=num_proc), 1024, "sft", cache, contextlib.nullcontext
            )
            results[label].append(args.rows / (time.perf_counter() - started))
        started = time.perf_counter()
        preprocess(
            [str(data)],
            tokenizer,
            DataConfig(num_proc=1),
            1024,
            "sft",
            work / f"cache-1-{repeat}",
            contextlib.nullcontext,
        )
        results["cached"].append(args.rows / (time.perf_counter() - started))
    base = statistics.median(results["uncached, num_proc=1"])
    lines = [
        "| preprocessing | rows/s (median) | vs uncached num_proc=1 |",
        "|---|---|---|",
        *(
            f"| {label} | {statistics.median(v):,.0f} | {statistics.median(v) / base:.2f}x |"
            for label, v in results.items()
        ),
    ]
    return "\n".join(lines)


def bench_reference_memory(args) -> str:
    """DPO on SmolLM2-135M: peak memory with a live reference model vs reference log-probs precomputed and cached."""
    import subprocess

    work = Path(tempfile.mkdtemp(prefix="halyard-bench-"))
    base = [sys.executable, str(REPO / "launch.py"), "loss=dpo", "model=smollm2", f"cache_dir={work}",
            "datasets=[data/demo/pref_train.jsonl]", f"max_steps={args.steps}", "log_every_steps=100"]  # fmt: skip
    runs = (("live reference model", ["exp_name=live"]),
            ("precompute (first run: computes and caches)", ["exp_name=pre1", "reference.precompute=true"]),
            ("precompute (cached: no reference model loaded)", ["exp_name=pre2", "reference.precompute=true"]))  # fmt: skip
    lines = ["| DPO, SmolLM2-135M | peak RSS (MB) | seconds per step |", "|---|---|---|"]
    for label, extra in runs:
        subprocess.run(base + extra, check=True, cwd=REPO, capture_output=True)
        summary = json.loads((work / extra[0].split("=")[1] / "summary.json").read_text())
        per_step = summary["train_seconds"] / summary["step"]
        lines.append(f"| {label} | {summary['peak_memory_mb']:,.0f} | {per_step:.2f} |")
    return "\n".join(lines)


SFT_CHILD = r"""
import json, resource, statistics, sys, time
sys.path.insert(0, REPO)
import torch
mode, work, steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
torch.manual_seed(0)
from transformers import AutoModelForCausalLM
examples = [json.loads(l) for l in open(work + "/tokenized.jsonl")]
model = AutoModelForCausalLM.from_pretrained(work + "/model", attn_implementation="sdpa")
model.config.use_cache = False
times = []
if mode == "trl":
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer
    rows = [{"input_ids": e["input_ids"], "completion_mask": [0] + [int(l != -100) for l in e["labels"][1:]]} for e in examples]
    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw): self.t = time.perf_counter()
        def on_step_end(self, args, state, control, **kw): times.append(time.perf_counter() - self.t)
    config = SFTConfig(output_dir=work + "/trl", max_length=512, per_device_train_batch_size=8, num_train_epochs=1,
                       learning_rate=1e-4, lr_scheduler_type="constant", logging_steps=1000, save_strategy="no",
                       report_to=[], completion_only_loss=True, dataset_num_proc=None, use_cpu=True, seed=0)
    trainer = SFTTrainer(model=model, args=config, train_dataset=Dataset.from_list(rows[: steps * 8]), callbacks=[Clock()])
    trainer.train()
    supervised = sum(sum(r["completion_mask"]) for r in rows[: steps * 8])
else:
    from train.data import Example, collate, collate_packed, pack_examples
    from train.losses import selected_nll_sum, supervised_positions
    items = [Example(e["input_ids"], e["labels"]) for e in examples]
    rows = pack_examples(items, 512)[: steps * 8]
    batches = [collate_packed(rows[i : i + 8], 0) for i in range(0, len(rows), 8)]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    for batch in batches:
        started = time.perf_counter()
        loss = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], labels=batch["labels"]).loss
        loss.backward(); optimizer.step(); optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - started)
    supervised = sum((b["labels"][:, 1:] != -100).sum().item() for b in batches)
rate = supervised / len(times) / statistics.median(times[2:])
print(json.dumps({"rate": rate, "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "steps": len(times)}))
"""


def bench_sft(args) -> str:
    """Halyard (unpacked, packed), TRL and a bare loop, each in its own process, on the same model and data."""
    import subprocess

    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from train.config import DataConfig
    from train.data import load_examples

    work = Path(tempfile.mkdtemp(prefix="halyard-bench-sft-"))
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         tie_word_embeddings=False, eos_token_id=tokenizer.eos_token_id, use_cache=False)  # fmt: skip
    torch_model = LlamaForCausalLM(config)
    n_params = sum(p.numel() for p in torch_model.parameters())
    torch_model.save_pretrained(work / "model")
    tokenizer.save_pretrained(work / "model")
    data = work / "chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in synthetic_chat_rows(args.steps * 8 * 3, seed=1)))
    examples, _ = load_examples([str(data)], tokenizer, DataConfig(), max_length=512)
    (work / "tokenized.jsonl").write_text(
        "".join(json.dumps({"input_ids": e.input_ids, "labels": e.labels}) + "\n" for e in examples)
    )
    lengths = [len(e.input_ids) for e in examples]

    results = {}
    for name in ("halyard, unpacked", "halyard, packed"):
        packing = "true" if "packed" in name and "un" not in name else "false"
        run_dir = work / name.replace(", ", "_")
        command = [sys.executable, str(REPO / "launch.py"), "model=tiny", f"++model.name_or_path={work / 'model'}",
                   f"cache_dir={work}", f"exp_name={run_dir.name}", f"datasets=[{data}]", "model.max_length=512",
                   "model.batch_size=8", f"max_steps={args.steps}", "n_epochs=100", "log_every_steps=1", "lr=1e-4", "warmup_ratio=0",
                   "model.max_grad_norm=null", f"data.packing={packing}"]  # fmt: skip
        subprocess.run(command, check=True, cwd=REPO, capture_output=True)
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        step_seconds = statistics.median(
            b["train_seconds"] - a["train_seconds"] for a, b in itertools.pairwise(rows[2:])
        )
        supervised_per_step = rows[-1]["supervised_tokens"] / len(rows)
        summary = json.loads((run_dir / "summary.json").read_text())
        results[name] = {"rate": supervised_per_step / step_seconds, "peak_mb": summary["peak_memory_mb"]}
    for mode, name in (("trl", "TRL SFTTrainer (dynamic padding)"), ("bare", "bare PyTorch loop, packed batches")):
        child = SFT_CHILD.replace("REPO", repr(str(REPO)))
        output = subprocess.run(
            [sys.executable, "-c", child, mode, str(work), str(args.steps)],
            check=True,
            cwd=REPO,
            capture_output=True,
            text=True,
        )
        results[name] = json.loads(output.stdout.strip().splitlines()[-1])

    trl_rate = results["TRL SFTTrainer (dynamic padding)"]["rate"]
    lines = [
        f"Model: Llama, {n_params / 1e6:.1f}M parameters (hidden 256, 4 layers, vocab {len(tokenizer)}); "
        f"{len(examples)} examples, lengths {min(lengths)}-{max(lengths)} tokens (median {statistics.median(lengths):.0f}); "
        f"batch 8, max_length 512, AdamW, {args.steps} steps per run.",
        "",
        "| run | supervised tokens/s | vs TRL | peak RSS (MB) |",
        "|---|---|---|---|",
        *(
            f"| {name} | {r['rate']:,.0f} | {r['rate'] / trl_rate:.2f}x | {r['peak_mb']:,.0f} |"
            for name, r in results.items()
        ),
    ]
    return "\n".join(lines)


WORDS = np.array(SHIP_WORDS)


def write_scale_rows(path: Path, n_rows: int, mean_words: float, seed: int = 0) -> None:
    """JSONL of multi-turn chat rows whose lengths are lognormal (a long tail), written in blocks (numpy draws the
    words, so a million rows take seconds, not minutes)."""
    rng = np.random.default_rng(seed)
    sigma = 0.7
    with path.open("w") as out:
        for start in range(0, n_rows, 10_000):
            n = min(10_000, n_rows - start)
            totals = np.maximum(rng.lognormal(np.log(mean_words) - sigma**2 / 2, sigma, n).astype(int), 4)
            turns = rng.choice([1, 1, 1, 2, 3], n)
            lines = []
            for total, n_turns in zip(totals.tolist(), turns.tolist(), strict=True):
                total = max(total, 4 * n_turns)  # at least two words per message
                words = WORDS[rng.integers(0, len(WORDS), total)]
                cuts = np.sort(rng.choice(np.arange(1, total), 2 * n_turns - 1, replace=False))
                parts = np.split(words, cuts)
                messages = [
                    {"role": "user" if i % 2 == 0 else "assistant", "content": " ".join(part) + "."}
                    for i, part in enumerate(parts)
                ]
                lines.append(json.dumps({"messages": messages}))
            out.write("\n".join(lines) + "\n")


class TreeMemory:
    """Peak memory of a training command's processes (its training processes and their data loader workers, not
    the `accelerate launch` parent that only waits), sampled every 0.2 s: PSS (shared pages split among the processes
    that map them, so forked workers and a shared page cache are not counted twice) and RSS summed."""

    def __init__(self, process) -> None:
        import threading

        import psutil

        self.root, self.peak_pss, self.peak_rss, self.done = psutil.Process(process.pid), 0, 0, False
        self.thread = threading.Thread(target=self.sample, daemon=True)
        self.thread.start()

    def sample(self) -> None:
        import psutil

        while not self.done:
            pss = rss = 0
            try:
                for p in [self.root, *self.root.children(recursive=True)]:
                    if "accelerate.commands.launch" in " ".join(p.cmdline()):
                        continue  # the launcher only waits for the training processes
                    info = p.memory_full_info()
                    pss, rss = pss + info.pss, rss + info.rss
            except psutil.Error:
                pass  # a process ended while sampled
            self.peak_pss, self.peak_rss = max(self.peak_pss, pss), max(self.peak_rss, rss)
            time.sleep(0.2)

    def stop(self) -> tuple[float, float]:
        self.done = True
        self.thread.join()
        return self.peak_pss / 2**20, self.peak_rss / 2**20


def timed_run(command: list[str]) -> dict:
    """Run a training command to its end; wall seconds, peak memory of its process tree, and its stderr."""
    import subprocess

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "offline"}
    started = time.perf_counter()
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    memory = TreeMemory(process)
    _, stderr = process.communicate()
    seconds = time.perf_counter() - started
    pss, rss = memory.stop()
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{stderr[-3000:]}")
    return {"seconds": seconds, "pss_mb": pss, "rss_mb": rss, "stderr": stderr}


def bench_scale(args) -> str:
    """Start-up to the end of step 1 and peak memory at 10k, 100k and 1M rows, through the real CLI."""
    import make_tiny_model
    from train.store import TokenTable, pack_plan

    work = Path(args.work or tempfile.mkdtemp(prefix="halyard-bench-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    if not (work / "tiny-llama").exists():
        make_tiny_model.make(work / "tiny-llama", "chatml")
    single = [sys.executable, str(REPO / "launch.py")]
    double = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
              str(REPO / "accelerate_config" / "cpu_2proc.yaml"), str(REPO / "launch.py")]  # fmt: skip
    lines = [
        "| rows | run | processes | packing | seconds to the end of step 1 | peak PSS, all processes (MB) | "
        "peak RSS summed (MB) |",
        "|---|---|---|---|---|---|---|",
    ]
    notes = []
    for n_rows in args.rows:
        data = work / f"chat-{n_rows}.jsonl"
        if not data.exists():
            started = time.perf_counter()
            write_scale_rows(data, n_rows, mean_words=args.mean_words)
            notes.append(
                f"wrote {n_rows:,} rows ({data.stat().st_size / 2**20:,.0f} MB) in {time.perf_counter() - started:.0f} s"
            )
        cache = work / f"cache-{n_rows}"
        shutil.rmtree(cache / "preprocessed", ignore_errors=True)
        (cache).mkdir(exist_ok=True)
        if not (cache / "tiny-llama").exists():
            (cache / "tiny-llama").symlink_to(work / "tiny-llama")
        base = ["model=tiny", f"cache_dir={cache}", f"datasets=[{data}]", "model.max_length=1024", "max_steps=1",
                "model.batch_size=8", "data.num_proc=2", "log_every_steps=1"]  # fmt: skip
        runs = [("first (uncached)", single, "false"), ("cached", single, "false"), ("cached", single, "true"),
                ("cached", double, "false"), ("cached", double, "true")]  # fmt: skip
        for index, (label, launcher, packing) in enumerate(runs):
            result = timed_run([*launcher, *base, f"exp_name=run{index}", f"data.packing={packing}"])
            processes = 2 if launcher is double else 1
            lines.append(
                f"| {n_rows:,} | {label} | {processes} | {packing} | {result['seconds']:.1f} | "
                f"{result['pss_mb']:,.0f} | {result['rss_mb']:,.0f} |"
            )
            if index == 0:
                found = re.search(r"tokenized (\d+) rows in ([\d.]+) s \(([\d,]+) rows/s\)", result["stderr"])
                notes.append(f"{n_rows:,} rows, first run: preprocessing {found.group(0) if found else '?'}")
        folder = next((cache / "preprocessed").glob("*/stats.json")).parent
        lengths = TokenTable(folder, "sft").lengths()
        started = time.perf_counter()
        pack_plan(lengths, 1024)
        notes.append(
            f"{n_rows:,} rows: {len(lengths):,} examples, mean {lengths.mean():.0f} tokens (max {lengths.max()}); "
            f"packing plan in {time.perf_counter() - started:.2f} s"
        )
    return "\n".join(lines + [""] + [f"- {note}" for note in notes])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    pre = sub.add_parser("preprocess")
    pre.add_argument("--rows", type=int, default=20000)
    pre.add_argument("--repeats", type=int, default=3)
    default_tokenizer = Path.home() / ".cache" / "halyard" / "models" / "SmolLM2-135M-Instruct"
    pre.add_argument("--tokenizer", default=str(default_tokenizer), help="tokenizer folder (default: SmolLM2's)")
    memory = sub.add_parser("reference-memory")
    memory.add_argument("--steps", type=int, default=6)
    sft = sub.add_parser("sft")
    sft.add_argument("--steps", type=int, default=12)
    sft.add_argument("--tokenizer", default=str(default_tokenizer))
    scale = sub.add_parser("scale")
    scale.add_argument("--rows", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    scale.add_argument("--mean-words", type=float, default=92.0, help="words per row (~300 tiny-model tokens)")
    scale.add_argument("--work", help="folder for data and caches (kept; default: a new temporary folder)")
    args = parser.parse_args()
    runners = {
        "preprocess": bench_preprocess,
        "reference-memory": bench_reference_memory,
        "sft": bench_sft,
        "scale": bench_scale,
    }
    table = runners[args.what](args)
    command = "python scripts/benchmark.py " + " ".join(sys.argv[1:])
    print(f"`{command}` on {platform.processor() or platform.machine()}\n")
    print(table)


if __name__ == "__main__":
    main()
