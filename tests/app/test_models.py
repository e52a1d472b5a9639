"""Model settings decided for the machine; the tokenizer and the model with the PEFT options and added tokens."""

import functools
import json
import math
import os

import pytest
import torch
from safetensors.torch import load_file

from conftest import DEMO_EVAL, DEMO_TRAIN, REPO, read_metrics, run_cli
from train.app.config import ModelConfig, PeftConfig
from train.app.models import add_lora, build_model, build_tokenizer, resolve_dtype


def test_auto_dtype_is_bfloat16_only_where_the_hardware_is_fast_at_it(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    # AVX512-BF16 without AMX: a SmolLM2 step ran 1.75x slower in bfloat16 than in float32 (docs/BENCHMARKS.md)
    for amx, avx512_bf16, expected in ((True, True, "bfloat16"), (False, True, "float32"), (False, False, "float32")):
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


def quantized(tiny_cache, **settings):
    base = {
        "name_or_path": str(tiny_cache / "tiny-llama"),
        "dtype": "bfloat16",
        "use_peft": True,
        "quantization": "nf4",
    }
    return build_model(ModelConfig(**{**base, **settings}), seed=0)


def test_a_quantized_base_is_4_bit_by_type_and_by_memory(tiny_cache):
    """model.quantization=nf4: every linear layer but the head is bitsandbytes' Linear4bit, and the base takes 0.5
    bytes per such weight where bfloat16 takes 2 (plus the double-quantized block scales); the embeddings and the head
    keep model.dtype (PEFT's k-bit preparation would cast them to float32), the norms are float32."""
    import bitsandbytes as bnb
    from transformers import AutoModelForCausalLM

    model = quantized(tiny_cache)
    base = model.get_base_model()
    linear_layers = [m for m in base.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(linear_layers) == 2 * 7 and not isinstance(base.lm_head, bnb.nn.Linear4bit)  # q k v o gate up down
    assert {layer.weight.quant_state.quant_type for layer in linear_layers} == {"nf4"}
    assert all(layer.weight.quant_state.nested for layer in linear_layers)  # double quantization, the default
    assert {layer.compute_dtype for layer in linear_layers} == {torch.bfloat16}  # quantization_compute_dtype=auto
    assert base.model.embed_tokens.weight.dtype == base.lm_head.weight.dtype == torch.bfloat16
    assert base.model.norm.weight.dtype == torch.float32
    n_quantized = sum(layer.in_features * layer.out_features for layer in linear_layers)
    path = tiny_cache / "tiny-llama"
    full = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).get_memory_footprint()
    lora = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if "lora_" in n)
    norms = sum(p.numel() * 2 for n, p in base.named_parameters() if "norm" in n)  # bfloat16 -> float32: +2 bytes
    saved = full - (base.get_memory_footprint() - lora - norms)
    assert 0.95 < saved / (1.5 * n_quantized) <= 1.0  # 2 -> 0.5 bytes a weight, less the scales' few bytes a block


def test_the_quantization_options_reach_bitsandbytes(tiny_cache):
    """Each non-default value changes the layers: fp4, no double quantization, another compute dtype, int8."""
    import bitsandbytes as bnb

    layer = quantized(tiny_cache, quantization="fp4").get_base_model().model.layers[0].self_attn.q_proj
    assert layer.weight.quant_state.quant_type == "fp4"
    layer = quantized(tiny_cache, double_quantization=False).get_base_model().model.layers[0].self_attn.q_proj
    assert not layer.weight.quant_state.nested
    layer = quantized(tiny_cache, quantization_compute_dtype="float32").get_base_model().model.layers[0].mlp.up_proj
    assert layer.base_layer.compute_dtype == torch.float32  # the LoRA layer wraps the quantized one
    layer = quantized(tiny_cache, quantization="int8").get_base_model().model.layers[0].mlp.down_proj
    assert isinstance(layer.base_layer, bnb.nn.Linear8bitLt) and layer.base_layer.weight.dtype == torch.int8


def test_an_evaluation_does_not_change_the_4_bit_gradients(tiny_cache):
    """bitsandbytes repacks 4-bit weights for CPU inference at a no-grad eval forward, after which the base's
    backward is silently wrong (models.prepare_quantized_base turns that off). The adapters' gradients after an
    evaluation must equal those before it, and those of the same model over its dequantized weights as plain layers."""
    import bitsandbytes.functional as bnb_functional

    model = quantized(tiny_cache, dtype="float32")
    ids = torch.randint(0, 600, (2, 24), generator=torch.Generator().manual_seed(0))

    def adapter_gradients():
        model.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])

    model.eval()  # no dropout: the same forward each time
    before = adapter_gradients()
    with torch.no_grad():
        model(input_ids=ids)  # what an evaluation does
    assert torch.equal(adapter_gradients(), before)
    for module in model.modules():  # the reference: each 4-bit weight dequantized into a float32 Linear
        if hasattr(module, "base_layer") and hasattr(module.base_layer.weight, "quant_state"):
            quantized_layer = module.base_layer
            plain = torch.nn.Linear(quantized_layer.in_features, quantized_layer.out_features, bias=False)
            weight = quantized_layer.weight
            plain.weight.data = bnb_functional.dequantize_4bit(weight.data, weight.quant_state).float()
            plain.requires_grad_(False)
            module.base_layer = plain
    assert torch.allclose(adapter_gradients(), before, rtol=1e-4, atol=1e-6)


