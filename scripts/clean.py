"""Free disk: remove runs, their step checkpoints, the preprocessing caches, or the converted demo model.

Usage:
  python scripts/clean.py                              # list what is there, with sizes (removes nothing)
  python scripts/clean.py RUN [RUN ...] [--dry-run]    # remove runs (names in --cache-dir, or paths)
  python scripts/clean.py --checkpoints [RUN ...]      # remove step-N/ checkpoints (of RUNs, or all), keep FINAL/
  python scripts/clean.py --all-runs --caches --demo-model [--dry-run]

Runs live in --cache-dir (default runs/, the config's cache_dir); the preprocessing and reference caches in
runs/preprocessed/ and runs/reference_logps/; the demo model converted by scripts/prepare_smollm2.py in
${HALYARD_HOME:-~/.cache/halyard}.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

CACHES = ("preprocessed", "reference_logps")  # under cache_dir, beside the runs


def demo_home() -> Path:
    return Path(os.environ.get("HALYARD_HOME", Path.home() / ".cache" / "halyard"))


def size_of(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())


def is_run(path: Path) -> bool:
    """A run directory (or a sweep's folder): what launch.py writes, nothing else is ever removed as a run."""
    from train.loop.run_files import CONFIG_FILE, METRICS_FILE, TABLE_JSON

    return path.is_dir() and any((path / name).exists() for name in (CONFIG_FILE, METRICS_FILE, TABLE_JSON))


def runs_in(cache_dir: Path) -> list[Path]:
    """Run directories (and sweeps' folders) in cache_dir."""
    if not cache_dir.is_dir():
        return []
    return sorted(p for p in cache_dir.iterdir() if p.name not in CACHES and is_run(p))


def selected(args) -> list[Path]:
    cache_dir = args.cache_dir
    runs = []
    for run in args.runs:
        path = Path(run) if Path(run).exists() else cache_dir / run
        if not is_run(path):
            raise SystemExit(f"clean: '{run}' is not a run directory (no config.yaml or metrics.jsonl in {path}); "
                             f"runs in {cache_dir}: {[p.name for p in runs_in(cache_dir)]}")  # fmt: skip
        runs.append(path)
    if args.all_runs:
        runs += runs_in(cache_dir)
    if args.checkpoints:  # of the named runs, or of every run
        paths = [c for run in runs or runs_in(cache_dir) for c in sorted(run.glob("step-*")) if c.is_dir()]
    else:
        paths = runs
    if args.caches:
        paths += [cache_dir / name for name in CACHES if (cache_dir / name).exists()]
    if args.demo_model and demo_home().exists():
        paths.append(demo_home())
    return list(dict.fromkeys(paths))


def listing(cache_dir: Path) -> list[Path]:
    """Everything clean.py could remove."""
    paths = runs_in(cache_dir) + [cache_dir / n for n in CACHES if (cache_dir / n).exists()]
    return paths + ([demo_home()] if demo_home().exists() else [])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="*", help="run names (in --cache-dir) or run directories to remove")
    parser.add_argument("--cache-dir", type=Path, default=Path("runs"), help="the config's cache_dir (default runs)")
    parser.add_argument("--all-runs", action="store_true", help="every run in --cache-dir")
    parser.add_argument("--checkpoints", action="store_true", help="only the step-N/ checkpoints of the runs given, "
                        "or of every run (FINAL/ stays)")  # fmt: skip
    parser.add_argument("--caches", action="store_true", help="the preprocessing and reference log-prob caches")
    parser.add_argument("--demo-model", action="store_true", help=f"the converted demo model ({demo_home()})")
    parser.add_argument("--dry-run", action="store_true", help="list what would be removed, remove nothing")
    args = parser.parse_args(argv)
    paths = selected(args)
    if not paths and asked_for_something(args):
        print(f"nothing to remove: {nothing_matched(args)}")
        return 0
    if not paths:
        everything = listing(args.cache_dir)
        print(f"nothing selected; what could be removed ({size_of_all(everything)}):")
        for path in everything:
            print(f"  {human(size_of(path)):>9}  {path}")
        return 0
    print(f"{'would remove' if args.dry_run else 'removing'} {len(paths)} folder(s), {size_of_all(paths)}:")
    for path in paths:
        print(f"  {human(size_of(path)):>9}  {path}")
        if not args.dry_run:
            shutil.rmtree(path)
    return 0


def asked_for_something(args) -> bool:
    """Whether the command line selects anything; plain `clean.py` only lists."""
    return bool(args.runs or args.all_runs or args.checkpoints or args.caches or args.demo_model)


def nothing_matched(args) -> str:
    """What was asked for and not found, e.g. `no step-N/ checkpoints in runs/a`."""
    where = ", ".join(args.runs) or str(args.cache_dir)
    misses = []
    if args.checkpoints:
        misses.append(f"no step-N/ checkpoints in {where}")
    elif args.all_runs:
        misses.append(f"no runs in {args.cache_dir}")
    if args.caches:
        misses.append(f"no caches ({', '.join(f'{name}/' for name in CACHES)}) in {args.cache_dir}")
    if args.demo_model:
        misses.append(f"no demo model at {demo_home()}")
    return "; ".join(misses)


def size_of_all(paths: list[Path]) -> str:
    return human(sum(size_of(p) for p in paths))


def human(size: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GB"


if __name__ == "__main__":
    sys.exit(main())
