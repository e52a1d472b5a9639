"""Fitting examples into model.max_length (train/data/truncate.py): the prompt cut from the left first,
data.max_prompt_length, and the drop and error policies."""

import json

import pytest
from data_helpers import supervised_text, write

from train.app.config import DataConfig
from train.data.chat import tokenize_conversation
from train.data.formats import parse_row
from train.data.preprocess import load_examples
from train.data.store import IGNORE_INDEX
from train.errors import DataError

KEYS = DataConfig()


LONG_ROWS = [
    {"instruction": "short", "output": "ok"},
    {"instruction": "word " * 200, "output": "kept"},
    {"instruction": "q", "output": "answer " * 100},
]


def test_truncation_cuts_the_prompt_from_the_left_first(tmp_path, tiny_tokenizers):
    tokenizer = tiny_tokenizers["chatml"]
    path = write(tmp_path, "d.jsonl", "".join(json.dumps(r) + "\n" for r in LONG_ROWS))
    examples, stats = load_examples([path], tokenizer, KEYS, max_length=64)
    assert (stats.rows, stats.examples, stats.truncated, stats.dropped_too_long) == (3, 3, 2, 0)
    assert all(len(e.input_ids) <= 64 for e in examples)
    full = tokenize_conversation(parse_row(LONG_ROWS[1], "r", KEYS).messages, tokenizer, "r")
    assert examples[1].input_ids == full.input_ids[-64:]  # the end of the prompt and the whole response
    assert examples[1].labels == full.labels[-64:]
    long_answer = tokenize_conversation(parse_row(LONG_ROWS[2], "r", KEYS).messages, tokenizer, "r")
    prompt_length = next(i for i, label in enumerate(long_answer.labels) if label != IGNORE_INDEX)
    assert examples[2].input_ids == long_answer.input_ids[prompt_length : prompt_length + 64]  # no prompt left
    assert supervised_text(tokenizer, examples[2]).startswith("answer answer")


def test_max_prompt_length_and_drop_and_error_policies(tmp_path, tiny_tokenizers):
    tokenizer = tiny_tokenizers["chatml"]
    path = write(tmp_path, "d.jsonl", "".join(json.dumps(r) + "\n" for r in LONG_ROWS))
    examples, stats = load_examples([path], tokenizer, DataConfig(max_prompt_length=10), max_length=1000)
    prompt_lengths = [e.labels.index(next(label for label in e.labels if label != IGNORE_INDEX)) for e in examples]
    assert max(prompt_lengths) == 10 and stats.truncated == 2  # the short row's prompt is 11 tokens
    examples, stats = load_examples([path], tokenizer, DataConfig(truncation="drop"), max_length=64)
    assert (stats.examples, stats.dropped_too_long) == (1, 2)
    assert "2 dropped as longer than model.max_length" in stats.describe("train", 64)
    with pytest.raises(DataError, match=r"d.jsonl line 2: \d+ tokens, over model.max_length=64"):
        load_examples([path], tokenizer, DataConfig(truncation="error"), max_length=64)
