"""Losses as pure functions: tensors in, a loss out. No config objects; trainers pass settings in.

Each loss returns a `LossSum`: the sum of per-unit losses (tokens for SFT) and the number of units, so the trainer
can divide by the number of units in the whole optimizer step, over every micro-batch and process.
"""

from __future__ import annotations

import math
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
    return token_logps(logits, labels[:, 1:][keep[:, :-1]], chunk_size)


def token_logps(logits: torch.Tensor, targets: torch.Tensor, chunk_size: int = 4096) -> torch.Tensor:
    """(n,) float32 log-probability of `targets` (n,) under `logits` (n, vocab), in checkpointed float32 chunks."""
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


# ---- the fused linear cross-entropy head ----

FUSED_CHUNK_ELEMENTS = 2**26  # float32 logits of one chunk: 256 MB (1,365 positions of SmolLM2's 49,152 tokens)
FUSED_KERNELS = ("auto", "torch", "liger")


def fused_linear_nll_sum(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    token_weights: torch.Tensor | None = None,
    chunk_size: int | None = None,
    kernel: str = "auto",
) -> torch.Tensor:
    """Summed NLL of `targets` under the logits `hidden @ weight.T + bias`, without ever holding all the logits.

    hidden: (n, hidden) the final hidden states at the supervised positions; weight: (vocab, hidden) the output head
    (bias: (vocab,) or None); targets: (n,) int64 token ids, none of them -100. token_weights: (n,) float32 factors
    of each token's NLL (not differentiated; `loss.reduction=sequence` gives 1 / its example's token count), None: 1.
    Returns () float32. The float32 logits exist one chunk of `chunk_size` positions at a time (default: 256 MB of
    them), and the gradients of hidden, weight and bias are computed chunk by chunk in the forward pass: the loss is a
    scalar sum, so the backward pass only scales them by its incoming gradient (no second head matmul).
    Under autocast the head's matmul runs in the autocast dtype, as the model's own head would; the log-softmax always
    runs in float32.
    kernel: "torch" (these chunks, any device), "liger" (liger-kernel's fused linear cross-entropy: CUDA, no
    token_weights), "auto": liger where it applies and is installed, else torch.
    """
    parameters = (hidden, weight) + ((bias,) if bias is not None else ())
    if targets.numel() == 0:
        return sum(p.sum().float() for p in parameters) * 0.0  # (), still connected to the graph
    if kernel not in FUSED_KERNELS:
        raise ValueError(f"fused_linear_nll_sum kernel={kernel!r}: use one of {', '.join(FUSED_KERNELS)}")
    liger = _liger_fused_linear_cross_entropy() if kernel != "torch" and _liger_applies(hidden, token_weights) else None
    if kernel == "liger" and liger is None:
        raise ValueError("kernel='liger' needs CUDA tensors, no token_weights and the liger-kernel package installed")
    if liger is not None:
        loss = liger(hidden, weight, targets, bias=bias, ignore_index=IGNORE_INDEX, reduction="sum")
        return (loss[0] if isinstance(loss, tuple) else loss).float()  # some versions return (loss, z_loss)
    device_type = hidden.device.type
    compute_dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else weight.dtype
    chunk = chunk_size or max(1, FUSED_CHUNK_ELEMENTS // weight.shape[0])
    if not (torch.is_grad_enabled() and any(p.requires_grad for p in parameters)):
        # Evaluation, or nothing trainable upstream: the loss alone, no gradient buffers.
        return _fused_chunks(hidden, weight, bias, targets, token_weights, chunk, compute_dtype, (False,) * 3)[0]
    return _FusedLinearNLL.apply(hidden, weight, bias, targets, token_weights, chunk, compute_dtype)


def fused_selected_nll_sum(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    keep: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    reduction: str = "token",
    example_ids: torch.Tensor | None = None,
    chunk_size: int | None = None,
) -> LossSum:
    """The same loss as `selected_nll_sum`, from the final hidden states at the supervised positions and the output
    head instead of their logits (model.head_loss=fused).

    hidden: (n_kept, hidden) in the row-major order of `keep`; weight: (vocab, hidden), bias: (vocab,) or None;
    labels, keep, reduction, example_ids: as in `selected_nll_sum`. "sequence" weighs each token by 1 / its
    example's token count, so each example adds its mean token NLL.
    """
    targets = labels[:, 1:][keep[:, :-1]]
    if reduction == "token" or targets.numel() == 0:
        total = fused_linear_nll_sum(hidden, weight, targets, bias=bias, chunk_size=chunk_size)
        return LossSum(total=total, count=torch.tensor(targets.numel(), device=hidden.device))
    examples = keep.nonzero()[:, 0] if example_ids is None else example_ids[keep]
    tokens_per_example = torch.bincount(examples)
    token_weights = 1.0 / tokens_per_example[examples].float()
    total = fused_linear_nll_sum(hidden, weight, targets, bias=bias, token_weights=token_weights, chunk_size=chunk_size)
    return LossSum(total=total, count=(tokens_per_example > 0).sum())


class _FusedLinearNLL(torch.autograd.Function):
    """`fused_linear_nll_sum`'s chunks with their gradients computed in the forward pass."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, token_weights, chunk_size, compute_dtype):
        ctx.dtypes = (hidden.dtype, weight.dtype, bias.dtype if bias is not None else None)
        total, *grads = _fused_chunks(
            hidden, weight, bias, targets, token_weights, chunk_size, compute_dtype, ctx.needs_input_grad[:3]
        )
        ctx.save_for_backward(*grads)
        return total

    @staticmethod
    def backward(ctx, grad_output):
        # The stored gradients are those of the summed loss: scale in float32, then cast like the inputs.
        scaled = [
            None if grad is None else (grad * grad_output.float()).to(dtype)
            for grad, dtype in zip(ctx.saved_tensors, ctx.dtypes, strict=True)
        ]
        return *scaled, None, None, None, None


def _fused_chunks(hidden, weight, bias, targets, token_weights, chunk_size, compute_dtype, needs_grad):
    """() float32 summed (weighted) NLL, and the float32 gradients of hidden, weight and bias (None where not needed)."""
    need_hidden, need_weight, need_bias = needs_grad
    with torch.autocast(hidden.device.type, enabled=False):  # the dtypes below are chosen by hand
        head = weight.to(compute_dtype)
        head_bias = bias.to(compute_dtype) if bias is not None else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty(hidden.shape, dtype=torch.float32, device=hidden.device) if need_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_weight else None
        grad_bias = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device) if need_bias else None
        for start in range(0, targets.numel(), chunk_size):
            rows = slice(start, start + chunk_size)
            inputs, target = hidden[rows].to(compute_dtype), targets[rows]
            logits = F.linear(inputs, head, head_bias).float()  # (chunk, vocab): the model head's rounding, then fp32
            log_normalizer = torch.logsumexp(logits, dim=-1)
            nll = log_normalizer - logits.gather(1, target[:, None]).squeeze(1)
            scale = token_weights[rows].float() if token_weights is not None else None
            total += (nll * scale).sum() if scale is not None else nll.sum()
            if not any(needs_grad):
                continue
            # d nll / d logits = softmax - one_hot(target), built in place in the logits' buffer
            grad_logits = logits.sub_(log_normalizer[:, None]).exp_()
            grad_logits[torch.arange(target.numel(), device=target.device), target] -= 1.0
            if scale is not None:
                grad_logits.mul_(scale[:, None])
            low = grad_logits.to(compute_dtype)  # the matmuls' backward runs in the head's dtype, as autocast's would
            if need_hidden:
                grad_hidden[rows] = (low @ head).float()
            if need_weight and low.dtype == grad_weight.dtype:
                grad_weight.addmm_(low.T, inputs)  # in place: no (vocab, hidden) temporary per chunk
            elif need_weight:
                grad_weight.add_(low.T @ inputs)  # one (vocab, hidden) temporary in the head's dtype, no float32 copy
            if need_bias:
                grad_bias += grad_logits.sum(dim=0)
    return total, grad_hidden, grad_weight, grad_bias


def _liger_applies(hidden: torch.Tensor, token_weights: torch.Tensor | None) -> bool:
    return hidden.is_cuda and token_weights is None  # liger weighs classes, not tokens


def _liger_fused_linear_cross_entropy():
    """liger-kernel's functional fused linear cross-entropy, or None when it is not installed (an optional extra:
    pip install .[gpu]); imported here, never at module import, so CPU installs do not need it."""
    try:
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy
    except ImportError:
        return None
    return liger_fused_linear_cross_entropy


# ---- preference losses ----


def selected_sequence_logps(
    logits: torch.Tensor,
    labels: torch.Tensor,
    keep: torch.Tensor,
    chunk_size: int = 4096,
    example_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probability of each sequence's supervised tokens, and their number, through `selected_token_logps`.

    example_ids: (batch, seq) int, which sequence each token belongs to (-1: padding), for packed rows holding
    several; default: one sequence per row. Returns (sequences,) float32 log p(response | prompt) and (sequences,)
    int64 token counts, sequence i at index i.
    """
    token_logps = selected_token_logps(logits, labels, keep, chunk_size)
    if example_ids is None:
        sequences, n_sequences = keep.nonzero()[:, 0], keep.shape[0]
    else:
        sequences, n_sequences = example_ids[keep], int(example_ids.max()) + 1
    sums = torch.zeros(n_sequences, dtype=torch.float32, device=token_logps.device)
    return sums.index_add(0, sequences, token_logps), torch.bincount(sequences, minlength=n_sequences)


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


