"""The real CLI end to end, in a subprocess, on the 2-layer tiny model: full fine-tuning, LoRA, errors."""

import json
import shutil
import socket
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import DEMO_EVAL, DEMO_TRAIN, REPO, read_metrics, run_cli

pytestmark = pytest.mark.slow

COMMON = [
    "loss=sft",
    "model=tiny",
    f"datasets=[{DEMO_TRAIN}]",
    f"eval_datasets=[{DEMO_EVAL}]",
    "lr=3e-3",
    "warmup_ratio=0.1",
]


def final_eval_loss_by_the_models_own_loss(final_dir) -> float:
    """Reload FINAL/ with plain transformers and compute the eval loss with the model's own loss (one batch)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from train.app.config import DataConfig
    from train.batching.collate import collate
    from train.data.preprocess import load_examples

    model = AutoModelForCausalLM.from_pretrained(final_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(final_dir)
    examples, _ = load_examples([DEMO_EVAL], tokenizer, DataConfig(), max_length=128)
    with torch.no_grad():
        return model(**collate(examples, tokenizer.pad_token_id)).loss.item()


@pytest.fixture(scope="module")
def full_run(tiny_cache):
    result = run_cli(
        [*COMMON, f"cache_dir={tiny_cache}", "exp_name=full", "n_epochs=3", "log_every_steps=5", "eval_every_steps=15",
         "profile_steps=3"]
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return tiny_cache / "full"


def test_full_fine_tune_lowers_the_loss(full_run):
    metrics = read_metrics(full_run)
    evals = [m["loss/eval"] for m in metrics if "loss/eval" in m]
    trains = [m["loss/train"] for m in metrics if "loss/train" in m]
    assert metrics[0]["step"] == 0 and len(evals) == 4  # before training, every 15 steps, and at the end
    assert evals[-1] < 0.6 * evals[0]
    assert trains[-1] < 0.6 * trains[0]
    assert {"step", "loss/train", "lr", "grad_norm", "tokens_per_second"} <= set(metrics[-1])
    assert metrics[-1]["step"] == 45  # 123 examples // 8 = 15 steps per epoch, 3 epochs


def test_summary_matches_the_metrics(full_run):
    summary = json.loads((full_run / "summary.json").read_text())
    last = read_metrics(full_run)[-1]
    for key in ("step", "loss/train", "loss/eval", "examples", "tokens"):
        assert summary[key] == last[key], key
    train = dict(summary["data"]["train"])
    audit = train.pop("mask_audit")  # the label mask audit, through the real CLI
    assert train.pop("formats") == {DEMO_TRAIN: {"instruction": 88, "messages": 35}}  # each file's detected format
    assert audit["turns_ending_supervised"] == audit["assistant_turns"] == 140
    assert audit["supervised"]["user"] == audit["supervised"]["template"] == 0
    assert audit["supervised"]["assistant"] == audit["tokens"]["assistant"] > 0
    assert train == {
        "rows": 123,
        "examples": 123,
        "truncated": 0,
        "dropped_no_supervised_token": 0,
        "dropped_too_long": 0,
        "skipped_bad_rows": 0,
    }
    assert summary["final_dir"] == str((full_run / "FINAL").resolve())
    assert summary["wall_seconds"] >= summary["train_seconds"] > 0
    assert summary["tokens_per_second"] == pytest.approx(summary["tokens"] / summary["train_seconds"])
    # MFU against a robustly measured peak (recorded with its source) stays a fraction, on every logged step
    assert summary["peak_flops_source"].startswith("measured") and summary["peak_flops_per_second"] > 1e9
    assert all(0 < row["mfu"] <= 1 for row in read_metrics(full_run) if "mfu" in row)


def test_profiled_steps_are_broken_down_by_phase(full_run):
    """profile_steps=3: steps 2-4 timed by phase; the phases and "other" add up to the step, and the trace holds the
    phases' ranges around the operators."""
    from train.loop.profile import PHASES

    profile = json.loads((full_run / "summary.json").read_text())["profile"]
    assert set(profile) == {*PHASES, "other", "step"}
    assert all(profile[name] >= 0 for name in PHASES) and profile["forward"] > 0 and profile["backward"] > 0
    assert profile["step"] < 10 * max(profile["forward"], profile["backward"])
    text = (full_run / "profile.md").read_text()
    assert text.startswith("# Profile of steps 2-4") and "| backward |" in text and "aten::mm" in text
    # each profiled step's row: its forward passes, its phases and "other" adding up to the whole step
    rows = [line.split("|")[1:-1] for line in text.split("## Each profiled step")[1].splitlines()[4:7]]
    assert [int(row[0]) for row in rows] == [2, 3, 4] and all(int(row[1]) >= 1 for row in rows)
    assert all(sum(map(float, row[2:-1])) == pytest.approx(float(row[-1]), abs=0.01) for row in rows)
    trace = json.loads((full_run / "profile_trace.json").read_text())
    names = {event.get("name") for event in trace["traceEvents"]}
    assert {"halyard/forward", "halyard/loss", "halyard/backward", "halyard/optimizer"} <= names


