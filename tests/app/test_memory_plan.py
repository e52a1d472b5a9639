"""The memory plan (train/app/memory_plan.py): parameters counted exactly from the config, bytes per parameter by
method, dtype and optimizer against hand-derived values, what a setting changes, the activation table against the
tensors autograd really saves, the whole plan against a measured training step, and where the CLI shows it."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch

from tests.conftest import DEMO_TRAIN, OFFLINE_ENV, REPO, run_cli
from train.app import memory_plan as mp
from train.app.memory_plan import Device, ModelShape, PlanSettings, estimate


def tiny_config(tiny_cache, *overrides):
    import launch

    return launch.compose_config(
        ["loss=sft", "model=tiny", f"cache_dir={tiny_cache}", f"datasets=[{DEMO_TRAIN}]", *overrides]
    )


def tiny_dims(tiny_cache) -> dict:
    return json.loads((tiny_cache / "tiny-llama" / "config.json").read_text())


def test_parameters_are_counted_exactly_from_the_config_alone(tiny_cache):
    from transformers import AutoModelForCausalLM

    d = tiny_dims(tiny_cache)
    h, i, n_layers, vocab = d["hidden_size"], d["intermediate_size"], d["num_hidden_layers"], d["vocab_size"]
    kv = d["num_key_value_heads"] * d["head_dim"]
    layer = 2 * h * h + 2 * h * kv + 3 * h * i + 2 * h  # q, o; k, v; gate, up, down; two norms
    head = 0 if d["tie_word_embeddings"] else vocab * h
    by_hand = vocab * h + n_layers * layer + h + head  # embeddings, layers, final norm, head

    shape = mp.model_shape(tiny_config(tiny_cache), "full")
    real = AutoModelForCausalLM.from_pretrained(tiny_cache / "tiny-llama")
    assert shape.n_params == by_hand == sum(p.numel() for p in real.parameters())
    assert shape.n_block_linear == n_layers * (layer - 2 * h)
    assert (shape.hidden, shape.kv_width, shape.intermediate, shape.n_layers, shape.vocab) == (
        h,
        kv,
        i,
        n_layers,
        vocab,
    )
    assert shape.n_trainable == shape.n_params

    lora = mp.model_shape(tiny_config(tiny_cache, "method=lora", "model.peft.lora_r=4"), "lora")
    # r x (in + out) for each adapted linear layer: q, k, v, o, gate, up, down
    adapters = 4 * ((h + h) + 2 * (h + kv) + (h + h) + 2 * (h + i) + (i + h))
    assert lora.n_trainable == n_layers * adapters
    assert (lora.adapters_per_layer, lora.adapted_inputs_per_layer) == (7, 6 * h + i)


SHAPE = ModelShape(  # a made-up model: every number below is derived from these by hand
    n_params=1_000_000,
    n_block_linear=600_000,
    n_head=100_000,
    head_tied=True,
    n_root=200_000,
    n_layers=4,
    hidden=100,
    kv_width=50,
    intermediate=300,
    vocab=1_000,
    trainable_shapes=((1000, 1000),),
    adapted_inputs_per_layer=0,
    adapters_per_layer=0,
    lora_r=0,
)
P = SHAPE.n_params


def test_bytes_per_parameter_by_method_dtype_and_optimizer():
    full = PlanSettings(method="full", compute_dtype="float32", optimizer="adamw")
    assert mp.weight_bytes(SHAPE, full, 1) == (4 * P, 0)  # float32 master weights
    assert mp.gradient_bytes(SHAPE, full, 1) == 4 * P
    assert mp.optimizer_bytes(SHAPE, full, 1) == (8 * P, 4 * P)  # two moments; the multi-tensor step's buffer
    fused = dataclasses.replace(full, optimizer="adamw_fused")
    assert mp.optimizer_bytes(SHAPE, fused, 1) == (8 * P, 0)
    bf16 = dataclasses.replace(full, compute_dtype="bfloat16")  # autocast's bfloat16 copies of the linear weights
    assert mp.weight_bytes(SHAPE, bf16, 1) == (4 * P, 2 * (600_000 + 100_000))
    eight_bit = dataclasses.replace(full, optimizer="adamw_8bit")
    assert mp.optimizer_bytes(SHAPE, eight_bit, 1) == (int(2 * (P + P / 64)), 0)
    adafactor = dataclasses.replace(full, optimizer="adafactor")
    assert mp.optimizer_bytes(SHAPE, adafactor, 1)[0] == 4 * (1000 + 1000)  # row and column sums

    adapters = ((8, 1000), (1000, 8))
    lora_shape = dataclasses.replace(SHAPE, trainable_shapes=adapters)
    lora = PlanSettings(method="lora", compute_dtype="bfloat16")
    assert mp.weight_bytes(lora_shape, lora, 1) == (2 * P + 4 * 16_000, 0)  # bf16 base, float32 adapters
    assert mp.gradient_bytes(lora_shape, lora, 1) == 4 * 16_000
    qlora = dataclasses.replace(lora, method="qlora", quantization="nf4", double_quant=True)
    per_weight = 0.5 + 1 / 64 + 4 / (64 * 256)  # 4-bit codes, 8-bit block scales, float32 scales of those
    expected = 600_000 * per_weight + 400_000 * 2 + 4 * 16_000
    assert mp.weight_bytes(lora_shape, qlora, 1) == (int(expected), 0)
    no_double = dataclasses.replace(qlora, double_quant=False)
    assert mp.weight_bytes(lora_shape, no_double, 1)[0] == int(600_000 * (0.5 + 4 / 64) + 400_000 * 2 + 64_000)
    reference = dataclasses.replace(full, reference="model")  # a separate float32 reference copy
    assert mp.weight_bytes(SHAPE, reference, 1)[0] == 8 * P


def test_settings_change_the_plan_as_derived():
    settings = PlanSettings(method="full", compute_dtype="float32", rows_per_micro_batch=2, tokens_per_row=64)
    tokens, h = 128, 100
    per_layer = 32 * h + 8 * 50 + 16 * 300  # the float32 full-training row of LAYER_BYTES_PER_TOKEN
    assert mp.activation_bytes(SHAPE, settings) == tokens * (4 * per_layer + 12 * h)
    checkpointed = dataclasses.replace(settings, gradient_checkpointing=True)  # each layer's input, one layer's rest
    assert mp.activation_bytes(SHAPE, checkpointed) == tokens * (4 * 4 * h + per_layer + 12 * h)
    # logits at every position but the last of each row, float32, and their gradient; one float32 chunk x 3
    assert mp.logit_bytes(SHAPE, settings) == 126 * 1000 * 8 + 126 * 1000 * 12

    sharded = dataclasses.replace(settings, n_processes=2, sharded=True)
    block = (P - SHAPE.n_root) // 4
    gathered = (SHAPE.n_root + 2 * block) * 4  # the root and two layers unsharded
    assert mp.weight_bytes(SHAPE, sharded, 2) == (4 * P // 2 + gathered, 0)
    assert mp.gradient_bytes(SHAPE, sharded, 2) == 4 * P // 2 + 4 * block
    assert mp.optimizer_bytes(SHAPE, sharded, 2) == (8 * P // 2, 4 * P // 2)
    whole, half = estimate(SHAPE, settings), estimate(SHAPE, sharded)
    assert half.total < whole.total and mp.activation_bytes(SHAPE, sharded) == mp.activation_bytes(SHAPE, settings)

    offloaded = estimate(SHAPE, dataclasses.replace(sharded, offload=True))
    assert offloaded.optimizer_state == 0 and offloaded.offloaded > 0 and offloaded.total < half.total

    # model.micro_batch_tokens=64: passes of one 64-token row instead of two; never below one full row
    budget = dataclasses.replace(settings, micro_batch_tokens=64)
    assert mp.activation_bytes(SHAPE, budget) == 64 * (4 * per_layer + 12 * h)
    assert mp.logit_bytes(SHAPE, budget) == 62 * 1000 * 8 + 62 * 1000 * 12
    assert mp.pass_tokens(dataclasses.replace(settings, micro_batch_tokens=10)) == 64
    assert mp.pass_tokens(dataclasses.replace(settings, micro_batch_tokens=10_000)) == 128
    # model.head_loss=fused: one chunk of float32 logits and their softmax, the head's float32 gradient (vocab x
    # hidden), the hidden states' gradient; chunks of 2**26 // 1000 positions, more than the 126 here
    from train.objectives import losses  # the plan mirrors its chunk sizes without importing torch

    assert (mp.FUSED_CHUNK_ELEMENTS, mp.LOGIT_CHUNK_POSITIONS) == (losses.FUSED_CHUNK_ELEMENTS, 4096)
    fused = dataclasses.replace(settings, fused_head=True)
    assert mp.logit_bytes(SHAPE, fused) == 126 * 1000 * 8 + 1000 * h * 4 + 126 * h * 4


def test_the_peak_is_the_larger_moment_of_a_step():
    big_batch = PlanSettings(method="full", compute_dtype="float32", rows_per_micro_batch=8, tokens_per_row=512)
    plan = estimate(SHAPE, big_batch)
    assert plan.moment == "the backward pass" and plan.activations > 0
    assert plan.total == 4 * P + 4 * 100_000 + 8 * P + plan.activations + plan.logits  # weights, head grad, moments
    one_token = dataclasses.replace(big_batch, rows_per_micro_batch=1, tokens_per_row=2)
    plan = estimate(SHAPE, one_token)
    assert plan.moment == "the optimizer step" and plan.total == 4 * P + 4 * P + 8 * P + 4 * P


def saved_for_backward(cfg) -> int:
    """Bytes of every tensor autograd saves for backward (but the weights) in one forward pass of the run's model on
    4 rows of 64 tokens, under autocast as the run's Accelerator sets it."""
    from train.app.models import build_model
    from train.loop.trainer import forward_supervised

    model = build_model(cfg.model, seed=0)
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (4, 64), generator=torch.Generator().manual_seed(0))
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.model.dtype == "bfloat16")
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor), autocast:
        logits, _ = forward_supervised(model, {"input_ids": ids, "labels": ids, "attention_mask": torch.ones_like(ids)})
    assert logits.requires_grad  # the logits are the output: the plan counts them apart
    return sum(saved.values())


