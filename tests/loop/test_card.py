"""The model card: Hub front matter from hub ids only, the run's method, data, settings and metrics."""

import yaml

import launch
from conftest import DEMO_TRAIN
from train.loop.card import CardInfo, hub_id, render


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
