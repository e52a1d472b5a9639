"""One peer run of the sft and dpo benchmarks, in its own process so that its peak RSS is its own: TRL 1.16's
SFTTrainer or DPOTrainer, or a bare PyTorch loop over a Halyard run's forward passes with the model's own loss.

    python -m scripts.bench.child MODE WORK SETTINGS     (from the repository root; runs.run_child runs it)

MODE: trl-sft, trl-sft-pf (padding-free), trl-sft-pf-compiled (padding-free, torch_compile=True), trl-dpo,
trl-dpo-pre (precompute_ref_log_probs) or bare. WORK: the benchmark's folder, holding what sft.py and dpo.py wrote
there (sft.jsonl, pairs.jsonl, the passes replay.py saved).
SETTINGS: a JSON object with model (a folder), dtype, lr, steps, warmup_steps, epochs (SFT: passes over the first
`steps` batches, 1 unless set; warmup_steps counts steps of all of them), pairs (pairs per step, DPO), passes
(the bare loop's file in WORK), phases (bare: time its phases under torch.profiler) and keep_freed_host_memory (glibc
keeps freed memory for reuse in this process, as Halyard's keep_freed_host_memory does in a run).
The last line printed is a JSON object: the median step seconds and mean units per step over the timed steps (after
warmup_steps), their rate (units/s), the units of every step, the bare loop's phase medians, the peak RSS in MB and
the first two losses.
"""

from __future__ import annotations

import contextlib
import json
import resource
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

IGNORE_INDEX = -100  # a label the loss skips (Halyard's and transformers' convention)


class Clock(TrainerCallback):
    """Each optimizer step's wall seconds and each logged loss of a TRL run, into the lists it is given."""

    def __init__(self, times: list[float], losses: list[float]) -> None:
        self.times, self.losses, self.started = times, losses, 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        self.started = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append(time.perf_counter() - self.started)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.losses.append(logs["loss"])


def trl_arguments(mode: str, work: Path, settings: dict) -> dict:
    """The TrainingArguments both TRL trainers share: constant learning rate, no clipping, no checkpointing, a CPU
    run logged every step."""
    return dict(output_dir=str(work / f"trl-{mode}"), num_train_epochs=settings.get("epochs", 1), learning_rate=settings["lr"],
                max_grad_norm=0.0, lr_scheduler_type="constant", logging_steps=1, save_strategy="no", report_to=[],
                use_cpu=True, seed=0, gradient_checkpointing=False, bf16=settings["dtype"] == "bfloat16",
                dataloader_num_workers=0, max_length=None)  # fmt: skip


def in_order(trainer) -> None:
    """Batches in the file's order, as Halyard's runs see them: TRL would shuffle."""
    trainer._get_train_sampler = lambda *a, **k: torch.utils.data.SequentialSampler(trainer.train_dataset)


def trl_sft(model, mode: str, work: Path, settings: dict, clock: Clock) -> list[int]:
    """SFTTrainer, padded or padding-free (mode trl-sft-pf; trl-sft-pf-compiled with the Trainer's torch_compile:
    the whole model compiled), 8 examples per step, on Halyard's tokens and labels (the first `steps` batches, for
    `epochs` epochs); the supervised tokens of each step."""
    # TRL is optional (pip install -e ".[bench]"): imported only by the modes that use it
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    lines = (work / "sft.jsonl").read_text().splitlines()
    examples = [json.loads(line) for line in lines][: settings["steps"] * 8]
    rows = [{"input_ids": e["input_ids"], "completion_mask": [0] + [int(t != IGNORE_INDEX) for t in e["labels"][1:]]}
            for e in examples]  # fmt: skip
    config = SFTConfig(per_device_train_batch_size=8, completion_only_loss=True, padding_free="-pf" in mode,
                       torch_compile=mode.endswith("-compiled"), shuffle_dataset=False,
                       **trl_arguments(mode, work, settings))  # fmt: skip
    trainer = SFTTrainer(model=model, args=config, train_dataset=Dataset.from_list(rows), callbacks=[clock])
    in_order(trainer)
    trainer.train()
    per_epoch = [sum(sum(r["completion_mask"]) for r in rows[i : i + 8]) for i in range(0, len(rows), 8)]
    return per_epoch * config.num_train_epochs  # in order: every epoch's steps are the same batches


