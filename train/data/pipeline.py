"""Turning rows into training examples: render with the chat template, mask labels, truncate, cache.

Rows are read and parsed by `train/data/formats.py`. Each record is rendered with the tokenizer's chat template; the
assistant turns chosen by `data.train_on`, each with its end-of-turn token, are supervised, every other token gets
label -100. Assistant spans are located on the rendered text by rendering each conversation prefix, then verified:
the supervised tokens must decode to text containing the assistant's content. A template that cannot be split this
way is refused rather than trained on with a wrong mask.

Preprocessing streams: rows are read in shards of `store.SHARD_ROWS`, tokenized by `data.num_proc` worker processes
and written as Arrow shards under `${cache_dir}/preprocessed/<key>/` (layout: `train/data/store.py`), the key hashing
the data files, the tokenizer and template, and every setting that changes the result. An interrupted run restarts
from its finished shards. With several training processes, the main one prepares and the others map the same files.
What a process then holds of the data is index arrays: the mix, the eval split and the cap select rows of the
memory-mapped shards, and packing is a plan over their lengths.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import itertools
import json
import logging
import math
import shutil
import tempfile
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from train.app.config import Config, DataConfig
from train.data.formats import KIND_COLUMNS, KINDS, Conversation, Pair, Text, Unpaired, load_row, parse_row, read_source
from train.data.store import (
    IGNORE_INDEX,
    SHARD_ROWS,
    Example,
    PackedExample,
    PackedStore,
    TokenStore,
    TokenTable,
    build_folder,
    concatenate,
    is_complete,
    pack,
    pack_plan,
    packed_row_tokens,
    publish,
    read_stats,
    schema,
)
from train.errors import DataError

logger = logging.getLogger(__name__)

PIPELINE_VERSION = 6  # bump when tokenization changes, to invalidate caches


@dataclass
class DatasetStats:
    """What preprocessing did to the rows of one split, reported at the end of preprocessing and in summary.json."""

    rows: int = 0
    examples: int = 0
    truncated: int = 0
    dropped_no_supervised_token: int = 0
    dropped_too_long: int = 0
    skipped_bad_rows: int = 0
    mask_audit: dict = dataclasses.field(default_factory=dict)  # MaskAudit's fields, summed over the rows

    def describe(self, split: str, max_length: int, unit: str = "examples") -> str:
        text = f"{split}: {self.examples} {unit} from {self.rows} rows"
        if self.truncated:
            text += f"; {self.truncated} truncated to fit model.max_length={max_length}"
        if self.dropped_no_supervised_token:
            text += (
                f"; {self.dropped_no_supervised_token} dropped because truncation left no response token "
                f"(raise model.max_length or shorten the prompts)"
            )
        if self.dropped_too_long:
            text += f"; {self.dropped_too_long} dropped as longer than model.max_length (data.truncation=drop)"
        if self.skipped_bad_rows:
            text += f"; {self.skipped_bad_rows} malformed rows skipped (data.on_bad_row=skip)"
        return text


AUDIT_ROLES = ("system", "user", "assistant", "end_of_turn", "template")  # template: headers and other added text


@dataclass
class MaskAudit:
    """Which tokens the label masks supervise, by role, over the conversations of a split (measured on each rendered
    conversation before truncation). Under data.train_on=assistant, system, user and template tokens should be 0%
    supervised, assistant content and end-of-turn tokens 100%."""

    tokens: dict[str, int] = dataclasses.field(default_factory=lambda: dict.fromkeys(AUDIT_ROLES, 0))
    supervised: dict[str, int] = dataclasses.field(default_factory=lambda: dict.fromkeys(AUDIT_ROLES, 0))
    conversations: int = 0
    all_supervised: int = 0  # conversations with every token supervised
    unattributed: int = 0  # conversations whose prompt the template rewrites: its tokens are counted as template
    assistant_turns: int = 0  # supervised assistant turns
    turns_ending_supervised: int = 0  # of those, the ones whose end-of-turn token is supervised

    @classmethod
    def merged(cls, audits: list[dict]) -> MaskAudit:
        total = cls()
        for audit in audits:
            if not audit:
                continue
            for role in AUDIT_ROLES:
                total.tokens[role] += audit["tokens"][role]
                total.supervised[role] += audit["supervised"][role]
            for name in (
                "conversations",
                "all_supervised",
                "unattributed",
                "assistant_turns",
                "turns_ending_supervised",
            ):
                setattr(total, name, getattr(total, name) + audit[name])
        return total

    def describe(self, split: str, stats: DatasetStats) -> str:
        shares = ", ".join(
            f"{role} {self.supervised[role] / self.tokens[role]:.1%} of {self.tokens[role]:,}"
            for role in AUDIT_ROLES
            if self.tokens[role]
        )
        ending = self.turns_ending_supervised / max(self.assistant_turns, 1)
        text = (
            f"label mask audit ({split}, {self.conversations} conversations): supervised share of tokens by role: "
            f"{shares}; assistant turns whose end-of-turn token is supervised: {self.turns_ending_supervised} of "
            f"{self.assistant_turns} ({ending:.1%}); conversations with every token supervised: {self.all_supervised}; "
            f"with no supervised token left: {stats.dropped_no_supervised_token}"
        )
        if self.unattributed:
            text += f"; {self.unattributed} with prompt tokens counted as template (the template rewrites prompts)"
        return text

    def problems(self, train_on: str) -> list[str]:
        """What a careful user would want to know: end-of-turn tokens not learned, conversations trained whole."""
        found = []
        if self.turns_ending_supervised < self.assistant_turns:
            found.append(
                f"{self.assistant_turns - self.turns_ending_supervised} assistant turns end without a supervised "
                f"end-of-turn token (the chat template closes them with no special token): the model may not learn "
                f"to stop there"
            )
        if train_on != "all" and self.all_supervised:
            found.append(f"{self.all_supervised} conversations have every token supervised under train_on={train_on}")
        return found


# ---- rendering and masking ----

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
# Placeholders for the supervised contents: private-use characters and digits, which no template filter (trim,
# upper, capitalize) changes and no real text contains.
PLACEHOLDER = "\ue000{}\ue001"


@functools.lru_cache(maxsize=8)
def special_token_ids(tokenizer) -> frozenset[int]:
    """Ids of every special token, including added ones such as Llama 3's <|eot_id|> (computed once per tokenizer)."""
    added = {i for i, token in tokenizer.added_tokens_decoder.items() if token.special}
    return frozenset(set(tokenizer.all_special_ids) | added)


