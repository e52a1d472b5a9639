"""Turning rows into training examples: render with the chat template, mask labels, truncate, cache.

Rows are read and parsed by `train/formats.py`. Each record is rendered with the tokenizer's chat template; the
assistant turns chosen by `data.train_on`, each with its end-of-turn token, are supervised, every other token gets
label -100. Assistant spans are located on the rendered text by rendering each conversation prefix, then verified:
the supervised tokens must decode to text containing the assistant's content. A template that cannot be split this
way is refused rather than trained on with a wrong mask.

Tokenization runs through `datasets.map(batched=True, num_proc=data.num_proc)` and is cached on disk under
`${cache_dir}/preprocessed/<key>/`, the key hashing the data files, the tokenizer and template, and every setting
that changes the result. With several processes, the main one prepares and the others load.
"""

from __future__ import annotations

import bisect
import dataclasses
import functools
import hashlib
import itertools
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from train.config import Config, DataConfig
from train.errors import DataError
from train.formats import KIND_COLUMNS, KINDS, Conversation, Pair, Text, Unpaired, parse_row, read_source

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
PIPELINE_VERSION = 3  # bump when tokenization changes, to invalidate caches


@dataclass
class Example:
    """One tokenized example, both lists of equal length.

    `labels[i]` is `input_ids[i]` where token i is supervised (predicted from the tokens before it) and -100
    elsewhere, the Hugging Face convention: the loss shifts by one.
    """

    input_ids: list[int]
    labels: list[int]


@dataclass
class PackedExample:
    """Several examples concatenated into one row: `lengths` gives each one's token count, in order.

    Each example's first label is -100 (nothing of its own precedes it), and attention never crosses from one
    example into another (position_ids restart at 0 per example; see `collate_packed`).
    """

    input_ids: list[int]
    labels: list[int]
    lengths: list[int]


@dataclass
class PairExample:
    """A preference pair: the same prompt with the chosen and with the rejected response."""

    chosen: Example
    rejected: Example
    # Summed log-probs of each response under the reference model, when precomputed (reference.precompute=true).
    reference_chosen: float | None = None
    reference_rejected: float | None = None


@dataclass
class UnpairedExample:
    example: Example
    desirable: bool


def token_sequences(item) -> list:
    """The token sequences (objects with input_ids and labels) inside any example type, in a fixed order."""
    if isinstance(item, PairExample):
        return [item.chosen, item.rejected]
    if isinstance(item, UnpairedExample):
        return [item.example]
    return [item]  # Example, PackedExample


@dataclass
class DatasetStats:
    """What preprocessing did to the rows of one split, reported at the end of preprocessing and in summary.json."""

    rows: int = 0
    examples: int = 0
    truncated: int = 0
    dropped_no_supervised_token: int = 0
    dropped_too_long: int = 0
    skipped_bad_rows: int = 0

    def describe(self, split: str, max_length: int) -> str:
        text = f"{split}: {self.examples} examples from {self.rows} rows"
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

    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    input_ids = list(encoded["input_ids"])
    if train_on == "all":
        labels = list(input_ids)
    else:
        labels = [IGNORE_INDEX] * len(input_ids)
        for token_index, (start, end) in enumerate(encoded["offset_mapping"]):
            # A token overlapping an assistant span is supervised, also one that straddles its start (" Arr" after a
            # template ending in "assistant:"): it is the token the model must produce there.
            if any(start < span_end and end > span_start for span_start, span_end in spans):
                labels[token_index] = input_ids[token_index]

    supervised = [i for i, label in enumerate(labels) if label != IGNORE_INDEX]
    if not supervised:
        raise DataError(f"{where}: no token of the assistant turns could be located in the rendered conversation")
    last = supervised[-1]
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
    if tokenizer.chat_template is None:
        raise DataError(
            f"{where}: the tokenizer has no chat template, so conversations cannot be rendered; set "
            f"model.tokenizer_name_or_path to a tokenizer that has one (plain `text` rows need none)"
        )
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


def _verify_supervised_text(tokenizer, input_ids: list[int], labels: list[int], turns, where: str) -> None:
    """The supervised tokens, decoded, must contain every supervised turn in order: the mask is checked, not assumed."""
    supervised = tokenizer.decode([t for t, label in zip(input_ids, labels, strict=True) if label != IGNORE_INDEX])
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


