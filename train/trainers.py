"""Trainers. `BasicTrainer` owns the loop: batching, accumulation, optimizer, schedule, clipping, evaluation,
logging and saving. A subclass implements two hooks, `loss_units` and `batch_loss`; see `SFTTrainer`.

Normalization is exact: a step's loss is the sum of per-unit losses (tokens for SFT) over all its micro-batches on
all processes, divided by the number of units in that whole step. So the gradients do not depend on how the global
batch is split into micro-batches or processes.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import math
import os
import shutil
import signal
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from transformers import get_cosine_schedule_with_warmup

from train import checkpoint
from train.batches import BatchPlan, StepBatches, step_loader
from train.config import Config
from train.data import collate, collate_packed
from train.distributed import (
    FsdpSettings,
    clip_gradients,
    full_state_dict,
    is_sharded,
    local_parameter_fraction,
    no_gradient_sync,
    shard_model,
    unsharded_copy,
)
from train.errors import ConfigError, DataError, HalyardError
from train.faults import StopRequest, TrainingStopped, fault_at
from train.losses import LossSum, count_loss_units, selected_nll_sum, supervised_positions
from train.models import verify_packing_isolation
from train.progress import Progress
from train.store import IGNORE_INDEX, PackedExample, PackedStore, TokenStore, token_sequences
from train.throughput import Throughput, peak_flops_per_second, peak_memory, step_counts
from train.utils import config_yaml

logger = logging.getLogger(__name__)

TRAINERS: dict[str, type[BasicTrainer]] = {}


def register_trainer(cls: type[BasicTrainer]) -> type[BasicTrainer]:
    """Make a trainer class available to `loss.trainer` in a config/loss/*.yaml file, under its class name."""
    TRAINERS[cls.__name__] = cls
    return cls


def get_trainer_class(name: str) -> type[BasicTrainer]:
    import train.preference  # noqa: F401  (registers the preference trainers)

    if name not in TRAINERS:
        raise ConfigError([f"loss.trainer={name!r} is not a registered trainer; valid: {sorted(TRAINERS)}"])
    return TRAINERS[name]


class BasicTrainer:
    """The training loop. Subclasses define what a loss unit is and how a micro-batch's loss sum is computed."""

    data_kind = "sft"  # its rows: "sft" (conversations, text), "text", "paired" or "unpaired" (train/formats.py)

    def __init__(
        self,
        cfg: Config,
        accelerator: Accelerator,
        model,
        tokenizer,
        train_data: TokenStore | PackedStore,
        eval_data: TokenStore | None,
        fsdp: FsdpSettings | None = None,
    ):
        # Read the config once into typed attributes; the loop never looks at the config again.
        self.accelerator = accelerator
        self.tokenizer = tokenizer
        self.train_data, self.eval_data = train_data, eval_data
        self.run_dir = Path(cfg.run_dir)
        self.config_text = config_yaml(cfg)
        self.seed = cfg.seed
        self.n_epochs = cfg.n_epochs
        self.batch_size = cfg.model.batch_size
        self.eval_batch_size = cfg.model.eval_batch_size
        self.accumulation_steps = cfg.model.gradient_accumulation_steps
        self.max_grad_norm = cfg.model.max_grad_norm
        self.eval_every_steps = cfg.eval_every_steps
        self.log_every_steps = cfg.log_every_steps
        self.use_peft = cfg.model.use_peft
        self.pad_token_id = tokenizer.pad_token_id
        self.save_every_steps = cfg.save_every_steps
        self.save_total_limit = cfg.save_total_limit
        self.on_nonfinite = cfg.on_nonfinite
        self.resume_allow_config_change = cfg.resume_allow_config_change
        self.num_workers = cfg.data.num_workers
        self.eval_samples = cfg.eval_samples
        self.eval_samples_max_new_tokens = cfg.eval_samples_max_new_tokens

        self.batch_plan = BatchPlan(
            n_items=len(train_data),
            batch_size=self.batch_size,
            n_processes=accelerator.num_processes,
            rank=accelerator.process_index,
            accumulation_steps=self.accumulation_steps,
            seed=self.seed,
            lengths=train_data.lengths() if cfg.data.group_by_length else None,
        )
        self.steps_per_epoch = self.batch_plan.steps_per_epoch
        if self.steps_per_epoch == 0:
            raise DataError(
                f"the training data has {len(train_data)} examples, fewer than model.batch_size={self.batch_size}; lower the batch size or add data"
            )
        self.total_steps = self.n_epochs * self.steps_per_epoch
        if cfg.max_steps is not None:
            self.total_steps = min(self.total_steps, cfg.max_steps)
        unused = len(train_data) - self.steps_per_epoch * self.batch_size
        if unused:
            logger.info(
                f"each epoch trains on {len(train_data) - unused} of {len(train_data)} examples: the last partial batch is left out (the order is reshuffled every epoch)"
            )

        if fsdp is not None:
            # Shard first: the optimizer must hold the sharded parameters.
            self.model = shard_model(model, fsdp, accelerator.device, bf16=cfg.model.dtype == "bfloat16")
            self.optimizer = optimizer = build_optimizer(self.model, cfg.lr, cfg.weight_decay)
        else:
            optimizer = build_optimizer(model, cfg.lr, cfg.weight_decay)
            self.model, self.optimizer = accelerator.prepare(model, optimizer)
        warmup_steps = round(cfg.warmup_ratio * self.total_steps)
        self.scheduler = get_cosine_schedule_with_warmup(optimizer, warmup_steps, self.total_steps)
        self.throughput = self.build_throughput(cfg)
        if isinstance(train_data, PackedStore):
            verify_packing_isolation(self.accelerator.unwrap_model(self.model), cfg.model.attn_implementation)
        self.summary: dict[str, object] = {}
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self.step = 0  # optimizer steps completed
        self.skipped_steps = 0
        self.stop_request = StopRequest()
        self.data_fingerprint = train_data.fingerprint()  # from cache keys and the selection: no token is read
        if self.save_every_steps and accelerator.is_main_process:
            checkpoint.check_disk_space(self.run_dir, self.model)

    def build_throughput(self, cfg: Config) -> Throughput:
        model = self.accelerator.unwrap_model(self.model)
        config = model.config
        peak = peak_flops_per_second(cfg.peak_flops_per_second, self.accelerator.device, cfg.model.dtype == "bfloat16")
        # The input embedding is a lookup (no FLOPs); the head is counted where the loss needs it.
        embeddings = {id(p) for m in model.modules() if isinstance(m, torch.nn.Embedding) for p in m.parameters()}
        head = config.vocab_size * config.hidden_size
        body = sum(p.numel() for p in model.parameters() if id(p) not in embeddings)
        untied_head = 0 if getattr(config, "tie_word_embeddings", False) else head
        return Throughput(
            n_body_parameters=body - untied_head,
            head_parameters=head,
            n_layers=config.num_hidden_layers,
            hidden_size=config.hidden_size,
            peak_flops=peak,
            n_processes=self.accelerator.num_processes,
        )

    # ---- hooks for subclasses ----

    def loss_units(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """() int64: how many units (tokens, examples, pairs) the loss of this micro-batch sums over."""
        raise NotImplementedError

    def batch_loss(self, model, batch: dict[str, torch.Tensor]) -> LossSum:
        """Forward `batch` through `model`; return the loss summed over its units, their count, and metric sums."""
        raise NotImplementedError

    def collate(self, examples: list) -> dict[str, torch.Tensor]:
        """Tensors of one micro-batch (padded to its longest example or packed row). Runs in a data loader worker."""
        if isinstance(examples[0], PackedExample):
            return collate_packed(examples, self.pad_token_id)
        return collate(examples, self.pad_token_id)

    # ---- the loop ----

    def train(self) -> None:
        """Train from `self.step` (0, or where a checkpoint left off) to `total_steps`.

        Raises TrainingStopped after writing a checkpoint if SIGTERM or SIGINT arrived.
        """
        world = self.accelerator.num_processes
        unit = "packed rows" if isinstance(self.train_data, PackedStore) else "examples"
        logger.info(
            f"training for {self.total_steps} steps ({self.steps_per_epoch} per epoch) of {self.batch_size} {unit} "
            f"on {world} process(es), {self.accumulation_steps} micro-batch(es) of "
            f"{self.batch_plan.micro_batch_size} each" + (f", from step {self.step}" if self.step else "")
        )
        sharded = is_sharded(self.accelerator.unwrap_model(self.model))
        self.summary.update(
            num_processes=world,
            total_steps=self.total_steps,
            parallelism="fsdp2" if sharded else ("ddp" if world > 1 else "single"),
            local_parameter_fraction=local_parameter_fraction(self.model),
        )
        self.progress = Progress(self.total_steps, self.step, self.accelerator.is_main_process)
        if self.step == 0:
            if self.accelerator.is_main_process:
                self.metrics_path.write_text("")
                (self.run_dir / "samples.jsonl").unlink(missing_ok=True)
            if self.eval_data:
                self.log({"step": 0, **self.run_evaluation()})
        self.model.train()
        with self.stop_request.installed(), contextlib.closing(self.progress):
            for epoch, micro_batches in self.step_batches(start_step=self.step):
                self.step += 1
                stop = self.train_and_log_step(epoch, micro_batches)
                if stop or self.checkpoint_due():
                    self.save_checkpoint()
                if stop:
                    raise TrainingStopped(self.stop_request.signal_name or "a signal", self.step)
        seconds = max(self.throughput.seconds, 1e-9)
        self.summary["tokens_per_second"] = self.throughput.tokens / seconds
        self.summary["supervised_tokens_per_second"] = self.throughput.supervised_tokens / seconds
        self.summary["skipped_nonfinite_steps"] = self.skipped_steps
        self.summary.update(peak_memory())

    def checkpoint_due(self) -> bool:
        # The last step needs none: FINAL/ follows it.
        every = self.save_every_steps
        return bool(every) and self.step % every == 0 and self.step < self.total_steps

    def train_and_log_step(self, epoch: int, micro_batches: list[dict[str, torch.Tensor]]) -> bool:
        """Run one optimizer step, then log and evaluate when due. Returns whether any process was asked to stop."""
        started = time.perf_counter()
        metrics = self.train_step(micro_batches)
        self.throughput.add(metrics.pop("counts"), time.perf_counter() - started)
        stop = metrics.pop("stop")
        is_last = self.step == self.total_steps
        row: dict[str, float] = {"step": self.step}
        if self.step % self.log_every_steps == 0 or is_last or stop:
            epoch_progress = epoch + (self.step - epoch * self.steps_per_epoch) / self.steps_per_epoch
            row.update(metrics, epoch=epoch_progress, lr=self.scheduler.get_last_lr()[0], **self.throughput.report())
        if self.eval_data and (self.step % self.eval_every_steps == 0 or is_last):
            row.update(self.run_evaluation())
        if len(row) > 1:
            self.log(row)
        self.progress.advance(self.step, row)
        return stop

    def step_batches(self, start_step: int = 0):
        """(epoch, this process's collated micro-batches) for each optimizer step after `start_step`, prepared ahead
        by data loader workers; which examples they hold is `self.batch_plan`'s (see train/batches.py)."""
        batches = StepBatches(self.batch_plan, self.train_data, self.collate, start_step, self.total_steps)
        return step_loader(batches, self.num_workers, pin_memory=self.accelerator.device.type == "cuda")

    def train_step(self, on_cpu: list[dict[str, torch.Tensor]]) -> dict[str, float]:
        """One optimizer step over this process's micro-batches.

        Returns the step's exact loss, gradient norm, real token count and whether any process must stop. A step
        whose loss or gradient is not finite is never applied (on_nonfinite=stop raises, skip counts it).
        """
        counts = step_counts(on_cpu)  # counted before the copy to the device: no device syncs in the hot path
        batches = [self.to_device(batch) for batch in on_cpu]
        local_units = sum(self.loss_units(batch) for batch in batches)
        global_units = self.accelerator.reduce(local_units.to(self.accelerator.device), reduction="sum").clamp(min=1)
        loss_total = torch.zeros((), device=self.accelerator.device)
        metric_sums = MetricSums()
        for index, batch in enumerate(batches):
            # Gradients are all-reduced (averaged over processes) only on the last micro-batch.
            sync = index == len(batches) - 1
            with contextlib.nullcontext() if sync else no_gradient_sync(self.accelerator, self.model):
                loss_sum = self.batch_loss(self.model, batch)
                if fault_at("nan_loss", self.step):
                    loss_sum.total = loss_sum.total * float("nan")
                # DDP averages gradients over processes, so scale by their number to get sum / global_units.
                self.accelerator.backward(loss_sum.total * self.accelerator.num_processes / global_units)
            loss_total += loss_sum.total.detach()
            metric_sums.add(loss_sum.metrics)
        self.stop_request.inject_faults(self.step)
        counts = counts.to(loss_total)
        stop_flag = torch.tensor(float(self.stop_request.requested), device=loss_total.device)
        totals = self.accelerator.reduce(torch.cat([torch.stack([loss_total, stop_flag]), counts]), reduction="sum")
        loss = (totals[0] / global_units).item()
        metrics = metric_sums.reduce(self.accelerator, "train")
        grad_norm = clip_gradients(self.accelerator, self.model, self.max_grad_norm or math.inf)
        if math.isfinite(loss) and math.isfinite(grad_norm):
            self.optimizer.step()
        else:
            self.handle_nonfinite(loss, grad_norm)
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return {
            "loss/train": loss,
            **metrics,
            "grad_norm": grad_norm,
            "counts": totals[2:],
            "stop": bool(totals[1] > 0),
        }

    def handle_nonfinite(self, loss: float, grad_norm: float) -> None:
        what = f"step {self.step}: the loss ({loss}) or the gradient norm ({grad_norm}) is not finite"
        if self.on_nonfinite == "stop":
            latest = checkpoint.find_latest(self.run_dir)
            kept = f"the newest checkpoint ({latest.name}) is untouched" if latest else "no checkpoint was written"
            raise HalyardError(
                f"{what}; stopped without applying it, and {kept}. Lower lr or max_grad_norm, inspect this step's "
                f"data, or set on_nonfinite=skip to skip such steps."
            )
        self.skipped_steps += 1
        logger.warning(f"{what}; skipped (no update). {self.skipped_steps} step(s) skipped so far.")

    def to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {key: value.to(self.accelerator.device) for key, value in batch.items()}

    def run_evaluation(self) -> dict[str, float]:
        """The evaluation metrics, and generated samples when eval_samples > 0."""
        metrics = self.evaluate()
        if self.eval_samples:
            self.write_samples()
        return metrics

    @torch.no_grad()
    def write_samples(self) -> None:
        """Greedy answers to the first eval_samples held-out prompts: samples.jsonl, and a wandb table if enabled.

        A sharded model must run on every process in step (synced_gpus); otherwise only the main process generates.
        """
        model = self.accelerator.unwrap_model(self.model)
        sharded = is_sharded(model)
        if not (sharded or self.accelerator.is_main_process):
            return
        model.eval()
        rows = []
        for item in self.eval_data[: self.eval_samples]:
            example = token_sequences(item)[0]  # a pair's prompt and chosen answer
            prompt_length = next(i for i, label in enumerate(example.labels) if label != IGNORE_INDEX)
            prompt = torch.tensor([example.input_ids[:prompt_length]], device=self.accelerator.device)
            output = model.generate(
                input_ids=prompt,
                attention_mask=torch.ones_like(prompt),
                max_new_tokens=self.eval_samples_max_new_tokens,
                do_sample=False,
                use_cache=True,
                pad_token_id=self.pad_token_id,
                synced_gpus=sharded,
            )
            reference = [t for t, label in zip(example.input_ids, example.labels, strict=True) if label != IGNORE_INDEX]
            rows.append(
                {
                    "step": self.step,
                    "prompt": self.tokenizer.decode(prompt[0]),
                    "completion": self.tokenizer.decode(output[0, prompt_length:], skip_special_tokens=True),
                    "reference": self.tokenizer.decode(reference, skip_special_tokens=True),
                }
            )
        self.model.train()
        if self.accelerator.is_main_process:
            with (self.run_dir / "samples.jsonl").open("a") as f:
                f.writelines(json.dumps(row) + "\n" for row in rows)
            if any(t.name == "wandb" for t in self.accelerator.trackers):
                columns = ["step", "prompt", "completion", "reference"]
                table = [[row[c] for c in columns] for row in rows]
                self.accelerator.get_tracker("wandb").log_table("samples", columns=columns, data=table, step=self.step)

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Loss over every evaluation example, exact over processes.

        Each global eval batch is split over the processes; all processes run the same number of forward passes
        (one with no examples left runs a discarded one), because a sharded model communicates in its forward.
        """
        model = self.accelerator.unwrap_model(self.model)
        model.eval()
        rank, world = self.accelerator.process_index, self.accelerator.num_processes
        micro = self.eval_batch_size // world
        sums = torch.zeros(2, device=self.accelerator.device)
        metric_sums = MetricSums()
        for start in range(0, len(self.eval_data), self.eval_batch_size):
            mine = self.eval_data[start + rank * micro : start + (rank + 1) * micro]
            loss_sum = self.batch_loss(model, self.to_device(self.collate(mine or self.eval_data[:1])))
            if mine:
                sums += torch.stack([loss_sum.total.float(), loss_sum.count.float()])
                metric_sums.add(loss_sum.metrics)
        self.model.train()
        sums = self.accelerator.reduce(sums, reduction="sum")
        return {"loss/eval": (sums[0] / sums[1].clamp(min=1)).item(), **metric_sums.reduce(self.accelerator, "eval")}

    def log(self, metrics: dict[str, float]) -> None:
        """Append to metrics.jsonl, send to the enabled trackers, and print a line (main process only)."""
        if not self.accelerator.is_main_process:
            return
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(metrics) + "\n")
        self.accelerator.log({k: v for k, v in metrics.items() if k != "step"}, step=metrics["step"])
        self.summary.update({k: v for k, v in metrics.items() if k not in ("lr", "grad_norm", "epoch")})
        self.progress.show(metrics)

    def save_checkpoint(self) -> None:
        """Write ${run_dir}/step-<N>/ atomically (see train/checkpoint.py); every process takes part."""
        final = self.run_dir / checkpoint.checkpoint_name(self.step)
        partial = final.with_name(final.name + checkpoint.PARTIAL)
        main, rank = self.accelerator.is_main_process, self.accelerator.process_index
        if main:
            checkpoint.remove_partials(self.run_dir)
            partial.mkdir(parents=True)
        self.accelerator.wait_for_everyone()
        error = None
        try:
            self.write_checkpoint_files(partial, rank, main)
        except OSError as caught:
            error = caught
        # Publish only if every process succeeded; a failure anywhere leaves the previous checkpoint as `latest`.
        failures = self.accelerator.reduce(
            torch.tensor(float(error is not None), device=self.accelerator.device), "sum"
        )
        if failures.item() > 0:
            if main:
                shutil.rmtree(partial, ignore_errors=True)
            latest = checkpoint.find_latest(self.run_dir)
            reason = f" ({error.strerror or error})" if error else " (on another process)"
            raise HalyardError(
                f"could not write checkpoint {final.name}{reason}; "
                f"{'the previous checkpoint ' + latest.name + ' is intact' if latest else 'no earlier checkpoint exists'}. "
                f"Free disk space in {self.run_dir} or set cache_dir to another disk, then resume_from_checkpoint=auto."
            )
        if main:
            checkpoint.finish(partial, final, self.run_dir, self.save_total_limit)
            logger.info(f"checkpoint {final}")
        self.accelerator.wait_for_everyone()

    def write_checkpoint_files(self, directory: Path, rank: int, main: bool) -> None:
        model = self.accelerator.unwrap_model(self.model)
        sharded = is_sharded(model)
        if sharded:
            checkpoint.save_sharded_model(model, directory, rank)
        elif main:
            model.save_pretrained(directory / "model", safe_serialization=True)  # with LoRA: the adapter only
            self.tokenizer.save_pretrained(directory / "model")  # so scripts/generate.py can chat with it
        if sharded or main:
            checkpoint.save_optimizer(self.optimizer, directory, rank)
        checkpoint.save_rng_state(directory, rank)
        if main:
            (directory / "scheduler.json").write_text(json.dumps(self.scheduler.state_dict()))
            (directory / "config.yaml").write_text(self.config_text)
            if fault_at("enospc_in_save", self.step):
                raise OSError(errno.ENOSPC, "No space left on device (injected)")
            if fault_at("kill_in_save", self.step):
                os.kill(os.getpid(), signal.SIGKILL)
            (directory / checkpoint.STATE_FILE).write_text(json.dumps(self.trainer_state(sharded)))  # written last

    def trainer_state(self, sharded: bool) -> dict[str, object]:
        tracker = self.accelerator.get_tracker("wandb", unwrap=True) if self.accelerator.trackers else None
        return {
            "step": self.step,
            "epoch": self.step // self.steps_per_epoch,
            "world_size": self.accelerator.num_processes,
            "sharded": sharded,
            "use_peft": self.use_peft,
            "skipped_steps": self.skipped_steps,
            "throughput": self.throughput.state(),
            "summary": self.summary,
            "data_fingerprint": self.data_fingerprint,
            "wandb_run_id": getattr(tracker, "id", None),
        }

    def load_checkpoint(self, directory: Path) -> None:
        """Restore model, optimizer, scheduler, RNG and counters from a step checkpoint, on every process."""
        state = checkpoint.read_state(directory)
        model = self.accelerator.unwrap_model(self.model)
        sharded, world, rank = is_sharded(model), self.accelerator.num_processes, self.accelerator.process_index
        if state["sharded"] != sharded or (sharded and state["world_size"] != world):
            raise HalyardError(
                f"{directory} was written by {state['world_size']} process(es) {'with' if state['sharded'] else 'without'} "
                f"FSDP; resume it the same way (now {world} process(es) {'with' if sharded else 'without'} FSDP)"
            )
        if state["data_fingerprint"] != self.data_fingerprint and not self.resume_allow_config_change:
            raise HalyardError(
                f"the tokenized training data differs from the data {directory} was trained on; resuming would not "
                f"continue the same run. Restore the data, or set resume_allow_config_change=true."
            )
        if sharded:
            checkpoint.load_sharded_model(model, directory, rank)
        else:
            checkpoint.load_model_folder(model, directory / "model", adapter=self.use_peft)
        checkpoint.load_optimizer(self.optimizer, directory, rank, sharded)
        self.scheduler.load_state_dict(json.loads((directory / "scheduler.json").read_text()))
        checkpoint.load_rng_state(directory, rank % state["world_size"])
        self.step, self.skipped_steps = state["step"], state["skipped_steps"]
        self.throughput.restore(state["throughput"])
        self.summary.update(state["summary"])
        if self.accelerator.is_main_process:
            for logged in (self.metrics_path, self.run_dir / "samples.jsonl"):
                checkpoint.truncate_metrics(logged, self.step)
        logger.info(f"resumed from {directory} at step {self.step}")

    def save_final(self) -> None:
        """Write FINAL/: a Hugging Face model folder (merged, with FINAL/adapter/ under LoRA), tokenizer and config.

        Written under a temporary name and renamed when complete, so FINAL/ is never half-written.
        """
        self.accelerator.wait_for_everyone()
        model = self.accelerator.unwrap_model(self.model)
        if is_sharded(model):
            state_dict = full_state_dict(model)  # every process takes part in gathering the shards
            model = unsharded_copy(model, state_dict) if self.accelerator.is_main_process else None
        if self.accelerator.is_main_process:
            final, partial = self.run_dir / "FINAL", self.run_dir / "FINAL.partial"
            shutil.rmtree(partial, ignore_errors=True)
            if self.use_peft:
                model.save_pretrained(partial / "adapter")
                self.tokenizer.save_pretrained(partial / "adapter")
                model = model.merge_and_unload()
            model.config.use_cache = True  # for whoever generates with it
            model.save_pretrained(partial, safe_serialization=True)
            self.tokenizer.save_pretrained(partial)
            (partial / "halyard_config.yaml").write_text(self.config_text)
            if final.exists():
                shutil.rmtree(final)
            partial.rename(final)
            self.summary["final_dir"] = str(final.resolve())
            logger.info(f"saved {final.resolve()}")


class MetricSums:
    """Sums and counts of a step's (or an evaluation's) metrics, over micro-batches, then over processes."""

    def __init__(self) -> None:
        self.sums: dict[str, list[torch.Tensor]] = {}

    def add(self, metrics: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
        for name, (total, count) in metrics.items():
            pair = torch.stack([total.detach().float().sum(), torch.as_tensor(count).float().sum().to(total.device)])
            self.sums[name] = [self.sums[name][0] + pair] if name in self.sums else [pair]

    def reduce(self, accelerator: Accelerator, split: str) -> dict[str, float]:
        """Means over every process, named for the split: "rewards/chosen" -> "rewards_train/chosen"."""
        if not self.sums:
            return {}
        names = sorted(self.sums)
        totals = accelerator.reduce(torch.stack([self.sums[n][0] for n in names]), reduction="sum")
        return {_split_name(n, split): (t[0] / t[1].clamp(min=1)).item() for n, t in zip(names, totals, strict=True)}


def _split_name(name: str, split: str) -> str:
    group, _, metric = name.partition("/")
    return f"{group}_{split}/{metric}" if metric else f"{group}_{split}"


def build_optimizer(model, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters; weight decay on matrices only (biases and norm scales are not decayed)."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in trainable if p.ndim >= 2], "weight_decay": weight_decay},
        {"params": [p for p in trainable if p.ndim < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr)


@register_trainer
class SFTTrainer(BasicTrainer):
    """Supervised fine-tuning: mean NLL of the supervised (response) tokens over the whole optimizer step
    (`loss.reduction=token`), or mean over its examples of each example's mean token NLL (`sequence`)."""

    def __init__(self, cfg: Config, *args, **kwargs):
        super().__init__(cfg, *args, **kwargs)
        self.reduction = cfg.loss.reduction

    def loss_units(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return count_loss_units(batch["labels"], self.reduction, batch.get("example_ids"))

    def batch_loss(self, model, batch: dict[str, torch.Tensor]) -> LossSum:
        # The output projection runs only where a label follows (logits_to_keep): full-vocabulary logits of
        # prompt and padding positions are never computed, let alone upcast to float32.
        keep = supervised_positions(batch["labels"])
        inputs = {key: batch[key] for key in ("input_ids", "attention_mask", "position_ids") if key in batch}
        logits = model(**inputs, logits_to_keep=keep).logits
        return selected_nll_sum(logits, batch["labels"], keep, self.reduction, example_ids=batch.get("example_ids"))
