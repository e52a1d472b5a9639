"""What preprocessing did to the rows (train/data/stats.py): the label mask audit counted exactly, and the counts and
audit as the training log and the preview script report them."""

import json

from data_helpers import THREE_TURNS, demo_config, ids, template, write

from conftest import DEMO_TRAIN, REPO
from train.app.config import DataConfig
from train.data.chat import tokenize_conversation
from train.data.preprocess import load_examples

KEYS = DataConfig()


def test_mask_audit_counts_tokens_by_role_exactly(tiny_tokenizers, tmp_path, caplog):
    from train.data.datasets import build_datasets
    from train.data.stats import MaskAudit

    tokenizer = tiny_tokenizers["chatml"]
    path = write(tmp_path, "d.jsonl", json.dumps({"messages": THREE_TURNS}) + "\n")
    _, stats = load_examples([path], tokenizer, KEYS, max_length=256)
    count = lambda *texts: sum(len(ids(tokenizer, text)) for text in texts)  # noqa: E731
    total = len(tokenize_conversation(THREE_TURNS, tokenizer, "r").input_ids)
    user, assistant = count("What color is grass?", "And 2 plus 2?"), count("Arr, grass be green!", "Arr, 4!")
    assert stats.mask_audit == {
        "tokens": {"system": 0, "user": user, "assistant": assistant, "end_of_turn": 2,
                   "template": total - user - assistant - 2},
        "supervised": {"system": 0, "user": 0, "assistant": assistant, "end_of_turn": 2, "template": 0},
        "conversations": 1, "all_supervised": 0, "unattributed": 0, "assistant_turns": 2, "turns_ending_supervised": 2,
    }  # fmt: skip
    # A template that closes turns with no special token: only the last turn gets one (an appended EOS).
    with template(tokenizer, "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"):
        _, bare = load_examples([path], tokenizer, KEYS, max_length=256)
    audit = MaskAudit.merged([bare.mask_audit])
    assert (audit.assistant_turns, audit.turns_ending_supervised) == (2, 1)
    assert "1 assistant turns end without a supervised end-of-turn token" in audit.problems("assistant")[0]
    # The training log reports it (and summary.json holds it: the data stats of the run).
    with caplog.at_level("INFO", logger="train.data"):
        _, _, run_stats = build_datasets(demo_config(tmp_path), tokenizer)
    assert "label mask audit (train, 123 conversations): supervised share of tokens by role: system 0.0%" in caplog.text
    assert run_stats["train"]["mask_audit"]["turns_ending_supervised"] == 140


def test_preview_script_marks_spans_and_dumps_rows(tmp_path, tiny_cache):
    import subprocess
    import sys

    dump = tmp_path / "rows.jsonl"
    command = [
        sys.executable,
        "scripts/preview_data.py",
        "model=tiny",
        f"cache_dir={tiny_cache}",
        f"datasets=[{DEMO_TRAIN}]",
    ]
    result = subprocess.run([*command, "--n", "2", "--dump", str(dump)], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "[[Arr, the sky be blue, matey!<|im_end|>]]" in result.stdout
    assert "length histogram" in result.stdout and "data: 123 examples from 123 rows" in result.stdout
    assert "label mask audit (data, 123 conversations)" in result.stdout and "user 0.0% of" in result.stdout
    assert "assistant 100.0% of" in result.stdout and "end-of-turn token is supervised: 140 of 140" in result.stdout
    rows = [json.loads(line) for line in dump.read_text().splitlines()]
    assert len(rows) == 2 and len(rows[0]["input_ids"]) == len(rows[0]["labels"])
