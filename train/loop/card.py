"""The model card written into FINAL/README.md: YAML front matter the Hugging Face Hub reads (base_model,
library_name, tags, datasets), then what was trained, on what, how, and how well."""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path

import yaml

from train.app.config import Config, LossConfig
from train.loop.benchmarks import STDERR_SUFFIX, task_and_metric

# A model folder's hub id, one line: written beside a converted copy of a hub model (scripts/prepare_smollm2.py), so
# that a card can name the hub model rather than the local path.
HUB_ID_FILE = "halyard_hub_id.txt"


@dataclass(frozen=True)
class CardInfo:
    """What the card says about a run, read once from its config."""

    base_model: str  # model.name_or_path as given: a hub id or a local folder
    loss: str
    datasets: list[str]
    eval_datasets: list[str]
    lora: str | None  # e.g. "r=16, alpha=32.0, dropout=0.05, target modules all-linear"; None: full fine-tuning
    settings: dict[str, object]  # the few settings a reader wants first
    loss_settings: dict[str, object] = field(default_factory=dict)  # every setting of the loss (beta, ...), by name
    base_model_hub_id: str | None = None  # the hub id of base_model where known (see base_model_hub_id)

    @classmethod
    def from_config(cls, cfg: Config) -> CardInfo:
        peft = cfg.model.peft
        lora = None
        if cfg.model.use_peft:
            targets = ", ".join(peft.target_modules)
            lora = f"r={peft.lora_r}, alpha={peft.lora_alpha}, dropout={peft.lora_dropout}, target modules {targets}"
            lora += "".join(f", {name}" for name, on in (("DoRA", peft.use_dora), ("rsLoRA", peft.use_rslora)) if on)
            if peft.modules_to_save:
                lora += f", trained whole: {', '.join(peft.modules_to_save)}"
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
        if cfg.model.add_special_tokens:  # the tokenizer in FINAL/ has them; a reader must know the vocabulary grew
            settings["added special tokens"] = ", ".join(cfg.model.add_special_tokens)
        return cls(
            base_model=cfg.model.name_or_path,
            base_model_hub_id=base_model_hub_id(cfg.model.name_or_path),
            loss=cfg.loss.name,
            datasets=list(cfg.datasets),
            eval_datasets=list(cfg.eval_datasets),
            lora=lora,
            settings=settings,
            loss_settings=loss_settings(cfg.loss),
        )


def loss_settings(loss: LossConfig) -> dict[str, object]:
    """The loss's own settings (every field of its settings class but name and trainer), by field name."""
    common = {f.name for f in fields(LossConfig)}
    return {f.name: getattr(loss, f.name) for f in fields(loss) if f.name not in common}


def hub_id(name: str) -> str | None:
    """`name` if it reads as a hub id (owner/name, not a local path), else None: the Hub rejects local paths."""
    from train.data.sources import REGISTRY

    if name in REGISTRY:
        return REGISTRY[name][0]
    return name if _reads_as_hub_id(name) else None


def base_model_hub_id(name_or_path: str) -> str | None:
    """The hub id of a base model: `name_or_path` itself if it is one; for a local folder, the id its
    halyard_hub_id.txt names, else the `_name_or_path` its config.json recorded where that is a hub id (transformers
    4 wrote it when saving a model loaded from the Hub). None when the folder does not say: a path is never guessed."""
    folder = Path(name_or_path).expanduser()
    if not folder.is_dir():
        return name_or_path if _reads_as_hub_id(name_or_path) else None
    if (folder / HUB_ID_FILE).is_file():
        recorded = (folder / HUB_ID_FILE).read_text().strip()
    else:
        try:
            recorded = json.loads((folder / "config.json").read_text()).get("_name_or_path") or ""
        except (OSError, ValueError, AttributeError):
            return None
    return recorded if _reads_as_hub_id(recorded) else None


def _reads_as_hub_id(name: str) -> bool:
    return not (Path(name).expanduser().exists() or name.startswith((".", "/", "~")) or name.count("/") != 1)


def front_matter(card: str) -> dict:
    """A card's YAML front matter (between its first two `---` lines); {} if it has none."""
    if not card.startswith("---\n") or card.count("---\n") < 2:
        return {}
    meta = yaml.safe_load(card.split("---\n", 2)[1])
    return meta if isinstance(meta, dict) else {}


def _base_model_line(name: str, hub: str | None) -> str:
    if hub and hub != name:
        return f"- **Base model:** `{hub}` (trained from the local copy `{name}`)"
    return f"- **Base model:** `{name}`"


