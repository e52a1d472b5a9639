"""Sweeps (`python launch.py -m ...`): every job checked before the first starts, one run directory per job, and
the sweep's table.

A sweep's folder is `hydra.sweep.dir` (default `${cache_dir}/${exp_name}`); each job's run directory is
`<sweep folder>/<job number>_<its swept values>` (e.g. `runs/lr-sweep/1_lr=0.0001/`), holding what a single run's
directory holds plus `job.json` (its overrides, status and wall time). At the end the sweep's table (overrides, final
train and eval loss, a column per benchmark metric, tokens/s, wall time, status) is written to `sweep_summary.txt` and
`sweep_summary.json` in the sweep's folder and printed, with the best job by `sweep.objective` and `sweep.direction`
(which an Optuna search optimizes too).

This module imports no torch: checking a sweep of many jobs takes seconds.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, Override, RangeSweep
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf, open_dict

from train.errors import ConfigError
from train.loop.benchmarks import task_and_metric
from train.loop.run_files import JOB_FILE, METRICS_FILE, SUMMARY_FILE, TABLE_FILE, TABLE_JSON

logger = logging.getLogger(__name__)

BASIC_SWEEPER = "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"
# Set by the sweep itself: one folder per sweep, one run directory per job.
SWEEP_OWNED_KEYS = ("run_dir", "exp_name", "cache_dir")


@dataclass
class PlannedJobs:
    """The jobs a sweep checks before it starts: each job's overrides, and how it is named in messages."""

    overrides: list[list[str]]
    labels: list[str]
    swept_keys: list[str]  # keys whose value differs between jobs
    fixed_keys: list[str]  # keys every job overrides the same way


def plan_jobs(sweeper: DictConfig, arguments: list[str]) -> PlannedJobs:
    """The jobs to check. The basic sweeper's jobs are exactly the ones it will run (every combination); a search
    (optuna) picks values as it goes, so each searched key is checked at each choice, or at both ends of its
    range, with the other keys at their first value."""
    params = sweeper.get("params") or {}
    parsed = OverridesParser.create().parse_overrides([f"{k}={v}" for k, v in params.items()] + list(arguments))
    options = {override.get_key_element(): _overrides_to_check(override) for override in parsed}
    swept = [key for key, choices in options.items() if len(choices) > 1]
    if sweeper.get("_target_") == BASIC_SWEEPER:
        jobs = [[]]
        for choices in options.values():
            jobs = [job + [choice] for job in jobs for choice in choices]
    else:
        first = {key: choices[0] for key, choices in options.items()}
        jobs = [list(first.values())]
        jobs += [[{**first, key: choice}[k] for k in options] for key in swept for choice in options[key][1:]]
    labels = [_label(number, job, swept) for number, job in enumerate(jobs)]
    fixed = [_bare(key) for key in options if key not in swept]
    return PlannedJobs(jobs, labels, swept_keys=[_bare(key) for key in swept], fixed_keys=fixed)


def _overrides_to_check(override: Override) -> list[str]:
    """The override as each job to check gets it: one per choice, or the two ends of a range."""
    if not override.is_sweep_override():
        return [override.input_line]
    key, value = override.get_key_element(), override.value()
    if isinstance(value, ChoiceSweep | RangeSweep):
        return [f"{key}={choice}" for choice in override.sweep_string_iterator()]
    if isinstance(value, IntervalSweep):
        return [f"{key}={value.start}", f"{key}={value.end}"]
    return [override.input_line]


def _bare(key: str) -> str:
    return key.lstrip("+~")


def _label(number: int, job: list[str], swept: list[str]) -> str:
    chosen = [_bare(item) for item in job if item.split("=", 1)[0] in swept]
    return f"job {number}" + (f" ({', '.join(chosen)})" if chosen else "")


def sweep_problems(planned: PlannedJobs) -> list[str]:
    """Overrides a sweep cannot take: the keys that name its folder and its jobs' run directories."""
    return (
        [
            f"{key} is set by the sweep (each job's run directory is <hydra.sweep.dir>/<job>_<its values>); "
            f"do not sweep or set it with -m, set exp_name (or hydra.sweep.dir) to name the sweep's folder"
            for key in ("run_dir",)
            if key in planned.swept_keys + planned.fixed_keys
        ]
        + [
            f"{key} names the sweep's folder and cannot take several values; sweep other keys"
            for key in SWEEP_OWNED_KEYS[1:]
            if key in planned.swept_keys
        ]
        + [
            f"{key} says what the whole sweep optimizes and cannot take several values; run one sweep per objective"
            for key in ("sweep.objective", "sweep.direction")
            if key in planned.swept_keys
        ]
    )


