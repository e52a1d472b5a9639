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


def count_loss_units(labels: torch.Tensor, reduction: str) -> torch.Tensor:
    """labels: (batch, seq) with -100 on unsupervised tokens. Returns () int64: what `masked_nll_sum` averages over.

    token: supervised tokens. sequence: rows with at least one supervised token. The first token of a row is never
    predicted (nothing precedes it), so only labels[:, 1:] count.
    """
    supervised = labels[:, 1:] != IGNORE_INDEX
    return supervised.sum() if reduction == "token" else supervised.any(dim=1).sum()


def masked_nll_sum(logits: torch.Tensor, labels: torch.Tensor, reduction: str = "token") -> LossSum:
    """Summed negative log-likelihood of the supervised tokens.

    logits: (batch, seq, vocab), any float dtype; position t predicts token t + 1.
    labels: (batch, seq) int64, the token ids, -100 where not supervised.
    reduction: "token" sums token NLLs (count: supervised tokens), so every token weighs the same;
      "sequence" sums each row's mean token NLL (count: rows), so every example weighs the same, however long.
    Only the supervised positions are upcast to float32 for the log-softmax: the full-vocabulary float32 logits of
    every position would dominate peak memory.
    """
    targets = labels[:, 1:]
    supervised = targets != IGNORE_INDEX
    token_nll = torch.zeros(supervised.shape, dtype=torch.float32, device=logits.device)
    token_nll[supervised] = F.cross_entropy(logits[:, :-1][supervised].float(), targets[supervised], reduction="none")
    if reduction == "token":
        return LossSum(total=token_nll.sum(), count=supervised.sum())
    tokens_per_row = supervised.sum(dim=1)
    has_tokens = tokens_per_row > 0
    row_means = token_nll.sum(dim=1)[has_tokens] / tokens_per_row[has_tokens]
    return LossSum(total=row_means.sum(), count=has_tokens.sum())
