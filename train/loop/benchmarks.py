"""Benchmark evaluation through lm-evaluation-harness (`lm-eval`): the one home of the harness in Halyard.

Halyard writes no task, prompt or metric of its own: the harness has hundreds of tasks, and a user brings their own as
task YAML files in a folder (`include_path`). This module turns the harness's results into Halyard's metric names,
`bench/<task>/<metric>` and `bench/<task>/<metric>_stderr` (a metric computed after a filter other than "none", as in
generation tasks, is `<metric>_<filter>`).

The model is evaluated live, in the running process: no save and reload; a PEFT model with its adapters active. The
harness treats a model object as one process (`HFLM(pretrained=model)` has rank 0 and world size 1), and that is
kept: under DDP and FSDP2 every process runs the identical evaluation in lock-step on its replica or shard. A sharded
forward needs every process, and the harness's own split of the examples over processes would not do: it can give
the processes different numbers of forward passes (it merges requests that share a context), and each process draws
the few-shot examples of its share from the seeded sampler in turn, so the prompts, and the scores, change with the
process count (measured: 1-shot brier_score 0.9200 on one process, 0.9177 split over two, same weights). So the
numbers are those of one process, at the cost of every process evaluating every example. The main process gets the
harness's results; they are broadcast so every process returns the same dictionary. The harness seeds Python's, NumPy's and torch's global
generators; they are restored afterwards, so a run trains the same with or without benchmarks.

lm_eval is imported inside the functions: it takes seconds, and `launch.py --help` must stay fast.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import logging
import os
import random
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

HARNESS_VERSION: str = version("lm_eval")  # the installed lm-evaluation-harness, as lm_eval.__version__ says
METRIC_PREFIX = "bench/"
STDERR_SUFFIX = "_stderr"
LOCAL_BUILDERS = {"json", "csv", "parquet", "text", "arrow", "pandas"}  # datasets' builders that read data_files
OFFLINE_VALUES = {"1", "true", "yes", "on"}


@dataclass(frozen=True)
class BenchmarkSettings:
    """What to evaluate and how; from cfg.benchmarks and the run's seed (scripts build one too)."""

    tasks: tuple[str, ...]  # harness task, group or tag names
    include_path: str | None  # a folder of the user's task YAMLs; they override built-in tasks of the same name
    num_fewshot: int | None  # None: each task's own default (0 where it has none)
    limit: int | None  # examples per task (the first ones); None: all
    batch_size: int  # sequences per forward pass
    seed: int  # the harness's Python, NumPy, torch and few-shot sampler seeds (like `lm_eval --seed N`)
    apply_chat_template: bool = False  # each prompt rendered as a chat turn (`lm_eval --apply_chat_template`)

    @classmethod
    def from_config(cls, benchmarks, seed: int) -> BenchmarkSettings:
        """From the config's `benchmarks` section (train/app/config.py: BenchmarksConfig) and the run's seed."""
        return cls(
            tasks=tuple(benchmarks.tasks),
            include_path=benchmarks.include_path,
            num_fewshot=benchmarks.num_fewshot,
            limit=benchmarks.limit_per_task,
            batch_size=benchmarks.batch_size,
            seed=seed,
            apply_chat_template=benchmarks.apply_chat_template,
        )


@dataclass
class BenchmarkResults:
    """One evaluation: the metrics, and what the model card says about each task."""

    metrics: dict[str, float]  # "bench/<task>/<metric>" (and "..._stderr") -> value
    num_fewshot: dict[str, int] = field(default_factory=dict)  # task -> few-shot examples in each prompt
    samples: dict[str, int] = field(default_factory=dict)  # task -> examples evaluated


def metric_key(task: str, metric: str, filter_name: str = "none") -> str:
    """Halyard's name of a harness metric: bench/<task>/<metric>, with the filter appended unless it is "none"."""
    name = metric if filter_name == "none" else f"{metric}_{filter_name}"
    return f"{METRIC_PREFIX}{task}/{name}"


def is_benchmark_metric(name: str) -> bool:
    return name.startswith(METRIC_PREFIX)


def task_and_metric(name: str) -> tuple[str, str] | None:
    """("mc", "acc") for "bench/mc/acc": a benchmark metric's task and metric; None for other names and for the
    stderrs (what tables and progress lines show a value of)."""
    if not is_benchmark_metric(name) or name.endswith(STDERR_SUFFIX):
        return None
    task, _, metric = name.removeprefix(METRIC_PREFIX).partition("/")
    return task, metric


