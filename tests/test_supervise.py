"""A stop by signal through the launchers: `python -m train.supervise accelerate launch ...` (one and two processes)
and `... torchrun ...` end with the documented message and exit code 75, with no traceback."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

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


@pytest.mark.parametrize(
    ("launcher", "config", "sig"),
    [
        (accelerate_launcher, "cpu_single_process.yaml", signal.SIGINT),
        (accelerate_launcher, "cpu_2proc.yaml", signal.SIGTERM),
        (torchrun_launcher, "torchrun_2proc", signal.SIGINT),
    ],
)
def test_signal_under_a_launcher_exits_75_without_traceback(tiny_cache, launcher, config, sig):
    exp = f"supervised_{config.split('.')[0]}"
    args = [
        "loss=sft", "model=tiny", f"cache_dir={tiny_cache}", f"exp_name={exp}", f"datasets=[{DEMO_TRAIN}]",
        "n_epochs=1000", "log_every_steps=1", "model.batch_size=2",
    ]  # fmt: skip
    command = [sys.executable, "-m", "train.supervise", *launcher(config), str(REPO / "launch.py"), *args]
    env = {**os.environ, **OFFLINE_ENV, "PYTHONPATH": str(REPO)}
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while last_step(tiny_cache / exp) < 2 and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    process.send_signal(sig)  # as Ctrl-C or a scheduler's preemption would, to the command the user ran
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 75, stderr[-3000:]
    assert f"halyard: stopped by {sig.name} after step" in stderr and "resume_from_checkpoint=auto" in stderr
    assert "Traceback" not in stderr and "CalledProcessError" not in stderr
    step = int(stderr.split(f"stopped by {sig.name} after step ")[1].split(";")[0])
    assert (tiny_cache / exp / f"step-{step}").is_dir()
