"""The model card written into FINAL/README.md: YAML front matter the Hugging Face Hub reads (base_model,
library_name, tags, datasets), then what was trained, on what, how, and how well."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

from train.app.config import Config


@dataclass(frozen=True)
class CardInfo:
    """What the card says about a run, read once from its config."""

    base_model: str  # model.name_or_path as given: a hub id or a local folder
    loss: str
    datasets: list[str]
    eval_datasets: list[str]
    lora: str | None  # e.g. "r=16, alpha=32.0, dropout=0.05, target modules all-linear"; None: full fine-tuning
    settings: dict[str, object]  # the few settings a reader wants first

    @classmethod
    def from_config(cls, cfg: Config) -> CardInfo:
        peft = cfg.model.peft
        lora = None
        if cfg.model.use_peft:
            targets = ", ".join(peft.target_modules)
            lora = f"r={peft.lora_r}, alpha={peft.lora_alpha}, dropout={peft.lora_dropout}, target modules {targets}"
        settings = {
            "lr": cfg.lr,
            "lr_scheduler": cfg.lr_scheduler,
            "optimizer": cfg.optimizer.name,
            "batch size (global)": cfg.model.batch_size,
            "epochs": cfg.n_epochs,
            "max_steps": cfg.max_steps,
            "max_length": cfg.model.max_length,
            "dtype": cfg.model.dtype,
            "weights saved in (save_dtype)": cfg.save_dtype,
            "seed": cfg.seed,
        }
        return cls(cfg.model.name_or_path, cfg.loss.name, list(cfg.datasets), list(cfg.eval_datasets), lora, settings)


def hub_id(name: str) -> str | None:
    """`name` if it reads as a hub id (owner/name, not a local path), else None: the Hub rejects local paths."""
    from train.data.sources import REGISTRY

    if name in REGISTRY:
        return REGISTRY[name][0]
    if Path(name).expanduser().exists() or name.startswith((".", "/", "~")) or name.count("/") != 1:
        return None
    return name


def render(info: CardInfo, summary: dict, adapter_only: bool) -> str:
    """FINAL/README.md: front matter, then method, data, settings and final metrics."""
    base = hub_id(info.base_model)
    front = {
        **({"base_model": base} if base else {}),
        "library_name": "peft" if adapter_only else "transformers",
        "tags": ["halyard", info.loss, *(["lora"] if info.lora else [])],
        **({"datasets": ids} if (ids := [i for i in map(hub_id, info.datasets) if i]) else {}),
    }
    method = f"`loss={info.loss}`" + (f", LoRA ({info.lora})" if info.lora else ", full fine-tuning")
    metrics = {key: summary[key] for key in METRIC_KEYS if key in summary}
    lines = [
        "---",
        yaml.safe_dump(front, sort_keys=False).strip(),
        "---",
        "",
        "# Fine-tuned with Halyard",
        "",
        f"- **Base model:** `{info.base_model}`",
        f"- **Method:** {method}",
        f"- **Training data:** {', '.join(f'`{d}`' for d in info.datasets)}",
    ]
    if info.eval_datasets:
        lines.append(f"- **Evaluation data:** {', '.join(f'`{d}`' for d in info.eval_datasets)}")
    if adapter_only:
        lines.append(
            "- **Files:** a PEFT LoRA adapter (float32); `scripts/merge_lora.py BASE FINAL OUT` writes a merged model"
        )
    lines += ["", "## Settings", "", "| setting | value |", "|---|---|"]
    lines += [f"| {key} | {value} |" for key, value in info.settings.items() if value is not None]
    lines += ["", "The full resolved configuration is `halyard_config.yaml` beside this file.", ""]
    if metrics:
        lines += ["## Final metrics", "", "| metric | value |", "|---|---|"]
        lines += [f"| {key} | {_number(value)} |" for key, value in metrics.items()]
        lines.append("")
    return "\n".join(lines)


METRIC_KEYS = (
    "step", "examples", "pairs", "tokens", "loss/train", "loss/eval_before_training", "loss/eval",
    "rewards_eval/accuracies", "rewards_eval/margins",
)  # fmt: skip


def _number(value: object) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)
