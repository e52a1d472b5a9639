"""Benchmarks. Results go to docs/BENCHMARKS.md with the command that produced them.

    python scripts/benchmark.py preprocess [--rows 20000] [--repeats 3] [--tokenizer DIR]
    python scripts/benchmark.py sft [--model smollm2|qwen-shape] [--dtype float32|bfloat16] [--steps 6]
    python scripts/benchmark.py dpo [--model smollm2|qwen-shape] [--pairs 4] [--steps 5]
    python scripts/benchmark.py shared-prompt [--pairs 32] [--batch 4] [--long-prompts]
    python scripts/benchmark.py cpu-options [--repeats 3] [--compile]
    python scripts/benchmark.py reference-memory [--steps 6]
    python scripts/benchmark.py scale [--rows 10000 100000 1000000] [--work DIR]
    python scripts/benchmark.py eval-cost [--batch-sizes 8 32] [--repeats 1]

sft: supervised fine-tuning, each run its own process, one after the other: Halyard unpacked with random batches,
grouped by length (the default) and packed (rows sized to the same tokens per step), TRL 1.16's SFTTrainer padded
and padding-free (its padding-free step-1 loss is compared with the padded one on the same batch: equal means the
examples stayed apart), and a bare PyTorch loop over Halyard's packed batches with the model's own loss. The model is
SmolLM2-135M's real weights, or Qwen2.5-0.5B's layer shape at reduced depth; the data synthetic multi-turn chat with
skewed lengths; the same tokens and labels for every run. Rates: the timed steps' supervised tokens over their
seconds (steps differ in size, grouped by length most); the median step time is shown beside them.

dpo: DPO pairs/s and peak RSS, Halyard padded and packed, each with a live and a precomputed reference, against TRL's
DPOTrainer (padded, with and without precompute_ref_log_probs), on the same tokenized pairs (TRL is handed Halyard's
token ids) and the same pairs per step.

shared-prompt: a pair's prompt run once (one row `prompt, chosen, rejected`, a 4D mask keeping rejected from chosen)
vs twice (two rows), same log-probs (checked), policy forward + backward time.

cpu-options: threads, bfloat16 autocast and torch.compile on one SmolLM2 training step.

scale: the data path at 10k, 100k and 1M synthetic multi-turn rows (lognormal lengths, ~300 tokens on average) on the
tiny 2-layer model: seconds from the command to the end of step 1 (`max_steps=1`) and peak memory of all its
processes, for the first (uncached, data.num_proc=2) run and cached runs with and without packing, on 1 and 2
processes; and the packing plan's time over all examples.

eval-cost: what a benchmark evaluation costs (benchmarks.*, scripts/evaluate.py): the demo task (data/demo/benchmark,
two choices per question) on SmolLM2-135M's live float32 model, through train/loop/benchmarks.py as training runs it,
in seconds per 100 questions, with and without the chat template, at each batch size, and in training steps of the
demo timed in the same process (the ratio to choose benchmarks.every_steps by, also on a busy machine).

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

    from train.app.config import DataConfig, ModelConfig
    from train.app.models import build_tokenizer
    from train.data.preprocess import preprocess

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


CHILD = r"""
import json, resource, statistics, sys, time
sys.path.insert(0, REPO)
import torch
torch.manual_seed(0)
from transformers import AutoModelForCausalLM, TrainerCallback
mode, work, settings = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
bf16 = settings["dtype"] == "bfloat16"
model = AutoModelForCausalLM.from_pretrained(settings["model"], attn_implementation="sdpa", dtype=torch.float32)
model.config.use_cache = False
times, losses = [], []

class Clock(TrainerCallback):
    def on_step_begin(self, args, state, control, **kw): self.t = time.perf_counter()
    def on_step_end(self, args, state, control, **kw): times.append(time.perf_counter() - self.t)
    def on_log(self, args, state, control, logs=None, **kw):
        if logs and "loss" in logs: losses.append(logs["loss"])

