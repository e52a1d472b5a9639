"""`python launch.py --help`: what the command does, how to run it, the presets by name, the data formats and every
key with its default. Read from the files themselves (config/, accelerate_config/, the schema), so it cannot drift.

Imports no torch beyond what listing the losses' own settings needs (their trainer modules).
"""

from __future__ import annotations

import textwrap
from pathlib import Path

from train.app.config import CONFIG_DIR, describe_schema
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
  python launch.py --cfg job [key=value ...]             print the composed config and exit (--cfg hydra|all too)

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
    ]
    return "\n\n".join(sections)


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
