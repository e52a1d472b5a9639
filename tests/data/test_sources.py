"""Where rows come from (train/data/sources.py): .json lists, parquet, csv and saved datasets read; sources that cannot
be read named; named hub datasets offline."""

import json

import datasets
import pytest
from data_helpers import CONVERSATION, QA, write

from train.app.config import DataConfig
from train.data.chat import tokenize_conversation
from train.data.preprocess import load_examples
from train.data.sources import source_problem
from train.errors import DataError

KEYS = DataConfig()


def test_json_list_files_are_read(tmp_path, tiny_tokenizers):
    path = write(tmp_path, "d.json", json.dumps([{"instruction": "q", "output": "a"}, {"messages": CONVERSATION}]))
    examples, stats = load_examples([path], tiny_tokenizers["chatml"], KEYS, max_length=256)
    assert stats.examples == 2


@pytest.mark.parametrize("kind", ["parquet", "csv", "saved"])
def test_parquet_csv_and_saved_datasets(kind, tiny_tokenizers, tmp_path):
    rows = [{"instruction": "What is 2 plus 2?", "output": "Arr, 4, matey!"}, {"instruction": "Hi", "output": "Ahoy"}]
    table = datasets.Dataset.from_list(rows)
    source = str(tmp_path / {"parquet": "d.parquet", "csv": "d.csv", "saved": "saved"}[kind])
    {"parquet": table.to_parquet, "csv": table.to_csv, "saved": table.save_to_disk}[kind](source)
    assert source_problem(source) is None
    examples, stats = load_examples([source], tiny_tokenizers["chatml"], KEYS, 128)
    assert stats.rows == 2
    expected = tokenize_conversation(QA, tiny_tokenizers["chatml"], "r")
    assert examples[0].input_ids == expected.input_ids


def test_source_problems_are_named(tmp_path):
    (tmp_path / "folder").mkdir()
    (tmp_path / "d.txt").write_text("")
    assert "neither a file, a saved dataset folder, nor a named dataset" in source_problem(str(tmp_path / "nope.jsonl"))
    assert "not a dataset saved with datasets' save_to_disk" in source_problem(str(tmp_path / "folder"))
    assert "unsupported extension" in source_problem(str(tmp_path / "d.txt"))
    (tmp_path / "d.jsonl").write_text("")
    assert source_problem(str(tmp_path / "d.jsonl")).endswith(
        "is empty (0 bytes); give data in it, or leave it out of the list"
    )
    assert source_problem("ultrachat") is None


def test_named_dataset_offline_fails_fast_with_a_fix(tiny_tokenizers):
    with pytest.raises(DataError, match=r"'ultrachat' \(HuggingFaceH4/ultrachat_200k.*offline.*pass the file instead"):
        load_examples(["ultrachat"], tiny_tokenizers["chatml"], KEYS, 128)


GOOD = '{"instruction": "q", "output": "a"}\n'


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        # The parser's message ends in "at" (it appends the position itself): quoted once, with the column it gives.
        (
            "d.jsonl",
            GOOD + '{"instruction": "x\ty"}\n',
            "d.jsonl line 2: not valid JSON (invalid control character at column 19)",
        ),
        ("d.jsonl", '{"a": "x\n', "d.jsonl line 1: not valid JSON (unterminated string starting at column 7)"),
        # A line cut short: the line's end, not a column past it (or "column 1" of the next line).
        ("d.jsonl", '{"a": 1\n', "d.jsonl line 1: not valid JSON (expecting ',' delimiter at the end of the line)"),
        ("d.jsonl", '{"a": 1\r\n', "d.jsonl line 1: not valid JSON (expecting ',' delimiter at the end of the line)"),
        ("d.json", '[{"a": 1}\n{"a": 2}]', "d.json: not valid JSON (expecting ',' delimiter at line 2, column 1)"),
        ("d.json", '[{"a": 1},\n', "d.json: not valid JSON (expecting value at the end of the file, line 2)"),
    ],
)
def test_json_errors_quote_the_parsers_position_once(tmp_path, tiny_tokenizers, name, content, message):
    path = tmp_path / name
    path.write_bytes(content.encode())
    with pytest.raises(DataError) as error:
        load_examples([str(path)], tiny_tokenizers["chatml"], KEYS, 64)
    assert str(error.value) == f"{tmp_path}/{message}"
