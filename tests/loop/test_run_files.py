"""The files of a run directory (train/loop/run_files.py): what a launch writes before the run, as Hydra is
configured to write it."""

from pathlib import Path

from conftest import DEMO_TRAIN
from train.loop import run_files


def test_launch_files_are_hydra_s_and_the_job_s():
    assert run_files.HYDRA_FILES == (".hydra", "launch.log")
    assert set(run_files.LAUNCH_FILES) == {".hydra", "launch.log", "job.json"}
    assert run_files.JOB_FILE in run_files.LAUNCH_FILES


def test_hydra_writes_the_files_named_here():
    """config/config.yaml and config/hydra/job_logging/halyard.yaml send Hydra's output subfolder and its log into
    the run directory under these names."""
    from omegaconf import OmegaConf

    import launch

    hydra = OmegaConf.to_container(launch.compose_raw(["model=tiny", f"datasets=[{DEMO_TRAIN}]"], None, "config").hydra)
    assert hydra["output_subdir"] == ".hydra"
    log_files = [h["filename"] for h in hydra["job_logging"]["handlers"].values() if "filename" in h]
    # Hydra names the job (and so its log) after the script it runs: launch.py.
    assert log_files == ["${hydra.runtime.output_dir}/${hydra.job.name}.log"]
    assert f"{Path(launch.__file__).stem}.log" in run_files.HYDRA_FILES
