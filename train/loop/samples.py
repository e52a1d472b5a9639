"""Generated answers to held-out prompts at each evaluation (`eval_samples`): samples.jsonl and a wandb table."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from train.data.store import IGNORE_INDEX, TokenStore, token_sequences
from train.loop.distributed import is_sharded


@torch.no_grad()
def write_samples(
    accelerator, model, tokenizer, eval_data: TokenStore, n_prompts: int, max_new_tokens: int, step: int, path: Path
) -> None:
    """Greedy answers to the first `n_prompts` held-out prompts, appended to `path` (and logged to wandb if on).

    A sharded model must run on every process in step (synced_gpus); otherwise only the main process generates.
    """
    model = accelerator.unwrap_model(model)
    sharded = is_sharded(model)
    if not (sharded or accelerator.is_main_process):
        return
    was_training = model.training
    model.eval()
    rows = []
    for item in eval_data[:n_prompts]:
        example = token_sequences(item)[0]  # a pair's prompt and chosen answer
        prompt_length = next(i for i, label in enumerate(example.labels) if label != IGNORE_INDEX)
        prompt = torch.tensor([example.input_ids[:prompt_length]], device=accelerator.device)
        output = model.generate(
            input_ids=prompt,
            attention_mask=torch.ones_like(prompt),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            use_cache=True,
            pad_token_id=tokenizer.pad_token_id,
            synced_gpus=sharded,
        )
        reference = [t for t, label in zip(example.input_ids, example.labels, strict=True) if label != IGNORE_INDEX]
        rows.append(
            {
                "step": step,
                "prompt": tokenizer.decode(prompt[0]),
                "completion": tokenizer.decode(output[0, prompt_length:], skip_special_tokens=True),
                "reference": tokenizer.decode(reference, skip_special_tokens=True),
            }
        )
    model.train(was_training)
    if accelerator.is_main_process:
        with path.open("a") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)
        if any(t.name == "wandb" for t in accelerator.trackers):
            columns = ["step", "prompt", "completion", "reference"]
            table = [[row[c] for c in columns] for row in rows]
            accelerator.get_tracker("wandb").log_table("samples", columns=columns, data=table, step=step)