def flatten_results(results: dict[str, Any]) -> dict[str, float]:
    """The harness's `results["results"]` ({task: {"acc,none": 0.5, "acc_stderr,none": 0.1, "alias": ...}}) as
    Halyard's flat metrics. Values that are not numbers ("N/A" stderrs of metrics without one) are left out."""
    flat: dict[str, float] = {}
    for task, values in results["results"].items():
        for name, value in values.items():
            metric, sep, filter_name = name.partition(",")
            if not sep or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            if metric.endswith(STDERR_SUFFIX):
                flat[metric_key(task, metric.removesuffix(STDERR_SUFFIX), filter_name) + STDERR_SUFFIX] = float(value)
            else:
                flat[metric_key(task, metric, filter_name)] = float(value)
    return flat


# ---- tasks: found, and loadable offline ----


def task_problems(settings: BenchmarkSettings) -> list[str]:
    """What stops these tasks from running here, one line each naming the task and the fix: an unknown task, a
    missing include_path, a local data file that does not exist, a dataset that needs a download while offline.
    Reads task YAMLs only; no dataset is loaded."""
    if settings.include_path and not Path(settings.include_path).is_dir():
        return [
            f"benchmarks.include_path={settings.include_path}: no such folder; point it at the folder holding your "
            f"task YAML files"
        ]
    manager = task_manager(settings)
    problems = []
    for task in settings.tasks:
        entry = manager.task_index.get(task)
        if entry is None:
            close = difflib.get_close_matches(task, manager.all_tasks, n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            where = f" or in {settings.include_path}" if settings.include_path else ""
            problems.append(
                f"benchmarks.tasks: unknown task '{task}'{hint}: not a task, group or tag of lm-eval {HARNESS_VERSION}"
                f"{where}; list them with `.venv/bin/lm_eval ls tasks`, or put its YAML in a folder and set "
                f"benchmarks.include_path to it"
            )
            continue
        leaves_by_problem: dict[str, list[str]] = {}  # a group's tasks often share one dataset: said once
        for leaf, cfg in leaf_task_configs(manager, task):
            problem = dataset_problem(cfg)
            if problem:
                leaves_by_problem.setdefault(problem, []).append(leaf)
        for problem, leaves in leaves_by_problem.items():
            problems.append(f"benchmarks.tasks: {_task_phrase(task, leaves)} {problem}")
    return problems


def _task_phrase(task: str, leaves: list[str]) -> str:
    if leaves == [task]:
        return f"'{task}'"
    if len(leaves) == 1:
        return f"'{task}' (its task '{leaves[0]}')"
    return f"'{task}' ({len(leaves)} of its tasks, e.g. '{leaves[0]}')"


def task_manager(settings: BenchmarkSettings):
    """The harness's index of tasks: the user's folder alone when it defines every task asked for (indexing the
    ~15,000 built-in task names takes ~10 s), else the built-in tasks with the folder's overriding them."""
    if settings.include_path:
        local = _task_manager(str(Path(settings.include_path).resolve()), include_defaults=False)
        if all(_resolvable(local, task) for task in settings.tasks):
            return local
        return _task_manager(str(Path(settings.include_path).resolve()), include_defaults=True)
    return _task_manager(None, include_defaults=True)


@functools.cache
def _task_manager(include_path: str | None, include_defaults: bool):
    # Cached: evaluations during training reuse the index instead of reading thousands of YAMLs each time.
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=include_path, include_defaults=include_defaults)


def _resolvable(manager, task: str, depth: int = 0) -> bool:
    """Whether `task` and every member of it (a group's tasks, a tag's tasks) are in `manager`'s index."""
    entry = manager.task_index.get(task)
    if entry is None or depth > 8:
        return False
    return all(_resolvable(manager, member, depth + 1) for member in _member_names(entry))


def _member_names(entry) -> list[str]:
    from lm_eval.tasks._index import Kind

    if entry.kind is Kind.TAG:
        return sorted(entry.tags)
    if entry.kind is Kind.GROUP:
        members = (entry.cfg or {}).get("task", [])
        return [m for m in (members if isinstance(members, list) else [members]) if isinstance(m, str)]
    return []


