"""Halyard's command line: a Hydra application (`python launch.py --help` for users).

This file keeps the command line (argv, logging, exit codes) and Hydra's task function; the run itself is
train/app/run.py, sweeps are train/app/sweep.py. Before Hydra starts, every job is composed and validated (all of a sweep's
jobs, before the first starts): every problem is reported at once, exit code 2 and no traceback, before any model,
tokenizer or data loads. Validation does import the chosen loss's trainer module (train/objectives/), and with it torch,
to read the loss's settings; `--help` imports every built-in loss's trainer module to list theirs.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

EXIT_USER_ERROR = 2
EXIT_STOPPED = 75  # train.loop.faults.TrainingStopped: stopped by a signal, checkpoint written
LAUNCH_SCRIPT = str(Path(__file__).resolve())
REQUIRED_MODULES = ("hydra", "omegaconf", "torch", "transformers", "accelerate")  # what a run imports first

logger = logging.getLogger("launch")


def compose_config(
    overrides: list[str], config_dir: str | None = None, config_name: str = "config", check_model_files: bool = False
):
    """Compose the config (config/config.yaml, or `config_name` found in `config_dir` first) with command-line
    overrides; return the typed, validated Config (with `check_model_files`, the model and tokenizer it names are
    checked to exist too)."""
    from train.app.validate import validate

    return validate(_job_part(compose_raw(overrides, config_dir, config_name)), check_model_files=check_model_files)


def compose_raw(overrides: list[str], config_dir: str | None, config_name: str, multirun: bool = False):
    """Hydra's composed config for these overrides (the `hydra` node included), as `@hydra.main` composes it."""
    from hydra.errors import HydraException
    from hydra.types import RunMode
    from omegaconf.errors import OmegaConfBaseException

    from train.errors import ConfigError

    try:
        hydra = _hydra(config_dir)
        mode = RunMode.MULTIRUN if multirun else RunMode.RUN
        return hydra.compose_config(config_name, _as_forced_overrides(overrides), run_mode=mode)
    except (HydraException, OmegaConfBaseException) as error:
        raise ConfigError([str(error).strip()]) from None
    finally:
        from hydra.core.global_hydra import GlobalHydra

        GlobalHydra.instance().clear()


def _hydra(config_dir: str | None):
    """A Hydra instance with the config search path `@hydra.main` uses: `--config-dir` first, then config/."""
    from hydra._internal.hydra import Hydra
    from hydra._internal.utils import create_automatic_config_search_path
    from hydra.core.config_search_path import SearchPathQuery
    from hydra.core.global_hydra import GlobalHydra

    from train.app.config import CONFIG_DIR, register_defaults
    from train.errors import ConfigError

    register_defaults()
    search_path = create_automatic_config_search_path(None, None, str(CONFIG_DIR))
    if config_dir is not None:
        if not os.path.isdir(config_dir):
            raise ConfigError([f"--config-dir {config_dir}: no such folder"])
        search_path.prepend("command-line", f"file://{os.path.abspath(config_dir)}", SearchPathQuery("schema"))
    GlobalHydra.instance().clear()
    return Hydra.create_main_hydra2(task_name="launch", config_search_path=search_path)


def _as_forced_overrides(overrides: list[str]) -> list[str]:
    """Rewrite `key=value` overrides of keys the schema does not know (a misspelling) as `++key=value`.

    Hydra stops at the first key missing from the composed config. Forcing those overrides lets composition finish,
    so the schema check can report every unknown key at once and name the closest valid one. Keys of the schema,
    a loss's settings (`loss.beta`: the loss node takes new keys), config-group choices (`model=tiny`), `+`, `++`, `~`
    and `hydra.*` overrides pass through unchanged.
    """
    from train.app.config import CONFIG_DIR, schema_keys

    known = schema_keys() | {p.name for p in CONFIG_DIR.iterdir() if p.is_dir()}
    rewritten = []
    for override in overrides:
        key = override.split("=", 1)[0]
        plain = "=" in override and not key.startswith(("+", "~", "hydra.", "hydra/")) and "/" not in key
        known_key = key.split("@")[0] in known or key.startswith("loss.")  # the loss node takes new keys
        rewritten.append(f"++{override}" if plain and not known_key else override)
    return rewritten


