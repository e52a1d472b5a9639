"""The trainer's parts, built from the validated config and handed over typed (train/loop/trainer.py: LoopSettings,
TrainerParts): the loop's settings, the model prepared for this process layout with its optimizer and schedule, the
batch plan and the number of steps, the throughput meter. The trainer reads no config."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from accelerate import Accelerator

from train.app.config import Config
from train.app.models import TORCH_DTYPES, resolve_save_dtype, verify_packing_isolation
from train.app.serialize import config_yaml
from train.batching.layout import Layout
from train.batching.plan import AUTO_TOKEN_HEADROOM, BatchPlan, auto_micro_batch_tokens
from train.data.store import PackedStore, TokenStore, packed_row_tokens
from train.errors import DataError, HalyardError
from train.loop import checkpoint
from train.loop.benchmarks import BenchmarkSettings
from train.loop.card import CardInfo
from train.loop.distributed import FsdpSettings, shard_model
from train.loop.optim import build_optimizer, build_scheduler, warmup_steps_of
from train.loop.samples import SampleRewards, load_reward_model, sample_prompts
from train.loop.throughput import Throughput, model_flops, peak_flops_per_second
from train.loop.trainer import BasicTrainer, LoopSettings, TrainerParts, batch_unit

logger = logging.getLogger(__name__)

UNSHARDABLE_OPTIMIZERS = ("adafactor", "adamw_8bit")  # factored or quantized state: not sharded like the weights


def loop_settings(cfg: Config, trainer_class: type[BasicTrainer], *, total_steps: int) -> LoopSettings:
    save_merged = cfg.save_merged
    if trainer_class.model_head == "score" and cfg.model.use_peft and save_merged == "adapter":
        save_merged = "both"  # a reward model is used merged (scripts/score.py, AutoModelFor...Classification)
    return LoopSettings(
        run_dir=Path(cfg.run_dir),
        config_text=config_yaml(cfg),
        eval_every_steps=cfg.eval_every_steps,
        log_every_steps=log_every_steps_of(total_steps, cfg.log_every_steps),
        eval_batch_size=cfg.model.eval_batch_size,
        max_grad_norm=cfg.model.max_grad_norm,
        on_nonfinite=cfg.on_nonfinite,
        num_workers=cfg.data.num_workers,
        eval_samples=cfg.eval_samples,
        eval_samples_max_new_tokens=cfg.eval_samples_max_new_tokens,
        save_every_steps=cfg.save_every_steps,
        save_total_limit=cfg.save_total_limit,
        resume_allow_config_change=cfg.resume_allow_config_change,
        use_peft=cfg.model.use_peft,
        save_merged=save_merged,
        save_dtype=TORCH_DTYPES[resolve_save_dtype(cfg.save_dtype, cfg.model)[0]],
        card=CardInfo.from_config(cfg),
        verbose=cfg.verbose,
        benchmarks=BenchmarkSettings.from_config(cfg.benchmarks, cfg.seed) if cfg.benchmarks.tasks else None,
        benchmarks_every_steps=cfg.benchmarks.every_steps,
        profile_steps=cfg.profile_steps,
        head_loss=cfg.model.head_loss,
    )


LOG_LINES_PER_RUN = 50  # log_every_steps=null: enough points for a curve, however long the run


def log_every_steps_of(total_steps: int, log_every_steps: int | None) -> int:
    """log_every_steps, or where it is null the interval that writes about LOG_LINES_PER_RUN metrics lines over
    `total_steps` optimizer steps (every step for runs shorter than 100 steps)."""
    if log_every_steps is not None:
        return log_every_steps
    chosen = max(1, total_steps // LOG_LINES_PER_RUN)
    logger.info(f"log_every_steps=null: a metrics line every {chosen} step(s) of {total_steps}")
    return chosen


def total_steps_of(cfg: Config, steps_per_epoch: int) -> int:
    """The run's optimizer steps: n_epochs epochs, at most max_steps."""
    total_steps = cfg.n_epochs * steps_per_epoch
    return total_steps if cfg.max_steps is None else min(total_steps, cfg.max_steps)


