"""A fuzz corpus of data rows: valid rows of every format, broken by seeded random mutations.

    python tests/fuzz_corpus.py            # print the corpus as JSON lines of {kind, mutation, field, line}

`corpus(seed)` returns the same rows for the same seed. Each entry is one JSONL line (bytes: some mutations make
it invalid UTF-8) and what was done to it: the mutation and the field it touched (None when the whole line was
mutated). Some mutations leave a valid row (a BOM, CRLF line ends, a huge string, roles that do not alternate):
preprocessing must then use it; every other row must give an error naming the file, the line and (for a field's
mutation) the field, never a traceback.
"""

from __future__ import annotations

import copy
import json
import random
from dataclasses import dataclass

CHAT = [
    {"role": "system", "content": "Be a pirate."},
    {"role": "user", "content": "What color is the sky?"},
    {"role": "assistant", "content": "Arr, the sky be blue!"},
    {"role": "user", "content": "And grass?"},
    {"role": "assistant", "content": "Green, matey!"},
]
# Valid rows of every format, and the kind of trainer data (train/data/formats.py KINDS) each one is.
VALID = [
    ("sft", {"instruction": "Name a color.", "input": "Be brief.", "output": "Blue.", "system": "Be a pirate."}),
    ("sft", {"messages": CHAT}),
    ("sft", {"conversations": [{"from": "human", "value": "Hi?"}, {"from": "gpt", "value": "Ahoy!"}]}),
    ("sft", {"prompt": "What is 2 plus 2?", "completion": "Arr, 4!"}),
    ("sft", {"prompt": CHAT[:2], "completion": CHAT[2:3]}),
    ("sft", {"text": "The quick brown fox jumps over the lazy dog."}),
    ("paired", {"prompt": "Best color?", "chosen": "Blue, matey.", "rejected": "No idea.", "margin": 1.5}),
    ("paired", {"chosen": CHAT[1:3], "rejected": [CHAT[1], {"role": "assistant", "content": "Nay."}]}),
    ("unpaired", {"prompt": "Best color?", "completion": "Blue, matey.", "label": True}),
]
WRONG_VALUES = [7, 2.5, True, [1, 2], {"a": 1}, None, "", "   "]
GARBAGE = {"a": [[[{"b": None, "c": [1, {"d": []}]}]]], "e": "x"}


@dataclass
class Entry:
    kind: str
    mutation: str
    field: str | None  # the field the mutation touched (a path such as messages[2].content), if any
    line: bytes


def _paths(value, prefix: str = "") -> list[tuple[str, list]]:
    """(readable path, key path) of every field and nested message field of a row."""
    found = []
    if isinstance(value, dict):
        for key, child in value.items():
            path = f"{prefix}.{key}" if prefix else key
            found.append((path, [key]))
            found += [(p, [key, *k]) for p, k in _paths(child, path)]
    elif isinstance(value, list):
        for index, child in enumerate(value):
            path = f"{prefix}[{index}]"
            found += [(p, [index, *k]) for p, k in _paths(child, path)]
    return found


def _set(row, keys: list, value) -> None:
    for key in keys[:-1]:
        row = row[key]
    row[keys[-1]] = value


def _delete(row, keys: list) -> None:
    for key in keys[:-1]:
        row = row[key]
    del row[keys[-1]]


def _mutate_field(rng: random.Random, kind: str, row: dict) -> Entry:
    row = json.loads(json.dumps(row))  # a copy sharing no message between fields
    path, keys = rng.choice(_paths(row))
    mutation = rng.choice(["delete", "rename", "wrong_type", "null", "empty", "huge", "garbage", "surrogate"])
    if mutation == "delete":
        _delete(row, keys)
    elif mutation == "rename":
        parent = row
        for key in keys[:-1]:
            parent = parent[key]
        parent[f"{keys[-1]}_renamed"] = parent.pop(keys[-1])
    elif mutation == "wrong_type":
        _set(row, keys, rng.choice(WRONG_VALUES[:5]))
    elif mutation == "null":
        _set(row, keys, None)
    elif mutation == "empty":
        _set(row, keys, rng.choice(["", "   ", [], {}]))
    elif mutation == "huge":
        _set(row, keys, "arr " * rng.randint(5_000, 20_000))
    elif mutation == "garbage":
        _set(row, keys, copy.deepcopy(GARBAGE))
    else:
        _set(row, keys, "bad \ud800 escape")
    line = json.dumps(row).encode() + b"\n"
    return Entry(kind, mutation, path, line)


def _mutate_line(rng: random.Random, kind: str, row: dict) -> Entry:
    line = json.dumps(row).encode()
    mutation = rng.choice(["invalid_utf8", "bom", "crlf", "truncated", "not_an_object", "deep_nesting"])
    if mutation == "invalid_utf8":
        at = rng.randint(1, len(line) - 1)
        line = line[:at] + b"\xff\xfe" + line[at:]
    elif mutation == "bom":
        line = b"\xef\xbb\xbf" + line
    elif mutation == "crlf":
        line = line + b"\r"
    elif mutation == "truncated":
        line = line[: rng.randint(1, len(line) - 1)]
    elif mutation == "not_an_object":
        line = rng.choice([b"[1, 2]", b"42", b"null", b'"text"'])
    else:
        line = b"[" * 100_000 + b"]" * 100_000
    return Entry(kind, mutation, None, line + b"\n")


def _mutate_roles(rng: random.Random, kind: str) -> Entry:
    messages = copy.deepcopy(CHAT)
    mutation = rng.choice(["unknown_role", "non_alternating", "system_last", "no_assistant"])
    if mutation == "unknown_role":
        index = rng.randrange(len(messages))
        messages[index]["role"] = rng.choice(["pirate", "Assistant", "tool", "", "gpt"])
        field = f"messages[{index}]"
    elif mutation == "non_alternating":
        messages.insert(rng.randrange(1, len(messages)), copy.deepcopy(messages[rng.randrange(len(messages))]))
        field = None
    elif mutation == "system_last":
        messages.append(messages.pop(0))
        field = None
    else:
        messages = [m for m in messages if m["role"] != "assistant"]
        field = "messages"
    return Entry(kind, mutation, field, json.dumps({"messages": messages}).encode() + b"\n")


def corpus(seed: int = 0, size: int = 240) -> list[Entry]:
    """`size` mutated rows, in equal shares derived from every valid row, the same for the same seed."""
    rng = random.Random(seed)
    entries = []
    for index in range(size):
        kind, row = VALID[index % len(VALID)]
        choice = rng.random()
        if choice < 0.6:
            entries.append(_mutate_field(rng, kind, row))
        elif choice < 0.85 or kind != "sft":
            entries.append(_mutate_line(rng, kind, row))
        else:
            entries.append(_mutate_roles(rng, kind))
    return entries


if __name__ == "__main__":
    for entry in corpus():
        record = {"kind": entry.kind, "mutation": entry.mutation, "field": entry.field}
        print(json.dumps({**record, "line": entry.line.decode("utf-8", "backslashreplace")[:200]}))
