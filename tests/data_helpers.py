"""Conversations, chat templates and small helpers shared by the data tests (tests/data/) and the collation tests."""

import contextlib
import json

from conftest import DEMO_TRAIN
from train.data.store import IGNORE_INDEX, Example

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What color is grass?"},
    {"role": "assistant", "content": "Arr, grass be green, matey!"},
    {"role": "user", "content": "What is 2 plus 2?"},
    {"role": "assistant", "content": "Arr, 2 plus 2 be 4, matey!"},
]


THREE_TURNS = [
    {"role": "user", "content": "What color is grass?"},
    {"role": "assistant", "content": "Arr, grass be green!"},
    {"role": "user", "content": "And 2 plus 2?"},
    {"role": "assistant", "content": "Arr, 4!"},
]


QA = [{"role": "user", "content": "What is 2 plus 2?"}, {"role": "assistant", "content": "Arr, 4, matey!"}]


def ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def supervised_text(tokenizer, example: Example) -> str:
    return tokenizer.decode(
        [t for t, label in zip(example.input_ids, example.labels, strict=True) if label != IGNORE_INDEX]
    )


def write(tmp_path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def write_jsonl(tmp_path, rows, name="d.jsonl"):
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@contextlib.contextmanager
def template(tokenizer, text: str):
    original, tokenizer.chat_template = tokenizer.chat_template, text
    try:
        yield tokenizer
    finally:
        tokenizer.chat_template = original


def demo_config(tmp_path, *overrides):
    import launch

    return launch.compose_config(["model=tiny", f"cache_dir={tmp_path}", f"datasets=[{DEMO_TRAIN}]", *overrides])
