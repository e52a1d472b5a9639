"""Running one job's processes through `accelerate launch` (the `accelerate_config` key).

`python launch.py accelerate_config=accelerate_config/fsdp_8gpu.yaml ...` starts `accelerate launch --config_file
<that file> launch.py <the same overrides>` and waits for it. This is how each job of a sweep becomes a multi-GPU
job: Hydra's launcher (the basic one, or submitit on a SLURM node) starts one Python process per job, and that
process starts the job's training processes. The child gets `accelerate_config=null`, so it never relaunches.

This module imports no torch: validation reads the planned number of processes from here.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
from pathlib import Path

from omegaconf import OmegaConf

from train.errors import HalyardError

logger = logging.getLogger(__name__)

# `accelerate launch` sets this in every process it starts, single-process or distributed.
ACCELERATE_MARKER = "ACCELERATE_MIXED_PRECISION"


def launched_by_accelerate() -> bool:
    return ACCELERATE_MARKER in os.environ


def planned_world_size(accelerate_config: str | None) -> int:
    """The number of training processes of this job: the accelerate config's `num_processes` (summed over
    machines) when this process will relaunch through it, else the world size this process runs in."""
    if accelerate_config and not launched_by_accelerate():
        settings = read_accelerate_config(accelerate_config)
        if settings is not None:
            return int(settings.get("num_processes", 1) or 1)
    return int(os.environ.get("WORLD_SIZE", "1"))


def planned_fsdp(accelerate_config: str | None) -> bool:
    """Whether this job's processes shard the model with FSDP: the accelerate config's `distributed_type` when this
    process will relaunch through it, else what `accelerate launch` told this process (train/loop/distributed.py)."""
    if accelerate_config and not launched_by_accelerate():
        settings = read_accelerate_config(accelerate_config) or {}
        return str(settings.get("distributed_type", "")).upper() == "FSDP"
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def read_accelerate_config(path: str) -> dict | None:
    """The accelerate config as a dict, or None when the file cannot be read (validation reports it)."""
    try:
        settings = OmegaConf.to_container(OmegaConf.load(path))
    except (OSError, ValueError):
        return None
    return settings if isinstance(settings, dict) else None


def accelerate_config_problem(path: str) -> str | None:
    if not Path(path).is_file():
        return f"accelerate_config={path!r}: no such file; give one of accelerate_config/*.yaml or your own"
    settings = read_accelerate_config(path)
    if settings is None or not isinstance(settings.get("num_processes", 1), int):
        return f"accelerate_config={path!r}: not an accelerate config (a YAML mapping with num_processes)"
    return None


def accelerate_command(accelerate_config: str, script: str, overrides: list[str]) -> list[str]:
    """The `accelerate launch` command line of a job: machine rank and address from SLURM for a multi-node job
    (one task per node), and a free port on a single machine, where several local jobs may run at once."""
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", accelerate_config]
    settings = read_accelerate_config(accelerate_config) or {}
    machines = int(settings.get("num_machines", 1) or 1)
    if machines > 1 and "SLURM_JOB_ID" in os.environ:
        command += ["--machine_rank", os.environ.get("SLURM_NODEID", "0"), "--main_process_ip", _slurm_head_node()]
    elif machines == 1 and int(settings.get("num_processes", 1) or 1) > 1:
        command += ["--main_process_port", str(_free_port())]
    return command + [script, *overrides]


def _slurm_head_node() -> str:
    """The first host of the SLURM allocation: machine 0, the rendezvous of every node."""
    nodes = os.environ.get("SLURM_JOB_NODELIST", "")
    try:
        hosts = subprocess.run(["scontrol", "show", "hostnames", nodes], capture_output=True, text=True, check=True)
        return hosts.stdout.split()[0]
    except (OSError, subprocess.CalledProcessError, IndexError):
        raise HalyardError(
            f"cannot find the first node of the SLURM allocation {nodes!r} (scontrol show hostnames failed)"
        ) from None


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run_through_accelerate(command: list[str]) -> int:
    """Run the job's processes under `train.supervise` and wait; return their exit code, 75 when a signal stopped
    them with their checkpoint written (accelerate itself would report that as a failure, exit code 1).

    SIGTERM and SIGINT sent to this process go to the training processes only, once. Under SLURM, which signals
    every process of the job itself, they are not passed on (and a stop delivered twice counts once anyway)."""
    from train.supervise import supervise

    logger.info("starting the job's processes: " + " ".join(command))
    return supervise(command, forward_signals="SLURM_JOB_ID" not in os.environ)