def test_the_log_says_why_the_layers_are_not_compiled(full_run):
    """model.compile=null decides at start-up and says why: a float32 run on a CPU stays eager."""
    assert "model.compile=null: off (float32 on a CPU: smaller gains" in (full_run / "launch.log").read_text()
    assert "compiled_graphs" not in json.loads((full_run / "summary.json").read_text())


def test_the_log_says_freed_host_memory_is_kept(full_run):
    """keep_freed_host_memory (default true) applies to a CPU run, before its model loads."""
    log = (full_run / "launch.log").read_text()
    applied = "keep_freed_host_memory: freed memory stays in the process for the next step"
    assert applied in log or "keep_freed_host_memory: not applied (not glibc" in log
    assert log.index("keep_freed_host_memory") < log.index("model.compile=null")


def test_run_dir_holds_config_metrics_and_a_loadable_final(full_run):
    assert (full_run / "config.yaml").read_text() == (full_run / "FINAL" / "halyard_config.yaml").read_text()
    assert "exp_name: full" in (full_run / "config.yaml").read_text()
    final = full_run / "FINAL"
    assert {"config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja"} <= {
        p.name for p in final.iterdir()
    }
    assert not (full_run / "FINAL.partial").exists()


def test_final_has_a_model_card_with_the_runs_settings_and_metrics(full_run):
    import yaml

    card = (full_run / "FINAL" / "README.md").read_text()
    _, front, body = card.split("---\n", 2)
    assert yaml.safe_load(front) == {"library_name": "transformers", "tags": ["halyard", "sft"]}  # local base, data
    summary = json.loads((full_run / "summary.json").read_text())
    assert f"| loss/eval | {summary['loss/eval']:.4f} |" in body and "| step | 45 |" in body
    assert "- **Method:** `loss=sft`, full fine-tuning" in body and "| lr | 0.003 |" in body


def test_final_reproduces_the_trained_models_eval_loss(full_run):
    logged = [m["loss/eval"] for m in read_metrics(full_run) if "loss/eval" in m][-1]
    assert final_eval_loss_by_the_models_own_loss(full_run / "FINAL") == pytest.approx(logged, rel=1e-5)


def test_parameters_changed(full_run, tiny_cache):
    before = load_file(tiny_cache / "tiny-llama" / "model.safetensors")
    after = load_file(full_run / "FINAL" / "model.safetensors")
    assert before.keys() == after.keys()
    assert all(not torch.equal(before[k], after[k]) for k in before if "norm" not in k)