@pytest.mark.parametrize(("method", "dtype"), [("full", "float32"), ("full", "bfloat16"), ("lora", "bfloat16")])
def test_the_activation_table_matches_the_tensors_autograd_saves(tiny_cache, method, dtype):
    """Every tensor saved for backward (but the weights) in one forward pass of the real model, against the plan's
    activations: the same count, done by autograd itself."""
    overrides = [f"model.dtype={dtype}", "model.peft.lora_dropout=0.1", "model.max_length=64", "model.batch_size=4"]
    cfg = tiny_config(
        tiny_cache, *overrides, "model.attention_float32=false", *(["method=lora"] if method == "lora" else [])
    )
    settings = PlanSettings(
        method=method, compute_dtype=dtype, rows_per_micro_batch=4, tokens_per_row=64, lora_dropout=0.1
    )
    planned = mp.activation_bytes(mp.model_shape(cfg, method), settings)
    assert planned == pytest.approx(saved_for_backward(cfg), rel=0.15)


def test_attention_in_float32_adds_exactly_what_autograd_saves_in_float32(tiny_cache):
    """model.attention_float32 under bfloat16: the plan's extra bytes are the measured difference, to the byte."""
    overrides = ["model.dtype=bfloat16", "model.max_length=64", "model.batch_size=4"]
    measured = {on: saved_for_backward(tiny_config(tiny_cache, *overrides, f"model.attention_float32={on}"))
                for on in (False, True)}  # fmt: skip
    shape = mp.model_shape(tiny_config(tiny_cache, *overrides), "full")
    settings = PlanSettings(method="full", compute_dtype="bfloat16", rows_per_micro_batch=4, tokens_per_row=64)
    on = dataclasses.replace(settings, attention_float32=True)
    assert mp.activation_bytes(shape, on) - mp.activation_bytes(shape, settings) == measured[True] - measured[False]
    assert measured[True] > measured[False]


