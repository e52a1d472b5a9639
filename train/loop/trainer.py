"""Trainers. `BasicTrainer` owns the loop: accumulation, the optimizer step, clipping, evaluation and logging.
A loss is a subclass that implements two hooks, `loss_units` and `batch_loss`; see `SFTTrainer`
(train/objectives/sft.py), and the paired preference trainers in train/objectives/preference.py, where a loss
implements only `loss`. The trainer gets its parts built (LoopSettings, TrainerParts: train/app/assemble.py) and reads
no config.

Normalization is exact: a step's loss is the sum of per-unit losses (tokens for SFT) over all its micro-batches on
all processes, divided by the number of units in that whole step. So the gradients do not depend on how the global
batch is split into micro-batches or processes.

What is not the loop lives beside it: which examples each step trains on (train/batching/plan.py), checkpoints and the
run directory's files (train/loop/checkpoint.py), the optimizer and schedule (train/loop/optim.py), generated samples
(train/loop/samples.py).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator

from train.app.config import LossConfig
from train.batching.collate import Batch, collate_batch
from train.batching.layout import Layout
from train.batching.plan import BatchPlan, StepBatches, step_loader
from train.data.store import PackedStore, TokenStore
from train.errors import HalyardError
from train.loop import checkpoint
from train.loop.benchmarks import HARNESS_VERSION, BenchmarkSettings, evaluate_tasks, is_benchmark_metric
from train.loop.card import CardInfo
from train.loop.card import render as render_card
from train.loop.distributed import (
    clip_gradients,
    is_sharded,
    local_parameter_fraction,
    no_gradient_sync,
)
from train.loop.faults import StopRequest, TrainingStopped, fault_at
from train.loop.profile import StepProfiler, phase
from train.loop.progress import Progress
from train.loop.samples import SampleRewards, write_samples
from train.loop.throughput import Throughput, Work, peak_memory, trained_work
from train.objectives.losses import LossSum, supervised_positions

logger = logging.getLogger(__name__)

MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids")  # the batch keys the model's forward takes


@dataclass
class StepResult:
    """One optimizer step, all-reduced over processes."""

    loss: float  # the step's exact loss: the sum of its unit losses over the number of units
    grad_norm: float  # before clipping
    metrics: dict[str, float]  # the loss's own metrics, e.g. "rewards_train/chosen"
    work: Work  # what the step's passes ran on, for Throughput
    stop_requested: bool  # a process got SIGTERM or SIGINT


@dataclass(frozen=True)
class LoopSettings:
    """What the loop needs to know besides its parts, read once from the config (train/app/assemble.py)."""

    run_dir: Path  # where metrics.jsonl, samples.jsonl, step checkpoints and FINAL/ go
    config_text: str  # the resolved config, saved beside every checkpoint and in FINAL/
    eval_every_steps: int
    log_every_steps: int
    eval_batch_size: int  # global, in examples
    max_grad_norm: float | None  # None: no clipping
    on_nonfinite: str  # "stop" or "skip"
    num_workers: int  # data loader processes per training process
    eval_samples: int  # held-out prompts answered at each evaluation
    eval_samples_max_new_tokens: int
    save_every_steps: int | None
    save_total_limit: int | None
    resume_allow_config_change: bool
    use_peft: bool
    save_merged: str  # what FINAL/ holds under LoRA: "adapter", "merged" or "both"
    save_dtype: torch.dtype  # FINAL/'s weights
    card: CardInfo  # what the model card says about the run
    verbose: bool = False
    benchmarks: BenchmarkSettings | None = None  # lm-evaluation-harness tasks on the live model; None: none
    benchmarks_every_steps: int | None = None  # also before training and every this many steps; None: final only
    profile_steps: int = 0  # steps timed phase by phase from step 2 (train/loop/profile.py); 0: none
    head_loss: str = "logits"  # model.head_loss: "logits" or "fused" (a trainer with supports_fused_head reads it)


@dataclass
class TrainerParts:
    """What the loop runs on, built before it starts (train/app/assemble.py)."""

    model: torch.nn.Module  # prepared for the process layout: wrapped (DDP) or sharded (FSDP2)
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    tokenizer: object
    train_data: TokenStore | PackedStore
    eval_data: TokenStore | None
    batch_plan: BatchPlan  # which items each process trains on at each step
    total_steps: int
    throughput: Throughput
    summary: dict[str, object] = field(default_factory=dict)  # facts of the build for summary.json (the peak FLOP/s)
    sample_rewards: SampleRewards | None = None  # eval_reward_model: scores eval_samples (main process only)


def forward_supervised(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's logits at the positions whose next token is supervised, and those positions.

    Returns (n_kept, vocab) logits in the model's dtype and the (batch, seq) bool mask `keep`. The output
    projection runs only there (logits_to_keep): full-vocabulary logits of prompt and padding positions are never
    computed, let alone upcast to float32. Feed both to `selected_nll_sum` or `selected_sequence_logps`.
    """
    keep = supervised_positions(batch["labels"])
    inputs = {key: batch[key] for key in MODEL_INPUTS if key in batch}
    with phase("forward"):
        return model(**inputs, logits_to_keep=keep).logits, keep


