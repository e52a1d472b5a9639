"""Supervised fine-tuning and continued pretraining: the masked NLL of the supervised tokens."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from train.app.config import LossConfig, setting
from train.batching.collate import Batch
from train.loop.trainer import BasicTrainer, forward_supervised, forward_supervised_hidden, output_head
from train.objectives.losses import LossSum, count_loss_units, fused_selected_nll_sum, selected_nll_sum


@dataclass
class SFTSettings(LossConfig):
    reduction: str = setting(
        "token",
        "How the step's loss is averaged",
        choices={
            "token": "every supervised token of the step weighs the same (long answers weigh more)",
            "sequence": "every example weighs the same (the mean over examples of each one's mean token loss)",
        },
    )


class SFTTrainer(BasicTrainer):
    """Supervised fine-tuning: mean NLL of the supervised (response) tokens over the whole optimizer step
    (`loss.reduction=token`), or mean over its examples of each example's mean token NLL (`sequence`)."""

    settings_class = SFTSettings
    supports_packing = True
    supports_fused_head = True
    settings: SFTSettings

    def loss_units(self, batch: Batch) -> torch.Tensor:
        return count_loss_units(batch["labels"], self.settings.reduction, batch.example_ids)

    def batch_loss(self, model, batch: Batch) -> LossSum:
        if self.loop.head_loss == "fused":
            return self.fused_head_loss(model, batch)
        logits, keep = forward_supervised(model, batch)
        return selected_nll_sum(logits, batch["labels"], keep, self.settings.reduction, example_ids=batch.example_ids)

    def fused_head_loss(self, model, batch: Batch) -> LossSum:
        """model.head_loss=fused: the same loss from the final hidden states and the head's weight, whose logits
        never exist whole (train/objectives/losses.py: fused_linear_nll_sum)."""
        hidden, keep = forward_supervised_hidden(model, batch)
        weight, bias = output_head(self.accelerator.unwrap_model(model))
        return fused_selected_nll_sum(
            hidden, weight, batch["labels"], keep,
            bias=bias, reduction=self.settings.reduction, example_ids=batch.example_ids,
        )  # fmt: skip


class PretrainTrainer(SFTTrainer):
    """Continued pretraining: the SFT loss on plain text rows, every token supervised."""

    data_kind = "text"
