"""Preprocessing (train/data/preprocess.py): the cache and its key, sharded and parallel work equal to one process,
restart from finished shards, data.on_bad_row, empty files."""

import contextlib
from pathlib import Path

import pytest
from data_helpers import demo_config

from conftest import DEMO_TRAIN
from train.app.config import DataConfig
from train.data.preprocess import load_examples
from train.errors import DataError

KEYS = DataConfig()


def test_preprocessing_is_cached_and_reused(tmp_path, tiny_tokenizers, caplog):
    from train.data.datasets import build_datasets

    tokenizer = tiny_tokenizers["chatml"]
    cfg = demo_config(tmp_path)
    with caplog.at_level("INFO", logger="train.data"):
        first, _, stats = build_datasets(cfg, tokenizer)
        assert "cached preprocessed data in" in caplog.text
        caplog.clear()
        again, _, stats_again = build_datasets(cfg, tokenizer)
        assert "reusing preprocessed data cached in" in caplog.text
    assert [e.input_ids for e in again] == [e.input_ids for e in first] and stats == stats_again
    # A setting that changes tokenization gets its own cache entry.
    caplog.clear()
    with caplog.at_level("INFO", logger="train.data"):
        build_datasets(demo_config(tmp_path, "data.train_on=all"), tokenizer)
    assert "reusing" not in caplog.text
    assert len(list((tmp_path / "preprocessed").iterdir())) == 2
    # Settings that only select, order or pack tokenized examples reuse it: packing adds a plan beside the data.
    caplog.clear()
    with caplog.at_level("INFO", logger="train.data"):
        build_datasets(
            demo_config(tmp_path, "data.packing=true", "data.group_by_length=true", "data.num_proc=2"), tokenizer
        )
    assert "reusing preprocessed data cached in" in caplog.text
    assert len(list((tmp_path / "preprocessed").iterdir())) == 2


def test_caching_can_be_turned_off(tmp_path, tiny_tokenizers):
    from train.data.datasets import build_datasets

    train, _, _ = build_datasets(demo_config(tmp_path, "data.cache_preprocessing=false"), tiny_tokenizers["chatml"])
    assert len(train) == 123 and not (tmp_path / "preprocessed").exists()


def test_parallel_sharded_preprocessing_equals_one_process(tmp_path, tiny_tokenizers, monkeypatch, caplog):
    from train.data import preprocess as data

    monkeypatch.setattr(data, "SHARD_ROWS", 10)  # 13 shards
    source = tmp_path / "rows.jsonl"
    rows = Path(DEMO_TRAIN).read_text().splitlines()
    source.write_text("\n".join([*rows[:57], "{broken", *rows[57:]]) + "\n")
    results = {}
    for num_proc in (1, 2):
        settings = DataConfig(num_proc=num_proc, on_bad_row="skip")
        with caplog.at_level("INFO"):
            results[num_proc] = data.preprocess(
                [str(source)], tiny_tokenizers["chatml"], settings, 64, "sft", tmp_path / str(num_proc),
                contextlib.nullcontext,
            )  # fmt: skip
        assert "tokenized 124 rows in" in caplog.text and "rows/s" in caplog.text
        assert len(list((tmp_path / str(num_proc)).glob("*/shards/*.arrow"))) == 13
    (one, one_stats), (two, two_stats) = results[1], results[2]
    assert one_stats == two_stats and one_stats.skipped_bad_rows == 1 and one_stats.rows == 124
    assert [(e.input_ids, e.labels) for e in one] == [(e.input_ids, e.labels) for e in two]
    assert one.fingerprint() == two.fingerprint()  # the same cache key: num_proc does not change the data


def test_interrupted_preprocessing_restarts_from_its_finished_shards(tmp_path, tiny_tokenizers, monkeypatch):
    from train.data import preprocess as data
    from train.data.datasets import build_datasets

    monkeypatch.setattr(data, "SHARD_ROWS", 16)  # 123 rows: 8 shards
    tokenize_rows, started, killed = data.tokenize_rows, [], []

    def killed_at_the_fourth_shard(rows, **settings):
        started.append(rows[0][0])
        if len(started) == 4 and not killed:
            killed.append(True)
            raise KeyboardInterrupt
        return tokenize_rows(rows, **settings)

    monkeypatch.setattr(data, "tokenize_rows", killed_at_the_fourth_shard)
    cfg = demo_config(tmp_path)
    with pytest.raises(KeyboardInterrupt):
        build_datasets(cfg, tiny_tokenizers["chatml"])
    started.clear()
    train, _, stats = build_datasets(cfg, tiny_tokenizers["chatml"])
    assert len(started) == 5 and started[0].endswith("line 49")  # shards 0-2 were kept, 3-7 done now
    fresh, _, _ = build_datasets(demo_config(tmp_path / "fresh"), tiny_tokenizers["chatml"])
    assert [e.input_ids for e in train] == [e.input_ids for e in fresh] and stats["train"]["examples"] == 123


def test_bad_rows_can_be_skipped_and_are_counted(tiny_tokenizers, tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(
        '{"instruction": "q", "output": "a"}\n{not json\n{"instruction": "q"}\n[1]\n{"instruction": "q2", "output": "b"}\n'
    )
    with pytest.raises(DataError, match=r"line 2: not valid JSON .*\(2 more bad rows; data.on_bad_row=skip"):
        load_examples([str(path)], tiny_tokenizers["chatml"], KEYS, 128)
    examples, stats = load_examples([str(path)], tiny_tokenizers["chatml"], DataConfig(on_bad_row="skip"), 128)
    assert (len(examples), stats.rows, stats.skipped_bad_rows) == (2, 5, 3)
    assert "3 malformed rows skipped" in stats.describe("train", 128)


@pytest.mark.parametrize("content", ["", "\n\n"])  # validation refuses the first before any data is read
def test_a_data_file_without_rows_is_an_error_naming_it(tiny_tokenizers, tmp_path, content):
    empty = tmp_path / "empty.jsonl"
    empty.write_text(content)
    with pytest.raises(DataError, match=f"{empty}: no rows \\(the file is empty\\)"):
        load_examples([str(empty)], tiny_tokenizers["chatml"], KEYS, max_length=64)
