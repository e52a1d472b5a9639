"""The data pipeline against exact tensors: rendering, label masks, truncation, padding and bad input."""

import contextlib
import json
from pathlib import Path

import pytest
import torch

from conftest import DEMO_EVAL, DEMO_TRAIN, REPO
from train.app.config import DataConfig
from train.batching.collate import collate
from train.data.chat import tokenize_conversation
from train.data.formats import parse_row
from train.data.preprocess import load_examples
from train.data.store import IGNORE_INDEX, Example
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
    # " Arr" is one token straddling the template's "assistant: " and the answer: it is what the model must emit.
    assert supervised_text(bare, example) == " Arr<|im_end|>"


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


# Chat templates that break the naive "render each prefix" way of finding assistant turns. Each renders ChatML-like
# text with the tiny ChatML tokenizer's special tokens.
TURN = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
QWEN3_LIKE = (  # reasoning kept only for the turns after the last user turn, as Qwen3's template does
    "{% set ns = namespace(last_user=-1) %}{% for m in messages %}{% if m.role == 'user' %}"
    "{% set ns.last_user = loop.index0 %}{% endif %}{% endfor %}"
    "{% for m in messages %}{% if m.role == 'assistant' %}{% set content = m.content %}{% set reasoning = '' %}"
    "{% if m.reasoning_content is defined and m.reasoning_content %}{% set reasoning = m.reasoning_content %}"
    "{% elif '</think>' in content %}{% set reasoning = content.split('</think>')[0].split('<think>')[-1] %}"
    "{% set content = content.split('</think>')[-1].lstrip('\\n') %}{% endif %}"
    "{% if loop.index0 > ns.last_user and reasoning %}"
    "<|im_start|>assistant\n<think>\n{{ reasoning.strip('\\n') }}\n</think>\n\n{{ content }}<|im_end|>\n"
    "{% else %}<|im_start|>assistant\n{{ content }}<|im_end|>\n{% endif %}"
    "{% else %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TEMPLATES = {
    # No add_generation_prompt branch: the prompt before a turn never ends with its header.
    "ignores_generation_prompt": TURN,
    # A system prompt the data never gave.
    "default_system_prompt": "{% if messages[0]['role'] != 'system' %}<|im_start|>system\nYou are helpful.<|im_end|>\n"
    "{% endif %}" + TURN + "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
    # Every earlier turn renders differently once a later one exists (the count comes first).
    "rewrites_earlier_turns": "<|im_start|>{{ messages | length }}<|im_end|>" + TURN,
    "strips_earlier_reasoning": QWEN3_LIKE,
}
THREE_TURNS = [
    {"role": "user", "content": "What color is grass?"},
    {"role": "assistant", "content": "Arr, grass be green!"},
    {"role": "user", "content": "And 2 plus 2?"},
    {"role": "assistant", "content": "Arr, 4!"},
]
REASONING = [
    THREE_TURNS[0],
    {"role": "assistant", "content": "<think>\nGrass has chlorophyll.\n</think>\n\nArr, grass be green!"},
    THREE_TURNS[2],
    {"role": "assistant", "content": "Arr, 4!", "reasoning_content": "Two and two."},
]


@contextlib.contextmanager
def template(tokenizer, text: str):
    original, tokenizer.chat_template = tokenizer.chat_template, text
    try:
        yield tokenizer
    finally:
        tokenizer.chat_template = original


def expected_example(tokenizer, segments: list[tuple[str, bool]]) -> Example:
    """input_ids and labels from the rendered text in segments, each supervised or not (boundaries between
    segments fall on token boundaries here: special tokens and newlines)."""
    input_ids, labels = [], []
    for text, supervised in segments:
        piece = ids(tokenizer, text)
        input_ids += piece
        labels += piece if supervised else [IGNORE_INDEX] * len(piece)
    assert input_ids == ids(tokenizer, "".join(text for text, _ in segments))
    return Example(input_ids, labels)