@functools.lru_cache(maxsize=8)
def special_token_texts(tokenizer) -> tuple[str, ...]:
    return tuple(tokenizer.convert_ids_to_tokens(i) for i in special_token_ids(tokenizer))


@dataclass
class Piece:
    """One text of the conversation: a supervised assistant turn's answer or its reasoning, or another message's
    content, and where the template rendered it (character offsets into the rendered conversation)."""

    turn: int  # message index
    part: str  # one of PARTS
    text: str  # the value given to the template
    start: int = -1
    end: int = -1  # -1: the template did not render it


def split_reasoning(message: dict[str, str]) -> tuple[str | None, str, str]:
    """(reasoning, answer, form) of an assistant message: reasoning from its `reasoning_content` field ("field"), or
    from a <think>...</think> block opening its content ("tags"); (None, content, "none") without reasoning."""
    content = message["content"]
    if message.get("reasoning_content"):
        return message["reasoning_content"], content, "field"
    opened = content.find(THINK_OPEN)
    closed = content.find(THINK_CLOSE)
    if opened >= 0 and closed > opened and not content[:opened].strip():
        return content[opened + len(THINK_OPEN) : closed], content[closed + len(THINK_CLOSE) :], "tags"
    return None, content, "none"


def tokenize_conversation(
    messages: list[dict[str, str]],
    tokenizer,
    where: str,
    train_on: str = "assistant",
    train_on_reasoning: bool = True,
    audit: MaskAudit | None = None,
) -> Example:
    """Render with the chat template and supervise assistant turns through their end-of-turn token.

    train_on: "assistant" (every assistant turn), "last_assistant", "all" (every token), or "after:<n>" (assistant
    turns from message n on: the response of a preference pair). Turns after the last assistant turn are dropped.

    The conversation is rendered twice: as it is, and with each supervised content replaced by a unique placeholder.
    The placeholder rendering says exactly where the template puts each content (whatever it adds around them: role
    headers, a default system prompt, generation prompts it renders unasked, earlier turns rewritten); the real
    rendering must be that text with the contents put back (trimmed at most), or the row is refused. The supervised
    tokens of a turn are those of its content (and reasoning, per `train_on_reasoning`) and the end-of-turn token
    that follows; they are then decoded and compared with that text, by equality. `audit`, if given, counts the
    supervised tokens by role.
    """
    assistant = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if not assistant:
        raise DataError(f"{where}: the conversation has no assistant turn, so there is nothing to train on")
    messages = messages[: assistant[-1] + 1]
    text = _render(tokenizer, messages, add_generation_prompt=False, where=where)
    encoded = tokenizer.backend_tokenizer.encode(text, add_special_tokens=False)
    ids = np.asarray(encoded.ids, dtype=np.int64)
    flat = itertools.chain.from_iterable(encoded.offsets)  # (start, end) per token; fromiter: 2x asarray
    offsets = np.fromiter(flat, dtype=np.int64, count=2 * len(ids)).reshape(-1, 2)
    turns = [] if train_on == "all" else _supervised_turns(messages, train_on)
    pieces, attributed = {}, False
    if turns or audit is not None:
        pieces, attributed = _locate_pieces(tokenizer, messages, turns, text, where)
    ends, expected = [], []
    if train_on == "all":
        supervised = np.ones(len(ids), dtype=bool)
    else:
        supervised = np.zeros(len(ids), dtype=bool)
        for turn in turns:
            start, end = _turn_span(pieces, turn, text, train_on_reasoning, where)
            # A token overlapping the span is supervised, also one that straddles its start (" Arr" after a
            # template ending in "assistant:"): it is the token the model must produce there.
            inside = np.flatnonzero((offsets[:, 0] < end) & (offsets[:, 1] > start))
            if not len(inside):
                raise DataError(
                    f"{where}: assistant turn {turn} has no answer after its reasoning, so nothing of it is trained "
                    f"with data.train_on_reasoning=false; give it an answer, or set data.train_on_reasoning=true"
                )
            first, last = int(inside[0]), _end_of_turn(tokenizer, ids, offsets, text, int(inside[-1]))
            supervised[first : last + 1] = True
            expected.append(text[start:end])
            ends.append(last if last > inside[-1] else None)
    if not supervised.any():
        raise DataError(f"{where}: no token of the assistant turns could be located in the rendered conversation")
    input_ids, labels = ids.tolist(), np.where(supervised, ids, IGNORE_INDEX).tolist()
    last = int(np.flatnonzero(supervised)[-1])
    appended_eos = input_ids[last] not in special_token_ids(tokenizer)
    if appended_eos:
        # The template ends the last turn without an end-of-turn token: append EOS so the model learns to stop.
        input_ids = input_ids[: last + 1] + [tokenizer.eos_token_id]
        labels = labels[: last + 1] + [tokenizer.eos_token_id]
    if turns:
        _verify_supervised_text(tokenizer, input_ids, labels, expected, where)
    if audit is not None:
        if ends and appended_eos:
            ends[-1] = len(input_ids) - 1
        kept = supervised[: last + 1] if appended_eos else supervised
        _count(audit, messages, pieces, attributed, offsets, kept, ends, appended_eos)
    return Example(input_ids=input_ids, labels=labels)


