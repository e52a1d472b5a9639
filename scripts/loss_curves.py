"""Stored 10-step loss curves of every built-in loss on the tiny model (float32, CPU), so that a silent numerical
change fails a test (tests/objectives/test_curves.py runs the same runs and compares them to 1e-5).

    .venv/bin/python scripts/loss_curves.py LOSS [LOSS ...]   # record tests/objectives/curves/<loss>.json
    .venv/bin/python scripts/loss_curves.py                   # every built-in loss, after a deliberate change

The losses are the files of config/loss/; each trains on the demo file of the rows its trainer class consumes (its
`data_kind`), so a new loss needs no entry here, only its recorded curve. Each run goes through the real CLI
(launch.py in a subprocess) with the tiny model built by make_tiny_model.py: recorded one process per loss, checked
with the losses that share their data and settings trained as one sweep.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run as a script, train/ is not on the path

from train.app.loss_registry import builtin_losses, resolve_loss  # noqa: E402 (after the path above)
from train.app.sweep import sweep_rows  # noqa: E402

CURVES_DIR = REPO / "tests" / "objectives" / "curves"
STEPS = 10
COMMON = ["model=tiny", f"max_steps={STEPS}", "log_every_steps=1", "seed=0", "eval_every_steps=1000"]
DEMO_DATA = {  # a trainer's data_kind: the demo file of those rows
    "sft": "data/demo/train.jsonl",
    "text": "data/demo/text.jsonl",
    "paired": "data/demo/pref_train.jsonl",
    "unpaired": "data/demo/kto_train.jsonl",
}
DEFAULT_LR = "1e-3"  # 10 steps at this rate move every loss smoothly, but for the exceptions below
EXCEPTIONS = {  # loss: the overrides it needs besides its data and DEFAULT_LR
    "ipo": {"lr": "1e-4"},  # its squared loss oscillates at 1e-3
    "pt": {"model.batch_size": "4", "n_epochs": "2"},  # 24 demo texts: smaller batches, twice over, last 10 steps
}


def losses() -> list[str]:
    """The built-in losses, the files of config/loss/ (no torch imported)."""
    return sorted(builtin_losses())


def curve_path(loss: str) -> Path:
    return CURVES_DIR / f"{loss}.json"


def record_command(loss: str) -> str:
    return f".venv/bin/python scripts/loss_curves.py {loss}"


def missing_curve(loss: str) -> str:
    """What a test says about a built-in loss that has no stored curve."""
    return (
        f"loss={loss} (config/loss/{loss}.yaml) has no stored curve {curve_path(loss).relative_to(REPO)}: record it "
        f"with `{record_command(loss)}`, check that its {STEPS} losses move smoothly, and commit the file"
    )


def run_overrides(loss: str) -> list[str]:
    """The overrides of `loss`'s curve run: its data (read from its trainer's data_kind), learning rate, exceptions."""
    spec, problems = resolve_loss(loss, builtin_losses()[loss])
    if spec is None:
        raise RuntimeError(f"config/loss/{loss}.yaml: " + "; ".join(problems))
    settings = {"datasets": f"[{DEMO_DATA[spec.data_kind]}]", "lr": DEFAULT_LR, **EXCEPTIONS.get(loss, {})}
    return [f"{key}={value}" for key, value in settings.items()]


def run_curves(names: list[str], cache_dir: Path) -> dict[str, list[float]]:
    """The training loss of each of the first 10 steps of each loss in `names` on the demo data; `cache_dir` holds
    tiny-llama/. The losses that share their overrides train as one sweep (`main` records each in a process of its
    own, so a curve that matches its stored one also proves that a sweep's job computes what a run of its own
    does)."""
    settings = {loss: run_overrides(loss) for loss in names}
    curves = {}
    for loss, run_dir in run_losses_as_sweeps(settings, COMMON, cache_dir, "curves").items():
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        curves[loss] = [row["loss/train"] for row in rows if "loss/train" in row]
    return curves


def run_losses_as_sweeps(
    settings: dict[str, list[str]], args: list[str], cache_dir: Path, name: str
) -> dict[str, Path]:
    """Train each loss of `settings` with its own overrides there and `args`; the losses with the same overrides as one
    sweep (`launch.py -m loss=a,b,... ARGS`: one process trains them in turn) in `cache_dir`/`name`-<first loss>.
    Each loss's run directory; raises with the log's tail unless every job finished."""
    groups: dict[tuple[str, ...], list[str]] = {}
    for loss, overrides in settings.items():
        groups.setdefault(tuple(overrides), []).append(loss)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "offline"}
    run_dirs = {}
    for overrides, losses_of_group in groups.items():
        sweep = f"{name}-{losses_of_group[0]}"
        command = [sys.executable, str(REPO / "launch.py"), "-m", f"loss={','.join(losses_of_group)}", *args]
        command += [*overrides, f"cache_dir={cache_dir}", f"exp_name={sweep}"]
        result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
        jobs = sweep_rows(cache_dir / sweep)  # in job order: job N trained the Nth loss of `loss=a,b,...`
        if result.returncode != 0 or len(jobs) != len(losses_of_group):
            raise RuntimeError(f"loss={','.join(losses_of_group)} failed:\n{result.stderr[-3000:]}")
        for loss, job in zip(losses_of_group, jobs, strict=True):
            if job["status"] != "done" or job["overrides"] not in ("-", f"loss={loss}"):  # "-": a sweep of one job
                raise RuntimeError(f"loss={loss}: {job['status']} ({job['overrides']}):\n{result.stderr[-3000:]}")
            run_dirs[loss] = Path(job["run_dir"])
    return run_dirs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("losses", nargs="*", metavar="LOSS", help="losses to record (default: every built-in loss)")
    args = parser.parse_args()
    unknown = sorted(set(args.losses) - set(losses()))
    if unknown:
        parser.error(f"no config/loss/<name>.yaml for {unknown}; built-in losses: {', '.join(losses())}")
    sys.path.insert(0, str(REPO / "scripts"))
    import make_tiny_model

    CURVES_DIR.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as cache:
        make_tiny_model.make(Path(cache) / "tiny-llama", "chatml")
        for loss in args.losses or losses():  # each in a process of its own: the test's sweeps are checked against it
            curve = run_curves([loss], Path(cache))[loss]
            curve_path(loss).write_text(json.dumps({"loss/train": curve}, indent=1) + "\n")
            print(f"{loss}: {' '.join(f'{v:.5f}' for v in curve)}")


if __name__ == "__main__":
    main()
