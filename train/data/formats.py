"""What rows mean: the row formats, one record each in FORMATS.

Every row becomes one record: a `Conversation` (SFT), `Text` (continued pretraining), `Pair` (preference pairs) or
`Unpaired` (KTO). A format is one `Format` entry: how a row's columns reveal it, its parser, the record it gives, its
columns and what a row looks like. Detection, parsing, data.format's allowed values, the errors that name what a loss
trains on and `python launch.py --help` all read that table; adding a format is a parser and one entry. A row's format
is detected from its columns unless `data.format` forces one. Where rows come from is `train/data/sources.py`.

Every problem raises DataError naming the file, the row and the field, and saying how to fix it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from train.errors import DataError

if TYPE_CHECKING:  # config.py imports this module to check data settings
    from train.app.config import DataConfig

ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


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


@dataclass(frozen=True)
class Format:
    """One row format."""

    name: str  # data.format=<name>
    record: type  # the record each row gives (Conversation, Text, Pair or Unpaired)
    columns: str  # its columns, as an error naming what a loss trains on lists them
    example: str  # what a row looks like (`python launch.py --help` prints it)
    detect_rank: int  # data.format=auto tries the formats by rank: the first whose columns a row has wins
    detect: Callable[[dict, DataConfig], bool]  # whether a row's columns are this format's
    parse: Callable[[dict, str, DataConfig], Record]  # (row, where, keys) -> record; DataError naming the field


# ---- parsers ----


def _parse_instruction(row: dict, where: str, keys: DataConfig) -> Conversation:
    found = ", ".join(sorted(row)) or "none"
    for key, config_key in ((keys.prompt_key, "data.prompt_key"), (keys.response_key, "data.response_key")):
        if key not in row:
            raise DataError(
                f"{where}: field '{key}' is missing (found keys: {found}); set {config_key} to the name your file "
                f"uses, or use another format ({', '.join(FORMAT_NAMES[1:])}; see train/data/formats.py)"
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


# ---- the formats ----

# In the order data.format lists them. Ranks: a row with chosen/rejected, or completion/label, is a pair or unpaired
# even with a prompt/completion; a row with the instruction key is instruction-style even with a text column.
FORMATS = {
    f.name: f
    for f in (
        Format(
            "instruction", Conversation, "instruction/output",
            '{"instruction": str, "input": str?, "output": str, "system": str?}  (names set by data.*_key)',
            detect_rank=6, detect=lambda row, keys: True,  # any other row: its checks then name what is missing
            parse=_parse_instruction,
        ),
        Format(
            "messages", Conversation, "messages", '{"messages": [{"role": ..., "content": ...}, ...]}',
            detect_rank=0, detect=lambda row, keys: keys.messages_key in row, parse=_parse_messages,
        ),
        Format(
            "sharegpt", Conversation, "conversations",
            '{"conversations": [{"from": "human"|"gpt"|"system", "value": ...}, ...]}',
            detect_rank=1, detect=lambda row, keys: "conversations" in row, parse=_parse_sharegpt,
        ),
        Format(
            "prompt_completion", Conversation, "prompt/completion",
            '{"prompt": str|messages, "completion": str|messages}',
            detect_rank=4, detect=lambda row, keys: "prompt" in row and "completion" in row,
            parse=_parse_prompt_completion,
        ),
        Format(
            "text", Text, "text", '{"text": str}',
            detect_rank=5, detect=lambda row, keys: "text" in row and keys.prompt_key not in row, parse=_parse_text,
        ),
        Format(
            "preference", Pair, "prompt/chosen/rejected",
            '{"prompt": str|messages, "chosen": str|messages, "rejected": str|messages}',
            detect_rank=2, detect=lambda row, keys: "chosen" in row and "rejected" in row, parse=_parse_preference,
        ),
        Format(
            "unpaired", Unpaired, "prompt/completion/label",
            '{"prompt": str|messages, "completion": str|messages, "label": bool}',
            detect_rank=3, detect=lambda row, keys: "completion" in row and "label" in row, parse=_parse_unpaired,
        ),
    )
}  # fmt: skip
DETECTION_ORDER = tuple(sorted(FORMATS.values(), key=lambda f: f.detect_rank))

# Views of the table for other modules.
FORMAT_NAMES = ("auto", *FORMATS)  # data.format's allowed values
FORMAT_RECORDS = {f.name: f.record for f in FORMATS.values()}
FORMAT_EXAMPLES = {f.name: f.example for f in DETECTION_ORDER}  # for --help, in the order detection tries them


def _kind_columns(kind: str) -> str:
    columns = [f.columns for f in FORMATS.values() if f.record in KINDS[kind]]
    return f"{', '.join(columns[:-1])} or {columns[-1]}" if len(columns) > 1 else columns[0]


# What each kind of trainer's rows hold, for errors: "instruction/output, messages, ... or text".
KIND_COLUMNS = {kind: _kind_columns(kind) for kind in KINDS}


def detect_format(row: dict, keys: DataConfig) -> str:
    """The format a row's columns suggest; `instruction` when nothing else fits (its checks then name what is missing)."""
    return next(f.name for f in DETECTION_ORDER if f.detect(row, keys))