def search_direction(sweeper: DictConfig, objective: str, direction: str) -> tuple[list[str], list[str]]:
    """The Hydra override that makes a search (Optuna) optimize in `direction` (sweep.direction, the one home of it),
    and the problems: a sweeper direction set the other way (Optuna's default is minimize, so that was asked for)."""
    if "direction" not in sweeper:
        return [], []
    asked = sweeper.direction
    asked = getattr(asked, "name", asked)  # the optuna sweeper's schema makes it an enum, Direction.minimize
    if asked != direction and not (asked == "minimize" and direction == "maximize"):
        return [], [
            f"hydra.sweeper.direction={asked} but sweep.direction={direction}: Halyard sets the search's direction "
            f"from sweep.direction (what sweep.objective={objective} should do); set sweep.direction={asked}"
        ]
    return [f"hydra.sweeper.direction={direction}"], []


def merge_job_problems(labels: list[str], problems_by_job: list[list[str]]) -> ConfigError | None:
    """One error listing every problem; a problem that every job shares is listed once, the others name their job."""
    if not any(problems_by_job):
        return None
    shared = [p for p in problems_by_job[0] if all(p in others for others in problems_by_job)]
    listed = list(shared)
    for label, problems in zip(labels, problems_by_job, strict=True):
        listed += [f"{label}: {p}" for p in problems if p not in shared]
    return ConfigError(listed)


@dataclass
class JobRecord:
    """What a job of a sweep reports about itself (`job.json` in its run directory)."""

    num: int
    overrides: list[str]  # the swept values that name the job
    status: str  # done | failed | stopped (running while the job runs)
    exit_code: int
    wall_seconds: float
    run_dir: str
    error: str | None = None

    def write(self) -> None:
        Path(self.run_dir).mkdir(parents=True, exist_ok=True)
        (Path(self.run_dir) / JOB_FILE).write_text(json.dumps(asdict(self), indent=2) + "\n")


def run_sweep_job(raw: DictConfig, hydra_cfg: DictConfig, run_job: Callable) -> float | None:
    """One job of a sweep (Hydra's task function in multirun mode): its run directory is its folder of the sweep;
    `run_job(raw, hydra_cfg) -> (exit code, error message)` trains it. Records the outcome in job.json (first as
    "running", so that a job killed outright is reported) and returns what a search minimizes (None when it did
    not finish). Never raises: one job's failure does not stop the sweep."""
    started = time.perf_counter()
    run_dir = hydra_cfg.runtime.output_dir
    with open_dict(raw):
        raw.run_dir = run_dir
    excluded = set(hydra_cfg.job.config.override_dirname.exclude_keys)
    swept = [o.lstrip("+") for o in hydra_cfg.overrides.task if o.split("=", 1)[0].lstrip("+~") not in excluded]
    record = JobRecord(num=hydra_cfg.job.num, overrides=swept, status="running", exit_code=-1, wall_seconds=0.0,
                       run_dir=run_dir)  # fmt: skip
    reports = os.environ.get("SLURM_PROCID", "0") == "0"  # a multi-node job runs this on every node; node 0 reports
    if reports:
        record.write()
    try:
        code, error = run_job(raw, hydra_cfg)
    except Exception as failure:  # a bug or a crash: this job failed, the sweep goes on
        logger.exception(f"job {hydra_cfg.job.num} failed")
        code, error = 1, f"{type(failure).__name__}: {failure}"
    finally:
        _reset_accelerate()
    record.status, record.exit_code, record.error = status_of(code), code, error
    record.wall_seconds = time.perf_counter() - started
    if reports:
        record.write()
    return objective(run_dir, str(raw.sweep.objective)) if code == 0 else None


def _reset_accelerate() -> None:
    """Forget Accelerate's process-wide state between the jobs of a sweep run in one process (the next job may
    ask for another mixed precision)."""
    if "accelerate" in sys.modules:
        from accelerate.state import AcceleratorState, GradientState

        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()


def status_of(exit_code: int) -> str:
    from train.loop.faults import TrainingStopped

    if exit_code == 0:
        return "done"
    return "stopped" if exit_code == TrainingStopped.exit_code else "failed"


def objective(run_dir: str, name: str = "loss/eval") -> float | None:
    """What a search optimizes (sweep.objective), from the job's summary.json: a final metric such as
    bench/<task>/acc; for loss/eval, the final train loss when there is no eval data. None when it is missing."""
    return objective_value(_read_json(Path(run_dir) / SUMMARY_FILE), name)


def objective_value(summary: dict, name: str) -> float | None:
    value = summary.get(name)
    if value is None and name == "loss/eval":
        value = summary.get("loss/train")
    return float(value) if isinstance(value, int | float) and math.isfinite(value) else None


def best_row(rows: list[dict], name: str, direction: str) -> dict | None:
    """The finished job with the best value of `name` (rows of sweep_rows), or None when no job has one."""
    scored = [
        (value, row) for row in rows if row["status"] == "done" and (value := objective_value(row, name)) is not None
    ]
    if not scored:
        return None
    pick = max if direction == "maximize" else min
    return pick(scored, key=lambda pair: pair[0])[1]