def robust_dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    reference_chosen: torch.Tensor,
    reference_rejected: torch.Tensor,
    *,
    beta: float,
    label_flip_rate: float,
) -> PreferenceLoss:
    """Robust DPO (Chowdhury et al. 2024, "Provably Robust DPO"): an unbiased estimate of the DPO loss under labels
    flipped at rate e, ((1 - e) l(h) - e l(-h)) / (1 - 2e) with l(h) = -log sigmoid(beta h) and h the log-ratio
    margin. Unlike cDPO (a smoothed target), its expectation over the noise is the clean DPO loss."""
    margin = (policy_chosen - policy_rejected) - (reference_chosen - reference_rejected)
    e = label_flip_rate
    losses = ((1 - e) * -F.logsigmoid(beta * margin) - e * -F.logsigmoid(-beta * margin)) / (1 - 2 * e)
    return PreferenceLoss(losses, *_rewards(beta, policy_chosen, policy_rejected, reference_chosen, reference_rejected))


def hinge_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    reference_chosen: torch.Tensor,
    reference_rejected: torch.Tensor,
    *,
    beta: float,
) -> PreferenceLoss:
    """SLiC hinge (Zhao et al. 2023, "SLiC-HF"), on the implicit reward margin as in DPO: max(0, 1 - beta h) with h the
    log-ratio margin; no gradient once the chosen reward beats the rejected one by 1."""
    margin = (policy_chosen - policy_rejected) - (reference_chosen - reference_rejected)
    losses = torch.relu(1 - beta * margin)
    return PreferenceLoss(losses, *_rewards(beta, policy_chosen, policy_rejected, reference_chosen, reference_rejected))


