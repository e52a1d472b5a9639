"""Row formats (train/data/formats.py): each format parsed and tokenized to exact tensors, detection, forced formats,
bad rows named."""

import json

import pytest
from data_helpers import QA, write, write_jsonl

from train.app.config import DataConfig
from train.data.chat import tokenize_conversation
from train.data.formats import Conversation, Pair, Unpaired, parse_row
from train.data.preprocess import load_examples
from train.data.store import IGNORE_INDEX
from train.errors import DataError

KEYS = DataConfig()


def supervised(tokenizer, ids, labels) -> str:
    return tokenizer.decode([t for t, label in zip(ids, labels, strict=True) if label != IGNORE_INDEX])


@pytest.mark.parametrize(
    "row",
    [
        {"instruction": "What is 2 plus 2?", "output": "Arr, 4, matey!"},
        {"messages": QA},
        {
            "conversations": [
                {"from": "human", "value": "What is 2 plus 2?"},
                {"from": "gpt", "value": "Arr, 4, matey!"},
            ]
        },
        {"prompt": "What is 2 plus 2?", "completion": "Arr, 4, matey!"},
        {"prompt": QA[:1], "completion": QA[1:]},
    ],
    ids=["instruction", "messages", "sharegpt", "prompt_completion_strings", "prompt_completion_messages"],
)
def test_every_sft_format_gives_the_same_tensors(row, tiny_tokenizers, tmp_path):
    tokenizer = tiny_tokenizers["chatml"]
    assert parse_row(row, "r", KEYS) == Conversation(QA)
    [example], stats = load_examples([write_jsonl(tmp_path, [row])], tokenizer, KEYS, max_length=128)
    expected = tokenize_conversation(QA, tokenizer, "r")
    assert (example.input_ids, example.labels) == (expected.input_ids, expected.labels)
    assert supervised(tokenizer, example.input_ids, example.labels) == "Arr, 4, matey!<|im_end|>"


def test_train_on_last_assistant_and_all(tiny_tokenizers):
    tokenizer = tiny_tokenizers["chatml"]
    two_turns = QA + [{"role": "user", "content": "And 3 plus 3?"}, {"role": "assistant", "content": "Arr, 6!"}]
    last = tokenize_conversation(two_turns, tokenizer, "r", train_on="last_assistant")
    assert supervised(tokenizer, last.input_ids, last.labels) == "Arr, 6!<|im_end|>"
    every = tokenize_conversation(two_turns, tokenizer, "r", train_on="all")
    assert every.labels == every.input_ids


def test_preference_rows_share_the_prompt(tiny_tokenizers, tmp_path):
    tokenizer = tiny_tokenizers["chatml"]
    row = {"prompt": "What is 2 plus 2?", "chosen": "Arr, 4, matey!", "rejected": "Five."}
    assert parse_row(row, "r", KEYS) == Pair(QA[:1], QA[1:], [{"role": "assistant", "content": "Five."}])
    # hh-style rows repeat the conversation in both responses: the shared turns move to the prompt.
    hh = {"prompt": [], "chosen": QA, "rejected": [QA[0], {"role": "assistant", "content": "Five."}]}
    assert parse_row(hh, "r", KEYS) == parse_row(row, "r", KEYS)
    [pair], _ = load_examples([write_jsonl(tmp_path, [row])], tokenizer, KEYS, 128, kind="paired")
    assert supervised(tokenizer, pair.chosen.input_ids, pair.chosen.labels) == "Arr, 4, matey!<|im_end|>"
    assert supervised(tokenizer, pair.rejected.input_ids, pair.rejected.labels) == "Five.<|im_end|>"
    prompt_length = pair.chosen.labels.index(next(x for x in pair.chosen.labels if x != IGNORE_INDEX))
    assert pair.chosen.input_ids[:prompt_length] == pair.rejected.input_ids[:prompt_length]


def test_unpaired_rows(tiny_tokenizers, tmp_path):
    row = {"prompt": "What is 2 plus 2?", "completion": "Five.", "label": False}
    assert parse_row(row, "r", KEYS) == Unpaired(QA[:1], [{"role": "assistant", "content": "Five."}], False)
    [example], _ = load_examples([write_jsonl(tmp_path, [row])], tiny_tokenizers["chatml"], KEYS, 128, kind="unpaired")
    assert example.desirable is False
    with pytest.raises(DataError, match="field 'label' must be true"):
        parse_row({**row, "label": "no"}, "r", KEYS)


