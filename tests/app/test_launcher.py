"""train/app/launcher.py: reading an accelerate config (the planned number of processes, what is wrong with a file)
and the `accelerate launch` command line of a job on one machine and on several SLURM nodes."""

import subprocess
import sys

import pytest

from conftest import REPO
from train.app import launcher
from train.app.launcher import (
    ACCELERATE_MARKER,
    accelerate_command,
    accelerate_config_problem,
    launched_by_accelerate,
    planned_world_size,
    read_accelerate_config,
)
from train.errors import HalyardError

CONFIGS = REPO / "accelerate_config"


@pytest.fixture(autouse=True)
def plain_environment(monkeypatch):
    """A process started by hand: no accelerate, no torchrun, no SLURM."""
    for name in (ACCELERATE_MARKER, "WORLD_SIZE", "SLURM_JOB_ID", "SLURM_NODEID", "SLURM_JOB_NODELIST"):
        monkeypatch.delenv(name, raising=False)


def test_read_accelerate_config_gives_the_mapping_or_none(tmp_path):
    assert read_accelerate_config(str(CONFIGS / "cpu_2proc.yaml"))["num_processes"] == 2
    assert read_accelerate_config(str(tmp_path / "missing.yaml")) is None
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    assert read_accelerate_config(str(tmp_path / "list.yaml")) is None  # YAML, but not a mapping


def test_planned_world_size_is_the_configs_processes_before_relaunching(monkeypatch):
    assert planned_world_size(str(CONFIGS / "fsdp_8gpu.yaml")) == 8
    assert planned_world_size(str(CONFIGS / "fsdp_2node_8gpu.yaml")) == 16  # summed over the 2 machines
    assert planned_world_size(str(CONFIGS / "cpu_single_process.yaml")) == 1
    assert planned_world_size(None) == 1
    monkeypatch.setenv("WORLD_SIZE", "4")  # torchrun, or a process accelerate started
    assert planned_world_size(None) == 4


def test_planned_world_size_inside_accelerate_is_the_world_it_runs_in(monkeypatch):
    monkeypatch.setenv(ACCELERATE_MARKER, "no")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert launched_by_accelerate()
    assert planned_world_size(str(CONFIGS / "fsdp_8gpu.yaml")) == 2  # the child does not relaunch


def test_planned_world_size_of_an_unreadable_config_falls_back_to_the_world_size(tmp_path):
    assert planned_world_size(str(tmp_path / "missing.yaml")) == 1  # validation reports the file itself


def test_accelerate_config_problem_names_the_file_and_the_fix(tmp_path):
    assert accelerate_config_problem(str(CONFIGS / "cpu_2proc.yaml")) is None
    missing = accelerate_config_problem(str(tmp_path / "nope.yaml"))
    assert "nope.yaml" in missing and "no such file" in missing and "accelerate_config/*.yaml" in missing
    (tmp_path / "bad.yaml").write_text("num_processes: two\n")
    assert "not an accelerate config" in accelerate_config_problem(str(tmp_path / "bad.yaml"))


def test_one_process_on_one_machine_needs_no_port():
    config = str(CONFIGS / "cpu_single_process.yaml")
    command = accelerate_command(config, "launch.py", ["loss=sft", "accelerate_config=null"])
    assert command == [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", config,
        "launch.py", "loss=sft", "accelerate_config=null",
    ]  # fmt: skip


def test_several_processes_on_one_machine_get_a_free_port(monkeypatch):
    monkeypatch.setattr(launcher, "_free_port", lambda: 29123)
    command = accelerate_command(str(CONFIGS / "cpu_2proc.yaml"), "launch.py", ["loss=dpo"])
    assert command[5:] == ["--main_process_port", "29123", "launch.py", "loss=dpo"]
    assert 0 < launcher._free_port() < 65536


def test_a_multi_node_job_under_slurm_takes_its_rank_and_head_node_from_slurm(monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    monkeypatch.setenv("SLURM_NODEID", "1")
    monkeypatch.setenv("SLURM_JOB_NODELIST", "gpu[07-08]")
    calls = []

    def scontrol(command, **kwargs):
        calls.append(command)
        return subprocess.CompletedProcess(command, 0, stdout="gpu07\ngpu08\n")

    monkeypatch.setattr(launcher.subprocess, "run", scontrol)
    command = accelerate_command(str(CONFIGS / "fsdp_2node_8gpu.yaml"), "launch.py", [])
    assert command[5:] == ["--machine_rank", "1", "--main_process_ip", "gpu07", "launch.py"]
    assert calls == [["scontrol", "show", "hostnames", "gpu[07-08]"]]


def test_a_slurm_head_node_that_cannot_be_found_is_a_user_error(monkeypatch):
    monkeypatch.setenv("SLURM_JOB_NODELIST", "gpu[07-08]")

    def no_scontrol(command, **kwargs):
        raise FileNotFoundError("scontrol")

    monkeypatch.setattr(launcher.subprocess, "run", no_scontrol)
    with pytest.raises(HalyardError, match=r"first node of the SLURM allocation 'gpu\[07-08\]'"):
        launcher._slurm_head_node()


def test_planned_fsdp_reads_the_config_before_launch_and_the_environment_after(monkeypatch):
    """What validation refuses quantization under: FSDP from the accelerate config this process will relaunch
    through, or from the environment `accelerate launch --config_file <fsdp config>` gave this process."""
    from train.app.launcher import planned_fsdp

    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    assert planned_fsdp(str(CONFIGS / "fsdp_offload_cpu_2proc.yaml")) and planned_fsdp(str(CONFIGS / "fsdp_8gpu.yaml"))
    assert not planned_fsdp(str(CONFIGS / "cpu_2proc.yaml")) and not planned_fsdp(None)
    monkeypatch.setenv(ACCELERATE_MARKER, "no")  # started by accelerate launch
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    assert planned_fsdp(None) and planned_fsdp(str(CONFIGS / "cpu_2proc.yaml"))  # what was launched decides
