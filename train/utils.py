"""Run setup shared by every trainer: the Accelerator, the run directory and the trackers."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.tracking import TensorBoardTracker, WandBTracker
from omegaconf import OmegaConf

from train.config import Config
from train.errors import HalyardError

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
            (run_dir / "config.yaml").write_text(config_yaml(cfg))
        except OSError as error:
            raise HalyardError(
                f"cannot write the run directory '{run_dir}' ({error.strerror}); set cache_dir to a writable folder"
            ) from None
        logger.info(f"run directory: {run_dir.resolve()}")
    accelerator.wait_for_everyone()
    if cfg.wandb.enabled or cfg.tensorboard.enabled:
        accelerator.init_trackers(cfg.wandb.project, config=flat_config(cfg))


def config_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def flat_config(cfg: Config) -> dict[str, object]:
    """Dotted keys and scalar values (TensorBoard's hyperparameter table takes no lists or None)."""
    return flatten(OmegaConf.to_container(OmegaConf.structured(cfg)))


def flatten(tree: dict, prefix: str = "") -> dict[str, object]:
    """{"model": {"lr": 1}} -> {"model.lr": 1}; values that are not int, float, str or bool become strings."""
    flat: dict[str, object] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value if isinstance(value, int | float | str | bool) else str(value)
    return flat


def write_summary(run_dir: str, summary: dict) -> None:
    """summary.json in the run directory (totals, final losses, data statistics, where FINAL/ is), and a readable
    version of it in the log."""
    path = Path(run_dir) / "summary.json"
    path.write_text(json.dumps(summary, indent=2) + "\n")
    rows = {split: stats for split, stats in summary.get("data", {}).items()}
    data = "; ".join(
        f"{split}: {s['examples']} of {s['rows']} rows used, {s['truncated']} truncated, {s['dropped_no_supervised_token']} dropped"
        for split, s in rows.items()
    )
    losses = ", ".join(f"{k} {summary[k]:.4f}" for k in ("loss/train", "loss/eval") if k in summary)
    logger.info(
        f"run summary: {summary.get('step')} steps, {summary.get('examples')} examples, {summary.get('tokens')} tokens "
        f"in {summary.get('wall_seconds', 0):.0f} s ({summary.get('tokens_per_second', 0):.0f} tokens/s while training); "
        f"{losses}; {data}; skipped steps {summary.get('skipped_nonfinite_steps', 0)}; FINAL: {summary.get('final_dir')}; "
        f"details: {path.resolve()}"
    )
