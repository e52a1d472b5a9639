"""The data pipeline against exact tensors: rendering, label masks, truncation, padding and bad input."""

import json

import pytest
import torch

from train.config import DataConfig
from train.data import IGNORE_INDEX, Example, collate, load_examples, row_to_messages, tokenize_conversation
from train.errors import DataError

KEYS = DataConfig()
CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What color is grass?"},
    {"role": "assistant", "content": "Arr, grass be green, matey!"},
    {"role": "user", "content": "What is 2 plus 2?"},
    {"role": "assistant", "content": "Arr, 2 plus 2 be 4, matey!"},
]


def ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def supervised_text(tokenizer, example: Example) -> str:
    return tokenizer.decode(
        [t for t, label in zip(example.input_ids, example.labels, strict=True) if label != IGNORE_INDEX]
    )


def test_chatml_exact_input_ids_and_labels(tiny_tokenizers):
    tokenizer = tiny_tokenizers["chatml"]
    messages = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Arr, matey!"}]
    example = tokenize_conversation(messages, tokenizer, "test")
    prompt = ids(tokenizer, "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n")
    response = ids(tokenizer, "Arr, matey!<|im_end|>")
    trailer = ids(tokenizer, "\n")
    assert example.input_ids == prompt + response + trailer
    assert example.labels == [IGNORE_INDEX] * len(prompt) + response + [IGNORE_INDEX] * len(trailer)
    assert example.labels[len(prompt) + len(response) - 1] == tokenizer.convert_tokens_to_ids("<|im_end|>")


@pytest.mark.parametrize(
    ("style", "expected"),
    [
        ("chatml", "Arr, grass be green, matey!<|im_end|>Arr, 2 plus 2 be 4, matey!<|im_end|>"),
        ("llama3", "Arr, grass be green, matey!<|eot_id|>Arr, 2 plus 2 be 4, matey!<|eot_id|>"),
        ("inst", " Arr, grass be green, matey!</s> Arr, 2 plus 2 be 4, matey!</s>"),
    ],
)
def test_supervised_tokens_are_exactly_the_assistant_turns(tiny_tokenizers, style, expected):
    tokenizer = tiny_tokenizers[style]
    example = tokenize_conversation(CONVERSATION, tokenizer, "test")
    assert supervised_text(tokenizer, example) == expected
    # Every token outside the assistant turns, system and user included, is masked.
    unsupervised = tokenizer.decode(
        [t for t, label in zip(example.input_ids, example.labels, strict=True) if label == IGNORE_INDEX]
    )
    assert "What color is grass?" in unsupervised and "Be brief." in unsupervised
    assert "matey" not in unsupervised


def test_trailing_user_turn_is_dropped(tiny_tokenizers):
    tokenizer = tiny_tokenizers["chatml"]
    example = tokenize_conversation(CONVERSATION[:3] + [{"role": "user", "content": "Thanks"}], tokenizer, "test")
    assert "Thanks" not in tokenizer.decode(example.input_ids)


