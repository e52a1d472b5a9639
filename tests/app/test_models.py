"""Model settings decided for the machine; the tokenizer and the model with the PEFT options and added tokens."""

import functools
import math

import torch

from conftest import DEMO_TRAIN
from train.app.config import ModelConfig, PeftConfig
from train.app.models import add_lora, build_model, build_tokenizer, resolve_dtype


def test_auto_dtype_is_bfloat16_only_where_the_hardware_is_fast_at_it(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for amx, avx512_bf16, expected in ((True, True, "bfloat16"), (False, True, "bfloat16"), (False, False, "float32")):
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda amx=amx: amx, raising=False)
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda v=avx512_bf16: v, raising=False)
        dtype, why = resolve_dtype("auto")
        assert dtype == expected and "CPU" in why
    assert resolve_dtype("float32") == ("float32", "set") and resolve_dtype("bfloat16") == ("bfloat16", "set")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    assert resolve_dtype("auto") == ("float32", "CUDA without bf16")


def tiny_settings(tiny_cache, **peft) -> ModelConfig:
    return ModelConfig(name_or_path=str(tiny_cache / "tiny-llama"), dtype="float32", use_peft=True, **peft)


def trained_names(model) -> set[str]:
    return {name for name, p in model.named_parameters() if p.requires_grad}


def test_each_peft_option_changes_what_is_trained(tiny_cache):
    """DoRA, rsLoRA, modules_to_save and target modules by name reach PEFT: each non-default value changes which
    parameters train, what the adapter saves, or the scaling (hand-derived: alpha / r, rsLoRA alpha / sqrt(r))."""
    from peft import get_peft_model_state_dict

    plain = build_model(tiny_settings(tiny_cache), seed=0)
    assert trained_names(plain) and all(".lora_A." in n or ".lora_B." in n for n in trained_names(plain))
    q_proj = plain.base_model.model.model.layers[0].self_attn.q_proj
    assert q_proj.scaling["default"] == 32.0 / 16  # lora_alpha / lora_r

    rslora = build_model(tiny_settings(tiny_cache, peft=PeftConfig(use_rslora=True)), seed=0)
    assert rslora.base_model.model.model.layers[0].self_attn.q_proj.scaling["default"] == 32.0 / math.sqrt(16)

    dora = build_model(tiny_settings(tiny_cache, peft=PeftConfig(use_dora=True)), seed=0)
    magnitudes = {n for n in trained_names(dora) if "lora_magnitude_vector" in n}
    assert len(magnitudes) == 2 * 7  # one per adapted linear layer: q, k, v, o, gate, up, down in 2 layers
    assert trained_names(dora) - magnitudes == trained_names(plain)

    saved = build_model(tiny_settings(tiny_cache, peft=PeftConfig(modules_to_save=["lm_head"])), seed=0)
    assert trained_names(saved) - trained_names(plain) == {"base_model.model.lm_head.modules_to_save.default.weight"}
    assert "base_model.model.lm_head.weight" in get_peft_model_state_dict(saved)  # saved with the adapter
    assert "base_model.model.lm_head.weight" not in get_peft_model_state_dict(plain)

    by_name = build_model(tiny_settings(tiny_cache, peft=PeftConfig(target_modules=["q_proj"])), seed=0)
    assert {n.split(".")[-4] for n in trained_names(by_name)} == {"q_proj"}


def test_added_tokens_grow_the_vocabulary_and_train_the_embeddings(tiny_cache):
    """model.add_special_tokens: one special id each (never split), embeddings and head grown before LoRA wraps the
    model, and under LoRA the embeddings and head trained whole; a token the tokenizer has already keeps its id."""
    tokens = ["<tool_call>", "</tool_call>", "<|im_end|>"]
    settings = tiny_settings(tiny_cache)
    end_of_turn = build_tokenizer(settings).convert_tokens_to_ids("<|im_end|>")
    settings.add_special_tokens = tokens
    tokenizer = build_tokenizer(settings)
    assert len(tokenizer) == 602 and tokenizer.convert_tokens_to_ids(tokens) == [600, 601, end_of_turn]
    assert tokenizer.tokenize("a<tool_call>b</tool_call>") == ["a", "<tool_call>", "b", "</tool_call>"]
    model = build_model(settings, seed=0)
    base = model.get_base_model()
    assert base.get_input_embeddings().weight.shape[0] == base.get_output_embeddings().weight.shape[0] == 602
    assert trained_names(model) - trained_names(build_model(tiny_settings(tiny_cache), seed=0)) == {
        "base_model.model.model.embed_tokens.modules_to_save.default.weight",
        "base_model.model.lm_head.modules_to_save.default.weight",
    }
    settings.use_peft = False  # full fine-tuning: every row trains, the new ones included
    full = build_model(settings, seed=0)
    assert full.get_input_embeddings().weight.shape[0] == 602 and all(p.requires_grad for p in full.parameters())
    # The same seed gives the same new rows: a frozen reference copy starts where the policy does.
    assert torch.equal(full.get_input_embeddings().weight, base.get_input_embeddings().weight)


def test_a_tied_head_stays_tied_to_embeddings_trained_whole():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True)  # fmt: skip
    model = add_lora(LlamaForCausalLM(config), ModelConfig(use_peft=True, add_special_tokens=["<x>"]))
    whole = [n for n in trained_names(model) if "lora_" not in n]
    assert whole == ["base_model.model.model.embed_tokens.modules_to_save.default.weight"]  # one matrix, not two
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight


def test_a_reward_model_keeps_its_score_head_beside_modules_to_save(tiny_cache):
    """PEFT adds a classifier's score head to modules_to_save itself; a module given there joins it. Over a bfloat16
    base, what is trained whole is trained in float32, as the adapters are."""
    settings = tiny_settings(tiny_cache, peft=PeftConfig(modules_to_save=["embed_tokens"]))
    settings.dtype = "bfloat16"
    model = build_model(settings, seed=0, score_pad_token_id=0)
    whole = {n for n in trained_names(model) if "lora_" not in n}
    assert whole == {
        "base_model.model.model.embed_tokens.modules_to_save.default.weight",
        "base_model.model.score.modules_to_save.default.weight",
    }
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}
    assert model.get_base_model().model.layers[0].self_attn.q_proj.base_layer.weight.dtype == torch.bfloat16


def test_added_tokens_are_in_the_preprocessing_cache_key(tiny_cache):
    from train.app.config import DataConfig
    from train.data.preprocess import cache_key

    settings = tiny_settings(tiny_cache)
    plain = build_tokenizer(settings)
    settings.add_special_tokens = ["<tool_call>"]
    grown = build_tokenizer(settings)
    key = functools.partial(cache_key, [DEMO_TRAIN], settings=DataConfig(), max_length=128, kind="sft")
    assert key(tokenizer=plain) != key(tokenizer=grown)
