"""KTO (train/objectives/kto.py) through the real CLI: its losses and KL estimate invariant to how the step is split.
Packed KTO against unpacked, exactly: tests/batching/test_packing.py."""

import pytest

from conftest import read_metrics, run_cli

pytestmark = pytest.mark.slow


def test_kto_is_split_invariant(tiny_cache):
    """KTO's KL reference point comes from the whole step (each prompt with the next example's completion across the
    global batch), so its losses are the same with 1 or 8 micro-batches and with 1 or 2 processes. Before, with
    per-micro-batch estimates, step 3 was 0.4221 with accumulation 1 and 0.4733 with 8."""
    from test_launch import accelerate_launcher  # on a free port: another xdist worker may run 2 processes too

    common = ["model=tiny", "loss=kto", f"cache_dir={tiny_cache}", "datasets=[data/demo/kto_train.jsonl]", "lr=1e-3"]
    common += ["warmup_ratio=0", "max_steps=3", "log_every_steps=1"]
    runs = {
        "kto-accum1": (None, []),
        "kto-accum8": (None, ["model.gradient_accumulation_steps=8"]),
        "kto-2proc": (accelerate_launcher("cpu_2proc.yaml"), ["model.gradient_accumulation_steps=2"]),
    }
    losses = {}
    for name, (launcher, extra) in runs.items():
        result = run_cli([*common, f"exp_name={name}", *extra], launcher=launcher)
        assert result.returncode == 0, result.stderr[-3000:]
        rows = [m for m in read_metrics(tiny_cache / name) if "loss/train" in m]
        losses[name] = [m["loss/train"] for m in rows] + [m["kl_train"] for m in rows]
    assert len(losses["kto-accum1"]) == 6 and losses["kto-accum1"][-1] > 0  # by step 3 the KL estimate is positive
    for name in ("kto-accum8", "kto-2proc"):
        assert losses[name] == pytest.approx(losses["kto-accum1"], rel=1e-5), name