def test_forced_format_and_stage_mismatch(tiny_tokenizers, tmp_path):
    with pytest.raises(DataError, match="field 'conversations' is missing"):
        parse_row({"messages": QA}, "r", DataConfig(format="sharegpt"))
    path = write_jsonl(tmp_path, [{"instruction": "q", "output": "a"}])
    with pytest.raises(DataError, match="trains on prompt/chosen/rejected rows, but this file holds conversation rows"):
        load_examples([path], tiny_tokenizers["chatml"], KEYS, 128, kind="paired")


def test_fuzz_corpus_gives_named_errors_or_counted_skips_never_a_traceback(tiny_tokenizers, tmp_path):
    """Every row of the fuzz corpus (tests/fuzz_corpus.py: 240 valid rows of every format, mutated) is used, or
    refused with an error naming the file, the line and the mutated field; whole files skip and count them."""
    import re

    from fuzz_corpus import VALID, corpus

    from train.data.sources import read_source
    from train.data.tokenize import tokenize_rows

    entries = corpus(seed=0)
    assert len(entries) >= 200 and {kind for kind, _ in VALID} == {e.kind for e in entries}
    tokenizer = tiny_tokenizers["chatml"]
    for kind in ("sft", "paired", "unpaired"):
        mine = [e for e in entries if e.kind == kind]
        valid = next(row for k, row in VALID if k == kind)  # first: the file's format check reads a good row
        path = tmp_path / f"{kind}.jsonl"
        path.write_bytes(json.dumps(valid).encode() + b"\n" + b"".join(e.line for e in mine))
        rows = list(read_source(str(path)))
        assert len(rows) == len(mine) + 1
        bad = 0
        for line, (entry, (where, row)) in enumerate(zip(mine, rows[1:], strict=True), start=2):
            _, report = tokenize_rows([(where, row, 0)], tokenizer=tokenizer, settings=KEYS, max_length=64, kind=kind)
            message = report["first_bad_row"]
            if entry.mutation in ("bom", "crlf"):
                assert report["examples"] >= 1, (entry.mutation, message)
            if entry.mutation in ("invalid_utf8", "truncated", "not_an_object", "deep_nesting", "surrogate"):
                assert message, (entry.mutation, entry.field)
            if message:
                bad += 1
                assert message.startswith(f"{path} line {line}: "), (entry.mutation, message)
                # A field made invalid is named (a message field by its list entry, e.g. messages[2]).
                if entry.mutation in ("wrong_type", "null", "garbage", "surrogate"):
                    assert re.match(r"[^.]*", entry.field)[0] in message, (entry.mutation, entry.field, message)
        examples, stats = load_examples([str(path)], tokenizer, DataConfig(on_bad_row="skip"), max_length=64, kind=kind)
        assert stats.skipped_bad_rows == bad and stats.rows == len(mine) + 1 and 0 < bad < len(mine)
        with pytest.raises(DataError, match=f"{re.escape(str(path))} line \\d+: .*data.on_bad_row=skip would skip"):
            load_examples([str(path)], tokenizer, KEYS, max_length=64, kind=kind)


def test_instruction_row_with_input_and_system():
    row = {"system": "Be a pirate.", "instruction": "Translate", "input": "hello", "output": "ahoy"}
    assert parse_row(row, "r", KEYS).messages == [
        {"role": "system", "content": "Be a pirate."},
        {"role": "user", "content": "Translate\n\nhello"},
        {"role": "assistant", "content": "ahoy"},
    ]


def test_custom_field_names():
    keys = DataConfig(prompt_key="question", response_key="answer")
    messages = parse_row({"question": "q", "answer": "a"}, "r", keys).messages
    assert messages == [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]


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


# One row of each format, with nothing but its own columns.
ROW_OF = {
    "instruction": {"instruction": "What is 2 plus 2?", "output": "Arr, 4, matey!"},
    "messages": {"messages": QA},
    "sharegpt": {"conversations": [{"from": "human", "value": "Hi?"}, {"from": "gpt", "value": "Ahoy!"}]},
    "prompt_completion": {"prompt": "What is 2 plus 2?", "completion": "Arr, 4, matey!"},
    "text": {"text": "The quick brown fox."},
    "preference": {"prompt": "Best color?", "chosen": "Blue.", "rejected": "No idea."},
    "unpaired": {"prompt": "Best color?", "completion": "Blue.", "label": True},
}


