"""Paired preference losses (DPO, cDPO, robust DPO, IPO, hinge, APO, RPO, CPO, ORPO, SimPO): each its settings and a
small trainer subclass of `PairedPreferenceTrainer`.

The paired trainer runs chosen and rejected responses through the policy in one forward (in the data's batch layout)
and averages the loss over every pair of the global batch. A loss implements only `loss(logps: PairLogps)`; the
built-in ones call their pure loss (train/objectives/losses.py) through `PairLogps.apply`, which passes it the
tensors its parameters name, with their settings by keyword. The frozen reference model is
train/objectives/reference.py's.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

from train.app.config import LossConfig, setting
from train.batching.collate import Batch, collate, collate_sequences, collate_shared_prompt
from train.batching.layout import Layout
from train.batching.sequences import forward_sequence_logps, n_sequences
from train.data.store import PackedItems, PairExample
from train.loop.trainer import BasicTrainer
from train.objectives.losses import (
    LossSum,
    PreferenceLoss,
    apo_loss,
    cpo_loss,
    dpo_loss,
    hinge_loss,
    ipo_loss,
    orpo_loss,
    robust_dpo_loss,
    rpo_loss,
    simpo_loss,
)
from train.objectives.reference import ReferenceMixin

logger = logging.getLogger(__name__)


@dataclass
class PairLogps:
    """Summed log-probs of each pair's responses (pairs,), and their token counts (for length normalization)."""

    policy_chosen: torch.Tensor
    policy_rejected: torch.Tensor
    reference_chosen: torch.Tensor | None
    reference_rejected: torch.Tensor | None
    chosen_tokens: torch.Tensor
    rejected_tokens: torch.Tensor

    @classmethod
    def of_sequences(cls, policy: torch.Tensor, reference: torch.Tensor | None, tokens: torch.Tensor) -> PairLogps:
        """From (2 x pairs,) per-sequence values, chosen responses first (the order of every batch layout)."""
        n = policy.shape[0] // 2
        return cls(
            policy_chosen=policy[:n],
            policy_rejected=policy[n:],
            reference_chosen=reference[:n] if reference is not None else None,
            reference_rejected=reference[n:] if reference is not None else None,
            chosen_tokens=tokens[:n],
            rejected_tokens=tokens[n:],
        )

    def per_token(self) -> PairLogps:
        """Mean token log-probs in place of the sums."""
        chosen, rejected = self.chosen_tokens, self.rejected_tokens
        return dataclasses.replace(
            self,
            policy_chosen=self.policy_chosen / chosen,
            policy_rejected=self.policy_rejected / rejected,
            reference_chosen=self.reference_chosen / chosen,
            reference_rejected=self.reference_rejected / rejected,
        )

    def apply(self, loss: Callable[..., PreferenceLoss], **settings: float | str) -> PreferenceLoss:
        """The pure `loss` called with the tensors its parameters name (policy_chosen, ..., rejected_tokens), all by
        keyword, and `settings`: the one place where a pair's log-probs are unpacked for a loss function."""
        names = inspect.signature(loss).parameters
        return loss(**{name: getattr(self, name) for name in names if name in PAIR_LOGPS_FIELDS}, **settings)


PAIR_LOGPS_FIELDS = frozenset(field.name for field in dataclasses.fields(PairLogps))


# ---- settings: each loss's `loss.*` keys ----


@dataclass
class BetaSettings(LossConfig):
    beta: float = setting(0.1, "Scale of the implicit reward beta * log(policy / reference).")

    def problems(self) -> list[str]:
        return [] if self.beta > 0 else [f"loss.beta={self.beta}: must be > 0"]


@dataclass
class DPOSettings(BetaSettings):
    label_smoothing: float = setting(
        0.0, "Assumed fraction of flipped preference labels, in [0, 0.5); above 0 it is conservative DPO (cDPO)."
    )

    def problems(self) -> list[str]:
        bad = not 0 <= self.label_smoothing < 0.5
        return super().problems() + (
            [f"loss.label_smoothing={self.label_smoothing}: must be in [0, 0.5)"] if bad else []
        )


@dataclass
class IPOSettings(LossConfig):
    tau: float = setting(0.1, "Regularization; the log-ratio margin is regressed to 1 / (2 tau).")
    length_normalized: bool = setting(
        False,
        "Log-ratios of mean token log-probs (the form TRL uses) instead of summed log-probs (the paper's formula).",
    )

    def problems(self) -> list[str]:
        return [] if self.tau > 0 else [f"loss.tau={self.tau}: must be > 0"]