def _count(audit: MaskAudit, messages, pieces: dict, attributed: bool, offsets, supervised, ends, appended_eos) -> None:
    """Add one conversation's tokens to `audit`, by role: each located content's tokens get its message's role, the
    end-of-turn tokens theirs, the rest (headers, added text) count as template."""
    n = len(supervised)
    roles = np.full(n + appended_eos, AUDIT_ROLES.index("template"), dtype=np.int8)
    for piece in pieces.values():
        if piece.start >= 0:
            overlap = (offsets[:n, 0] < piece.end) & (offsets[:n, 1] > piece.start)
            roles[:n][overlap] = AUDIT_ROLES.index(messages[piece.turn]["role"])
    for end in ends:
        if end is not None:
            roles[end] = AUDIT_ROLES.index("end_of_turn")
    supervised = np.concatenate([supervised, [True] * appended_eos]) if appended_eos else supervised
    tokens = np.bincount(roles, minlength=len(AUDIT_ROLES)).tolist()
    trained = np.bincount(roles[supervised], minlength=len(AUDIT_ROLES)).tolist()
    for index, role in enumerate(AUDIT_ROLES):
        audit.tokens[role] += tokens[index]
        audit.supervised[role] += trained[index]
    audit.conversations += 1
    audit.all_supervised += bool(supervised[1:].all())
    audit.unattributed += not attributed
    audit.assistant_turns += len(ends)
    audit.turns_ending_supervised += sum(end is not None for end in ends)


def _supervised_turns(messages: list[dict[str, str]], train_on: str) -> list[int]:
    assistant = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if train_on == "last_assistant":
        return assistant[-1:]
    if train_on.startswith("after:"):
        first = int(train_on.split(":")[1])
        return [i for i in assistant if i >= first]
    return assistant


PARTS = ("answer", "reasoning", "content")  # an assistant turn's answer and reasoning; any other message's content


def _mark(piece: Piece) -> str:
    return PLACEHOLDER.format(len(PARTS) * piece.turn + PARTS.index(piece.part))


