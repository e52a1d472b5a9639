"""The optimizer and the learning-rate schedule."""

from __future__ import annotations

import torch


def build_optimizer(model: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters; weight decay on matrices only (biases and norm scales are not decayed)."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in trainable if p.ndim >= 2], "weight_decay": weight_decay},
        {"params": [p for p in trainable if p.ndim < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr)


def build_scheduler(
    optimizer: torch.optim.Optimizer, warmup_ratio: float, total_steps: int
) -> torch.optim.lr_scheduler.LRScheduler:
    """Linear warmup over the first `warmup_ratio` of the steps, then cosine decay to 0 at `total_steps`."""
    from transformers import get_cosine_schedule_with_warmup  # imported here: it pulls in much of transformers

    return get_cosine_schedule_with_warmup(optimizer, round(warmup_ratio * total_steps), total_steps)