# ---- the datasets.map function ----

EMPTY_STATUS = {"_error": "", "_truncated": False, "_dropped_empty": False, "_dropped_long": False}


def preprocess_batch(
    batch: dict[str, list], *, tokenizer, settings: DataConfig, max_length: int, kind: str
) -> dict[str, list]:
    """Tokenize a batch of raw rows (JSON strings with their `where`). Never raises: problems become status columns,
    so that errors and skips are counted after the (possibly multi-process) map."""
    out: dict[str, list] = {name: [] for name in (*columns_of(kind), *EMPTY_STATUS, "_source")}
    keep_first = 1 if tokenizer.bos_token_id is not None else 0
    for where, raw, source in zip(batch["_where"], batch["_row"], batch["_source"], strict=True):
        try:
            if raw.startswith("!"):  # a row the reader could not parse: its message follows
                raise DataError(raw[1:])
            record = parse_row(json.loads(raw), where, settings)
            if not isinstance(record, KINDS[kind]):
                raise DataError(
                    f"{where}: this loss trains on {KIND_COLUMNS[kind]} rows, but this row is "
                    f"{type(record).__name__.lower()} data; give data in the format the loss expects"
                )
            rows = _tokenize_record(record, tokenizer, settings, max_length, where, keep_first)
        except DataError as error:
            rows = [({}, {**EMPTY_STATUS, "_error": str(error)})]
        for values, status in rows:
            for name in columns_of(kind):
                out[name].append(values.get(name, [] if name != "desirable" else False))
            for name, value in status.items():
                out[name].append(value)
            out["_source"].append(source)
    return out


def columns_of(kind: str) -> tuple[str, ...]:
    return {
        "sft": ("input_ids", "labels"),
        "text": ("input_ids", "labels"),
        "paired": ("chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels"),
        "unpaired": ("input_ids", "labels", "desirable"),
    }[kind]


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
    }
    return values, {**EMPTY_STATUS, "_truncated": any(f.truncated for f in fitted)}


def _with_status(fitted: Fitted, to_values) -> tuple[dict, dict]:
    if fitted.example is None:
        return {}, {**EMPTY_STATUS, "_dropped_long": True}
    if not has_supervised_token(fitted.example):
        return {}, {**EMPTY_STATUS, "_dropped_empty": True, "_truncated": fitted.truncated}
    return to_values(fitted.example), {**EMPTY_STATUS, "_truncated": fitted.truncated}


# ---- loading, caching, mixing ----


def raw_rows(sources: list[str]) -> dict[str, list]:
    """Every row of every source as a JSON string, with where it came from (rows the reader could not parse are
    kept as '!<message>', so the bad-row policy handles them like any other bad row)."""
    columns: dict[str, list] = {"_where": [], "_row": [], "_source": []}
    for index, source in enumerate(sources):
        for where, row in read_source(source):
            columns["_where"].append(where)
            columns["_row"].append(row if isinstance(row, str) else json.dumps(row, default=str))
            columns["_source"].append(index)
    return columns


def check_stage(rows: dict[str, list], settings: DataConfig, kind: str) -> None:
    """The first row of each source must suit the loss: SFT rows given to DPO (or the reverse) is one clear error."""
    seen = set()
    for where, raw, source in zip(rows["_where"], rows["_row"], rows["_source"], strict=True):
        if source in seen or raw.startswith("!"):
            continue
        seen.add(source)
        try:
            record = parse_row(json.loads(raw), where, settings)
        except DataError:
            continue  # a malformed row: data.on_bad_row decides
        if not isinstance(record, KINDS[kind]):
            columns = ", ".join(sorted(json.loads(raw)))
            raise DataError(
                f"{where}: this loss trains on {KIND_COLUMNS[kind]} rows, but this file holds "
                f"{type(record).__name__.lower()} rows (columns: {columns}); choose the loss that fits the data, "
                f"or give data with the columns this loss expects"
            )


