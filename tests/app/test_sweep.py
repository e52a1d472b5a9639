"""Halyard as a Hydra application, through the real CLI on the tiny model: sweeps (basic, submitit_local, optuna),
every job checked first, the sweep table, stop and resubmit, --cfg, experiment files, accelerate_config."""

import json
import math
import os
import subprocess
import sys

import pytest
from omegaconf import OmegaConf

from conftest import DEMO_TRAIN, REPO, run_cli
from train.app.sweep import (
    BASIC_SWEEPER,
    JobRecord,
    best_job_line,
    best_row,
    format_table,
    merge_job_problems,
    plan_jobs,
    search_direction,
    sweep_rows,
)

SFT = ["loss=sft", "model=tiny", f"datasets=[{DEMO_TRAIN}]", "max_steps=2", "log_every_steps=1"]


def job_dirs(sweep_dir) -> list:
    return sorted(p for p in sweep_dir.iterdir() if p.is_dir() and not p.name.startswith("."))


def table_rows(sweep_dir) -> list[dict]:
    return json.loads((sweep_dir / "sweep_summary.json").read_text())


def summary(run_dir) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def test_plan_checks_every_combination_or_each_searched_value():
    basic = plan_jobs(OmegaConf.create({"_target_": BASIC_SWEEPER}), ["lr=1,2", "seed=0,1", "model=tiny"])
    assert basic.overrides == [
        ["lr=1", "seed=0", "model=tiny"],
        ["lr=1", "seed=1", "model=tiny"],
        ["lr=2", "seed=0", "model=tiny"],
        ["lr=2", "seed=1", "model=tiny"],
    ]
    assert basic.labels[3] == "job 3 (lr=2, seed=1)"
    assert (basic.swept_keys, basic.fixed_keys) == (["lr", "seed"], ["model"])
    search = OmegaConf.create({"_target_": "optuna", "params": {"lr": "tag(log, interval(1e-5, 1e-3))"}})
    planned = plan_jobs(search, ["++loss.beta=choice(0.1,0.2,0.3)"])
    # Each searched key at each choice or at both ends of its interval, the others at their first value.
    assert planned.overrides == [
        ["lr=1e-05", "++loss.beta=0.1"],
        ["lr=0.001", "++loss.beta=0.1"],
        ["lr=1e-05", "++loss.beta=0.2"],
        ["lr=1e-05", "++loss.beta=0.3"],
    ]
    assert planned.swept_keys == ["lr", "loss.beta"]


def test_problems_shared_by_every_job_are_listed_once():
    error = merge_job_problems(["job 0 (lr=1)", "job 1 (lr=-1)"], [["a"], ["a", "lr=-1.0: must be > 0"]])
    assert error.problems == ["a", "job 1 (lr=-1): lr=-1.0: must be > 0"]
    assert merge_job_problems(["job 0"], [[]]) is None


def test_table_formats_missing_values_as_dashes():
    row = {"job": 0, "overrides": "lr=1", "status": "failed", "loss/train": None, "loss/eval": None}
    table = format_table([{**row, "tokens_per_second": None, "wall_seconds": 1.25, "run_dir": "r"}])
    assert table.splitlines()[1].split() == ["0", "lr=1", "failed", "-", "-", "-", "1.2", "r"]


def test_table_rows_come_from_each_jobs_record_and_summary(tmp_path):
    JobRecord(0, ["lr=1"], "done", 0, 3.0, str(tmp_path / "0_lr=1")).write()
    totals = {"loss/train": 1.5, "loss/eval": 1.7, "tokens_per_second": 10.0, "wall_seconds": 2.5}
    (tmp_path / "0_lr=1" / "summary.json").write_text(json.dumps(totals))
    JobRecord(1, ["lr=2"], "running", -1, 0.0, str(tmp_path / "1_lr=2")).write()  # killed without reporting
    rows = sweep_rows(tmp_path)
    assert [(r["job"], r["status"], r["loss/eval"], r["wall_seconds"]) for r in rows] == [
        (0, "done", 1.7, 2.5),
        (1, "failed", None, 0.0),
    ]
    assert "ended without reporting" in rows[1]["error"]


