"""Optimizers and learning-rate schedules against hand-derived values, and their exact resume through checkpoint I/O."""

import json
import math
import subprocess
import sys

import pytest
import torch

from conftest import REPO
from train.errors import HalyardError
from train.loop import checkpoint
from train.loop.optim import build_optimizer, build_scheduler, warmup_steps_of


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


def one_matrix(values) -> torch.nn.Module:
    """A module whose only parameter is a float64 matrix (gets weight decay) with the given values."""
    module = torch.nn.Module()
    module.weight = torch.nn.Parameter(torch.tensor(values, dtype=torch.float64))
    return module


def step_with(optimizer, param, gradient) -> None:
    param.grad = torch.tensor(gradient, dtype=torch.float64)
    optimizer.step()


@pytest.mark.parametrize("name", ["adamw", "adamw_fused"])
def test_adamw_two_steps_match_the_hand_computed_update(name):
    """Two steps so the betas matter (after one, bias correction cancels them); eps and decay are non-default."""
    lr, wd, (b1, b2), eps = 0.1, 0.5, (0.8, 0.9), 0.1
    p0, g1, g2 = [[1.0, -2.0]], [[0.5, 1.0]], [[-1.0, 2.0]]
    model = one_matrix(p0)
    optimizer = build_optimizer(model, lr=lr, weight_decay=wd, name=name, betas=(b1, b2), eps=eps)
    assert optimizer.defaults["fused"] == (name == "adamw_fused" or None)
    step_with(optimizer, model.weight, g1)
    step_with(optimizer, model.weight, g2)
    for index in range(2):
        p, m, v = p0[0][index], 0.0, 0.0
        for t, g in enumerate((g1[0][index], g2[0][index]), start=1):
            m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g
            p = p * (1 - lr * wd) - lr * (m / (1 - b1**t)) / (math.sqrt(v / (1 - b2**t)) + eps)
        assert model.weight[0, index].item() == pytest.approx(p, rel=1e-12)


def test_adafactor_step_matches_the_hand_computed_update():
    """Without a first moment, the first step's second moment is g^2 (exactly, when g^2 has rank one, as here, for
    the factored matrix estimate), so the update is lr * sign(g), after decoupled weight decay."""
    lr, wd = 0.01, 0.5
    p0 = [[1.0, 2.0, -1.0], [0.5, -0.5, 3.0]]
    gradient = [[a * b for b in (1.0, -2.0, 0.5)] for a in (3.0, -1.0)]  # an outer product: g^2 has rank one
    model = one_matrix(p0)
    optimizer = build_optimizer(model, lr=lr, weight_decay=wd, name="adafactor")
    step_with(optimizer, model.weight, gradient)
    flat_p, flat_g = sum(p0, []), sum(gradient, [])
    expected = [p * (1 - lr * wd) - lr * math.copysign(1, g) for p, g in zip(flat_p, flat_g, strict=True)]
    assert model.weight.flatten().tolist() == pytest.approx(expected, rel=1e-9)


def test_8bit_adamw_without_bitsandbytes_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # as if not installed
    with pytest.raises(HalyardError, match="needs the bitsandbytes package: pip install bitsandbytes"):
        build_optimizer(torch.nn.Linear(2, 2), lr=0.1, weight_decay=0.0, name="adamw_8bit")


def expected_multiplier(name: str, t: int, total: int, warmup: int, floor: float, decay_ratio: float) -> float:
    if t < warmup:
        return floor + (1 - floor) * t / warmup
    if name == "constant":
        return 1.0
    if name == "warmup_stable_decay":
        decay = round(decay_ratio * total)
        if t < total - decay:
            return 1.0
        return floor + (1 - floor) * (1 - (t - (total - decay)) / decay)
    progress = (t - warmup) / (total - warmup)
    shape = (1 + math.cos(math.pi * progress)) / 2 if name == "cosine" else 1 - progress
    return floor + (1 - floor) * shape


@pytest.mark.parametrize(
    ("name", "warmup", "floor"),
    [("cosine", 2, 0.0), ("cosine", 0, 0.1), ("linear", 3, 0.2), ("constant", 2, 0.0), ("warmup_stable_decay", 2, 0.1)],
)
def test_each_schedule_matches_its_formula(name, warmup, floor):
    total, lr, decay_ratio = 10, 2.0, 0.3
    optimizer = build_optimizer(torch.nn.Linear(2, 2), lr=lr, weight_decay=0.0)
    scheduler = build_scheduler(
        optimizer, total, name=name, warmup_steps=warmup, min_lr_ratio=floor, decay_ratio=decay_ratio
    )
    rates = []
    for _ in range(total + 1):
        rates.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    expected = [lr * expected_multiplier(name, t, total, warmup, floor, decay_ratio) for t in range(total + 1)]
    assert rates == pytest.approx(expected, abs=1e-12)
    assert rates[-1] == pytest.approx(lr * (1.0 if name == "constant" else floor), abs=1e-12)