def _locate_pieces(tokenizer, messages: list[dict], turns: list[int], text: str, where: str) -> tuple[dict, bool]:
    """{(turn, part): Piece} located in `text`, and whether every other message's content was located too (for the
    mask audit's roles; a template may rewrite a prompt in ways that only make that fail)."""
    pieces = _locate(tokenizer, messages, turns, text, where, every_message=True)
    if pieces is not None:
        return pieces, True
    pieces = _locate(tokenizer, messages, turns, text, where, every_message=False)
    if pieces is not None:
        return pieces, False
    raise DataError(
        f"{where}: the chat template renders this conversation in a way that depends on the content of its "
        f"assistant turns (beyond trimming it), so their tokens cannot be located exactly; fix the template, or "
        f"set data.train_on=all to train on every token"
    )


def _locate(tokenizer, messages: list[dict], turns: list[int], text: str, where: str, every_message: bool):
    """Render with placeholders for the supervised turns' pieces (and, with `every_message`, for every other
    non-empty content), then put the real pieces back in order; None if the real rendering is not that."""
    pieces, placeheld = {}, list(messages)
    for turn, message in enumerate(messages):
        if turn in turns:
            reasoning, answer, form = split_reasoning(message)
            pieces[turn, "answer"] = answer_piece = Piece(turn, "answer", answer)
            placeheld[turn] = {**message, "content": _mark(answer_piece)}
            if reasoning is not None:
                pieces[turn, "reasoning"] = reasoning_piece = Piece(turn, "reasoning", reasoning)
                if form == "field":
                    placeheld[turn]["reasoning_content"] = _mark(reasoning_piece)
                else:
                    placeheld[turn]["content"] = (
                        f"{THINK_OPEN}{_mark(reasoning_piece)}{THINK_CLOSE}{_mark(answer_piece)}"
                    )
        elif every_message and message["content"]:
            pieces[turn, "content"] = piece = Piece(turn, "content", message["content"])
            placeheld[turn] = {**message, "content": _mark(piece)}
    template = _render(tokenizer, placeheld, add_generation_prompt=False, where=where)
    by_mark = {_mark(p): p for p in pieces.values()}
    found = sorted((template.find(mark), mark) for mark in by_mark if mark in template)
    for _, mark in found:
        if template.count(mark) > 1:
            if by_mark[mark].part == "content":
                return None
            raise DataError(
                f"{where}: the chat template renders the content of assistant turn {by_mark[mark].turn} more than "
                f"once, so which copy to train on is ambiguous; fix the template, or set data.train_on=all"
            )
    # Walk the template text: literal text must match exactly, each piece as given or as the template trimmed it.
    position, cursor = 0, 0
    for index, (at, mark) in enumerate(found):
        literal = template[cursor:at]
        if not text.startswith(literal, position):
            return None
        position += len(literal)
        following = template[at + len(mark) : found[index + 1][0] if index + 1 < len(found) else len(template)]
        piece = by_mark[mark]
        rendered = next((v for v in _trimmed(piece.text) if text.startswith(v + following, position)), None)
        if rendered is None:
            return None
        piece.start, piece.end = position, position + len(rendered)
        position, cursor = piece.end, at + len(mark)
    return pieces if text[position:] == template[cursor:] else None


def _trimmed(value: str) -> list[str]:
    """The forms a template commonly gives a content: as is, or trimmed (of newlines, or of all whitespace)."""
    forms = [
        value,
        value.strip("\n"),
        value.lstrip("\n"),
        value.rstrip("\n"),
        value.strip(),
        value.lstrip(),
        value.rstrip(),
    ]
    return list(dict.fromkeys(forms))


def _turn_span(pieces: dict, turn: int, text: str, train_on_reasoning: bool, where: str) -> tuple[int, int]:
    """Characters of `text` supervised for assistant turn `turn`: its answer, and its reasoning with the tags around
    it when that is trained."""
    answer, reasoning = pieces[turn, "answer"], pieces.get((turn, "reasoning"))
    if answer.start < 0:
        raise DataError(
            f"{where}: the chat template does not render the content of assistant turn {turn}; fix the template, or "
            f"set data.train_on=all"
        )
    if reasoning is None or not train_on_reasoning:
        rendered = text[answer.start : answer.end]  # whitespace after "</think>" is part of the reasoning's end
        return answer.start + len(rendered) - len(rendered.lstrip()) if reasoning else answer.start, answer.end
    if reasoning.start < 0:
        raise DataError(
            f"{where}: the chat template drops the reasoning of assistant turn {turn} once later turns follow it, so "
            f"that turn would be trained without the reasoning it has at inference; set data.train_on=last_assistant "
            f"(or give one row per assistant turn), data.train_on_reasoning=false, or data.train_on=all"
        )
    opened = text.rfind(THINK_OPEN, 0, reasoning.start)  # the tag the model writes to open its reasoning
    start = opened if opened >= 0 and not text[opened + len(THINK_OPEN) : reasoning.start].strip() else reasoning.start
    return start, answer.end