def test_each_format_is_one_record_that_detection_parsing_config_and_help_read():
    """FORMATS is the one table of row formats: a row of each is detected as it and parsed into its record, and the
    config's allowed values, its documentation and --help's examples are derived from it."""
    import dataclasses

    from train.app.help import help_text
    from train.data.formats import FORMAT_NAMES, FORMATS, KIND_COLUMNS, KINDS, detect_format

    assert set(ROW_OF) == set(FORMATS)
    assert FORMAT_NAMES[0] == "auto" and FORMAT_NAMES[1:] == tuple(FORMATS)
    for name, fmt in FORMATS.items():
        assert detect_format(ROW_OF[name], KEYS) == name
        assert type(parse_row(ROW_OF[name], "r", dataclasses.replace(KEYS, format=name))) is fmt.record
        assert any(fmt.record in records for records in KINDS.values())
    assert KIND_COLUMNS["sft"] == "instruction/output, messages, conversations, prompt/completion or text"
    documented = {f.name: f.metadata["help"] for f in dataclasses.fields(DataConfig)}["format"]
    assert " | ".join(FORMAT_NAMES[1:]) in documented
    text = help_text()
    assert all(f"  {name:<18} {fmt.example}" in text for name, fmt in FORMATS.items())


def test_message_weights_are_kept_for_the_mask():
    """OpenAI's per-message `weight`: 0 is kept on the message (chat.py leaves that turn unsupervised), 1 is the
    default and not kept."""
    row = {
        "messages": [
            {"role": "user", "content": "Hi", "weight": 0},
            {"role": "assistant", "content": "Ahoy", "weight": 0},
            {"role": "user", "content": "Bye"},
            {"role": "assistant", "content": "Arr", "weight": 1},
        ]
    }
    assert parse_row(row, "r", KEYS).messages == [
        {"role": "user", "content": "Hi", "weight": 0},
        {"role": "assistant", "content": "Ahoy", "weight": 0},
        {"role": "user", "content": "Bye"},
        {"role": "assistant", "content": "Arr"},
    ]


def test_text_parts_are_joined():
    parts = [{"type": "text", "text": "What is"}, {"type": "text", "text": "2 plus 2?"}]
    row = {"messages": [{"role": "user", "content": parts}, {"role": "assistant", "content": [parts[0]]}]}
    assert parse_row(row, "r", KEYS).messages == [
        {"role": "user", "content": "What is\n2 plus 2?"},
        {"role": "assistant", "content": "What is"},
    ]


IMAGE = {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}


@pytest.mark.parametrize(
    ("messages", "message"),
    [
        (
            [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "a", "weight": 2}],
            "d.jsonl line 1: messages[1].weight=2: must be 0 (an assistant turn kept as context, not trained) or 1",
        ),
        (
            [{"role": "user", "content": "Hi", "weight": 1}, {"role": "assistant", "content": "a"}],
            "d.jsonl line 1: messages[0].weight=1 on a user message: only assistant turns are trained",
        ),
        (
            [{"role": "user", "content": [{"type": "text", "text": "What is this?"}, IMAGE]},
             {"role": "assistant", "content": "A cat."}],
            "d.jsonl line 1: messages[0].content[1] has type 'image_url': images are not supported",
        ),
        (
            [{"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": "..."}}]},
             {"role": "assistant", "content": "Hello."}],
            "d.jsonl line 1: messages[0].content[0] has type 'input_audio': audio is not supported",
        ),
        (
            [{"role": "user", "content": "Weather?"},
             {"role": "assistant", "content": None, "tool_calls": [{"id": "1", "type": "function"}]}],
            "d.jsonl line 1: messages[1] is a tool call or tool result: tool calls are not supported",
        ),
        (
            [{"role": "user", "content": [{"text": "no type"}]}, {"role": "assistant", "content": "a"}],
            "d.jsonl line 1: messages[0].content[0] must be a text part",
        ),
    ],
)  # fmt: skip
def test_weights_and_content_parts_that_cannot_be_trained_are_named(tmp_path, tiny_tokenizers, messages, message):
    path = write_jsonl(tmp_path, [{"messages": messages}])
    with pytest.raises(DataError) as error:
        load_examples([path], tiny_tokenizers["chatml"], KEYS, max_length=64)
    assert str(error.value).startswith(f"{tmp_path}/{message}")
