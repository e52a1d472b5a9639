"""The optimizer and the learning-rate schedule: torch's AdamW (plain or fused), transformers' Adafactor, bitsandbytes'
8-bit AdamW; a warmup-stable-decay schedule (transformers' formulas), of which cosine and linear decay are the special
case with no stable phase."""

from __future__ import annotations

import functools
import math

import torch

from train.app.config import OPTIMIZERS, SCHEDULERS
from train.errors import HalyardError


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """The trainable parameters in two groups: matrices decayed, biases and norm scales not."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in trainable if p.ndim >= 2], "weight_decay": weight_decay},
        {"params": [p for p in trainable if p.ndim < 2], "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


def build_optimizer(
    model: torch.nn.Module,
    *,
    lr: float,
    weight_decay: float,
    name: str = "adamw",
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
) -> torch.optim.Optimizer:
    """The optimizer `name` (one of OPTIMIZERS) over the trainable parameters; weight decay on matrices only.

    Adafactor runs as a plain optimizer with this lr (no relative step, no parameter scaling) and no first moment;
    it keeps its own second-moment decay (step^-0.8) and epsilons, so `betas` and `eps` do not apply to it.
    """
    groups = parameter_groups(model, weight_decay)
    if name in ("adamw", "adamw_fused"):
        # fused: one kernel for the whole update (CUDA, CPU, MPS); plain uses torch's default multi-tensor path.
        return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps, fused=name == "adamw_fused" or None)
    if name == "adafactor":
        from transformers.optimization import Adafactor  # imported here: it pulls in much of transformers

        return Adafactor(groups, lr=lr, scale_parameter=False, relative_step=False, warmup_init=False)
    if name == "adamw_8bit":
        try:
            import bitsandbytes
        except ImportError:
            raise HalyardError(
                "optimizer.name=adamw_8bit needs the bitsandbytes package: pip install bitsandbytes, or use adamw"
            ) from None
        return bitsandbytes.optim.AdamW8bit(groups, lr=lr, betas=tuple(betas), eps=eps)
    raise HalyardError(f"optimizer.name={name!r}: must be one of {list(OPTIMIZERS)}")


def warmup_steps_of(total_steps: int, *, warmup_steps: int | None, warmup_ratio: float) -> int:
    """Warmup length in steps: `warmup_steps` when set, else `warmup_ratio` of the run; never the whole run."""
    steps = warmup_steps if warmup_steps is not None else round(warmup_ratio * total_steps)
    return min(steps, max(total_steps - 1, 0))


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    total_steps: int,
    *,
    name: str = "cosine",
    warmup_steps: int = 0,
    min_lr_ratio: float = 0.0,
    decay_ratio: float = 0.1,
) -> torch.optim.lr_scheduler.LRScheduler:
    """The multiplier of lr at step t (0-based; w warmup steps, T total steps, m = min_lr_ratio):

    - warmup (t < w): m + (1 - m) t / w, rising linearly to 1;
    - cosine: m + (1 - m) (1 + cos(pi p)) / 2, p = (t - w) / (T - w);  linear: m + (1 - m) (1 - p);
    - constant: 1 after warmup (m does not apply);
    - warmup_stable_decay: 1 until the last d = round(decay_ratio T) steps, then m + (1 - m)(1 - q) over them,
      q = (t - (T - d)) / d.
    Every schedule reaches m (0 by default) at step T.
    """
    if name not in SCHEDULERS:
        raise HalyardError(f"lr_scheduler={name!r}: must be one of {list(SCHEDULERS)}")
    decay = total_steps - warmup_steps
    if name == "warmup_stable_decay":
        decay = min(round(decay_ratio * total_steps), total_steps - warmup_steps)
    multiplier = functools.partial(
        lr_multiplier, name=name, total_steps=total_steps, warmup_steps=warmup_steps, decay_steps=decay,
        min_lr_ratio=min_lr_ratio,
    )  # fmt: skip
    # A partial, not a lambda: LambdaLR's state_dict (the checkpoint's scheduler.json) keeps what it can serialize.
    return torch.optim.lr_scheduler.LambdaLR(optimizer, multiplier)


def lr_multiplier(
    step: int, *, name: str, total_steps: int, warmup_steps: int, decay_steps: int, min_lr_ratio: float
) -> float:
    """build_scheduler's multiplier of lr at `step`, the formulas of its docstring: transformers' warmup-stable-decay
    and constant-with-warmup schedules (the same arithmetic), written here because importing transformers'
    scheduler module imports its Trainer's utilities, and with them peft and bitsandbytes: 1.8 s of every run's
    start-up on a 2-core CPU, for two formulas."""
    if name == "constant":
        return step / max(1, warmup_steps) if step < warmup_steps else 1.0
    floor = min_lr_ratio
    if step < warmup_steps:
        return max(0.0, step / max(1, warmup_steps) * (1.0 - floor) + floor)
    decay_start = total_steps - decay_steps  # after warmup and the stable phase (none for cosine and linear)
    if step < decay_start:
        return 1.0
    if step < total_steps:
        progress = (step - decay_start) / max(1, decay_steps)
        shape = 0.5 * (1.0 + math.cos(math.pi * progress)) if name == "cosine" else 1.0 - progress
        return max(0.0, shape * (1.0 - floor) + floor)
    return floor