@pytest.mark.parametrize("style", sorted(TEMPLATES))
def test_exact_labels_for_templates_that_break_prefix_rendering(tiny_tokenizers, style):
    with template(tiny_tokenizers["chatml"], TEMPLATES[style]) as tokenizer:
        example = tokenize_conversation(THREE_TURNS, tokenizer, "row 0")
    head = {
        "ignores_generation_prompt": "",
        "default_system_prompt": "<|im_start|>system\nYou are helpful.<|im_end|>\n",
        "rewrites_earlier_turns": "<|im_start|>4<|im_end|>",
        "strips_earlier_reasoning": "",
    }[style]
    expected = expected_example(
        tokenizer,
        [
            (f"{head}<|im_start|>user\nWhat color is grass?<|im_end|>\n<|im_start|>assistant\n", False),
            ("Arr, grass be green!<|im_end|>", True),
            ("\n<|im_start|>user\nAnd 2 plus 2?<|im_end|>\n<|im_start|>assistant\n", False),
            ("Arr, 4!<|im_end|>", True),
            ("\n", False),
        ],
    )
    assert (example.input_ids, example.labels) == (expected.input_ids, expected.labels)


@pytest.mark.parametrize(
    ("train_on", "train_on_reasoning", "first_turn", "last_turn"),
    [
        ("last_assistant", True, None, ("<think>\nTwo and two.\n</think>\n\n", True)),
        ("assistant", False, "Arr, grass be green!<|im_end|>", ("<think>\nTwo and two.\n</think>\n\n", False)),
    ],
)
def test_reasoning_is_trained_or_masked_exactly(tiny_tokenizers, train_on, train_on_reasoning, first_turn, last_turn):
    """Reasoning in <think> tags or in reasoning_content, under a template that drops it from earlier turns."""
    with template(tiny_tokenizers["chatml"], QWEN3_LIKE) as tokenizer:
        example = tokenize_conversation(REASONING, tokenizer, "row 0", train_on, train_on_reasoning)
        expected = expected_example(
            tokenizer,
            [
                ("<|im_start|>user\nWhat color is grass?<|im_end|>\n<|im_start|>assistant\n", False),
                ("Arr, grass be green!<|im_end|>", first_turn is not None),
                ("\n<|im_start|>user\nAnd 2 plus 2?<|im_end|>\n<|im_start|>assistant\n", False),
                last_turn,
                ("Arr, 4!<|im_end|>", True),
                ("\n", False),
            ],
        )
        assert (example.input_ids, example.labels) == (expected.input_ids, expected.labels)
        # Trained on every assistant turn with its reasoning, the first turn would be learned without the reasoning
        # it has at inference: refused, naming the ways out.
        with pytest.raises(DataError, match="drops the reasoning of assistant turn 1.*data.train_on=last_assistant"):
            tokenize_conversation(REASONING, tokenizer, "row 0", "assistant", True)


def test_reasoning_in_a_template_that_keeps_it_verbatim(tiny_tokenizers, tmp_path):
    tokenizer = tiny_tokenizers["chatml"]
    example = tokenize_conversation(REASONING[:2], tokenizer, "row 0")
    assert supervised_text(tokenizer, example) == REASONING[1]["content"] + "<|im_end|>"
    masked = tokenize_conversation(REASONING[:2], tokenizer, "row 0", train_on_reasoning=False)
    assert supervised_text(tokenizer, masked) == "Arr, grass be green!<|im_end|>"
    # The setting reaches preprocessing (and its cache key: each value gets its own cache entry).
    path = write(tmp_path, "d.jsonl", json.dumps({"messages": REASONING[:2]}) + "\n")
    for train_on_reasoning, expected in ((True, example), (False, masked)):
        [loaded], _ = load_examples([path], tokenizer, DataConfig(train_on_reasoning=train_on_reasoning), 256)
        assert loaded.labels == expected.labels


def test_mask_audit_counts_tokens_by_role_exactly(tiny_tokenizers, tmp_path, caplog):
    from train.data.datasets import build_datasets
    from train.data.stats import MaskAudit

    tokenizer = tiny_tokenizers["chatml"]
    path = write(tmp_path, "d.jsonl", json.dumps({"messages": THREE_TURNS}) + "\n")
    _, stats = load_examples([path], tokenizer, KEYS, max_length=256)
    count = lambda *texts: sum(len(ids(tokenizer, text)) for text in texts)  # noqa: E731
    total = len(tokenize_conversation(THREE_TURNS, tokenizer, "r").input_ids)
    user, assistant = count("What color is grass?", "And 2 plus 2?"), count("Arr, grass be green!", "Arr, 4!")
    assert stats.mask_audit == {
        "tokens": {"system": 0, "user": user, "assistant": assistant, "end_of_turn": 2,
                   "template": total - user - assistant - 2},
        "supervised": {"system": 0, "user": 0, "assistant": assistant, "end_of_turn": 2, "template": 0},
        "conversations": 1, "all_supervised": 0, "unattributed": 0, "assistant_turns": 2, "turns_ending_supervised": 2,
    }  # fmt: skip
    # A template that closes turns with no special token: only the last turn gets one (an appended EOS).
    with template(tokenizer, "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"):
        _, bare = load_examples([path], tokenizer, KEYS, max_length=256)
    audit = MaskAudit.merged([bare.mask_audit])
    assert (audit.assistant_turns, audit.turns_ending_supervised) == (2, 1)
    assert "1 assistant turns end without a supervised end-of-turn token" in audit.problems("assistant")[0]
    # The training log reports it (and summary.json holds it: the data stats of the run).
    with caplog.at_level("INFO", logger="train.data"):
        _, _, run_stats = build_datasets(demo_config(tmp_path), tokenizer)
    assert "label mask audit (train, 123 conversations): supervised share of tokens by role: system 0.0%" in caplog.text
    assert run_stats["train"]["mask_audit"]["turns_ending_supervised"] == 140