def trl_dpo(model, mode: str, work: Path, settings: dict, clock: Clock) -> list[int]:
    """DPOTrainer, padded, with a live or a precomputed (mode trl-dpo-pre) reference, on Halyard's token ids; the
    pairs of each step."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    class Pretokenized(DPOTrainer):  # the same token ids as Halyard's runs: no re-tokenization
        def _prepare_dataset(self, dataset, *args, **kwargs):
            return dataset

    n = settings["pairs"]
    pairs = [json.loads(line) for line in (work / "pairs.jsonl").read_text().splitlines()][: settings["steps"] * n]
    config = DPOConfig(per_device_train_batch_size=n, beta=0.1, precompute_ref_log_probs=mode.endswith("-pre"),
                       **trl_arguments(mode, work, settings))  # fmt: skip
    tokenizer = AutoTokenizer.from_pretrained(settings["model"])
    trainer = Pretokenized(model=model, args=config, processing_class=tokenizer, train_dataset=Dataset.from_list(pairs),
                           callbacks=[clock])  # fmt: skip
    in_order(trainer)
    trainer.train()
    return [n] * (len(pairs) // n)


def bare_loop(model, work: Path, settings: dict, times: list[float], losses: list[float]) -> list[int]:
    """A plain loop over the forward passes of a Halyard run (replay.py saved them in settings["passes"]), with the
    model's own loss and fused AdamW: each pass forward and backward, then the optimizer step. The supervised tokens of
    each step; with settings["phases"], the median seconds of forward, backward and optimizer per step go into
    settings' "phases" output (under torch.profiler, as Halyard's profiled steps run)."""
    from scripts.bench.replay import load_passes, supervised_tokens

    steps = load_passes(work / settings["passes"])[: settings["steps"]]
    # Halyard's default optimizer (and transformers'): the fused kernel, so that the loops differ only in the loop
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings["lr"], fused=True)
    bf16 = settings["dtype"] == "bfloat16"
    profiler = torch.profiler.profile() if settings.get("phases") else contextlib.nullcontext()
    with profiler:
        for passes in steps:
            started = time.perf_counter()
            phase = {"forward": 0.0, "backward": 0.0}
            for batch in passes:
                mark = time.perf_counter()
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                    loss = model(**batch).loss
                phase["forward"] += time.perf_counter() - mark
                mark = time.perf_counter()
                loss.backward()
                phase["backward"] += time.perf_counter() - mark
            mark = time.perf_counter()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            phase["optimizer"] = time.perf_counter() - mark
            times.append(time.perf_counter() - started)
            PHASES.append(phase)
            losses.append(loss.item())
    return [supervised_tokens(passes) for passes in steps]


PHASES: list[dict[str, float]] = []  # the bare loop's phases per step


def main() -> None:
    mode, work, settings = sys.argv[1], Path(sys.argv[2]), json.loads(sys.argv[3])
    if settings.get("keep_freed_host_memory"):  # Halyard's default on a CPU, applied to this process as a run does
        from train.app.host_memory import keep_freed_memory

        why_not = keep_freed_memory()
        if why_not:
            raise SystemExit(f"keep_freed_host_memory: {why_not}")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(settings["model"], attn_implementation="sdpa", dtype=torch.float32)
    model.config.use_cache = False
    times: list[float] = []
    losses: list[float] = []
    if mode.startswith("trl-sft"):
        per_step = trl_sft(model, mode, work, settings, Clock(times, losses))
    elif mode.startswith("trl-dpo"):
        per_step = trl_dpo(model, mode, work, settings, Clock(times, losses))
    else:
        per_step = bare_loop(model, work, settings, times, losses)
    warm = settings["warmup_steps"]
    n = min(len(times), len(per_step))
    phases = {key: statistics.median(p[key] for p in PHASES[warm:n]) for key in PHASES[0]} if PHASES else {}
    print(json.dumps({"step_seconds": statistics.median(times[warm:n]), "phases": phases, "per_step": per_step,
                      "units_per_step": statistics.mean(per_step[warm:n]),
                      "rate": sum(per_step[warm:n]) / sum(times[warm:n]),
                      "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "losses": losses[:2]}))  # fmt: skip


if __name__ == "__main__":
    main()