def is_main_process() -> bool:
    return os.environ.get("RANK", "0") == "0"


def setup_logging() -> None:
    # Before Hydra configures logging (config/hydra/job_logging/halyard.yaml): the same format, on stderr.
    level = logging.INFO if is_main_process() else logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    from train.loop.progress import silence_kernel_notices  # light: no torch

    silence_kernel_notices()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    missing = missing_dependency()
    if missing:
        print(
            f"halyard: this Python ({sys.executable}) has no {missing!r}; run launch.py with .venv/bin/python "
            "(after bash scripts/install.sh), or `source .venv/bin/activate` first",
            file=sys.stderr,
        )
        return EXIT_USER_ERROR
    if "--help" in argv or "-h" in argv:
        from train.app.help import help_text

        print(help_text())
        return 0
    from train.errors import HalyardError

    try:
        hydra_argv = prepare(argv)
        return 0 if hydra_argv is None else run_hydra(hydra_argv)  # None: done (--cfg job printed the config)
    except HalyardError as error:
        # A user error, or a stop on request: say what happened and what to do, without a traceback.
        if is_main_process():
            print(f"halyard: {error}", file=sys.stderr)
        return getattr(error, "exit_code", EXIT_USER_ERROR)
    finally:
        shut_down_processes()


def missing_dependency() -> str | None:
    """The first of Halyard's main dependencies this interpreter cannot import (plain `python` outside .venv), or
    None. Looked up without importing them."""
    from importlib.util import find_spec

    return next((name for name in REQUIRED_MODULES if find_spec(name) is None), None)


def prepare(argv: list[str]) -> list[str] | None:
    """Check what the command will run and return the arguments to hand to Hydra (None: nothing left to run).

    A run's config, or every job of a sweep, is composed and validated first; a problem anywhere stops everything
    before a job starts. `--cfg job` is that check alone, printing the validated config (show_job_config). Overrides
    of unknown keys are forced (see _as_forced_overrides) so that Hydra composes them and validation names them."""
    from hydra._internal.utils import get_args_parser

    args = get_args_parser().parse_args(argv)
    commands = [flag for flag in ("multirun", "cfg", "info", "shell_completion") if getattr(args, flag)]
    if len(commands) > 1:
        from train.errors import HalyardError

        names = ", ".join("--" + flag.replace("_", "-") for flag in commands)
        raise HalyardError(f"{names}: give only one of -m/--multirun, --cfg, --info and --shell-completion")
    if args.shell_completion or args.hydra_help:
        return argv
    _refuse_experiment_group(args.overrides)
    overrides = _as_forced_overrides(args.overrides)
    extra = []
    if args.multirun:
        setup_logging()
        extra = check_sweep(args, overrides)
    elif args.cfg == "job":
        setup_logging()
        show_job_config(args, overrides)
        return None
    elif not (args.cfg or args.info):  # --cfg hydra|all and --info print Hydra's view, unchecked
        setup_logging()
        check_run(args, overrides)
    if not is_main_process():
        extra.append("hydra.output_subdir=null")  # the main process writes .hydra/ into the run directory
    return _replace_overrides(argv, args.overrides, overrides) + extra


def _refuse_experiment_group(overrides: list[str]) -> None:
    """`+experiment=NAME` is how some Hydra projects pick an experiment; here an experiment file is a whole config."""
    from train.errors import ConfigError

    for override in overrides:
        if override.lstrip("+").startswith("experiment="):
            name = override.split("=", 1)[1]
            hint = f"run it with --config-dir config/experiment --config-name {name}"
            raise ConfigError([f"{override}: an experiment file is a whole config; {hint}"])


