"""A stop by signal through the launchers: `python -m train.supervise accelerate launch ...` (one and two processes)
and `... torchrun ...` end with the documented message and exit code 75, with no traceback."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_launch import accelerate_launcher

from conftest import DEMO_TRAIN, OFFLINE_ENV, REPO

pytestmark = pytest.mark.slow


def last_step(run_dir) -> int:
    metrics = run_dir / "metrics.jsonl"
    lines = metrics.read_text().splitlines() if metrics.exists() else []
    return max((json.loads(line).get("step", 0) for line in lines if line.strip()), default=-1)


def torchrun_launcher(_config: str) -> list[str]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port)]


ACCELERATE = str(Path(sys.executable).parent / "accelerate")  # the venv's console script, as the README types it
README_LAUNCH = [ACCELERATE, "launch", "--config_file", "accelerate_config/cpu_single_process.yaml", "launch.py"]


def train_args(cache, exp: str) -> list[str]:
    return [
        "loss=sft", "model=tiny", f"cache_dir={cache}", f"exp_name={exp}", f"datasets=[{DEMO_TRAIN}]",
        "n_epochs=1000", "log_every_steps=1", "model.batch_size=2",
    ]  # fmt: skip


def stop_by_signal(command: list[str], run_dir: Path, sig: signal.Signals) -> tuple[int, str]:
    """Run `command` from the repo root as a terminal's foreground job (its own process group), send `sig` to that
    group once step 2 is logged, as Ctrl-C or `kill` would; return the exit code and stderr."""
    env = {**os.environ, **OFFLINE_ENV}
    process = subprocess.Popen(
        command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    deadline = time.monotonic() + 120
    while last_step(run_dir) < 2 and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    if process.poll() is None:
        os.killpg(process.pid, sig)
    _, stderr = process.communicate(timeout=120)
    return process.returncode, stderr


def assert_clean_stop(code: int, stderr: str, run_dir: Path, sig: signal.Signals) -> None:
    """Exit code 75, the stop message once, no traceback, and the checkpoint it names on disk."""
    assert code == 75, stderr[-3000:]
    assert stderr.count("halyard: stopped by") == 1, stderr[-3000:]
    assert f"halyard: stopped by {sig.name} after step" in stderr and "resume_from_checkpoint=auto" in stderr
    assert "Traceback" not in stderr and "CalledProcessError" not in stderr and "RuntimeError" not in stderr
    step = int(stderr.split(f"stopped by {sig.name} after step ")[1].split(";")[0])
    assert (run_dir / f"step-{step}").is_dir()


def test_ctrl_c_under_supervise_and_the_readme_accelerate_command(tiny_cache):
    """`python -m train.supervise accelerate launch --config_file accelerate_config/cpu_single_process.yaml
    launch.py ...`, typed as in the README. Accelerate quotes the child's log (stop message included) in its
    CalledProcessError, which the supervisor drops: the message is shown once."""
    exp = "supervised_readme"
    command = [sys.executable, "-m", "train.supervise", *README_LAUNCH, *train_args(tiny_cache, exp)]
    assert_clean_stop(*stop_by_signal(command, tiny_cache / exp, signal.SIGINT), tiny_cache / exp, signal.SIGINT)


def test_ctrl_c_with_accelerate_config_exits_75_once(tiny_cache):
    """`python launch.py accelerate_config=accelerate_config/cpu_single_process.yaml ...`: Halyard starts
    `accelerate launch` itself, supervised."""
    exp = "accelerate_config_stop"
    config = "accelerate_config=accelerate_config/cpu_single_process.yaml"
    command = [sys.executable, "launch.py", config, *train_args(tiny_cache, exp)]
    assert_clean_stop(*stop_by_signal(command, tiny_cache / exp, signal.SIGINT), tiny_cache / exp, signal.SIGINT)


@pytest.mark.parametrize(
    ("launcher", "config", "sig"),
    [
        (accelerate_launcher, "cpu_2proc.yaml", signal.SIGTERM),
        (torchrun_launcher, "torchrun_2proc", signal.SIGINT),
    ],
)
def test_signal_under_a_launcher_exits_75_without_traceback(tiny_cache, launcher, config, sig):
    exp = f"supervised_{config.split('.')[0]}"
    command = [sys.executable, "-m", "train.supervise", *launcher(config), "launch.py", *train_args(tiny_cache, exp)]
    assert_clean_stop(*stop_by_signal(command, tiny_cache / exp, sig), tiny_cache / exp, sig)