def _heading(front: dict, title: str) -> list[str]:
    """The YAML front matter the Hub reads, then the card's title."""
    return ["---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "", f"# {title}", ""]


def render(info: CardInfo, summary: dict, adapter_only: bool) -> str:
    """FINAL/README.md: front matter, then method, data, settings and final metrics."""
    base = info.base_model_hub_id
    front = {
        **({"base_model": base} if base else {}),
        "library_name": "peft" if adapter_only else "transformers",
        "tags": ["halyard", info.loss, *(["lora"] if info.lora else [])],
        **({"datasets": ids} if (ids := [i for i in map(hub_id, info.datasets) if i]) else {}),
    }
    method = f"`loss={info.loss}`" + (f", LoRA ({info.lora})" if info.lora else ", full fine-tuning")
    metrics = {key: summary[key] for key in METRIC_KEYS if key in summary}
    lines = [
        *_heading(front, "Fine-tuned with Halyard"),
        _base_model_line(info.base_model, base),
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
    lines += [f"| loss.{key} | {_setting(value)} |" for key, value in info.loss_settings.items()]
    lines += ["", "The full resolved configuration is `halyard_config.yaml` beside this file.", ""]
    if metrics:
        lines += ["## Final metrics", "", "| metric | value |", "|---|---|"]
        lines += [f"| {key} | {_number(value)} |" for key, value in metrics.items()]
        lines.append("")
    lines += evaluation_table(summary)
    return "\n".join(lines)


def evaluation_table(summary: dict) -> list[str]:
    """The card's "Evaluation" section: the final model's benchmark metrics (bench/<task>/<metric> in the summary)
    with how they were measured; [] when no benchmark ran."""
    setup = summary.get("benchmarks") or {}
    rows = []
    for key, value in summary.items():
        if (named := task_and_metric(key)) is None:
            continue
        task, metric = named
        stderr = summary.get(f"{key}{STDERR_SUFFIX}")
        fewshot = setup.get("num_fewshot", {}).get(task, "-")
        limit = setup.get("limit_per_task")
        rows.append(
            f"| {task} | {metric} | {_number(value)} | {'-' if stderr is None else _number(stderr)} | {fewshot} | "
            f"{'all' if limit is None else limit} | {setup.get('harness', '-')} |"
        )
    if not rows:
        return []
    return [
        "## Evaluation",
        "",
        f"Benchmarks of this model with lm-evaluation-harness (seed {setup.get('seed', '-')}; limit: examples per "
        f"task); reproduce with `lm_eval --model hf --model_args pretrained=<this folder> --tasks <task> --seed "
        f"{setup.get('seed', 0)}{' --apply_chat_template' if setup.get('apply_chat_template') else ''}`.",
        "",
        "| task | metric | value | stderr | few-shot | limit | harness |",
        "|---|---|---|---|---|---|---|",
        *rows,
        "",
    ]


METRIC_KEYS = (
    "step", "examples", "pairs", "tokens", "loss/train", "loss/eval_before_training", "loss/eval",
    "rewards_eval/accuracies", "rewards_eval/margins",
)  # fmt: skip


def render_merged(base_model: str, adapter: Path) -> str:
    """README.md of a model written by scripts/merge_lora.py: the base model, the adapter, and what the adapter's run
    card said (its tags and datasets) where the adapter came with one."""
    base = base_model_hub_id(base_model)
    run_card = _adapter_card(adapter)
    run_meta = front_matter(run_card.read_text()) if run_card else {}
    tags = ["halyard", *[t for t in run_meta.get("tags", []) if t not in ("halyard", "lora")], "lora", "merged"]
    front = {
        **({"base_model": base} if base else {}),
        "library_name": "transformers",
        "tags": tags,
        **({"datasets": run_meta["datasets"]} if run_meta.get("datasets") else {}),
    }
    lines = [
        *_heading(front, "Fine-tuned with Halyard (LoRA adapter merged)"),
        _base_model_line(base_model, base),
        f"- **Adapter:** `{adapter}`",
        "- **Files:** the base model with the LoRA adapter merged into its weights (`scripts/merge_lora.py`); a plain "
        "transformers model, no PEFT needed",
    ]
    if run_card:
        lines.append(f"- **Training run:** its method, data, settings and metrics are in `{run_card}`")
    return "\n".join([*lines, ""])


def _adapter_card(adapter: Path) -> Path | None:
    """The run's card for an adapter folder: FINAL/README.md for FINAL/ or FINAL/adapter/; None for a step checkpoint.
    A card without the halyard tag (PEFT writes its own template into FINAL/adapter/) is not the run's."""
    for card in (adapter / "README.md", adapter.parent / "README.md"):
        if card.is_file() and "halyard" in (front_matter(card.read_text()).get("tags") or []):
            return card
    return None


def _setting(value: object) -> str:
    return "null" if value is None else str(value)


def _number(value: object) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)
