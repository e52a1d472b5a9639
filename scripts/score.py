"""Score prompt/completion rows with a reward model: a `loss=rm` run's FINAL/ (or any sequence classifier with one
output and a chat template).

    python scripts/score.py runs/my-rm/FINAL rows.jsonl scored.jsonl [--batch-size 16] [--max-length 1024] [--verbose]

Each input row has `prompt` and `completion` (strings, or lists of {role, content} messages); each output row is the
input row with `score` added, in the same order. Rows are rendered, tokenized and truncated exactly as training
renders a pair's prompt and response, so the model scores the position it was trained to score. The libraries' loading
bars and known warnings are kept out unless --verbose. Training scores its eval samples the same way
(`eval_reward_model`, train/loop/samples.py holds the code both use).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", type=Path, help="a reward model folder (a loss=rm run's FINAL/)")
    parser.add_argument("rows", type=Path, help="JSONL with prompt and completion fields")
    parser.add_argument("out", type=Path, help="JSONL to write: each row with its score")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=1024, help="tokens per row, as model.max_length")
    parser.add_argument("--verbose", action="store_true", help="let the libraries' progress bars and warnings through")
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    from train.loop.progress import quiet_libraries
    from train.loop.samples import load_reward_model, reward_example, reward_scores

    quiet_libraries(verbose=args.verbose)

    model, tokenizer = load_reward_model(args.model)
    rows = [json.loads(line) for line in args.rows.read_text().splitlines() if line.strip()]
    examples = [
        reward_example(row["prompt"], row["completion"], f"{args.rows}, row {i}", tokenizer, args.max_length)
        for i, row in enumerate(rows)
    ]
    scores = reward_scores(model, examples, args.batch_size)
    with args.out.open("w") as f:
        f.writelines(json.dumps({**row, "score": score}) + "\n" for row, score in zip(rows, scores, strict=True))
    print(f"scored {len(rows)} rows -> {args.out}")


if __name__ == "__main__":
    main()
