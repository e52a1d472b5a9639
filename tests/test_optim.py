"""The optimizer's weight-decay groups and the learning-rate schedule, against hand-derived values."""

import math

import pytest
import torch

from train.optim import build_optimizer, build_scheduler


def test_weight_decay_applies_to_matrices_only_and_frozen_parameters_are_left_out():
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3), torch.nn.Linear(3, 2, bias=False))
    model[2].weight.requires_grad_(False)
    optimizer = build_optimizer(model, lr=0.1, weight_decay=0.01)
    decayed, not_decayed = optimizer.param_groups
    assert decayed["weight_decay"] == 0.01 and not_decayed["weight_decay"] == 0.0
    assert [p.shape for p in decayed["params"]] == [(3, 4)]  # the trainable matrix
    assert [p.shape for p in not_decayed["params"]] == [(3,), (3,), (3,)]  # its bias, the norm's weight and bias
    assert all(group["lr"] == 0.1 for group in optimizer.param_groups)


def test_an_adapter_only_model_gets_one_group():
    model = torch.nn.Linear(4, 3)
    model.bias.requires_grad_(False)
    assert len(build_optimizer(model, lr=0.1, weight_decay=0.0).param_groups) == 1


@pytest.mark.parametrize(("warmup_ratio", "total_steps"), [(0.25, 8), (0.0, 5)])
def test_linear_warmup_then_cosine_decay_to_zero(warmup_ratio, total_steps):
    optimizer = build_optimizer(torch.nn.Linear(2, 2), lr=2.0, weight_decay=0.0)
    scheduler = build_scheduler(optimizer, warmup_ratio, total_steps)
    warmup = round(warmup_ratio * total_steps)
    rates = []
    for _ in range(total_steps + 1):
        rates.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    expected = [
        2.0 * step / warmup if step < warmup else 2.0 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / (total_steps - warmup)))
        for step in range(total_steps + 1)
    ]  # fmt: skip
    assert rates == pytest.approx(expected, abs=1e-12)
    assert rates[-1] == pytest.approx(0.0, abs=1e-12)
