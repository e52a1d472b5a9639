"""Rendering a conversation with the chat template and locating its supervised tokens: the label mask.

The assistant turns chosen by `data.train_on`, each with its end-of-turn token, are supervised; every other token
gets label -100. Where the template puts each supervised content is found by rendering the conversation again with
placeholders in their place, then verified: the supervised tokens must decode to exactly that content and its end of
turn. A template that cannot be split this way is refused rather than trained on with a wrong mask.
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass

import numpy as np

from train.data.stats import AUDIT_ROLES, MaskAudit
from train.data.store import IGNORE_INDEX, Example
from train.data.templates import no_template_message
from train.errors import DataError

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
    turns from message n on: the response of a preference pair). An assistant turn with `"weight": 0` is context, never
    supervised. Turns after the last supervised one (the last assistant turn under "all") are dropped.

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
    turns = [] if train_on == "all" else _supervised_turns(messages, train_on, where)
    messages = messages[: max(turns or assistant) + 1]  # what follows the last trained turn teaches nothing
    text = _render(tokenizer, messages, add_generation_prompt=False, where=where)
    encoded = tokenizer.backend_tokenizer.encode(text, add_special_tokens=False)
    ids = np.asarray(encoded.ids, dtype=np.int64)
    flat = itertools.chain.from_iterable(encoded.offsets)  # (start, end) per token; fromiter: 2x asarray
    offsets = np.fromiter(flat, dtype=np.int64, count=2 * len(ids)).reshape(-1, 2)
    pieces, attributed = {}, False
    if turns or audit is not None:
        pieces, attributed = _locate_pieces(tokenizer, messages, turns, text, where)
    ends, expected = [], []
    if train_on == "all":
        if any(m.get("weight", 1) == 0 for m in messages):
            raise DataError(
                f"{where}: a message has weight 0 (context, not trained), but data.train_on=all trains every token; "
                f"set data.train_on=assistant to honour the weights, or remove them"
            )
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


def _supervised_turns(messages: list[dict], train_on: str, where: str) -> list[int]:
    """The assistant turns `train_on` selects among those the row trains: an assistant message with `"weight": 0`
    (OpenAI's fine-tuning format) is context only. `last_assistant` is the last trained turn."""
    trained = [i for i, m in enumerate(messages) if m["role"] == "assistant" and m.get("weight", 1)]
    if train_on == "last_assistant":
        selected = trained[-1:]
    elif train_on.startswith("after:"):  # the response of a pair or an unpaired example
        selected = [i for i in trained if i >= int(train_on.split(":")[1])]
    else:
        selected = trained
    if not selected:  # the formats refuse a row without an assistant turn: here every one has weight 0
        raise DataError(
            f"{where}: every assistant turn {'of the response ' if train_on.startswith('after:') else ''}has weight 0 "
            f"(context, not trained), so nothing of it is trained; give a turn weight 1, or remove the row"
        )
    return selected


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


def _render(tokenizer, messages: list[dict[str, str]], add_generation_prompt: bool, where: str) -> str:
    from transformers.utils.chat_template_utils import render_jinja_template

    if tokenizer.chat_template is None:
        raise DataError(f"{where}: {no_template_message(tokenizer)}")
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
