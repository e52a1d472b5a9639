"""Tokenizing rows into the store's columns (train/data/tokenize.py): plain text chunked, every token supervised."""

from data_helpers import write_jsonl

from train.app.config import DataConfig
from train.data.formats import Text, parse_row
from train.data.preprocess import load_examples

KEYS = DataConfig()


def test_text_rows_supervise_every_token_and_are_chunked(tiny_tokenizers, tmp_path):
    tokenizer = tiny_tokenizers["llama3"]  # has a BOS token
    text = "The quick brown fox jumps over the lazy dog. " * 8
    assert parse_row({"text": text}, "r", KEYS) == Text(text)
    examples, _ = load_examples([write_jsonl(tmp_path, [{"text": text}])], tokenizer, KEYS, max_length=32)
    ids = [tokenizer.bos_token_id, *tokenizer(text, add_special_tokens=False)["input_ids"], tokenizer.eos_token_id]
    assert [t for e in examples for t in e.input_ids] == ids
    assert all(e.labels == e.input_ids and len(e.input_ids) <= 32 for e in examples)
    assert len(examples) == -(-len(ids) // 32)
