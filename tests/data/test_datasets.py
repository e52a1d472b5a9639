"""The data of a run (train/data/datasets.py): sources mixed, the eval split held out before rows repeat, the count
capped, nothing left is an error."""

import pytest
from data_helpers import demo_config, write_jsonl

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


def test_each_files_detected_format_is_logged_and_kept_in_the_stats(tmp_path, tiny_tokenizers, caplog):
    from train.data.datasets import build_datasets

    sharegpt = write_jsonl(
        tmp_path, [{"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Ahoy"}]}] * 3
    )
    cfg = demo_config(tmp_path, f"datasets=[{DEMO_TRAIN},{sharegpt}]")
    expected = {DEMO_TRAIN: {"instruction": 88, "messages": 35}, sharegpt: {"sharegpt": 3}}
    for _ in ("preprocessed", "cached"):
        caplog.clear()
        with caplog.at_level("INFO", logger="train.data"):
            _, _, stats = build_datasets(cfg, tiny_tokenizers["chatml"])
        assert stats["train"]["formats"] == expected
        assert f"format of {DEMO_TRAIN} (train): instruction (88 rows), messages (35 rows)" in caplog.text
        assert f"format of {sharegpt} (train): sharegpt (3 rows)" in caplog.text


@pytest.mark.slow
def test_tokenizer_without_template_one_error_then_data_chat_template_trains(tmp_path, tiny_cache):
    """Through the CLI: a tokenizer without a chat template stops the run once, naming data.chat_template (not once
    per row); with data.chat_template=chatml it trains, saves the template with the model and reports each file's
    format in summary.json."""
    import json
    import shutil

    from conftest import run_cli
    from train.data.templates import CHAT_TEMPLATES

    bare = tmp_path / "bare-tokenizer"
    bare.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_cache / "tiny-llama" / name, bare / name)
    rows = write_jsonl(
        tmp_path, [{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Ahoy"}]}] * 4
    )
    args = ["loss=sft", "model=tiny", f"cache_dir={tiny_cache}", f"datasets=[{rows},{DEMO_TRAIN}]", "max_steps=1",
            f"++model.tokenizer_name_or_path={bare}", "data.on_bad_row=skip"]  # fmt: skip
    failed = run_cli([*args, "exp_name=no-template"])
    assert failed.returncode == 2, failed.stderr[-2000:]
    output = failed.stdout + failed.stderr
    assert output.count("has no chat template") == 1 and "Traceback" not in output
    assert f"the tokenizer at '{bare}' has no chat template" in output and "data.chat_template=chatml" in output

    result = run_cli([*args, "exp_name=chatml-template", "data.chat_template=chatml"])
    assert result.returncode == 0, result.stderr[-3000:]
    run = tiny_cache / "chatml-template"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["data"]["train"]["formats"] == {
        rows: {"messages": 4},
        DEMO_TRAIN: {"instruction": 88, "messages": 35},
    }
    assert f"format of {rows} (train): messages (4 rows)" in result.stdout + result.stderr
    assert (run / "FINAL" / "chat_template.jinja").read_text() == CHAT_TEMPLATES["chatml"]
