"""The progress display: a bar on a terminal, short plain lines with the time left elsewhere, libraries kept quiet."""

import io
import logging
import subprocess
import sys

import pytest

from train.loop.progress import Progress, format_seconds, short_line

ROW = {"step": 5, "loss/train": 1.5, "lr": 3e-05, "tokens_per_second": 1234.5, "grad_norm": 0.9, "mfu": 0.01}


def test_plain_lines_are_short_and_carry_the_time_left(caplog):
    progress = Progress(total_steps=10, start_step=0, is_main=True, interactive=False)
    with caplog.at_level(logging.INFO, logger="train.loop.progress"):
        progress.show({"step": 0, "loss/eval": 2.0})
        progress.show(ROW)
    assert "step 0/10  eval loss 2\n" in caplog.text + "\n"
    assert "step 5/10  loss 1.5  lr 3e-05  1,234 tok/s  0:00:00 left" in caplog.text
    assert "grad_norm" not in caplog.text and "mfu" not in caplog.text  # those are in metrics.jsonl
    assert progress.bar is None


def test_short_line_of_a_preference_evaluation():
    row = {"step": 17, "loss/train": 0.3, "loss/eval": 0.25, "rewards_eval/accuracies": 0.875, "logps_eval/x": 1.0}
    assert short_line(row, 34, 61.0) == "step 17/34  loss 0.3  eval loss 0.25  eval acc 0.875  0:01:01 left"


def test_short_line_of_a_benchmark_evaluation_shows_each_task_s_first_metric():
    row = {"step": 4, "bench/mc/acc": 0.75, "bench/mc/acc_stderr": 0.1, "bench/mc/acc_norm": 0.5, "bench/qa/em": 0.25}
    assert short_line(row, 10, None) == "step 4/10  mc acc 0.75  qa em 0.25"


def test_verbose_lines_carry_every_metric(caplog):
    progress = Progress(total_steps=10, start_step=0, is_main=True, interactive=False, verbose=True)
    with caplog.at_level(logging.INFO, logger="train.loop.progress"):
        progress.show(ROW)
    assert (
        "step=5  loss/train=1.5  lr=3e-05  tokens_per_second=1234  grad_norm=0.9  mfu=0.01  time_left=" in caplog.text
    )


def test_terminal_gets_a_bar_and_only_evaluations_as_lines(monkeypatch):
    stream = io.StringIO()
    monkeypatch.setattr("sys.stderr", stream)
    progress = Progress(total_steps=4, start_step=0, is_main=True, interactive=True)
    progress.advance(1, {"step": 1, "loss/train": 1.25, "lr": 0.001, "tokens_per_second": 900.0})
    progress.show({"step": 1, "loss/train": 1.25})
    progress.show({"step": 2, "loss/eval": 1.5})
    progress.close()
    text = stream.getvalue()
    assert "1/4" in text and "4/4" not in text
    assert "loss=1.25" in text and "lr=0.001" in text and "tok/s=900" in text
    assert "step 2/4  eval loss 1.5" in text and "step 1/4  loss" not in text


def test_other_processes_show_nothing():
    assert Progress(total_steps=4, start_step=0, is_main=False, interactive=True).bar is None


@pytest.mark.parametrize("verbose", [False, True])
def test_library_noise_is_kept_out_unless_verbose(verbose):
    """In a fresh interpreter (the settings are process-wide): the known FutureWarning and transformers' bars."""
    code = f"""
import warnings
from train.loop.progress import quiet_libraries
quiet_libraries({verbose})
warnings.warn("`is_gradient_checkpointing` is deprecated and will be removed in v6.", FutureWarning)
import transformers
print("bars", transformers.utils.logging.is_progress_bar_enabled())
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert ("is_gradient_checkpointing" in result.stderr) == verbose
    assert f"bars {verbose}" in result.stdout


@pytest.mark.parametrize(
    ("seconds", "text"), [(0, "0:00:00"), (61.9, "0:01:01"), (3 * 3600 + 7, "3:00:07"), (float("nan"), "?")]
)
def test_format_seconds(seconds, text):
    assert format_seconds(seconds) == text
