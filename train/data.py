"""Turning rows into training examples: render with the chat template, mask labels, truncate, cache.

Rows are read and parsed by `train/formats.py`. Each record is rendered with the tokenizer's chat template; the
assistant turns chosen by `data.train_on`, each with its end-of-turn token, are supervised, every other token gets
label -100. Assistant spans are located on the rendered text by rendering each conversation prefix, then verified:
the supervised tokens must decode to text containing the assistant's content. A template that cannot be split this
way is refused rather than trained on with a wrong mask.

Preprocessing streams: rows are read in shards of `store.SHARD_ROWS`, tokenized by `data.num_proc` worker processes
and written as Arrow shards under `${cache_dir}/preprocessed/<key>/` (layout: `train/store.py`), the key hashing
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

from train.config import Config, DataConfig
from train.errors import DataError
from train.formats import KIND_COLUMNS, KINDS, Conversation, Pair, Text, Unpaired, load_row, parse_row, read_source
from train.store import (
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

logger = logging.getLogger(__name__)

PIPELINE_VERSION = 5  # bump when tokenization changes, to invalidate caches


@dataclass
class DatasetStats:
    """What preprocessing did to the rows of one split, reported at the end of preprocessing and in summary.json."""

    rows: int = 0
    examples: int = 0
    truncated: int = 0
    dropped_no_supervised_token: int = 0
    dropped_too_long: int = 0
    skipped_bad_rows: int = 0

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


# ---- rendering and masking ----


def special_token_ids(tokenizer) -> set[int]:
    """Ids of every special token, including added ones such as Llama 3's <|eot_id|>."""
    added = {i for i, token in tokenizer.added_tokens_decoder.items() if token.special}
    return set(tokenizer.all_special_ids) | added


def tokenize_conversation(
    messages: list[dict[str, str]], tokenizer, where: str, train_on: str = "assistant"
) -> Example:
    """Render with the chat template and supervise assistant turns through their end-of-turn token.

    train_on: "assistant" (every assistant turn), "last_assistant", "all" (every token), or "after:<n>" (assistant
    turns from message n on: the response of a preference pair). Turns after the last assistant turn are dropped.
    """
    last_assistant = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    messages = messages[: last_assistant + 1]
    text = _render(tokenizer, messages, add_generation_prompt=False, where=where)
    turns = _supervised_turns(messages, train_on)
    spans = [_assistant_span(tokenizer, messages, i, text, where) for i in turns]

    encoded = tokenizer.backend_tokenizer.encode(text, add_special_tokens=False)
    ids = np.asarray(encoded.ids, dtype=np.int64)
    if train_on == "all":
        supervised = np.ones(len(ids), dtype=bool)
    else:
        # A token overlapping an assistant span is supervised, also one that straddles its start (" Arr" after a
        # template ending in "assistant:"): it is the token the model must produce there.
        flat = itertools.chain.from_iterable(encoded.offsets)  # (start, end) per token; fromiter: 2x asarray
        offsets = np.fromiter(flat, dtype=np.int64, count=2 * len(ids)).reshape(-1, 2)
        supervised = np.zeros(len(ids), dtype=bool)
        for span_start, span_end in spans:
            supervised |= (offsets[:, 0] < span_end) & (offsets[:, 1] > span_start)
    if not supervised.any():
        raise DataError(f"{where}: no token of the assistant turns could be located in the rendered conversation")
    input_ids, labels = ids.tolist(), np.where(supervised, ids, IGNORE_INDEX).tolist()
    last = int(np.flatnonzero(supervised)[-1])
    if input_ids[last] not in special_token_ids(tokenizer):
        # The template ends the last turn without an end-of-turn token: append EOS so the model learns to stop.
        input_ids = input_ids[: last + 1] + [tokenizer.eos_token_id]
        labels = labels[: last + 1] + [tokenizer.eos_token_id]
    _verify_supervised_text(tokenizer, input_ids, labels, [messages[i] for i in turns], where)
    return Example(input_ids=input_ids, labels=labels)


