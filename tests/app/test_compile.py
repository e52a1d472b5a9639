"""model.compile (train/app/models.py compile_layers): which modules are compiled, that evaluation stays eager, what
validation refuses, and the real CLI on the tiny model giving the uncompiled run's losses."""

import json
import os
import subprocess
import sys

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from conftest import DEMO_EVAL, DEMO_TRAIN, OFFLINE_ENV, REPO, read_metrics, run_cli
from train.app.config import Config, ModelConfig, PeftConfig
from train.app.models import _when_training, add_lora, compile_layers
from train.app.validate import _check_compile
from train.errors import HalyardError
from train.loop.distributed import decoder_layers


def small_llama(layers: int = 3) -> LlamaForCausalLM:
    config = LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=layers,
                         num_attention_heads=2, num_key_value_heads=1)  # fmt: skip
    return LlamaForCausalLM(config)


def test_the_decoder_layers_are_the_no_split_module_blocks_in_order_through_peft():
    model = small_llama(3)
    assert decoder_layers(model) == list(model.model.layers)
    adapted = add_lora(small_llama(3), ModelConfig(use_peft=True, peft=PeftConfig(target_modules=["q_proj"])))
    layers = decoder_layers(adapted)
    assert [type(layer).__name__ for layer in layers] == ["LlamaDecoderLayer"] * 3
    assert layers == list(adapted.get_base_model().model.layers)
    assert decoder_layers(model, ["LlamaRMSNorm"]) == [m for m in model.modules() if type(m).__name__ == "LlamaRMSNorm"]
    assert decoder_layers(torch.nn.Linear(2, 2)) == []  # a model naming no block class


def test_compiling_keeps_every_parameter_name_and_refuses_a_model_without_layers():
    model = small_llama(2)
    names = list(model.state_dict())
    assert compile_layers(model) == list(model.model.layers)
    assert list(model.state_dict()) == names  # checkpoints and FINAL/ are unchanged by compilation
    with pytest.raises(HalyardError, match="names no decoder layer class"):
        compile_layers(torch.nn.Linear(2, 2))


def test_only_passes_with_gradients_run_the_compiled_forward():
    calls = []

    def compiled(x):
        calls.append("compiled")
        return x

    def eager(x):
        calls.append("eager")
        return x

    forward = _when_training(compiled, eager=eager)
    forward(1)
    with torch.no_grad():  # evaluation, generation, benchmarks
        forward(2)
    with torch.inference_mode():
        forward(3)
    assert calls == ["compiled", "eager", "eager"]


def test_validation_refuses_compile_without_a_cpp_compiler(monkeypatch):
    import torch._inductor.config as inductor

    assert _check_compile(Config(model=ModelConfig(compile=False))) == []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert _check_compile(Config(model=ModelConfig(compile=True))) == []  # g++ is on this machine's PATH
    monkeypatch.setattr(inductor.cpp, "cxx", (None, "no-such-compiler++"))
    (problem,) = _check_compile(Config(model=ModelConfig(compile=True)))
    assert "model.compile=true" in problem and "no C++ compiler" in problem and "model.compile=false" in problem


# ---- the real CLI on the tiny model: compiled and eager runs agree ----

COMMON = ["model=tiny", "loss=sft", f"datasets=[{DEMO_TRAIN}]", f"eval_datasets=[{DEMO_EVAL}]", "lr=1e-3",
          "max_steps=3", "eval_every_steps=3", "log_every_steps=1"]  # fmt: skip
LAYOUTS = {"grouped": ["data.group_by_length=true"], "packed": ["data.packing=true", "model.batch_size=2"]}


@pytest.mark.slow
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_a_compiled_run_gives_the_eager_runs_losses(tiny_cache, layout):
    """Grouped padded batches (a new sequence length every step, some without padding) and packed rows: the same
    step losses, gradient norms and eval losses as without compilation (float32; rel 1e-4, inductor reorders float
    sums), the log names the compiled layers, and summary.json counts the graphs: a few, not one per step."""
    runs = {}
    for compiled in (False, True):
        name = f"compile_{layout}_{'on' if compiled else 'off'}"
        args = [*COMMON, *LAYOUTS[layout], f"cache_dir={tiny_cache}", f"exp_name={name}", f"model.compile={compiled}"]
        result = run_cli(args, timeout=900)
        assert result.returncode == 0, result.stderr[-3000:]
        runs[compiled] = (read_metrics(tiny_cache / name), result.stderr + result.stdout, tiny_cache / name)
    (eager, _, _), (metrics, log, run_dir) = runs[False], runs[True]
    keys = ("loss/train", "grad_norm", "loss/eval")
    assert [m["step"] for m in metrics] == [m["step"] for m in eager]
    for one, other in zip(metrics, eager, strict=True):
        for key in (k for k in keys if k in other):
            assert one[key] == pytest.approx(other[key], rel=1e-4), (one["step"], key)
    assert "model.compile: 2 LlamaDecoderLayer layers compiled" in log
    summary = json.loads((run_dir / "summary.json").read_text())
    assert 1 <= summary["compiled_graphs"] <= 3 and summary["compile_graph_breaks"] == 0
    assert "compiled_graphs" not in json.loads((tiny_cache / f"compile_{layout}_off" / "summary.json").read_text())


