"""Checkpoints and exact resume: pure helpers, then the real CLI interrupted by signals, kills and faults."""

import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import DEMO_EVAL, DEMO_TRAIN, REPO, read_metrics, run_cli
from train.loop import checkpoint


def make_checkpoint(run_dir, step: int) -> None:
    (run_dir / f"step-{step}").mkdir(parents=True)
    (run_dir / f"step-{step}" / checkpoint.STATE_FILE).write_text("{}")


def test_find_latest_follows_the_pointer_and_ignores_partials(tmp_path):
    assert checkpoint.find_latest(tmp_path) is None
    make_checkpoint(tmp_path, 5)
    make_checkpoint(tmp_path, 10)
    (tmp_path / "step-15.partial").mkdir()
    assert checkpoint.find_latest(tmp_path).name == "step-10"  # no pointer: the newest complete one
    (tmp_path / "latest").write_text("step-5\n")
    assert checkpoint.find_latest(tmp_path).name == "step-5"
    (tmp_path / "latest").write_text("step-99\n")  # stale pointer
    assert checkpoint.find_latest(tmp_path).name == "step-10"


def test_finish_publishes_and_prunes(tmp_path):
    for step in (2, 4, 6):
        make_checkpoint(tmp_path, step)
    partial = tmp_path / "step-8.partial"
    partial.mkdir()
    (partial / checkpoint.STATE_FILE).write_text("{}")
    checkpoint.finish(partial, tmp_path / "step-8", tmp_path, keep=2)
    assert sorted(p.name for p in tmp_path.glob("step-*")) == ["step-6", "step-8"]
    assert (tmp_path / "latest").read_text().strip() == "step-8"


def test_config_differences_ignore_the_keys_that_may_change():
    saved = "lr: 0.01\nseed: 0\nexp_name: a\nmodel:\n  batch_size: 8\n  gradient_accumulation_steps: 1\n"
    current = {"lr": 0.02, "seed": 0, "exp_name": "b", "model.batch_size": 4, "model.gradient_accumulation_steps": 4}
    may_change = {"exp_name", "model.gradient_accumulation_steps"}
    assert checkpoint.config_differences(saved, current, may_change) == [
        "lr: 0.01 -> 0.02",
        "model.batch_size: 8 -> 4",
    ]
    assert checkpoint.config_differences(saved, {**current, "data.packing": True}, may_change)[0] == (
        "data.packing: (unset) -> True"
    )


def test_rng_states_round_trip(tmp_path):
    checkpoint.save_rng_state(tmp_path, rank=0)
    expected = (random.random(), np.random.rand(), torch.rand(3))
    random.random(), np.random.rand(), torch.rand(3)  # move every generator on
    checkpoint.load_rng_state(tmp_path, rank=0)
    assert (random.random(), np.random.rand()) == expected[:2]
    assert torch.equal(torch.rand(3), expected[2])


def test_optimizer_state_round_trips_without_pickle(tmp_path):
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    checkpoint.save_optimizer(optimizer, tmp_path, rank=0)
    fresh = torch.optim.AdamW(model.parameters(), lr=0.5)
    checkpoint.load_optimizer(fresh, tmp_path, rank=0, sharded=False)
    for before, after in zip(optimizer.state.values(), fresh.state.values(), strict=True):
        assert all(torch.equal(before[k], after[k]) for k in before)
    assert fresh.param_groups[0]["lr"] == 0.1


def logged_steps(path: Path) -> list[int]:
    return [json.loads(line)["step"] for line in path.read_text().splitlines()]


