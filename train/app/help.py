"""`python launch.py --help`: what the command does, how to run it, the presets by name, the data formats and every
key with its default. Read from the files themselves (config/, accelerate_config/, the schema), so it cannot drift.

Listing the losses' own settings imports every built-in loss's trainer module (train/objectives/), and with them
torch; nothing else heavy (no transformers model code, no model or data).
"""

from __future__ import annotations

import dataclasses
import textwrap
from pathlib import Path
from typing import Any

from train.app.config import CONFIG_DIR, Config, LossConfig, leaf_settings
from train.app.loss_registry import builtin_losses, resolve_loss
from train.app.validate import TRANSFORMERS_KEYS
from train.data.formats import FORMAT_EXAMPLES

ACCELERATE_DIR = CONFIG_DIR.parent / "accelerate_config"
LINE_WIDTH = 118

USAGE = """\
Halyard fine-tunes causal language models: supervised fine-tuning (SFT), preference optimization (DPO and its
family, KTO), reward models and continued pretraining, with full weights or LoRA, on one CPU or GPU or many.

Usage:
  python launch.py [key=value ...]                       one run; its files go to runs/<exp_name>/
  accelerate launch --config_file accelerate_config/<file> launch.py [key=value ...]
                                                         the same run over several processes, GPUs or machines
  python launch.py -m key=a,b [key=value ...]            a sweep: one run per combination, then a table
  python launch.py --config-dir DIR --config-name NAME   an experiment written in one YAML file (DIR/NAME.yaml)
  python launch.py --cfg job [key=value ...]             a dry run: check everything a run checks (keys, values, data
                                                         files, model), print the config it would train with (every
                                                         default, the loss's own settings too) and exit; exit 2 on a
                                                         problem. --cfg hydra|all: Hydra's composition, unchecked

Examples:
  python launch.py loss=sft model=smollm2 datasets=[data/demo/train.jsonl] exp_name=my-run
  python launch.py loss=dpo model=smollm2 datasets=[prefs.jsonl] loss.beta=0.1 model.use_peft=true
  python launch.py -m loss=sft model=smollm2 datasets=[data/demo/train.jsonl] lr=1e-5,1e-4 exp_name=lr-sweep
  python launch.py --config-dir config/experiment --config-name sft_lora
  python launch.py -m hydra/launcher=slurm_gpu accelerate_config=accelerate_config/fsdp_8gpu.yaml ...

Other Hydra flags: --info, --shell-completion install=bash, --hydra-help, -m hydra/sweeper=optuna (a search),
hydra/launcher=submitit_local|submitit_slurm|slurm_gpu (where a sweep's jobs run), hydra.run.dir / hydra.sweep.dir.
A problem in the config (of any job of a sweep) stops everything before training, listing every problem: exit 2."""


def help_text() -> str:
    sections = [
        USAGE,
        "Presets (pick one with group=name):\n" + _presets(),
        "Accelerate configs (accelerate_config=<file> or accelerate launch --config_file <file>):\n"
        + _described(sorted(ACCELERATE_DIR.glob("*.yaml")), prefix="accelerate_config/"),
        "Data formats (data.format=auto detects each row's format from its columns):\n"
        + "\n".join(f"  {name:<18} {example}" for name, example in FORMAT_EXAMPLES.items()),
        "Config keys (key=value; a loss's own settings as loss.<key>):\n" + describe_schema(width=LINE_WIDTH),
        "Coming from transformers or TRL (their name: Halyard's key):\n" + _transformers_names(),
    ]
    return "\n\n".join(sections)


def _transformers_names() -> str:
    width = max(len(name) for name in TRANSFORMERS_KEYS)
    lines = []
    for name, (key, note) in TRANSFORMERS_KEYS.items():
        line = f"  {name:<{width}}  {key}" + (f" ({note})" if note else "")
        lines += textwrap.wrap(line, width=LINE_WIDTH, subsequent_indent=" " * (width + 4))
    return "\n".join(lines)


