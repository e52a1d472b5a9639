"""Generated answers to held-out prompts at each evaluation (`eval_samples`): samples.jsonl and a wandb table, and
their rewards under a reward model (`eval_reward_model`): each answer's in samples.jsonl, the mean as `samples/reward`.

Scoring a prompt and an answer with a reward model is done here for scripts/score.py too: one home."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from train.data.store import IGNORE_INDEX, Example, TokenStore, token_sequences
from train.errors import DataError, HalyardError
from train.loop.distributed import is_sharded

REWARD_METRIC = "samples/reward"  # the mean reward of an evaluation's samples


@dataclass
class SampleRewards:
    """A reward model (a `loss=rm` run's FINAL/: a sequence classifier with one output), frozen, and the prompts of
    the samples it scores as messages (read from the evaluation data: train/app/assemble.py), so that each prompt and
    answer is rendered with the reward model's own tokenizer and chat template, as scripts/score.py renders a row."""

    model: torch.nn.Module  # eval mode, no gradients, on the training device
    tokenizer: object  # the reward model's
    prompts: list[list[dict]]  # the messages of the first eval_samples evaluation examples' prompts, in order
    max_length: int  # tokens per scored sequence (model.max_length)
    batch_size: int  # sequences per forward pass

    def score(self, completions: list[str]) -> list[float | None]:
        """The reward of each completion, the answer to the prompt of the same position; None for an answer that
        cannot be scored as a turn (an empty one: the model ended its turn at once)."""
        examples, scored = [], []
        for index, (prompt, completion) in enumerate(zip(self.prompts, completions, strict=False)):
            try:
                examples.append(reward_example(prompt, completion, f"sample {index}", self.tokenizer, self.max_length))
            except DataError:
                continue
            scored.append(index)
        rewards: list[float | None] = [None] * len(completions)
        for index, value in zip(scored, reward_scores(self.model, examples, self.batch_size), strict=True):
            rewards[index] = value
        return rewards


def load_reward_model(path: str | Path, device: torch.device | str = "cpu"):
    """(model, tokenizer) of a reward model folder: frozen, in eval mode, in float32 on `device`."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32).to(device).eval()
    model.requires_grad_(False)
    return model, tokenizer


def reward_example(prompt, completion, where: str, tokenizer, max_length: int) -> Example:
    """A prompt and its completion (strings, or lists of {role, content} messages) tokenized as training tokenizes a
    pair's prompt and one of its responses, so a reward model scores the position it was trained to score."""
    from train.app.config import DataConfig
    from train.data.chat import tokenize_conversation
    from train.data.formats import as_messages
    from train.data.truncate import fit

    prompt = as_messages(prompt, where, "prompt", "user")
    completion = as_messages(completion, where, "completion", "assistant")
    example = tokenize_conversation(prompt + completion, tokenizer, where, f"after:{len(prompt)}")
    keep_first = 1 if tokenizer.bos_token_id is not None else 0
    return fit(example, max_length, DataConfig(), where, keep_first).example


@torch.no_grad()
def reward_scores(model, examples: list[Example], batch_size: int) -> list[float]:
    """The score of each example (`reward_example`) under a reward model, in order: its output at the last token that
    is not padding, in float32."""
    from train.batching.collate import collate

    device = next(model.parameters()).device
    scores: list[float] = []
    for start in range(0, len(examples), batch_size):
        batch = collate(examples[start : start + batch_size], model.config.pad_token_id)
        output = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device))
        scores += output.logits[:, 0].float().tolist()
    return scores


def sample_prompts(
    sources: list[str], count: int, *, tokenizer, settings, max_length: int, kind: str, eval_data: TokenStore
) -> list[list[dict]]:
    """The prompts, as messages, of the first `count` evaluation examples, read again from their files (`sources`,
    the run's eval_datasets): each row is parsed and tokenized as preprocessing did (train/data/tokenize.py, the
    policy's `tokenizer` and data `settings`), so a row it skipped or dropped is skipped here too, and each kept
    row's prompt tokens are checked against the example's. A conversation's prompt is what precedes its first
    trained assistant turn (the tokens write_samples generates from); a pair's or unpaired example's is its prompt."""
    from train.data.formats import Conversation, Text, parse_row
    from train.data.sources import load_row, read_source
    from train.data.tokenize import tokenize_rows

    prompts: list[list[dict]] = []
    for index, source in enumerate(sources):
        for where, row in read_source(source):
            if len(prompts) >= count:
                return prompts
            columns, _ = tokenize_rows(
                [(where, row, index)], tokenizer=tokenizer, settings=settings, max_length=max_length, kind=kind
            )
            ids, labels = (columns.get(f"chosen_{n}", columns.get(n)) for n in ("input_ids", "labels"))
            for input_ids, row_labels in zip(ids, labels, strict=True):
                expected = token_sequences(eval_data[len(prompts)])[0]
                if _prompt_ids(input_ids, row_labels) != _prompt_ids(expected.input_ids, expected.labels):
                    raise HalyardError(
                        f"{where}: its tokens differ from evaluation example {len(prompts)}'s; the eval data changed "
                        f"while the run started? Start it again"
                    )
                record = parse_row(load_row(where, row), where, settings)
                if isinstance(record, Text):
                    prompts.append([])
                elif isinstance(record, Conversation):
                    trained = [
                        i for i, m in enumerate(record.messages) if m["role"] == "assistant" and m.get("weight", 1)
                    ]
                    first = trained[-1] if settings.train_on == "last_assistant" else trained[0]
                    prompts.append(record.messages[:first])
                else:
                    prompts.append(record.prompt)
    return prompts[:count]


def _prompt_ids(input_ids: list[int], labels: list[int]) -> list[int]:
    return input_ids[: next(i for i, label in enumerate(labels) if label != IGNORE_INDEX)]


@torch.no_grad()
def write_samples(
    accelerator,
    model,
    tokenizer,
    eval_data: TokenStore,
    n_prompts: int,
    max_new_tokens: int,
    step: int,
    path: Path,
    rewards: SampleRewards | None = None,
) -> dict[str, float]:
    """Greedy answers to the first `n_prompts` held-out prompts, appended to `path` (and logged to wandb if on).

    A sharded model must run on every process in step (synced_gpus); otherwise only the main process generates.
    With `rewards` (given to the main process only), each answer's reward goes into its row and the mean is returned
    as {"samples/reward": mean} (an answer that cannot be scored, an empty one, gets null and is left out of it).
    """
    model = accelerator.unwrap_model(model)
    sharded = is_sharded(model)
    if not (sharded or accelerator.is_main_process):
        return {}
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
    metrics = {}
    if rewards is not None:
        scores = rewards.score([row["completion"] for row in rows])
        for row, messages, score in zip(rows, rewards.prompts, scores, strict=False):
            row.update(prompt_messages=messages, reward=score)
        scored = [score for score in scores if score is not None]
        if scored:
            metrics[REWARD_METRIC] = sum(scored) / len(scored)
    if accelerator.is_main_process:
        with path.open("a") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)
        if any(t.name == "wandb" for t in accelerator.trackers):
            columns = ["step", "prompt", "completion", "reference"] + (["reward"] if rewards is not None else [])
            table = [[row[c] for c in columns] for row in rows]
            accelerator.get_tracker("wandb").log_table("samples", columns=columns, data=table, step=step)
    return metrics
