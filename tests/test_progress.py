"""The progress display: a bar on a terminal, plain lines with the time left elsewhere."""

import io
import logging

import pytest

from train.progress import Progress, format_seconds


def test_plain_lines_carry_the_time_left(caplog):
    progress = Progress(total_steps=10, start_step=0, is_main=True, interactive=False)
    with caplog.at_level(logging.INFO, logger="train.progress"):
        progress.show({"step": 0, "loss/eval": 2.0})
        progress.show({"step": 5, "loss/train": 1.5})
    assert "step=0  loss/eval=2" in caplog.text
    assert "step=5  loss/train=1.5  time_left=0:00:00" in caplog.text
    assert progress.bar is None


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
    assert "step=2  loss/eval=1.5" in text and "step=1  loss/train" not in text


def test_other_processes_show_nothing():
    assert Progress(total_steps=4, start_step=0, is_main=False, interactive=True).bar is None


@pytest.mark.parametrize(
    ("seconds", "text"), [(0, "0:00:00"), (61.9, "0:01:01"), (3 * 3600 + 7, "3:00:07"), (float("nan"), "?")]
)
def test_format_seconds(seconds, text):
    assert format_seconds(seconds) == text
