"""Tokenizing one shard of rows into the columns of the store (in a worker process when data.num_proc > 1): each
row parsed (`formats.py`), rendered and masked (`chat.py`, or plain text here), fitted (`truncate.py`) and counted."""

from __future__ import annotations

import dataclasses

from train.app.config import DataConfig
from train.data.chat import tokenize_conversation
from train.data.formats import KIND_COLUMNS, KINDS, Conversation, Pair, Text, Unpaired, parse_row, row_format
from train.data.sources import load_row
from train.data.stats import DatasetStats, MaskAudit
from train.data.store import Example, schema
from train.data.truncate import Fitted, fit, has_supervised_token, prompt_cut_needed
from train.errors import DataError


def tokenize_text(text: str, tokenizer, max_length: int) -> list[Example]:
    """Plain text for continued pretraining: BOS + text + EOS, every token supervised, cut into max_length chunks."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if tokenizer.bos_token_id is not None:
        ids = [tokenizer.bos_token_id, *ids]
    ids.append(tokenizer.eos_token_id)
    return [Example(ids[i : i + max_length], ids[i : i + max_length]) for i in range(0, len(ids), max_length)]


EMPTY_STATUS = {"_error": "", "_truncated": False, "_dropped_empty": False, "_dropped_long": False}


def tokenize_rows(
    rows: list[tuple[str, object, int]], *, tokenizer, settings: DataConfig, max_length: int, kind: str
) -> tuple[dict[str, list], dict]:
    """Tokenize one shard of input rows, each (where, row, source index), into its columns (`store.schema(kind)`)
    and a report of what happened to its rows: DatasetStats' counts (its `formats` keyed by source index) plus the
    first bad row's message. Never raises
    for a bad row: it is counted, and data.on_bad_row decides once the (possibly parallel) work is done."""
    columns: dict[str, list] = {name: [] for name in schema(kind).names}
    report = {**dataclasses.asdict(DatasetStats(rows=len(rows))), "first_bad_row": ""}
    keep_first = 1 if tokenizer.bos_token_id is not None else 0
    audit = MaskAudit()
    formats: dict[str, dict[str, int]] = report["formats"]  # source index -> format -> rows read in it
    for where, row, source in rows:
        try:
            fields = load_row(where, row)
            fmt = row_format(fields, settings)
            by_format = formats.setdefault(str(source), {})  # str: the report is stored as JSON
            by_format[fmt] = by_format.get(fmt, 0) + 1
            record = parse_row(fields, where, settings)
            if not isinstance(record, KINDS[kind]):
                raise DataError(
                    f"{where}: this loss trains on {KIND_COLUMNS[kind]} rows, but this row is "
                    f"{type(record).__name__.lower()} data; give data in the format the loss expects"
                )
            outcomes = _tokenize_record(record, tokenizer, settings, max_length, where, keep_first, audit)
        except DataError as error:
            report["skipped_bad_rows"] += 1
            report["first_bad_row"] = report["first_bad_row"] or str(error)
            continue
        for values, status in outcomes:
            report["truncated"] += status["_truncated"]
            report["dropped_no_supervised_token"] += status["_dropped_empty"]
            report["dropped_too_long"] += status["_dropped_long"]
            if values:
                for name in columns:
                    columns[name].append(source if name == "source" else values[name])
                report["examples"] += 1
    report["mask_audit"] = dataclasses.asdict(audit)
    return columns, report


def _tokenize_record(
    record, tokenizer, settings: DataConfig, max_length: int, where: str, keep_first: int, audit: MaskAudit
) -> list:
    """[(column values, status)] for one record; text records may give several chunks."""
    if isinstance(record, Text):
        return [
            ({"input_ids": e.input_ids, "labels": e.labels}, dict(EMPTY_STATUS))
            for e in tokenize_text(record.text, tokenizer, max_length)
        ]
    if isinstance(record, Conversation):
        fitted = fit(
            tokenize_conversation(
                record.messages, tokenizer, where, settings.train_on, settings.train_on_reasoning, audit
            ),
            max_length,
            settings,
            where,
            keep_first,
        )
        return [_with_status(fitted, lambda e: {"input_ids": e.input_ids, "labels": e.labels})]
    if isinstance(record, Unpaired):
        after = f"after:{len(record.prompt)}"
        fitted = fit(
            tokenize_conversation(
                record.prompt + record.completion, tokenizer, where, after, settings.train_on_reasoning, audit
            ),
            max_length,
            settings,
            where,
            keep_first,
        )
        return [
            _with_status(
                fitted, lambda e: {"input_ids": e.input_ids, "labels": e.labels, "desirable": record.desirable}
            )
        ]
    return [_tokenize_pair(record, tokenizer, settings, max_length, where, keep_first, audit)]


def _tokenize_pair(
    pair: Pair, tokenizer, settings: DataConfig, max_length: int, where: str, keep_first: int, audit: MaskAudit
):
    """Both responses get the same prompt cut, so the policy compares them on the same context."""
    after = f"after:{len(pair.prompt)}"
    chosen, rejected = (
        tokenize_conversation(pair.prompt + response, tokenizer, where, after, settings.train_on_reasoning, audit)
        for response in (pair.chosen, pair.rejected)
    )
    cut = max(prompt_cut_needed(e, max_length, settings.max_prompt_length, keep_first) for e in (chosen, rejected))
    fitted = [fit(e, max_length, settings, where, keep_first, cut) for e in (chosen, rejected)]
    if any(f.example is None for f in fitted):
        return {}, {**EMPTY_STATUS, "_dropped_long": True}
    if not all(has_supervised_token(f.example) for f in fitted):
        return {}, {**EMPTY_STATUS, "_dropped_empty": True}
    values = {
        "chosen_input_ids": fitted[0].example.input_ids,
        "chosen_labels": fitted[0].example.labels,
        "rejected_input_ids": fitted[1].example.input_ids,
        "rejected_labels": fitted[1].example.labels,
        "margin": pair.margin,  # null when the row has none
    }
    return values, {**EMPTY_STATUS, "_truncated": any(f.truncated for f in fitted)}


def _with_status(fitted: Fitted, to_values) -> tuple[dict, dict]:
    if fitted.example is None:
        return {}, {**EMPTY_STATUS, "_dropped_long": True}
    if not has_supervised_token(fitted.example):
        return {}, {**EMPTY_STATUS, "_dropped_empty": True, "_truncated": fitted.truncated}
    return to_values(fitted.example), {**EMPTY_STATUS, "_truncated": fitted.truncated}
