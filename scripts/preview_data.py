"""Show what the model will see: rendered examples with the supervised spans marked, counts and a length histogram.

Takes the same config overrides as launch.py (the data keys, the model or tokenizer, model.max_length):

    python scripts/preview_data.py model=smollm2 datasets=[data/demo/train.jsonl] --n 3
    python scripts/preview_data.py model=tiny datasets=[data/demo/train.jsonl] --dump rows.jsonl --n 20

Supervised text is shown between [[ and ]] (in green on a terminal). It ends with the label mask audit: per role,
the share of its tokens that are supervised; the assistant turns whose end-of-turn token is supervised; the
conversations with every token, or none, supervised. --dump FILE writes the first N tokenized rows
({"input_ids": [...], "labels": [...]}) as JSONL. Nothing is cached or trained. The libraries' loading bars and known
warnings are kept out unless --verbose (or verbose=true).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

IGNORE_INDEX = -100


def marked(tokenizer, example, color: bool) -> str:
    """The decoded example with each supervised span wrapped in markers."""
    open_mark, close_mark = ("\033[32m[[", "]]\033[0m") if color else ("[[", "]]")
    pieces, span, supervised = [], [], None
    for token, label in zip(example.input_ids, example.labels, strict=True):
        is_supervised = label != IGNORE_INDEX
        if supervised is not None and is_supervised != supervised:
            pieces.append((supervised, span))
            span = []
        span.append(token)
        supervised = is_supervised
    pieces.append((supervised, span))
    return "".join(
        f"{open_mark}{tokenizer.decode(ids)}{close_mark}" if sup else tokenizer.decode(ids) for sup, ids in pieces
    )


def histogram(lengths: list[int], bins: int = 10, width: int = 40) -> str:
    low, high = min(lengths), max(lengths)
    step = max(1, -(-(high - low + 1) // bins))
    counts = [0] * bins
    for length in lengths:
        counts[min((length - low) // step, bins - 1)] += 1
    top = max(counts)
    rows = [
        f"  {low + i * step:>6}-{low + (i + 1) * step - 1:<6} {'#' * round(width * c / top):<{width}} {c}"
        for i, c in enumerate(counts)
        if c or i < (high - low) // step + 1
    ]
    return "\n".join(rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=3, help="examples to show (and to dump)")
    parser.add_argument("--dump", type=Path, help="write the first N tokenized rows to this JSONL file")
    parser.add_argument("--eval", action="store_true", help="preview eval_datasets instead of datasets")
    parser.add_argument("--verbose", action="store_true", help="let the libraries' progress bars and warnings through")
    args, overrides = parser.parse_known_args()

    import launch
    from train.errors import HalyardError

    try:
        cfg = launch.compose_config(overrides)
        from train.app.models import build_tokenizer
        from train.data.preprocess import load_examples
        from train.data.stats import MaskAudit
        from train.loop.progress import quiet_libraries

        quiet_libraries(verbose=args.verbose or cfg.verbose)
        tokenizer = build_tokenizer(cfg.model, cfg.data.chat_template)
        sources = cfg.eval_datasets if args.eval else cfg.datasets
        examples, stats = load_examples(sources, tokenizer, cfg.data, cfg.model.max_length)
    except HalyardError as error:
        print(f"preview_data: {error}", file=sys.stderr)
        return 2

    color = sys.stdout.isatty()
    for index, example in enumerate(examples[: args.n]):
        print(
            f"--- example {index} ({len(example.input_ids)} tokens, {sum(label != IGNORE_INDEX for label in example.labels)} supervised)"
        )
        print(marked(tokenizer, example, color))
    lengths = examples.lengths().tolist()  # from the Arrow offsets; the supervised count reads the labels
    supervised = sum(sum(label != IGNORE_INDEX for label in e.labels) for e in examples)
    print(f"--- {stats.describe('data', cfg.model.max_length)}")
    print(
        f"tokens: {sum(lengths)} ({supervised} supervised, {supervised / max(sum(lengths), 1):.0%}); length min {min(lengths)}, max {max(lengths)}, mean {sum(lengths) / len(lengths):.1f}"
    )
    print("length histogram (tokens per example):")
    print(histogram(lengths))
    audit = MaskAudit.merged([stats.mask_audit])
    if audit.conversations:
        print(audit.describe("data", stats))
        for problem in audit.problems(cfg.data.train_on):
            print(f"warning: {problem}")
    if args.dump:
        args.dump.write_text(
            "".join(json.dumps({"input_ids": e.input_ids, "labels": e.labels}) + "\n" for e in examples[: args.n])
        )
        print(f"wrote {min(args.n, len(examples))} rows to {args.dump}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
