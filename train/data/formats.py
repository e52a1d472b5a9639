"""Where rows come from (files, saved datasets, named hub datasets) and what they mean (the row formats).

Every row becomes one record: a `Conversation` (SFT), `Text` (continued pretraining), `Pair` (preference pairs) or
`Unpaired` (KTO). A row's format is detected from its columns unless `data.format` forces one; FORMAT_EXAMPLES
shows each (`python launch.py --help` prints them).

Every problem raises DataError naming the file, the row and the field, and saying how to fix it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from train.errors import DataError

if TYPE_CHECKING:  # config.py imports this module to check data settings
    from train.app.config import DataConfig

ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
FORMATS = ("auto", "instruction", "messages", "sharegpt", "prompt_completion", "text", "preference", "unpaired")
FILE_EXTENSIONS = (".json", ".jsonl", ".parquet", ".csv")
# What a row of each format looks like.
FORMAT_EXAMPLES = {
    "messages": '{"messages": [{"role": ..., "content": ...}, ...]}',
    "sharegpt": '{"conversations": [{"from": "human"|"gpt"|"system", "value": ...}, ...]}',
    "preference": '{"prompt": str|messages, "chosen": str|messages, "rejected": str|messages}',
    "unpaired": '{"prompt": str|messages, "completion": str|messages, "label": bool}',
    "prompt_completion": '{"prompt": str|messages, "completion": str|messages}',
    "text": '{"text": str}',
    "instruction": '{"instruction": str, "input": str?, "output": str, "system": str?}  (names set by data.*_key)',
}

# Named datasets: name -> (hub id, split). Loaded with `datasets.load_dataset`, which needs the hub.
REGISTRY = {
    "ultrachat": ("HuggingFaceH4/ultrachat_200k", "train_sft"),
    "ultrabin": ("HuggingFaceH4/ultrafeedback_binarized", "train_prefs"),
    "hh": ("Anthropic/hh-rlhf", "train"),
    "alpaca": ("tatsu-lab/alpaca", "train"),
}


@dataclass
class Conversation:
    messages: list[dict[str, str]]


@dataclass
class Text:
    text: str


@dataclass
class Pair:
    prompt: list[dict[str, str]]
    chosen: list[dict[str, str]]  # the assistant turn(s) that follow the prompt
    rejected: list[dict[str, str]]
    margin: float | None = None  # optional `margin` field: how much better chosen is (reward models use it)


@dataclass
class Unpaired:
    prompt: list[dict[str, str]]
    completion: list[dict[str, str]]
    desirable: bool


Record = Conversation | Text | Pair | Unpaired

# What each kind of trainer consumes.
KINDS = {"sft": (Conversation, Text), "text": (Text,), "paired": (Pair,), "unpaired": (Unpaired,)}
# What each row format gives.
FORMAT_RECORDS = {
    "instruction": Conversation, "messages": Conversation, "sharegpt": Conversation, "prompt_completion": Conversation,
    "text": Text, "preference": Pair, "unpaired": Unpaired,
}  # fmt: skip
KIND_COLUMNS = {
    "sft": "instruction/output, messages, conversations, prompt/completion or text",
    "text": "text",
    "paired": "prompt/chosen/rejected",
    "unpaired": "prompt/completion/label",
}


# ---- sources ----


def is_named_dataset(source: str) -> bool:
    return source in REGISTRY


def source_problem(source: str) -> str | None:
    """Why `source` cannot be read (checked before anything loads), or None."""
    path = Path(source)
    if is_named_dataset(source):
        return None
    if path.is_dir():
        if not (path / "dataset_info.json").exists() and not (path / "state.json").exists():
            return f"folder '{source}' is not a dataset saved with datasets' save_to_disk (no dataset_info.json)"
        return None
    if not path.exists():
        named = ", ".join(sorted(REGISTRY))
        return f"'{source}' is neither a file, a saved dataset folder, nor a named dataset ({named}) (paths are relative to {Path.cwd()})"
    if path.suffix not in FILE_EXTENSIONS:
        return f"'{source}' has an unsupported extension; use one of {list(FILE_EXTENSIONS)} or a save_to_disk folder"
    return None


def read_source(source: str) -> Iterator[tuple[str, object]]:
    """Yield (where, row) for every row, streaming: a file of many GB is never held in memory. `where` names the file
    and line (or row) for error messages. A row is a dict, a JSONL line not yet parsed (a str: `load_row` parses it
    where it is tokenized, in parallel), or a `BadRow` the reader could not read."""
    if is_named_dataset(source):
        yield from _read_named(source)
    elif Path(source).is_dir():
        yield from _read_table(source, _load_saved(source))
    elif source.endswith(".jsonl"):
        yield from _read_jsonl(source)
    elif source.endswith(".json"):
        yield from _read_json(source)
    elif source.endswith(".parquet"):
        yield from _read_parquet(source)
    else:
        yield from _read_table(source, _load_csv(source))


@dataclass
class BadRow:
    """A row that could not be read, kept so data.on_bad_row decides: stop, or skip and count."""

    message: str


def load_row(where: str, row: object) -> dict:
    """The dict of a row from `read_source`; raises DataError naming the row if it is not a JSON object."""
    if isinstance(row, BadRow):
        raise DataError(row.message)
    if isinstance(row, str):
        try:
            row = json.loads(row)
        except json.JSONDecodeError as error:
            raise DataError(f"{where}: not valid JSON ({error.msg} at column {error.colno})") from None
        except (ValueError, RecursionError) as error:  # a number too long to convert, nesting too deep
            raise DataError(f"{where}: not usable JSON ({str(error)[:120]})") from None
    if not isinstance(row, dict):
        raise DataError(f"{where}: each row must be a JSON object; found {type(row).__name__}")
    return row


def _read_jsonl(path: str) -> Iterator[tuple[str, str | BadRow]]:
    # Read as bytes and decode each line: one line that is not UTF-8 is a bad row, not the end of the file. A BOM
    # (some editors write one) and CRLF line ends are accepted.
    with open(path, "rb") as lines:
        for line_number, raw in enumerate(lines, start=1):
            where = f"{path} line {line_number}"
            try:
                line = raw.decode("utf-8").lstrip("\ufeff")
            except UnicodeDecodeError as error:
                yield where, BadRow(f"{where}: not valid UTF-8 (byte {error.start}); save the file as UTF-8")
                continue
            if line.strip():
                yield where, line


def _read_json(path: str) -> Iterator[tuple[str, object]]:
    # A .json file is one JSON document, read whole; large data belongs in .jsonl or .parquet, which stream.
    try:
        rows = json.loads(Path(path).read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as error:
        raise DataError(f"{path}: not valid JSON ({error.msg} at line {error.lineno}, column {error.colno})") from None
    except UnicodeDecodeError as error:
        raise DataError(f"{path}: not valid UTF-8 (byte {error.start}); save the file as UTF-8") from None
    except (ValueError, RecursionError) as error:
        raise DataError(f"{path}: not usable JSON ({str(error)[:120]})") from None
    if not isinstance(rows, list):
        raise DataError(f"{path}: a .json file must hold a list of rows; found {type(rows).__name__}")
    for index, row in enumerate(rows):
        yield f"{path} row {index}", row


def _read_parquet(path: str) -> Iterator[tuple[str, dict]]:
    import pyarrow.parquet as pq

    try:
        batches = pq.ParquetFile(path).iter_batches(batch_size=1024)
        index = 0
        for batch in batches:
            for row in batch.to_pylist():
                yield f"{path} row {index}", row
                index += 1
    except (OSError, ValueError) as error:  # pyarrow's errors for a damaged file
        raise DataError(f"{path}: cannot be read as parquet ({error})") from None


def _load_csv(path: str):
    import datasets

    try:  # converted once to a memory-mapped Arrow file in the datasets cache, then read row by row
        return datasets.Dataset.from_csv(path)
    except Exception as error:  # pandas and pyarrow raise many types for a damaged file
        raise DataError(f"{path}: cannot be read as csv ({error})") from None


def _load_saved(path: str):
    import datasets

    loaded = datasets.load_from_disk(path)
    if isinstance(loaded, datasets.DatasetDict):
        if "train" not in loaded:
            raise DataError(f"{path}: a saved DatasetDict without a 'train' split (found {list(loaded)})")
        loaded = loaded["train"]
    return loaded


def _read_table(source: str, table) -> Iterator[tuple[str, dict]]:
    for index, row in enumerate(table):
        yield f"{source} row {index}", row


def _read_named(name: str) -> Iterator[tuple[str, dict]]:
    hub_id, split = REGISTRY[name]
    if os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1":
        raise DataError(
            f"the named dataset '{name}' ({hub_id}, split {split}) comes from the Hugging Face hub, which is offline "
            f"here (HF_HUB_OFFLINE/HF_DATASETS_OFFLINE=1). Download it where the hub is reachable "
            f"(datasets.load_dataset('{hub_id}', split='{split}').to_json('{name}.jsonl')) and pass the file instead."
        )
    import datasets

    yield from _read_table(name, datasets.load_dataset(hub_id, split=split))


# ---- formats ----


def detect_format(row: dict, keys: DataConfig) -> str:
    """The format a row's columns suggest; `instruction` when nothing else fits (its checks then name what is missing)."""
    if keys.messages_key in row:
        return "messages"
    if "conversations" in row:
        return "sharegpt"
    if "chosen" in row and "rejected" in row:
        return "preference"
    if "completion" in row and "label" in row:
        return "unpaired"
    if "prompt" in row and "completion" in row:
        return "prompt_completion"
    if "text" in row and keys.prompt_key not in row:
        return "text"
    return "instruction"


