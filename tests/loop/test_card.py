"""The model card: Hub front matter from hub ids only, the run's method, data, settings and metrics."""

import dataclasses
import json

import pytest
import yaml

import launch
from conftest import DEMO_TRAIN, REPO
from train.loop.card import HUB_ID_FILE, CardInfo, base_model_hub_id, hub_id, render


def test_hub_ids_are_kept_and_local_paths_left_out(tmp_path):
    assert hub_id("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert hub_id("ultrachat") == "HuggingFaceH4/ultrachat_200k"  # a named dataset
    assert hub_id(str(tmp_path)) is None and hub_id("data/demo/train.jsonl") is None and hub_id("runs/x/FINAL") is None


def test_card_of_a_lora_run_on_a_hub_model():
    cfg = launch.compose_config(
        ["model=llama", f"datasets=[{DEMO_TRAIN},ultrachat]", "++model.use_peft=true", "lr=2e-4", "loss=dpo"]
    )
    card = render(CardInfo.from_config(cfg), {"step": 10, "pairs": 80, "loss/eval": 0.25}, adapter_only=True)
    _, front, body = card.split("---\n", 2)
    assert yaml.safe_load(front) == {
        "base_model": "meta-llama/Llama-3.2-1B-Instruct",
        "library_name": "peft",
        "tags": ["halyard", "dpo", "lora"],
        "datasets": ["HuggingFaceH4/ultrachat_200k"],
    }
    assert "LoRA (r=16, alpha=32.0, dropout=0.05, target modules all-linear)" in body
    assert "| lr | 0.0002 |" in body and "| pairs | 80 |" in body and "| loss/eval | 0.2500 |" in body
    assert "scripts/merge_lora.py" in body
    assert "| loss.beta | 0.1 |" in body  # the loss's own settings too


def test_benchmark_results_make_an_evaluation_table_and_none_make_none():
    info = CardInfo.from_config(launch.compose_config(["model=llama", f"datasets=[{DEMO_TRAIN}]"]))
    setup = {"harness": "lm-eval 0.4.13", "num_fewshot": {"mc": 5}, "examples": {"mc": 24}, "limit_per_task": 24,
             "seed": 3}  # fmt: skip
    summary = {
        "step": 4,
        "bench/mc/acc": 0.75,
        "bench/mc/acc_stderr": 0.125,
        "bench/mc/brier": 0.5,
        "benchmarks": setup,
    }
    body = render(info, summary, adapter_only=False)
    assert "## Evaluation" in body and "seed 3" in body
    assert "| mc | acc | 0.7500 | 0.1250 | 5 | 24 | lm-eval 0.4.13 |" in body
    assert "| mc | brier | 0.5000 | - | 5 | 24 | lm-eval 0.4.13 |" in body  # a metric without a stderr
    assert "acc_stderr" not in body
    assert "## Evaluation" not in render(info, {"step": 4}, adapter_only=False)


@pytest.mark.parametrize("loss", sorted(p.stem for p in (REPO / "config" / "loss").glob("*.yaml")))
def test_the_settings_table_holds_every_setting_of_the_loss(loss):
    cfg = launch.compose_config(["model=llama", f"datasets=[{DEMO_TRAIN}]", f"loss={loss}"])
    body = render(CardInfo.from_config(cfg), {}, adapter_only=False)
    own = {f.name for f in dataclasses.fields(cfg.loss)} - {"name", "trainer"}
    assert own, loss
    for name in own:
        assert f"| loss.{name} | {getattr(cfg.loss, name)} |" in body, (loss, name)
    if loss == "dpo":
        assert "| loss.beta | 0.1 |" in body and "| loss.label_smoothing | 0.0 |" in body


def test_a_local_base_model_is_named_by_the_hub_id_its_folder_records(tmp_path):
    """A marker (scripts/prepare_smollm2.py writes one) or config.json's `_name_or_path` may name the hub model; a
    folder that says nothing, or records a local path, gets no base_model: the path is never guessed from."""
    marked, recorded, silent, local = (tmp_path / name for name in ("marked", "recorded", "silent", "local"))
    for folder in (marked, recorded, silent, local):
        folder.mkdir()
        (folder / "config.json").write_text("{}")
    (marked / HUB_ID_FILE).write_text("HuggingFaceTB/SmolLM2-135M-Instruct\n")
    (recorded / "config.json").write_text(json.dumps({"_name_or_path": "org/model"}))
    (local / "config.json").write_text(json.dumps({"_name_or_path": str(silent)}))
    assert base_model_hub_id(str(marked)) == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert base_model_hub_id(str(recorded)) == "org/model"
    assert base_model_hub_id(str(silent)) is None and base_model_hub_id(str(local)) is None
    assert base_model_hub_id("meta-llama/Llama-3.2-1B-Instruct") == "meta-llama/Llama-3.2-1B-Instruct"

    cfg = launch.compose_config(["model=tiny", f"model.name_or_path={marked}", f"datasets=[{DEMO_TRAIN}]"])
    card = render(CardInfo.from_config(cfg), {}, adapter_only=False)
    assert yaml.safe_load(card.split("---\n", 2)[1])["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert f"- **Base model:** `HuggingFaceTB/SmolLM2-135M-Instruct` (trained from the local copy `{marked}`)" in card


def test_the_evaluation_table_says_how_to_reproduce_a_chat_template_evaluation():
    info = CardInfo.from_config(launch.compose_config(["model=llama", f"datasets=[{DEMO_TRAIN}]"]))
    setup = {"harness": "lm-eval 0.4.13", "num_fewshot": {"mc": 0}, "limit_per_task": None, "seed": 0}
    plain = render(info, {"step": 1, "bench/mc/acc": 1.0, "benchmarks": setup}, adapter_only=False)
    chat = render(info, {"step": 1, "bench/mc/acc": 1.0, "benchmarks": {**setup, "apply_chat_template": True}},
                  adapter_only=False)  # fmt: skip
    assert "--seed 0`." in plain and "--seed 0 --apply_chat_template`." in chat


def test_the_card_names_the_peft_options_and_added_tokens():
    overrides = ["model=llama", f"datasets=[{DEMO_TRAIN}]", "method=lora", "model.peft.use_dora=true"]
    overrides += ["model.peft.use_rslora=true", "model.peft.modules_to_save=[lm_head]"]
    cfg = launch.compose_config([*overrides, "model.add_special_tokens=['<tool_call>']"])
    body = render(CardInfo.from_config(cfg), {"step": 1}, adapter_only=True)
    assert "target modules all-linear, DoRA, rsLoRA, trained whole: lm_head)" in body
    assert "| added special tokens | <tool_call> |" in body