def _presets() -> str:
    lines = []
    for group in ("loss", "model", "method", "experiment", "hydra/launcher"):
        files = sorted((CONFIG_DIR / group).glob("*.yaml"))
        if group == "experiment":
            lines.append("  experiments (--config-dir config/experiment --config-name <name>):")
        else:
            lines.append(f"  {group}=")
        if group == "hydra/launcher":
            lines.append(
                "    basic (default: jobs one after another in this process) | submitit_local | submitit_slurm"
            )
        lines.append(_described(files, indent=4))
    lines.append("  hydra/sweeper=basic (every combination of a -m sweep) | optuna (a search; see config/experiment)")
    return "\n".join(lines)


def _described(files: list[Path], indent: int = 2, prefix: str = "") -> str:
    """One line per file: its name and the first sentence of its leading comment."""
    width = max((len(prefix + f.stem) for f in files), default=0) + (5 if prefix else 0)
    lines = []
    for file in files:
        name = prefix + (file.name if prefix else file.stem)
        lines_of = [line for line in file.read_text().splitlines() if line.strip() and "@package" not in line]
        first = lines_of[0] if lines_of else ""  # a Hydra package directive is not a description
        about = first.lstrip("#").strip() if first.startswith("#") else ""
        room = max(LINE_WIDTH - indent - width - 2, 30)
        about = textwrap.shorten(about.split(". ")[0].rstrip("."), width=room, placeholder="...")
        lines.append(f"{' ' * indent}{name:<{width}}  {about}".rstrip())
    return "\n".join(lines)


def describe_schema(width: int = 120) -> str:
    """A table of every key: its path, its default as you would write it on the command line, and what it means,
    with its choices where it declares them (for `launch.py --help`). A loss's own settings follow, with the losses
    that have them."""
    rows = [(path, _as_written(default), _meaning(f)) for path, f, default in leaf_settings(Config())]
    by_settings: dict[type, list[str]] = {}  # built-in losses that share a settings class are listed together
    for name, trainer_path in builtin_losses().items():
        spec, _ = resolve_loss(name, trainer_path)
        if spec is not None:
            by_settings.setdefault(spec.settings, []).append(name)
    base = {f.name for f in dataclasses.fields(LossConfig)}
    for settings, names in by_settings.items():
        for path, f, default in leaf_settings(settings()):
            if path not in base:
                rows.append((f"loss.{path} ({', '.join(names)})", _as_written(default), _meaning(f)))
    key_width = max(len(r[0]) for r in rows)
    default_width = min(max(len(r[1]) for r in rows), 24)
    indent = 2 + key_width + 2 + default_width + 2
    lines = [f"  {'key':<{key_width}}  {'default':<{default_width}}  meaning"]
    for path, default, help in rows:
        if len(default) > default_width:  # a long default gets a line of its own
            lines.append(f"  {path:<{key_width}}  {default}")
            lead = " " * indent
        else:
            lead = f"  {path:<{key_width}}  {default:<{default_width}}  "
        wrapped = textwrap.wrap(help, width=max(width - indent, 40)) or [""]
        lines.append(lead + wrapped[0])
        lines += [" " * indent + line for line in wrapped[1:]]
    return "\n".join(lines)


def _meaning(f: dataclasses.Field) -> str:
    """A setting's help, then its choices, each with what it means where its declaration says (see `setting`)."""
    help, choices = f.metadata["help"], f.metadata.get("choices")
    if not choices:
        return help
    listed = " | ".join(_as_written(value) + (f" ({meaning})" if meaning else "") for value, meaning in choices.items())
    return f"{help.rstrip('.')}: {listed}."


def _as_written(value: Any) -> str:
    """A default as it is written in an override: null, true, [a,b], 1e-05."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return "[" + ",".join(_as_written(v) for v in value) + "]"
    return str(value) if value != "" else "''"
