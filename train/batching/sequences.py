"""How preference batches lay out their sequences, and the summed log-probs of each: one sequence per row (padded),
packed rows (`example_ids` number the sequences), or shared-prompt rows (a pair's common prefix once, both responses
after it). Every layout numbers a batch of n pairs' sequences the same way: chosen 0..n-1, rejected n..2n-1."""

from __future__ import annotations

import torch

from train.loop.trainer import forward_supervised
from train.objectives.losses import selected_sequence_logps, token_logps


def forward_sequence_logps(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(sequences,) summed log-probs of the batch's responses under `model`, and their token counts, in the order of
    its layout: one sequence per row, packed rows numbered by `example_ids`, or shared-prompt rows
    (`collate_shared_prompt`). Logits exist only at the positions a supervised token follows."""
    if "logit_rows" not in batch:
        logits, keep = forward_supervised(model, batch)
        return selected_sequence_logps(logits, batch["labels"], keep, example_ids=batch.get("example_ids"))
    inputs = {key: batch[key] for key in ("input_ids", "position_ids", "attention_mask")}
    logits = model(**inputs, logits_to_keep=batch["keep"]).logits
    # the prompt's last position predicts both responses' first tokens: its logits row is used twice
    logps = token_logps(logits[batch["logit_rows"]], batch["targets"])
    n = 2 * batch["input_ids"].shape[0]
    sums = torch.zeros(n, dtype=torch.float32, device=logps.device).index_add(0, batch["target_sequences"], logps)
    return sums, torch.bincount(batch["target_sequences"], minlength=n)


def n_sequences(batch: dict[str, torch.Tensor]) -> int:
    """The sequences a batch holds: one per row, as many as its packed rows' `example_ids` number, or two per
    shared-prompt row."""
    if "example_ids" in batch:
        return int(batch["example_ids"].max()) + 1
    return batch["input_ids"].shape[0] * (2 if "logit_rows" in batch else 1)
