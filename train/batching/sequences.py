"""How preference batches lay out their sequences, and the summed log-probs of each: one sequence per row (padded),
packed rows (`example_ids` number the sequences), or shared-prompt rows (a pair's common prefix once, both responses
after it). Every layout numbers a batch of n pairs' sequences the same way: chosen 0..n-1, rejected n..2n-1."""

from __future__ import annotations

import torch

from train.data.pipeline import collate_packed
from train.data.store import IGNORE_INDEX, Example, PairExample, concatenate
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


def collate_shared_prompt(pairs: list[PairExample], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Each pair as one row `shared prefix, chosen rest, rejected rest`, padded on the right. The shared prefix is
    the tokens both sequences start with, up to the first supervised token of either (the prompt, as a rule; less
    when, say, unsupervised reasoning opens one response). position_ids continue from the prefix into each rest,
    and attention_mask (pairs, 1, L, L) bool (True: may attend) is causal except that the rejected rest does not
    see the chosen one, so each sequence sees exactly what it would alone.

    Also: labels (pairs, L), each token where supervised (for counting); keep (pairs, L) bool, the positions whose
    logits are needed; and per supervised token, flat (targets,): `logit_rows` (its row among the kept logits; the
    prefix's last position serves both sequences), `targets` (its id) and `target_sequences` (pair j's chosen: j,
    its rejected: pairs + j); segment_lengths (2 x pairs): the tokens of the chosen sequence and of the rejected
    rest."""
    n = len(pairs)
    shared = [_shared_prefix_length(p) for p in pairs]
    longest = max(len(p.chosen.input_ids) + len(p.rejected.input_ids) - k for p, k in zip(pairs, shared, strict=True))
    input_ids = torch.full((n, longest), pad_token_id, dtype=torch.long)
    labels = torch.full((n, longest), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((n, longest), dtype=torch.long)
    mask = torch.eye(longest, dtype=torch.bool).repeat(n, 1, 1, 1)  # padding attends to itself only
    predictions = []  # (row, position, target, sequence)
    segments = [0] * (2 * n)
    for row, (pair, prefix) in enumerate(zip(pairs, shared, strict=True)):
        chosen, rejected = pair.chosen, pair.rejected
        c, r = len(chosen.input_ids), len(rejected.input_ids) - prefix  # the chosen sequence, the rejected rest
        input_ids[row, : c + r] = torch.tensor(chosen.input_ids + rejected.input_ids[prefix:])
        labels[row, :c] = torch.tensor(chosen.labels)
        labels[row, c : c + r] = torch.tensor(rejected.labels[prefix:])
        position_ids[row, : c + r] = torch.cat([torch.arange(c), torch.arange(prefix, prefix + r)])
        mask[row, 0, : c + r, : c + r] = torch.ones(c + r, c + r, dtype=torch.bool).tril()
        mask[row, 0, c : c + r, prefix:c] = False  # the rejected rest does not see the chosen rest
        for sequence, example, shift in ((row, chosen, 0), (n + row, rejected, c - prefix)):
            for t in range(len(example.labels) - 1):  # position t of the sequence predicts its token t + 1
                if example.labels[t + 1] != IGNORE_INDEX:
                    predictions.append((row, t if t < prefix else t + shift, example.labels[t + 1], sequence))
        segments[row], segments[n + row] = c, r
    keep = torch.zeros((n, longest), dtype=torch.bool)
    rows, positions, targets, sequences = (torch.tensor(column) for column in zip(*predictions, strict=True))
    keep[rows, positions] = True
    kept_index = keep.flatten().cumsum(0) - 1  # row-major order of the kept positions, as the logits come
    return {
        "input_ids": input_ids, "labels": labels, "position_ids": position_ids, "attention_mask": mask,
        "keep": keep, "logit_rows": kept_index[rows * longest + positions], "targets": targets,
        "target_sequences": sequences, "segment_lengths": torch.tensor(segments),
    }  # fmt: skip


def _shared_prefix_length(pair: PairExample) -> int:
    """Tokens both sequences of a pair start with, before the first supervised token of either."""
    limit = min(prompt_length(pair.chosen), prompt_length(pair.rejected))
    chosen, rejected = pair.chosen.input_ids, pair.rejected.input_ids
    return next((i for i in range(limit) if chosen[i] != rejected[i]), limit)


def collate_sequences(rows: list[list[Example]], order: list[int], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Sequences packed row by row (position_ids restarting per sequence, see `collate_packed`), numbered in
    `example_ids` so that the sequence at flat position k of `rows` is sequence `order[k]`: the numbering an unpacked
    batch of the same sequences would give its rows."""
    batch = collate_packed([concatenate(row) for row in rows], pad_token_id)
    numbering = torch.tensor([*order, -1])  # index -1 (padding) maps to -1
    batch["example_ids"] = numbering[batch["example_ids"]]
    return batch


def prompt_length(example: Example) -> int:
    """Tokens before the first supervised one: the prompt, as a rule."""
    return next(i for i, label in enumerate(example.labels) if label != IGNORE_INDEX)