def test_benchmark_metrics_get_a_column_and_the_objective_picks_the_best_job(tmp_path):
    """A column per benchmark metric any job reports (stderrs aside); the best job by sweep.objective in
    sweep.direction; loss/eval falls back to the train loss without eval data."""
    for num, (acc, loss) in enumerate([(0.5, 1.0), (0.75, 2.0), (None, 0.5)]):
        JobRecord(num, [f"lr={num}"], "done", 0, 1.0, str(tmp_path / f"{num}_lr={num}")).write()
        totals = {"loss/train": loss, "bench/mc/acc_stderr": 0.1} | ({"bench/mc/acc": acc} if acc else {})
        (tmp_path / f"{num}_lr={num}" / "summary.json").write_text(json.dumps(totals))
    rows = sweep_rows(tmp_path)
    header, *lines = format_table(rows).splitlines()
    assert header.split()[3:6] == ["loss/train", "loss/eval", "bench/mc/acc"]
    assert [line.split()[5] for line in lines] == ["0.5000", "0.7500", "-"]
    assert "bench/mc/acc_stderr" not in header
    assert best_row(rows, "bench/mc/acc", "maximize")["job"] == 1
    assert best_row(rows, "bench/mc/acc", "minimize")["job"] == 0
    assert best_row(rows, "loss/eval", "minimize")["job"] == 2  # no eval data: the train loss
    assert best_row(rows, "bench/other/acc", "maximize") is None
    config = OmegaConf.create({"sweep": {"objective": "bench/mc/acc", "direction": "maximize"}})
    assert best_job_line(rows, config) == "best job: 1 (lr=1), bench/mc/acc 0.7500 (maximize)\n"


def test_the_search_direction_comes_from_sweep_direction():
    optuna = OmegaConf.create({"direction": "minimize", "n_trials": 2})
    assert search_direction(optuna, "bench/mc/acc", "maximize") == (["hydra.sweeper.direction=maximize"], [])
    assert search_direction(optuna, "loss/eval", "minimize") == (["hydra.sweeper.direction=minimize"], [])
    assert search_direction(OmegaConf.create({"_target_": BASIC_SWEEPER}), "loss/eval", "maximize") == ([], [])
    overrides, (problem,) = search_direction(OmegaConf.create({"direction": "maximize"}), "loss/eval", "minimize")
    assert overrides == [] and "set sweep.direction=maximize" in problem


def test_cfg_job_prints_the_composed_config(tiny_cache):
    data = "datasets=[data/demo/pref_train.jsonl]"  # --cfg job checks the data and model as a run does
    result = run_cli(
        ["--cfg", "job", "model=tiny", f"cache_dir={tiny_cache}", data, "lr=0.5", "loss=dpo", "loss.beta=0.3"]
    )
    assert result.returncode == 0, result.stderr
    printed = OmegaConf.create(result.stdout)
    assert printed.lr == 0.5 and printed.loss.beta == 0.3 and printed.loss.name == "dpo"
    assert printed.model.max_length == 128  # from config/model/tiny.yaml
    assert printed.warmup_ratio == 0.1  # a schema default: every key is shown
    assert "hydra" not in printed


def test_the_slurm_preset_and_the_plugins_are_installed():
    shown = run_cli(["--cfg", "hydra", "hydra/launcher=slurm_gpu", "hydra.launcher.partition=gpu"])
    assert shown.returncode == 0, shown.stderr
    hydra = OmegaConf.create(shown.stdout).hydra
    assert hydra.launcher._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert (hydra.launcher.partition, hydra.launcher.gpus_per_node, hydra.launcher.tasks_per_node) == ("gpu", 8, 1)
    assert OmegaConf.to_container(hydra.run)["dir"] == "${run_dir}"  # a run's Hydra files go to its run directory
    info = run_cli(["--info", "plugins"])
    assert info.returncode == 0 and "SlurmLauncher" in info.stdout and "OptunaSweeper" in info.stdout


def test_a_sweep_with_a_bad_value_runs_nothing_and_names_the_job(tmp_path, tiny_cache):
    model = f"++model.name_or_path={tiny_cache / 'tiny-llama'}"  # every job's model is checked too: a real one here
    result = run_cli(["-m", *SFT, f"cache_dir={tmp_path}", "exp_name=bad", "lr=1e-3,-1", "model.batch_sise=4", model])
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "invalid configuration (2 problems)" in result.stderr, result.stderr
    assert "unknown key 'model.batch_sise' (did you mean 'model.batch_size'?)" in result.stderr  # every job: once
    assert "job 1 (lr=-1): lr=-1.0: must be > 0" in result.stderr
    assert not (tmp_path / "bad").exists()