def parse_row(row: dict, where: str, keys: DataConfig) -> Record:
    fmt = keys.format if keys.format != "auto" else detect_format(row, keys)
    return PARSERS[fmt](row, where, keys)


def _parse_instruction(row: dict, where: str, keys: DataConfig) -> Conversation:
    found = ", ".join(sorted(row)) or "none"
    for key, config_key in ((keys.prompt_key, "data.prompt_key"), (keys.response_key, "data.response_key")):
        if key not in row:
            raise DataError(
                f"{where}: field '{key}' is missing (found keys: {found}); set {config_key} to the name your file "
                f"uses, or use another format ({', '.join(FORMATS[1:])}; see train/data/formats.py)"
            )
    messages = []
    system = _optional_string(row, keys.system_key, where)
    if system:
        messages.append({"role": "system", "content": system})
    user = _required_string(row, keys.prompt_key, where)
    query = _optional_string(row, keys.query_key, where)
    messages.append({"role": "user", "content": f"{user}\n\n{query}" if query else user})
    messages.append({"role": "assistant", "content": _required_string(row, keys.response_key, where)})
    return Conversation(messages)


def _parse_messages(row: dict, where: str, keys: DataConfig) -> Conversation:
    messages = check_messages(_field(row, keys.messages_key, where), where, keys.messages_key)
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: field '{keys.messages_key}' has no assistant turn, so there is nothing to train on")
    return Conversation(messages)


