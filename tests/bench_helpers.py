"""A small local lm-eval task for the benchmark tests: 32 two-way multiple-choice questions, offline.

The YAML names its data file by absolute path (the harness reads relative paths from the working directory), so both
are written into a folder at test time. Both answers of a question are one token each after a space, so the
summed-log-likelihood accuracy has no length bias. brier_score (of the normalized choice probabilities) is a continuous
metric: two evaluations that agree on it agree on every log-likelihood to rounding, where accuracies could agree by
chance.
"""

from __future__ import annotations

import json
from pathlib import Path

TASK = "halyard_tiny_mc"
WORDS = ["red", "blue", "green", "cat", "dog", "sun", "moon", "tree", "fish", "bird", "rain", "snow", "wind", "fire"]


def items() -> list[dict]:
    """32 questions "Which word comes after X?" whose answer is the next word of WORDS; the other choice is the
    word two places on. Deterministic."""
    rows = []
    for index in range(32):
        word = WORDS[index % len(WORDS)]
        right, wrong = WORDS[(index + 1) % len(WORDS)], WORDS[(index + 2) % len(WORDS)]
        choices = [right, wrong] if index % 2 == 0 else [wrong, right]
        rows.append({"question": f"Question {index}: which word comes after {word}?", "choices": choices,
                     "label": choices.index(right)})  # fmt: skip
    return rows


def task_yaml(data_file: Path, task: str = TASK) -> str:
    return (
        f"task: {task}\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data_file}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "{{question}}\\nAnswer:"\n'
        "doc_to_choice: choices\n"
        "doc_to_target: label\n"
        "metric_list:\n"
        "  - {metric: acc, aggregation: mean, higher_is_better: true}\n"
        "  - {metric: acc_norm, aggregation: mean, higher_is_better: true}\n"
        "  - {metric: brier_score, aggregation: brier_score, higher_is_better: false}\n"
        "metadata:\n  version: 1.0\n"
    )


def write_task(folder: Path) -> Path:
    """`folder` holding halyard_tiny_mc.yaml and its items.jsonl; returns the folder (benchmarks.include_path)."""
    folder.mkdir(parents=True, exist_ok=True)
    data_file = folder / "items.jsonl"
    data_file.write_text("".join(json.dumps(row) + "\n" for row in items()))
    (folder / f"{TASK}.yaml").write_text(task_yaml(data_file))
    return folder
