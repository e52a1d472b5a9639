"""The loss registry: config/loss/*.yaml name trainer classes, each read into a LossSpec before anything loads."""

import pytest

from conftest import REPO
from train.app.config import Config, LossConfig
from train.app.loss_registry import builtin_losses, loss_spec, resolve_loss
from train.errors import ConfigError


def test_every_builtin_loss_resolves_to_a_trainer_with_its_settings():
    losses = builtin_losses()
    assert sorted(losses) == sorted(p.stem for p in (REPO / "config" / "loss").glob("*.yaml"))
    for name, trainer_path in losses.items():
        spec, problems = resolve_loss(name, trainer_path)
        assert problems == [] and spec is not None, (name, problems)
        assert spec.trainer.__name__ == trainer_path.rsplit(".", 1)[1]
        assert issubclass(spec.settings, LossConfig) and spec.model_head in ("lm", "score")
        assert spec.data_kind in ("sft", "text", "paired", "unpaired")


def test_a_config_s_loss_spec_or_the_reason_it_has_none():
    cfg = Config(loss=LossConfig(name="dpo", trainer="train.objectives.preference.DPOTrainer"))
    assert loss_spec(cfg).trainer.__name__ == "DPOTrainer" and loss_spec(cfg).uses_reference
    with pytest.raises(ConfigError, match="train.objectives.preference has no trainer class"):
        loss_spec(Config(loss=LossConfig(name="x", trainer="train.objectives.preference.NoSuchTrainer")))