@pytest.mark.slow
def test_the_plan_is_within_25_percent_of_a_measured_training_step(tmp_path, tiny_cache):
    """A 16M-parameter Llama (big enough that the allocator's own memory does not dominate, a step takes seconds),
    full fine-tuning, through scripts/memory_plan.py --measure in its own process."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=512, intermediate_size=1408, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4,
        vocab_size=8192, tie_word_embeddings=True,
    )  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(tmp_path / "model")
    for file in (tiny_cache / "tiny-llama").glob("tok*"):  # the tokenizer is not used: token ids are random
        (tmp_path / "model" / file.name).write_bytes(file.read_bytes())
    command = [
        sys.executable, str(REPO / "scripts" / "memory_plan.py"), "--measure", "--json", "--steps", "2",
        "loss=sft", "model=tiny", f"++model.name_or_path={tmp_path / 'model'}", "model.dtype=float32",
        "model.batch_size=4", "model.max_length=256",
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, **OFFLINE_ENV})
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["measured_bytes"] > 0.3e9  # the step's own memory, far above any allocator noise
    assert abs(result["error"]) <= 0.25, result


def test_advice_names_the_settings_that_would_fit():
    settings = PlanSettings(method="full", compute_dtype="float32", rows_per_micro_batch=8, tokens_per_row=512)
    need = estimate(SHAPE, settings).total

    def shape_for(method):
        if method == "full":
            return SHAPE
        return dataclasses.replace(SHAPE, trainable_shapes=((8, 1000), (1000, 8)), adapters_per_layer=2, lora_r=8)

    def estimates(found: list[str]) -> list[float]:
        return [float(text.rsplit("about ", 1)[1].split(" GB")[0]) * 1e9 for text in found]

    a_little_short = Device(int(need * 0.8), "80%")
    assert mp.fits(estimate(SHAPE, settings), a_little_short) == "tight"
    found = mp.advice(shape_for, settings, a_little_short)
    assert any(text.startswith("model.gradient_checkpointing=true (about") for text in found)
    assert any(text.startswith("model.gradient_accumulation_steps=2 (micro-batches of 4)") for text in found)
    assert any(text.startswith("model.micro_batch_tokens=") for text in found)  # passes of fewer whole rows
    assert all(total <= a_little_short.bytes_per_process + 0.005e9 for total in estimates(found))

    far_short = Device(need // 4, "a quarter")
    assert mp.fits(estimate(SHAPE, settings), far_short) == "no"
    found = mp.advice(shape_for, settings, far_short)
    assert not any(text.startswith("model.gradient_checkpointing") for text in found)  # not enough alone
    assert any(text.startswith("model.gradient_accumulation_steps=") for text in found)
    assert not any("FSDP2" in text for text in found)  # on CPU, more processes share the same RAM
    assert mp.advice(shape_for, settings, Device(1000, "nothing")) == []


@pytest.mark.slow
def test_the_cli_shows_the_plan_at_start_up_and_refuses_what_clearly_does_not_fit(tiny_cache):
    base = ["loss=sft", "model=tiny", f"cache_dir={tiny_cache}", f"datasets=[{DEMO_TRAIN}]"]
    run = run_cli([*base, "exp_name=memory-plan", "max_steps=1", "model.batch_size=4"])
    assert run.returncode == 0, run.stderr[-2000:]
    log = run.stderr + run.stdout
    start = log.index("memory plan: this run needs about")
    assert "per process (full, float32, adamw_fused, micro-batch 4 x 128 tokens" in log[start:]
    assert start < log.index("model: ")  # before the model loads

    # about 4x a 24 GB machine: clearly too big whatever else runs there (4096 rows planned 30 GB, within 1.25x)
    huge = [*base, "model.batch_size=16384", "model.max_length=512", "model.gradient_accumulation_steps=1"]
    import launch
    from train.app.validate import validate
    from train.errors import ConfigError

    raw = launch._job_part(launch.compose_raw(huge, None, "config"))
    validate(raw, check_model_files=True)  # a sweep's driver (maybe not the machine that trains) does not refuse
    with pytest.raises(ConfigError) as refused:
        validate(raw, check_model_files=True, check_memory=True)  # a run, on the machine that trains
    message = str(refused.value)
    assert "memory_check=error: the memory plan says this run clearly does not fit" in message
    assert "model.gradient_accumulation_steps=" in message and "memory_check=warn" in message
    dry_run = run_cli([*huge, "memory_check=warn", "--cfg", "job"])  # warned, not refused; the config printed
    assert dry_run.returncode == 0, dry_run.stderr[-2000:]
    assert "does not fit: about" in dry_run.stderr and "memory_check: warn" in dry_run.stdout
