"""Preprocessing: the sources of a split, read, tokenized and written once to the memory-mapped store, then cached.

Rows are read in shards of `store.SHARD_ROWS`, tokenized by `data.num_proc` worker processes (`tokenize.py`) and
written as Arrow shards under `${cache_dir}/preprocessed/<key>/` (layout: `train/data/store.py`), the key hashing the
data files, the tokenizer and template, and every setting that changes the result. An interrupted run restarts from
its finished shards. With several training processes, the main one prepares and the others map the same files.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import logging
import shutil
import tempfile
import weakref
from collections.abc import Iterator
from pathlib import Path

from train.app.config import DataConfig
from train.data.formats import KIND_COLUMNS, KINDS, Text, parse_row
from train.data.sources import load_row, read_source
from train.data.stats import DatasetStats, MaskAudit
from train.data.store import SHARD_ROWS, TokenStore, TokenTable, build_folder, finish_folder, is_complete, read_stats
from train.data.templates import no_template_message
from train.data.tokenize import tokenize_rows
from train.errors import DataError

logger = logging.getLogger(__name__)


PIPELINE_VERSION = 7  # bump when tokenization changes, to invalidate caches


def read_shards(
    sources: list[str], settings: DataConfig, kind: str, tokenizer=None
) -> Iterator[list[tuple[str, object, int]]]:
    """The rows of every source, streamed in shards of SHARD_ROWS (where, row, source index). The first readable row
    of each source is checked against the loss's kind (and `tokenizer`'s chat template) first, so a wrong file is one
    clear error."""
    shard: list[tuple[str, object, int]] = []
    for index, source in enumerate(sources):
        checked, rows = False, 0
        for where, row in read_source(source):
            checked = checked or check_stage(where, row, settings, kind, tokenizer)
            shard.append((where, row, index))
            rows += 1
            if len(shard) == SHARD_ROWS:
                yield shard
                shard = []
        if not rows:
            raise DataError(f"{source}: no rows (the file is empty); give data in it, or leave it out of the list")
    if shard:
        yield shard


def check_stage(where: str, row: object, settings: DataConfig, kind: str, tokenizer=None) -> bool:
    """Refuse a source whose rows suit another loss (SFT rows given to DPO, or the reverse), or whose conversations
    `tokenizer` cannot render (no chat template: one error, not one per row). Returns whether the row could be
    checked (a malformed one cannot: data.on_bad_row decides about it, and the next row is checked)."""
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
    if tokenizer is not None and tokenizer.chat_template is None and not isinstance(record, Text):
        raise DataError(f"{where}: {no_template_message(tokenizer)}")
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
            read_shards(sources, settings, kind, tokenizer),
            tokenize,
            kind,
            settings.num_proc,
            must_stop=lambda report: stop_at_bad_row and report["skipped_bad_rows"] > 0,
        )
        counts = [f.name for f in dataclasses.fields(DatasetStats) if f.name not in ("mask_audit", "formats")]
        audit = MaskAudit.merged([r.get("mask_audit", {}) for r in reports])
        stats = DatasetStats(
            **{name: sum(r[name] for r in reports) for name in counts},
            mask_audit=dataclasses.asdict(audit),
            formats=_formats_by_file(reports, sources),
        )
        bad_rows = [r["first_bad_row"] for r in reports if r["first_bad_row"]]
        if bad_rows and stop_at_bad_row:
            more = stats.skipped_bad_rows - 1
            read = "" if finished else f" in the first {stats.rows} rows read"
            raise DataError(
                bad_rows[0]
                + (f" ({more} more bad rows{read}; data.on_bad_row=skip would skip and count them)" if more else "")
            )
        finish_folder(folder, dataclasses.asdict(stats))
        if bad_rows:
            logger.warning(f"skipped {stats.skipped_bad_rows} malformed rows, the first: {bad_rows[0]}")
        if cache_root:
            logger.info(f"cached preprocessed data in {folder}")
        table = TokenTable(folder, kind)
        if not cache_root:
            weakref.finalize(table, shutil.rmtree, root, True)
    return TokenStore(table), stats


def _formats_by_file(reports: list[dict], sources: list[str]) -> dict[str, dict[str, int]]:
    """The shard reports' rows per source index and format, summed and keyed by file."""
    total: dict[str, dict[str, int]] = {source: {} for source in sources}
    for report in reports:
        for index, counts in report.get("formats", {}).items():
            into = total[sources[int(index)]]
            for name, n in counts.items():
                into[name] = into.get(name, 0) + n
    return total


def load_examples(
    sources: list[str], tokenizer, settings: DataConfig, max_length: int, kind: str = "sft"
) -> tuple[TokenStore, DatasetStats]:
    """Tokenized examples of `sources` and their stats, without caching (for tests, previews and scripts)."""
    return preprocess(sources, tokenizer, settings, max_length, kind, None, contextlib.nullcontext)