def _end_of_turn(tokenizer, ids: np.ndarray, offsets: np.ndarray, text: str, last: int) -> int:
    """The index of the end-of-turn token after token `last` (a special token, after whitespace at most), else
    `last`."""
    specials = special_token_ids(tokenizer)
    for index in range(last + 1, min(last + 4, len(ids))):
        if int(ids[index]) in specials:
            return index
        if text[offsets[index, 0] : offsets[index, 1]].strip():
            break
    return last


def _verify_supervised_text(
    tokenizer, input_ids: list[int], labels: list[int], expected: list[str], where: str
) -> None:
    """Each run of supervised tokens, decoded, must be exactly its turn's text (which may start inside the run's first
    token, one that straddles the boundary) followed by the end-of-turn token and nothing else: the mask is checked
    by equality, not assumed."""
    supervised = np.asarray(labels) != IGNORE_INDEX
    edges = np.flatnonzero(np.diff(np.concatenate([[0], supervised.astype(np.int8), [0]])))
    runs = list(zip(edges[::2].tolist(), edges[1::2].tolist(), strict=True))
    decode = tokenizer.backend_tokenizer.decode  # the exact text of the tokens, no Python-side cleanup of spaces
    specials = special_token_texts(tokenizer)
    problem = None if len(runs) == len(expected) else f"{len(runs)} supervised spans for {len(expected)} turns"
    for (start, end), turn_text in zip(runs, expected, strict=False):
        if problem:
            break
        decoded = decode(input_ids[start:end], skip_special_tokens=False)
        head = len(decode(input_ids[start : start + 1], skip_special_tokens=False))
        at = next((p for p in range(max(head, 1)) if decoded.startswith(turn_text, p)), -1)
        tail = decoded[at + len(turn_text) :] if at >= 0 else ""
        for special in specials:
            tail = tail.replace(special, "")
        if at < 0 or tail.strip():
            problem = f"the supervised tokens {decoded[:60]!r} are not exactly the turn {turn_text[:40]!r} and its end"
    if problem:
        raise DataError(
            f"{where}: label mask check failed: {problem}; the tokenizer's offsets do not match its chat template "
            f"(set data.train_on=all, or use a tokenizer whose template renders contents verbatim)"
        )