def test_template_that_changes_contents_is_refused(tiny_tokenizers):
    with template(tiny_tokenizers["chatml"], TURN.replace("m['content']", "m['content'] | upper")) as tokenizer:
        with pytest.raises(DataError, match=r"row 0: .*cannot be located exactly.*data.train_on=all"):
            tokenize_conversation(THREE_TURNS, tokenizer, "row 0")
        assert tokenize_conversation(THREE_TURNS, tokenizer, "row 0", "all").labels[0] != IGNORE_INDEX


@pytest.mark.parametrize("style", ["chatml", "llama3", "inst"])
def test_rendering_is_what_apply_chat_template_renders(tiny_tokenizers, style):
    """Preprocessing renders through transformers' template renderer directly (skipping the normalization of
    message objects): the text must be exactly what apply_chat_template gives at inference."""
    from train.data.chat import _render

    tokenizer = tiny_tokenizers[style]
    for end in range(1, len(CONVERSATION) + 1):
        for prompt in (False, True):
            expected = tokenizer.apply_chat_template(CONVERSATION[:end], tokenize=False, add_generation_prompt=prompt)
            assert _render(tokenizer, CONVERSATION[:end], prompt, "row 0") == expected


def demo_config(tmp_path, *overrides):
    import launch

    return launch.compose_config(["model=tiny", f"cache_dir={tmp_path}", f"datasets=[{DEMO_TRAIN}]", *overrides])


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


def test_preview_script_marks_spans_and_dumps_rows(tmp_path, tiny_cache):
    import subprocess
    import sys

    dump = tmp_path / "rows.jsonl"
    command = [
        sys.executable,
        "scripts/preview_data.py",
        "model=tiny",
        f"cache_dir={tiny_cache}",
        f"datasets=[{DEMO_TRAIN}]",
    ]
    result = subprocess.run([*command, "--n", "2", "--dump", str(dump)], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "[[Arr, the sky be blue, matey!<|im_end|>]]" in result.stdout
    assert "length histogram" in result.stdout and "data: 123 examples from 123 rows" in result.stdout
    assert "label mask audit (data, 123 conversations)" in result.stdout and "user 0.0% of" in result.stdout
    assert "assistant 100.0% of" in result.stdout and "end-of-turn token is supervised: 140 of 140" in result.stdout
    rows = [json.loads(line) for line in dump.read_text().splitlines()]
    assert len(rows) == 2 and len(rows[0]["input_ids"]) == len(rows[0]["labels"])


def test_no_examples_left_after_filtering_is_an_error(tmp_path, tiny_tokenizers):
    from train.data.datasets import build_datasets

    cfg = demo_config(tmp_path, "model.max_length=16", "data.truncation=drop")
    with pytest.raises(
        DataError, match=r"no training examples left: train: 0 examples from 123 rows; 123 dropped as longer"
    ):
        build_datasets(cfg, tiny_tokenizers["chatml"])


def test_caching_can_be_turned_off(tmp_path, tiny_tokenizers):
    from train.data.datasets import build_datasets

    train, _, _ = build_datasets(demo_config(tmp_path, "data.cache_preprocessing=false"), tiny_tokenizers["chatml"])
    assert len(train) == 123 and not (tmp_path / "preprocessed").exists()


def test_parallel_sharded_preprocessing_equals_one_process(tmp_path, tiny_tokenizers, monkeypatch, caplog):
    import contextlib

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
