"""train/app/runtime.py: the run directory (made and given its resolved config by the main process only, trackers
started where enabled, a directory that cannot be made reported as a user error) and the Accelerator it builds."""

import dataclasses

import pytest
import torch
from omegaconf import OmegaConf

import launch
from conftest import DEMO_TRAIN
from train.app.runtime import build_accelerator, prepare_run_dir
from train.errors import HalyardError
from train.loop.run_files import CONFIG_FILE


class FakeAccelerator:
    def __init__(self, is_main_process: bool = True):
        self.is_main_process = is_main_process
        self.calls = []

    def wait_for_everyone(self):
        self.calls.append("wait")

    def init_trackers(self, project, config):
        self.calls.append(("trackers", project, config))


def config(tmp_path, *overrides):
    return launch.compose_config(
        ["model=tiny", f"datasets=[{DEMO_TRAIN}]", f"cache_dir={tmp_path}", "exp_name=run", *overrides]
    )


def test_the_main_process_makes_the_run_dir_and_writes_the_resolved_config(tmp_path):
    cfg = config(tmp_path, "loss=dpo", "loss.beta=0.25", "lr=3e-4")
    accelerator = FakeAccelerator()
    prepare_run_dir(cfg, accelerator)
    written = OmegaConf.load(tmp_path / "run" / CONFIG_FILE)
    assert (written.loss.name, written.loss.beta, written.lr) == ("dpo", 0.25, 3e-4)
    assert written.run_dir == cfg.run_dir == str(tmp_path / "run")
    assert accelerator.calls == ["wait"]  # no tracker enabled: none started


def test_other_processes_write_nothing_but_wait_for_the_main_one(tmp_path):
    accelerator = FakeAccelerator(is_main_process=False)
    prepare_run_dir(config(tmp_path), accelerator)
    assert not (tmp_path / "run").exists()
    assert accelerator.calls == ["wait"]


def test_enabled_trackers_start_with_the_flat_config(tmp_path):
    accelerator = FakeAccelerator()
    prepare_run_dir(config(tmp_path, "tensorboard.enabled=true", "wandb.project=proj"), accelerator)
    (_, project, flat) = accelerator.calls[1]
    assert accelerator.calls[0] == "wait" and project == "proj"
    assert flat["loss.name"] == "sft" and flat["tensorboard.enabled"] is True  # dotted keys, one level


def test_a_run_dir_that_cannot_be_made_is_a_user_error_naming_it(tmp_path):
    (tmp_path / "file").write_text("")  # a file where the run directory's parent should be
    cfg = dataclasses.replace(config(tmp_path), run_dir=str(tmp_path / "file" / "run"))
    with pytest.raises(HalyardError, match="file/run"):
        prepare_run_dir(cfg, FakeAccelerator())


def test_the_accelerator_computes_in_float32_where_asked_with_tensorboard_when_asked(tmp_path):
    accelerator = build_accelerator(config(tmp_path, "model.dtype=float32", "tensorboard.enabled=true"))
    assert accelerator.mixed_precision == "no"
    assert accelerator.device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert accelerator.project_dir == str(tmp_path / "run")
    assert [type(t).__name__ for t in accelerator.log_with] == ["TensorBoardTracker"]