def tokenize_text(text: str, tokenizer, max_length: int) -> list[Example]:
    """Plain text for continued pretraining: BOS + text + EOS, every token supervised, cut into max_length chunks."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if tokenizer.bos_token_id is not None:
        ids = [tokenizer.bos_token_id, *ids]
    ids.append(tokenizer.eos_token_id)
    return [Example(ids[i : i + max_length], ids[i : i + max_length]) for i in range(0, len(ids), max_length)]


def _render(tokenizer, messages: list[dict[str, str]], add_generation_prompt: bool, where: str) -> str:
    from transformers.utils.chat_template_utils import render_jinja_template

    if tokenizer.chat_template is None:
        raise DataError(
            f"{where}: the tokenizer has no chat template, so conversations cannot be rendered; set "
            f"model.tokenizer_name_or_path to a tokenizer that has one (plain `text` rows need none)"
        )
    try:
        # What apply_chat_template(tokenize=False) renders, without its normalization of message objects: parsed
        # rows are plain dicts of strings already, and this runs several times per row (tests/data/test_pipeline.py checks
        # that both give the same text).
        rendered, _ = render_jinja_template(
            conversations=[messages],
            chat_template=tokenizer.get_chat_template(),
            add_generation_prompt=add_generation_prompt,
            **tokenizer.special_tokens_map,
        )
        return rendered[0]
    except Exception as error:  # jinja raises template-defined errors, e.g. "roles must alternate"
        raise DataError(f"{where}: the tokenizer's chat template rejected this conversation: {error}") from None


# ---- truncation ----


@dataclass
class Fitted:
    example: Example | None  # None: dropped
    truncated: bool = False
    dropped_too_long: bool = False


def prompt_cut_needed(example: Example, max_length: int, max_prompt_length: int | None, keep_first: int) -> int:
    """How many prompt tokens (after the first `keep_first`, e.g. BOS) to remove from the left."""
    prompt_length = next((i for i, label in enumerate(example.labels) if label != IGNORE_INDEX), len(example.labels))
    cut = max(0, prompt_length - max_prompt_length) if max_prompt_length else 0
    over_length = len(example.input_ids) - cut - max_length
    return min(cut + max(0, over_length), max(0, prompt_length - keep_first))


def fit(
    example: Example, max_length: int, settings: DataConfig, where: str, keep_first: int, cut: int | None = None
) -> Fitted:
    """Apply data.truncation: cut the prompt from the left first (keeping BOS), then the end of the response."""
    if cut is None:
        cut = prompt_cut_needed(example, max_length, settings.max_prompt_length, keep_first)
    too_long = len(example.input_ids) > max_length or cut > 0
    if not too_long:
        return Fitted(example)
    if settings.truncation == "error":
        raise DataError(
            f"{where}: {len(example.input_ids)} tokens, over model.max_length={max_length} (or data.max_prompt_length); "
            f"raise the limit, or set data.truncation=truncate or drop"
        )
    if settings.truncation == "drop":
        return Fitted(None, dropped_too_long=True)
    ids = example.input_ids[:keep_first] + example.input_ids[keep_first + cut :]
    labels = example.labels[:keep_first] + example.labels[keep_first + cut :]
    return Fitted(Example(ids[:max_length], labels[:max_length]), truncated=True)


def has_supervised_token(example: Example) -> bool:
    return any(label != IGNORE_INDEX for label in example.labels[1:])


# ---- tokenizing one shard of rows (in a worker process when data.num_proc > 1) ----

EMPTY_STATUS = {"_error": "", "_truncated": False, "_dropped_empty": False, "_dropped_long": False}


def tokenize_rows(
    rows: list[tuple[str, object, int]], *, tokenizer, settings: DataConfig, max_length: int, kind: str
) -> tuple[dict[str, list], dict]:
    """Tokenize one shard of input rows, each (where, row, source index), into its columns (`store.schema(kind)`)
    and a report of what happened to its rows: DatasetStats' counts plus the first bad row's message. Never raises
    for a bad row: it is counted, and data.on_bad_row decides once the (possibly parallel) work is done."""
    columns: dict[str, list] = {name: [] for name in schema(kind).names}
    report = {**dataclasses.asdict(DatasetStats(rows=len(rows))), "first_bad_row": ""}
    keep_first = 1 if tokenizer.bos_token_id is not None else 0
    audit = MaskAudit()
    for where, row, source in rows:
        try:
            record = parse_row(load_row(where, row), where, settings)
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


# ---- reading, caching, selecting ----


def read_shards(sources: list[str], settings: DataConfig, kind: str) -> Iterator[list[tuple[str, object, int]]]:
    """The rows of every source, streamed in shards of SHARD_ROWS (where, row, source index). The first readable row
    of each source is checked against the loss's kind first, so a wrong file is one clear error."""
    shard: list[tuple[str, object, int]] = []
    for index, source in enumerate(sources):
        checked, rows = False, 0
        for where, row in read_source(source):
            checked = checked or check_stage(where, row, settings, kind)
            shard.append((where, row, index))
            rows += 1
            if len(shard) == SHARD_ROWS:
                yield shard
                shard = []
        if not rows:
            raise DataError(f"{source}: no rows (the file is empty); give data in it, or leave it out of the list")
    if shard:
        yield shard


def check_stage(where: str, row: object, settings: DataConfig, kind: str) -> bool:
    """Refuse a source whose rows suit another loss (SFT rows given to DPO, or the reverse). Returns whether the row
    could be checked (a malformed one cannot: data.on_bad_row decides about it, and the next row is checked)."""
    try:
        fields = load_row(where, row)
        record = parse_row(fields, where, settings)
    except DataError:
        return False
    if not isinstance(record, KINDS[kind]):
        raise DataError(
            f"{where}: this loss trains on {KIND_COLUMNS[kind]} rows, but this file holds "
            f"{type(record).__name__.lower()} rows (columns: {', '.join(sorted(fields))}); choose the loss that "
            f"fits the data, or give data with the columns this loss expects"
        )
    return True


