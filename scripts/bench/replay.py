"""The exact forward passes a Halyard run trains on, rebuilt from its overrides with Halyard's own code (its
tokenized cache, batch plan and collation), saved for the bare loop (child.py, mode bare) to run: so the bare loop
and Halyard are compared on the same data, step by step and pass by pass, not merely on the same examples."""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace

MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids", "labels")  # what the bare loop hands the model


def halyard_passes(overrides: list[str], steps: int) -> list[list[dict]]:
    """Each of the first `steps` optimizer steps of the run these overrides configure (one process), as the list of
    its forward passes' tensors, collated as the run collates them. The data comes from the run's cache_dir."""
    import launch
    from train.app.assemble import batch_plan
    from train.app.loss_registry import loss_spec
    from train.app.models import build_tokenizer
    from train.batching.collate import collate_batch
    from train.batching.layout import decide_layout
    from train.batching.plan import StepBatches
    from train.data.datasets import build_datasets

    cfg = launch.compose_config(overrides)
    spec = loss_spec(cfg)
    tokenizer = build_tokenizer(cfg.model, cfg.data.chat_template)
    layout = decide_layout(cfg.data, cfg.model.attn_implementation, spec)[0]
    train_data = build_datasets(cfg, tokenizer, spec.data_kind, None, layout)[0]
    one_process = SimpleNamespace(num_processes=1, process_index=0)
    plan = batch_plan(cfg, one_process, train_data, spec.trainer)
    pad = tokenizer.pad_token_id

    def collate(items, layout):
        return collate_batch(items, layout, pad)

    batches = StepBatches(plan, train_data, collate, 0, steps)
    return [[{k: b[k] for k in MODEL_INPUTS if k in b} for b in batches[i][1]] for i in range(len(batches))]


def save_passes(passes: list[list[dict]], path: Path) -> None:
    """One safetensors file: tensor `<step>.<pass>.<key>` for each step, pass and model input."""
    from safetensors.torch import save_file

    save_file(
        {
            f"{s}.{p}.{key}": t.contiguous()
            for s, step in enumerate(passes)
            for p, b in enumerate(step)
            for key, t in b.items()
        },
        path,
    )


def load_passes(path: Path) -> list[list[dict]]:
    """The steps saved by `save_passes`, in order."""
    from safetensors.torch import load_file

    saved = load_file(path)
    steps: dict[int, dict[int, dict]] = {}
    for name, tensor in saved.items():
        step, index, key = re.fullmatch(r"(\d+)\.(\d+)\.(\w+)", name).groups()
        steps.setdefault(int(step), {}).setdefault(int(index), {})[key] = tensor
    return [[passes[i] for i in sorted(passes)] for _, passes in sorted(steps.items())]


def supervised_tokens(step: list[dict]) -> int:
    """Supervised tokens of one step's passes, as Halyard counts them (a label after the first position)."""
    return sum(int((b["labels"][:, 1:] != -100).sum()) for b in step)