def test_lora_writes_merged_model_and_adapter(tiny_cache):
    result = run_cli(
        [
            *COMMON,
            f"cache_dir={tiny_cache}",
            "exp_name=lora",
            "++model.use_peft=true",
            "save_merged=both",
            "model.peft.lora_r=8",
            "lr=1e-2",
            "n_epochs=2",
            "log_every_steps=5",
        ]
    )
    assert result.returncode == 0, result.stderr[-3000:]
    for noise in ("is_gradient_checkpointing", "Loading weights", "Writing model shards", "Warning"):
        assert noise not in result.stderr  # library noise stays out (verbose=true lets it through)
    run = tiny_cache / "lora"
    evals = [m["loss/eval"] for m in read_metrics(run) if "loss/eval" in m]
    assert evals[-1] < 0.93 * evals[0]  # a random-init base with LoRA only learns slowly
    adapter = json.loads((run / "FINAL" / "adapter" / "adapter_config.json").read_text())
    assert adapter["r"] == 8
    # The merged FINAL/ is a plain model (no LoRA weights) that reproduces the adapted model's eval loss.
    merged = load_file(run / "FINAL" / "model.safetensors")
    assert not any("lora" in key for key in merged)
    assert final_eval_loss_by_the_models_own_loss(run / "FINAL") == pytest.approx(evals[-1], rel=1e-5)
    base = load_file(tiny_cache / "tiny-llama" / "model.safetensors")
    assert torch.equal(base["model.embed_tokens.weight"], merged["model.embed_tokens.weight"])  # not adapted
    assert not torch.equal(
        base["model.layers.0.self_attn.q_proj.weight"], merged["model.layers.0.self_attn.q_proj.weight"]
    )


SPLITS = {  # name: (accelerate config, gradient accumulation steps, extra args); the global batch is always 8
    "1proc_accum1": (None, 1, ["data.group_by_length=false"]),  # one data loader worker (the default)
    "1proc_accum4": (None, 4, ["data.num_workers=0", "data.group_by_length=false"]),  # collated in-process
    "2proc_accum2": ("cpu_2proc.yaml", 2, ["data.num_workers=2", "data.group_by_length=false"]),
    "2proc_fsdp_accum2": ("fsdp_cpu_2proc.yaml", 2, ["data.group_by_length=false"]),
    "2proc_fsdp_offload_accum2": ("fsdp_offload_cpu_2proc.yaml", 2, ["data.group_by_length=false"]),
    "1proc_accum1_sequence": (None, 1, ["loss.reduction=sequence", "data.group_by_length=false"]),
    "2proc_fsdp_accum2_sequence": ("fsdp_cpu_2proc.yaml", 2, ["loss.reduction=sequence", "data.group_by_length=false"]),
    "1proc_accum1_grouped": (None, 1, []),  # grouped by length: the default
    "2proc_accum2_grouped": ("cpu_2proc.yaml", 2, []),
    # passes of at most 90 tokens: 16 extra passes in 15 steps, into as many passes on both processes (FSDP2 all-gathers
    # in every forward, so unequal counts would hang)
    "2proc_fsdp_budget90": ("fsdp_cpu_2proc.yaml", 2, ["data.group_by_length=false", "model.micro_batch_tokens=90"]),
}


def accelerate_launcher(config_name: str) -> list[str]:
    """`accelerate launch` with a config, on a free port: back-to-back runs on one fixed port can collide."""
    config = REPO / "accelerate_config" / config_name
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config)]
    return launch + (["--main_process_port", str(port)] if "proc" in config_name else [])


@pytest.fixture(scope="module")
def split_runs(tiny_cache):
    """The same 6 steps with the global batch split several ways (the demo data has uneven example lengths)."""
    runs = {}
    logs = {}
    for name, (accelerate_config, accumulation, extra) in SPLITS.items():
        launcher = accelerate_launcher(accelerate_config) if accelerate_config else None
        args = [
            *COMMON[:3],
            f"cache_dir={tiny_cache}",
            f"exp_name={name}",
            "lr=1e-2",
            "max_steps=6",
            "log_every_steps=1",
        ]
        result = run_cli([*args, f"model.gradient_accumulation_steps={accumulation}", *extra], launcher=launcher)
        assert result.returncode == 0, result.stderr[-3000:]
        runs[name] = tiny_cache / name
        logs[name] = result.stderr
    offloaded = "parameters and optimizer state offloaded to CPU memory"
    assert offloaded in logs["2proc_fsdp_offload_accum2"] and offloaded not in logs["2proc_fsdp_accum2"]
    assert "forward passes of at most 90 tokens" in logs["2proc_fsdp_budget90"]
    return runs


