"""Rendering and masking conversations (train/data/chat.py) against exact tensors: every chat template style, templates
that break prefix rendering, reasoning, and templates that cannot be used."""

import json

import pytest
from data_helpers import CONVERSATION, THREE_TURNS, ids, supervised_text, template, write

from conftest import REPO
from train.app.config import DataConfig
from train.data.chat import tokenize_conversation
from train.data.preprocess import load_examples
from train.data.store import IGNORE_INDEX, Example
from train.errors import DataError

KEYS = DataConfig()


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


REASONING = [
    THREE_TURNS[0],
    {"role": "assistant", "content": "<think>\nGrass has chlorophyll.\n</think>\n\nArr, grass be green!"},
    THREE_TURNS[2],
    {"role": "assistant", "content": "Arr, 4!", "reasoning_content": "Two and two."},
]


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


WEIGHTED = [
    {"role": "user", "content": "What color is grass?"},
    {"role": "assistant", "content": "Arr, grass be green!", "weight": 0},
    {"role": "user", "content": "And 2 plus 2?"},
    {"role": "assistant", "content": "Arr, 4!", "weight": 1},
]


def test_assistant_turn_with_weight_0_is_context_not_supervised(tmp_path, tiny_tokenizers):
    """A row's `"weight": 0` reaches the mask: that turn's tokens and its end of turn get -100, the other's are
    trained."""
    tokenizer = tiny_tokenizers["chatml"]
    path = write(tmp_path, "d.jsonl", json.dumps({"messages": WEIGHTED}) + "\n")
    examples, _ = load_examples([path], tokenizer, KEYS, 128)
    context = ids(
        tokenizer,
        "<|im_start|>user\nWhat color is grass?<|im_end|>\n<|im_start|>assistant\nArr, grass be green!<|im_end|>\n"
        "<|im_start|>user\nAnd 2 plus 2?<|im_end|>\n<|im_start|>assistant\n",
    )
    response, trailer = ids(tokenizer, "Arr, 4!<|im_end|>"), ids(tokenizer, "\n")
    assert examples[0].input_ids == context + response + trailer
    assert examples[0].labels == [IGNORE_INDEX] * len(context) + response + [IGNORE_INDEX] * len(trailer)
    # Without the weight both turns are trained.
    unweighted = [{k: v for k, v in m.items() if k != "weight"} for m in WEIGHTED]
    assert supervised_text(tokenizer, tokenize_conversation(unweighted, tokenizer, "t")) == (
        "Arr, grass be green!<|im_end|>Arr, 4!<|im_end|>"
    )


@pytest.mark.parametrize(
    ("train_on", "weights", "message"),
    [
        ("assistant", (0, 0), "t: every assistant turn has weight 0 (context, not trained), so nothing of it"),
        ("last_assistant", (0, 0), "t: every assistant turn has weight 0"),
        ("all", (0, 1), "t: a message has weight 0 (context, not trained), but data.train_on=all trains every token"),
    ],
)
def test_weights_that_leave_nothing_or_contradict_train_on_are_refused(tiny_tokenizers, train_on, weights, message):
    messages = [dict(WEIGHTED[0]), {**WEIGHTED[1], "weight": weights[0]}, WEIGHTED[2], {**WEIGHTED[3]}]
    if weights[1] == 0:
        messages[3]["weight"] = 0
    with pytest.raises(DataError) as error:
        tokenize_conversation(messages, tiny_tokenizers["chatml"], "t", train_on)
    assert str(error.value).startswith(message)


def test_last_assistant_is_the_last_trained_turn(tiny_tokenizers):
    tokenizer = tiny_tokenizers["chatml"]
    messages = [*WEIGHTED[:3], {**WEIGHTED[3], "weight": 0}]
    messages[1] = {k: v for k, v in messages[1].items() if k != "weight"}
    example = tokenize_conversation(messages, tokenizer, "t", "last_assistant")
    assert supervised_text(tokenizer, example) == "Arr, grass be green!<|im_end|>"
    assert "Arr, 4!" not in tokenizer.decode(example.input_ids)  # what follows the last trained turn is dropped


FAMILY_PRESETS = ("gemma", "llama", "mistral", "qwen2_5", "qwen3")  # config/model/: the families people fine-tune


def cached_family_tokenizer(family: str):
    """The real tokenizer of a family preset's hub model, from the local Hugging Face cache, or a skip saying how to
    get it: this test holds no copy of any family's chat template, so it checks each where its tokenizer is."""
    from huggingface_hub import try_to_load_from_cache
    from omegaconf import OmegaConf
    from transformers import AutoTokenizer

    hub_id = OmegaConf.load(REPO / "config" / "model" / f"{family}.yaml").name_or_path
    if not isinstance(try_to_load_from_cache(hub_id, "tokenizer_config.json"), str):
        pytest.skip(f"{hub_id}'s tokenizer is not in the local cache (hf download {hub_id} --include 'tokenizer*')")
    return AutoTokenizer.from_pretrained(hub_id)


@pytest.mark.parametrize("family", FAMILY_PRESETS)
def test_each_family_s_own_template_masks_exactly(family):
    """With the family's real tokenizer and template: a multi-turn conversation with a system prompt supervises its
    assistant answers and nothing of the prompt (tokenize_conversation checks the supervised tokens against each
    turn's text by equality, so a wrong mask raises), and an answer with reasoning trains as its last turn."""
    tokenizer = cached_family_tokenizer(family)
    supervised = supervised_text(tokenizer, tokenize_conversation(CONVERSATION, tokenizer, family))
    assert "Arr, grass be green, matey!" in supervised and "Arr, 2 plus 2 be 4, matey!" in supervised
    assert "What color is grass?" not in supervised and "Be brief." not in supervised
    reasoning = [
        CONVERSATION[1],
        {"role": "assistant", "content": "<think>\nGrass has chlorophyll.\n</think>\n\nArr, grass be green!"},
    ]
    last = supervised_text(tokenizer, tokenize_conversation(reasoning, tokenizer, family, "last_assistant"))
    assert last.strip().startswith(("<think>", "Arr")) and "Arr, grass be green!" in last