def _supervised_turns(messages: list[dict[str, str]], train_on: str) -> list[int]:
    assistant = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if train_on == "last_assistant":
        return assistant[-1:]
    if train_on.startswith("after:"):
        first = int(train_on.split(":")[1])
        return [i for i in assistant if i >= first]
    return assistant


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
        # rows are plain dicts of strings already, and this runs several times per row (tests/test_data.py checks
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


def _assistant_span(tokenizer, messages: list[dict[str, str]], index: int, text: str, where: str) -> tuple[int, int]:
    """Character span of assistant turn `index` in `text`: its content and end-of-turn marker, no trailing whitespace."""
    before = _render(tokenizer, messages[:index], add_generation_prompt=True, where=where)
    last = index == len(messages) - 1  # `text` is the rendering of these very messages: no need to render it again
    through = text if last else _render(tokenizer, messages[: index + 1], add_generation_prompt=False, where=where)
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


def _verify_supervised_text(tokenizer, input_ids: list[int], labels: list[int], turns, where: str) -> None:
    """The supervised tokens, decoded, must contain every supervised turn in order: the mask is checked, not assumed."""
    # The backend's own decode: the exact text of the tokens, without Python-side cleanup of spaces.
    supervised = tokenizer.backend_tokenizer.decode(
        [t for t, label in zip(input_ids, labels, strict=True) if label != IGNORE_INDEX], skip_special_tokens=False
    )
    position = 0
    for message in turns:
        found = supervised.find(message["content"].strip(), position)
        if found < 0:
            raise DataError(
                f"{where}: label mask check failed: the supervised tokens do not contain assistant content "
                f"{message['content'][:40]!r}; the tokenizer's offsets do not match its chat template"
            )
        position = found + len(message["content"].strip())


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
    for where, row, source in rows:
        try:
            record = parse_row(load_row(where, row), where, settings)
            if not isinstance(record, KINDS[kind]):
                raise DataError(
                    f"{where}: this loss trains on {KIND_COLUMNS[kind]} rows, but this row is "
                    f"{type(record).__name__.lower()} data; give data in the format the loss expects"
                )
            outcomes = _tokenize_record(record, tokenizer, settings, max_length, where, keep_first)
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
    return columns, report


