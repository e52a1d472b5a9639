"""The batch layout: how a micro-batch lays out its sequences in rows. One value, decided once from the config by
`decide_layout` (validation reports its problems, the run builds the data with its layout), then carried by the data
(every store's `layout`) and by every collated batch (`Batch.layout`, train/batching/collate.py). Code reads the value;
nothing infers it from a store type, an item type or the keys of a batch.

    PADDED         one sequence per row, right-padded to the micro-batch's longest; a 2D attention_mask
    PACKED         several sequences per row (data.packing=true): position_ids restart at 0 for each, `example_ids`
                   number them, no attention mask
    SHARED_PROMPT  one preference pair per row (data.shared_prompt): the prompt once, then the chosen and the rejected
                   response, a 4D attention mask that hides the chosen response from the rejected one

Evaluation data is never packed: a packed run evaluates PADDED batches (`Layout.for_evaluation`).
"""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # validation (train/app/validate.py) imports this module; it needs only their types
    from train.app.config import DataConfig
    from train.app.loss_registry import LossSpec


class Layout(enum.Enum):
    PADDED = "padded"
    PACKED = "packed"
    SHARED_PROMPT = "shared_prompt"

    @property
    def for_evaluation(self) -> Layout:
        """The layout of the evaluation data of a run that trains in this one: the same, except that evaluation
        examples are never packed (each evaluation batch is a slice of the examples, in order)."""
        return Layout.PADDED if self is Layout.PACKED else self


def decide_layout(data: DataConfig, attn_implementation: str, loss: LossSpec) -> tuple[Layout, list[str]]:
    """The training data's layout from data.packing, data.shared_prompt (null: wherever it applies),
    model.attn_implementation and what the loss's trainer supports; and the problems of that choice (validation
    reports them before anything loads, so the run always gets a layout without problems).

    data.shared_prompt=null turns the shared prompt on where it gives the same log-probs with less compute: a loss
    that supports it, unpacked, under sdpa (the 4D mask), and whose trainer forwards pairs the paired trainer's way
    (a trainer with its own batch_loss may expect two rows per pair: it opts in with data.shared_prompt=true).
    """
    which = f"loss={loss.name} ({loss.trainer_path})"
    problems = []
    if data.packing and not loss.supports_packing:
        problems.append(f"data.packing=true: {which} does not support packing; set data.packing=false")
    if data.shared_prompt:
        if not loss.supports_shared_prompt:
            problems.append(f"data.shared_prompt=true: {which} does not support it (paired losses on a causal LM do)")
        if data.packing:
            problems.append("data.shared_prompt=true and data.packing=true: pick one (a pair's row is laid out by one)")
        if attn_implementation != "sdpa":
            problems.append(
                f"data.shared_prompt=true needs model.attn_implementation=sdpa (its 4D attention mask), not "
                f"{attn_implementation}"
            )
    if data.packing:
        return Layout.PACKED, problems
    shared = data.shared_prompt
    if shared is None:
        # a trainer class that does not say (any BasicTrainer subclass outside the paired family) gets no default
        by_default = getattr(loss.trainer, "shared_prompt_by_default", False)
        shared = loss.supports_shared_prompt and by_default and attn_implementation == "sdpa"
    return (Layout.SHARED_PROMPT if shared else Layout.PADDED), problems