def forward_supervised_hidden(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The final hidden states (after the final norm) at the positions whose next token is supervised, and those
    positions: what `fused_selected_nll_sum` takes instead of logits.

    Returns (n_kept, hidden) and the (batch, seq) bool mask `keep`. `model` is called as it is, wrapper included:
    DDP's gradient sync hooks need its forward to run. An all-false `logits_to_keep` makes the head run on no
    position, and with `output_hidden_states` transformers puts the final norm's output last (tie_last_hidden_states).
    """
    keep = supervised_positions(batch["labels"])
    inputs = {key: batch[key] for key in MODEL_INPUTS if key in batch}
    with phase("forward"):
        outputs = model(**inputs, logits_to_keep=torch.zeros_like(keep), output_hidden_states=True)
        return outputs.hidden_states[-1][keep], keep


def output_head(model: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The (vocab, hidden) weight and (vocab,) bias or None of the model's output head (tied or not).

    `model`: unwrapped from DDP (accelerator.unwrap_model), maybe a PEFT model, whose get_output_embeddings reaches
    the base model's head; a head PEFT trains whole (modules_to_save) answers with its trained copy's weight.
    Raises HalyardError where the weight alone is not the head: LoRA on the head, a quantized or soft-capped head.
    """
    config = getattr(model, "config", None)
    head = model.get_output_embeddings()
    weight = getattr(head, "weight", None)
    problem = None
    if head is None or weight is None:
        problem = f"the model ({type(model).__name__}) has no output embeddings with a weight"
    elif hasattr(head, "lora_A"):
        problem = "LoRA adapts the output head (model.peft.target_modules names it): its weight is not the head"
    elif not weight.is_floating_point():
        problem = f"the output head is quantized ({weight.dtype})"
    elif getattr(config, "final_logit_softcapping", None):
        problem = f"the model soft-caps its logits (final_logit_softcapping={config.final_logit_softcapping})"
    elif getattr(config, "tie_last_hidden_states", True) is False:
        problem = "the model's last hidden state is not its final norm's output (tie_last_hidden_states=false)"
    if problem:
        raise HalyardError(f"model.head_loss=fused: {problem}; set model.head_loss=logits")
    return weight, getattr(head, "bias", None)


def batch_unit(train_data: TokenStore | PackedStore, example_unit: str) -> str:
    """What model.batch_size counts: packed rows, or the loss's examples (pairs for paired losses)."""
    return "packed rows" if train_data.layout is Layout.PACKED else example_unit


class BasicTrainer:
    """The training loop. Subclasses define what a loss unit is and how a micro-batch's loss sum is computed.

    A subclass is a loss: `loss.trainer` in its config/loss/<name>.yaml names it by import path, and these class
    attributes say what validation needs to know before anything loads.
    """

    settings_class: type[LossConfig] = LossConfig  # the dataclass of its `loss.*` settings; `self.settings` is one
    data_kind = "sft"  # its rows: "sft" (conversations, text), "text", "paired" or "unpaired" (train/data/formats.py)
    supports_packing = False  # whether its batches may be packed rows (data.packing=true)
    supports_shared_prompt = False  # whether a pair's prompt may run once (data.shared_prompt=true)
    uses_reference = False  # whether it holds a frozen reference model (train/objectives/reference.py)
    supports_reference_precompute = False  # whether reference.precompute=true can replace that model
    model_head = "lm"  # "lm": a causal LM; "score": a sequence classifier with one output (a reward model)
    supports_fused_head = False  # whether its loss can run model.head_loss=fused (hidden states in, token NLLs out)
    pairs_across_step = False  # collate(examples, successors): each example's successor in the global batch too
    example_unit = "examples"  # what one item of the training data is called in the log, metrics and summary
    rows_per_example = 1  # sequences a collated item holds in a micro-batch (a pair: chosen and rejected)

    def __init__(
        self, settings: LoopSettings, loss_settings: LossConfig, accelerator: Accelerator, parts: TrainerParts
    ):
        self.loop = settings
        self.settings = loss_settings  # an instance of settings_class, validated
        self.accelerator = accelerator
        self.model, self.optimizer, self.scheduler = parts.model, parts.optimizer, parts.scheduler
        self.tokenizer, self.pad_token_id = parts.tokenizer, parts.tokenizer.pad_token_id
        self.train_data, self.eval_data = parts.train_data, parts.eval_data
        self.batch_plan, self.total_steps, self.throughput = parts.batch_plan, parts.total_steps, parts.throughput
        self.sample_rewards = parts.sample_rewards
        self.summary: dict[str, object] = dict(parts.summary)
        self.data_fingerprint = self.train_data.fingerprint()  # from cache keys and the selection: no token is read
        self.step = 0  # optimizer steps completed
        self.skipped_steps = 0
        self.stop_request = StopRequest()

    @property
    def metrics_path(self) -> Path:
        return self.loop.run_dir / checkpoint.METRICS_FILE

    # ---- hooks for subclasses ----

    # A micro-batch, as `collate` makes it and the hooks receive it (on the training device):
    #   input_ids       (rows, seq) int64, padded with the tokenizer's pad token
    #   labels          (rows, seq) int64: the token id where supervised, -100 elsewhere (prompt, padding)
    #   attention_mask  (rows, seq) int64, 1 on real tokens (absent from packed rows)
    #   position_ids    (rows, seq) int64, restarting at 0 for each example (packed rows only)
    #   example_ids     (rows, seq) int64, which example of the micro-batch each token belongs to (packed rows only)
    # Preference trainers add their own keys (train/objectives/preference.py).

    def loss_units(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """() int64: how many units (tokens, examples, pairs) the loss of this micro-batch sums over. The step's loss
        is divided by the sum of this over every micro-batch of every process."""
        raise NotImplementedError

    def batch_loss(self, model, batch: dict[str, torch.Tensor]) -> LossSum:
        """Forward `batch` through `model`; return the loss summed (not averaged) over its units, their count, and
        metric sums: name -> (sum, count), averaged over the whole step."""
        raise NotImplementedError

    def batch_work(self, batch: dict[str, torch.Tensor]) -> Work:
        """What a training step's passes over `batch` (collated, on the CPU) run on, for MFU: here the policy's forward
        and backward over every sequence. A trainer that runs other passes (a reference model, a forward without
        gradients) says so by overriding this."""
        return trained_work(batch)

    def before_step(self, batches: list[dict[str, torch.Tensor]]) -> None:
        """Called with all of this process's micro-batches of a step before any of their losses: a loss whose
        terms depend on the whole step (KTO's KL reference point) computes that here, on every process."""

    def collate(self, examples: list, layout: Layout) -> Batch:
        """Tensors of one micro-batch in the batch layout of the data the examples come from (padded to its longest
        example, or packed rows), on the CPU. Runs in a data loader worker."""
        return collate_batch(examples, layout, self.pad_token_id)

    # ---- the loop ----

    def train(self) -> None:
        """Train from `self.step` (0, or where a checkpoint left off) to `total_steps`.

        Raises TrainingStopped after writing a checkpoint if SIGTERM or SIGINT arrived.
        """
        world = self.accelerator.num_processes
        logger.info(
            f"training for {self.total_steps} steps ({self.batch_plan.steps_per_epoch} per epoch) of {self.batch_plan.batch_size} "
            f"{batch_unit(self.train_data, self.example_unit)} "
            f"on {world} process(es), {self.batch_plan.accumulation_steps} micro-batch(es) of "
            f"{self.batch_plan.micro_batch_size} each"
            + (
                f" (passes of at most {self.batch_plan.micro_batch_tokens} tokens)"
                if self.batch_plan.micro_batch_tokens
                else ""
            )
            + (f", from step {self.step}" if self.step else "")
        )
        sharded = is_sharded(self.accelerator.unwrap_model(self.model))
        self.summary.update(
            num_processes=world,
            total_steps=self.total_steps,
            parallelism="fsdp2" if sharded else ("ddp" if world > 1 else "single"),
            local_parameter_fraction=local_parameter_fraction(self.model),
        )
        self.progress = Progress(
            self.total_steps, self.step, self.accelerator.is_main_process, verbose=self.loop.verbose
        )
        if self.step == 0:
            if self.accelerator.is_main_process:
                self.metrics_path.write_text("")
                (self.loop.run_dir / checkpoint.SAMPLES_FILE).unlink(missing_ok=True)
            row = self.run_evaluation() if self.eval_data else {}
            if self.loop.benchmarks and self.loop.benchmarks_every_steps:
                row.update(self.run_benchmarks())
            if row:
                self.log({"step": 0, **row})
        self.model.train()
        profiler = StepProfiler(
            self.loop.profile_steps, self.total_steps, self.loop.run_dir, self.accelerator.device,
            self.accelerator.is_main_process,
        ) if self.loop.profile_steps else None  # fmt: skip
        with self.stop_request.installed(), contextlib.closing(self.progress), _closing(profiler):
            waiting_since = time.perf_counter()
            for epoch, micro_batches in self.step_batches(start_step=self.step):
                self.step += 1
                if profiler:
                    profiler.begin_step(self.step, data_seconds=time.perf_counter() - waiting_since)
                stop = self.train_and_log_step(epoch, micro_batches)
                if stop or self.checkpoint_due():
                    self.save_checkpoint()
                if stop:
                    raise TrainingStopped(self.stop_request.signal_name or "a signal", self.step)
                if profiler and (medians := profiler.end_step(self.step)):
                    self.summary["profile"] = medians
                waiting_since = time.perf_counter()
        seconds = max(self.throughput.seconds, 1e-9)
        self.summary["tokens_per_second"] = self.throughput.tokens / seconds
        self.summary["supervised_tokens_per_second"] = self.throughput.supervised_tokens / seconds
        self.summary["skipped_nonfinite_steps"] = self.skipped_steps
        self.summary.update(peak_memory())

    def checkpoint_due(self) -> bool:
        # The last step needs none: FINAL/ follows it.
        every = self.loop.save_every_steps
        return bool(every) and self.step % every == 0 and self.step < self.total_steps

    def train_and_log_step(self, epoch: int, micro_batches: list[dict[str, torch.Tensor]]) -> bool:
        """Run one optimizer step, then log and evaluate when due. Returns whether any process was asked to stop."""
        started = time.perf_counter()
        result = self.train_step(micro_batches)
        self.throughput.add(result.work, time.perf_counter() - started)
        stop = result.stop_requested
        is_last = self.step == self.total_steps
        row: dict[str, float] = {"step": self.step}
        if self.step % self.loop.log_every_steps == 0 or is_last or stop:
            epoch_progress = (
                epoch + (self.step - epoch * self.batch_plan.steps_per_epoch) / self.batch_plan.steps_per_epoch
            )
            row.update({"loss/train": result.loss, **result.metrics, "grad_norm": result.grad_norm})
            row.update(epoch=epoch_progress, lr=self.scheduler.get_last_lr()[0], **self.throughput.report())
        if self.eval_data and (self.step % self.loop.eval_every_steps == 0 or is_last):
            row.update(self.run_evaluation())
        if self.benchmarks_due(is_last):
            row.update(self.run_benchmarks())
        with phase("log"):
            if len(row) > 1:
                self.log(row)
            self.progress.advance(self.step, row)
        return stop

    def benchmarks_due(self, is_last: bool) -> bool:
        every = self.loop.benchmarks_every_steps
        return self.loop.benchmarks is not None and (is_last or bool(every) and self.step % every == 0)

    def run_benchmarks(self) -> dict[str, float]:
        """The benchmark metrics of the live model (bench/<task>/<metric> and _stderr), every process in lock-step
        (train/loop/benchmarks.py); what the model card says about them goes into the summary."""
        started = time.perf_counter()
        settings = self.loop.benchmarks
        results = evaluate_tasks(self.accelerator.unwrap_model(self.model), self.tokenizer, settings, self.accelerator)
        self.summary["benchmarks"] = {
            "harness": f"lm-eval {HARNESS_VERSION}",
            "num_fewshot": results.num_fewshot,
            "examples": results.samples,
            "limit_per_task": settings.limit,
            "seed": settings.seed,
            "apply_chat_template": settings.apply_chat_template,
        }
        logger.info(
            f"benchmarks at step {self.step}: {len(settings.tasks)} task(s) in {time.perf_counter() - started:.1f} s"
        )
        return results.metrics

    def step_batches(self, start_step: int = 0):
        """(epoch, this process's collated micro-batches) for each optimizer step after `start_step`, prepared ahead
        by data loader workers; which examples they hold is `self.batch_plan`'s (see train/batching/plan.py)."""
        batches = StepBatches(
            self.batch_plan, self.train_data, self.collate, start_step, self.total_steps, self.pairs_across_step
        )
        return step_loader(batches, self.loop.num_workers, pin_memory=self.accelerator.device.type == "cuda")

    def train_step(self, on_cpu: list[dict[str, torch.Tensor]]) -> StepResult:
        """One optimizer step over this process's micro-batches.

        Returns the step's exact loss, gradient norm, real token count and whether any process must stop. A step
        whose loss or gradient is not finite is never applied (on_nonfinite=stop raises, skip counts it).
        """
        work = sum(map(self.batch_work, on_cpu), Work())  # counted before the copy to the device: no device syncs
        with phase("to_device"):
            batches = [self.to_device(batch) for batch in on_cpu]
        self.before_step(batches)
        with phase("reduce"):
            local_units = sum(self.loss_units(batch) for batch in batches)
            global_units = self.accelerator.reduce(local_units.to(self.accelerator.device), reduction="sum")
            global_units = global_units.clamp(min=1)
        loss_total = torch.zeros((), device=self.accelerator.device)
        metric_sums = MetricSums()
        for index, batch in enumerate(batches):
            # Gradients are all-reduced (averaged over processes) only on the last micro-batch.
            sync = index == len(batches) - 1
            with contextlib.nullcontext() if sync else no_gradient_sync(self.accelerator, self.model):
                with phase("loss"):  # the model's forward inside it is its own phase
                    loss_sum = self.batch_loss(self.model, batch)
                if fault_at("nan_loss", self.step):
                    loss_sum.total = loss_sum.total * float("nan")
                # DDP averages gradients over processes, so scale by their number to get sum / global_units.
                with phase("backward"):
                    self.accelerator.backward(loss_sum.total * self.accelerator.num_processes / global_units)
            loss_total += loss_sum.total.detach()
            metric_sums.add(loss_sum.metrics)
        self.stop_request.inject_faults(self.step)
        with phase("reduce"):
            counts = work.as_tensor().to(loss_total)
            stop_flag = torch.tensor(float(self.stop_request.requested), device=loss_total.device)
            totals = torch.cat([torch.stack([loss_total, stop_flag]), counts])
            totals = self.accelerator.reduce(totals, reduction="sum")
            loss = (totals[0] / global_units).item()
            metrics = metric_sums.reduce(self.accelerator, "train")
        with phase("clip"):
            grad_norm = clip_gradients(self.accelerator, self.model, self.loop.max_grad_norm or math.inf)
        with phase("optimizer"):
            if math.isfinite(loss) and math.isfinite(grad_norm):
                self.optimizer.step()
            else:
                self.handle_nonfinite(loss, grad_norm)
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
        work = Work.from_tensor(totals[2:])
        return StepResult(loss, grad_norm, metrics, work=work, stop_requested=bool(totals[1] > 0))

    def handle_nonfinite(self, loss: float, grad_norm: float) -> None:
        what = f"step {self.step}: the loss ({loss}) or the gradient norm ({grad_norm}) is not finite"
        if self.loop.on_nonfinite == "stop":
            latest = checkpoint.find_latest(self.loop.run_dir)
            kept = f"the newest checkpoint ({latest.name}) is untouched" if latest else "no checkpoint was written"
            raise HalyardError(
                f"{what}; stopped without applying it, and {kept}. Lower lr or max_grad_norm, inspect this step's "
                f"data, or set on_nonfinite=skip to skip such steps."
            )
        self.skipped_steps += 1
        logger.warning(f"{what}; skipped (no update). {self.skipped_steps} step(s) skipped so far.")

    def to_device(self, batch: Batch) -> Batch:
        return batch.to(self.accelerator.device)

    def run_evaluation(self) -> dict[str, float]:
        """The evaluation metrics, and generated samples when eval_samples > 0 (with their mean reward under
        eval_reward_model)."""
        metrics = self.evaluate()
        if self.loop.eval_samples:
            metrics |= write_samples(
                self.accelerator, self.model, self.tokenizer, self.eval_data, self.loop.eval_samples,
                self.loop.eval_samples_max_new_tokens, self.step, self.loop.run_dir / checkpoint.SAMPLES_FILE,
                rewards=self.sample_rewards,
            )  # fmt: skip
        return metrics

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Loss over every evaluation example, exact over processes.

        Each global eval batch is split over the processes; all processes run the same number of forward passes
        (one with no examples left runs a discarded one), because a sharded model communicates in its forward.
        """
        model = self.accelerator.unwrap_model(self.model)
        model.eval()
        rank, world = self.accelerator.process_index, self.accelerator.num_processes
        micro = self.loop.eval_batch_size // world
        sums = torch.zeros(2, device=self.accelerator.device)
        metric_sums = MetricSums()
        for start in range(0, len(self.eval_data), self.loop.eval_batch_size):
            mine = self.eval_data[start + rank * micro : start + (rank + 1) * micro]
            batch = self.collate(mine or self.eval_data[:1], self.eval_data.layout)
            loss_sum = self.batch_loss(model, self.to_device(batch))
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
        if metrics["step"] == 0 and "loss/eval" in metrics:
            self.summary["loss/eval_before_training"] = metrics["loss/eval"]
        if metrics["step"] == 0 and any(map(is_benchmark_metric, metrics)):
            self.summary["benchmarks_before_training"] = {k: v for k, v in metrics.items() if is_benchmark_metric(k)}
        self.progress.show(metrics)

    # ---- checkpoints (train/loop/checkpoint.py writes and reads them) ----

    def parts(self) -> checkpoint.TrainingParts:
        return checkpoint.TrainingParts(self.model, self.optimizer, self.scheduler, self.tokenizer)

    def save_checkpoint(self) -> None:
        """Write ${run_dir}/step-<N>/ atomically; every process takes part."""
        tracker = self.accelerator.get_tracker("wandb", unwrap=True) if self.accelerator.trackers else None
        state = checkpoint.TrainerState(
            step=self.step,
            epoch=self.step // self.batch_plan.steps_per_epoch,
            world_size=self.accelerator.num_processes,
            sharded=is_sharded(self.accelerator.unwrap_model(self.model)),
            use_peft=self.loop.use_peft,
            skipped_steps=self.skipped_steps,
            throughput=self.throughput.state(),
            summary=self.summary,
            data_fingerprint=self.data_fingerprint,
            wandb_run_id=getattr(tracker, "id", None),
        )
        checkpoint.save_checkpoint(
            self.accelerator, self.parts(), state, self.loop.run_dir, self.loop.config_text, self.loop.save_total_limit
        )

    def load_checkpoint(self, directory: Path) -> None:
        """Continue from a step checkpoint: weights, optimizer, schedule, RNG and counters, on every process."""
        state = checkpoint.load_checkpoint(
            directory,
            self.loop.run_dir,
            self.accelerator,
            self.parts(),
            self.data_fingerprint,
            self.loop.resume_allow_config_change,
        )
        self.step, self.skipped_steps = state.step, state.skipped_steps
        self.throughput.restore(state.throughput)
        self.summary.update(state.summary)

    def save_final(self) -> None:
        """Write FINAL/ (under LoRA: the adapter, the merged model or both, see save_merged) with its model card,
        never half-written; every process takes part."""
        card = render_card(
            self.loop.card, self.summary, adapter_only=self.loop.use_peft and self.loop.save_merged == "adapter"
        )
        final = checkpoint.save_final(
            self.accelerator, self.model, self.tokenizer, self.loop.run_dir, self.loop.config_text, self.loop.use_peft,
            save_merged=self.loop.save_merged, card=card, dtype=self.loop.save_dtype,
        )  # fmt: skip
        if final is not None:
            self.summary["final_dir"] = str(final.resolve())


def _closing(profiler: StepProfiler | None):
    return contextlib.closing(profiler) if profiler else contextlib.nullcontext()


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