# ---- QLoRA end to end: the real CLI on the tiny model ----

DEMO_PREF_TRAIN, DEMO_PREF_EVAL = (str(REPO / "data" / "demo" / f"pref_{split}.jsonl") for split in ("train", "eval"))
QLORA = ["model=tiny", "method=qlora", "lr=1e-2", "log_every_steps=1", "save_every_steps=100"]
RESUMABLE = ["resume_from_checkpoint=auto", "max_steps=6", "eval_every_steps=6"]


def qlora_run(cache, name: str, extra: list[str], faults: str | None = None):
    """`python launch.py` with QLoRA on the tiny model; `faults` as train/loop/faults.py reads them (sigterm@N)."""
    os.environ.pop("HALYARD_FAULTS", None)
    if faults:
        os.environ["HALYARD_FAULTS"] = faults
    try:
        result = run_cli([*QLORA, f"cache_dir={cache}", f"exp_name={name}", *extra])
    finally:
        os.environ.pop("HALYARD_FAULTS", None)
    assert result.returncode == (75 if faults else 0), result.stderr[-3000:]
    # bitsandbytes' offline notice about an optional CPU kernel (progress.silence_kernel_notices) never shows
    assert "kernels-community" not in result.stderr + result.stdout
    return cache / name


def resumed_equals_uninterrupted(cache, name: str, extra: list[str]) -> list[dict]:
    """Run `extra` in one go, and again stopped by SIGTERM after step 3 and resumed: the logged losses, gradient
    norms and the adapter in FINAL/ must be bit-identical. Returns the uninterrupted run's metrics."""
    whole = qlora_run(cache, f"{name}_whole", [*RESUMABLE, *extra])
    qlora_run(cache, f"{name}_cut", [*RESUMABLE, *extra], faults="sigterm@3")
    cut = qlora_run(cache, f"{name}_cut", [*RESUMABLE, *extra])
    metrics = [[{k: v for k, v in m.items() if "loss" in k or k in ("step", "grad_norm")} for m in read_metrics(run)]
               for run in (whole, cut)]  # fmt: skip
    assert metrics[0] == metrics[1]
    adapter = (
        "adapter/adapter_model.safetensors" if (whole / "FINAL" / "adapter").is_dir() else "adapter_model.safetensors"
    )
    one, two = load_file(whole / "FINAL" / adapter), load_file(cut / "FINAL" / adapter)
    assert one.keys() == two.keys() and all(torch.equal(one[k], two[k]) for k in one)
    return read_metrics(whole)


