"""Reward models: a sequence classifier with one output (the base model plus a score head) trained with the
Bradley-Terry loss on prompt/chosen/rejected rows. `FINAL/` loads with transformers'
AutoModelForSequenceClassification; `scripts/score.py` scores prompt/completion rows with it.

Rows may carry a `margin` (how much better chosen is, as in Llama 2's reward models): the loss then asks the chosen
score to beat the rejected one by that much (`loss.use_margin`).

The score of a sequence is the head's output at its last token that is not the padding token (transformers'
pooling for sequence classifiers); training and scoring tokenize the same way, so they score the same position.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from train.app.config import LossConfig, setting
from train.objectives.losses import LossSum, bradley_terry_loss
from train.objectives.preference import PairedPreferenceTrainer


@dataclass
class RewardSettings(LossConfig):
    center_coefficient: float = setting(
        0.0, "Weight of (s_chosen + s_rejected)^2, which keeps the scores centred on 0 (0: off; 0.01 is common)."
    )
    use_margin: bool = setting(
        True, "Rows with a `margin` field: require the chosen score to beat the rejected one by that margin."
    )

    def problems(self) -> list[str]:
        bad = self.center_coefficient < 0
        return [f"loss.center_coefficient={self.center_coefficient}: must be >= 0"] if bad else []


class RewardTrainer(PairedPreferenceTrainer):
    """Bradley-Terry on pairs; batches as the paired losses make them (chosen rows, then rejected rows)."""

    settings_class = RewardSettings
    settings: RewardSettings
    model_head = "score"
    supports_packing = False  # the score is read at each row's last token: one sequence per row
    supports_shared_prompt = False
    uses_reference = False
    supports_reference_precompute = False

    def batch_loss(self, model, batch: dict[str, torch.Tensor]) -> LossSum:
        scores = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, 0].float()
        n = scores.shape[0] // 2
        margin = batch.get("margin") if self.settings.use_margin else None
        result = bradley_terry_loss(
            scores[:n], scores[n:], margin=margin, center_coefficient=self.settings.center_coefficient
        )
        count = torch.tensor(n, device=scores.device)
        margins = result.chosen_rewards - result.rejected_rewards
        metrics = {
            "rewards/chosen": (result.chosen_rewards, count),
            "rewards/rejected": (result.rejected_rewards, count),
            "rewards/accuracies": ((margins > 0).float(), count),
            "rewards/margins": (margins, count),
        }
        return LossSum(result.losses.sum(), count, metrics)
