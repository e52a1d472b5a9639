"""Losses as pure functions: tensors in, a loss out. No config objects; trainers pass settings in.

Each loss returns a `LossSum`: the sum of per-unit losses (tokens for SFT) and the number of units, so the trainer
can divide by the number of units in the whole optimizer step, over every micro-batch and process.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
import torch.utils.checkpoint

IGNORE_INDEX = -100


@dataclass
class LossSum:
    total: torch.Tensor  # () float32: sum of the per-unit losses
    count: torch.Tensor  # () int64: number of units summed
    # name -> (sum, count): metrics averaged over the whole step or evaluation, e.g. "rewards/chosen"
    metrics: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)


def count_loss_units(labels: torch.Tensor, reduction: str, example_ids: torch.Tensor | None = None) -> torch.Tensor:
    """labels: (batch, seq) with -100 on unsupervised tokens. Returns () int64: what `masked_nll_sum` averages over.

    token: supervised tokens. sequence: rows with at least one supervised token. The first token of a row is never
    predicted (nothing precedes it), so only labels[:, 1:] count.
    """
    supervised = labels[:, 1:] != IGNORE_INDEX
    if reduction == "token":
        return supervised.sum()
    if example_ids is None:  # one example per row
        return supervised.any(dim=1).sum()
    return torch.tensor(example_ids[:, 1:][supervised].unique().numel())


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


def supervised_positions(labels: torch.Tensor) -> torch.Tensor:
    """(batch, seq) bool: positions whose next token is supervised, i.e. where logits are needed for the loss."""
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    return keep


def selected_token_logps(
    logits: torch.Tensor, labels: torch.Tensor, keep: torch.Tensor, chunk_size: int = 4096
) -> torch.Tensor:
    """Log-probability of each supervised token, from logits computed only at the supervised positions: the one
    log-prob path of every loss.

    logits: (n_kept, vocab), any float dtype: the model's output for `logits_to_keep=keep` (row-major order of keep).
    labels: (batch, seq) with -100 where not supervised; keep: (batch, seq) bool from `supervised_positions`.
    Returns (n_kept,) float32. The float32 log-softmax runs in chunks of `chunk_size` positions under activation
    checkpointing, so at most one chunk of float32 logits exists at a time, in the forward and the backward pass.
    """
    targets = labels[:, 1:][keep[:, :-1]]
    if targets.numel() == 0:
        return logits.sum(dim=-1).float() * 0.0  # (0,), still connected to the graph
    return torch.cat([
        torch.utils.checkpoint.checkpoint(_chunk_logps, chunk, target, use_reentrant=False)
        for chunk, target in zip(logits.split(chunk_size), targets.split(chunk_size), strict=True)
    ])  # fmt: skip


def _chunk_logps(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return -F.cross_entropy(logits.float(), targets, reduction="none")


def selected_nll_sum(
    logits: torch.Tensor,
    labels: torch.Tensor,
    keep: torch.Tensor,
    reduction: str = "token",
    chunk_size: int = 4096,
    example_ids: torch.Tensor | None = None,
) -> LossSum:
    """The same loss as `masked_nll_sum`, from logits computed only at the supervised positions.

    logits, labels, keep: as in `selected_token_logps`.
    example_ids: (batch, seq) int, which example each token belongs to (packed rows hold several); default: its row.
    """
    nll = -selected_token_logps(logits, labels, keep, chunk_size)
    if nll.numel() == 0:
        return LossSum(total=nll.sum(), count=labels.new_zeros(()))
    if reduction == "token":
        return LossSum(total=nll.sum(), count=torch.tensor(nll.numel(), device=nll.device))
    rows = keep.nonzero()[:, 0] if example_ids is None else example_ids[keep]
    n_examples = int(rows.max()) + 1
    per_row = torch.zeros(n_examples, device=nll.device).index_add(0, rows, nll)
    tokens_per_row = torch.bincount(rows, minlength=n_examples)
    has_tokens = tokens_per_row > 0
    return LossSum(total=(per_row[has_tokens] / tokens_per_row[has_tokens]).sum(), count=has_tokens.sum())


# ---- preference losses ----


def selected_sequence_logps(
    logits: torch.Tensor, labels: torch.Tensor, keep: torch.Tensor, chunk_size: int = 4096
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probability of each row's supervised tokens, and their number, through `selected_token_logps`.

    Returns (batch,) float32 log p(response | prompt) and (batch,) int64 token counts.
    """
    token_logps = selected_token_logps(logits, labels, keep, chunk_size)
    rows = keep.nonzero()[:, 0]
    sums = torch.zeros(keep.shape[0], dtype=torch.float32, device=token_logps.device).index_add(0, rows, token_logps)
    return sums, keep.sum(dim=1)