def test_continue_logs_truncates_its_own_run_and_copies_another_without_touching_it(tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir(), second.mkdir()
    (first / checkpoint.METRICS_FILE).write_text("".join(json.dumps({"step": s}) + "\n" for s in range(6)))
    (first / checkpoint.SAMPLES_FILE).write_text("".join(json.dumps({"step": s}) + "\n" for s in (0, 5)))
    before = {p.name: p.read_bytes() for p in first.iterdir()}
    checkpoint.continue_logs(first / "step-3", second, 3)  # resumed into a new folder
    assert {p.name: p.read_bytes() for p in first.iterdir()} == before
    assert logged_steps(second / checkpoint.METRICS_FILE) == [0, 1, 2, 3]
    assert logged_steps(second / checkpoint.SAMPLES_FILE) == [0]
    checkpoint.continue_logs(first / "step-3", first, 3)  # resumed in its own folder
    assert logged_steps(first / checkpoint.METRICS_FILE) == [0, 1, 2, 3]


def test_a_run_never_overwrites_another(tmp_path):
    run_dir = tmp_path / "run"
    checkpoint.refuse_to_overwrite(run_dir, None, None)  # nothing there yet
    run_dir.mkdir()
    (run_dir / ".hydra").mkdir()
    checkpoint.refuse_to_overwrite(run_dir, None, None)  # only Hydra's files of this launch
    make_checkpoint(run_dir, 3)
    (run_dir / checkpoint.METRICS_FILE).write_text("")
    with pytest.raises(checkpoint.HalyardError, match=r"already holds a run \(metrics.jsonl, step-3/\).*"
                       r"continue it from step-3 with resume_from_checkpoint=auto.*overwrite_run=true"):  # fmt: skip
        checkpoint.refuse_to_overwrite(run_dir, None, None)
    other = tmp_path / "other" / "step-2"
    with pytest.raises(checkpoint.HalyardError):  # resuming another run's checkpoint into this one
        checkpoint.refuse_to_overwrite(run_dir, other, str(other))
    checkpoint.refuse_to_overwrite(run_dir, run_dir / "step-3", "auto")
    checkpoint.refuse_to_overwrite(run_dir, run_dir / "step-3", str(run_dir / "step-3"))
    checkpoint.remove_earlier_run(run_dir)
    assert [p.name for p in run_dir.iterdir()] == [".hydra"]


def test_nothing_is_ever_unpickled():
    code = "\n".join(
        p.read_text() for p in [*REPO.glob("train/**/*.py"), *REPO.glob("scripts/*.py"), REPO / "launch.py"]
    )
    assert not re.search(r"\btorch\.load\(|import pickle|pickle\.loads?\(", code)


# ---- end to end ----

BASE = [
    "loss=sft",
    "model=tiny",
    f"datasets=[{DEMO_TRAIN}]",
    f"eval_datasets=[{DEMO_EVAL}]",
    "lr=1e-2",
    "log_every_steps=1",
    "eval_every_steps=100",
]


def run(cache, name, extra=(), faults=None, launcher=None, base=BASE):
    if faults:
        os.environ["HALYARD_FAULTS"] = faults
    try:
        return run_cli([*base, f"cache_dir={cache}", f"exp_name={name}", *extra], launcher=launcher)
    finally:
        os.environ.pop("HALYARD_FAULTS", None)


def assert_same_run(reference, resumed, rel=1e-6, final_file="model.safetensors"):
    ref_metrics, res_metrics = read_metrics(reference), read_metrics(resumed)
    assert [m["step"] for m in res_metrics] == [m["step"] for m in ref_metrics]
    for a, b in zip(ref_metrics, res_metrics, strict=True):
        for key in ("loss/train", "loss/eval", "lr", "grad_norm"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=rel, abs=1e-9), (a["step"], key)
    one, two = load_file(reference / "FINAL" / final_file), load_file(resumed / "FINAL" / final_file)
    for key in one:
        assert torch.allclose(one[key], two[key], rtol=rel, atol=1e-7), key


# Keys a resumed run may change (train/app/config.py: changes_math=False), changed at once: a profiled step, the
# memory check, collation in the training process. (model.micro_batch_tokens may change too, but its passes sum the
# same gradient in another order: weights equal to 1.5e-7, not bit for bit.)
KEEP_THE_MATH = ["profile_steps=1", "memory_check=warn", "data.num_workers=0"]


@pytest.mark.slow
def test_sigterm_kill_during_save_and_resume_match_an_uninterrupted_run(tiny_cache):
    """18 steps in one go vs: SIGTERM after step 7 (mid-epoch), resume, killed while saving step 15 (the epoch
    boundary), resume from step 10 across the boundary to the end, with KEEP_THE_MATH's settings changed."""
    common = ["n_epochs=2", "max_steps=18", "save_every_steps=5", "resume_from_checkpoint=auto"]
    assert run(tiny_cache, "resume_ref", common).returncode == 0
    run_dir = tiny_cache / "resume_cut"

    stopped = run(tiny_cache, "resume_cut", common, faults="sigterm@7")
    assert stopped.returncode == 75, stopped.stderr[-2000:]
    assert "stopped by SIGTERM after step 7" in stopped.stderr and "resume_from_checkpoint=auto" in stopped.stderr
    assert (run_dir / "latest").read_text().strip() == "step-7"

    killed = run(tiny_cache, "resume_cut", common, faults="kill_in_save@15")
    assert killed.returncode == -9
    assert "resumed from" in killed.stderr and "at step 7" in killed.stderr
    assert (run_dir / "step-15.partial").exists()  # the interrupted save...
    assert (run_dir / "latest").read_text().strip() == "step-10"  # ...left the previous checkpoint as latest

    finished = run(tiny_cache, "resume_cut", [*common, *KEEP_THE_MATH])  # resumed with other operational settings
    assert finished.returncode == 0, finished.stderr[-2000:]
    assert "at step 10" in finished.stderr
    assert not (run_dir / "step-15.partial").exists()
    assert_same_run(tiny_cache / "resume_ref", run_dir)
    model_files = {p.name for p in (run_dir / "step-10" / "model").iterdir()}
    assert "model.safetensors" in model_files and (run_dir / "step-10" / "optimizer-rank0.safetensors").exists()


@pytest.mark.slow
def test_lora_resume_with_dropout_is_exact_and_checkpoints_hold_only_the_adapter(tiny_cache):
    """With DoRA, rsLoRA and an added token (embeddings and head grown and trained whole): resume is exact, and
    scripts/merge_lora.py grows the base to the run's tokenizer and merges to what FINAL/ holds."""
    common = [
        "++model.use_peft=true",
        "save_merged=both",
        "model.peft.lora_dropout=0.2",
        "model.peft.use_dora=true",
        "model.peft.use_rslora=true",
        "model.add_special_tokens=['<tool_call>']",
        "max_steps=8",
        "save_every_steps=100",
        "resume_from_checkpoint=auto",
    ]
    assert run(tiny_cache, "lora_ref", common).returncode == 0
    assert run(tiny_cache, "lora_cut", common, faults="sigterm@3").returncode == 75
    saved = {p.name for p in (tiny_cache / "lora_cut" / "step-3" / "model").iterdir()}
    assert "adapter_model.safetensors" in saved and "model.safetensors" not in saved
    assert run(tiny_cache, "lora_cut", common).returncode == 0
    assert_same_run(tiny_cache / "lora_ref", tiny_cache / "lora_cut", final_file="adapter/adapter_model.safetensors")

    merged = tiny_cache / "lora_merged"
    script = [
        sys.executable,
        str(REPO / "scripts" / "merge_lora.py"),
        str(tiny_cache / "tiny-llama"),
        str(tiny_cache / "lora_cut" / "FINAL" / "adapter"),
        str(merged),
    ]
    subprocess.run(script, check=True, capture_output=True)
    ours, theirs = (
        load_file(merged / "model.safetensors"),
        load_file(tiny_cache / "lora_cut" / "FINAL" / "model.safetensors"),
    )
    assert all(torch.allclose(ours[k], theirs[k], atol=1e-6) for k in theirs)
    assert theirs["model.embed_tokens.weight"].shape[0] == 601  # the tiny model's 600 ids and <tool_call>


@pytest.mark.slow
def test_fsdp_resume_from_sharded_checkpoint_is_exact(tiny_cache):
    from test_launch import accelerate_launcher

    launcher = accelerate_launcher("fsdp_cpu_2proc.yaml")
    common = [
        "max_steps=6",
        "save_every_steps=100",
        "resume_from_checkpoint=auto",
        "model.gradient_accumulation_steps=2",
    ]
    reference = run(tiny_cache, "fsdp_ref", common, launcher=launcher)
    assert reference.returncode == 0, reference.stderr[-4000:]
    stopped = run(tiny_cache, "fsdp_cut", common, faults="sigterm@3", launcher=launcher)
    assert stopped.returncode != 0 and (tiny_cache / "fsdp_cut" / "latest").read_text().strip() == "step-3"
    shards = sorted(p.name for p in (tiny_cache / "fsdp_cut" / "step-3").glob("model-rank*.safetensors"))
    assert shards == ["model-rank0.safetensors", "model-rank1.safetensors"]
    assert run(tiny_cache, "fsdp_cut", common, launcher=launcher).returncode == 0
    assert_same_run(tiny_cache / "fsdp_ref", tiny_cache / "fsdp_cut")


@pytest.mark.slow
def test_fsdp_offload_resume_matches_the_run_without_offload(tiny_cache):
    """fsdp_offload_params: true (CPUOffloadPolicy): stopped after step 3 and resumed from its sharded checkpoint,
    the run matches the uninterrupted run without offload (the one above: its folder is reused when there)."""
    from test_launch import accelerate_launcher

    common = [
        "max_steps=6",
        "save_every_steps=100",
        "resume_from_checkpoint=auto",
        "model.gradient_accumulation_steps=2",
    ]
    if not (tiny_cache / "fsdp_ref" / "FINAL").is_dir():
        assert run(tiny_cache, "fsdp_ref", common, launcher=accelerate_launcher("fsdp_cpu_2proc.yaml")).returncode == 0
    launcher = accelerate_launcher("fsdp_offload_cpu_2proc.yaml")
    stopped = run(tiny_cache, "offload_cut", common, faults="sigterm@3", launcher=launcher)
    assert stopped.returncode != 0 and "offloaded to CPU memory" in stopped.stderr
    assert len(list((tiny_cache / "offload_cut" / "step-3").glob("model-rank*.safetensors"))) == 2
    resumed = run(tiny_cache, "offload_cut", common, launcher=launcher)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_run(tiny_cache / "fsdp_ref", tiny_cache / "offload_cut")


@pytest.mark.slow
def test_resume_refuses_a_config_that_changes_the_math(tiny_cache):
    common = ["max_steps=6", "save_every_steps=2"]
    assert run(tiny_cache, "changed", [*common, "max_steps=4"]).returncode == 0
    refused = run(tiny_cache, "changed", [*common, "lr=2e-2", "model.batch_size=4", "resume_from_checkpoint=auto"])
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert "lr: 0.01 -> 0.02" in refused.stderr and "model.batch_size: 8 -> 4" in refused.stderr
    assert "resume_allow_config_change=true" in refused.stderr
    allowed = run(
        tiny_cache, "changed", [*common, "lr=2e-2", "resume_from_checkpoint=auto", "resume_allow_config_change=true"]
    )
    assert allowed.returncode == 0, allowed.stderr[-2000:]


@pytest.mark.slow
def test_nonfinite_loss_stops_or_skips(tiny_cache):
    stopped = run(tiny_cache, "nan_stop", ["max_steps=6", "save_every_steps=2"], faults="nan_loss@3")
    assert stopped.returncode == 2 and "Traceback" not in stopped.stderr
    assert "step 3: the loss (nan)" in stopped.stderr and "step-2) is untouched" in stopped.stderr
    assert (tiny_cache / "nan_stop" / "latest").read_text().strip() == "step-2"
    skipped = run(tiny_cache, "nan_skip", ["max_steps=6", "on_nonfinite=skip"], faults="nan_loss@3")
    assert skipped.returncode == 0, skipped.stderr[-2000:]
    assert json.loads((tiny_cache / "nan_skip" / "summary.json").read_text())["skipped_nonfinite_steps"] == 1
    weights = load_file(tiny_cache / "nan_skip" / "FINAL" / "model.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())


@pytest.mark.slow
def test_disk_full_during_save_keeps_the_previous_checkpoint(tiny_cache):
    result = run(tiny_cache, "enospc", ["max_steps=6", "save_every_steps=2"], faults="enospc_in_save@4")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert (
        "could not write checkpoint step-4 (No space left on device (injected)); the previous checkpoint step-2 is intact"
        in result.stderr
    )
    assert sorted(p.name for p in (tiny_cache / "enospc").glob("step-*")) == ["step-2"]
    assert (tiny_cache / "enospc" / "latest").read_text().strip() == "step-2"


@pytest.mark.slow
def test_save_total_limit_and_second_signal(tiny_cache):
    assert run(tiny_cache, "limit", ["max_steps=9", "save_every_steps=2", "save_total_limit=2"]).returncode == 0
    assert sorted(p.name for p in (tiny_cache / "limit").glob("step-*")) == ["step-6", "step-8"]
    twice = run(tiny_cache, "twice", ["max_steps=6", "save_every_steps=100"], faults="double_sigterm@3")
    assert twice.returncode == 128 + 15
    assert "exiting at once, without a checkpoint" in twice.stderr
    assert not list((tiny_cache / "twice").glob("step-*"))


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_resuming_another_runs_checkpoint_leaves_that_run_untouched(tiny_cache):
    common = ["max_steps=6", "save_every_steps=3"]
    assert run(tiny_cache, "first_run", common).returncode == 0
    first = tiny_cache / "first_run"
    before = folder_bytes(first)
    resumed = run(tiny_cache, "second_run", [*common, f"resume_from_checkpoint={first / 'step-3'}"])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert folder_bytes(first) == before  # byte for byte: steps 4-6 of the first run are still logged
    assert "metrics and samples up to step 3 copied from" in resumed.stderr
    assert_same_run(first, tiny_cache / "second_run")  # whole curves: steps 0-3 copied, 4-6 trained again


@pytest.mark.slow
def test_reusing_a_run_name_is_refused_unless_resuming_or_overwriting(tiny_cache):
    common = ["max_steps=4", "save_every_steps=2"]
    assert run(tiny_cache, "reused", common, faults="sigterm@3").returncode == 75
    run_dir = tiny_cache / "reused"
    before = folder_bytes(run_dir)
    refused = run(tiny_cache, "reused", common)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert "already holds a run" in refused.stderr and "resume_from_checkpoint=auto" in refused.stderr
    after = folder_bytes(run_dir)
    assert {k: v for k, v in after.items() if k != "launch.log"} == {
        k: v for k, v in before.items() if k != "launch.log"
    }
    again = run(tiny_cache, "reused", [*common, "overwrite_run=true", "save_every_steps=100"])
    assert again.returncode == 0, again.stderr[-2000:]
    assert not list(run_dir.glob("step-*")) and not (run_dir / "latest").exists()  # the earlier run is gone, not mixed
    assert logged_steps(run_dir / checkpoint.METRICS_FILE) == [0, 1, 2, 3, 4]


@pytest.mark.slow
def test_final_is_saved_in_the_stored_dtype_or_the_one_asked_for(tiny_cache):
    assert run(tiny_cache, "dtype_auto", ["max_steps=1"]).returncode == 0  # the tiny model is stored in float32
    assert {w.dtype for w in load_file(tiny_cache / "dtype_auto" / "FINAL" / "model.safetensors").values()} == {
        torch.float32
    }
    assert run(tiny_cache, "dtype_bf16", ["max_steps=1", "save_dtype=bfloat16"]).returncode == 0
    final = tiny_cache / "dtype_bf16" / "FINAL"
    assert {w.dtype for w in load_file(final / "model.safetensors").values()} == {torch.bfloat16}
    assert json.loads((final / "config.json").read_text())["dtype"] == "bfloat16"
    assert "| weights saved in (save_dtype) | bfloat16 |" in (final / "README.md").read_text()


def test_save_dtype_auto_reads_the_stored_dtype_from_config_json(tmp_path, tiny_cache):
    from train.app.config import ModelConfig
    from train.app.models import resolve_save_dtype

    folder = tmp_path / "model"
    folder.mkdir()
    config = json.loads((tiny_cache / "tiny-llama" / "config.json").read_text())
    for stored, expected in (("bfloat16", "bfloat16"), ("float16", "float16"), (None, "float32")):
        config.pop("torch_dtype", None)
        config["dtype"] = stored
        (folder / "config.json").write_text(json.dumps(config))
        assert resolve_save_dtype("auto", ModelConfig(name_or_path=str(folder)))[0] == expected
    assert resolve_save_dtype("float16", ModelConfig(name_or_path=str(folder))) == ("float16", "set")


def test_unwritable_run_directory_is_refused_before_training(tmp_path, tiny_cache):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    model = tiny_cache / "tiny-llama"  # a real model: model paths are checked before the run directory
    result = run_cli(
        ["model=tiny", f"datasets=[{DEMO_TRAIN}]", f"cache_dir={blocker}", f"++model.name_or_path={model}"]
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "cannot write the run directory" in result.stderr and "set cache_dir to a writable folder" in result.stderr


@pytest.mark.slow
def test_resumed_run_continues_the_same_wandb_run(tiny_cache):
    common = [
        "max_steps=4",
        "save_every_steps=100",
        "resume_from_checkpoint=auto",
        "wandb.enabled=true",
        "wandb.mode=offline",
    ]
    assert run(tiny_cache, "wandb_resume", common, faults="sigterm@2").returncode == 75
    run_id = checkpoint.read_state(tiny_cache / "wandb_resume" / "step-2").wandb_run_id
    assert run_id
    assert run(tiny_cache, "wandb_resume", common).returncode == 0
    runs = sorted((tiny_cache / "wandb_resume" / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(r.name.endswith(run_id) for r in runs)


@pytest.mark.slow
def test_dpo_resume_is_exact(tiny_cache):
    pref = [
        "loss=dpo",
        "model=tiny",
        "datasets=[data/demo/pref_train.jsonl]",
        "eval_datasets=[data/demo/pref_eval.jsonl]",
    ]
    base = [*pref, "lr=1e-3", "log_every_steps=1", "eval_every_steps=100"]
    common = ["n_epochs=2", "max_steps=22", "save_every_steps=100", "resume_from_checkpoint=auto"]
    assert run(tiny_cache, "dpo_ref", common, base=base).returncode == 0
    assert run(tiny_cache, "dpo_cut", common, faults="sigterm@9", base=base).returncode == 75
    assert run(tiny_cache, "dpo_cut", common, base=base).returncode == 0  # from 9, across the epoch boundary at 17
    assert_same_run(tiny_cache / "dpo_ref", tiny_cache / "dpo_cut")
    assert "rewards_train/accuracies" in read_metrics(tiny_cache / "dpo_cut")[-1]


@pytest.mark.slow
def test_resume_refuses_data_with_one_row_edited_and_accepts_it_unchanged(tiny_cache, tmp_path):
    """The fingerprint comes from the cache key (the bytes of the data files) and the selection, not from the tokens:
    one edited row changes it; the unchanged file is accepted, and packed data too."""
    data = tmp_path / "train.jsonl"
    data.write_text(Path(DEMO_TRAIN).read_text())
    common = ["max_steps=4", "save_every_steps=2", "data.packing=true", "model.batch_size=4", f"datasets=[{data}]"]
    base = [arg for arg in BASE if not arg.startswith("datasets=")]
    assert run(tiny_cache, "edited", common, faults="sigterm@2", base=base).returncode == 75  # saved step 2
    rows = data.read_text().splitlines()
    data.write_text("\n".join([rows[0].replace("sky", "sea"), *rows[1:]]) + "\n")
    refused = run(tiny_cache, "edited", [*common, "resume_from_checkpoint=auto"], base=base)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr[-2000:]
    assert "the tokenized training data differs from the data" in refused.stderr
    data.write_text("\n".join(rows) + "\n")  # restored: the same bytes, a new modification time
    resumed = run(tiny_cache, "edited", [*common, "resume_from_checkpoint=auto"], base=base)
    assert resumed.returncode == 0 and "at step 2" in resumed.stderr, resumed.stderr[-2000:]