def leaf_task_configs(manager, task: str, depth: int = 0) -> list[tuple[str, dict]]:
    """(name, YAML config) of each single task behind a task, group or tag name (includes resolved, functions not);
    tasks defined in Python (`class:`) are left out: their data is not described by a config."""
    from lm_eval.tasks._index import Kind

    entry = manager.task_index.get(task)
    if entry is None or depth > 8:
        return []
    if entry.kind is Kind.TASK:
        return [(task, entry.cfg or {})]
    leaves = []
    if entry.kind is Kind.GROUP:
        members = (entry.cfg or {}).get("task", [])
        for member in members if isinstance(members, list) else [members]:
            if isinstance(member, dict):  # an inline task config inside the group
                leaves.append((member.get("task", task), member))
            elif isinstance(member, str):
                leaves += leaf_task_configs(manager, member, depth + 1)
    elif entry.kind is Kind.TAG:
        for member in sorted(entry.tags):
            leaves += leaf_task_configs(manager, member, depth + 1)
    return leaves


def expected_metrics(settings: BenchmarkSettings) -> set[str]:
    """The bench/<task>/<metric> names (stderrs aside) the tasks will produce, read from their YAML: each task's
    metric_list (or its output type's defaults) after each of its filters, and a group's aggregated metrics. A task
    defined in Python gives the pattern bench/<task>/* (match with fnmatch). Unknown tasks give nothing."""
    from lm_eval.api.registry import DEFAULT_METRIC_REGISTRY

    manager = task_manager(settings)
    names: set[str] = set()
    for task in settings.tasks:
        for leaf, cfg in leaf_task_configs(manager, task):
            if "class" in cfg:
                names.add(metric_key(leaf, "*"))
                continue
            listed = cfg.get("metric_list") or [
                {"metric": m} for m in DEFAULT_METRIC_REGISTRY.get(cfg.get("output_type"), [])
            ]
            filters = [f.get("name", "none") for f in cfg.get("filter_list") or []] or ["none"]
            names |= {
                metric_key(leaf, m["metric"], f) for m in listed if isinstance(m.get("metric"), str) for f in filters
            }
        entry = manager.task_index.get(task)
        for aggregate in ((entry.cfg or {}).get("aggregate_metric_list") or []) if entry else []:
            filters = aggregate.get("filter_list") or ["none"]
            names |= {
                metric_key(task, aggregate["metric"], f) for f in ([filters] if isinstance(filters, str) else filters)
            }
    return names


