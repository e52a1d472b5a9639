"""Reward models: the Bradley-Terry trainer through the CLI, its FINAL/ as a sequence classifier, scripts/score.py."""

import json
import math
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

import launch
from conftest import DEMO_TRAIN, OFFLINE_ENV, REPO, read_metrics, run_cli
from train.app.loss_registry import loss_spec

PREF = ["model=tiny", "datasets=[data/demo/pref_train.jsonl]", "eval_datasets=[data/demo/pref_eval.jsonl]"]


def test_the_center_coefficient_reaches_the_loss():
    """Scores 1.0 (chosen) and -0.5 (rejected): -log sigmoid(1.5) + 0.2 * 0.5^2, through the trainer's batch_loss."""
    cfg = launch.compose_config(["model=tiny", f"datasets=[{DEMO_TRAIN}]", "loss=rm", "loss.center_coefficient=0.2"])
    trainer = loss_spec(cfg).trainer.__new__(loss_spec(cfg).trainer)
    trainer.settings = cfg.loss

    def model(input_ids, attention_mask):  # a stand-in classifier: one score per row
        return SimpleNamespace(logits=torch.tensor([[1.0], [-0.5]]))

    batch = {"input_ids": torch.zeros(2, 3, dtype=torch.long), "attention_mask": torch.ones(2, 3, dtype=torch.long)}
    result = trainer.batch_loss(model, batch)
    assert result.total.item() == pytest.approx(math.log1p(math.exp(-1.5)) + 0.2 * 0.25, rel=1e-6)
    assert result.count.item() == 1


@pytest.mark.slow
def test_a_reward_model_learns_the_preference_and_scores_rows_as_it_trained(tiny_cache, tmp_path):
    from transformers import AutoModelForSequenceClassification

    common = [*PREF, "loss=rm", f"cache_dir={tiny_cache}", "lr=1e-3", "warmup_ratio=0", "log_every_steps=1"]
    learned = run_cli([*common, "exp_name=rm", "max_steps=17", "eval_every_steps=17"])
    assert learned.returncode == 0, learned.stderr[-3000:]
    final_eval = [m for m in read_metrics(tiny_cache / "rm") if "loss/eval" in m][-1]
    assert final_eval["rewards_eval/accuracies"] >= 0.9 and final_eval["rewards_eval/margins"] > 0
    # Split invariance: the same first two steps with 4 accumulated micro-batches.
    split = run_cli([*common, "exp_name=rm-accum4", "max_steps=2", "model.gradient_accumulation_steps=4"])
    assert split.returncode == 0, split.stderr[-3000:]
    whole = [m["loss/train"] for m in read_metrics(tiny_cache / "rm") if "loss/train" in m][:2]
    accumulated = [m["loss/train"] for m in read_metrics(tiny_cache / "rm-accum4") if "loss/train" in m]
    assert accumulated == pytest.approx(whole, rel=1e-5)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_cache / "rm" / "FINAL")
    assert model.config.num_labels == 1
    # With LoRA the adapters and the whole new score head train; FINAL/ is merged and loads the same way.
    lora = run_cli(
        [
            *common,
            "exp_name=rm-lora",
            "max_steps=17",
            "eval_every_steps=17",
            "++model.use_peft=true",
            "save_merged=merged",
        ]
    )
    assert lora.returncode == 0, lora.stderr[-3000:]
    assert [m for m in read_metrics(tiny_cache / "rm-lora") if "loss/eval" in m][-1]["rewards_eval/accuracies"] >= 0.9
    assert AutoModelForSequenceClassification.from_pretrained(tiny_cache / "rm-lora" / "FINAL").config.num_labels == 1
    # scripts/score.py scores each held-out pair's two answers: the chosen ones higher, and the same mean scores as
    # the trainer's last evaluation (the same tokens, the same scored position).
    pairs = [json.loads(line) for line in (REPO / "data/demo/pref_eval.jsonl").read_text().splitlines()]
    rows = tmp_path / "rows.jsonl"
    rows.write_text(
        "".join(
            json.dumps({"prompt": p["prompt"], "completion": p[side]}) + "\n"
            for p in pairs
            for side in ("chosen", "rejected")
        )
    )
    command = [sys.executable, str(REPO / "scripts" / "score.py"), str(tiny_cache / "rm" / "FINAL"), str(rows)]
    subprocess.run(
        [*command, str(tmp_path / "scored.jsonl"), "--batch-size", "5"], check=True, env=OFFLINE_ENV | {"PATH": ""}
    )
    scores = [json.loads(line)["score"] for line in (tmp_path / "scored.jsonl").read_text().splitlines()]
    chosen, rejected = scores[0::2], scores[1::2]
    assert sum(c > r for c, r in zip(chosen, rejected, strict=True)) / len(pairs) >= 0.9
    assert sum(chosen) / len(pairs) == pytest.approx(final_eval["rewards_eval/chosen"], rel=1e-4, abs=1e-5)
    assert sum(rejected) / len(pairs) == pytest.approx(final_eval["rewards_eval/rejected"], rel=1e-4, abs=1e-5)


@pytest.mark.parametrize("use_margin", [True, False])
def test_a_row_s_margin_reaches_the_loss_through_the_data_path(tmp_path, tiny_tokenizers, use_margin):
    """A `margin` field travels from the file through the cache and collation into the loss:
    -log sigmoid(s_chosen - s_rejected - margin); a row without one gets margin 0, a bad one a clear error."""
    from train.data.datasets import build_datasets
    from train.errors import DataError

    rows = [
        {"prompt": "Hi?", "chosen": "Arr, hello!", "rejected": "Hello.", "margin": 2.5},
        {"prompt": "Bye?", "chosen": "Arr, bye!", "rejected": "Bye."},
    ]
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    overrides = ["model=tiny", "loss=rm", f"loss.use_margin={use_margin}", f"cache_dir={tmp_path}"]
    cfg = launch.compose_config([*overrides, f"datasets=[{data}]"])
    train, _, _ = build_datasets(cfg, tiny_tokenizers["chatml"], "paired")
    pairs = train.gather([0, 1])
    assert [p.margin for p in pairs] == [2.5, None]
    trainer = loss_spec(cfg).trainer.__new__(loss_spec(cfg).trainer)
    trainer.settings, trainer.pad_token_id = cfg.loss, tiny_tokenizers["chatml"].eos_token_id  # pad = EOS in runs
    batch = trainer.collate(pairs, train.layout)
    assert batch["margin"].tolist() == [2.5, 0.0]

    def model(input_ids, attention_mask):  # chosen scores 1 and 2, rejected 0 and 0
        return SimpleNamespace(logits=torch.tensor([[1.0], [2.0], [0.0], [0.0]]))

    margins = (2.5, 0.0) if use_margin else (0.0, 0.0)
    expected = sum(math.log1p(math.exp(-(d - m))) for d, m in zip((1.0, 2.0), margins, strict=True))
    assert trainer.batch_loss(model, batch).total.item() == pytest.approx(expected, rel=1e-6)
    data.write_text(json.dumps({**rows[0], "margin": "big"}) + "\n")
    with pytest.raises(DataError, match=r"pairs.jsonl line 1: field 'margin' must be a finite number"):
        build_datasets(launch.compose_config([*overrides, f"datasets=[{data}]"]), tiny_tokenizers["chatml"], "paired")