@pytest.mark.slow
def test_qlora_sft_learns_resumes_exactly_and_its_adapter_loads_onto_the_16_bit_base(tiny_cache):
    """A QLoRA SFT run (packed rows: the packing check passes on the 4-bit base) learns, resumes bit-identically, and
    FINAL/ holds an adapter that PEFT loads onto the 16-bit base, and a model merged into that base.

    Tolerance of "the same logits": the adapter was trained on the 4-bit base, so on the 16-bit base the logits differ
    by what quantization changes; that gap (measured on the bases alone) bounds it, x1.5 for the adapter's own
    effect on it. The merged model must equal PEFT's own merge into the 16-bit base (float32: 1e-6)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    extra = [
        "loss=sft",
        f"datasets=[{DEMO_TRAIN}]",
        f"eval_datasets=[{DEMO_EVAL}]",
        "data.packing=true",
        "save_merged=both",
    ]
    metrics = resumed_equals_uninterrupted(tiny_cache, "qlora_sft", extra)
    evals = [m["loss/eval"] for m in metrics if "loss/eval" in m]
    assert evals[-1] < 0.97 * evals[0]
    final = tiny_cache / "qlora_sft_whole" / "FINAL"
    base_path = tiny_cache / "tiny-llama"
    assert json.loads((final / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"] == str(
        base_path
    )

    ids = torch.tensor([list(range(5, 45))])
    four_bit = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=torch.float32)  # fmt: skip
    with torch.no_grad():
        base16 = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
        base4 = AutoModelForCausalLM.from_pretrained(base_path, quantization_config=four_bit, device_map="cpu")
        bases = [model(ids).logits for model in (base16, base4)]
        adapted16 = PeftModel.from_pretrained(base16, final / "adapter")
        adapted4 = PeftModel.from_pretrained(base4, final / "adapter")
        trained = [model(ids).logits for model in (adapted16, adapted4)]
        merged = AutoModelForCausalLM.from_pretrained(final, dtype=torch.float32)(ids).logits
    quantization_gap = (bases[0] - bases[1]).abs().max()
    assert (trained[0] - trained[1]).abs().max() <= 1.5 * quantization_gap
    assert (trained[0] - bases[0]).abs().max() > 3 * quantization_gap  # the adapter changed far more than that
    assert torch.allclose(merged, trained[0], atol=1e-5)  # merged into the 16-bit base, not the 4-bit one
    assert "quantization_config" not in json.loads((final / "config.json").read_text())


@pytest.mark.slow
def test_qlora_dpo_learns_and_resumes_exactly_with_the_quantized_base_as_reference(tiny_cache):
    """QLoRA DPO: the reference is the same 4-bit base with the adapters off (no second model: one 'model:' line in
    the log); the held-out pair accuracy rises and the loss falls from ln 2; resume is bit-identical."""
    extra = ["loss=dpo", f"datasets=[{DEMO_PREF_TRAIN}]", f"eval_datasets=[{DEMO_PREF_EVAL}]", "lr=5e-3"]
    metrics = resumed_equals_uninterrupted(tiny_cache, "qlora_dpo", extra)
    evals = [m for m in metrics if "loss/eval" in m]
    assert evals[0]["loss/eval"] == pytest.approx(math.log(2), abs=1e-6)  # the policy is its reference at step 0
    assert evals[-1]["loss/eval"] < 0.9 * math.log(2)
    assert evals[-1]["rewards_eval/accuracies"] > evals[0]["rewards_eval/accuracies"]


@pytest.mark.slow
def test_a_run_that_adds_tokens_saves_them_and_trains_their_rows_under_fsdp(tiny_cache, tmp_path):
    """LoRA with two added tokens, sharded by FSDP2 over two processes, FINAL/ with the merged model and the adapter:
    both reload with the grown tokenizer and embeddings (602 rows), the new rows moved away from their
    initialization, and the merged model generates."""
    from peft import AutoPeftModelForCausalLM
    from test_launch import accelerate_launcher
    from transformers import AutoModelForCausalLM, AutoTokenizer

    data = tmp_path / "tools.jsonl"
    rows = [
        {"instruction": f"Add {i} and {i + 1}.", "output": f"<tool_call>add {i} {i + 1}</tool_call>"} for i in range(16)
    ]
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    tokens = ["<tool_call>", "</tool_call>"]
    args = ["loss=sft", "model=tiny", f"cache_dir={tiny_cache}", "exp_name=added_tokens", f"datasets=[{data}]"]
    args += [
        "method=lora",
        "lr=1e-2",
        "max_steps=4",
        "save_merged=both",
        "model.add_special_tokens=['<tool_call>','</tool_call>']",
    ]
    result = run_cli(args, launcher=accelerate_launcher("fsdp_cpu_2proc.yaml"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "embed_tokens, lm_head trained whole" in result.stderr and "FSDP2" in result.stderr
    final = tiny_cache / "added_tokens" / "FINAL"
    tokenizer = AutoTokenizer.from_pretrained(final)
    assert len(tokenizer) == 602 and tokenizer.convert_tokens_to_ids(tokens) == [600, 601]
    merged = AutoModelForCausalLM.from_pretrained(final)
    adapter = AutoPeftModelForCausalLM.from_pretrained(final / "adapter").merge_and_unload()
    initial = build_model(ModelConfig(name_or_path=str(tiny_cache / "tiny-llama"), add_special_tokens=tokens), seed=0)
    for get in ("get_input_embeddings", "get_output_embeddings"):
        trained, start = getattr(merged, get)().weight, getattr(initial, get)().weight
        assert trained.shape[0] == 602 and torch.allclose(getattr(adapter, get)().weight, trained, atol=1e-6)
        assert (trained[600:] - start[600:]).abs().amax(dim=1).min() > 1e-3  # each new row trained
    text = tokenizer.apply_chat_template([{"role": "user", "content": "Add 2 and 3."}], tokenize=False,
                                         add_generation_prompt=True)  # fmt: skip
    prompt = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
    generated = merged.generate(prompt, max_new_tokens=4, do_sample=False)[0, prompt.shape[1] :].tolist()
    assert generated  # it answers (after 4 steps, not yet with the tool call)


def test_the_reference_cache_keys_on_the_quantization(tiny_cache, tmp_path):
    """Reference log-probs of a 4-bit base are not the 16-bit base's: reference.precompute's cache folder differs by
    quantization and by each 4-bit option, so neither run reuses the other's values."""
    from train.app.models import numerics_id
    from train.objectives.reference import ReferenceCache

    path = str(tiny_cache / "tiny-llama")
    variants = [{}, {"quantization": "nf4"}, {"quantization": "nf4", "double_quantization": False},
                {"quantization": "fp4"}, {"quantization": "nf4", "quantization_compute_dtype": "float32"}]  # fmt: skip
    settings = [ModelConfig(name_or_path=path, dtype="bfloat16", use_peft=True, **v) for v in variants]
    folders = {ReferenceCache(str(tmp_path), path, numerics_id(s)).folder for s in settings}
    assert len(folders) == len(variants)
    assert numerics_id(settings[0]) == "bfloat16"  # unquantized: the key it always had, earlier caches stay valid
