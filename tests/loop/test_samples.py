"""train/loop/samples.py: greedy answers to the first held-out prompts, appended to samples.jsonl by the main process
(prompt: the tokens before the first supervised one; reference: the supervised tokens), and logged to wandb when on."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import DEMO_EVAL, DEMO_TRAIN, OFFLINE_ENV, REPO, read_metrics, run_cli
from train.data.store import IGNORE_INDEX, Example, PairExample
from train.loop.samples import write_samples

X = IGNORE_INDEX


class EchoModel(torch.nn.Module):
    """Generates `max_new_tokens` copies of token 9 after the prompt; records each call's arguments."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def generate(self, input_ids, max_new_tokens, **kwargs):
        self.calls.append({"prompt": input_ids.tolist(), "max_new_tokens": max_new_tokens, "training": self.training})
        self.calls[-1].update(kwargs)
        return torch.cat([input_ids, torch.full((1, max_new_tokens), 9)], dim=1)


class Tokenizer:
    pad_token_id = 0

    def decode(self, ids, skip_special_tokens=False):
        return " ".join(str(int(i)) for i in ids)


class WandbTracker:
    name = "wandb"

    def __init__(self):
        self.tables = []

    def log_table(self, key, columns, data, step):
        self.tables.append((key, columns, data, step))


class FakeAccelerator:
    def __init__(self, is_main_process=True, trackers=()):
        self.is_main_process = is_main_process
        self.trackers = list(trackers)
        self.device = torch.device("cpu")

    def unwrap_model(self, model):
        return model

    def get_tracker(self, name):
        return next(t for t in self.trackers if t.name == name)


EVAL = [
    Example(input_ids=[1, 2, 3, 4, 5], labels=[X, X, 3, 4, 5]),  # prompt 1 2, answer 3 4 5
    PairExample(chosen=Example([6, 7, 8], [X, 7, 8]), rejected=Example([6, 5], [X, 5])),  # the chosen answer
    Example(input_ids=[1, 1, 1], labels=[X, X, 1]),  # beyond n_prompts
]


def test_the_first_prompts_answers_are_appended_as_json_lines(tmp_path):
    model, path = EchoModel().train(), tmp_path / "samples.jsonl"
    path.write_text('{"step": 5}\n')  # an earlier evaluation's samples stay
    write_samples(FakeAccelerator(), model, Tokenizer(), EVAL, n_prompts=2, max_new_tokens=3, step=10, path=path)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert rows == [
        {"step": 5},
        {"step": 10, "prompt": "1 2", "completion": "9 9 9", "reference": "3 4 5"},
        {"step": 10, "prompt": "6", "completion": "9 9 9", "reference": "7 8"},
    ]
    assert [call["prompt"] for call in model.calls] == [[[1, 2]], [[6]]]
    assert all(c["do_sample"] is False and c["max_new_tokens"] == 3 and not c["training"] for c in model.calls)
    assert all(c["synced_gpus"] is False and c["pad_token_id"] == 0 for c in model.calls)
    assert model.training  # the training mode it had, restored


def test_an_unsharded_model_generates_on_the_main_process_only(tmp_path):
    model, path = EchoModel(), tmp_path / "samples.jsonl"
    write_samples(FakeAccelerator(is_main_process=False), model, Tokenizer(), EVAL, 2, 3, step=1, path=path)
    assert model.calls == [] and not path.exists()


def test_samples_go_to_wandb_as_a_table_when_it_is_on(tmp_path):
    wandb = WandbTracker()
    accelerator = FakeAccelerator(trackers=[wandb])
    write_samples(accelerator, EchoModel().eval(), Tokenizer(), EVAL, 1, 2, step=4, path=tmp_path / "s.jsonl")
    assert wandb.tables == [("samples", ["step", "prompt", "completion", "reference"], [[4, "1 2", "9 9", "3 4 5"]], 4)]


class FixedRewards:
    """Stands in for SampleRewards: each completion's reward is its length; "" cannot be scored (None)."""

    prompts = [[{"role": "user", "content": "a"}], [{"role": "user", "content": "b"}]]

    def score(self, completions):
        return [float(len(c)) if c else None for c in completions]


