"""The training and evaluation data of a run: each split preprocessed (`preprocess.py`), the eval split held out,
sources mixed, the count capped, the rows packed. What a process holds of the data is index arrays: the mix, the eval
split and the cap select rows of the memory-mapped shards, and packing is a plan over their lengths."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import math
from pathlib import Path

import numpy as np
import torch

from train.app.config import Config
from train.batching.layout import Layout
from train.data.preprocess import preprocess
from train.data.stats import log_mask_audit
from train.data.store import PackedStore, TokenStore, pack, packed_row_tokens
from train.errors import DataError

logger = logging.getLogger(__name__)


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


def build_datasets(
    cfg: Config, tokenizer, kind: str = "sft", main_process_first=None, layout: Layout = Layout.PADDED
) -> tuple[TokenStore | PackedStore, TokenStore | None, dict[str, dict]]:
    """Training and evaluation data for a trainer consuming `kind` data (views of the memory-mapped cache) in the batch
    `layout` (train/batching/layout.py: packed, the training data is packed; evaluation data never is), and what
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
    for line in train_stats.describe_formats("train"):
        logger.info(line)
    log_mask_audit(train_stats, "train", cfg.data.train_on)
    stats = {"train": dataclasses.asdict(train_stats)}
    if layout is Layout.PACKED:
        with main_process_first():  # the main process computes and caches the plan; the others read it
            train = pack(train, cfg.model.max_length)
        efficiency = train.efficiency(cfg.model.max_length)
        stats["train"]["packed_rows"], stats["train"]["packing_efficiency"] = len(train), efficiency
        logger.info(
            f"packed {train_stats.examples} {unit} into {len(train)} rows of up to "
            f"{packed_row_tokens(kind, cfg.model.max_length)} tokens: "
            f"efficiency {efficiency:.1%} (real tokens / slots)"
        )
    else:
        train = train.with_layout(layout)
    if evaluation is not None:
        evaluation = evaluation.with_layout(layout.for_evaluation)
    if eval_stats is not None:
        eval_stats.examples = len(evaluation)
        logger.info(eval_stats.describe("eval", cfg.model.max_length, unit))
        for line in eval_stats.describe_formats("eval"):
            logger.info(line)
        stats["eval"] = dataclasses.asdict(eval_stats)
    elif evaluation is not None:
        logger.info(f"eval: {len(evaluation)} {unit} held out of the training data (data.eval_split_ratio)")
    return train, evaluation, stats
