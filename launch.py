"""Halyard's command line: compose the Hydra config, validate it, then fine-tune.

    accelerate launch launch.py loss=sft model=smollm2 datasets=[data/demo/train.jsonl] exp_name=my-run
    python launch.py loss=sft model=tiny datasets=[data.jsonl] ++model.name_or_path=/path/to/model
    python launch.py --help          # every config key, with its type, default and meaning

Reads like a table of contents: each step is a builder in `train/`. Heavy libraries (torch, transformers) are
imported only after the config is valid, so mistakes are reported in about a second.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

CONFIG_DIR = Path(__file__).resolve().parent / "config"
EXIT_USER_ERROR = 2

logger = logging.getLogger("halyard")


def compose_config(overrides: list[str]):
    """Compose config/config.yaml with Hydra and the command-line overrides; return the typed, validated Config."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from train.config import register_schema, validate
    from train.errors import ConfigError

    register_schema()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            raw = compose(config_name="config", overrides=_as_forced_overrides(overrides))
    except (HydraException, OmegaConfBaseException) as error:
        raise ConfigError([str(error).strip()]) from None
    return validate(raw)


def _as_forced_overrides(overrides: list[str]) -> list[str]:
    """Rewrite plain `key=value` overrides as `++key=value`.

    Hydra stops at the first key missing from the YAML. Forcing each override lets composition finish, so the
    schema check can report every unknown key at once and name the closest valid one. Config-group choices
    (`model=tiny`), `+`, `++`, `~` and `hydra.*` overrides pass through unchanged.
    """
    groups = {p.name for p in CONFIG_DIR.iterdir() if p.is_dir()}
    rewritten = []
    for override in overrides:
        key = override.split("=", 1)[0]
        is_plain = "=" in override and not key.startswith(("+", "~", "hydra.")) and key.split("@")[0] not in groups
        rewritten.append(f"++{override}" if is_plain else override)
    return rewritten


def is_main_process() -> bool:
    return os.environ.get("RANK", "0") == "0"


def setup_logging() -> None:
    # Only the main process logs at INFO; the others report warnings and errors.
    level = logging.INFO if is_main_process() else logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")


def print_help() -> None:
    from train.config import describe_schema

    print(__doc__)
    print("Config keys (override with key=value; presets: loss=<config/loss/*.yaml>, model=<config/model/*.yaml>):")
    print(describe_schema())


def run(cfg) -> None:
    """Build everything from the validated config, train (or resume), and save FINAL/."""
    import time

    from train.checkpoint import read_state
    from train.data import build_datasets
    from train.distributed import fsdp_settings_from_launcher
    from train.errors import HalyardError
    from train.models import build_model, build_tokenizer
    from train.preference import build_reference
    from train.trainers import get_trainer_class
    from train.utils import build_accelerator, prepare_run_dir, write_summary

    started = time.perf_counter()
    trainer_class = get_trainer_class(cfg.loss.trainer)
    resume_dir = find_checkpoint_to_resume(cfg)
    wandb_run_id = read_state(resume_dir).get("wandb_run_id") if resume_dir else None
    accelerator = build_accelerator(cfg, wandb_run_id=wandb_run_id)
    prepare_run_dir(cfg, accelerator)
    tokenizer = build_tokenizer(cfg.model)
    kind = trainer_class.data_kind
    if cfg.data.packing and kind not in ("sft", "text"):
        raise HalyardError(
            f"data.packing=true works with loss=sft and loss=pt, not loss={cfg.loss.name}; set data.packing=false"
        )
    train_data, eval_data, data_stats = build_datasets(cfg, tokenizer, kind, accelerator.main_process_first)
    fsdp = fsdp_settings_from_launcher()
    model = build_model(cfg.model, cfg.seed, sharded=fsdp is not None)
    reference, reference_cache = build_reference(cfg, accelerator, fsdp, train_data, eval_data, trainer_class)
    extra = {"reference_model": reference} if getattr(trainer_class, "uses_reference", None) is not None else {}
    trainer = trainer_class(cfg, accelerator, model, tokenizer, train_data, eval_data, fsdp=fsdp, **extra)
    try:
        if reference_cache is not None:
            trainer.precompute_reference(reference_cache)
        if resume_dir:
            trainer.load_checkpoint(resume_dir)
        trainer.train()
        trainer.save_final()
        if accelerator.is_main_process:
            wall_seconds = time.perf_counter() - started
            write_summary(cfg.run_dir, {**trainer.summary, "wall_seconds": wall_seconds, "data": data_stats})
        accelerator.wait_for_everyone()  # every process leaves together
    finally:
        accelerator.end_training()  # closes the trackers (a stopped run's too) and the process group


def find_checkpoint_to_resume(cfg):
    """The checkpoint to resume from, or None; refuses one whose config differs in what changes the math."""
    from train.checkpoint import config_differences, resolve_resume
    from train.errors import HalyardError
    from train.utils import flat_config

    resume_dir = resolve_resume(cfg.resume_from_checkpoint, Path(cfg.run_dir))
    if resume_dir is None:
        if cfg.resume_from_checkpoint == "auto":
            logger.info(f"resume_from_checkpoint=auto: no checkpoint in {cfg.run_dir} yet, starting fresh")
        return None
    differences = config_differences((resume_dir / "config.yaml").read_text(), flat_config(cfg))
    if differences and not cfg.resume_allow_config_change:
        listed = "\n".join(f"  - {d}" for d in differences)
        raise HalyardError(
            f"cannot resume from {resume_dir}: these settings change the math of the run:\n{listed}\n"
            f"Restore them, or set resume_allow_config_change=true to continue anyway."
        )
    return resume_dir


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--help" in argv or "-h" in argv:
        print_help()
        return 0
    setup_logging()
    from train.errors import HalyardError

    try:
        cfg = compose_config(argv)
        run(cfg)
    except HalyardError as error:
        # A user error, or a stop on request: say what happened and what to do, without a traceback.
        if is_main_process():
            print(f"halyard: {error}", file=sys.stderr)
        return getattr(error, "exit_code", EXIT_USER_ERROR)
    finally:
        shut_down_processes()
    return 0


def shut_down_processes() -> None:
    """Tear down the process group before exit; left to the interpreter's shutdown, gloo's threads can abort."""
    if "torch" not in sys.modules:
        return
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def exit_process(code: int) -> None:
    """Exit. A process of a multi-process run skips the interpreter's teardown: destroying the objects that still
    hold communication threads (FSDP, device meshes) in arbitrary order can abort it after the work is done.
    Everything it wrote is already closed and flushed."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    exit_process(main())