def _tokenize_record(record, tokenizer, settings: DataConfig, max_length: int, where: str, keep_first: int) -> list:
    """[(column values, status)] for one record; text records may give several chunks."""
    if isinstance(record, Text):
        return [
            ({"input_ids": e.input_ids, "labels": e.labels}, dict(EMPTY_STATUS))
            for e in tokenize_text(record.text, tokenizer, max_length)
        ]
    if isinstance(record, Conversation):
        fitted = fit(
            tokenize_conversation(record.messages, tokenizer, where, settings.train_on),
            max_length,
            settings,
            where,
            keep_first,
        )
        return [_with_status(fitted, lambda e: {"input_ids": e.input_ids, "labels": e.labels})]
    if isinstance(record, Unpaired):
        after = f"after:{len(record.prompt)}"
        fitted = fit(
            tokenize_conversation(record.prompt + record.completion, tokenizer, where, after),
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
    return [_tokenize_pair(record, tokenizer, settings, max_length, where, keep_first)]


def _tokenize_pair(pair: Pair, tokenizer, settings: DataConfig, max_length: int, where: str, keep_first: int):
    """Both responses get the same prompt cut, so the policy compares them on the same context."""
    after = f"after:{len(pair.prompt)}"
    chosen = tokenize_conversation(pair.prompt + pair.chosen, tokenizer, where, after)
    rejected = tokenize_conversation(pair.prompt + pair.rejected, tokenizer, where, after)
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
        checked = False
        for where, row in read_source(source):
            checked = checked or check_stage(where, row, settings, kind)
            shard.append((where, row, index))
            if len(shard) == SHARD_ROWS:
                yield shard
                shard = []
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
                "packing", "group_by_length"):  # fmt: skip
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
        stats = DatasetStats(**{f.name: sum(r[f.name] for r in reports) for f in dataclasses.fields(DatasetStats)})
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
    train = mix(train, len(cfg.datasets), cfg.data.dataset_samples, cfg.seed)
    evaluation, eval_stats = None, None
    if cfg.eval_datasets:
        evaluation, eval_stats = prepare(cfg.eval_datasets)
    elif cfg.data.eval_split_ratio > 0:
        train, evaluation = split_off_eval(train, cfg.data.eval_split_ratio, cfg.seed)
    if cfg.data.n_examples is not None and cfg.data.n_examples < len(train):
        train = train.select(np.random.default_rng(cfg.seed).permutation(len(train))[: cfg.data.n_examples])
    if len(train) == 0:
        raise DataError(f"no training examples left: {train_stats.describe('train', cfg.model.max_length)}")

    train_stats.examples = len(train)
    unit = "pairs" if kind == "paired" else "examples"
    logger.info(train_stats.describe("train", cfg.model.max_length, unit))
    stats = {"train": dataclasses.asdict(train_stats)}
    if cfg.data.packing:
        with main_process_first():  # the main process computes and caches the plan; the others read it
            train = pack(train, cfg.model.max_length)
        efficiency = train.efficiency(cfg.model.max_length)
        stats["train"]["packed_rows"], stats["train"]["packing_efficiency"] = len(train), efficiency
        logger.info(
            f"packed {train_stats.examples} examples into {len(train)} rows of up to "
            f"{packed_row_tokens(kind, cfg.model.max_length)} tokens: "
            f"efficiency {efficiency:.1%} (real tokens / slots)"
        )
    if eval_stats is not None:
        eval_stats.examples = len(evaluation)
        logger.info(eval_stats.describe("eval", cfg.model.max_length, unit))
        stats["eval"] = dataclasses.asdict(eval_stats)
    elif evaluation is not None:
        logger.info(f"eval: {len(evaluation)} examples held out of the training data (data.eval_split_ratio)")
    return train, evaluation, stats


def pack_examples(examples: list[Example], max_length: int) -> list[PackedExample]:
    """Best-fit-decreasing packing (`store.pack_plan`) of examples held in memory (tests, benchmarks)."""
    members, row_starts = pack_plan(np.array([len(e.input_ids) for e in examples], dtype=np.int64), max_length)
    return [
        concatenate([examples[i] for i in members[start:end]]) for start, end in itertools.pairwise(row_starts.tolist())
    ]


def packing_efficiency(rows: list[PackedExample], max_length: int) -> float:
    """Real tokens / slots of the packed rows."""
    return sum(len(r.input_ids) for r in rows) / (len(rows) * max_length) if rows else 0.0


def collate_packed(rows: list[PackedExample], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Packed rows padded to the longest, with position_ids restarting at 0 for every example and no attention mask:
    transformers then builds a block-diagonal causal mask (eager, sdpa) or varlen indices (flash-attention).
    The padding tail forms a segment of its own with label -100. `segment_lengths` lists the real examples."""
    batch = collate(rows, pad_token_id)
    del batch["attention_mask"]  # restarting position_ids without a mask is what keeps the examples apart
    longest = batch["input_ids"].shape[1]
    batch["position_ids"] = torch.zeros_like(batch["input_ids"])
    batch["example_ids"] = torch.full_like(batch["input_ids"], -1)  # -1: padding
    next_id = 0
    for index, row in enumerate(rows):
        segments = [*row.lengths, longest - len(row.input_ids)]
        batch["position_ids"][index] = torch.cat([torch.arange(length) for length in segments if length])
        for start, end in itertools.pairwise([0, *itertools.accumulate(row.lengths)]):
            batch["example_ids"][index, start:end] = next_id
            next_id += 1
    batch["segment_lengths"] = torch.tensor([length for row in rows for length in row.lengths])
    return batch


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
