"""One training run (train/app/run.py), the parts that are not the real CLI end to end (tests/test_launch.py): a
run directory removed when the run fails before it starts, and the summary in the loss's units."""

from pathlib import Path
from types import SimpleNamespace

import pytest

from train.app.run import in_units, removed_unless_started, summary_text

MAIN = SimpleNamespace(is_main_process=True)


def test_a_run_dir_holding_only_hydra_s_files_is_removed_when_the_run_fails(tmp_path):
    run_dir = tmp_path / "run"
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / "launch.log").write_text("")
    with pytest.raises(ValueError), removed_unless_started(run_dir, MAIN):
        (run_dir / "config.yaml").write_text("lr: 1")
        raise ValueError("bad data")
    assert not run_dir.exists()


def test_an_earlier_run_s_directory_is_kept_when_the_run_fails(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text("{}\n")
    with pytest.raises(ValueError), removed_unless_started(run_dir, MAIN):
        raise ValueError("bad data")
    assert (run_dir / "metrics.jsonl").exists()
    with removed_unless_started(tmp_path / "fresh", MAIN):  # a run that starts keeps its directory
        (tmp_path / "fresh").mkdir()
    assert (tmp_path / "fresh").exists()


def test_the_summary_counts_in_the_loss_s_units():
    stats = {"train": {"examples": 140, "rows": 140, "truncated": 2, "dropped_no_supervised_token": 0}}
    data = in_units(stats, "pairs")
    assert data == {"train": {"pairs": 140, "rows": 140, "truncated": 2, "dropped_no_supervised_token": 0}}
    summary = {"step": 17, "pairs": 136, "tokens": 1000, "wall_seconds": 5, "loss/train": 0.25, "data": data}
    text = summary_text(summary, Path("run/summary.json"))
    assert text.startswith("done: 17 steps, 136 pairs, 1,000 tokens in")
    assert "loss: train 0.2500" in text and "data: train 140 pairs from 140 rows (2 truncated, 0 dropped)" in text