def offline() -> bool:
    return any(os.environ.get(name, "").lower() in OFFLINE_VALUES for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def dataset_problem(cfg: dict) -> str | None:
    """Why a task's data cannot be loaded here, or None: a local data file that is missing, or a hub dataset that
    is not in the local cache while offline (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE)."""
    path = cfg.get("dataset_path")
    if not path:
        return None
    if path in LOCAL_BUILDERS:
        files = _data_files((cfg.get("dataset_kwargs") or {}).get("data_files"))
        remote = [f for f in files if "://" in f]
        if remote and offline():
            return f"reads {remote[0]}, a download, while offline; copy the file here and name its local path"
        missing = [f for f in files if "://" not in f and not any(c in f for c in "*?[") and not Path(f).exists()]
        if missing:
            return (
                f"reads {missing[0]}, which does not exist (relative paths are read from the working directory, "
                f"{Path.cwd()}); name the file by its absolute path in the task YAML"
            )
        return None
    if Path(path).exists() or not offline() or _dataset_cached(path):
        return None
    return (
        f"needs the dataset '{path}' from the Hugging Face Hub, a download, but this machine is offline "
        f"(HF_HUB_OFFLINE / HF_DATASETS_OFFLINE) and it is not in the local cache; download it once where the Hub "
        f"is reachable (run the task there, or `datasets.load_dataset('{path}')`), or use a local copy "
        f"(dataset_path: json with dataset_kwargs.data_files in a task YAML under benchmarks.include_path)"
    )


def _data_files(data_files) -> list[str]:
    if data_files is None:
        return []
    if isinstance(data_files, str):
        return [data_files]
    if isinstance(data_files, dict):
        return [f for value in data_files.values() for f in _data_files(value)]
    return [str(f) for f in data_files]


def _dataset_cached(path: str) -> bool:
    """Whether a hub dataset has been downloaded before: in the hub cache or in datasets' own cache."""
    from datasets import config as datasets_config
    from huggingface_hub import constants

    hub = Path(constants.HF_HUB_CACHE) / f"datasets--{path.replace('/', '--')}"
    prepared = Path(datasets_config.HF_DATASETS_CACHE) / path.replace("/", "___")
    return hub.exists() or prepared.exists()


# ---- evaluation ----


def run_benchmarks(model, tokenizer, settings: BenchmarkSettings, accelerator=None) -> dict[str, float]:
    """{"bench/<task>/<metric>": value, "bench/<task>/<metric>_stderr": value} of the live `model` (a PEFT model
    with its adapters active), no save and reload: the same numbers as `lm_eval --seed <seed>` run on the model
    saved in the same dtype. Every process must call it (see the module docstring); all get the same result."""
    return evaluate_tasks(model, tokenizer, settings, accelerator).metrics


def evaluate_tasks(model, tokenizer, settings: BenchmarkSettings, accelerator=None) -> BenchmarkResults:
    """run_benchmarks with what the model card needs besides the metrics (few-shot count, examples per task).

    The model is put in eval mode and given back in the mode it had."""
    import torch
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    was_training = model.training
    results = None
    try:
        show = accelerator is None or accelerator.is_main_process
        with preserved_random_state(), quiet_harness(show), torch.no_grad():
            lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=settings.batch_size)
            results = simple_evaluate(
                model=lm,
                tasks=list(settings.tasks),
                num_fewshot=settings.num_fewshot,
                limit=settings.limit,
                task_manager=task_manager(settings),
                log_samples=False,  # per-example records: not kept in memory
                random_seed=settings.seed,
                numpy_random_seed=settings.seed,
                torch_random_seed=settings.seed,
                fewshot_random_seed=settings.seed,
                apply_chat_template=settings.apply_chat_template,
                fewshot_as_multiturn=settings.apply_chat_template,  # as the `lm_eval` command decides it
            )
    finally:
        model.train(was_training)
    # The harness returns results in the first process of each machine only; every process returns the same.
    summary = _summarize(results) if results is not None else None
    if accelerator is not None and accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        summary = broadcast_object_list([summary], from_process=0)[0]
    return summary


def _summarize(results: dict[str, Any]) -> BenchmarkResults:
    return BenchmarkResults(
        metrics=flatten_results(results),
        num_fewshot={task: int(n) for task, n in results.get("n-shot", {}).items()},
        samples={task: int(n["effective"]) for task, n in results.get("n-samples", {}).items()},
    )


@contextlib.contextmanager
def preserved_random_state():
    """Python's, NumPy's and torch's (CPU and CUDA) generators as they were: the harness seeds them globally."""
    import numpy as np
    import torch

    python_state, numpy_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=range(torch.cuda.device_count()) if torch.cuda.is_available() else []):
        try:
            yield
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)


@contextlib.contextmanager
def quiet_harness(main_process: bool):
    """The harness's INFO lines, its warning that a model object assumes one process (true here: every process
    evaluates its own replica or shard) and its progress bars stay out of the training log, unless the "lm_eval"
    logger is set to INFO or DEBUG (scripts/evaluate.py does), and then in the main process only."""
    import lm_eval.api.model
    import lm_eval.api.task
    import lm_eval.models.huggingface

    harness_logger = logging.getLogger("lm_eval")
    level = harness_logger.level
    if main_process and level in (logging.INFO, logging.DEBUG):
        yield
        return
    harness_logger.setLevel(logging.ERROR)
    # The harness builds its bars with the module-level name `tqdm` and no switch reaches them from simple_evaluate:
    # the name is rebound to a disabled bar for the duration, then restored.
    modules = (lm_eval.api.model, lm_eval.api.task, lm_eval.models.huggingface)
    bars = [module.tqdm for module in modules]
    for module, bar in zip(modules, bars, strict=True):
        module.tqdm = _disabled(bar)
    try:
        yield
    finally:
        harness_logger.setLevel(level)
        for module, bar in zip(modules, bars, strict=True):
            module.tqdm = bar


def _disabled(bar):
    """`bar` (tqdm) with disable=True whatever the caller passes (the harness passes disable= itself)."""

    def silent(*args, **kwargs):
        return bar(*args, **{**kwargs, "disable": True})

    return silent