@pytest.mark.slow
def test_compiled_layers_under_fsdp2_give_the_one_process_eager_losses(tiny_cache):
    """Compiled before FSDP2 shards them (build_model, then prepare_model): on two CPU processes the losses and
    gradient norms are those of one eager process on the same global batches."""
    from test_launch import accelerate_launcher

    args = [*(a for a in COMMON if not a.startswith("eval_datasets")), *LAYOUTS["grouped"], f"cache_dir={tiny_cache}"]
    eager = run_cli([*args, "exp_name=compile_fsdp_off"])
    assert eager.returncode == 0, eager.stderr[-3000:]
    sharded = run_cli([*args, "exp_name=compile_fsdp_on", "model.compile=true"],
                      launcher=accelerate_launcher("fsdp_cpu_2proc.yaml"), timeout=900)  # fmt: skip
    assert sharded.returncode == 0, sharded.stderr[-3000:]
    assert "FSDP2: 2" in sharded.stderr + sharded.stdout
    metrics, reference = (read_metrics(tiny_cache / f"compile_fsdp_{which}") for which in ("on", "off"))
    for one, other in zip(metrics, reference, strict=True):
        assert one["loss/train"] == pytest.approx(other["loss/train"], rel=1e-4)
        assert one["grad_norm"] == pytest.approx(other["grad_norm"], rel=1e-4)
    assert json.loads((tiny_cache / "compile_fsdp_on" / "summary.json").read_text())["compiled_graphs"] >= 1


# ---- scripts/benchmark.py compile, on tiny settings (it times nothing here: the numbers are not read) ----


def test_the_benchmark_batches_change_length_every_step_and_packed_ones_restart_positions(tiny_cache):
    from transformers import AutoTokenizer

    from scripts.bench.compile import grouped_batches, packed_batches
    from scripts.bench.data import synthetic_chat_rows
    from train.app.config import DataConfig
    from train.data.preprocess import load_examples

    tokenizer = AutoTokenizer.from_pretrained(tiny_cache / "tiny-llama")
    data = tiny_cache / "bench_compile_chat.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in synthetic_chat_rows(96, seed=5)))
    examples = load_examples([str(data)], tokenizer, DataConfig(), 256)[0]
    grouped = grouped_batches(examples, batch_size=4, steps=6, pad_id=0, seed=0)
    assert len(grouped) == 6 and len({batch["input_ids"].shape[1] for batch in grouped}) > 3
    assert all(batch["input_ids"].shape[0] == 4 and "attention_mask" in batch for batch in grouped)
    packed = packed_batches(examples, rows=2, max_length=512, steps=3, pad_id=0, seed=0)  # examples of <= 256
    assert len(packed) == 3 and all(b["input_ids"].shape[0] == 2 and "attention_mask" not in b for b in packed)
    assert sum(int((b["position_ids"] == 0).sum()) for b in packed) > 2 * 2 * 3  # more than one example a row


@pytest.mark.slow
def test_the_compile_benchmark_prints_its_table_on_the_tiny_model(tiny_cache):
    command = [sys.executable, str(REPO / "scripts" / "benchmark.py"), "compile", "--model-dir",
               str(tiny_cache / "tiny-llama"), "--dtypes", "float32", "--steps", "3", "--warmup-steps", "1", "--rows",
               "48", "--max-length", "128"]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=900, env={**os.environ, **OFFLINE_ENV})
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [line for line in result.stdout.splitlines() if line.startswith("| float32 |")]
    assert [row.split("|")[2].strip() for row in rows] == ["grouped", "packed"]
    for row in rows:
        graphs = int(row.split("|")[8].split()[0])
        assert 1 <= graphs <= 3  # counted per setting, not per step


def test_null_compiles_where_it_was_measured_to_win(monkeypatch):
    """model.compile=null: on a CPU with AMX in bfloat16 for runs of AUTO_COMPILE_MIN_STEPS steps or more, with a
    compiler; an explicit value is kept; off on a GPU (not measured), in float32 and without AMX."""
    from train.app import models

    steps = models.AUTO_COMPILE_MIN_STEPS
    assert models.resolve_compile(True, "float32", 1) == (True, "set")
    assert models.resolve_compile(False, "bfloat16", 10**6) == (False, "set")
    monkeypatch.setattr(models, "compiler_problem", lambda: None)
    monkeypatch.setattr(models, "cpu_has_amx", lambda: False)
    assert models.resolve_compile(None, "bfloat16", 10**6) == (
        False,
        "bfloat16 on a CPU without AMX: 1.02-1.04x measured, left to model.compile=true",
    )
    monkeypatch.setattr(models, "cpu_has_amx", lambda: True)
    assert models.resolve_compile(None, "bfloat16", steps)[0] is True
    assert models.resolve_compile(None, "bfloat16", steps - 1) == (
        False,
        f"{steps - 1} steps, fewer than the {steps} that earn back the compilation",
    )
    assert models.resolve_compile(None, "float32", 10**6)[0] is False
    monkeypatch.setattr(models, "compiler_problem", lambda: "no compiler")
    assert models.resolve_compile(None, "bfloat16", 10**6) == (
        False,
        "no C++ compiler for torch.compile's CPU kernels (g++, or $CXX)",
    )
    monkeypatch.setattr(models.torch.cuda, "is_available", lambda: True)
    assert models.resolve_compile(None, "bfloat16", 10**6)[0] is False