def sweep_rows(sweep_dir: Path) -> list[dict]:
    """One row per job of the sweep (each job.json under its folder), in job order."""
    rows = []
    for job_file in _job_files(sweep_dir):
        job = _read_json(job_file)
        if job.get("status") == "running":  # the sweep is over: the job died without reporting
            job.update(
                status="failed", error=job.get("error") or "ended without reporting (killed? see its launch.log)"
            )
        # A finished job's totals; for one that stopped or failed, its last logged values.
        summary = _read_json(job_file.parent / SUMMARY_FILE) if job.get("status") == "done" else {}
        summary = summary or _last_metrics(job_file.parent / METRICS_FILE)
        rows.append(
            {
                "job": job.get("num"),
                "overrides": " ".join(job.get("overrides") or []) or "-",
                "status": job.get("status"),
                "loss/train": summary.get("loss/train"),
                "loss/eval": summary.get("loss/eval"),
                **{key: value for key, value in summary.items() if _benchmark_column(key)},
                "tokens_per_second": summary.get("tokens_per_second"),
                "wall_seconds": summary.get("wall_seconds", job.get("wall_seconds")),
                "run_dir": job.get("run_dir"),
                "error": job.get("error"),
            }
        )
    return sorted(rows, key=lambda row: row["job"] if row["job"] is not None else -1)


def _job_files(sweep_dir: Path) -> list[Path]:
    # rglob: a swept value with a '/' (a file path) nests the job's folder one level deeper.
    return list(sweep_dir.rglob(JOB_FILE))


def _benchmark_column(key: str) -> bool:
    """A benchmark metric of the final model (bench/<task>/<metric>), stderrs aside: a column of the table."""
    return task_and_metric(key) is not None


def format_table(rows: list[dict]) -> str:
    """The sweep's table: a column per benchmark metric any job reports, after the losses."""
    benchmarks = list(dict.fromkeys(key for row in rows for key in row if _benchmark_column(key)))
    columns = [("job", "{}"), ("overrides", "{}"), ("status", "{}"), ("loss/train", "{:.4f}"), ("loss/eval", "{:.4f}")]
    columns += [(name, "{:.4f}") for name in benchmarks]
    columns += [("tokens_per_second", "{:.0f}"), ("wall_seconds", "{:.1f}"), ("run_dir", "{}")]
    cells = [[name.replace("_per_second", "/s").replace("_seconds", " s") for name, _ in columns]]
    cells += [["-" if row.get(name) is None else fmt.format(row[name]) for name, fmt in columns] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip() for line in cells
    )


def _last_metrics(path: Path) -> dict:
    """The last logged train and eval losses of metrics.jsonl (each from the last line that has it)."""
    last: dict = {}
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return last
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:
            continue  # a line cut by a crash
        last.update({key: row[key] for key in row if key in ("loss/train", "loss/eval") or _benchmark_column(key)})
    return last


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


class SweepSummary(Callback):
    """A Hydra callback (config/config.yaml, hydra.callbacks): at the end of a sweep, writes and prints its table,
    and exits non-zero when a job did not finish (1 when one failed, else 75 when one was stopped)."""

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        """Forget the job records of an earlier sweep in this folder: the table lists this sweep's jobs (a job that
        is run again writes its record again). Not by file times: a cluster's clocks may disagree."""
        for job_file in _job_files(Path(str(config.hydra.sweep.dir))):
            job_file.unlink()

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        rows = sweep_rows(sweep_dir)
        table = format_table(rows)
        (sweep_dir / TABLE_FILE).write_text(table + "\n")
        (sweep_dir / TABLE_JSON).write_text(json.dumps(rows, indent=2) + "\n")
        counts = {status: sum(row["status"] == status for row in rows) for status in ("done", "failed", "stopped")}
        heading = f"sweep {sweep_dir}: {len(rows)} jobs, " + ", ".join(f"{n} {s}" for s, n in counts.items() if n)
        # The table is the sweep's result for the person at the terminal (like Hydra's --cfg output): stdout.
        errors = "".join(f"\njob {row['job']}: {row['error']}" for row in rows if row["error"])
        best = best_job_line(rows, config)
        print(f"{heading}\n{table}\n{best}(also in {sweep_dir / TABLE_FILE}){errors}", flush=True)
        from train.loop.faults import TrainingStopped

        code = 1 if counts["failed"] or len(rows) == 0 else TrainingStopped.exit_code if counts["stopped"] else 0
        if code:
            raise SystemExit(code)


def best_job_line(rows: list[dict], config: DictConfig) -> str:
    """`best job: 1 (lr=0.001), bench/halyard_demo/acc 0.8125 (maximize)` and a newline, or "" without a finished
    job that reports the objective."""
    name = str(OmegaConf.select(config, "sweep.objective", default="loss/eval"))
    direction = str(OmegaConf.select(config, "sweep.direction", default="minimize"))
    row = best_row(rows, name, direction)
    if row is None:
        return ""
    return f"best job: {row['job']} ({row['overrides']}), {name} {objective_value(row, name):.4f} ({direction})\n"


def sweeper_config(driver_cfg: DictConfig) -> DictConfig:
    return driver_cfg.hydra.sweeper if "sweeper" in driver_cfg.hydra else OmegaConf.create({})
