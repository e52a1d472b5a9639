"""Packing examples held in memory, for tests: production packs the memory-mapped store (`store.pack`)."""

from __future__ import annotations

import itertools

import numpy as np

from train.data.store import Example, PackedExample, concatenate, pack_plan


def pack_examples(examples: list[Example], max_length: int) -> list[PackedExample]:
    """Best-fit-decreasing packing (`store.pack_plan`) of examples held in memory (tests, benchmarks)."""
    members, row_starts = pack_plan(np.array([len(e.input_ids) for e in examples], dtype=np.int64), max_length)
    return [
        concatenate([examples[i] for i in members[start:end]]) for start, end in itertools.pairwise(row_starts.tolist())
    ]


def packing_efficiency(rows: list[PackedExample], max_length: int) -> float:
    """Real tokens / slots of the packed rows."""
    return sum(len(r.input_ids) for r in rows) / (len(rows) * max_length) if rows else 0.0
