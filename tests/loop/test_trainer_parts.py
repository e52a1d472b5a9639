"""BasicTrainer built from its parts, with a fake model and a fake loss: no config, no data files, no `__new__`."""

import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from accelerate import Accelerator

from train.app.config import LossConfig
from train.batching.collate import Batch
from train.batching.layout import Layout
from train.batching.plan import BatchPlan
from train.loop.card import CardInfo
from train.loop.throughput import Throughput, Work
from train.loop.trainer import BasicTrainer, LoopSettings, TrainerParts
from train.objectives.losses import LossSum


class SquaredError(BasicTrainer):
    """A fake loss: the squared error of a linear model's output, one unit per row."""

    def loss_units(self, batch):
        return torch.tensor(len(batch["y"]))

    def batch_loss(self, model, batch):
        return LossSum((model(batch["x"]).squeeze(-1) - batch["y"]).pow(2).sum(), torch.tensor(len(batch["y"])))

    def batch_work(self, batch):
        return Work()  # no tokens: nothing for the throughput meter


class FakeStore:
    layout = Layout.PADDED

    def __len__(self):
        return 3

    def fingerprint(self):
        return "fake"


def settings(run_dir: Path, **changes) -> LoopSettings:
    card = CardInfo(base_model="fake", loss="squared_error", datasets=[], eval_datasets=[], lora=None, settings={})
    values = dict(
        run_dir=run_dir, config_text="", eval_every_steps=100, log_every_steps=1, eval_batch_size=1,
        max_grad_norm=None, on_nonfinite="stop", num_workers=0, eval_samples=0, eval_samples_max_new_tokens=1,
        save_every_steps=None, save_total_limit=None, resume_allow_config_change=False, use_peft=False,
        save_merged="adapter", save_dtype=torch.float32, card=card,
    )  # fmt: skip
    return LoopSettings(**{**values, **changes})


def build(tmp_path, **changes) -> SquaredError:
    model = torch.nn.Linear(2, 1, bias=False)
    torch.nn.init.zeros_(model.weight)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    parts = TrainerParts(
        model=model,
        optimizer=optimizer,
        scheduler=torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0),
        tokenizer=SimpleNamespace(pad_token_id=0),
        train_data=FakeStore(),
        eval_data=None,
        batch_plan=BatchPlan(n_items=3, batch_size=3, n_processes=1, rank=0, accumulation_steps=2, seed=0),
        total_steps=1,
        throughput=Throughput(),
    )
    return SquaredError(settings(tmp_path, **changes), LossConfig(), Accelerator(cpu=True), parts)


# Two micro-batches of one step: rows x = (1, 0), (0, 1) with targets 1, 2; then x = (1, 1) with target 3.
MICRO_BATCHES = [
    Batch({"x": torch.tensor([[1.0, 0.0], [0.0, 1.0]]), "y": torch.tensor([1.0, 2.0])}, Layout.PADDED),
    Batch({"x": torch.tensor([[1.0, 1.0]]), "y": torch.tensor([3.0])}, Layout.PADDED),
]


def test_a_trainer_built_from_parts_takes_an_exact_step(tmp_path):
    trainer = build(tmp_path)
    result = trainer.train_step(MICRO_BATCHES)
    # w = 0: the step's loss is (1 + 4 + 9) / 3 rows, whatever the split into micro-batches.
    assert result.loss == pytest.approx(14 / 3)
    # gradient of (1/3) sum (w.x - y)^2 at w = 0: (2/3) sum -y x = (2/3) (-(1, 0) - 2 (0, 1) - 3 (1, 1)) = (-8/3, -10/3)
    assert result.grad_norm == pytest.approx(2 / 3 * math.sqrt(41))
    # SGD at lr 0.5: w = (4/3, 5/3)
    assert trainer.model.weight.detach().flatten().tolist() == pytest.approx([4 / 3, 5 / 3])
    assert not result.stop_requested


def test_the_loop_settings_reach_the_step(tmp_path):
    clipped = build(tmp_path, max_grad_norm=1.0)
    result = clipped.train_step(MICRO_BATCHES)
    assert result.grad_norm == pytest.approx(2 / 3 * math.sqrt(41))  # reported before clipping
    # clipped to norm 1: w = -0.5 x (-4, -5) / sqrt(41)
    expected = [0.5 * 4 / math.sqrt(41), 0.5 * 5 / math.sqrt(41)]
    assert clipped.model.weight.detach().flatten().tolist() == pytest.approx(expected, rel=1e-5)