def test_warmup_in_steps_replaces_the_ratio_and_never_covers_the_whole_run():
    assert warmup_steps_of(100, warmup_steps=None, warmup_ratio=0.1) == 10
    assert warmup_steps_of(100, warmup_steps=7, warmup_ratio=0.1) == 7
    assert warmup_steps_of(5, warmup_steps=50, warmup_ratio=0.0) == 4


@pytest.mark.parametrize(("name", "schedule"), [("adamw", "cosine"), ("adamw_fused", "linear"),
                                                ("adafactor", "warmup_stable_decay")])  # fmt: skip
def test_resume_through_checkpoint_files_is_exact(tmp_path, name, schedule):
    """6 steps in one go == 3 steps, optimizer and schedule saved and loaded as checkpoints do, then 3 more."""

    def build(model):
        optimizer = build_optimizer(model, lr=0.05, weight_decay=0.1, name=name, betas=(0.8, 0.95), eps=1e-6)
        return optimizer, build_scheduler(optimizer, 6, name=schedule, warmup_steps=1, min_lr_ratio=0.1)

    def train(model, optimizer, scheduler, steps):
        for step in steps:
            torch.manual_seed(step)
            loss = model(torch.randn(4, 3)).pow(2).sum()
            loss.backward()
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)

    torch.manual_seed(0)
    initial = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    straight = torch.nn.Sequential(*[torch.nn.Linear(3, 4), torch.nn.Linear(4, 2)])
    straight.load_state_dict(initial.state_dict())
    train(straight, *build(straight), range(6))

    first = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    first.load_state_dict(initial.state_dict())
    optimizer, scheduler = build(first)
    train(first, optimizer, scheduler, range(3))
    checkpoint.save_optimizer(optimizer, tmp_path, rank=0)
    (tmp_path / "scheduler.json").write_text(json.dumps(scheduler.state_dict()))

    resumed = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    resumed.load_state_dict(first.state_dict())
    optimizer, scheduler = build(resumed)
    checkpoint.load_optimizer(optimizer, tmp_path, rank=0, sharded=False)
    scheduler.load_state_dict(json.loads((tmp_path / "scheduler.json").read_text()))
    train(resumed, optimizer, scheduler, range(3, 6))
    for a, b in zip(straight.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    ("name", "warmup", "floor", "decay_ratio"),
    [("cosine", 3, 0.0, 0.1), ("cosine", 0, 0.1, 0.1), ("linear", 4, 0.2, 0.1), ("constant", 5, 0.3, 0.1),
     ("warmup_stable_decay", 2, 0.1, 0.3), ("warmup_stable_decay", 3, 0.0, 0.01)],
)  # fmt: skip
def test_each_schedule_is_transformers_own_to_the_last_bit(name, warmup, floor, decay_ratio):
    """build_scheduler computes transformers' schedules itself (importing them costs every run 1.8 s of start-up):
    the same multipliers at every step, bit for bit, past the end of the run too."""
    from transformers import get_constant_schedule_with_warmup, get_wsd_schedule

    total = 23
    ours = build_scheduler(
        build_optimizer(torch.nn.Linear(2, 2), lr=1.0, weight_decay=0.0), total, name=name, warmup_steps=warmup,
        min_lr_ratio=floor, decay_ratio=decay_ratio,
    )  # fmt: skip
    theirs_optimizer = build_optimizer(torch.nn.Linear(2, 2), lr=1.0, weight_decay=0.0)
    if name == "constant":
        theirs = get_constant_schedule_with_warmup(theirs_optimizer, warmup)
    else:
        decay = min(round(decay_ratio * total), total - warmup) if name == "warmup_stable_decay" else total - warmup
        theirs = get_wsd_schedule(theirs_optimizer, num_warmup_steps=warmup, num_stable_steps=total - warmup - decay,
                                  num_decay_steps=decay, decay_type="cosine" if name == "cosine" else "linear",
                                  min_lr_ratio=floor)  # fmt: skip
    assert [ours.lr_lambdas[0](t) for t in range(total + 3)] == [theirs.lr_lambdas[0](t) for t in range(total + 3)]


def test_building_the_schedule_imports_neither_peft_nor_bitsandbytes():
    probe = (
        "import sys, torch\nfrom train.loop.optim import build_optimizer, build_scheduler\n"
        "build_scheduler(build_optimizer(torch.nn.Linear(2, 2), lr=1.0, weight_decay=0.0), 10, warmup_steps=2)\n"
        "print(sorted({'transformers.trainer_utils', 'peft', 'bitsandbytes'} & set(sys.modules)))"
    )
    imported = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, check=True)
    assert imported.stdout.strip() == "[]"
