"""Where rows come from: files (.jsonl, .json, .parquet, .csv), folders saved with datasets' `save_to_disk`, and
named hub datasets (REGISTRY). Rows stream: a file of many GB is never held in memory. What a row means is
`train/data/formats.py`.

Every problem raises DataError naming the file and the row, and saying how to fix it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from train.errors import DataError

FILE_EXTENSIONS = (".json", ".jsonl", ".parquet", ".csv")

# Named datasets: name -> (hub id, split). Loaded with `datasets.load_dataset`, which needs the hub.
REGISTRY = {
    "ultrachat": ("HuggingFaceH4/ultrachat_200k", "train_sft"),
    "ultrabin": ("HuggingFaceH4/ultrafeedback_binarized", "train_prefs"),
    "hh": ("Anthropic/hh-rlhf", "train"),
    "alpaca": ("tatsu-lab/alpaca", "train"),
}


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
    if path.stat().st_size == 0:  # a file of blank lines, or a table of no rows, is found when it is read
        return f"'{source}' is empty (0 bytes); give data in it, or leave it out of the list"
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
        except json.JSONDecodeError as error:  # `row` is one line, so the parser's line is always 1
            raise DataError(json_error(error, where, one_line=True)) from None
        except (ValueError, RecursionError) as error:  # a number too long to convert, nesting too deep
            raise DataError(f"{where}: not usable JSON ({str(error)[:120]})") from None
    if not isinstance(row, dict):
        raise DataError(f"{where}: each row must be a JSON object; found {type(row).__name__}")
    return row


def json_error(error: json.JSONDecodeError, name: str, one_line: bool) -> str:
    """Why and where the parser stopped: "d.jsonl line 3: not valid JSON (invalid control character at column 9)".
    `name`: the file, or for one JSONL line "file line N" (the parser's line is then always 1, so only the column is
    named). The parser's messages end in "at" (it appends the position itself); a position past the last character
    is the end of the text."""
    message = error.msg.removesuffix(" at")
    message = message[:1].lower() + message[1:]
    if not error.doc[error.pos :].strip():
        place = "the end of the line" if one_line else f"the end of the file, line {error.lineno}"
    else:
        place = f"column {error.colno}" if one_line else f"line {error.lineno}, column {error.colno}"
    return f"{name}: not valid JSON ({message} at {place})"


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
                yield where, line.rstrip("\r\n")  # a parser error at the line's end is then on this line


def _read_json(path: str) -> Iterator[tuple[str, object]]:
    # A .json file is one JSON document, read whole; large data belongs in .jsonl or .parquet, which stream.
    try:
        rows = json.loads(Path(path).read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as error:
        raise DataError(json_error(error, path, one_line=False)) from None
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
