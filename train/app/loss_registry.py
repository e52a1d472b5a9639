"""The loss registry: a loss's trainer class, found by import path, and what it supports (`LossSpec`).

A loss's YAML (config/loss/<name>.yaml) names the trainer class; validation and `--help` import it here to read its
settings dataclass and capabilities before any model or data loads. Importing a trainer imports its module, and with
it torch.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import os
import sys
from dataclasses import dataclass

from omegaconf import OmegaConf

from train.app.config import CONFIG_DIR, Config, LossConfig
from train.errors import ConfigError


@dataclass(frozen=True)
class LossSpec:
    """Everything validation needs to know about a loss, read from its trainer class before anything loads."""

    name: str
    trainer_path: str
    trainer: type  # a train.loop.trainer.BasicTrainer subclass
    settings: type[LossConfig]
    data_kind: str  # the rows it trains on: "sft", "text", "paired" or "unpaired" (train/data/formats.py)
    supports_packing: bool
    supports_shared_prompt: bool
    uses_reference: bool  # holds a frozen reference model (or the policy with its LoRA adapters disabled)
    supports_reference_precompute: bool
    model_head: str  # "lm" (a causal LM) or "score" (a sequence classifier: a reward model)


def resolve_loss(name: str, trainer_path: str) -> tuple[LossSpec | None, list[str]]:
    """Import the trainer class named by `loss.trainer` and read its capabilities; or say why it cannot be used."""
    where = f"loss.trainer={trainer_path!r}"
    module_name, _, class_name = trainer_path.replace(":", ".").rpartition(".")
    if not module_name:
        return None, [
            f"{where}: give the trainer's import path, module and class, e.g. train.objectives.preference.{trainer_path} or "
            f"my_losses.{trainer_path}"
        ]
    if os.getcwd() not in sys.path:
        sys.path.append(os.getcwd())  # a user's loss module in the working directory, as with `python -m`
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        if error.name and module_name.startswith(error.name):
            return None, [
                f"{where}: no module named '{error.name}'; put {module_name.replace('.', '/')}.py in the working "
                f"directory ({os.getcwd()}) or add its folder to PYTHONPATH"
            ]
        raise
    trainer = getattr(module, class_name, None)
    if not _is_trainer_class(trainer):
        candidates = [name for name, value in vars(module).items() if _is_trainer_class(value)]
        guess = difflib.get_close_matches(class_name, candidates, n=1)
        hint = f" (did you mean '{module_name}.{guess[0]}'?)" if guess else f"; trainers there: {sorted(candidates)}"
        return None, [f"{where}: {module_name} has no trainer class (a BasicTrainer subclass) '{class_name}'{hint}"]
    settings = trainer.settings_class
    if not (isinstance(settings, type) and issubclass(settings, LossConfig) and dataclasses.is_dataclass(settings)):
        return None, [
            f"{where}: {class_name}.settings_class must be a dataclass subclassing train.app.config.LossConfig, "
            f"not {settings!r}"
        ]
    spec = LossSpec(
        name=name,
        trainer_path=trainer_path,
        trainer=trainer,
        settings=settings,
        data_kind=trainer.data_kind,
        supports_packing=trainer.supports_packing,
        supports_shared_prompt=trainer.supports_shared_prompt,
        uses_reference=trainer.uses_reference,
        supports_reference_precompute=trainer.supports_reference_precompute,
        model_head=trainer.model_head,
    )
    return spec, []


def _is_trainer_class(value: object) -> bool:
    # By its interface rather than issubclass: a config whose loss cannot be imported is reported without importing
    # train.loop.trainer (and torch) here.
    hooks = ("settings_class", "data_kind", "loss_units", "batch_loss", "train")
    return isinstance(value, type) and all(hasattr(value, hook) for hook in hooks)


def builtin_losses() -> dict[str, str]:
    """The losses that ship with Halyard: name -> trainer import path, read from config/loss/*.yaml."""
    return {file.stem: OmegaConf.load(file).trainer for file in sorted((CONFIG_DIR / "loss").glob("*.yaml"))}


def loss_spec(cfg: Config) -> LossSpec:
    """The spec of a validated config's loss (its module is already imported)."""
    spec, problems = resolve_loss(cfg.loss.name, cfg.loss.trainer)
    if spec is None:
        raise ConfigError(problems)
    return spec
