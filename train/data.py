"""Reading data files, rendering them with the tokenizer's chat template, and masking labels.

Rows are instruction style (`instruction`, optional `input`, `output`, optional `system`; the names are set by
`data.*_key`) or chat style (`messages`: a list of {role, content}). Both become a conversation that the chat
template renders; every assistant turn and its end-of-turn token is supervised, every other token gets label -100.

Assistant spans are located on the rendered text, by rendering each conversation prefix, and then verified: the
supervised tokens must decode to text that contains the assistant's content. A template that cannot be split
this way is refused with an error rather than trained on with a wrong mask.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from train.config import Config, DataConfig
from train.errors import DataError

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
ROLES = ("system", "user", "assistant")


@dataclass
class Example:
    """One tokenized example, both lists of equal length.

    `labels[i]` is `input_ids[i]` where token i is supervised (predicted from the tokens before it) and -100
    elsewhere, the Hugging Face convention: the loss shifts by one.
    """

    input_ids: list[int]
    labels: list[int]


@dataclass
class DatasetStats:
    """What preprocessing did to the rows of one split, reported at the end of preprocessing."""

    rows: int = 0
    examples: int = 0
    truncated: int = 0
    dropped_no_supervised_token: int = 0

    def describe(self, split: str, max_length: int) -> str:
        text = f"{split}: {self.examples} examples from {self.rows} rows"
        if self.truncated:
            text += f"; {self.truncated} truncated to model.max_length={max_length}"
        if self.dropped_no_supervised_token:
            text += (
                f"; {self.dropped_no_supervised_token} dropped because truncation left no response token "
                f"(raise model.max_length or shorten the prompts)"
            )
        return text


def read_rows(path: str) -> Iterator[tuple[str, dict]]:
    """Yield (where, row) for each row of a .json (a list of objects) or .jsonl file; `where` names file and line."""
    text = Path(path).read_text(encoding="utf-8")
    if path.endswith(".jsonl"):
        for line_number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            where = f"{path} line {line_number}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise DataError(f"{where}: not valid JSON ({error.msg} at column {error.colno})") from None
            yield where, _require_object(row, where)
        return
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as error:
        raise DataError(f"{path}: not valid JSON ({error.msg} at line {error.lineno}, column {error.colno})") from None
    if not isinstance(rows, list):
        raise DataError(f"{path}: a .json file must hold a list of rows; found {type(rows).__name__}")
    for index, row in enumerate(rows):
        where = f"{path} row {index}"
        yield where, _require_object(row, where)


def _require_object(row: object, where: str) -> dict:
    if not isinstance(row, dict):
        raise DataError(f"{where}: each row must be a JSON object; found {type(row).__name__}")
    return row


def row_to_messages(row: dict, where: str, keys: DataConfig) -> list[dict[str, str]]:
    """Turn a chat row or an instruction-style row into a list of {role, content} messages, checking every field."""
    if keys.messages_key in row:
        return _check_messages(row[keys.messages_key], where, keys.messages_key)
    found = ", ".join(sorted(row)) or "none"
    for key, config_key in ((keys.prompt_key, "data.prompt_key"), (keys.response_key, "data.response_key")):
        if key not in row:
            raise DataError(
                f"{where}: field '{key}' is missing (found keys: {found}); set {config_key} to the name your file "
                f"uses, or give chat rows with a '{keys.messages_key}' field"
            )
    messages = []
    system = _optional_string(row, keys.system_key, where)
    if system:
        messages.append({"role": "system", "content": system})
    user = _required_string(row, keys.prompt_key, where)
    query = _optional_string(row, keys.query_key, where)
    messages.append({"role": "user", "content": f"{user}\n\n{query}" if query else user})
    messages.append({"role": "assistant", "content": _required_string(row, keys.response_key, where)})
    return messages


def _required_string(row: dict, key: str, where: str) -> str:
    value = row[key]
    if not isinstance(value, str):
        raise DataError(f"{where}: field '{key}' must be a string; found {type(value).__name__}")
    if not value.strip():
        raise DataError(f"{where}: field '{key}' is empty; every example needs text to train on")
    return value


def _optional_string(row: dict, key: str, where: str) -> str:
    value = row.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise DataError(f"{where}: field '{key}' must be a string; found {type(value).__name__}")
    return value.strip()


def _check_messages(messages: object, where: str, key: str) -> list[dict[str, str]]:
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: field '{key}' must be a non-empty list of {{role, content}} objects")
    for index, message in enumerate(messages):
        field_name = f"{key}[{index}]"
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise DataError(f"{where}: {field_name} must be an object with 'role' and 'content'")
        if message["role"] not in ROLES:
            raise DataError(f"{where}: {field_name}.role={message['role']!r} is unknown; use one of {list(ROLES)}")
        if not isinstance(message["content"], str):
            raise DataError(f"{where}: {field_name}.content must be a string")
        if message["role"] == "assistant" and not message["content"].strip():
            raise DataError(f"{where}: {field_name} is an empty assistant turn; remove it or give it content")
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: field '{key}' has no assistant turn, so there is nothing to train on")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def tokenize_conversation(messages: list[dict[str, str]], tokenizer, where: str) -> Example:
    """Render with the chat template and supervise each assistant turn through its end-of-turn token.

    Turns after the last assistant turn carry no supervision and are dropped.
    """
    last_assistant = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    messages = messages[: last_assistant + 1]
    text = _render(tokenizer, messages, add_generation_prompt=False, where=where)
    spans = [
        _assistant_span(tokenizer, messages, i, text, where) for i, m in enumerate(messages) if m["role"] == "assistant"
    ]

    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    input_ids = list(encoded["input_ids"])
    labels = [IGNORE_INDEX] * len(input_ids)
    for token_index, (start, _end) in enumerate(encoded["offset_mapping"]):
        if any(span_start <= start < span_end for span_start, span_end in spans):
            labels[token_index] = input_ids[token_index]

    last = max(i for i, label in enumerate(labels) if label != IGNORE_INDEX)
    if input_ids[last] not in special_token_ids(tokenizer):
        # The template ends the last turn without an end-of-turn token: append EOS so the model learns to stop.
        input_ids = input_ids[: last + 1] + [tokenizer.eos_token_id]
        labels = labels[: last + 1] + [tokenizer.eos_token_id]
    _verify_supervised_text(tokenizer, input_ids, labels, messages, where)
    return Example(input_ids=input_ids, labels=labels)


def special_token_ids(tokenizer) -> set[int]:
    """Ids of every special token, including added ones such as Llama 3's <|eot_id|>."""
    added = {i for i, token in tokenizer.added_tokens_decoder.items() if token.special}
    return set(tokenizer.all_special_ids) | added


