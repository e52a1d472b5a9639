"""The data of a run (train/data/datasets.py): sources mixed, the eval split held out before rows repeat, the count
capped, nothing left is an error."""

import pytest
from data_helpers import demo_config

from conftest import DEMO_EVAL, DEMO_TRAIN
from train.app.config import DataConfig
from train.errors import DataError

KEYS = DataConfig()


def test_mixing_eval_split_and_cap(tmp_path, tiny_tokenizers):
    from train.data.datasets import build_datasets

    tokenizer = tiny_tokenizers["chatml"]
    cfg = demo_config(tmp_path, f"datasets=[{DEMO_TRAIN},{DEMO_EVAL}]", "data.dataset_samples=[0.5,56]")
    train, evaluation, _ = build_datasets(cfg, tokenizer)
    assert len(train) == round(0.5 * 123) + 56 and evaluation is None  # 56 = the 28 eval rows twice
    cfg = demo_config(tmp_path, "data.eval_split_ratio=0.2", "data.n_examples=50")
    train, evaluation, _ = build_datasets(cfg, tokenizer)
    assert (len(train), len(evaluation)) == (50, 25)
    held_out = {tuple(e.input_ids) for e in evaluation}
    assert not any(tuple(e.input_ids) in held_out for e in train)


def test_eval_split_is_taken_before_rows_are_repeated(tmp_path, tiny_tokenizers):
    """dataset_samples repeating a source 3 times over and an eval split: no evaluation row is trained on."""
    from train.data.datasets import build_datasets

    cfg = demo_config(tmp_path, "data.dataset_samples=[369]", "data.eval_split_ratio=0.2")
    train, evaluation, _ = build_datasets(cfg, tiny_tokenizers["chatml"])
    assert (len(train), len(evaluation)) == (369, 25)
    assert not set(train.rows.tolist()) & set(evaluation.rows.tolist())  # rows of the tokenized table
    assert len(set(train.rows.tolist())) == 123 - 25  # every remaining row, repeated
    held_out = {tuple(e.input_ids) for e in evaluation}
    assert not any(tuple(e.input_ids) in held_out for e in train)


def test_no_examples_left_after_filtering_is_an_error(tmp_path, tiny_tokenizers):
    from train.data.datasets import build_datasets

    cfg = demo_config(tmp_path, "model.max_length=16", "data.truncation=drop")
    with pytest.raises(
        DataError, match=r"no training examples left: train: 0 examples from 123 rows; 123 dropped as longer"
    ):
        build_datasets(cfg, tiny_tokenizers["chatml"])
