"""One training run, from a validated config to FINAL/: each step is a builder in `train/`."""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import time
from pathlib import Path

import torch

from train.app.assemble import loop_settings, total_steps_of, trainer_parts
from train.app.config import Config, keys_that_keep_the_math
from train.app.host_memory import configure_host_memory
from train.app.loss_registry import loss_spec
from train.app.memory_plan import log_plan
from train.app.models import (
    build_model,
    build_tokenizer,
    compile_summary,
    resolve_attention_float32,
    resolve_compile,
    resolve_dtype,
    resolve_save_dtype,
)
from train.app.runtime import build_accelerator, prepare_run_dir
from train.app.serialize import flat_config
from train.batching.layout import decide_layout
from train.batching.plan import steps_per_epoch
from train.data.datasets import build_datasets
from train.errors import HalyardError
from train.loop.benchmarks import STDERR_SUFFIX, task_and_metric
from train.loop.checkpoint import (
    CONFIG_FILE,
    METRICS_FILE,
    SUMMARY_FILE,
    belongs_to,
    config_differences,
    read_state,
    refuse_to_overwrite,
    remove_earlier_run,
    resolve_resume,
)
from train.loop.distributed import fsdp_settings_from_launcher
from train.loop.progress import format_seconds, quiet_libraries
from train.loop.run_files import HYDRA_FILES
from train.objectives.reference import build_reference

logger = logging.getLogger(__name__)


def run(cfg: Config) -> None:
    """Build everything from the validated config, train (or resume), and save FINAL/."""
    started = time.perf_counter()
    quiet_libraries(cfg.verbose)
    # before the model loads: the heap it is loaded into is the one the steps reuse
    logger.info(configure_host_memory(cfg.keep_freed_host_memory, trains_on_cpu=not torch.cuda.is_available()))
    cfg.model.dtype, why = resolve_dtype(cfg.model.dtype)  # before anything reads it, the saved config included
    if why != "set":
        logger.info(f"model.dtype=auto: {cfg.model.dtype} ({why})")
    cfg.model.attention_float32, why = resolve_attention_float32(
        cfg.model.attention_float32, cfg.model.dtype, cfg.model.attn_implementation
    )
    if cfg.model.attention_float32 or why != "set":
        state = "on: sdpa computes in float32" if cfg.model.attention_float32 else "off"
        logger.info(f"model.attention_float32: {state} ({why})")
    spec = loss_spec(cfg)
    log_plan(cfg, spec)  # before anything loads: what the run will need, what the device has
    cfg.save_dtype, why = resolve_save_dtype(cfg.save_dtype, cfg.model)
    if why != "set":
        logger.info(f"save_dtype=auto: FINAL/ in {cfg.save_dtype} ({why})")
    resume_dir = find_checkpoint_to_resume(cfg)
    wandb_run_id = read_state(resume_dir).wandb_run_id if resume_dir else None
    accelerator = build_accelerator(cfg, wandb_run_id=wandb_run_id)
    with removed_unless_started(Path(cfg.run_dir), accelerator):
        resuming_here = resume_dir is not None and belongs_to(resume_dir, Path(cfg.run_dir))
        if cfg.overwrite_run and not resuming_here and accelerator.is_main_process:
            remove_earlier_run(Path(cfg.run_dir))
        prepare_run_dir(cfg, accelerator)
        tokenizer = build_tokenizer(cfg.model, cfg.data.chat_template)
        layout = decide_layout(cfg.data, cfg.model.attn_implementation, spec)[0]  # validation reported its problems
        train_data, eval_data, data_stats = build_datasets(
            cfg, tokenizer, spec.data_kind, accelerator.main_process_first, layout
        )
        fsdp = fsdp_settings_from_launcher()
        total_steps = total_steps_of(cfg, steps_per_epoch(len(train_data), cfg.model.batch_size))
        # decided here, where the run's length is known; the saved configs keep the setting as given (null)
        compiled, why = resolve_compile(cfg.model.compile, cfg.model.dtype, total_steps)
        if why != "set":
            logger.info(f"model.compile=null: {'on' if compiled else 'off'} ({why})")
        pad_id = tokenizer.pad_token_id if spec.model_head == "score" else None  # a reward model scores sequences
        model = build_model(
            cfg.model, cfg.seed, sharded=fsdp is not None, score_pad_token_id=pad_id, compile_layers_now=compiled
        )
        reference, reference_cache = build_reference(cfg, accelerator, fsdp, train_data, eval_data, spec.trainer)
        extra = {"reference_model": reference} if spec.uses_reference else {}
        parts = trainer_parts(spec.trainer, cfg, accelerator, model, tokenizer, train_data, eval_data, fsdp)
        settings = loop_settings(cfg, spec.trainer, total_steps=parts.total_steps)
        trainer = spec.trainer(settings, cfg.loss, accelerator, parts, **extra)
    try:
        if reference_cache is not None:
            trainer.precompute_reference(reference_cache)
        if resume_dir:
            trainer.load_checkpoint(resume_dir)
        trainer.train()
        trainer.save_final()
        if accelerator.is_main_process:
            wall_seconds = time.perf_counter() - started
            data = in_units(data_stats, spec.trainer.example_unit)
            compile_facts = compile_summary() if compiled else {}
            write_summary(cfg.run_dir, {**trainer.summary, **compile_facts, "wall_seconds": wall_seconds, "data": data})
        accelerator.wait_for_everyone()  # every process leaves together
    finally:
        accelerator.end_training()  # closes the trackers (a stopped run's too) and the process group


