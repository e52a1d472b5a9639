"""How preference batches lay out their sequences, and the summed log-probs of each, by the batch's layout: one
sequence per row (padded), packed rows (`example_ids` number the sequences), or shared-prompt rows (a pair's common
prefix once, both responses after it). Every layout numbers a batch of n pairs' sequences the same way: chosen
0..n-1, rejected n..2n-1."""

from __future__ import annotations

import torch

from train.batching.collate import Batch
from train.batching.layout import Layout
from train.loop.profile import phase
from train.loop.trainer import forward_supervised
from train.objectives.losses import selected_sequence_logps, token_logps


def forward_sequence_logps(model, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(sequences,) summed log-probs of the batch's responses under `model`, and their token counts, in the order of
    its layout: one sequence per row, packed rows numbered by `example_ids`, or shared-prompt rows
    (`collate_shared_prompt`). Logits exist only at the positions a supervised token follows."""
    if batch.layout is not Layout.SHARED_PROMPT:
        logits, keep = forward_supervised(model, batch)
        return selected_sequence_logps(logits, batch["labels"], keep, example_ids=batch.example_ids)
    inputs = {key: batch[key] for key in ("input_ids", "position_ids", "attention_mask")}
    with phase("forward"):
        logits = model(**inputs, logits_to_keep=batch["keep"]).logits
    # the prompt's last position predicts both responses' first tokens: its logits row is used twice
    logps = token_logps(logits[batch["logit_rows"]], batch["targets"])
    n = 2 * batch["input_ids"].shape[0]
    sums = torch.zeros(n, dtype=torch.float32, device=logps.device).index_add(0, batch["target_sequences"], logps)
    return sums, torch.bincount(batch["target_sequences"], minlength=n)


def n_sequences(batch: Batch) -> int:
    """The sequences a batch holds: one per row, as many as its packed rows' `example_ids` number, or two per
    shared-prompt row."""
    match batch.layout:
        case Layout.PACKED:
            return int(batch["example_ids"].max()) + 1
        case Layout.SHARED_PROMPT:
            return 2 * batch["input_ids"].shape[0]
        case Layout.PADDED:
            return batch["input_ids"].shape[0]