def trainer_parts(
    trainer_class: type[BasicTrainer],
    cfg: Config,
    accelerator: Accelerator,
    model,
    tokenizer,
    train_data: TokenStore | PackedStore,
    eval_data: TokenStore | None,
    fsdp: FsdpSettings | None,
) -> TrainerParts:
    plan = batch_plan(cfg, accelerator, train_data, trainer_class)
    total_steps = total_steps_of(cfg, plan.steps_per_epoch)
    model, optimizer = prepare_model(model, fsdp, cfg, accelerator)
    warmup_steps = warmup_steps_of(total_steps, warmup_steps=cfg.warmup_steps, warmup_ratio=cfg.warmup_ratio)
    scheduler = build_scheduler(
        optimizer,
        total_steps,
        name=cfg.lr_scheduler,
        warmup_steps=warmup_steps,
        min_lr_ratio=cfg.min_lr_ratio,
        decay_ratio=cfg.lr_decay_ratio,
    )
    logger.info(
        f"optimizer {cfg.optimizer.name}, lr {cfg.lr:g}, {cfg.lr_scheduler} schedule, {warmup_steps} warmup step(s)"
    )
    throughput, peak = throughput_meter(cfg, accelerator, accelerator.unwrap_model(model), trainer_class)
    if train_data.layout is Layout.PACKED:
        verify_packing_isolation(accelerator.unwrap_model(model), cfg.model.attn_implementation)
    if cfg.save_every_steps and accelerator.is_main_process:
        checkpoint.check_disk_space(Path(cfg.run_dir), model)
    rewards = sample_rewards(cfg, accelerator, tokenizer, eval_data, trainer_class.data_kind)
    return TrainerParts(
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        tokenizer=tokenizer,
        train_data=train_data,
        eval_data=eval_data,
        batch_plan=plan,
        total_steps=total_steps,
        throughput=throughput,
        summary={
            "peak_flops_per_second": peak.flops_per_second,
            "peak_flops_source": peak.source,
            "micro_batch_tokens": plan.micro_batch_tokens,
        },
        sample_rewards=rewards,
    )


def sample_rewards(
    cfg: Config, accelerator: Accelerator, tokenizer, eval_data: TokenStore | None, kind: str
) -> SampleRewards | None:
    """eval_reward_model loaded once, frozen, on the training device, with the messages of the prompts it will score;
    on the main process only, which writes samples.jsonl (validation made sure eval_samples and eval_datasets are
    set)."""
    if cfg.eval_reward_model is None or eval_data is None or not accelerator.is_main_process:
        return None
    model, reward_tokenizer = load_reward_model(cfg.eval_reward_model, accelerator.device)
    prompts = sample_prompts(
        cfg.eval_datasets,
        cfg.eval_samples,
        tokenizer=tokenizer,
        settings=cfg.data,
        max_length=cfg.model.max_length,
        kind=kind,
        eval_data=eval_data,
    )
    logger.info(f"eval_reward_model: {cfg.eval_reward_model} scores the {len(prompts)} eval samples (samples/reward)")
    return SampleRewards(model, reward_tokenizer, prompts, cfg.model.max_length, cfg.model.eval_batch_size)


def batch_plan(
    cfg: Config, accelerator: Accelerator, train_data: TokenStore | PackedStore, trainer_class: type[BasicTrainer]
) -> BatchPlan:
    """Which items each process trains on at each step; refuses data too small for one batch."""
    plan = BatchPlan(
        n_items=len(train_data),
        batch_size=cfg.model.batch_size,
        n_processes=accelerator.num_processes,
        rank=accelerator.process_index,
        accumulation_steps=cfg.model.gradient_accumulation_steps,
        seed=cfg.seed,
        lengths=train_data.lengths() if cfg.data.group_by_length else None,
        item_tokens=train_data.lengths(),
    )
    packed = train_data.layout is Layout.PACKED
    unit = batch_unit(train_data, trainer_class.example_unit)
    logger.info(batching_choice(packed, cfg.data.group_by_length))
    if plan.steps_per_epoch:
        budget = cfg.model.micro_batch_tokens or auto_micro_batch_tokens(train_data.lengths(), plan.micro_batch_size)
        plan = dataclasses.replace(plan, micro_batch_tokens=budget)
        logger.info(token_budget_line(plan, cfg.model.micro_batch_tokens is None, unit))
    if plan.steps_per_epoch == 0:
        what = f"has {len(train_data)} {trainer_class.example_unit}"
        if packed:
            slots = packed_row_tokens(train_data.kind, cfg.model.max_length)
            what = (
                f"packs into {len(train_data)} rows ({len(train_data.members)} {trainer_class.example_unit} in rows "
                f"of up to {slots} tokens, from model.max_length={cfg.model.max_length})"
            )
        raise DataError(
            f"the training data {what}, fewer than model.batch_size={cfg.model.batch_size} {unit}; "
            f"lower the batch size or add data"
        )
    unused = len(train_data) - plan.steps_per_epoch * plan.batch_size
    if unused:
        logger.info(
            f"each epoch trains on {len(train_data) - unused} of {len(train_data)} {unit}: the last partial batch is "
            f"left out (the order is reshuffled every epoch)"
        )
    return plan


