"""The reference model (train/objectives/reference.py) through the real CLI: its precomputed log-probs cached per
pair, reused, kept apart per model and checked against the model."""

import pytest

from conftest import run_cli

pytestmark = pytest.mark.slow
PREF = ["model=tiny", "datasets=[data/demo/pref_train.jsonl]", "eval_datasets=[data/demo/pref_eval.jsonl]"]


def test_the_reference_cache_is_reused_per_pair_and_checked_against_the_model(tiny_cache, tmp_path):
    """A run on a subset caches its pairs; a run on all the data computes only the others; another reference model
    gets its own cache; a cache that no longer matches its model is refused with the way out."""
    import numpy as np

    import make_tiny_model

    cache_dir = tmp_path / "cache"
    (cache_dir).mkdir()
    (cache_dir / "tiny-llama").symlink_to(tiny_cache / "tiny-llama")
    args = [*PREF, "loss=dpo", f"cache_dir={cache_dir}", "max_steps=2", "reference.precompute=true"]
    subset = run_cli([*args, "exp_name=subset", "data.n_examples=70"])
    assert subset.returncode == 0, subset.stderr[-3000:]
    assert "precomputing reference log-probs for 98 pairs (0 cached" in subset.stderr  # 70 train + 28 eval
    everything = run_cli([*args, "exp_name=all"])
    assert "precomputing reference log-probs for 70 pairs (98 cached" in everything.stderr
    again = run_cli([*args, "exp_name=again", "data.eval_split_ratio=0.1", "eval_datasets=[]"])
    assert "no reference model is loaded" in again.stderr and again.stderr.count("model: ") == 1
    # Another reference model (other weights): its own cache, computed from scratch.
    make_tiny_model.make(tmp_path / "other-llama", "chatml", seed=1)
    other = run_cli([*args, "exp_name=other", f"++model.name_or_path={tmp_path / 'other-llama'}"])
    assert "precomputing reference log-probs for 168 pairs (0 cached" in other.stderr
    # A cached value that the model does not reproduce (here: overwritten) is caught when the model is loaded anyway.
    folders = sorted((cache_dir / "reference_logps").iterdir(), key=lambda f: f.stat().st_mtime)
    train_cache = max(folders[0].glob("*.npy"), key=lambda f: np.load(f).shape[0])
    values = np.load(train_cache)
    values[~np.isnan(values[:, 0])] += 5.0
    values[0] = np.nan  # one pair missing: the model must be loaded
    np.save(train_cache, values)
    drifted = run_cli([*args, "exp_name=drifted"])
    assert drifted.returncode == 2 and "differ from the reference model's" in drifted.stderr, drifted.stderr[-2000:]
    assert f"Delete {folders[0]}" in drifted.stderr
