"""The benchmarks' synthetic data: multi-turn chat rows and preference pairs with skewed lengths (seeded, so every run
of a comparison reads the same rows), and the scale benchmark's millions of rows written in numpy-drawn blocks."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np

SHIP_WORDS = ("the", "a", "ship", "sails", "over", "sea", "wind", "rope", "knot", "deck", "crew", "captain",
              "harbor", "storm", "calm", "north", "south")  # fmt: skip


def synthetic_chat_rows(n_rows: int, seed: int = 0) -> list[dict]:
    """Multi-turn chat rows with skewed lengths (most short, a long tail), like real chat data."""
    rng = random.Random(seed)
    words = list(SHIP_WORDS)

    def sentence() -> str:
        return " ".join(rng.choice(words) for _ in range(int(rng.lognormvariate(2.5, 0.8)) + 1)) + "."

    rows = []
    for _ in range(n_rows):
        messages = []
        for _turn in range(rng.choice([1, 1, 1, 2, 3])):
            messages.append({"role": "user", "content": sentence()})
            messages.append({"role": "assistant", "content": " ".join(sentence() for _ in range(rng.randint(1, 4)))})
        rows.append({"messages": messages})
    return rows


def synthetic_pair_rows(n_rows: int, seed: int = 0) -> list[dict]:
    """Preference rows: a chat prompt (1-3 turns), a chosen and a rejected answer, lengths skewed (lognormal)."""
    rng = random.Random(seed)
    chats = synthetic_chat_rows(n_rows, seed)
    rows = []
    for chat in chats:
        messages = chat["messages"]
        answers = [m["content"] for m in synthetic_chat_rows(2, rng.randint(0, 10**9))[0]["messages"][1::2]]
        second = synthetic_chat_rows(1, rng.randint(0, 10**9))[0]["messages"][1]["content"]
        rows.append({"prompt": messages[:-1], "chosen": [{"role": "assistant", "content": answers[0]}],
                     "rejected": [{"role": "assistant", "content": second}]})  # fmt: skip
    return rows


WORDS = np.array(SHIP_WORDS)


def write_scale_rows(path: Path, n_rows: int, mean_words: float, seed: int = 0) -> None:
    """JSONL of multi-turn chat rows whose lengths are lognormal (a long tail), written in blocks (numpy draws the
    words, so a million rows take seconds, not minutes)."""
    rng = np.random.default_rng(seed)
    sigma = 0.7
    with path.open("w") as out:
        for start in range(0, n_rows, 10_000):
            n = min(10_000, n_rows - start)
            totals = np.maximum(rng.lognormal(np.log(mean_words) - sigma**2 / 2, sigma, n).astype(int), 4)
            turns = rng.choice([1, 1, 1, 2, 3], n)
            lines = []
            for total, n_turns in zip(totals.tolist(), turns.tolist(), strict=True):
                total = max(total, 4 * n_turns)  # at least two words per message
                words = WORDS[rng.integers(0, len(WORDS), total)]
                cuts = np.sort(rng.choice(np.arange(1, total), 2 * n_turns - 1, replace=False))
                parts = np.split(words, cuts)
                messages = [
                    {"role": "user" if i % 2 == 0 else "assistant", "content": " ".join(part) + "."}
                    for i, part in enumerate(parts)
                ]
                lines.append(json.dumps({"messages": messages}))
            out.write("\n".join(lines) + "\n")
