"""Run setup shared by every trainer: the Accelerator, the run directory and the trackers."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.tracking import TensorBoardTracker, WandBTracker

from train.app.config import Config
from train.app.serialize import config_yaml, flat_config
from train.files import run_dir_error
from train.loop.checkpoint import CONFIG_FILE

logger = logging.getLogger(__name__)


def build_accelerator(cfg: Config, wandb_run_id: str | None = None) -> Accelerator:
    """The Accelerator, with the enabled trackers; a resumed run passes its wandb run id to continue the same run."""
    trackers = []
    if cfg.tensorboard.enabled:
        trackers.append(TensorBoardTracker("tensorboard", cfg.run_dir))  # event files in ${run_dir}/tensorboard/
    if cfg.wandb.enabled:
        options = {"id": wandb_run_id, "resume": "allow"} if wandb_run_id else {}
        if cfg.wandb.mode:
            options["mode"] = cfg.wandb.mode
        trackers.append(
            WandBTracker(cfg.wandb.project, name=cfg.exp_name, entity=cfg.wandb.entity, dir=cfg.run_dir, **options)
        )
    return Accelerator(
        # bfloat16 autocasts the forward pass; the trained weights stay float32 (master weights).
        mixed_precision="bf16" if cfg.model.dtype == "bfloat16" else "no",
        cpu=not torch.cuda.is_available(),
        log_with=trackers or None,
        project_dir=cfg.run_dir,
    )


def prepare_run_dir(cfg: Config, accelerator: Accelerator) -> None:
    """Create the run directory, write the resolved config into it and start the trackers (main process only)."""
    run_dir = Path(cfg.run_dir)
    if accelerator.is_main_process:
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / CONFIG_FILE).write_text(config_yaml(cfg))
        except OSError as error:
            raise run_dir_error(run_dir, error) from None
        logger.info(f"run directory: {run_dir.resolve()}")
    accelerator.wait_for_everyone()
    if cfg.wandb.enabled or cfg.tensorboard.enabled:
        accelerator.init_trackers(cfg.wandb.project, config=flat_config(cfg))