def test_template_without_end_token_gets_a_supervised_eos(tiny_tokenizers):
    bare = tiny_tokenizers["chatml"]
    original = bare.chat_template
    bare.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}"
    try:
        example = tokenize_conversation(
            [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Arr"}], bare, "test"
        )
    finally:
        bare.chat_template = original
    assert example.input_ids[-1] == bare.eos_token_id
    assert example.labels[-1] == bare.eos_token_id
    assert supervised_text(bare, example) == "Arr<|im_end|>"


def test_instruction_row_with_input_and_system():
    row = {"system": "Be a pirate.", "instruction": "Translate", "input": "hello", "output": "ahoy"}
    assert row_to_messages(row, "r", KEYS) == [
        {"role": "system", "content": "Be a pirate."},
        {"role": "user", "content": "Translate\n\nhello"},
        {"role": "assistant", "content": "ahoy"},
    ]


def test_custom_field_names():
    keys = DataConfig(prompt_key="question", response_key="answer")
    messages = row_to_messages({"question": "q", "answer": "a"}, "r", keys)
    assert messages == [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]


def test_collate_pads_to_longest_with_masked_labels():
    examples = [Example([1, 2, 3], [-100, 2, 3]), Example([4, 5], [-100, 5])]
    batch = collate(examples, pad_token_id=3)
    assert torch.equal(batch["input_ids"], torch.tensor([[1, 2, 3], [4, 5, 3]]))
    assert torch.equal(batch["labels"], torch.tensor([[-100, 2, 3], [-100, 5, -100]]))
    assert torch.equal(batch["attention_mask"], torch.tensor([[1, 1, 1], [1, 1, 0]]))


def test_eos_used_as_pad_is_still_supervised(tiny_tokenizers):
    tokenizer = tiny_tokenizers["chatml"]
    eos = tokenizer.eos_token_id
    short = tokenize_conversation(
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Arr"}], tokenizer, "a"
    )
    long = tokenize_conversation(CONVERSATION, tokenizer, "b")
    batch = collate([short, long], pad_token_id=eos)
    end = short.input_ids.index(eos, len(short.input_ids) - 3)
    assert batch["labels"][0, end] == eos  # the end of the response is learned
    assert (batch["labels"][0, len(short.input_ids) :] == IGNORE_INDEX).all()  # the padding is not


def write(tmp_path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_truncation_and_drops_are_counted(tmp_path, tiny_tokenizers):
    rows = [
        {"instruction": "short", "output": "ok"},
        {"instruction": "word " * 200, "output": "lost"},
        {"instruction": "q", "output": "answer " * 100},
    ]
    path = write(tmp_path, "d.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    examples, stats = load_examples([path], tiny_tokenizers["chatml"], KEYS, max_length=64)
    assert (stats.rows, stats.examples, stats.truncated, stats.dropped_no_supervised_token) == (3, 2, 2, 1)
    assert all(len(e.input_ids) <= 64 for e in examples)
    assert "1 dropped" in stats.describe("train", 64)


def test_json_list_files_are_read(tmp_path, tiny_tokenizers):
    path = write(tmp_path, "d.json", json.dumps([{"instruction": "q", "output": "a"}, {"messages": CONVERSATION}]))
    examples, stats = load_examples([path], tiny_tokenizers["chatml"], KEYS, max_length=256)
    assert stats.examples == 2


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        (
            "bad.jsonl",
            '{"instruction": "q", "output": "a"}\n{"instruction": "q", \n',
            "bad.jsonl line 2: not valid JSON",
        ),
        (
            "bad.jsonl",
            '{"prompt": "q", "answer": "a"}\n',
            "line 1: field 'instruction' is missing (found keys: answer, prompt); set data.prompt_key",
        ),
        ("bad.jsonl", '{"instruction": "q", "output": 7}\n', "line 1: field 'output' must be a string; found int"),
        ("bad.jsonl", '{"instruction": "q", "output": "  "}\n', "line 1: field 'output' is empty"),
        (
            "bad.jsonl",
            '{"messages": [{"role": "pirate", "content": "x"}]}\n',
            "line 1: messages[0].role='pirate' is unknown",
        ),
        (
            "bad.jsonl",
            '{"messages": [{"role": "user", "content": "x"}]}\n',
            "line 1: field 'messages' has no assistant turn",
        ),
        ("bad.jsonl", "[1, 2]\n", "line 1: each row must be a JSON object; found list"),
        ("bad.json", '{"instruction": "q"}', "bad.json: a .json file must hold a list of rows"),
    ],
)
def test_bad_rows_name_file_row_and_field(tmp_path, tiny_tokenizers, name, content, message):
    path = write(tmp_path, name, content)
    with pytest.raises(DataError) as error:
        load_examples([path], tiny_tokenizers["chatml"], KEYS, max_length=64)
    assert message in str(error.value)
    assert str(tmp_path) in str(error.value)


def test_tokenizer_without_chat_template_is_refused(tmp_path, tiny_tokenizers):
    tokenizer = tiny_tokenizers["chatml"]
    original, tokenizer.chat_template = tokenizer.chat_template, None
    try:
        with pytest.raises(DataError, match="no chat template"):
            load_examples([write(tmp_path, "d.jsonl", '{"instruction": "q", "output": "a"}\n')], tokenizer, KEYS, 64)
    finally:
        tokenizer.chat_template = original


def test_template_that_rewrites_earlier_turns_is_refused(tiny_tokenizers):
    tokenizer = tiny_tokenizers["chatml"]
    original = tokenizer.chat_template
    # Renders the number of messages first, so every prefix differs: spans cannot be located.
    tokenizer.chat_template = "{{ messages | length }}{% for m in messages %}|{{ m['content'] }}{% endfor %}"
    try:
        with pytest.raises(DataError, match="growing prefixes"):
            tokenize_conversation(CONVERSATION, tokenizer, "row 0")
    finally:
        tokenizer.chat_template = original
