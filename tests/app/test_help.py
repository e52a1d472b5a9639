"""`python launch.py --help`: every setting's declared choices are printed in its row, each with what it means."""

import re

from train.app.config import Config, leaf_settings
from train.app.help import describe_schema, help_text
from train.app.loss_registry import builtin_losses, resolve_loss


def rows_of(table: str) -> dict[str, str]:
    """The help table's rows by key: default and meaning, the row's wrapped lines joined, spaces collapsed."""
    rows: dict[str, str] = {}
    key = None
    for line in table.splitlines()[1:]:
        match = re.match(r"^  (\S+)(?: \([^)]*\))?  +(.*)$", line)
        if match:
            key = match.group(1)
            rows[key] = match.group(2)
        elif key is not None:
            rows[key] += " " + line.strip()
    return {key: " ".join(text.split()) for key, text in rows.items()}


def test_help_prints_each_setting_s_choices_after_its_meaning():
    rows = rows_of(describe_schema(width=120))
    assert rows["model.attn_implementation"] == "sdpa Attention kernel: eager | sdpa | flash_attention_2 (CUDA only)."
    assert rows["wandb.mode"].endswith(
        "Weights & Biases mode: null (follows WANDB_MODE, online if unset) | online | offline | disabled."
    )
    assert "on_nonfinite" in rows and rows["on_nonfinite"].endswith("stop (exit 2) | skip (no update, counted).")


def test_every_declared_choice_reaches_help_including_a_loss_s_own():
    settings = [(path, f) for path, f, _ in leaf_settings(Config())]
    for name, trainer_path in builtin_losses().items():
        settings += [
            (f"loss.{path}", f) for path, f, _ in leaf_settings(resolve_loss(name, trainer_path)[0].settings())
        ]
    rows = rows_of(help_text())
    for path, f in settings:
        for value in f.metadata.get("choices", {}):
            written = "null" if value is None else str(value)
            assert re.search(rf"(: | \| ){re.escape(written)}( \(|\.| \|)", rows[path]), (path, value)


def test_help_maps_transformers_names_and_calls_cfg_job_a_dry_run():
    text = " ".join(help_text().split())
    assert "--cfg job [key=value ...] a dry run: check everything a run checks" in text
    assert text.endswith(
        "logging_steps log_every_steps report_to wandb.enabled (and tensorboard.enabled, each true or false)"
    )
    assert "per_device_train_batch_size model.batch_size (the GLOBAL batch: per-device batch x processes x" in text
