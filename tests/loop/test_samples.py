"""train/loop/samples.py: greedy answers to the first held-out prompts, appended to samples.jsonl by the main process
(prompt: the tokens before the first supervised one; reference: the supervised tokens), and logged to wandb when on."""

import json

import torch

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