def cache_key(sources: list[str], tokenizer, settings: DataConfig, max_length: int, kind: str) -> str:
    """Hash of everything that changes the tokenized result: data bytes, tokenizer, template and settings."""
    digest = hashlib.sha256()
    relevant = dataclasses.asdict(settings)
    for key in ("num_proc", "cache_preprocessing", "dataset_samples", "eval_split_ratio", "n_examples"):
        relevant.pop(key)  # these do not change how a row is tokenized
    digest.update(
        json.dumps({"v": PIPELINE_VERSION, "settings": relevant, "max_length": max_length, "kind": kind}).encode()
    )
    digest.update(tokenizer.backend_tokenizer.to_str().encode())
    digest.update(json.dumps([tokenizer.chat_template, tokenizer.bos_token, tokenizer.eos_token]).encode())
    for source in sources:
        digest.update(source.encode())
        for file in sorted(Path(source).rglob("*")) if Path(source).is_dir() else [Path(source)]:
            if file.is_file():
                digest.update(_file_digest(file))
    return digest.hexdigest()[:20]


@functools.lru_cache(maxsize=64)
def _file_digest(path: Path) -> bytes:
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
):
    """The tokenized dataset of `sources` (a datasets.Dataset) and its stats, from the cache when inputs match."""
    import datasets

    key = cache_key(sources, tokenizer, settings, max_length, kind) if cache_root else None
    folder = cache_root / key if cache_root else None
    with main_process_first():
        if folder and (folder / "stats.json").exists():
            logger.info(f"reusing preprocessed data cached in {folder}")
            return datasets.load_from_disk(str(folder / "data")), DatasetStats(
                **json.loads((folder / "stats.json").read_text())
            )
        rows = raw_rows(sources)
        check_stage(rows, settings, kind)
        raw = datasets.Dataset.from_dict(rows)
        mapper = functools.partial(
            preprocess_batch, tokenizer=tokenizer, settings=settings, max_length=max_length, kind=kind
        )
        num_proc = settings.num_proc if settings.num_proc > 1 and len(raw) >= 2 * settings.num_proc else None
        mapped = raw.map(
            mapper, batched=True, batch_size=256, num_proc=num_proc, remove_columns=raw.column_names, desc="tokenizing"
        )
        dataset, stats = _apply_statuses(mapped, len(raw), settings)
        if folder:
            _save_atomically(dataset, stats, folder)
        return dataset, stats


def _apply_statuses(mapped, n_rows: int, settings: DataConfig):
    errors = [e for e in mapped["_error"] if e]
    if errors and settings.on_bad_row == "error":
        more = (
            f" ({len(errors) - 1} more bad rows; data.on_bad_row=skip would skip and count them)"
            if len(errors) > 1
            else ""
        )
        raise DataError(errors[0] + more)
    stats = DatasetStats(
        rows=n_rows,
        truncated=sum(mapped["_truncated"]),
        dropped_no_supervised_token=sum(mapped["_dropped_empty"]),
        dropped_too_long=sum(mapped["_dropped_long"]),
        skipped_bad_rows=len(errors),
    )
    keep = [
        i
        for i, (e, a, b) in enumerate(
            zip(mapped["_error"], mapped["_dropped_empty"], mapped["_dropped_long"], strict=True)
        )
        if not (e or a or b)
    ]
    dataset = mapped.select(keep).remove_columns(list(EMPTY_STATUS))
    stats.examples = len(dataset)
    if errors:
        logger.warning(f"skipped {len(errors)} malformed rows, the first: {errors[0]}")
    return dataset, stats


def _save_atomically(dataset, stats: DatasetStats, folder: Path) -> None:
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    dataset.save_to_disk(str(partial / "data"))
    (partial / "stats.json").write_text(json.dumps(dataclasses.asdict(stats)))
    shutil.rmtree(folder, ignore_errors=True)
    partial.rename(folder)
    logger.info(f"cached preprocessed data in {folder}")