def cache_key(sources: list[str], tokenizer, settings: DataConfig, max_length: int, kind: str) -> str:
    """Hash of everything that changes the tokenized result: data bytes, tokenizer, template and settings."""
    digest = hashlib.sha256()
    relevant = dataclasses.asdict(settings)
    for key in ("num_proc", "num_workers", "cache_preprocessing", "dataset_samples", "eval_split_ratio", "n_examples",
                "packing", "group_by_length", "shared_prompt"):  # fmt: skip
        relevant.pop(key)  # these do not change how a row is tokenized (packing plans are cached apart)
    relevant.pop("on_bad_row")  # bad rows are counted in the shards either way; the policy is applied after
    digest.update(
        json.dumps({"v": PIPELINE_VERSION, "settings": relevant, "max_length": max_length, "kind": kind}).encode()
    )
    digest.update(tokenizer.backend_tokenizer.to_str().encode())
    digest.update(json.dumps([tokenizer.chat_template, tokenizer.bos_token, tokenizer.eos_token]).encode())
    for source in sources:
        digest.update(source.encode())
        for file in sorted(Path(source).rglob("*")) if Path(source).is_dir() else [Path(source)]:
            if file.is_file():
                digest.update(file_digest(file))
    return digest.hexdigest()[:20]


def file_digest(path: Path) -> bytes:
    """sha256 of a file's bytes, remembered per (path, size, modification and change times) for this process, so
    that one start-up reads each data file once."""
    status = path.stat()
    return _file_digest(path.resolve(), status.st_size, status.st_mtime_ns, status.st_ctime_ns)


@functools.lru_cache(maxsize=256)
def _file_digest(path: Path, size: int, mtime_ns: int, ctime_ns: int) -> bytes:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.digest()


def preprocess(
    sources: list[str],
    tokenizer,
    settings: DataConfig,
    max_length: int,
    kind: str,
    cache_root: Path | None,
    main_process_first,
) -> tuple[TokenStore, DatasetStats]:
    """The tokenized examples of `sources`, memory-mapped, and their stats, from the cache when inputs match.

    Without a cache root (data.cache_preprocessing=false), the shards go to a private temporary folder that is
    removed when the data is no longer used.
    """
    key = cache_key(sources, tokenizer, settings, max_length, kind)
    with main_process_first():
        root = cache_root or Path(tempfile.mkdtemp(prefix="halyard-data-"))
        folder = root / key
        if cache_root and is_complete(folder):
            logger.info(f"reusing preprocessed data cached in {folder}")
            return TokenStore(TokenTable(folder, kind)), DatasetStats(**read_stats(folder))
        tokenize = functools.partial(
            tokenize_rows, tokenizer=tokenizer, settings=settings, max_length=max_length, kind=kind
        )
        stop_at_bad_row = settings.on_bad_row == "error"
        reports, finished = build_folder(
            folder,
            read_shards(sources, settings, kind),
            tokenize,
            kind,
            settings.num_proc,
            must_stop=lambda report: stop_at_bad_row and report["skipped_bad_rows"] > 0,
        )
        counts = [f.name for f in dataclasses.fields(DatasetStats) if f.name != "mask_audit"]
        audit = MaskAudit.merged([r.get("mask_audit", {}) for r in reports])
        stats = DatasetStats(
            **{name: sum(r[name] for r in reports) for name in counts}, mask_audit=dataclasses.asdict(audit)
        )
        bad_rows = [r["first_bad_row"] for r in reports if r["first_bad_row"]]
        if bad_rows and stop_at_bad_row:
            more = stats.skipped_bad_rows - 1
            read = "" if finished else f" in the first {stats.rows} rows read"
            raise DataError(
                bad_rows[0]
                + (f" ({more} more bad rows{read}; data.on_bad_row=skip would skip and count them)" if more else "")
            )
        publish(folder, dataclasses.asdict(stats))
        if bad_rows:
            logger.warning(f"skipped {stats.skipped_bad_rows} malformed rows, the first: {bad_rows[0]}")
        if cache_root:
            logger.info(f"cached preprocessed data in {folder}")
        table = TokenTable(folder, kind)
        if not cache_root:
            weakref.finalize(table, shutil.rmtree, root, True)
    return TokenStore(table), stats


def mix(store: TokenStore, n_sources: int, samples: list[float], seed: int) -> TokenStore:
    """Per-source sampling: a count (>= 1; repeats the data when larger than the source) or a fraction (< 1)."""
    if not samples:
        return store
    generator = torch.Generator().manual_seed(seed)
    sources = store.sources()
    chosen = []
    for source in range(n_sources):
        indices = np.flatnonzero(sources == source)
        want = round(samples[source] * len(indices)) if samples[source] < 1 else int(samples[source])
        order = indices[torch.randperm(len(indices), generator=generator).numpy()]
        chosen.append(np.resize(order, want) if len(order) else order)  # np.resize repeats the order cyclically
    return store.select(np.concatenate(chosen))