def apo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    reference_chosen: torch.Tensor,
    reference_rejected: torch.Tensor,
    *,
    beta: float,
    anchor: str,
) -> PreferenceLoss:
    """Anchored preference optimization (D'Oosterlinck et al. 2024), with rewards r = beta log(policy / reference):
    zero: (1 - sigmoid(r_chosen)) + sigmoid(r_rejected), raising the chosen and lowering the rejected likelihood (for
    chosen answers better than the model's own); down: sigmoid(r_chosen) + (1 - sigmoid(r_chosen - r_rejected)),
    lowering both while keeping them apart (for chosen answers worse than the model's own)."""
    chosen, rejected = _rewards(
        beta, policy_chosen, policy_rejected, reference_chosen, reference_rejected, detach=False
    )
    if anchor == "zero":
        losses = (1 - torch.sigmoid(chosen)) + torch.sigmoid(rejected)
    elif anchor == "down":
        losses = torch.sigmoid(chosen) + (1 - torch.sigmoid(chosen - rejected))
    else:
        raise ValueError(f"APO anchor {anchor!r}: use 'zero' or 'down'")
    return PreferenceLoss(losses, chosen.detach(), rejected.detach())


def mean_nll(logps: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """(pairs,) negative log-likelihood per token of each response, from its summed log-prob and token count."""
    return -logps / tokens.clamp(min=1)


def rpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    reference_chosen: torch.Tensor,
    reference_rejected: torch.Tensor,
    chosen_tokens: torch.Tensor,
    *,
    beta: float,
    nll_weight: float,
) -> PreferenceLoss:
    """RPO (Pang et al. 2024, "Iterative Reasoning Preference Optimization"): the DPO loss plus nll_weight times the
    chosen response's per-token negative log-likelihood, so the chosen answer's likelihood cannot fall."""
    dpo = dpo_loss(policy_chosen, policy_rejected, reference_chosen, reference_rejected, beta)
    losses = dpo.losses + nll_weight * mean_nll(policy_chosen, chosen_tokens)
    return PreferenceLoss(losses, dpo.chosen_rewards, dpo.rejected_rewards)


def cpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    chosen_tokens: torch.Tensor,
    *,
    beta: float,
    nll_weight: float,
) -> PreferenceLoss:
    """CPO (Xu et al. 2024, "Contrastive Preference Optimization"): reference-free, -log sigmoid(beta (log p(chosen) -
    log p(rejected))) on summed log-probs, plus nll_weight times the chosen response's per-token NLL. Rewards are
    beta times the summed log-probs."""
    losses = -F.logsigmoid(beta * (policy_chosen - policy_rejected)) + nll_weight * mean_nll(
        policy_chosen, chosen_tokens
    )
    return PreferenceLoss(losses, (beta * policy_chosen).detach(), (beta * policy_rejected).detach())


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, accurate over its whole range (Maechler 2012, "Accurately Computing log(1 - exp(-|a|))
    Assessed by the Rmpfr package").

    Near 0, 1 - exp(x) cancels: in float32, log1p(-exp(x)) is off by 1.3e-2 at x = -1e-6 and is -inf once exp(x)
    rounds to 1 (x > -3e-8), while log(-expm1(x)) stays accurate; below -ln 2, log1p(-exp(x)) is the accurate one. The
    branch torch.where does not pick sees -1 in place of x, so it cannot put an inf into the gradient (0 * inf is NaN).
    """
    near_zero = x > -math.log(2)
    safe_near = torch.where(near_zero, x, -1.0)
    safe_far = torch.where(near_zero, -1.0, x)
    return torch.where(near_zero, torch.log(-torch.expm1(safe_near)), torch.log1p(-torch.exp(safe_far)))


def orpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    chosen_tokens: torch.Tensor,
    rejected_tokens: torch.Tensor,
    *,
    odds_ratio_weight: float,
) -> PreferenceLoss:
    """ORPO (Hong et al. 2024, "ORPO: Monolithic Preference Optimization without Reference Model"): the chosen
    response's per-token NLL plus lambda times -log sigmoid(log odds(chosen) - log odds(rejected)), where
    odds(y) = p / (1 - p) and p = exp(mean token log-prob of y). Rewards are lambda times the mean token log-probs."""
    chosen, rejected = -mean_nll(policy_chosen, chosen_tokens), -mean_nll(policy_rejected, rejected_tokens)
    # log(p / (1 - p)) = log p - log(1 - p); log1mexp keeps 1 - p accurate when the response is nearly certain (p ~ 1)
    log_odds = (chosen - log1mexp(chosen)) - (rejected - log1mexp(rejected))
    losses = -chosen - odds_ratio_weight * F.logsigmoid(log_odds)
    lam = odds_ratio_weight
    return PreferenceLoss(losses, (lam * chosen).detach(), (lam * rejected).detach())


def bradley_terry_loss(
    chosen_scores: torch.Tensor,
    rejected_scores: torch.Tensor,
    *,
    center_coefficient: float,
    margin: torch.Tensor | None = None,
) -> PreferenceLoss:
    """Reward model (Bradley-Terry, as in Ouyang et al. 2022): -log sigmoid(s_chosen - s_rejected - margin) per pair
    (the margin, as in Touvron et al. 2023, defaults to 0), plus center_coefficient * (s_chosen + s_rejected)^2,
    which keeps the scores centred on 0 (Eisenstein et al. 2023). chosen_scores, rejected_scores, margin: (pairs,).
    Rewards are the scores themselves."""
    difference = chosen_scores - rejected_scores
    losses = -F.logsigmoid(difference - margin.to(difference) if margin is not None else difference)
    losses = losses + center_coefficient * (chosen_scores + rejected_scores) ** 2
    return PreferenceLoss(losses, chosen_scores.detach(), rejected_scores.detach())


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


def _rewards(beta, policy_chosen, policy_rejected, reference_chosen, reference_rejected, detach: bool = True):
    """The implicit rewards beta * log(policy / reference) of the chosen and the rejected responses."""
    chosen, rejected = beta * (policy_chosen - reference_chosen), beta * (policy_rejected - reference_rejected)
    return (chosen.detach(), rejected.detach()) if detach else (chosen, rejected)
