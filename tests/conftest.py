"""Shared fixtures: offline environment, the tiny model, and a helper that runs the real CLI in a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "WANDB_MODE": "offline",
    "TOKENIZERS_PARALLELISM": "false",
}
os.environ.update(OFFLINE_ENV)

DEMO_TRAIN = str(REPO / "data" / "demo" / "train.jsonl")
DEMO_EVAL = str(REPO / "data" / "demo" / "eval.jsonl")


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory) -> Path:
    """A cache_dir holding tiny-llama/ (ChatML), the folder config/model/tiny.yaml points at."""
    import make_tiny_model

    cache = tmp_path_factory.mktemp("cache")
    make_tiny_model.make(cache / "tiny-llama", "chatml")
    return cache


@pytest.fixture(scope="session")
def tiny_tokenizers(tmp_path_factory) -> dict:
    """Tokenizers in three chat template styles: ChatML, Llama 3 and [INST]."""
    import make_tiny_model

    return {style: make_tiny_model.build_tokenizer(style) for style in make_tiny_model.TEMPLATES}


def run_cli(
    args: list[str], launcher: list[str] | None = None, timeout: int = 300, cwd: Path = REPO
) -> subprocess.CompletedProcess:
    """Run `python launch.py ARGS` (or `LAUNCHER launch.py ARGS`) from `cwd` (the repo root); never raises."""
    command = (launcher or [sys.executable]) + [str(REPO / "launch.py"), *args]
    env = {**os.environ, **OFFLINE_ENV, "PYTHONPATH": str(REPO)}
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
