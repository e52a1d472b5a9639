"""Plot the training curves of one or more runs, overlaid for comparison.

Usage: python scripts/plot_metrics.py RUN_DIR [RUN_DIR ...] [--out curves.png]
Without --out the figure goes to RUN_DIR/metrics.png (one run), or curves.png in the working directory (several).

Four panels against the optimizer step: loss (train solid, eval dashed), learning rate, gradient norm and
throughput (real input tokens per second). Then one panel for each metric the loss logs of its own (train solid, eval
dashed): for DPO and the other preference losses and reward models, the rewards of the chosen and rejected responses,
the reward accuracy and margin and the policy's log-probs; for KTO also its KL estimate. SFT logs none: four panels.
Each run has its own color, labelled by its folder name.
"""

from __future__ import annotations

import argparse
import json
import math
import re
from pathlib import Path

PANELS = (
    ("loss", ("loss/train", "loss/eval")),
    ("learning rate", ("lr",)),
    ("gradient norm", ("grad_norm",)),
    ("throughput (tokens/s)", ("tokens_per_second",)),
)

# A loss's own metrics are logged per split: "rewards/chosen" as "rewards_train/chosen" and "rewards_eval/chosen",
# "kl" as "kl_train" (train/loop/trainer.py names them).
LOSS_METRIC = re.compile(r"^(?P<group>[a-z]+)_(?:train|eval)(?:/(?P<metric>.+))?$")
PAIRED = ("chosen", "rejected")  # drawn in one panel: their gap is what a preference loss widens


def loss_panels(rows: list[dict]) -> list[tuple[str, tuple[str, ...]]]:
    """(title, keys) of a panel for each metric of the loss's own, in first-logged order; chosen and rejected of a
    group share one panel."""
    panels: dict[str, list[str]] = {}
    for row in rows:
        for key in row:
            match = LOSS_METRIC.match(key)
            if not match:
                continue
            group, metric = match["group"], match["metric"]
            title = f"{group} ({' / '.join(PAIRED)})" if metric in PAIRED else " ".join(filter(None, (group, metric)))
            keys = panels.setdefault(title, [])
            if key not in keys:
                keys.append(key)
    return [(title, tuple(sorted(keys, key=_train_first))) for title, keys in panels.items()]


def _train_first(key: str) -> tuple[bool, str]:
    return ("_eval" in key, key)


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

    runs = [(run_dir, read_metrics(run_dir)) for run_dir in run_dirs]
    panels = list(PANELS)
    for _, rows in runs:
        panels += [panel for panel in loss_panels(rows) if panel[0] not in {title for title, _ in panels}]
    n_columns = 2 if len(panels) <= 4 else 3
    n_rows = math.ceil(len(panels) / n_columns)
    figure, grid = plt.subplots(n_rows, n_columns, figsize=(6 * n_columns, 4 * n_rows), sharex=True, squeeze=False)
    axes = list(grid.flat)
    for axis in axes[len(panels) :]:
        axis.remove()  # the grid's unused cells
    axes = axes[: len(panels)]
    for index, (run_dir, rows) in enumerate(runs):
        color = f"C{index}"
        for axis, (title, keys) in zip(axes, panels, strict=True):
            for key in keys:
                points = [(row["step"], row[key]) for row in rows if key in row]
                if not points:
                    continue
                steps, values = zip(*points, strict=True)
                dashed = key.endswith("/eval") or "_eval" in key
                style = {"linestyle": "--", "marker": "o", "markersize": 3} if dashed else {}
                if key.endswith("/rejected"):
                    style["alpha"] = 0.45  # paler than chosen, which shares its panel and color
                axis.plot(steps, values, color=color, label=f"{run_dir.name} {key}", **style)
            axis.set_title(title)
    for index, axis in enumerate(axes):
        axis.grid(alpha=0.3)
        if axis.lines:
            axis.legend(fontsize=7)
        if index + n_columns >= len(axes):  # nothing below it: the bottom of its column
            axis.set_xlabel("optimizer step")
            axis.xaxis.set_tick_params(labelbottom=True)
    figure.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=100)
    plt.close(figure)
    return [axis.get_title() for axis in axes]


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