def _parse_sharegpt(row: dict, where: str, keys: DataConfig) -> Conversation:
    turns = _field(row, "conversations", where)
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{where}: field 'conversations' must be a non-empty list of {{from, value}} objects")
    messages = []
    for index, turn in enumerate(turns):
        name = f"conversations[{index}]"
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise DataError(f"{where}: {name} must be an object with 'from' and 'value'")
        if not isinstance(turn["from"], str) or turn["from"] not in SHAREGPT_ROLES:
            raise DataError(
                f"{where}: {name}.from={_short(turn['from'])} is unknown; use one of {list(SHAREGPT_ROLES)}"
            )
        messages.append({"role": SHAREGPT_ROLES[turn["from"]], "content": turn["value"]})
    # Checked as messages under the name of the field the row gives, so errors name conversations[i].
    return _parse_messages({"conversations": messages}, where, dataclasses.replace(keys, messages_key="conversations"))


def _parse_prompt_completion(row: dict, where: str, keys: DataConfig) -> Conversation:
    prompt = as_messages(_field(row, "prompt", where), where, "prompt", "user")
    completion = _response(row, "completion", where)
    return Conversation(prompt + completion)


def _response(row: dict, key: str, where: str) -> list[dict[str, str]]:
    """The response field of a row, as messages: it must hold an assistant turn to train on."""
    response = as_messages(_field(row, key, where), where, key, "assistant")
    if not any(m["role"] == "assistant" for m in response):
        raise DataError(f"{where}: field '{key}' has no assistant turn, so there is nothing to train on")
    return response


def _parse_text(row: dict, where: str, keys: DataConfig) -> Text:
    return Text(_required_string(row, "text", where))


def _parse_preference(row: dict, where: str, keys: DataConfig) -> Pair:
    # The prompt may be empty or absent when chosen and rejected hold whole conversations (hh style).
    prompt = as_messages(row["prompt"], where, "prompt", "user") if row.get("prompt") else []
    chosen = as_messages(_field(row, "chosen", where), where, "chosen", "assistant")
    rejected = as_messages(_field(row, "rejected", where), where, "rejected", "assistant")
    prompt, chosen, rejected = _split_shared_prompt(prompt, chosen, rejected)
    if not prompt:
        raise DataError(
            f"{where}: no prompt: give a 'prompt' field, or conversations in chosen/rejected that share their first turns"
        )
    for key, response in (("chosen", chosen), ("rejected", rejected)):
        if not any(m["role"] == "assistant" for m in response):
            raise DataError(f"{where}: field '{key}' has no assistant turn after the prompt")
    return Pair(prompt, chosen, rejected, _optional_margin(row, where))


