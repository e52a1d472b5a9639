"""Sequences of a preference batch (train/batching/sequences.py): how many each layout holds, and their summed
log-probs in the same order whether the batch is padded or packed, against hand-derived values."""

import math
from types import SimpleNamespace

import pytest
import torch

from train.batching.collate import Batch, collate, collate_packed
from train.batching.layout import Layout
from train.batching.sequences import forward_sequence_logps, n_sequences
from train.data.store import IGNORE_INDEX, Example, concatenate

VOCAB = 8


def test_each_layout_counts_its_sequences():
    ids = torch.zeros(3, 5, dtype=torch.long)
    assert n_sequences(Batch({"input_ids": ids}, Layout.PADDED)) == 3  # one per row
    example_ids = torch.tensor([[0, 0, 1, 1, -1], [2, 2, 2, 3, 3], [4, -1, -1, -1, -1]])
    assert n_sequences(Batch({"input_ids": ids, "example_ids": example_ids}, Layout.PACKED)) == 5
    assert n_sequences(Batch({"input_ids": ids}, Layout.SHARED_PROMPT)) == 6  # chosen and rejected per row


def uniform_model(**inputs):
    """Equal logits for every token: each supervised token's log-prob is -log(VOCAB)."""
    keep = inputs["logits_to_keep"]
    return SimpleNamespace(logits=torch.zeros(int(keep.sum()), VOCAB))


def test_summed_log_probs_are_the_same_padded_and_packed():
    examples = [
        Example([1, 2, 3, 4], [IGNORE_INDEX, IGNORE_INDEX, 3, 4]),  # 2 supervised tokens
        Example([5, 6, 7], [IGNORE_INDEX, IGNORE_INDEX, 7]),  # 1
        Example([1, 2, 3, 4, 5], [IGNORE_INDEX, 2, 3, 4, 5]),  # 4
    ]
    padded = forward_sequence_logps(uniform_model, collate(examples, pad_token_id=0))
    packed = forward_sequence_logps(
        uniform_model, collate_packed([concatenate(examples[:2]), concatenate(examples[2:])], pad_token_id=0)
    )
    for sums, counts in (padded, packed):
        assert counts.tolist() == [2, 1, 4]
        assert sums.tolist() == pytest.approx([-2 * math.log(VOCAB), -math.log(VOCAB), -4 * math.log(VOCAB)])