def summary_of(run) -> dict:
    return json.loads((run / "summary.json").read_text())


def test_processes_and_sharding_are_real(split_runs):
    assert summary_of(split_runs["1proc_accum1"])["parallelism"] == "single"
    ddp = summary_of(split_runs["2proc_accum2"])
    assert (ddp["num_processes"], ddp["parallelism"], ddp["local_parameter_fraction"]) == (2, "ddp", 1.0)
    fsdp = summary_of(split_runs["2proc_fsdp_accum2"])
    assert (fsdp["num_processes"], fsdp["parallelism"]) == (2, "fsdp2")
    assert 0.45 < fsdp["local_parameter_fraction"] < 0.55  # each process holds about half of every parameter
    offloaded = summary_of(split_runs["2proc_fsdp_offload_accum2"])
    assert (
        offloaded["parallelism"] == "fsdp2"
        and offloaded["local_parameter_fraction"] == fsdp["local_parameter_fraction"]
    )


@pytest.mark.parametrize(
    ("reference", "split"),
    [
        ("1proc_accum1", "1proc_accum4"),
        ("1proc_accum1", "2proc_accum2"),
        ("1proc_accum1", "2proc_fsdp_accum2"),
        ("2proc_fsdp_accum2", "2proc_fsdp_offload_accum2"),  # offload changes where the shards live, not the math
        ("1proc_accum1_sequence", "2proc_fsdp_accum2_sequence"),
        ("1proc_accum1_grouped", "2proc_accum2_grouped"),
        ("1proc_accum1", "2proc_fsdp_budget90"),
    ],
)
def test_batch_split_does_not_change_the_math(split_runs, tiny_cache, reference, split):
    """Same logged losses and the same FINAL parameters as one process without accumulation."""
    losses = [[m["loss/train"] for m in read_metrics(split_runs[name])] for name in (reference, split)]
    assert len(losses[0]) == 6
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)
    base = load_file(tiny_cache / "tiny-llama" / "model.safetensors")
    one, two = (load_file(split_runs[name] / "FINAL" / "model.safetensors") for name in (reference, split))
    assert one.keys() == two.keys()
    for key in one:
        # Relative to how far training moved the weights: summation order differs, so not bit-equal.
        assert (one[key] - two[key]).norm() <= 1e-5 * (one[key] - base[key]).norm(), key


def test_group_by_length_cuts_padding(split_runs):
    plain, grouped = (read_metrics(split_runs[name]) for name in ("1proc_accum1", "1proc_accum1_grouped"))
    padding = [sum(m["padding_fraction"] for m in rows) / len(rows) for rows in (plain, grouped)]
    assert padding[1] < 0.5 * padding[0]


def test_sequence_reduction_changes_the_loss(split_runs):
    token, sequence = (
        read_metrics(split_runs[name])[0]["loss/train"] for name in ("1proc_accum1", "1proc_accum1_sequence")
    )
    assert token != pytest.approx(sequence, rel=1e-4)