@dataclass
class RobustDPOSettings(BetaSettings):
    label_flip_rate: float = setting(0.1, "Assumed rate of flipped preference labels, in [0, 0.5).")

    def problems(self) -> list[str]:
        bad = not 0 <= self.label_flip_rate < 0.5
        return super().problems() + (
            [f"loss.label_flip_rate={self.label_flip_rate}: must be in [0, 0.5)"] if bad else []
        )


@dataclass
class APOSettings(BetaSettings):
    anchor: str = setting(
        "zero",
        "Where the likelihoods go",
        choices={
            "zero": "raise the chosen and lower the rejected likelihood (chosen answers better than the model's)",
            "down": "lower both, keeping them apart (chosen answers worse than the model's)",
        },
    )


@dataclass
class NLLSettings(BetaSettings):
    nll_weight: float = setting(1.0, "Weight of the chosen response's per-token negative log-likelihood term.")

    def problems(self) -> list[str]:
        bad = self.nll_weight < 0
        return super().problems() + ([f"loss.nll_weight={self.nll_weight}: must be >= 0"] if bad else [])


@dataclass
class ORPOSettings(LossConfig):
    odds_ratio_weight: float = setting(0.1, "lambda: weight of the log odds-ratio term beside the chosen NLL.")

    def problems(self) -> list[str]:
        bad = self.odds_ratio_weight <= 0
        return [f"loss.odds_ratio_weight={self.odds_ratio_weight}: must be > 0"] if bad else []


@dataclass
class SimPOSettings(LossConfig):
    beta: float = setting(2.0, "Scale of the reward beta * mean token log-prob.")
    gamma_beta_ratio: float = setting(0.5, "Target reward margin gamma, as a ratio of beta.")

    def problems(self) -> list[str]:
        return [] if self.beta > 0 else [f"loss.beta={self.beta}: must be > 0"]


# ---- the paired trainer ----