def _replace_overrides(argv: list[str], before: list[str], after: list[str]) -> list[str]:
    """argv with each override (in order) replaced by its rewritten form; flags and their values kept."""
    pending = list(zip(before, after, strict=True))
    rewritten = []
    for token in argv:
        if pending and token == pending[0][0]:
            rewritten.append(pending.pop(0)[1])
        else:
            rewritten.append(token)
    return rewritten


def check_run(args, overrides: list[str]) -> None:
    from train.app.validate import validate
    from train.files import make_run_dir

    raw = compose_raw(overrides, args.config_dir, args.config_name or "config")
    # before the run directory exists: a typo leaves none; the memory plan against this machine, which trains
    validate(_job_part(raw), check_model_files=True, check_memory=True)
    if is_main_process():
        make_run_dir(Path(str(raw.hydra.run.dir)))


def show_job_config(args, overrides: list[str]) -> None:
    """`--cfg job`: the config a run would train with, checked as a run checks it (keys, types, values, data files,
    model and tokenizer, the memory plan), printed typed and resolved with every default, the loss's own settings
    included; the memory plan is logged. Nothing is written. `--package KEY` prints one section, as Hydra's
    `--cfg job` does."""
    from omegaconf import Container, OmegaConf

    from train.app.loss_registry import loss_spec
    from train.app.memory_plan import log_plan
    from train.app.validate import validate
    from train.errors import ConfigError

    raw = compose_raw(overrides, args.config_dir, args.config_name or "config")
    cfg = validate(_job_part(raw), check_model_files=True, check_memory=True)
    log_plan(cfg, loss_spec(cfg))  # the memory plan, on stderr: stdout is the config
    node = OmegaConf.structured(cfg)
    package = None if args.package in (None, "_global_") else args.package
    if package:
        node = OmegaConf.select(node, package, default=KeyError)
        if node is KeyError:
            raise ConfigError([f"--package {package}: no such key in the config"])
    if not is_main_process():
        return
    if isinstance(node, Container):
        print((f"# @package {package}\n" if package else "") + OmegaConf.to_yaml(node), end="")
    else:
        print(node)


def check_sweep(args, overrides: list[str]) -> list[str]:
    """Validate every job of the sweep; return the extra Hydra overrides: a search's direction (sweep.direction) and
    what names its jobs' run directories."""
    from train.app.sweep import merge_job_problems, plan_jobs, search_direction, sweep_problems, sweeper_config
    from train.app.validate import validate
    from train.errors import ConfigError, HalyardError
    from train.files import make_run_dir

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise HalyardError(
            "-m/--multirun runs jobs one after another in this process; start it with `python launch.py -m ...`, "
            "not under `accelerate launch`, and give each job its processes with accelerate_config=<file>"
        )
    config_name = args.config_name or "config"
    driver = compose_raw(overrides, args.config_dir, config_name, multirun=True)
    planned = plan_jobs(sweeper_config(driver), overrides)
    problems_by_job, checked = [], []
    for number, job in enumerate(planned.overrides):
        try:
            raw = compose_raw(job, args.config_dir, config_name)
            with_run_dir = _job_part(raw, run_dir=f"{driver.hydra.sweep.dir}/{number}")
            checked.append(validate(with_run_dir, check_model_files=True))
            problems_by_job.append([])
        except ConfigError as error:
            problems_by_job.append(error.problems)
    error = merge_job_problems(planned.labels, problems_by_job)
    problems = sweep_problems(planned) + (error.problems if error else [])
    direction = []
    if checked:  # sweep.objective and sweep.direction are the same in every job (sweep_problems)
        direction, found = search_direction(
            sweeper_config(driver), checked[0].sweep.objective, checked[0].sweep.direction
        )
        problems += found
    if problems:
        raise ConfigError(problems)
    make_run_dir(Path(str(driver.hydra.sweep.dir)))
    logger.info(f"sweep: {len(planned.overrides)} job configs checked")
    # Name each job's folder by the values that differ between jobs only.
    excluded = sorted(set(planned.fixed_keys) - set(planned.swept_keys))
    return direction + ([f"hydra.job.config.override_dirname.exclude_keys=[{','.join(excluded)}]"] if excluded else [])


