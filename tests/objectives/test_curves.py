"""Every built-in loss (a file in config/loss/) has a stored curve of its first 10 training losses on the tiny model,
and today's run equals it (1e-5): a change in the numbers, wanted or not, fails here (relative 1e-5: float32
summation order alone moves the last digits). The stored curves were made before the preference losses moved to the
lean log-prob path, which kept them within 2e-6. A new loss's run, and its data, come from scripts/loss_curves.py;
record its curve, or regenerate one deliberately, with `.venv/bin/python scripts/loss_curves.py LOSS`. The losses
that share their data and settings train as one sweep, in one process: each curve also proves that a sweep's job
computes exactly what a run of its own computes."""

import json

import pytest
from loss_curves import CURVES_DIR, STEPS, curve_path, losses, missing_curve, run_curves

LOSSES = losses()  # config/loss/*.yaml


def test_every_built_in_loss_has_a_stored_curve_and_every_curve_a_loss():
    """Fast, so that a new loss without a curve fails even where the slow runs are deselected."""
    problems = [missing_curve(loss) for loss in LOSSES if not curve_path(loss).is_file()]
    problems += [
        f"{path}: a stored curve of no built-in loss (no config/loss/{path.stem}.yaml); delete it"
        for path in sorted(CURVES_DIR.glob("*.json"))
        if path.stem not in LOSSES
    ]
    assert not problems, "\n".join(problems)


@pytest.fixture(scope="module")
def curves(tiny_cache) -> dict[str, list[float]]:
    """Today's curve of every built-in loss: one sweep per group of losses sharing their data and settings."""
    return run_curves(LOSSES, tiny_cache)


@pytest.mark.slow
@pytest.mark.parametrize("loss", LOSSES)
def test_the_loss_curve_is_unchanged(curves, loss):
    if not curve_path(loss).is_file():
        pytest.fail(missing_curve(loss))
    stored = json.loads(curve_path(loss).read_text())["loss/train"]
    assert len(stored) == STEPS
    assert curves[loss] == pytest.approx(stored, rel=1e-5, abs=1e-5)