@dataclass
class PreferenceLoss:
    losses: torch.Tensor  # (pairs,) the loss of each pair
    chosen_rewards: torch.Tensor  # (pairs,) implicit reward of the chosen response (detached)
    rejected_rewards: torch.Tensor  # (pairs,)


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    reference_chosen: torch.Tensor,
    reference_rejected: torch.Tensor,
    beta: float,
    label_smoothing: float = 0.0,
) -> PreferenceLoss:
    """DPO (Rafailov et al. 2023); with label_smoothing > 0, conservative DPO (cDPO), which assumes that fraction of
    the preference labels is flipped. All inputs (pairs,) summed log-probs of the responses. When the policy equals
    the reference, every pair's loss is ln 2."""
    logits = (policy_chosen - policy_rejected) - (reference_chosen - reference_rejected)
    losses = -F.logsigmoid(beta * logits) * (1 - label_smoothing) - F.logsigmoid(-beta * logits) * label_smoothing
    return PreferenceLoss(losses, *_rewards(beta, policy_chosen, policy_rejected, reference_chosen, reference_rejected))


def ipo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    reference_chosen: torch.Tensor,
    reference_rejected: torch.Tensor,
    tau: float,
) -> PreferenceLoss:
    """IPO (Azar et al. 2023): regress the log-ratio margin to 1 / (2 tau) instead of pushing it to infinity."""
    logits = (policy_chosen - policy_rejected) - (reference_chosen - reference_rejected)
    losses = (logits - 1 / (2 * tau)) ** 2
    return PreferenceLoss(losses, *_rewards(tau, policy_chosen, policy_rejected, reference_chosen, reference_rejected))


def simpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    chosen_tokens: torch.Tensor,
    rejected_tokens: torch.Tensor,
    beta: float,
    gamma_beta_ratio: float,
) -> PreferenceLoss:
    """SimPO (Meng et al. 2024): reference-free; the reward is beta times the mean token log-prob, and the chosen
    reward must beat the rejected one by the margin gamma = gamma_beta_ratio * beta."""
    chosen = policy_chosen / chosen_tokens
    rejected = policy_rejected / rejected_tokens
    losses = -F.logsigmoid(beta * (chosen - rejected - gamma_beta_ratio))
    return PreferenceLoss(losses, (beta * chosen).detach(), (beta * rejected).detach())


def kto_loss(
    policy: torch.Tensor,
    reference: torch.Tensor,
    desirable: torch.Tensor,
    kl: torch.Tensor,
    *,
    beta: float,
    desirable_weight: float,
    undesirable_weight: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """KTO (Ethayarajh et al. 2024) for unpaired examples.

    policy, reference: (batch,) summed log-probs of each completion; desirable: (batch,) bool; kl: () the detached
    reference point, an estimate of KL(policy || reference). Returns the (batch,) weighted losses and rewards.
    """
    log_ratio = policy - reference
    value = torch.where(desirable, torch.sigmoid(beta * (log_ratio - kl)), torch.sigmoid(beta * (kl - log_ratio)))
    weights = torch.where(desirable, desirable_weight, undesirable_weight).to(value)
    return weights * (1 - value), (beta * log_ratio).detach()


def _rewards(beta, policy_chosen, policy_rejected, reference_chosen, reference_rejected):
    return (beta * (policy_chosen - reference_chosen)).detach(), (
        beta * (policy_rejected - reference_rejected)
    ).detach()
