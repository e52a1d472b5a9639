"""Stored 10-step loss curves of every built-in loss on the tiny model (float32, CPU), so that a silent numerical
change fails a test (tests/objectives/test_curves.py runs the same runs and compares them to 1e-5).

    python scripts/loss_curves.py [LOSS ...]   # regenerate tests/curves/<loss>.json, after a deliberate change

Each run goes through the real CLI (launch.py in a subprocess) with the tiny model built by make_tiny_model.py.
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
CURVES_DIR = REPO / "tests" / "curves"
STEPS = 10
COMMON = ["model=tiny", f"max_steps={STEPS}", "log_every_steps=1", "seed=0", "eval_every_steps=1000"]
RUNS = {  # loss: its data, a learning rate at which 10 steps move the loss smoothly, what it needs to last 10 steps
    "sft": ["datasets=[data/demo/train.jsonl]", "lr=1e-3"],
    "pt": ["datasets=[data/demo/text.jsonl]", "lr=1e-3", "model.batch_size=4", "n_epochs=2"],
    "dpo": ["datasets=[data/demo/pref_train.jsonl]", "lr=1e-3"],
    "cdpo": ["datasets=[data/demo/pref_train.jsonl]", "lr=1e-3"],
    "ipo": ["datasets=[data/demo/pref_train.jsonl]", "lr=1e-4"],  # its squared loss oscillates at 1e-3
    "simpo": ["datasets=[data/demo/pref_train.jsonl]", "lr=1e-3"],
    "kto": ["datasets=[data/demo/kto_train.jsonl]", "lr=1e-3"],
    "rdpo": ["datasets=[data/demo/pref_train.jsonl]", "lr=1e-3"],
    "hinge": ["datasets=[data/demo/pref_train.jsonl]", "lr=1e-3"],
    "apo_zero": ["datasets=[data/demo/pref_train.jsonl]", "lr=1e-3"],
    "apo_down": ["datasets=[data/demo/pref_train.jsonl]", "lr=1e-3"],
    "rpo": ["datasets=[data/demo/pref_train.jsonl]", "lr=1e-3"],
    "cpo": ["datasets=[data/demo/pref_train.jsonl]", "lr=1e-3"],
    "orpo": ["datasets=[data/demo/pref_train.jsonl]", "lr=1e-3"],
    "rm": ["datasets=[data/demo/pref_train.jsonl]", "lr=1e-3"],
}


def run_curve(loss: str, cache_dir: Path) -> list[float]:
    """The training loss of each of the first 10 steps of `loss` on the demo data; `cache_dir` holds tiny-llama/."""
    args = [f"loss={loss}", *COMMON, *RUNS[loss], f"cache_dir={cache_dir}", f"exp_name=curve-{loss}"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "offline"}
    result = subprocess.run(
        [sys.executable, str(REPO / "launch.py"), *args], cwd=REPO, env=env, capture_output=True, text=True
    )
    if result.returncode != 0:
        raise RuntimeError(f"loss={loss} failed:\n{result.stderr[-3000:]}")
    rows = [json.loads(line) for line in (cache_dir / f"curve-{loss}" / "metrics.jsonl").read_text().splitlines()]
    return [row["loss/train"] for row in rows if "loss/train" in row]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("losses", nargs="*", default=sorted(RUNS))
    args = parser.parse_args()
    sys.path.insert(0, str(REPO / "scripts"))
    import make_tiny_model

    CURVES_DIR.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory() as cache:
        make_tiny_model.make(Path(cache) / "tiny-llama", "chatml")
        for loss in args.losses:
            curve = run_curve(loss, Path(cache))
            (CURVES_DIR / f"{loss}.json").write_text(json.dumps({"loss/train": curve}, indent=1) + "\n")
            print(f"{loss}: {' '.join(f'{v:.5f}' for v in curve)}")


if __name__ == "__main__":
    main()