def split_off_eval(store: TokenStore, ratio: float, seed: int) -> tuple[TokenStore, TokenStore]:
    """(train, eval): a seeded random `ratio` of the examples (rounded up) held out."""
    n_eval = math.ceil(ratio * len(store))
    order = np.random.default_rng(seed).permutation(len(store))
    return store.select(order[n_eval:]), store.select(order[:n_eval])


def load_examples(
    sources: list[str], tokenizer, settings: DataConfig, max_length: int, kind: str = "sft"
) -> tuple[TokenStore, DatasetStats]:
    """Tokenized examples of `sources` and their stats, without caching (for tests, previews and scripts)."""
    return preprocess(sources, tokenizer, settings, max_length, kind, None, contextlib.nullcontext)


def build_datasets(
    cfg: Config, tokenizer, kind: str = "sft", main_process_first=None
) -> tuple[TokenStore | PackedStore, TokenStore | None, dict[str, dict]]:
    """Training and evaluation data for a trainer consuming `kind` data (views of the memory-mapped cache), and what
    preprocessing did to each."""
    main_process_first = main_process_first or contextlib.nullcontext
    cache_root = Path(cfg.cache_dir) / "preprocessed" if cfg.data.cache_preprocessing else None
    prepare = functools.partial(
        preprocess,
        tokenizer=tokenizer,
        settings=cfg.data,
        max_length=cfg.model.max_length,
        kind=kind,
        cache_root=cache_root,
        main_process_first=main_process_first,
    )

    train, train_stats = prepare(cfg.datasets)
    evaluation, eval_stats = None, None
    if cfg.eval_datasets:
        evaluation, eval_stats = prepare(cfg.eval_datasets)
    elif cfg.data.eval_split_ratio > 0:
        # Held out before mixing: once rows are repeated (dataset_samples above a source's size), a split would put
        # copies of one row on both sides.
        train, evaluation = split_off_eval(train, cfg.data.eval_split_ratio, cfg.seed)
    train = mix(train, len(cfg.datasets), cfg.data.dataset_samples, cfg.seed)
    if cfg.data.n_examples is not None and cfg.data.n_examples < len(train):
        train = train.select(np.random.default_rng(cfg.seed).permutation(len(train))[: cfg.data.n_examples])
    if len(train) == 0:
        raise DataError(f"no training examples left: {train_stats.describe('train', cfg.model.max_length)}")

    train_stats.examples = len(train)
    unit = "pairs" if kind == "paired" else "examples"
    logger.info(train_stats.describe("train", cfg.model.max_length, unit))
    log_mask_audit(train_stats, "train", cfg.data.train_on)
    stats = {"train": dataclasses.asdict(train_stats)}
    if cfg.data.packing:
        with main_process_first():  # the main process computes and caches the plan; the others read it
            train = pack(train, cfg.model.max_length)
        efficiency = train.efficiency(cfg.model.max_length)
        stats["train"]["packed_rows"], stats["train"]["packing_efficiency"] = len(train), efficiency
        logger.info(
            f"packed {train_stats.examples} {unit} into {len(train)} rows of up to "
            f"{packed_row_tokens(kind, cfg.model.max_length)} tokens: "
            f"efficiency {efficiency:.1%} (real tokens / slots)"
        )
    if eval_stats is not None:
        eval_stats.examples = len(evaluation)
        logger.info(eval_stats.describe("eval", cfg.model.max_length, unit))
        stats["eval"] = dataclasses.asdict(eval_stats)
    elif evaluation is not None:
        logger.info(f"eval: {len(evaluation)} {unit} held out of the training data (data.eval_split_ratio)")
    return train, evaluation, stats


def log_mask_audit(stats: DatasetStats, split: str, train_on: str) -> MaskAudit:
    """Log the label mask audit of a split (and warn about what looks wrong); return it."""
    audit = MaskAudit.merged([stats.mask_audit])
    if audit.conversations:
        logger.info(audit.describe(split, stats))
        for problem in audit.problems(train_on):
            logger.warning(f"label mask audit ({split}): {problem}")
    return audit


def pack_examples(examples: list[Example], max_length: int) -> list[PackedExample]:
    """Best-fit-decreasing packing (`store.pack_plan`) of examples held in memory (tests, benchmarks)."""
    members, row_starts = pack_plan(np.array([len(e.input_ids) for e in examples], dtype=np.int64), max_length)
    return [
        concatenate([examples[i] for i in members[start:end]]) for start, end in itertools.pairwise(row_starts.tolist())
    ]


def packing_efficiency(rows: list[PackedExample], max_length: int) -> float:
    """Real tokens / slots of the packed rows."""
    return sum(len(r.input_ids) for r in rows) / (len(rows) * max_length) if rows else 0.0