class PairedPreferenceTrainer(ReferenceMixin, BasicTrainer):
    """Chosen and rejected through the policy in one forward; the loss is the mean over all pairs of the step."""

    example_unit = "pairs"
    rows_per_example = 2

    data_kind = "paired"
    supports_reference_precompute = True  # a pair's reference log-probs do not change during training
    supports_packing = True  # whole pairs per packed row
    supports_shared_prompt = True
    # data.shared_prompt=null gives the shared-prompt layout (train/batching/layout.py) only to trainers that forward
    # pairs this class's way: a subclass with its own batch_loss may expect two rows per pair, and opts in with
    # data.shared_prompt=true
    shared_prompt_by_default = True

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if "batch_loss" in vars(cls) and "shared_prompt_by_default" not in vars(cls):
            cls.shared_prompt_by_default = False

    def __init__(self, *args, reference_model=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.setup_reference(reference_model if self.uses_reference else None)
        if self.train_data.layout is Layout.SHARED_PROMPT:
            logger.info("pairs: each prompt runs once, in one row with both responses (data.shared_prompt)")

    def loss(self, logps: PairLogps) -> PreferenceLoss:
        """The per-pair loss and implicit rewards: the one method a paired loss implements."""
        raise NotImplementedError

    def collate(self, pairs: list[PairExample] | list[PackedItems], layout: Layout) -> Batch:
        """Sequences 0..n-1 are the chosen responses, n..2n-1 the rejected ones, in the same order: one per row; for
        packed rows, each pair's chosen and rejected side by side in a row, numbered so by `example_ids`; or each
        pair in a row of its own, its prompt once (shared prompt)."""
        match layout:
            case Layout.PACKED:
                rows = [[s for p in row.items for s in (p.chosen, p.rejected)] for row in pairs]
                pairs = [p for row in pairs for p in row.items]
                n = len(pairs)
                order = [j + side * n for j in range(n) for side in (0, 1)]
                batch = collate_sequences(rows, order, self.pad_token_id)
            case Layout.SHARED_PROMPT:
                batch = collate_shared_prompt(pairs, self.pad_token_id)
            case Layout.PADDED:
                batch = collate([p.chosen for p in pairs] + [p.rejected for p in pairs], self.pad_token_id)
        if pairs[0].reference_chosen is not None:
            values = [p.reference_chosen for p in pairs] + [p.reference_rejected for p in pairs]
            batch["reference_logps"] = torch.tensor(values, dtype=torch.float32)
        if any(p.margin is not None for p in pairs):  # (pairs,) float32, 0 for a row without a margin
            batch["margin"] = torch.tensor([p.margin or 0.0 for p in pairs], dtype=torch.float32)
        return batch

    def loss_units(self, batch: Batch) -> torch.Tensor:
        return torch.tensor(n_sequences(batch) // 2)

    def batch_loss(self, model, batch: Batch) -> LossSum:
        policy, tokens = forward_sequence_logps(model, batch)  # its logits are freed before the reference forward
        reference = self.reference_logps(batch) if self.uses_reference else None
        logps = PairLogps.of_sequences(policy, reference, tokens)
        result = self.loss(logps)
        count = torch.tensor(logps.policy_chosen.shape[0], device=policy.device)
        metrics = {
            "rewards/chosen": (result.chosen_rewards, count),
            "rewards/rejected": (result.rejected_rewards, count),
            "rewards/accuracies": ((result.chosen_rewards > result.rejected_rewards).float(), count),
            "rewards/margins": (result.chosen_rewards - result.rejected_rewards, count),
            "logps/chosen": (logps.policy_chosen.detach(), count),
            "logps/rejected": (logps.policy_rejected.detach(), count),
        }
        return LossSum(result.losses.sum(), count, metrics)


# ---- the losses: each a settings class and its pure loss, the settings passed by keyword ----


class DPOTrainer(PairedPreferenceTrainer):
    """DPO; with loss.label_smoothing > 0 (loss=cdpo), conservative DPO."""

    settings_class = DPOSettings
    settings: DPOSettings

    def loss(self, logps: PairLogps) -> PreferenceLoss:
        return logps.apply(dpo_loss, beta=self.settings.beta, label_smoothing=self.settings.label_smoothing)


class IPOTrainer(PairedPreferenceTrainer):
    settings_class = IPOSettings
    settings: IPOSettings

    def loss(self, logps: PairLogps) -> PreferenceLoss:
        logps = logps.per_token() if self.settings.length_normalized else logps
        return logps.apply(ipo_loss, tau=self.settings.tau)


class RobustDPOTrainer(PairedPreferenceTrainer):
    settings_class = RobustDPOSettings
    settings: RobustDPOSettings

    def loss(self, logps: PairLogps) -> PreferenceLoss:
        return logps.apply(robust_dpo_loss, beta=self.settings.beta, label_flip_rate=self.settings.label_flip_rate)


class HingeTrainer(PairedPreferenceTrainer):
    settings_class = BetaSettings
    settings: BetaSettings

    def loss(self, logps: PairLogps) -> PreferenceLoss:
        return logps.apply(hinge_loss, beta=self.settings.beta)


class APOTrainer(PairedPreferenceTrainer):
    settings_class = APOSettings
    settings: APOSettings

    def loss(self, logps: PairLogps) -> PreferenceLoss:
        return logps.apply(apo_loss, beta=self.settings.beta, anchor=self.settings.anchor)


class RPOTrainer(PairedPreferenceTrainer):
    settings_class = NLLSettings
    settings: NLLSettings

    def loss(self, logps: PairLogps) -> PreferenceLoss:
        return logps.apply(rpo_loss, beta=self.settings.beta, nll_weight=self.settings.nll_weight)


class CPOTrainer(PairedPreferenceTrainer):
    settings_class = NLLSettings
    settings: NLLSettings
    uses_reference = False  # reference-free
    supports_reference_precompute = False

    def loss(self, logps: PairLogps) -> PreferenceLoss:
        return logps.apply(cpo_loss, beta=self.settings.beta, nll_weight=self.settings.nll_weight)


class ORPOTrainer(PairedPreferenceTrainer):
    settings_class = ORPOSettings
    settings: ORPOSettings
    uses_reference = False  # reference-free
    supports_reference_precompute = False

    def loss(self, logps: PairLogps) -> PreferenceLoss:
        return logps.apply(orpo_loss, odds_ratio_weight=self.settings.odds_ratio_weight)


class SimPOTrainer(PairedPreferenceTrainer):
    settings_class = SimPOSettings
    settings: SimPOSettings
    uses_reference = False  # reference-free: no reference model is loaded at all
    supports_reference_precompute = False

    def loss(self, logps: PairLogps) -> PreferenceLoss:
        return logps.apply(simpo_loss, beta=self.settings.beta, gamma_beta_ratio=self.settings.gamma_beta_ratio)
