"""Plot the training curves of one or more runs, overlaid for comparison.

Usage: python scripts/plot_metrics.py RUN_DIR [RUN_DIR ...] [--out curves.png]
Without --out the figure goes to RUN_DIR/metrics.png (one run), or curves.png in the working directory (several).

Four panels against the optimizer step: loss (train solid, eval dashed), learning rate, gradient norm and
throughput (real input tokens per second). Each run has its own color, labelled by its folder name.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

PANELS = (
    ("loss", ("loss/train", "loss/eval")),
    ("learning rate", ("lr",)),
    ("gradient norm", ("grad_norm",)),
    ("throughput (tokens/s)", ("tokens_per_second",)),
)


def read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        raise SystemExit(f"{run_dir}: no metrics.jsonl here; give the run directory of a Halyard run")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot(run_dirs: list[Path], out: Path) -> list[str]:
    """Write the figure to `out`; return the panel titles in order."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(2, 2, figsize=(12, 8), sharex=True)
    for index, run_dir in enumerate(run_dirs):
        rows = read_metrics(run_dir)
        color = f"C{index}"
        for axis, (title, keys) in zip(axes.flat, PANELS, strict=True):
            for key in keys:
                points = [(row["step"], row[key]) for row in rows if key in row]
                if not points:
                    continue
                steps, values = zip(*points, strict=True)
                eval_style = {"linestyle": "--", "marker": "o", "markersize": 3} if key.endswith("/eval") else {}
                axis.plot(steps, values, color=color, label=f"{run_dir.name} {key}", **eval_style)
            axis.set_title(title)
    for axis in axes.flat:
        axis.grid(alpha=0.3)
        if axis.lines:
            axis.legend(fontsize=7)
    for axis in axes[1]:
        axis.set_xlabel("optimizer step")
    figure.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=100)
    plt.close(figure)
    return [axis.get_title() for axis in axes.flat]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dirs", type=Path, nargs="+")
    parser.add_argument("--out", type=Path, help="the PNG to write (default: RUN_DIR/metrics.png, or curves.png)")
    args = parser.parse_args()
    out = args.out or default_out(args.run_dirs)
    plot(args.run_dirs, out)
    print(out)


def default_out(run_dirs: list[Path]) -> Path:
    return run_dirs[0] / "metrics.png" if len(run_dirs) == 1 else Path("curves.png")


if __name__ == "__main__":
    main()