def _render(tokenizer, messages: list[dict[str, str]], add_generation_prompt: bool, where: str) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except Exception as error:  # jinja raises template-defined errors, e.g. "roles must alternate"
        raise DataError(f"{where}: the tokenizer's chat template rejected this conversation: {error}") from None


def _assistant_span(tokenizer, messages: list[dict[str, str]], index: int, text: str, where: str) -> tuple[int, int]:
    """Character span of assistant turn `index` in `text`: its content and end-of-turn marker, no trailing whitespace."""
    before = _render(tokenizer, messages[:index], add_generation_prompt=True, where=where)
    through = _render(tokenizer, messages[: index + 1], add_generation_prompt=False, where=where)
    if not (text.startswith(through) and through.startswith(before)):
        raise DataError(
            f"{where}: the chat template does not render conversations as growing prefixes (it rewrites earlier "
            f"turns), so assistant turn {index} cannot be located safely; use a template that renders each turn "
            f"independently (set model.tokenizer_name_or_path to a tokenizer with such a template)"
        )
    start, end = len(before), len(through.rstrip())
    if messages[index]["content"].strip() not in text[start:end]:
        raise DataError(
            f"{where}: the chat template changed the content of assistant turn {index}; cannot mask it safely"
        )
    return start, end


def _verify_supervised_text(tokenizer, input_ids: list[int], labels: list[int], messages, where: str) -> None:
    """The supervised tokens, decoded, must contain every assistant content in order: the mask is checked, not assumed."""
    supervised = tokenizer.decode([t for t, label in zip(input_ids, labels, strict=True) if label != IGNORE_INDEX])
    position = 0
    for message in messages:
        if message["role"] != "assistant":
            continue
        found = supervised.find(message["content"].strip(), position)
        if found < 0:
            raise DataError(
                f"{where}: label mask check failed: the supervised tokens do not contain assistant content "
                f"{message['content'][:40]!r}; the tokenizer's offsets do not match its chat template"
            )
        position = found + len(message["content"].strip())


def truncate(example: Example, max_length: int) -> Example:
    """Keep the first max_length tokens (the prompt comes first, so the end of the response is what is lost)."""
    return Example(example.input_ids[:max_length], example.labels[:max_length])


def load_examples(paths: list[str], tokenizer, keys: DataConfig, max_length: int) -> tuple[list[Example], DatasetStats]:
    """Read, render, mask and truncate every row of `paths`. Bad rows raise DataError naming file, row and field."""
    if tokenizer.chat_template is None:
        raise DataError(
            "the tokenizer has no chat template, so conversations cannot be rendered; set "
            "model.tokenizer_name_or_path to a tokenizer that has one"
        )
    examples, stats = [], DatasetStats()
    for path in paths:
        for where, row in read_rows(path):
            stats.rows += 1
            example = tokenize_conversation(row_to_messages(row, where, keys), tokenizer, where)
            if len(example.input_ids) > max_length:
                stats.truncated += 1
                example = truncate(example, max_length)
            if all(label == IGNORE_INDEX for label in example.labels[1:]):
                stats.dropped_no_supervised_token += 1
                continue
            examples.append(example)
    stats.examples = len(examples)
    if not examples:
        raise DataError(f"no usable examples in {paths}: {stats.describe('data', max_length)}")
    return examples, stats


def build_datasets(cfg: Config, tokenizer) -> tuple[list[Example], list[Example], dict[str, dict]]:
    """Tokenized training and evaluation examples, and what preprocessing did to each split (also logged)."""
    train, train_stats = load_examples(cfg.datasets, tokenizer, cfg.data, cfg.model.max_length)
    logger.info(train_stats.describe("train", cfg.model.max_length))
    stats = {"train": dataclasses.asdict(train_stats)}
    evaluation: list[Example] = []
    if cfg.eval_datasets:
        evaluation, eval_stats = load_examples(cfg.eval_datasets, tokenizer, cfg.data, cfg.model.max_length)
        logger.info(eval_stats.describe("eval", cfg.model.max_length))
        stats["eval"] = dataclasses.asdict(eval_stats)
    return train, evaluation, stats


def collate(examples: list[Example], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Pad to the longest example of this micro-batch (never to max_length), on the right.

    Returns input_ids, attention_mask and labels, each (batch, longest) int64; padding has label -100, so an EOS
    used as pad token is still supervised where it ends a response.
    """
    longest = max(len(e.input_ids) for e in examples)
    input_ids = torch.full((len(examples), longest), pad_token_id, dtype=torch.long)
    labels = torch.full((len(examples), longest), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), longest), dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example.input_ids)
        input_ids[row, :n] = torch.tensor(example.input_ids)
        labels[row, :n] = torch.tensor(example.labels)
        attention_mask[row, :n] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
