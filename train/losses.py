"""Losses as pure functions: tensors in, a loss out. No config objects; trainers pass settings in.

Each loss returns a `LossSum`: the sum of per-unit losses (tokens for SFT) and the number of units, so the trainer
can divide by the number of units in the whole optimizer step, over every micro-batch and process.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


@dataclass
class LossSum:
    total: torch.Tensor  # () float32: sum of the per-unit losses
    count: torch.Tensor  # () int64: number of units summed


def count_supervised_tokens(labels: torch.Tensor) -> torch.Tensor:
    """labels: (batch, seq) with -100 on unsupervised tokens. Returns () int64: tokens the model is trained to predict.

    The first token of a row is never predicted (nothing precedes it), so only labels[:, 1:] count.
    """
    return (labels[:, 1:] != IGNORE_INDEX).sum()


def masked_nll_sum(logits: torch.Tensor, labels: torch.Tensor) -> LossSum:
    """Summed negative log-likelihood of the supervised tokens.

    logits: (batch, seq, vocab), any float dtype; position t predicts token t + 1.
    labels: (batch, seq) int64, the token ids, -100 where not supervised.
    Only the supervised positions are upcast to float32 for the log-softmax: the full-vocabulary float32 logits of
    every position would dominate peak memory.
    """
    targets = labels[:, 1:]
    supervised = targets != IGNORE_INDEX
    picked_logits = logits[:, :-1][supervised].float()  # (n_supervised, vocab)
    total = F.cross_entropy(picked_logits, targets[supervised], reduction="sum")
    return LossSum(total=total, count=supervised.sum())