@pytest.mark.slow  # ~30 s: an unknown task's close matches come from the index of every built-in task
def test_a_sweep_whose_objective_no_task_produces_runs_nothing(tmp_path, tiny_cache):
    """The objective and the tasks are checked with every job, before the first starts; a swept direction too."""
    from bench_helpers import TASK, write_task

    bench = [f"benchmarks.include_path={write_task(tmp_path / 'tasks')}", f"benchmarks.tasks=[{TASK},no_such_task]"]
    search = [f"sweep.objective=bench/{TASK}/accuracy", "sweep.direction=minimize,maximize"]
    result = run_cli(["-m", *SFT, f"cache_dir={tiny_cache}", "exp_name=bad-objective", *bench, *search])
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "invalid configuration (3 problems)" in result.stderr, result.stderr
    assert "sweep.direction says what the whole sweep optimizes and cannot take several values" in result.stderr
    assert "benchmarks.tasks: unknown task 'no_such_task'" in result.stderr
    assert f"sweep.objective=bench/{TASK}/accuracy: no task of benchmarks.tasks produces it" in result.stderr
    assert not (tiny_cache / "bad-objective").exists()


def test_a_sweep_under_several_processes_is_refused(tmp_path):
    """Under `accelerate launch` every process would run the whole sweep: refused, with what to do instead."""
    env_world = {**os.environ, "WORLD_SIZE": "2", "RANK": "0"}
    args = [sys.executable, str(REPO / "launch.py"), "-m", *SFT, f"cache_dir={tmp_path}", "lr=1,2"]
    result = subprocess.run(args, cwd=REPO, env=env_world, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "not under `accelerate launch`" in result.stderr


@pytest.mark.slow
def test_sweep_writes_a_run_per_job_and_a_table_and_a_resubmitted_sweep_continues(tiny_cache):
    """Two jobs: one finishes, the other is stopped by SIGTERM after step 2 (as SLURM preempts); resubmitted with
    resume_from_checkpoint=auto, the stopped job continues from its checkpoint."""
    args = ["-m", *SFT, f"cache_dir={tiny_cache}", "exp_name=sweep", "max_steps=1,3", "lr=1e-2"]
    os.environ["HALYARD_FAULTS"] = "sigterm@2"
    try:
        first = run_cli(args)
    finally:
        del os.environ["HALYARD_FAULTS"]
    sweep = tiny_cache / "sweep"
    assert first.returncode == 75, first.stderr[-3000:]
    assert [d.name for d in job_dirs(sweep)] == ["0_max_steps=1", "1_max_steps=3"]
    done, stopped = job_dirs(sweep)
    assert {"config.yaml", "metrics.jsonl", "summary.json", "FINAL", "job.json", "launch.log", ".hydra"} <= {
        p.name for p in done.iterdir()
    }
    assert (
        "max_steps: 1" in (done / "config.yaml").read_text()
        and f"run_dir: {done}" in (done / "config.yaml").read_text()
    )
    assert (stopped / "latest").read_text().strip() == "step-2" and not (stopped / "summary.json").exists()
    rows = table_rows(sweep)
    assert [(r["job"], r["overrides"], r["status"]) for r in rows] == [
        (0, "max_steps=1", "done"),
        (1, "max_steps=3", "stopped"),
    ]
    assert rows[0]["loss/train"] == summary(done)["loss/train"]
    assert rows[0]["tokens_per_second"] == summary(done)["tokens_per_second"]
    assert rows[1]["loss/train"] is not None  # its last logged loss
    assert "sweep " in first.stdout and "max_steps=3  stopped" in first.stdout
    assert (sweep / "sweep_summary.txt").read_text().splitlines()[0].split()[:3] == ["job", "overrides", "status"]

    again = run_cli([*args, "resume_from_checkpoint=auto"])
    assert again.returncode == 0, again.stderr[-3000:]
    assert [d.name for d in job_dirs(sweep)] == ["0_max_steps=1", "1_max_steps=3"]  # the same run directories
    assert f"resumed from {stopped}/step-2 at step 2" in again.stderr
    assert [r["status"] for r in table_rows(sweep)] == ["done", "done"]
    assert summary(stopped)["step"] == 3


@pytest.mark.slow
def test_the_same_sweep_through_submitit_local(tiny_cache):
    args = ["-m", "hydra/launcher=submitit_local", *SFT, f"cache_dir={tiny_cache}", "exp_name=submitit", "lr=1e-3,1e-2"]
    result = run_cli(args)
    assert result.returncode == 0, result.stderr[-3000:]
    sweep = tiny_cache / "submitit"
    assert [d.name for d in job_dirs(sweep)] == ["0_lr=0.001", "1_lr=0.01"]
    assert (sweep / ".submitit").is_dir()  # the jobs ran as submitit jobs
    rows = table_rows(sweep)
    assert [(r["overrides"], r["status"]) for r in rows] == [("lr=0.001", "done"), ("lr=0.01", "done")]
    for row, run_dir in zip(rows, job_dirs(sweep), strict=True):
        assert row["loss/train"] == summary(run_dir)["loss/train"]
    assert rows[0]["loss/train"] != rows[1]["loss/train"]  # the swept value reached each job


@pytest.mark.slow
def test_optuna_search_minimizes_the_final_eval_loss(tiny_cache):
    """config/experiment/lr_search.yaml (SFT with LoRA, searched with Optuna), 2 trials on the tiny model."""
    args = ["-m", "--config-dir", "config/experiment", "--config-name", "lr_search", "model=tiny"]
    result = run_cli([*args, f"cache_dir={tiny_cache}", "max_steps=2", "hydra.sweeper.n_trials=2"])
    assert result.returncode == 0, result.stderr[-3000:]
    sweep = tiny_cache / "lr-search"
    runs = job_dirs(sweep)
    assert len(runs) == 2 and all(d.name.startswith(f"{i}_lr=") for i, d in enumerate(runs))
    losses = [summary(d)["loss/eval"] for d in runs]
    best = OmegaConf.load(sweep / "optimization_results.yaml")
    assert best.best_value == pytest.approx(min(losses))
    assert all(json.loads((d / "job.json").read_text())["status"] == "done" for d in runs)
    assert OmegaConf.load(runs[0] / "config.yaml").model.use_peft is True  # the experiment's LoRA settings
    assert [r["loss/eval"] for r in table_rows(sweep)] == losses


@pytest.mark.slow
def test_optuna_search_maximizes_a_benchmark_metric(tiny_cache, tmp_path):
    """lr_search with sweep.objective=bench/<task>/brier_score and sweep.direction=maximize: Optuna's best trial is
    the job with the highest final value, the table has the metric's column, the best-job line names that job.
    (brier_score is continuous, so the trials differ; maximizing it tells the direction from the default.)"""
    from bench_helpers import TASK, write_task

    objective = f"bench/{TASK}/brier_score"
    args = ["-m", "--config-dir", "config/experiment", "--config-name", "lr_search", "model=tiny", "max_steps=2"]
    bench = [
        f"benchmarks.tasks=[{TASK}]",
        f"benchmarks.include_path={write_task(tmp_path)}",
        "benchmarks.limit_per_task=8",
    ]
    search = [f"sweep.objective={objective}", "sweep.direction=maximize", "hydra.sweeper.n_trials=2"]
    result = run_cli([*args, *bench, *search, f"cache_dir={tiny_cache}", "exp_name=bench-search"])
    assert result.returncode == 0, result.stderr[-3000:]
    sweep = tiny_cache / "bench-search"
    values = [summary(d)[objective] for d in job_dirs(sweep)]
    assert len(values) == 2 and values[0] != values[1]
    best = OmegaConf.load(sweep / "optimization_results.yaml")
    assert best.best_value == pytest.approx(max(values))
    assert [row[objective] for row in table_rows(sweep)] == values
    assert objective in (sweep / "sweep_summary.txt").read_text().splitlines()[0].split()
    assert f"best job: {values.index(max(values))} (" in result.stdout
    assert f"{objective} {max(values):.4f} (maximize)" in result.stdout


@pytest.mark.slow
def test_dpo_experiment_file_runs_its_processes_through_accelerate(tiny_cache):
    """config/experiment/dpo.yaml through --config-dir/--config-name, with accelerate_config: two processes."""
    args = ["--config-dir", "config/experiment", "--config-name", "dpo", "model=tiny", f"cache_dir={tiny_cache}"]
    result = run_cli([*args, "max_steps=2", "accelerate_config=accelerate_config/cpu_2proc.yaml"])
    assert result.returncode == 0, result.stderr[-3000:]
    run = tiny_cache / "dpo"
    config = OmegaConf.load(run / "config.yaml")
    assert (config.loss.name, config.reference.precompute, config.exp_name) == ("dpo", True, "dpo")
    assert config.accelerate_config is None  # the processes were told not to relaunch
    done = summary(run)
    assert (done["num_processes"], done["step"]) == (2, 2)
    assert math.isfinite(done["loss/eval"])
