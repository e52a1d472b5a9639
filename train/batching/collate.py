"""Collation: the tensors of one micro-batch, for every batch layout (train/batching/layout.py: padded rows, packed
rows, shared-prompt rows), on the CPU, in a data loader worker. The only module that builds a batch: each function
returns a `Batch` that names its layout."""

from __future__ import annotations

import itertools

import torch

from train.batching.layout import Layout
from train.data.store import IGNORE_INDEX, Example, PackedExample, PairExample, concatenate

ROW_KEYS = ("input_ids", "attention_mask", "labels", "position_ids", "example_ids")  # (rows, seq): padded, packed


class Batch(dict):
    """One collated micro-batch: name -> tensor (each layout's keys are listed by its collate function below), and the
    layout it was collated in, which the code that reads it goes by (never by which keys are present)."""

    def __init__(self, tensors: dict[str, torch.Tensor], layout: Layout) -> None:
        super().__init__(tensors)
        self.layout = layout

    def to(self, device: torch.device | str) -> Batch:
        """The same batch on `device` (a dict comprehension would lose the layout)."""
        return Batch({key: value.to(device) for key, value in self.items()}, self.layout)

    def rows(self, rows: slice) -> Batch:
        """The padded or packed batch cut to `rows`: its (rows, seq) tensors sliced, its other tensors as they are."""
        return Batch({key: value[rows] if key in ROW_KEYS else value for key, value in self.items()}, self.layout)

    @property
    def example_ids(self) -> torch.Tensor | None:
        """(rows, seq) int64, the sequence each token of a packed batch belongs to (-1: padding); None when each row is
        one sequence (padded). Shared-prompt rows number theirs by `target_sequences`."""
        return self["example_ids"] if self.layout is Layout.PACKED else None


def collate_batch(items: list, layout: Layout, pad_token_id: int) -> Batch:
    """The micro-batch of `items` in `layout`: examples padded to the longest (Example), packed rows (PackedExample),
    or pairs with each prompt once (PairExample)."""
    match layout:
        case Layout.PADDED:
            return collate(items, pad_token_id)
        case Layout.PACKED:
            return collate_packed(items, pad_token_id)
        case Layout.SHARED_PROMPT:
            return collate_shared_prompt(items, pad_token_id)


def collate_packed(rows: list[PackedExample], pad_token_id: int) -> Batch:
    """Packed rows padded to the longest, with position_ids restarting at 0 for every example and no attention mask:
    transformers then builds a block-diagonal causal mask (eager, sdpa) or varlen indices (flash-attention).
    The padding tail forms a segment of its own with label -100. `example_ids` (rows, longest) numbers the examples
    of the micro-batch in order (-1: padding); `segment_lengths` lists the real examples' lengths."""
    batch = Batch(collate(rows, pad_token_id), Layout.PACKED)
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


def collate(examples: list[Example], pad_token_id: int) -> Batch:
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
    return Batch({"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}, Layout.PADDED)


def collate_shared_prompt(pairs: list[PairExample], pad_token_id: int) -> Batch:
    """Each pair as one row `shared prefix, chosen rest, rejected rest`, padded on the right. The shared prefix is
    the tokens both sequences start with, up to the first supervised token of either (the prompt, as a rule; less
    when, say, unsupervised reasoning opens one response). position_ids continue from the prefix into each rest,
    and attention_mask (pairs, 1, L, L) bool (True: may attend) is causal except that the rejected rest does not
    see the chosen one, so each sequence sees exactly what it would alone.

    Also: labels (pairs, L), each token where supervised (for counting); keep (pairs, L) bool, the positions whose
    logits are needed; and per supervised token, flat (targets,): `logit_rows` (its row among the kept logits; the
    prefix's last position serves both sequences), `targets` (its id) and `target_sequences` (pair j's chosen: j,
    its rejected: pairs + j); segment_lengths (2 x pairs): the tokens of the chosen sequence and of the rejected
    rest."""
    n = len(pairs)
    shared = [_shared_prefix_length(p) for p in pairs]
    longest = max(len(p.chosen.input_ids) + len(p.rejected.input_ids) - k for p, k in zip(pairs, shared, strict=True))
    input_ids = torch.full((n, longest), pad_token_id, dtype=torch.long)
    labels = torch.full((n, longest), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((n, longest), dtype=torch.long)
    mask = torch.eye(longest, dtype=torch.bool).repeat(n, 1, 1, 1)  # padding attends to itself only
    predictions = []  # (row, position, target, sequence)
    segments = [0] * (2 * n)
    for row, (pair, prefix) in enumerate(zip(pairs, shared, strict=True)):
        chosen, rejected = pair.chosen, pair.rejected
        c, r = len(chosen.input_ids), len(rejected.input_ids) - prefix  # the chosen sequence, the rejected rest
        input_ids[row, : c + r] = torch.tensor(chosen.input_ids + rejected.input_ids[prefix:])
        labels[row, :c] = torch.tensor(chosen.labels)
        labels[row, c : c + r] = torch.tensor(rejected.labels[prefix:])
        position_ids[row, : c + r] = torch.cat([torch.arange(c), torch.arange(prefix, prefix + r)])
        mask[row, 0, : c + r, : c + r] = torch.ones(c + r, c + r, dtype=torch.bool).tril()
        mask[row, 0, c : c + r, prefix:c] = False  # the rejected rest does not see the chosen rest
        for sequence, example, shift in ((row, chosen, 0), (n + row, rejected, c - prefix)):
            for t in range(len(example.labels) - 1):  # position t of the sequence predicts its token t + 1
                if example.labels[t + 1] != IGNORE_INDEX:
                    predictions.append((row, t if t < prefix else t + shift, example.labels[t + 1], sequence))
        segments[row], segments[n + row] = c, r
    keep = torch.zeros((n, longest), dtype=torch.bool)
    rows, positions, targets, sequences = (torch.tensor(column) for column in zip(*predictions, strict=True))
    keep[rows, positions] = True
    kept_index = keep.flatten().cumsum(0) - 1  # row-major order of the kept positions, as the logits come
    return Batch({
        "input_ids": input_ids, "labels": labels, "position_ids": position_ids, "attention_mask": mask,
        "keep": keep, "logit_rows": kept_index[rows * longest + positions], "targets": targets,
        "target_sequences": sequences, "segment_lengths": torch.tensor(segments),
    }, Layout.SHARED_PROMPT)  # fmt: skip


def _shared_prefix_length(pair: PairExample) -> int:
    """Tokens both sequences of a pair start with, before the first supervised token of either."""
    limit = min(prompt_length(pair.chosen), prompt_length(pair.rejected))
    chosen, rejected = pair.chosen.input_ids, pair.rejected.input_ids
    return next((i for i in range(limit) if chosen[i] != rejected[i]), limit)


def collate_sequences(rows: list[list[Example]], order: list[int], pad_token_id: int) -> Batch:
    """Sequences packed row by row (position_ids restarting per sequence, see `collate_packed`), numbered in
    `example_ids` so that the sequence at flat position k of `rows` is sequence `order[k]`: the numbering an unpacked
    batch of the same sequences would give its rows."""
    batch = collate_packed([concatenate(row) for row in rows], pad_token_id)
    numbering = torch.tensor([*order, -1])  # index -1 (padding) maps to -1
    batch["example_ids"] = numbering[batch["example_ids"]]
    return batch


def prompt_length(example: Example) -> int:
    """Tokens before the first supervised one: the prompt, as a rule."""
    return next(i for i, label in enumerate(example.labels) if label != IGNORE_INDEX)
