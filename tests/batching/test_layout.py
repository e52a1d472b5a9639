"""The batch layout (train/batching/layout.py): decided once from data.packing, data.shared_prompt, the attention
implementation and what the loss supports; every conflict reported as a problem; evaluation data never packed."""

import pytest

from train.app.config import DataConfig
from train.app.loss_registry import builtin_losses, resolve_loss
from train.batching.layout import Layout, decide_layout


def spec(name: str):
    found, problems = resolve_loss(name, builtin_losses()[name])
    assert problems == []
    return found


@pytest.mark.parametrize(
    ("data", "attn", "loss", "layout"),
    [
        (DataConfig(packing=True), "sdpa", "sft", Layout.PACKED),
        (DataConfig(packing=True), "eager", "dpo", Layout.PACKED),
        (DataConfig(), "sdpa", "dpo", Layout.SHARED_PROMPT),  # shared_prompt=null: on wherever it applies
        (DataConfig(), "eager", "dpo", Layout.PADDED),  # its 4D mask needs sdpa
        (DataConfig(), "sdpa", "sft", Layout.PADDED),  # not a paired loss
        (DataConfig(), "sdpa", "rm", Layout.PADDED),  # a paired trainer that does not support it
        (DataConfig(shared_prompt=False), "sdpa", "dpo", Layout.PADDED),
        (DataConfig(shared_prompt=True), "sdpa", "dpo", Layout.SHARED_PROMPT),
    ],
)
def test_the_layout_follows_the_data_settings_the_attention_and_the_loss(data, attn, loss, layout):
    assert decide_layout(data, attn, spec(loss)) == (layout, [])


def test_conflicting_settings_give_every_problem():
    layout, problems = decide_layout(DataConfig(packing=True, shared_prompt=True), "eager", spec("sft"))
    assert layout is Layout.PACKED
    assert problems == [
        "data.shared_prompt=true: loss=sft (train.objectives.sft.SFTTrainer) does not support it (paired losses on a "
        "causal LM do)",
        "data.shared_prompt=true and data.packing=true: pick one (a pair's row is laid out by one)",
        "data.shared_prompt=true needs model.attn_implementation=sdpa (its 4D attention mask), not eager",
    ]
    layout, problems = decide_layout(DataConfig(packing=True), "sdpa", spec("rm"))
    assert len(problems) == 1 and "data.packing=true: loss=rm" in problems[0]
    assert problems[0].endswith("does not support packing; set data.packing=false")


def test_evaluation_data_is_never_packed():
    assert Layout.PACKED.for_evaluation is Layout.PADDED
    assert Layout.PADDED.for_evaluation is Layout.PADDED
    assert Layout.SHARED_PROMPT.for_evaluation is Layout.SHARED_PROMPT
