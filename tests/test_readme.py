"""Every shell command of the README's usage sections runs as typed, in order, from a fresh checkout's layout.

The commands run in a temporary folder laid out like the project after its set-up (the code, data and configs,
`.venv`, an empty `runs/`), with HOME pointing at a folder whose `.cache/halyard/models/SmolLM2-135M-Instruct` is the
2-layer test model: so `model=smollm2` resolves exactly as typed, but trains in seconds. Training commands get
`max_steps=2` appended; nothing else is changed.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import OFFLINE_ENV, REPO

pytestmark = pytest.mark.slow

USAGE_SECTIONS = (
    "Set-up: two commands",
    "Training your own model",
    "Chat, plots, sharing and cleaning up",
    "Preference optimization and continued pretraining",
    "Evaluation",
    "Big models",
)
SKIPPED = {  # text of a command: why this test does not run it
    "bash scripts/quickstart.sh": "installs the project and trains SmolLM2-135M for ~5 minutes (CI installs already)",
    "bash scripts/test.sh": "runs the whole test suite, this test included",
}
LAYOUT = ("launch.py", "train", "config", "scripts", "data", "accelerate_config", "pyproject.toml", "constraints.txt")


def usage_commands(readme: str) -> list[str]:
    """The commands of the ```bash blocks whose nearest heading is a usage section; continuation lines joined,
    comment lines dropped."""
    commands, heading = [], None
    for match in re.finditer(r"^(#{2,4}) ([^\n]+)$|^```bash\n(.*?)^```", readme, re.MULTILINE | re.DOTALL):
        if match.group(2):
            heading = match.group(2).strip()
            continue
        if heading not in USAGE_SECTIONS:
            continue
        text = match.group(3).replace("\\\n", " ")
        commands += [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return commands


def checkout(root: Path, tiny_model: Path) -> dict[str, str]:
    """A project folder as after set-up, and the environment to run its commands in."""
    for name in LAYOUT:
        (root / name).symlink_to(REPO / name)
    (root / ".venv").symlink_to(sys.prefix)  # the virtualenv running the tests
    (root / "runs").mkdir()
    models = root / "home" / ".cache" / "halyard" / "models"
    models.mkdir(parents=True)
    (models / "SmolLM2-135M-Instruct").symlink_to(tiny_model)
    env = {**os.environ, **OFFLINE_ENV, "HOME": str(root / "home"), "PYTHONPATH": str(REPO)}
    env.setdefault("OMP_NUM_THREADS", "2")  # under xdist, conftest has set each worker's share of the cores
    return env


def test_the_readme_usage_commands_run_as_typed(tiny_cache, tmp_path):
    commands = usage_commands((REPO / "README.md").read_text())
    assert any("launch.py" in c for c in commands) and any("generate.py" in c for c in commands)
    skipped = {pattern: [c for c in commands if pattern in c] for pattern in SKIPPED}
    assert all(len(found) == 1 for found in skipped.values()), skipped  # the list of skips stays exact
    env = checkout(tmp_path, tiny_cache / "tiny-llama")
    for command in commands:
        if any(pattern in command for pattern in SKIPPED):
            continue
        assert command.startswith((".venv/bin/python ", ".venv/bin/accelerate ")), f"not run from .venv: {command}"
        if "launch.py" in command and "--help" not in command:
            command = re.sub(r"\s+#.*$", "", command) + " max_steps=2"
        result = subprocess.run(
            command, shell=True, cwd=tmp_path, env=env, capture_output=True, text=True, stdin=subprocess.DEVNULL,
            timeout=300, executable="/bin/bash",
        )  # fmt: skip
        assert result.returncode == 0 and "Traceback" not in result.stderr, f"{command}\n{result.stderr[-3000:]}"
    assert (tmp_path / "runs" / "lora-run" / "metrics.png").exists() and (tmp_path / "runs" / "answers.jsonl").exists()