def _optional_margin(row: dict, where: str) -> float | None:
    margin = row.get("margin")
    if margin is None:
        return None
    if isinstance(margin, bool) or not isinstance(margin, int | float) or not math.isfinite(margin):
        raise DataError(
            f"{where}: field 'margin' must be a finite number (how much better chosen is), not {_short(margin)}"
        )
    return float(margin)


def _parse_unpaired(row: dict, where: str, keys: DataConfig) -> Unpaired:
    prompt = as_messages(_field(row, "prompt", where), where, "prompt", "user")
    completion = _response(row, "completion", where)
    label = _field(row, "label", where)
    if not isinstance(label, bool):
        raise DataError(
            f"{where}: field 'label' must be true (desirable) or false (undesirable); found {_short(label)}"
        )
    return Unpaired(prompt, completion, label)


def _split_shared_prompt(prompt, chosen, rejected):
    """hh-style rows repeat the whole conversation in chosen and rejected: move the shared turns to the prompt."""
    shared = 0
    while shared < min(len(chosen), len(rejected)) - 1 and chosen[shared] == rejected[shared]:
        shared += 1
    return prompt + chosen[:shared], chosen[shared:], rejected[shared:]


PARSERS = {
    "instruction": _parse_instruction,
    "messages": _parse_messages,
    "sharegpt": _parse_sharegpt,
    "prompt_completion": _parse_prompt_completion,
    "text": _parse_text,
    "preference": _parse_preference,
    "unpaired": _parse_unpaired,
}


def _field(row: dict, key: str, where: str):
    if key not in row:
        raise DataError(f"{where}: field '{key}' is missing (found keys: {', '.join(sorted(row)) or 'none'})")
    return row[key]


def as_messages(value, where: str, key: str, role: str) -> list[dict[str, str]]:
    """A string becomes one message with `role`; a list is checked as messages."""
    if isinstance(value, str):
        _check_text(value, where, key)
        if role == "assistant" and not value.strip():
            raise DataError(f"{where}: field '{key}' is empty; every example needs text to train on")
        return [{"role": role, "content": value}]
    return check_messages(value, where, key)


def _required_string(row: dict, key: str, where: str) -> str:
    value = row[key]
    if not isinstance(value, str):
        raise DataError(f"{where}: field '{key}' must be a string; found {type(value).__name__}")
    _check_text(value, where, key)
    if not value.strip():
        raise DataError(f"{where}: field '{key}' is empty; every example needs text to train on")
    return value


def _optional_string(row: dict, key: str, where: str) -> str:
    value = row.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise DataError(f"{where}: field '{key}' must be a string; found {type(value).__name__}")
    _check_text(value, where, key)
    return value.strip()


def check_messages(messages: object, where: str, key: str) -> list[dict[str, str]]:
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: field '{key}' must be a non-empty list of {{role, content}} objects")
    for index, message in enumerate(messages):
        name = f"{key}[{index}]"
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise DataError(f"{where}: {name} must be an object with 'role' and 'content'")
        if not isinstance(message["role"], str) or message["role"] not in ROLES:
            raise DataError(f"{where}: {name}.role={_short(message['role'])} is unknown; use one of {list(ROLES)}")
        if not isinstance(message["content"], str):
            raise DataError(f"{where}: {name}.content must be a string; found {type(message['content']).__name__}")
        _check_text(message["content"], where, f"{name}.content")
        if message["role"] == "assistant" and not message["content"].strip():
            raise DataError(f"{where}: {name} is an empty assistant turn; remove it or give it content")
        reasoning = message.get("reasoning_content")
        if reasoning is not None and (message["role"] != "assistant" or not isinstance(reasoning, str)):
            raise DataError(f"{where}: {name}.reasoning_content must be a string, on an assistant turn (or null)")
        if reasoning is not None:
            _check_text(reasoning, where, f"{name}.reasoning_content")
    return [_message(m) for m in messages]


def _message(message: dict) -> dict[str, str]:
    """The fields of a message that preprocessing reads: role, content, and reasoning_content when given."""
    kept = {"role": message["role"], "content": message["content"]}
    if message.get("reasoning_content"):
        kept["reasoning_content"] = message["reasoning_content"]
    return kept


def _check_text(value: str, where: str, name: str) -> None:
    """A JSON string can hold a lone UTF-16 surrogate ("\\ud800"), which is no character and cannot be tokenized."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as error:
        raise DataError(
            f"{where}: field '{name}' holds an invalid character ({value[error.start]!r} at position {error.start}, "
            f"a lone surrogate); fix the \\u escape in the file"
        ) from None


def _short(value: object, limit: int = 60) -> str:
    """repr of a value from a row, cut short: a bad field may hold megabytes."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"