def mix(dataset, n_sources: int, samples: list[float], seed: int):
    """Per-source sampling: a count (>= 1; repeats the data when larger than the source) or a fraction (< 1)."""
    if not samples:
        return dataset
    generator = torch.Generator().manual_seed(seed)
    sources = dataset["_source"]
    chosen: list[int] = []
    for source in range(n_sources):
        indices = [i for i, s in enumerate(sources) if s == source]
        want = round(samples[source] * len(indices)) if samples[source] < 1 else int(samples[source])
        order = [indices[j] for j in torch.randperm(len(indices), generator=generator).tolist()]
        chosen += (order * (want // max(len(order), 1) + 1))[:want]
    return dataset.select(chosen)


def load_examples(sources: list[str], tokenizer, settings: DataConfig, max_length: int, kind: str = "sft"):
    """Tokenized examples of `sources` and their stats, without caching (for tests, previews and scripts)."""
    import contextlib

    dataset, stats = preprocess(sources, tokenizer, settings, max_length, kind, None, contextlib.nullcontext)
    return to_examples(dataset, kind), stats


def to_examples(dataset, kind: str) -> list:
    if kind == "paired":
        columns = [dataset[c] for c in columns_of(kind)]
        return [PairExample(Example(ci, cl), Example(ri, rl)) for ci, cl, ri, rl in zip(*columns, strict=True)]
    examples = [Example(ids, labels) for ids, labels in zip(dataset["input_ids"], dataset["labels"], strict=True)]
    if kind == "unpaired":
        return [UnpairedExample(e, d) for e, d in zip(examples, dataset["desirable"], strict=True)]
    return examples


def build_datasets(
    cfg: Config, tokenizer, kind: str = "sft", main_process_first=None
) -> tuple[list, list, dict[str, dict]]:
    """Training and evaluation examples for a trainer consuming `kind` data, and what preprocessing did to each."""
    import contextlib

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
        split = train.train_test_split(test_size=cfg.data.eval_split_ratio, seed=cfg.seed)
        train, evaluation = split["train"], split["test"]
    if cfg.data.n_examples is not None and cfg.data.n_examples < len(train):
        train = train.shuffle(seed=cfg.seed).select(range(cfg.data.n_examples))
    if len(train) == 0:
        raise DataError(f"no training examples left: {train_stats.describe('train', cfg.model.max_length)}")

    train_stats.examples = len(train)
    logger.info(train_stats.describe("train", cfg.model.max_length))
    stats = {"train": dataclasses.asdict(train_stats)}
    train_examples = to_examples(train, kind)
    if cfg.data.packing:
        train_examples = pack_examples(train_examples, cfg.model.max_length)
        efficiency = packing_efficiency(train_examples, cfg.model.max_length)
        stats["train"]["packed_rows"], stats["train"]["packing_efficiency"] = len(train_examples), efficiency
        logger.info(
            f"packed {train_stats.examples} examples into {len(train_examples)} rows of up to {cfg.model.max_length} tokens: efficiency {efficiency:.1%} (real tokens / slots)"
        )
    if eval_stats is not None:
        eval_stats.examples = len(evaluation)
        logger.info(eval_stats.describe("eval", cfg.model.max_length))
        stats["eval"] = dataclasses.asdict(eval_stats)
    elif evaluation is not None:
        logger.info(f"eval: {len(evaluation)} examples held out of the training data (data.eval_split_ratio)")
    return train_examples, to_examples(evaluation, kind) if evaluation is not None else [], stats


def pack_examples(examples: list[Example], max_length: int) -> list[PackedExample]:
    """Best-fit-decreasing bin packing over the whole dataset into rows of at most `max_length` tokens.

    Longest first, each example goes into the open row with the least room that still fits it (a new row if none),
    which leaves rows nearly full. Deterministic; the trainer shuffles the order of the rows every epoch.
    """
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i].input_ids))
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, row index), sorted
    for index in order:
        length = len(examples[index].input_ids)
        slot = bisect.bisect_left(free, (length, -1))
        if slot < len(free):
            room, row = free.pop(slot)
        else:
            room, row = max_length, len(rows)
            rows.append([])
        rows[row].append(index)
        if room - length > 0:
            bisect.insort(free, (room - length, row))
    return [_concatenate([examples[i] for i in row]) for row in rows]


def _concatenate(examples: list[Example]) -> PackedExample:
    input_ids, labels = [], []
    for example in examples:
        input_ids += example.input_ids
        labels += [IGNORE_INDEX, *example.labels[1:]]  # the first token is not predicted from the previous example
    return PackedExample(input_ids, labels, [len(e.input_ids) for e in examples])


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
