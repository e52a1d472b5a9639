"""KTO (Ethayarajh et al. 2024) on unpaired examples: prompt, completion and a desirable/undesirable label.

The KL reference point z is estimated on mismatched pairs, each prompt with the completion of the next example of the
global batch, over the whole step (every micro-batch of every process) before any loss, detached and clamped at 0:
so it, and the loss, do not depend on how the step is split. Evaluation estimates it per global evaluation batch,
pairing within each process's share.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from train.app.config import setting
from train.batching.collate import Batch, collate, collate_sequences, prompt_length
from train.batching.layout import Layout
from train.batching.sequences import forward_sequence_logps
from train.data.store import IGNORE_INDEX, Example, PackedItems, UnpairedExample
from train.loop.throughput import Work, pass_counts
from train.loop.trainer import BasicTrainer
from train.objectives.losses import LossSum, kto_loss
from train.objectives.preference import BetaSettings
from train.objectives.reference import ReferenceMixin


@dataclass
class KTOSettings(BetaSettings):
    desirable_weight: float = setting(1.0, "Weight of desirable examples' losses.")
    undesirable_weight: float = setting(1.0, "Weight of undesirable examples' losses.")

    def problems(self) -> list[str]:
        bad = self.desirable_weight <= 0 or self.undesirable_weight <= 0
        return super().problems() + (["loss.desirable_weight and loss.undesirable_weight must be > 0"] if bad else [])


class KTOTrainer(ReferenceMixin, BasicTrainer):
    """KTO: each example's loss against the KL reference point of its step (training) or evaluation batch."""

    settings_class = KTOSettings
    settings: KTOSettings
    data_kind = "unpaired"
    pairs_across_step = True
    supports_packing = True  # matched sequences packed; each packed row's mismatched sequences in a row of their own
    rows_per_example = 2  # each example, and its prompt with its successor's completion (for the KL estimate)

    def __init__(self, *args, reference_model=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.setup_reference(reference_model)

    def collate(
        self,
        items: list[UnpairedExample] | list[PackedItems],
        layout: Layout,
        successors: list[UnpairedExample] | list[PackedItems] | None = None,
    ) -> Batch:
        """Sequences 0..n-1: each prompt with its completion; n..2n-1: each prompt with its successor's completion
        (the next example of the global batch when training; of this list when evaluating). The first half of the
        rows holds the matched sequences, the second the mismatched ones: one per row, or packed rows of the same
        examples (`example_ids` numbering them). Adds desirable (n,)."""
        if layout is Layout.PACKED:
            return self._collate_packed(items, successors)
        matched = [item.example for item in items]
        partners = [s.example for s in successors] if successors is not None else matched[1:] + matched[:1]
        mismatched = [_join(example, partner) for example, partner in zip(matched, partners, strict=True)]
        batch = collate(matched + mismatched, self.pad_token_id)
        batch["desirable"] = torch.tensor([item.desirable for item in items])
        return batch

    def _collate_packed(self, rows: list[PackedItems], successor_rows: list[PackedItems]) -> Batch:
        # An item's successor is the next item of its row, or the first item of the next row of the global batch:
        # the same pairing of the step's examples however its rows are split.
        matched, mismatched, desirable = [], [], []
        for row, after in zip(rows, successor_rows, strict=True):
            examples = [item.example for item in row.items]
            partners = examples[1:] + [after.items[0].example]
            matched.append(examples)
            mismatched.append([_join(e, p) for e, p in zip(examples, partners, strict=True)])
            desirable += [item.desirable for item in row.items]
        batch = collate_sequences(matched + mismatched, list(range(2 * len(desirable))), self.pad_token_id)
        batch["desirable"] = torch.tensor(desirable)
        return batch

    def loss_units(self, batch: Batch) -> torch.Tensor:
        return torch.tensor(batch["desirable"].shape[0])

    def batch_work(self, batch: Batch) -> Work:
        """Only the matched sequences train; the mismatched ones get forwards alone (policy and reference, in
        `before_step`) for the KL estimate."""
        work = super().batch_work(batch)  # the reference's forward over every sequence
        trained, forward_only = (pass_counts(_half(batch, mismatched=side)) for side in (False, True))
        return dataclasses.replace(work, trained=trained, forward_only=forward_only)

    @torch.no_grad()
    def before_step(self, batches: list[Batch]) -> None:
        """The step's KL estimate, from the mismatched rows of all its micro-batches on all processes, stored in
        each batch as `kl` (a () tensor) for `batch_loss`."""
        log_ratios = []
        for batch in batches:
            mismatched = _half(batch, mismatched=True)
            log_ratios.append(forward_sequence_logps(self.model, mismatched)[0] - self.reference_logps(mismatched))
        kl = self.kl_estimate(log_ratios)
        for batch in batches:
            batch["kl"] = kl

    def kl_estimate(self, log_ratios: list[torch.Tensor]) -> torch.Tensor:
        """() the KL reference point z = max(0, mean of the mismatched sequences' log pi(y'|x) - log ref(y'|x)) over
        every process, detached: from this process's (sequences,) log-ratios of each micro-batch."""
        sums = torch.zeros(2, device=self.accelerator.device)
        for log_ratio in log_ratios:
            count = torch.tensor(float(len(log_ratio)), device=log_ratio.device)
            sums += torch.stack([log_ratio.detach().sum(), count])
        sums = self.accelerator.reduce(sums, reduction="sum")
        return (sums[0] / sums[1]).clamp(min=0)

    def batch_loss(self, model, batch: Batch) -> LossSum:
        n = batch["desirable"].shape[0]
        if "kl" in batch:  # training: the step's estimate; only the matched rows need a forward with gradients
            kl, batch = batch["kl"], _half(batch, mismatched=False)
        policy = forward_sequence_logps(model, batch)[0]
        reference = self.reference_logps(batch)
        if policy.shape[0] > n:  # evaluation: estimate on this batch's mismatched rows, over every process
            kl = self.kl_estimate([policy[n:] - reference[n:]])
        desirable = batch["desirable"]
        losses, rewards = kto_loss(
            policy[:n], reference[:n], desirable, kl, beta=self.settings.beta,
            desirable_weight=self.settings.desirable_weight, undesirable_weight=self.settings.undesirable_weight,
        )  # fmt: skip
        count = torch.tensor(n, device=policy.device)
        metrics = {
            "rewards/chosen": (rewards * desirable, desirable.sum()),
            "rewards/rejected": (rewards * ~desirable, (~desirable).sum()),
            "logps/chosen": (policy[:n].detach() * desirable, desirable.sum()),
            "logps/rejected": (policy[:n].detach() * ~desirable, (~desirable).sum()),
            "kl": (kl * n, count),
        }
        return LossSum(losses.sum(), count, metrics)


def _half(batch: Batch, mismatched: bool) -> Batch:
    """KTO's matched (first half of the rows) or mismatched (second half) sequences of a batch, numbered from 0;
    its other keys as they are."""
    n_rows = batch["input_ids"].shape[0] // 2
    half = batch.rows(slice(n_rows, None) if mismatched else slice(0, n_rows))
    if mismatched and half.layout is Layout.PACKED:
        n = batch["desirable"].shape[0]
        half["example_ids"] = torch.where(half["example_ids"] >= 0, half["example_ids"] - n, -1)
    return half


def _join(prompt_from: Example, completion_from: Example) -> Example:
    """The prompt of one example followed by the completion of another (prompt tokens unsupervised)."""
    split_a = prompt_length(prompt_from)
    split_b = prompt_length(completion_from)
    ids = prompt_from.input_ids[:split_a] + completion_from.input_ids[split_b:]
    return Example(ids, [IGNORE_INDEX] * split_a + completion_from.labels[split_b:])