@contextlib.contextmanager
def removed_unless_started(run_dir: Path, accelerator):
    """A run directory this run creates is removed again if the run fails before training starts (bad data, a model
    that does not load): it would hold nothing but a config, and look like a run. Hydra's own files (written into it
    just before the run) do not make it a run's."""
    fresh = not run_dir.exists() or {path.name for path in run_dir.iterdir()} <= set(HYDRA_FILES)
    try:
        yield
    except BaseException:
        if fresh and accelerator.is_main_process:
            shutil.rmtree(run_dir, ignore_errors=True)
        raise


def find_checkpoint_to_resume(cfg: Config) -> Path | None:
    """The checkpoint to resume from, or None; refuses one whose config differs in what changes the math."""
    resume_dir = resolve_resume(cfg.resume_from_checkpoint, Path(cfg.run_dir))
    if not cfg.overwrite_run:
        refuse_to_overwrite(Path(cfg.run_dir), resume_dir, cfg.resume_from_checkpoint)
    if resume_dir is None:
        if cfg.resume_from_checkpoint == "auto":
            logger.info(f"resume_from_checkpoint=auto: no checkpoint in {cfg.run_dir} yet, starting fresh")
        return None
    differences = config_differences(
        (resume_dir / CONFIG_FILE).read_text(), flat_config(cfg), may_change=keys_that_keep_the_math()
    )
    if differences and not cfg.resume_allow_config_change:
        listed = "\n".join(f"  - {d}" for d in differences)
        raise HalyardError(
            f"cannot resume from {resume_dir}: these settings change the math of the run:\n{listed}\n"
            f"Restore them, or set resume_allow_config_change=true to continue anyway."
        )
    return resume_dir


def in_units(data_stats: dict[str, dict], unit: str) -> dict[str, dict]:
    """Each split's statistics with its example count named by the loss's unit ("pairs" for paired losses)."""
    return {split: {(unit if k == "examples" else k): v for k, v in s.items()} for split, s in data_stats.items()}


def write_summary(run_dir: str, summary: dict) -> None:
    """summary.json in the run directory (totals, final losses, data statistics, where FINAL/ is), and a readable
    version of it in the log."""
    path = Path(run_dir) / SUMMARY_FILE
    path.write_text(json.dumps(summary, indent=2) + "\n")
    logger.info(summary_text(summary, path))


def benchmark_lines(summary: dict) -> list[str]:
    """`benchmark halyard_demo acc 0.812 ± 0.071 (before training 0.500)`, one line per metric of the final model."""
    before = summary.get("benchmarks_before_training", {})
    lines = []
    for key, value in summary.items():
        if (named := task_and_metric(key)) is None:
            continue
        task, metric = named
        stderr = summary.get(key + STDERR_SUFFIX)
        line = f"benchmark {task} {metric} {value:.3f}" + (f" ± {stderr:.3f}" if stderr is not None else "")
        lines.append(line + (f" (before training {before[key]:.3f})" if key in before else ""))
    return lines


def summary_text(summary: dict, path: Path) -> str:
    """The end-of-run summary: what was trained, the losses, what happened to the data, where the model is."""
    unit = next((u for u in ("pairs", "examples") if u in summary), "examples")
    lines = [
        f"done: {summary.get('step')} steps, {summary.get(unit, 0):,} {unit}, {summary.get('tokens', 0):,} tokens in "
        f"{format_seconds(summary.get('wall_seconds', 0))} ({summary.get('tokens_per_second', 0):,.0f} tokens/s "
        f"while training)"
    ]
    losses = [f"{split} {summary[f'loss/{split}']:.4f}" for split in ("train", "eval") if f"loss/{split}" in summary]
    if "loss/eval_before_training" in summary:
        losses[-1] += f" (before training {summary['loss/eval_before_training']:.4f})"
    if "rewards_eval/accuracies" in summary:
        losses.append(f"eval accuracy {summary['rewards_eval/accuracies']:.3f}")
    if losses:
        lines.append("loss: " + ", ".join(losses))
    data = "; ".join(
        f"{split} {s.get(unit, s.get('examples'))} {unit} from {s['rows']} rows ({s['truncated']} truncated, "
        f"{s['dropped_no_supervised_token']} dropped)"
        for split, s in summary.get("data", {}).items()
    )
    if data:
        lines.append(f"data: {data}")
    lines += benchmark_lines(summary)
    if summary.get("skipped_nonfinite_steps"):
        lines.append(f"skipped steps (non-finite): {summary['skipped_nonfinite_steps']}")
    if "final_dir" in summary:
        lines.append(f"trained model in {summary['final_dir']}")
    lines.append(f"details: {path.resolve()} (every logged metric: {path.parent.resolve() / METRICS_FILE})")
    return "\n  ".join(lines)
