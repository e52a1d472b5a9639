"""The trainer's parts from the config (train/app/assemble.py): what the log says about batching, the batch plan's
refusal of data smaller than one batch, and the loop's settings."""

import logging
from types import SimpleNamespace

import numpy as np
import pytest

import launch
from conftest import DEMO_TRAIN, REPO
from train.app.assemble import batch_plan, batching_choice, log_every_steps_of, loop_settings
from train.app.loss_registry import loss_spec
from train.batching.layout import Layout
from train.errors import DataError
from train.objectives.sft import SFTTrainer

ONE_PROCESS = SimpleNamespace(num_processes=1, process_index=0)


class FakeStore:
    """What batch_plan reads of the training data: its layout, size, lengths and kind (and packed rows' members)."""

    kind = "sft"

    def __init__(self, n: int, layout: Layout = Layout.PADDED, members: int = 0):
        self.n, self.layout, self.members = n, layout, list(range(members))

    def __len__(self):
        return self.n

    def lengths(self):
        return np.arange(1, self.n + 1)


def sft_config(*overrides):
    return launch.compose_config(["model=tiny", f"datasets=[{DEMO_TRAIN}]", "model.batch_size=8", *overrides])


def test_the_batching_choice_is_said_in_the_log():
    assert batching_choice(packed=True, grouped=True) == "batches: packed rows (data.packing=true), no padding"
    assert "examples of similar length together" in batching_choice(packed=False, grouped=True)
    assert batching_choice(packed=False, grouped=False) == (
        "batches: random examples padded to each micro-batch's longest (data.group_by_length=true pads less)"
    )


def test_the_plan_covers_whole_batches_and_says_what_is_left_out(caplog):
    with caplog.at_level(logging.INFO, logger="train.app.assemble"):
        plan = batch_plan(sft_config(), ONE_PROCESS, FakeStore(20), SFTTrainer)
    assert (plan.steps_per_epoch, plan.batch_size) == (2, 8)
    assert "each epoch trains on 16 of 20 examples" in caplog.text
    assert batching_choice(packed=False, grouped=True) in caplog.text  # data.group_by_length=true, the default


def test_data_smaller_than_one_batch_is_a_data_error():
    with pytest.raises(DataError) as error:
        batch_plan(sft_config(), ONE_PROCESS, FakeStore(5), SFTTrainer)
    assert str(error.value) == (
        "the training data has 5 examples, fewer than model.batch_size=8 examples; lower the batch size or add data"
    )
    with pytest.raises(DataError) as error:
        batch_plan(sft_config(), ONE_PROCESS, FakeStore(5, Layout.PACKED, members=12), SFTTrainer)
    assert str(error.value) == (
        "the training data packs into 5 rows (12 examples in rows of up to 128 tokens, from model.max_length=128), "
        "fewer than model.batch_size=8 packed rows; lower the batch size or add data"
    )


def test_a_lora_reward_model_is_saved_merged_too():
    """save_merged=adapter (the default) becomes both for a reward model: it is used merged (scripts/score.py)."""
    common = ["model=tiny", "++model.use_peft=true", "save_dtype=float32"]
    reward = launch.compose_config(["loss=rm", f"datasets=[{REPO}/data/demo/pref_train.jsonl]", *common])
    assert reward.save_merged == "adapter"
    assert loop_settings(reward, loss_spec(reward).trainer, total_steps=10).save_merged == "both"
    sft = sft_config(*common)
    assert loop_settings(sft, loss_spec(sft).trainer, total_steps=10).save_merged == "adapter"


def test_logging_is_scaled_to_the_run_by_default(caplog):
    """log_every_steps=null (the default) writes about 50 metrics lines however long the run: every step of a short
    run, every 20th of 1000; a set value is kept. The log says what was chosen."""
    cfg = sft_config("save_dtype=float32")  # auto would read the model's config.json
    assert cfg.log_every_steps is None
    with caplog.at_level(logging.INFO, logger="train.app.assemble"):
        assert loop_settings(cfg, SFTTrainer, total_steps=30).log_every_steps == 1
    assert "log_every_steps=null: a metrics line every 1 step(s) of 30" in caplog.text
    assert [log_every_steps_of(n, None) for n in (1, 99, 100, 1000, 1049)] == [1, 1, 2, 20, 20]
    assert (
        loop_settings(
            sft_config("log_every_steps=7", "save_dtype=float32"), SFTTrainer, total_steps=1000
        ).log_every_steps
        == 7
    )