def test_lora_under_fsdp_saves_a_correct_merged_model(tiny_cache):
    args = [*COMMON, f"cache_dir={tiny_cache}", "exp_name=fsdp_lora", "++model.use_peft=true", "max_steps=4", "lr=1e-2"]
    args.append("save_merged=merged")
    result = run_cli(args, launcher=accelerate_launcher("fsdp_cpu_2proc.yaml"))
    assert result.returncode == 0, result.stderr[-3000:]
    run = tiny_cache / "fsdp_lora"
    assert summary_of(run)["parallelism"] == "fsdp2"
    assert not (run / "FINAL" / "adapter").exists()  # save_merged=merged: the merged model only
    logged = [m["loss/eval"] for m in read_metrics(run) if "loss/eval" in m][-1]
    assert final_eval_loss_by_the_models_own_loss(run / "FINAL") == pytest.approx(logged, rel=1e-5)


def test_accelerate_launch_runs_the_same_job(tiny_cache):
    launcher = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(REPO / "accelerate_config" / "cpu_single_process.yaml"),
    ]
    result = run_cli(
        [*COMMON, f"cache_dir={tiny_cache}", "exp_name=accel", "max_steps=3", "log_every_steps=1"], launcher=launcher
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert [m["step"] for m in read_metrics(tiny_cache / "accel")] == [0, 1, 2, 3]
    shutil.rmtree(tiny_cache / "accel")


def test_bad_data_row_exits_2_naming_the_row(tiny_cache, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "q", "output": "a"}\n{"instruction": "q", "response": "a"}\n')
    result = run_cli(["model=tiny", f"cache_dir={tiny_cache}", "exp_name=bad", f"datasets=[{bad}]"])
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert (
        f"{bad} line 2: field 'output' is missing (found keys: instruction, response); set data.response_key"
        in result.stderr
    )


def test_missing_model_folder_is_a_clear_error(tmp_path):
    result = run_cli(["model=tiny", f"cache_dir={tmp_path}", f"datasets=[{DEMO_TRAIN}]"])
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "tiny-llama" in result.stderr


def test_trackers_bfloat16_and_gradient_checkpointing(tiny_cache):
    """TensorBoard and offline wandb get the logged metrics; bf16 autocast with checkpointing and attention in
    float32 trains and generates."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    args = [*COMMON, f"cache_dir={tiny_cache}", "exp_name=trackers", "max_steps=4", "log_every_steps=2"]
    flags = [
        "tensorboard.enabled=true",
        "wandb.enabled=true",
        "wandb.mode=offline",
        "model.gradient_checkpointing=true",
    ]
    flags += ["model.dtype=bfloat16", "eval_samples=2", "eval_samples_max_new_tokens=8", "eval_every_steps=2"]
    flags += ["model.attention_float32=true"]  # through checkpointing and generation (its cache) too
    flags += ["optimizer.name=adafactor", "lr_scheduler=warmup_stable_decay", "warmup_steps=1", "lr_decay_ratio=0.5"]
    result = run_cli(args + flags)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "optimizer adafactor, lr 0.003, warmup_stable_decay schedule, 1 warmup step(s)" in result.stderr
    assert "model.attention_float32: on: sdpa computes in float32 (set)" in result.stderr
    run = tiny_cache / "trackers"
    logged = [m for m in read_metrics(run) if "loss/train" in m]
    # 4 steps: warmup to step 1, held at step 2, then the last 2 steps decay to 0 (lr is logged after each step).
    assert [m["lr"] for m in logged] == pytest.approx([3e-3, 0.0])
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    scalars = events.Scalars("loss/train")
    assert [s.step for s in scalars] == [m["step"] for m in logged] == [2, 4]
    assert [s.value for s in scalars] == pytest.approx([m["loss/train"] for m in logged], rel=1e-6)
    assert list((run / "wandb").glob("offline-run-*/run-*.wandb"))
    tables = sorted((run / "wandb").glob("offline-run-*/files/media/table/samples_*.table.json"))
    assert len(tables) == 3  # steps 0, 2 and 4
    assert json.loads(tables[0].read_text())["columns"] == ["step", "prompt", "completion", "reference"]
    samples = [json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines()]
    assert [s["step"] for s in samples] == [0, 0, 2, 2, 4, 4]
    assert samples[0]["prompt"].endswith("<|im_start|>assistant\n") and "France" in samples[0]["prompt"]
    assert samples[0]["reference"] == "Arr, the capital of France be Paris, matey!"
    assert all(m["loss/train"] < 7 for m in logged)  # finite, near ln(vocab) at the start


def test_model_paths_are_checked_with_the_config_and_leave_no_run_directory(tmp_path):
    """A hub id with no hub and HF_HUB_OFFLINE unset, a tokenizer folder that does not exist and a config typo:
    reported together, in seconds, before a run directory is made."""
    import os
    import subprocess
    import time

    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    env |= {"HF_ENDPOINT": "http://127.0.0.1:9", "PYTHONPATH": str(REPO)}
    args = [
        f"cache_dir={tmp_path}", "exp_name=never", f"datasets=[{DEMO_TRAIN}]", "model=tiny", "lr_typo=1",
        "++model.name_or_path=halyard-tests/no-such-model", f"++model.tokenizer_name_or_path={tmp_path / 'typo'}",
    ]  # fmt: skip
    started = time.perf_counter()
    result = subprocess.run(
        [sys.executable, str(REPO / "launch.py"), *args], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert time.perf_counter() - started < 40  # imports included; a hub download would retry for ~a minute
    assert "invalid configuration (3 problems)" in result.stderr
    assert "model.name_or_path=halyard-tests/no-such-model: no folder of that name here, and the hub" in result.stderr
    assert f"model.tokenizer_name_or_path={tmp_path / 'typo'}: no such folder" in result.stderr
    assert not (tmp_path / "never").exists()


def test_empty_data_files_exit_2_naming_them_before_anything_loads(tiny_cache, tmp_path):
    """Refused with the config's other problems, so no run directory is made (a file of blank lines is refused
    when it is read: tests/data/test_preprocess.py)."""
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    args = [f"cache_dir={tiny_cache}", "exp_name=empty_data", f"datasets=[{empty}]", f"eval_datasets=[{empty}]"]
    result = run_cli([*args, "model=tiny"])
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert f"datasets: '{empty}' is empty (0 bytes)" in result.stderr
    assert f"eval_datasets: '{empty}' is empty (0 bytes)" in result.stderr  # every problem at once
    assert not (tiny_cache / "empty_data").exists()


def python_without_hydra() -> list[str]:
    """A Python that cannot import hydra, as `python` outside the venv is: the system `python3` (PATH without the
    venv), or, where that has hydra too, this interpreter without its site-packages (`-S`)."""
    import os
    import shutil
    import subprocess
    from pathlib import Path

    venv_bin = str(Path(sys.executable).parent)
    path = os.pathsep.join(d for d in os.environ.get("PATH", "").split(os.pathsep) if d and d != venv_bin)
    system = shutil.which("python3", path=path)
    for candidate in ([system] if system else []) + [[sys.executable, "-S"]]:
        command = candidate if isinstance(candidate, list) else [candidate]
        if subprocess.run([*command, "-c", "import hydra"], capture_output=True).returncode != 0:
            return command
    pytest.fail("no interpreter without hydra to test with")


def test_a_python_without_the_dependencies_says_which_to_use(tmp_path):
    """The "Adding a loss" command as printed (`python /path/to/halyard/launch.py ...`), with a Python outside the
    venv: one line naming the interpreter to use, exit 2, no ModuleNotFoundError traceback."""
    import os
    import subprocess

    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    args = ["loss=margin_hinge", "loss.beta=0.5", f"hydra.searchpath=[file://{tmp_path}]", "model=smollm2"]
    command = [*python_without_hydra(), str(REPO / "launch.py"), *args, f"datasets=[{DEMO_TRAIN}]"]
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr and "ModuleNotFoundError" not in result.stderr
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("halyard: this Python (") and "has no 'hydra'" in line
    assert ".venv/bin/python (after bash scripts/install.sh), or `source .venv/bin/activate`" in line
