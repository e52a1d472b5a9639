"""Halyard's command line: compose the Hydra config, validate it, then fine-tune.

    accelerate launch launch.py loss=sft model=smollm2 datasets=[data/demo/train.jsonl] exp_name=my-run
    python launch.py loss=sft model=tiny datasets=[data.jsonl] ++model.name_or_path=/path/to/model
    python launch.py --help          # every config key, with its type, default and meaning

This file keeps the command line (argv, logging, exit codes); the run itself is train/run.py. Every config problem
is reported at once, before any model or data loads: validation imports only the chosen loss's trainer module.
"""

from __future__ import annotations

import logging
import os
import sys

EXIT_USER_ERROR = 2
EXIT_STOPPED = 75  # train.faults.TrainingStopped: stopped by a signal, checkpoint written


def compose_config(overrides: list[str], check_model_files: bool = False):
    """Compose config/config.yaml with Hydra and the command-line overrides; return the typed, validated Config
    (with `check_model_files`, the model and tokenizer it names are checked to exist too)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from train.config import CONFIG_DIR, register_schema, validate
    from train.errors import ConfigError

    register_schema()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            raw = compose(config_name="config", overrides=_as_forced_overrides(overrides))
    except (HydraException, OmegaConfBaseException) as error:
        raise ConfigError([str(error).strip()]) from None
    return validate(raw, check_model_files=check_model_files)


def _as_forced_overrides(overrides: list[str]) -> list[str]:
    """Rewrite plain `key=value` overrides as `++key=value`.

    Hydra stops at the first key missing from the YAML. Forcing each override lets composition finish, so the
    schema check can report every unknown key at once and name the closest valid one. Config-group choices
    (`model=tiny`), `+`, `++`, `~` and `hydra.*` overrides pass through unchanged.
    """
    from train.config import CONFIG_DIR

    groups = {p.name for p in CONFIG_DIR.iterdir() if p.is_dir()}
    rewritten = []
    for override in overrides:
        key = override.split("=", 1)[0]
        is_plain = "=" in override and not key.startswith(("+", "~", "hydra.")) and key.split("@")[0] not in groups
        rewritten.append(f"++{override}" if is_plain else override)
    return rewritten


def is_main_process() -> bool:
    return os.environ.get("RANK", "0") == "0"


def setup_logging() -> None:
    # Only the main process logs at INFO; the others report warnings and errors.
    level = logging.INFO if is_main_process() else logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")


def print_help() -> None:
    from train.config import describe_schema

    print(__doc__)
    print("Config keys (override with key=value; presets: loss=<config/loss/*.yaml>, model=<config/model/*.yaml>):")
    print(describe_schema())


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--help" in argv or "-h" in argv:
        print_help()
        return 0
    setup_logging()
    from train.errors import HalyardError

    try:
        cfg = compose_config(argv, check_model_files=True)
        from train.run import run

        run(cfg)
    except HalyardError as error:
        # A user error, or a stop on request: say what happened and what to do, without a traceback.
        code = getattr(error, "exit_code", EXIT_USER_ERROR)
        if is_main_process():
            print(f"halyard: {error}", file=sys.stderr)
            if code == EXIT_STOPPED:
                from train.supervise import record_stop

                record_stop(str(error))  # under train.supervise, the command then exits with 75 too
        return code
    finally:
        shut_down_processes()
    return 0


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