common = dict(output_dir=work + "/trl-" + mode, num_train_epochs=1, learning_rate=settings["lr"], max_grad_norm=0.0,
              lr_scheduler_type="constant", logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, seed=0,
              gradient_checkpointing=False, bf16=bf16, dataloader_num_workers=0, max_length=None)
steps = settings["steps"]
if mode.startswith("trl-sft"):
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer
    examples = [json.loads(l) for l in open(work + "/sft.jsonl")][: steps * 8]
    rows = [{"input_ids": e["input_ids"], "completion_mask": [0] + [int(l != -100) for l in e["labels"][1:]]} for e in examples]
    config = SFTConfig(per_device_train_batch_size=8, completion_only_loss=True, padding_free=mode.endswith("-pf"),
                       shuffle_dataset=False, **common)
    trainer = SFTTrainer(model=model, args=config, train_dataset=Dataset.from_list(rows), callbacks=[Clock()])
    trainer._get_train_sampler = lambda *a, **k: torch.utils.data.SequentialSampler(trainer.train_dataset)
    trainer.train()
    per_step = [sum(sum(r["completion_mask"]) for r in rows[i : i + 8]) for i in range(0, len(rows), 8)]
elif mode.startswith("trl-dpo"):
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer
    pairs = [json.loads(l) for l in open(work + "/pairs.jsonl")][: steps * settings["pairs"]]
    class Pretokenized(DPOTrainer):  # the same token ids as Halyard's runs: no re-tokenization
        def _prepare_dataset(self, dataset, *args, **kwargs): return dataset
    config = DPOConfig(per_device_train_batch_size=settings["pairs"], beta=0.1,
                       precompute_ref_log_probs=mode.endswith("-pre"), **common)
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(settings["model"])
    trainer = Pretokenized(model=model, args=config, processing_class=tokenizer, train_dataset=Dataset.from_list(pairs), callbacks=[Clock()])
    trainer._get_train_sampler = lambda *a, **k: torch.utils.data.SequentialSampler(trainer.train_dataset)
    trainer.train()
    n = settings["pairs"]
    per_step = [n] * (len(pairs) // n)
else:  # bare: a plain loop over Halyard's packed batches, the model's own loss
    from safetensors.torch import load_file
    saved = load_file(work + "/packed_batches.safetensors")
    batches = [{key: saved[f"{i}.{key}"] for key in ("input_ids", "position_ids", "labels")}
               for i in range(len({k.split(".")[0] for k in saved}))][:steps]
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings["lr"])
    for batch in batches:
        started = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], labels=batch["labels"]).loss
        loss.backward(); optimizer.step(); optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - started)
        losses.append(loss.item())
    per_step = [(b["labels"][:, 1:] != -100).sum().item() for b in batches]