def row_format(row: dict, keys: DataConfig) -> str:
    """The format a row is read in: data.format, or detected from its columns under data.format=auto."""
    return keys.format if keys.format != "auto" else detect_format(row, keys)


def parse_row(row: dict, where: str, keys: DataConfig) -> Record:
    return FORMATS[row_format(row, keys)].parse(row, where, keys)


# ---- fields ----


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


def check_messages(messages: object, where: str, key: str) -> list[dict]:
    """The messages of a row, checked, with only the fields preprocessing reads (`_message`)."""
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: field '{key}' must be a non-empty list of {{role, content}} objects")
    checked = []
    for index, message in enumerate(messages):
        name = f"{key}[{index}]"
        if isinstance(message, dict):
            _refuse_tools(message, where, name)  # first: a tool-calling turn may have no content
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise DataError(f"{where}: {name} must be an object with 'role' and 'content'")
        if not isinstance(message["role"], str) or message["role"] not in ROLES:
            raise DataError(f"{where}: {name}.role={_short(message['role'])} is unknown; use one of {list(ROLES)}")
        content = _content_text(message["content"], where, f"{name}.content")
        _check_text(content, where, f"{name}.content")
        if message["role"] == "assistant" and not content.strip():
            raise DataError(f"{where}: {name} is an empty assistant turn; remove it or give it content")
        reasoning = message.get("reasoning_content")
        if reasoning is not None and (message["role"] != "assistant" or not isinstance(reasoning, str)):
            raise DataError(f"{where}: {name}.reasoning_content must be a string, on an assistant turn (or null)")
        if reasoning is not None:
            _check_text(reasoning, where, f"{name}.reasoning_content")
        checked.append(_message(message, content, _weight(message, where, name)))
    return checked


# Content parts other than text (OpenAI's and Anthropic's names), refused with what they hold.
UNSUPPORTED_PARTS = {
    "image_url": "images are",
    "image": "images are",
    "input_image": "images are",
    "input_audio": "audio is",
    "audio": "audio is",
    "file": "files are",
    "input_file": "files are",
    "video": "video is",
    "tool_use": "tool calls are",
    "tool_result": "tool results are",
}


def _content_text(content: object, where: str, name: str) -> str:
    """A message's content: a string, or a list of text parts ([{"type": "text", "text": ...}]) joined by newlines
    (as vLLM joins them for a text-only model). Any other part is refused: Halyard trains on text only."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise DataError(
            f'{where}: {name} must be a string or a list of text parts ({{"type": "text", "text": ...}}); '
            f"found {type(content).__name__}"
        )
    texts = []
    for index, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in UNSUPPORTED_PARTS:
            raise DataError(
                f"{where}: {name}[{index}] has type '{kind}': {UNSUPPORTED_PARTS[kind]} not supported (Halyard "
                f"trains on text only); remove the part, or skip such rows with data.on_bad_row=skip"
            )
        if kind != "text" or not isinstance(part.get("text"), str):
            raise DataError(
                f'{where}: {name}[{index}] must be a text part {{"type": "text", "text": str}}; found {_short(part)}'
            )
        texts.append(part["text"])
    return "\n".join(texts)


def _refuse_tools(message: dict, where: str, name: str) -> None:
    """Tool calls and tool results cannot be trained on as plain turns: say so instead of dropping them silently."""
    if message.get("tool_calls") or message.get("function_call") or message.get("role") in ("tool", "function"):
        raise DataError(
            f"{where}: {name} is a tool call or tool result: tool calls are not supported (Halyard trains on system, "
            f"user and assistant text); remove such turns, or skip such rows with data.on_bad_row=skip"
        )


def _weight(message: dict, where: str, name: str) -> int:
    """OpenAI's per-message `weight`: 1 (or absent) trains an assistant turn, 0 keeps it as unsupervised context."""
    weight = message.get("weight", 1)
    if isinstance(weight, bool) or weight not in (0, 1):
        raise DataError(
            f"{where}: {name}.weight={_short(weight)}: must be 0 (an assistant turn kept as context, not trained) or "
            f"1 (trained; the default)"
        )
    if weight == 1 and "weight" in message and message["role"] != "assistant":
        raise DataError(
            f"{where}: {name}.weight=1 on a {message['role']} message: only assistant turns are trained; remove the "
            f"weight, or set data.train_on=all to train every token"
        )
    return int(weight)


def _message(message: dict, content: str, weight: int) -> dict:
    """The fields of a message that preprocessing reads: role, content, reasoning_content when given, and weight
    when it is 0 (`chat.py` leaves such an assistant turn unsupervised)."""
    kept = {"role": message["role"], "content": content}
    if message.get("reasoning_content"):
        kept["reasoning_content"] = message["reasoning_content"]
    if weight == 0:
        kept["weight"] = 0
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
