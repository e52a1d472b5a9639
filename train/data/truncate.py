"""Fitting an example into model.max_length, per data.truncation: cut the prompt from the left first (keeping BOS),
then the end of the response; or drop the example, or refuse it."""

from __future__ import annotations

from dataclasses import dataclass

from train.app.config import DataConfig
from train.data.store import IGNORE_INDEX, Example
from train.errors import DataError


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
