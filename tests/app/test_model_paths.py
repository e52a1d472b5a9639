"""Model and tokenizer paths checked before anything loads: folders, their files, hub ids offline or unreachable."""

import time

import pytest

from train.app.config import ModelConfig
from train.app.model_paths import model_path_problems


def test_missing_folder_and_incomplete_folders_are_named(tmp_path, tiny_cache):
    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text("{}")
    empty = tmp_path / "empty"
    empty.mkdir()
    problems = model_path_problems(ModelConfig(name_or_path=str(no_weights), tokenizer_name_or_path=str(empty)))
    assert problems == [
        f"model.name_or_path={no_weights}: the folder has no weights (model.safetensors, model-*.safetensors with "
        f"their index, or pytorch_model.bin); copy them there, or point at the folder that holds them",
        f"model.tokenizer_name_or_path={empty}: the folder has no tokenizer (tokenizer.json, tokenizer_config.json, "
        f"tokenizer.model); save the tokenizer there, or set model.tokenizer_name_or_path to a folder that has one",
    ]
    [missing] = model_path_problems(ModelConfig(name_or_path=str(tmp_path / "typo")))
    assert missing.startswith(f"model.name_or_path={tmp_path / 'typo'}: no such folder") and "fix the path" in missing
    [no_config] = model_path_problems(ModelConfig(name_or_path=str(empty), tokenizer_name_or_path=str(empty)))[:1]
    assert "the folder has no config.json" in no_config
    assert model_path_problems(ModelConfig(name_or_path=str(tiny_cache / "tiny-llama"))) == []


def test_hub_id_offline_and_unreachable_fail_in_seconds(monkeypatch):
    from huggingface_hub import constants

    [offline] = model_path_problems(ModelConfig(name_or_path="halyard-tests/no-such-model"))
    assert "as a hub id it is not in the local cache" in offline and "HF_HUB_OFFLINE=1" in offline
    # HF_HUB_OFFLINE unset and no hub: one connection attempt, not a minute of retries.
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens on the discard port
    started = time.perf_counter()
    [unreachable] = model_path_problems(ModelConfig(name_or_path="halyard-tests/no-such-model"))
    assert time.perf_counter() - started < 5
    assert "the hub (http://127.0.0.1:9) cannot be reached" in unreachable and "give a local folder" in unreachable


@pytest.mark.parametrize("source", ["./relative/typo", "/abs/typo", "a/b/c"])
def test_paths_that_cannot_be_hub_ids_are_missing_folders(source):
    [problem] = model_path_problems(ModelConfig(name_or_path=source))
    assert "no such folder" in problem


def test_a_reward_model_is_told_from_other_folders_by_its_files(tmp_path, tiny_cache):
    """eval_reward_model: a sequence classifier with one output, with weights and a chat template; read from its
    config.json, no weight loaded. A causal LM, a classifier with two outputs, a missing folder and a tokenizer
    without a template are each named."""
    import json
    import shutil

    from train.app.model_paths import reward_model_problems

    lm = tiny_cache / "tiny-llama"
    [causal] = reward_model_problems("eval_reward_model", str(lm))
    assert causal == (
        f"eval_reward_model={lm}: its config.json describes LlamaForCausalLM with no output(s), not a reward model; "
        f"give a loss=rm run's FINAL/ (a sequence classifier with one output)"
    )
    rm = tmp_path / "rm"
    shutil.copytree(lm, rm)
    config = json.loads((rm / "config.json").read_text())
    (rm / "config.json").write_text(json.dumps({**config, "architectures": ["LlamaForSequenceClassification"],
                                                "id2label": {"0": "LABEL_0"}}))  # fmt: skip
    assert reward_model_problems("eval_reward_model", str(rm)) == []
    (rm / "config.json").write_text(json.dumps({**config, "architectures": ["LlamaForSequenceClassification"],
                                                "id2label": {"0": "A", "1": "B"}}))  # fmt: skip
    assert (
        "LlamaForSequenceClassification with 2 output(s), not a reward model" in reward_model_problems("k", str(rm))[0]
    )
    [missing] = reward_model_problems("eval_reward_model", str(tmp_path / "nope"))
    assert missing.startswith(f"eval_reward_model={tmp_path / 'nope'}: no such folder")
    (rm / "config.json").write_text(json.dumps({**config, "architectures": ["LlamaForSequenceClassification"],
                                                "num_labels": 1}))  # fmt: skip
    (rm / "chat_template.jinja").unlink(missing_ok=True)
    tokenizer_config = json.loads((rm / "tokenizer_config.json").read_text())
    tokenizer_config.pop("chat_template", None)
    (rm / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    [no_template] = reward_model_problems("eval_reward_model", str(rm))
    assert "its tokenizer has no chat template" in no_template