def test_rewards_go_into_each_row_and_their_mean_is_returned(tmp_path):
    path = tmp_path / "samples.jsonl"
    metrics = write_samples(
        FakeAccelerator(), EchoModel(), Tokenizer(), EVAL, 2, 3, step=7, path=path, rewards=FixedRewards()
    )
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [(row["prompt_messages"], row["reward"]) for row in rows] == [
        ([{"role": "user", "content": "a"}], 5.0),  # "9 9 9"
        ([{"role": "user", "content": "b"}], 5.0),
    ]
    assert metrics == {"samples/reward": 5.0}
    assert write_samples(FakeAccelerator(), EchoModel(), Tokenizer(), EVAL, 2, 3, step=7, path=path) == {}


@pytest.mark.slow
def test_a_run_logs_the_mean_reward_of_its_samples_as_scoring_them_apart_gives(tiny_cache, tmp_path):
    """eval_reward_model=<a loss=rm run's FINAL/>: at each evaluation the samples' rewards go into samples.jsonl
    with each prompt's messages (read from the eval file), their mean into metrics.jsonl and summary.json; scoring
    samples.jsonl's rows with scripts/score.py gives the same rewards. Bad settings are reported before training."""
    common = ["model=tiny", f"cache_dir={tiny_cache}", "max_steps=2", "lr=1e-3"]
    rm = run_cli([*common, "loss=rm", "exp_name=samples-rm", "datasets=[data/demo/pref_train.jsonl]"])
    assert rm.returncode == 0, rm.stderr[-3000:]
    reward_model = tiny_cache / "samples-rm" / "FINAL"
    sft = [*common, f"datasets=[{DEMO_TRAIN}]", f"eval_datasets=[{DEMO_EVAL}]", "eval_every_steps=1"]
    sft += ["eval_samples=3", "eval_samples_max_new_tokens=6", f"eval_reward_model={reward_model}"]
    result = run_cli([*sft, "exp_name=samples-reward"])
    assert result.returncode == 0, result.stderr[-3000:]
    run = tiny_cache / "samples-reward"
    logged = {row["step"]: row["samples/reward"] for row in read_metrics(run) if "samples/reward" in row}
    rows = [json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines()]
    assert sorted(logged) == [0, 1, 2] and len(rows) == 9
    for step, mean in logged.items():
        rewards = [row["reward"] for row in rows if row["step"] == step and row["reward"] is not None]
        assert rewards and mean == pytest.approx(sum(rewards) / len(rewards), rel=1e-6)
    first_eval_row = json.loads(Path(DEMO_EVAL).read_text().splitlines()[0])
    assert rows[0]["prompt_messages"] == [{"role": "user", "content": first_eval_row["instruction"]}]
    assert json.loads((run / "summary.json").read_text())["samples/reward"] == logged[2]
    scored = [row for row in rows if row["reward"] is not None]
    rescore = tmp_path / "rows.jsonl"
    rescore.write_text("".join(json.dumps({"prompt": r["prompt_messages"], "completion": r["completion"]}) + "\n"
                               for r in scored))  # fmt: skip
    command = [sys.executable, str(REPO / "scripts" / "score.py"), str(reward_model), str(rescore), str(tmp_path / "s")]
    subprocess.run(command, check=True, env={**os.environ, **OFFLINE_ENV}, capture_output=True)
    apart = [json.loads(line)["score"] for line in (tmp_path / "s").read_text().splitlines()]
    assert apart == pytest.approx([row["reward"] for row in scored], rel=1e-5, abs=1e-6)

    bad = [*common, f"datasets=[{DEMO_TRAIN}]", f"eval_reward_model={tiny_cache / 'tiny-llama'}", "exp_name=bad-rm"]
    refused = run_cli(bad)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert "its config.json describes LlamaForCausalLM with no output(s), not a reward model" in refused.stderr
    assert (
        "eval_samples=0 generates none" in refused.stderr
        and "read from eval_datasets, which is empty" in refused.stderr
    )
    assert not (tiny_cache / "bad-rm").exists()
