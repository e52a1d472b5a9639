"""Trainers. `BasicTrainer` owns the loop: batching, accumulation, optimizer, schedule, clipping, evaluation,
logging and saving. A subclass implements two hooks, `loss_units` and `batch_loss`; see `SFTTrainer`.

Normalization is exact: a step's loss is the sum of per-unit losses (tokens for SFT) over all its micro-batches on
all processes, divided by the number of units in that whole step. So the gradients do not depend on how the global
batch is split into micro-batches or processes.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from accelerate import Accelerator
from transformers import get_cosine_schedule_with_warmup

from train.config import Config
from train.data import Example, collate
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
from train.errors import ConfigError, DataError
from train.losses import LossSum, count_loss_units, masked_nll_sum
from train.utils import config_yaml

logger = logging.getLogger(__name__)

TRAINERS: dict[str, type[BasicTrainer]] = {}


def register_trainer(cls: type[BasicTrainer]) -> type[BasicTrainer]:
    """Make a trainer class available to `loss.trainer` in a config/loss/*.yaml file, under its class name."""
    TRAINERS[cls.__name__] = cls
    return cls


def get_trainer_class(name: str) -> type[BasicTrainer]:
    if name not in TRAINERS:
        raise ConfigError([f"loss.trainer={name!r} is not a registered trainer; valid: {sorted(TRAINERS)}"])
    return TRAINERS[name]


class BasicTrainer:
    """The training loop. Subclasses define what a loss unit is and how a micro-batch's loss sum is computed."""

    def __init__(
        self,
        cfg: Config,
        accelerator: Accelerator,
        model,
        tokenizer,
        train_examples: list[Example],
        eval_examples: list[Example],
        fsdp: FsdpSettings | None = None,
    ):
        # Read the config once into typed attributes; the loop never looks at the config again.
        self.accelerator = accelerator
        self.tokenizer = tokenizer
        self.train_examples, self.eval_examples = train_examples, eval_examples
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

        self.steps_per_epoch = len(train_examples) // self.batch_size
        if self.steps_per_epoch == 0:
            raise DataError(
                f"the training data has {len(train_examples)} examples, fewer than model.batch_size={self.batch_size}; lower the batch size or add data"
            )
        self.total_steps = self.n_epochs * self.steps_per_epoch
        if cfg.max_steps is not None:
            self.total_steps = min(self.total_steps, cfg.max_steps)
        unused = len(train_examples) - self.steps_per_epoch * self.batch_size
        if unused:
            logger.info(
                f"each epoch trains on {len(train_examples) - unused} of {len(train_examples)} examples: the last partial batch is left out (the order is reshuffled every epoch)"
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
        self.throughput = Throughput()
        self.summary: dict[str, object] = {}
        self.metrics_path = self.run_dir / "metrics.jsonl"
        if accelerator.is_main_process:
            self.metrics_path.write_text("")

    # ---- hooks for subclasses ----

    def loss_units(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """() int64: how many units (tokens, examples, pairs) the loss of this micro-batch sums over."""
        raise NotImplementedError

    def batch_loss(self, model, batch: dict[str, torch.Tensor]) -> LossSum:
        """Forward `batch` through `model`; return the loss summed over its units, and their count."""
        raise NotImplementedError

    # ---- the loop ----

    def train(self) -> None:
        world = self.accelerator.num_processes
        logger.info(
            f"training for {self.total_steps} steps ({self.steps_per_epoch} per epoch) of {self.batch_size} examples "
            f"on {world} process(es), {self.accumulation_steps} micro-batch(es) of {self.batch_size // world // self.accumulation_steps} each"
        )
        sharded = is_sharded(self.accelerator.unwrap_model(self.model))
        self.summary.update(
            num_processes=world,
            total_steps=self.total_steps,
            parallelism="fsdp2" if sharded else ("ddp" if world > 1 else "single"),
            local_parameter_fraction=local_parameter_fraction(self.model),
        )
        if self.eval_examples:
            self.log({"step": 0, **self.evaluate()})
        self.model.train()
        for step, (epoch, micro_batches) in enumerate(self.step_batches(), start=1):
            started = time.perf_counter()
            metrics = self.train_step(micro_batches)
            self.throughput.add(metrics.pop("tokens"), self.batch_size, time.perf_counter() - started)
            is_last = step == self.total_steps
            row: dict[str, float] = {"step": step}
            if step % self.log_every_steps == 0 or is_last:
                epoch_progress = epoch + (step - epoch * self.steps_per_epoch) / self.steps_per_epoch
                row.update(
                    metrics, epoch=epoch_progress, lr=self.scheduler.get_last_lr()[0], **self.throughput.report()
                )
            if self.eval_examples and (step % self.eval_every_steps == 0 or is_last):
                row.update(self.evaluate())
            if len(row) > 1:
                self.log(row)
        self.summary["tokens_per_second"] = self.throughput.tokens / max(self.throughput.seconds, 1e-9)

    def step_batches(self) -> Iterator[tuple[int, list[list[Example]]]]:
        """Yield (epoch, this process's micro-batches) for each optimizer step.

        The global batch of a step depends only on the seed, the epoch and the step: a permutation per epoch, cut into
        batches of `batch_size`. Each process takes a contiguous slice and cuts it into `accumulation_steps`
        micro-batches, so the union over processes is always the same global batch, however it is split.
        """
        rank, world = self.accelerator.process_index, self.accelerator.num_processes
        per_process = self.batch_size // world
        micro = per_process // self.accumulation_steps
        step = 0
        for epoch in range(self.n_epochs):
            order = torch.randperm(
                len(self.train_examples), generator=torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            ).tolist()
            for batch_index in range(self.steps_per_epoch):
                if step == self.total_steps:
                    return
                step += 1
                start = batch_index * self.batch_size + rank * per_process
                mine = [self.train_examples[i] for i in order[start : start + per_process]]
                yield epoch, [mine[i * micro : (i + 1) * micro] for i in range(self.accumulation_steps)]

    def train_step(self, micro_batches: list[list[Example]]) -> dict[str, float]:
        """One optimizer step over this process's micro-batches; returns the step's exact loss and gradient norm."""
        batches = [self.to_device(collate(examples, self.pad_token_id)) for examples in micro_batches]
        local_units = sum(self.loss_units(batch) for batch in batches)
        global_units = self.accelerator.reduce(local_units.to(self.accelerator.device), reduction="sum").clamp(min=1)
        loss_total = torch.zeros((), device=self.accelerator.device)
        for index, batch in enumerate(batches):
            # Gradients are all-reduced (averaged over processes) only on the last micro-batch.
            sync = index == len(batches) - 1
            with contextlib.nullcontext() if sync else no_gradient_sync(self.accelerator, self.model):
                loss_sum = self.batch_loss(self.model, batch)
                # DDP averages gradients over processes, so scale by their number to get sum / global_units.
                self.accelerator.backward(loss_sum.total * self.accelerator.num_processes / global_units)
            loss_total += loss_sum.total.detach()
        grad_norm = clip_gradients(self.accelerator, self.model, self.max_grad_norm or math.inf)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        tokens = sum(batch["attention_mask"].sum() for batch in batches)
        totals = self.accelerator.reduce(torch.stack([loss_total, tokens.to(loss_total)]), reduction="sum")
        return {
            "loss/train": (totals[0] / global_units).item(),
            "grad_norm": float(grad_norm),
            "tokens": int(totals[1]),
        }

    def to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {key: value.to(self.accelerator.device) for key, value in batch.items()}

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
        for start in range(0, len(self.eval_examples), self.eval_batch_size):
            mine = self.eval_examples[start + rank * micro : start + (rank + 1) * micro]
            loss_sum = self.batch_loss(
                model, self.to_device(collate(mine or self.eval_examples[:1], self.pad_token_id))
            )
            if mine:
                sums += torch.stack([loss_sum.total.float(), loss_sum.count.float()])
        self.model.train()
        sums = self.accelerator.reduce(sums, reduction="sum")
        return {"loss/eval": (sums[0] / sums[1].clamp(min=1)).item()}

    def log(self, metrics: dict[str, float]) -> None:
        """Append to metrics.jsonl, send to the enabled trackers, and print a line (main process only)."""
        if not self.accelerator.is_main_process:
            return
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(metrics) + "\n")
        self.accelerator.log({k: v for k, v in metrics.items() if k != "step"}, step=metrics["step"])
        self.summary.update({k: v for k, v in metrics.items() if k not in ("lr", "grad_norm", "epoch")})
        logger.info("  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items()))

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
        self.accelerator.end_training()


class Throughput:
    """Counts examples and real (non-padding) tokens, and the seconds spent in training steps (not in evaluation).

    `report()` gives running totals and the tokens per second since the previous report.
    """

    def __init__(self) -> None:
        self.examples = self.tokens = 0
        self.seconds = 0.0
        self.window_tokens, self.window_seconds = 0, 0.0

    def add(self, tokens: int, examples: int, seconds: float) -> None:
        self.examples += examples
        self.tokens += tokens
        self.seconds += seconds
        self.window_tokens += tokens
        self.window_seconds += seconds

    def report(self) -> dict[str, float]:
        rate = self.window_tokens / self.window_seconds if self.window_seconds else 0.0
        self.window_tokens, self.window_seconds = 0, 0.0
        return {
            "examples": self.examples,
            "tokens": self.tokens,
            "tokens_per_second": rate,
            "train_seconds": self.seconds,
        }


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
        return count_loss_units(batch["labels"], self.reduction)

    def batch_loss(self, model, batch: dict[str, torch.Tensor]) -> LossSum:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return masked_nll_sum(logits, batch["labels"], self.reduction)
