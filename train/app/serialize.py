"""The resolved config written out: as YAML (config.yaml, beside every checkpoint) and as flat dotted keys (the
trackers' hyperparameters, and the settings a resume compares)."""

from __future__ import annotations

from omegaconf import OmegaConf

from train.app.config import Config


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