SPLIT_SURVEY_STEPS = 1000  # the start-up log counts split micro-batches over at most this many steps


def token_budget_line(plan: BatchPlan, auto: bool, unit: str) -> str:
    """What the log says about model.micro_batch_tokens: the budget, why, and how often it splits a micro-batch."""
    surveyed = min(plan.steps_per_epoch, SPLIT_SURVEY_STEPS)
    extra = [plan.passes_per_step(step) - plan.accumulation_steps for step in range(surveyed)]
    mean_tokens = float(plan.item_tokens.mean())
    why = (
        f"model.micro_batch_tokens=null: {plan.micro_batch_size} {unit} x {mean_tokens:.0f} tokens on average, "
        f"+{AUTO_TOKEN_HEADROOM - 1:.0%}"
        if auto
        else "model.micro_batch_tokens"
    )
    return (
        f"forward passes of at most {plan.micro_batch_tokens} tokens, padding included ({why}); "
        f"{sum(1 for e in extra if e)} of the first {surveyed} steps run longer micro-batches as "
        f"{sum(extra)} extra pass(es) in all (same examples, same gradient, less memory)"
    )


def batching_choice(packed: bool, grouped: bool) -> str:
    """What the log says about how batches are formed: the biggest lever on speed, so a user sees it."""
    if packed:
        return "batches: packed rows (data.packing=true), no padding"
    if grouped:
        return (
            "batches: examples of similar length together, batches in random order (data.group_by_length=true, the "
            "default: little padding); data.group_by_length=false for fully random batches"
        )
    return "batches: random examples padded to each micro-batch's longest (data.group_by_length=true pads less)"


def prepare_model(model, fsdp: FsdpSettings | None, cfg: Config, accelerator: Accelerator):
    """The model wrapped for this process layout (DDP, or sharded with FSDP2), and its optimizer."""
    opt = cfg.optimizer
    settings = dict(lr=cfg.lr, weight_decay=cfg.weight_decay, name=opt.name, betas=opt.betas, eps=opt.eps)
    if fsdp is not None:  # shard first: the optimizer must hold the sharded parameters
        if opt.name in UNSHARDABLE_OPTIMIZERS:
            raise HalyardError(
                f"optimizer.name={opt.name} under FSDP: its state is not shaped like the parameters, so its "
                f"checkpoints cannot be sharded; use adamw or adamw_fused with FSDP, or DDP with {opt.name}"
            )
        model = shard_model(model, fsdp, accelerator.device, bf16=cfg.model.dtype == "bfloat16")
        return model, build_optimizer(model, **settings)
    return accelerator.prepare(model, build_optimizer(model, **settings))


def throughput_meter(cfg: Config, accelerator: Accelerator, model, trainer_class: type[BasicTrainer]):
    """The throughput meter of this model and loss, and the peak FLOP/s its MFU is measured against."""
    peak = peak_flops_per_second(
        cfg.peak_flops_per_second, accelerator.device, cfg.model.dtype == "bfloat16", cfg.cache_dir
    )
    flops = model_flops(model, trainer_class.model_head == "lm")
    meter = Throughput(
        flops,
        peak.flops_per_second,
        accelerator.num_processes,
        trainer_class.example_unit,
        trainer_class.rows_per_example,
    )
    return meter, peak