def _job_part(raw, run_dir: str | None = None):
    """The job's own config (without Hydra's node); in a sweep, with its run directory."""
    from omegaconf import OmegaConf, open_dict

    job = OmegaConf.masked_copy(raw, [key for key in raw if key != "hydra"])
    if run_dir is not None:
        with open_dict(job):
            job.run_dir = run_dir
    return job


def run_hydra(argv: list[str]) -> int:
    """Hand the command to Hydra (`@hydra.main`); return the exit code."""
    import hydra

    from train.app.config import CONFIG_DIR, register_defaults

    register_defaults()
    app = hydra.main(config_path=str(CONFIG_DIR), config_name="config", version_base="1.3")(train_job)
    sys.argv = [sys.argv[0], *argv]
    try:
        app()
    except SystemExit as stop:
        return stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
    return 0


def train_job(raw) -> float | None:
    """Hydra's task function: one run, or one job of a sweep. A run exits with the run's code; a sweep's job
    records its outcome (job.json) and returns the objective a search minimizes (None when it did not finish)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not is_main_process():
        logging.getLogger().setLevel(logging.WARNING)  # Hydra's logging config set INFO for every process
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode != RunMode.MULTIRUN:
        code, _ = run_job(raw, hydra_cfg)
        if code:
            raise SystemExit(code)
        return None
    from train.app.sweep import run_sweep_job

    return run_sweep_job(raw, hydra_cfg, run_job)


def run_job(raw, hydra_cfg) -> tuple[int, str | None]:
    """Validate and train, in this process or through `accelerate launch` (accelerate_config); return the exit
    code and, for a user error, its message."""
    from train.app.launcher import accelerate_command, launched_by_accelerate, run_through_accelerate
    from train.app.validate import validate
    from train.errors import HalyardError

    try:
        cfg = validate(raw)
        if cfg.accelerate_config and not launched_by_accelerate():
            command = accelerate_command(cfg.accelerate_config, LAUNCH_SCRIPT, _child_overrides(cfg, hydra_cfg))
            code = run_through_accelerate(command)
            return code, None if code == 0 else f"the job's processes exited with code {code} (see the log above)"
        from train.app.run import run

        run(cfg)
    except HalyardError as error:
        code = getattr(error, "exit_code", EXIT_USER_ERROR)
        if is_main_process():
            print(f"halyard: {error}", file=sys.stderr)
            if code == EXIT_STOPPED:
                from train.supervise import record_stop

                record_stop(str(error))  # under train.supervise, the command then exits with 75 too
        return code, str(error)
    return 0, None


def _child_overrides(cfg, hydra_cfg) -> list[str]:
    """The job's command line for its processes: the same config and run directory, Hydra's files left alone."""
    flags = ["--config-name", hydra_cfg.job.config_name]
    for source in hydra_cfg.runtime.config_sources:
        if source.provider == "command-line":
            flags += ["--config-dir", source.path.removeprefix("file://")]
    pinned = [
        "accelerate_config=null",
        f"run_dir={_quoted(cfg.run_dir)}",
        f"hydra.run.dir={_quoted(hydra_cfg.runtime.output_dir)}",
        "hydra.output_subdir=null",
    ]
    return flags + [o for o in hydra_cfg.overrides.task if not o.lstrip("+").startswith("accelerate_config=")] + pinned


def _quoted(value: str) -> str:
    """A Hydra override value that keeps `=`, `,` and spaces (a sweep job's folder name has them)."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def shut_down_processes() -> None:
    """Tear down the process group before exit; left to the interpreter's shutdown, gloo's threads can abort."""
    if "torch" not in sys.modules:
        return
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def exit_process(code: int) -> None:
    """Exit. A process of a multi-process run skips the interpreter's teardown: destroying the objects that still
    hold communication threads (FSDP, device meshes) in arbitrary order can abort it after the work is done.
    Everything it wrote is already closed and flushed."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    exit_process(main())