warm = settings["warmup_steps"]
n = min(len(times), len(per_step))
print(json.dumps({"step_seconds": statistics.median(times[warm:n]), "units_per_step": statistics.mean(per_step[warm:n]),
                  "rate": sum(per_step[warm:n]) / sum(times[warm:n]),
                  "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "losses": losses[:2]}))
"""


def run_child(mode: str, work: Path, settings: dict) -> dict:
    """One peer run (TRL, or the bare loop) in its own process: median step seconds, units per step, peak RSS."""
    import subprocess

    child = CHILD.replace("REPO", repr(str(REPO)))
    output = subprocess.run([sys.executable, "-c", child, mode, str(work), json.dumps(settings)], cwd=REPO,
                            capture_output=True, text=True, env={**os.environ, **OFFLINE})  # fmt: skip
    if output.returncode != 0:
        raise RuntimeError(f"{mode} failed:\n{output.stderr[-3000:]}")
    result = json.loads(output.stdout.strip().splitlines()[-1])
    return result


OFFLINE = {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "WANDB_MODE": "offline",
    "TOKENIZERS_PARALLELISM": "false",
}


def run_halyard(work: Path, name: str, overrides: list[str], warmup_steps: int, unit: str) -> dict:
    """One Halyard run through the CLI: median step seconds after the warm-up, `unit` (supervised_tokens or
    examples) per step, peak RSS, and the first losses."""
    import subprocess

    command = [sys.executable, str(REPO / "launch.py"), f"cache_dir={work}", f"exp_name={name}", "log_every_steps=1",
               "warmup_ratio=0", "model.max_grad_norm=null", "n_epochs=100", *overrides]  # fmt: skip
    output = subprocess.run(command, cwd=REPO, capture_output=True, text=True, env={**os.environ, **OFFLINE})
    if output.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{output.stderr[-3000:]}")
    rows = [json.loads(line) for line in (work / name / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "loss/train" in r]
    seconds = [b["train_seconds"] - a["train_seconds"] for a, b in itertools.pairwise(rows)][warmup_steps - 1 :]
    units = [b[unit] - a[unit] for a, b in itertools.pairwise(rows)][warmup_steps - 1 :]
    summary = json.loads((work / name / "summary.json").read_text())
    step_seconds = statistics.median(seconds)
    return {"step_seconds": step_seconds, "units_per_step": statistics.mean(units),
            "rate": sum(units) / sum(seconds), "peak_mb": summary["peak_memory_mb"],
            "losses": [r["loss/train"] for r in rows[:2]], "mfu": statistics.median(r["mfu"] for r in rows[warmup_steps:])}  # fmt: skip


def model_for(args, work: Path, tokenizer) -> tuple[Path, str]:
    """The benchmark's model folder and a description: SmolLM2-135M's real weights, or a larger current shape at
    reduced depth (random init, its own vocabulary size, SmolLM2's tokenizer)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if args.model == "smollm2":
        config = AutoConfig.from_pretrained(args.smollm2)
        return Path(args.smollm2), (
            f"SmolLM2-135M-Instruct, real weights ({config.num_hidden_layers} layers, hidden {config.hidden_size}, "
            f"vocab {config.vocab_size}, tied)"
        )
    # Qwen2.5-0.5B's layer shape (hidden 896, 14 heads, 2 KV heads, MLP 4864, tied 151,936 vocabulary), 6 layers
    from transformers import Qwen2Config

    config = Qwen2Config(vocab_size=151_936, hidden_size=896, intermediate_size=4864, num_hidden_layers=6,
                         num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True, use_cache=False,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    folder = work / "qwen-shape"
    torch_model = AutoModelForCausalLM.from_config(config)
    torch_model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    n = sum(p.numel() for p in torch_model.parameters()) / 1e6
    return (
        folder,
        f"Qwen2.5-0.5B's layer shape at 6 of 24 layers, random init ({n:.0f}M parameters, tied vocab 151,936)",
    )


def bench_sft(args) -> str:
    """Halyard (unpacked, grouped by length, packed), TRL (padded, padding-free) and a bare loop, each in its own
    process, on the same model, tokens and labels, at equal tokens per optimizer step."""
    from transformers import AutoTokenizer

    from train.app.config import DataConfig
    from train.batching.collate import collate_packed
    from train.data.preprocess import load_examples
    from train.data.store import concatenate, pack_plan

    work = Path(tempfile.mkdtemp(prefix="halyard-bench-sft-"))
    tokenizer = AutoTokenizer.from_pretrained(args.smollm2)
    model_dir, model_text = model_for(args, work, tokenizer)
    steps = args.steps + args.warmup_steps
    data = work / "chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in synthetic_chat_rows(steps * 8 * 4, seed=1)))
    examples = list(load_examples([str(data)], tokenizer, DataConfig(), max_length=args.max_length)[0])
    (work / "sft.jsonl").write_text(
        "".join(json.dumps({"input_ids": e.input_ids, "labels": e.labels}) + "\n" for e in examples)
    )
    lengths = [len(e.input_ids) for e in examples]
    # Equal tokens per optimizer step: packed rows of max_length, as many per step as 8 examples' mean tokens fill.
    members, row_starts = pack_plan(np.array(lengths, dtype=np.int64), args.max_length)  # best-fit decreasing
    rows = [concatenate([examples[i] for i in members[a:b]]) for a, b in itertools.pairwise(row_starts.tolist())]
    efficiency = sum(lengths) / (len(rows) * args.max_length)
    rows_per_step = max(1, round(8 * statistics.mean(lengths) / (args.max_length * efficiency)))
    from safetensors.torch import save_file

    batches = [collate_packed(rows[i : i + rows_per_step], 0) for i in range(0, len(rows), rows_per_step)]
    save_file({f"{i}.{key}": batch[key].contiguous() for i, batch in enumerate(batches)
               for key in ("input_ids", "position_ids", "labels")}, work / "packed_batches.safetensors")  # fmt: skip
    base = ["model=smollm2", f"++model.name_or_path={model_dir}", f"datasets=[{data}]", f"model.dtype={args.dtype}",
            f"model.max_length={args.max_length}", f"max_steps={steps}", "lr=1e-5"]  # fmt: skip
    results = {
        "Halyard, unpacked, random batches": run_halyard(
            work, "unpacked", [*base, "model.batch_size=8", "data.group_by_length=false"], args.warmup_steps,
            "supervised_tokens"),
        "Halyard, grouped by length (default)": run_halyard(
            work, "grouped", [*base, "model.batch_size=8", "data.group_by_length=true"], args.warmup_steps,
            "supervised_tokens"),
        f"Halyard, packed ({rows_per_step} rows of {args.max_length} per step)": run_halyard(
            work, "packed", [*base, f"model.batch_size={rows_per_step}", "data.packing=true"], args.warmup_steps,
            "supervised_tokens"),
    }  # fmt: skip
    settings = {"model": str(model_dir), "dtype": args.dtype, "lr": 1e-5, "steps": steps,
                "warmup_steps": args.warmup_steps}  # fmt: skip
    trl_padded = run_child("trl-sft", work, settings)
    trl_free = run_child("trl-sft-pf", work, settings)
    # Padding-free is correct only if each example still attends only to itself: its first loss must equal the
    # padded run's on the same batch.
    free_ok = abs(trl_free["losses"][0] - trl_padded["losses"][0]) <= 1e-3 * abs(trl_padded["losses"][0])
    results["TRL 1.16 SFTTrainer, padded"] = trl_padded
    label = "correct" if free_ok else "WRONG: examples attend to each other"
    results[f"TRL 1.16 SFTTrainer, padding_free ({label}: step-1 loss {trl_free['losses'][0]:.4f} vs padded "
            f"{trl_padded['losses'][0]:.4f})"] = trl_free  # fmt: skip
    results["bare PyTorch loop, Halyard's packed batches, model's own loss"] = run_child("bare", work, settings)
    best_trl = max(trl_padded["rate"], trl_free["rate"] if free_ok else 0.0)
    lines = [
        f"Model: {model_text}, {args.dtype}. Data: {len(examples)} synthetic multi-turn chat examples, "
        f"{min(lengths)}-{max(lengths)} tokens (median {statistics.median(lengths):.0f}, mean "
        f"{statistics.mean(lengths):.0f}); 8 examples per step (packed: {rows_per_step} rows of {args.max_length}, "
        f"efficiency {efficiency:.0%}); AdamW lr 1e-5, no clipping, no gradient checkpointing; "
        f"{args.warmup_steps} warm-up + {args.steps} timed steps per run; rate = their tokens / their seconds.",
        "",
        "| run | supervised tokens/s | vs best TRL | median step (s) | supervised tokens per step | peak RSS (MB) |",
        "|---|---|---|---|---|---|",
        *(
            f"| {name} | {r['rate']:,.0f} | {r['rate'] / best_trl:.2f}x | {r['step_seconds']:.2f} | "
            f"{r['units_per_step']:,.0f} | {r['peak_mb']:,.0f} |"
            for name, r in results.items()
        ),
    ]
    mfus = {name: r["mfu"] for name, r in results.items() if "mfu" in r}
    lines += [
        "",
        "Halyard's logged MFU (median over timed steps): " + ", ".join(f"{n}: {m:.3f}" for n, m in mfus.items()),
    ]
    return "\n".join(lines)


def synthetic_pair_rows(n_rows: int, seed: int = 0) -> list[dict]:
    """Preference rows: a chat prompt (1-3 turns), a chosen and a rejected answer, lengths skewed (lognormal)."""
    rng = random.Random(seed)
    chats = synthetic_chat_rows(n_rows, seed)
    rows = []
    for chat in chats:
        messages = chat["messages"]
        answers = [m["content"] for m in synthetic_chat_rows(2, rng.randint(0, 10**9))[0]["messages"][1::2]]
        second = synthetic_chat_rows(1, rng.randint(0, 10**9))[0]["messages"][1]["content"]
        rows.append({"prompt": messages[:-1], "chosen": [{"role": "assistant", "content": answers[0]}],
                     "rejected": [{"role": "assistant", "content": second}]})  # fmt: skip
    return rows


def bench_dpo(args) -> str:
    """DPO: Halyard (each prompt once, the default; two rows per pair; packed; a precomputed reference) against
    TRL's DPOTrainer (padded, with and without precomputed reference; its padding_free is disabled in 1.16), each
    in its own process, on the same model, pairs and pairs per step."""
    from transformers import AutoTokenizer

    from train.app.config import DataConfig
    from train.data.preprocess import load_examples
    from train.data.store import IGNORE_INDEX, pack_plan, packed_row_tokens

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


def bench_shared_prompt(args) -> str:
    """The three layouts of DPO pairs through the trainer's own code (`forward_sequence_logps`): two padded rows
    per pair, the batch's pairs packed in one row, and each pair's prompt once (`collate_shared_prompt`); the same
    log-probs (checked), and the policy's forward + backward time on the same pairs, median over repeats."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from train.app.config import DataConfig
    from train.batching.collate import collate, collate_sequences, collate_shared_prompt
    from train.batching.sequences import forward_sequence_logps
    from train.data.preprocess import load_examples
    from train.data.store import IGNORE_INDEX

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


def middling_chat_batch(tokenizer, prefix: str) -> dict:
    """A padded batch of 8 synthetic chat examples of similar, middling length (the 25th-32nd shortest of 64)."""
    from train.app.config import DataConfig
    from train.batching.collate import collate
    from train.data.preprocess import load_examples

    data = Path(tempfile.mkdtemp(prefix=prefix)) / "chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in synthetic_chat_rows(64, seed=4)))
    examples = sorted(load_examples([str(data)], tokenizer, DataConfig(), 512)[0], key=lambda e: len(e.input_ids))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return collate(examples[24:32], pad)


def training_step_seconds(model, batch: dict, bf16: bool) -> float:
    """Wall seconds of one forward + backward with Halyard's lean loss (logits at supervised positions only)."""
    import torch

    from train.objectives.losses import selected_nll_sum, supervised_positions

    started = time.perf_counter()
    keep = supervised_positions(batch["labels"])
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], logits_to_keep=keep).logits
    loss = selected_nll_sum(logits, batch["labels"], keep)
    (loss.total / loss.count).backward()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - started


def bench_cpu_options(args) -> str:
    """CPU settings on one training step of SmolLM2-135M (real weights, a padded batch of chat examples), in one
    process on the same batch: threads, bfloat16 autocast, torch.compile. Median of the timed repeats."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.smollm2)
    batch = middling_chat_batch(tokenizer, "halyard-bench-cpu-")
    threads = torch.get_num_threads()

    def step_seconds(model, bf16: bool, repeats: int) -> float:
        # the first is a warm-up (and, compiled, the compilation)
        times = [training_step_seconds(model, batch, bf16) for _ in range(repeats + 1)]
        return statistics.median(times[1:]), times[0]

    def fresh():
        model = AutoModelForCausalLM.from_pretrained(args.smollm2, attn_implementation="sdpa", dtype=torch.float32)
        model.config.use_cache = False
        return model

    model = fresh()
    results = {f"float32, {threads} threads (default)": step_seconds(model, False, args.repeats)}
    torch.set_num_threads(1)
    results["float32, 1 thread"] = step_seconds(model, False, args.repeats)
    torch.set_num_threads(threads)
    results[f"bfloat16 autocast, {threads} threads"] = step_seconds(model, True, args.repeats)
    if args.compile:
        compiled = torch.compile(fresh(), dynamic=True)
        results[f"float32, torch.compile(dynamic=True), {threads} threads"] = step_seconds(
            compiled, False, args.repeats
        )
    base = results[f"float32, {threads} threads (default)"][0]
    tokens = int(batch["attention_mask"].sum())
    lines = [
        f"SmolLM2-135M real weights, one forward + backward with Halyard's lean loss on 8 chat examples ({tokens} real "
        f"tokens, padded to {batch['input_ids'].shape[1]}), {args.repeats} timed repeats after one warm-up, in one "
        "process.",
        "",
        "| setting | median step (s) | vs default | first step (s) |",
        "|---|---|---|---|",
        *(
            f"| {name} | {median:.2f} | {median / base:.2f}x | {first:.1f} |"
            for name, (median, first) in results.items()
        ),
    ]
    return "\n".join(lines)


def bench_eval_cost(args) -> str:
    """Seconds per 100 questions of the demo benchmark task on SmolLM2-135M (float32, as the live model is evaluated
    during training), with and without the chat template, at each batch size; and the same cost in training steps
    of the demo (a float32 and a bfloat16-autocast forward + backward on 8 chat examples, timed in the same process
    between the evaluations), a ratio that holds on a busy machine where the seconds do not."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from train.loop.benchmarks import HARNESS_VERSION, BenchmarkSettings, evaluate_tasks

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
    from train.data.store import TokenTable, pack_plan

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
    for name, steps in (("sft", 6), ("dpo", 5)):
        bench = sub.add_parser(name)
        bench.add_argument("--steps", type=int, default=steps, help="timed steps per run")
        bench.add_argument("--warmup-steps", type=int, default=2)
        bench.add_argument("--model", choices=["smollm2", "qwen-shape"], default="smollm2")
        bench.add_argument("--smollm2", default=str(default_tokenizer), help="SmolLM2-135M-Instruct's folder")
        bench.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
        bench.add_argument("--max-length", type=int, default=512)
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
    cost = sub.add_parser("eval-cost")
    cost.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 32])
    cost.add_argument("--repeats", type=int, default=1)
    cost.add_argument("--smollm2", default=str(default_tokenizer))
    args = parser.parse_args()
    runners = {
        "preprocess": bench_preprocess,
        "reference-memory": bench_reference_memory,
        "sft": bench_sft,
        "dpo": bench_dpo,
        "shared-prompt": bench_shared_prompt,
        "cpu-options": bench_cpu_options,
        "scale": bench_scale,
        "eval-cost": bench_eval_cost,
        "qlora": bench_qlora,
    }
    table = runners[args.what](args)
    command = "python scripts/benchmark.py " + " ".join(sys.argv[1:])
    print(f"`{command}` on {platform.processor() or platform.machine()}\n")
    print(table)


if __name__ == "__main__":
    main()
