"""Preference trainers through the real CLI on the tiny model, and the README's "add a loss" example, executed."""

import json
import math
import re
from pathlib import Path

import pytest
from loss_curves import run_losses_as_sweeps

from conftest import REPO, read_metrics, run_cli
from train.batching.plan import BatchPlan

pytestmark = pytest.mark.slow
PREF = ["model=tiny", "datasets=[data/demo/pref_train.jsonl]", "eval_datasets=[data/demo/pref_eval.jsonl]"]


def evals(run_dir) -> list[dict]:
    return [m for m in read_metrics(run_dir) if "loss/eval" in m]


@pytest.fixture(scope="module")
def dpo_run(tiny_cache):
    result = run_cli(
        [
            *PREF,
            "loss=dpo",
            f"cache_dir={tiny_cache}",
            "exp_name=dpo_run",
            "lr=1e-3",
            "n_epochs=2",
            "eval_every_steps=17",
            "log_every_steps=1",
        ]
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (tiny_cache / "dpo_run" / "stderr.txt").write_text(result.stderr)
    return tiny_cache / "dpo_run"


def test_dpo_counts_pairs_and_names_the_frozen_reference(dpo_run):
    """The units a user thinks in: 8 pairs a step (not 16 rows), the reference named as such."""
    log = (dpo_run / "stderr.txt").read_text()
    assert "of 8 pairs on 1 process(es)" in log and "train: 140 pairs from 140 rows" in log
    assert "frozen reference: 0.2M parameters, none trained" in log and log.count("model: ") == 1
    rows = [row for row in read_metrics(dpo_run) if "loss/train" in row]
    assert [row["pairs"] for row in rows[:2]] == [8, 16] and "examples" not in rows[0]
    summary = json.loads((dpo_run / "summary.json").read_text())
    assert summary["pairs"] == rows[-1]["pairs"] == 8 * summary["step"] and summary["data"]["train"]["pairs"] == 140
    assert f"done: {summary['step']} steps, {summary['pairs']} pairs" in log


def test_dpo_starts_at_ln2_and_learns_the_preference(dpo_run):
    first, last = evals(dpo_run)[0], evals(dpo_run)[-1]
    assert first["step"] == 0 and first["loss/eval"] == pytest.approx(math.log(2), abs=1e-6)
    assert first["rewards_eval/margins"] == pytest.approx(0, abs=1e-6)
    assert read_metrics(dpo_run)[1]["loss/train"] == pytest.approx(math.log(2), abs=1e-6)  # step 1, before its update
    assert last["rewards_eval/accuracies"] > 0.9 and last["loss/eval"] < 0.3
    names = {
        "loss/train",
        "rewards_train/chosen",
        "rewards_train/rejected",
        "rewards_train/accuracies",
        "rewards_train/margins",
        "logps_train/chosen",
        "logps_train/rejected",
    }
    assert names <= set(read_metrics(dpo_run)[-1])


def test_simpo_learns_without_a_reference_model(tiny_cache):
    result = run_cli(
        [
            *PREF,
            "loss=simpo",
            f"cache_dir={tiny_cache}",
            "exp_name=simpo",
            "lr=1e-3",
            "n_epochs=2",
            "eval_every_steps=17",
        ]
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert evals(tiny_cache / "simpo")[-1]["rewards_eval/accuracies"] > 0.9
    assert result.stderr.count("model: ") == 1  # one model loaded: the policy


@pytest.mark.parametrize("loss", ["cdpo", "ipo"])
def test_cdpo_and_ipo_learn(tiny_cache, loss):
    result = run_cli([*PREF, f"loss={loss}", f"cache_dir={tiny_cache}", f"exp_name={loss}", "lr=1e-3", "max_steps=20"])
    assert result.returncode == 0, result.stderr[-3000:]
    first, last = evals(tiny_cache / loss)[0], evals(tiny_cache / loss)[-1]
    assert last["loss/eval"] < first["loss/eval"] and last["rewards_eval/accuracies"] > 0.9


def test_precomputed_reference_matches_the_live_reference_and_is_reused(tiny_cache, dpo_run):
    args = [
        *PREF,
        "loss=dpo",
        f"cache_dir={tiny_cache}",
        "lr=1e-3",
        "n_epochs=2",
        "eval_every_steps=17",
        "log_every_steps=1",
    ]
    first = run_cli([*args, "exp_name=dpo_pre", "reference.precompute=true"])
    assert first.returncode == 0 and "precomputing reference log-probs for 168 pairs" in first.stderr
    again = run_cli([*args, "exp_name=dpo_pre2", "reference.precompute=true"])
    assert again.returncode == 0 and "no reference model is loaded" in again.stderr
    assert again.stderr.count("model: ") == 1
    live = [m["loss/train"] for m in read_metrics(dpo_run) if "loss/train" in m]
    for name in ("dpo_pre", "dpo_pre2"):
        cached = [m["loss/train"] for m in read_metrics(tiny_cache / name) if "loss/train" in m]
        assert cached == pytest.approx(live, rel=1e-4)


def test_lora_dpo_uses_the_base_as_reference(tiny_cache):
    result = run_cli(
        [
            *PREF,
            "loss=dpo",
            f"cache_dir={tiny_cache}",
            "exp_name=dpo_lora",
            "++model.use_peft=true",
            "lr=1e-2",
            "max_steps=10",
        ]
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stderr.count("model: ") == 1  # no second copy
    # By default a LoRA run's FINAL/ is the adapter (megabytes), with a note on how to merge it.
    final = tiny_cache / "dpo_lora" / "FINAL"
    assert (final / "adapter_model.safetensors").exists() and not (final / "model.safetensors").exists()
    assert "FINAL/ holds the LoRA adapter" in result.stderr and "scripts/merge_lora.py" in result.stderr
    assert "library_name: peft" in (final / "README.md").read_text()
    first, last = evals(tiny_cache / "dpo_lora")[0], evals(tiny_cache / "dpo_lora")[-1]
    assert first["loss/eval"] == pytest.approx(math.log(2), abs=1e-6) and last["loss/eval"] < first["loss/eval"]


def test_kto_and_pt_run_and_their_losses_fall(tiny_cache):
    kto = run_cli(
        [
            "model=tiny",
            "loss=kto",
            f"cache_dir={tiny_cache}",
            "exp_name=kto",
            "data.group_by_length=false",  # step 1 is the plan's first 8 examples of a random order
            "datasets=[data/demo/kto_train.jsonl]",
            "lr=1e-3",
            "n_epochs=2",
            "log_every_steps=1",
            "loss.desirable_weight=3",
            "loss.undesirable_weight=0.5",
        ]
    )
    assert kto.returncode == 0, kto.stderr[-3000:]
    rows = read_metrics(tiny_cache / "kto")
    # Step 1 is the anchor: policy == reference, so every reward and the KL estimate are 0 and each example's loss
    # is its weight times (1 - sigmoid(0)) = weight / 2, averaged over the step's 8 examples.
    labels = [json.loads(line)["label"] for line in (REPO / "data/demo/kto_train.jsonl").read_text().splitlines()]
    plan = BatchPlan(n_items=len(labels), batch_size=8, n_processes=1, rank=0, accumulation_steps=1, seed=0)
    step_one = [labels[i] for i in plan.epoch_order(0)[:8]]
    expected = sum(3 if desirable else 0.5 for desirable in step_one) / 2 / 8
    assert rows[0]["loss/train"] == pytest.approx(expected, rel=1e-6) and 0 < sum(step_one) < 8
    assert "kl_train" in rows[-1] and "rewards_train/chosen" in rows[-1]
    assert sum(m["loss/train"] for m in rows[-5:]) < sum(m["loss/train"] for m in rows[:5])
    pt = run_cli(
        [
            "model=tiny",
            "loss=pt",
            f"cache_dir={tiny_cache}",
            "exp_name=pt",
            "datasets=[data/demo/text.jsonl]",
            "model.batch_size=4",
            "lr=3e-3",
            "n_epochs=3",
            "log_every_steps=1",
        ]
    )
    assert pt.returncode == 0, pt.stderr[-3000:]
    losses = [m["loss/train"] for m in read_metrics(tiny_cache / "pt")]
    assert losses[-1] < 0.8 * losses[0]


def test_sft_data_given_to_dpo_is_a_clear_error(tiny_cache):
    result = run_cli(
        ["model=tiny", "loss=dpo", f"cache_dir={tiny_cache}", "exp_name=wrong", "datasets=[data/demo/train.jsonl]"]
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "this loss trains on prompt/chosen/rejected rows, but this file holds conversation rows" in result.stderr


def test_the_readme_add_a_loss_example_runs(tiny_cache, tmp_path):
    """The README's two files, written outside the repository as it says, trained with its command (through
    launch.py in a subprocess started in the folder that holds my_losses.py)."""
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("## Adding a loss") :]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    yaml = re.search(r"```yaml\n(.*?)```", section, re.S).group(1)
    command = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    assert "loss=margin_hinge loss.beta=0.5 hydra.searchpath=[file://$PWD/my_config]" in command
    assert code.startswith("# my_losses.py") and yaml.startswith("# my_config/loss/margin_hinge.yaml")
    (tmp_path / "my_losses.py").write_text(code)
    (tmp_path / "my_config" / "loss").mkdir(parents=True)
    (tmp_path / "my_config" / "loss" / "margin_hinge.yaml").write_text(yaml)
    data = [f"datasets=[{REPO}/data/demo/pref_train.jsonl]", f"eval_datasets=[{REPO}/data/demo/pref_eval.jsonl]"]
    args = [
        "loss=margin_hinge",
        "loss.beta=0.5",
        f"hydra.searchpath=[file://{tmp_path}/my_config]",
        "model=tiny",
        *data,
    ]
    wrong = run_cli([*args, "loss.bta=1", "loss.beta=-1", f"cache_dir={tiny_cache}"], cwd=tmp_path)
    assert wrong.returncode == 2 and "Traceback" not in wrong.stderr, wrong.stderr
    assert "unknown key 'loss.bta' (did you mean 'loss.beta'?)" in wrong.stderr
    assert "loss.beta=-1.0: must be > 0" in wrong.stderr
    result = run_cli(
        [*args, f"cache_dir={tiny_cache}", "exp_name=margin_hinge", "lr=1e-3", "max_steps=20"], cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-3000:]
    run = evals(tiny_cache / "margin_hinge")
    assert run[0]["loss/eval"] == pytest.approx(1.0, abs=1e-6)  # policy == reference: margin 0, hinge 1
    assert run[-1]["loss/eval"] < 0.9 and run[-1]["rewards_eval/accuracies"] > 0.9
    assert json.loads((tiny_cache / "margin_hinge" / "summary.json").read_text())["step"] == 17  # 140 pairs // 8


ADDED_OBJECTIVES = {  # loss: its settings for a 17-step run
    "apo_down": ["lr=1e-3"],
    "apo_zero": ["lr=1e-3"],
    # CPO's reward is the summed log-prob: the longer chosen answers start 2 nats behind, and its NLL term dominates
    # a beta of 0.1, so it needs a stronger preference term to overtake in 17 steps.
    "cpo": ["lr=3e-3", "loss.beta=0.5"],
    "hinge": ["lr=1e-3"],
    "orpo": ["lr=1e-3"],
    "rdpo": ["lr=1e-3"],
    "rpo": ["lr=1e-3"],
}


@pytest.fixture(scope="module")
def added_objective_runs(tiny_cache) -> dict[str, tuple[Path, Path]]:
    """Each added objective's 17-step run and its first 2 steps in 4 accumulated micro-batches. The objectives with
    the same settings train as one sweep of each (one process trains them in turn)."""
    common = [*PREF, "warmup_ratio=0", "log_every_steps=1"]
    common.append("data.group_by_length=false")  # the settings above were tuned on random batches
    learned = run_losses_as_sweeps(
        ADDED_OBJECTIVES, [*common, "max_steps=17", "eval_every_steps=17"], tiny_cache, "learned"
    )
    split = run_losses_as_sweeps(
        ADDED_OBJECTIVES, [*common, "max_steps=2", "model.gradient_accumulation_steps=4"], tiny_cache, "accum4"
    )
    return {loss: (learned[loss], split[loss]) for loss in ADDED_OBJECTIVES}


@pytest.mark.parametrize("loss", sorted(ADDED_OBJECTIVES))
def test_each_objective_learns_is_split_invariant_and_its_final_model_reloads(added_objective_runs, loss):
    """17 steps reach held-out reward accuracy >= 0.9; the first two steps' losses are the same with 4 accumulated
    micro-batches (step 2 carries step 1's update; warmup is off so both runs take the same first step)."""
    from transformers import AutoModelForCausalLM

    learned, split = added_objective_runs[loss]
    assert evals(learned)[-1]["rewards_eval/accuracies"] >= 0.9
    whole = [m["loss/train"] for m in read_metrics(learned) if "loss/train" in m][:2]
    accumulated = [m["loss/train"] for m in read_metrics(split) if "loss/train" in m]
    assert accumulated == pytest.approx(whole, rel=1e-5)
    model = AutoModelForCausalLM.from_pretrained(learned / "FINAL")
    assert model.config.num_hidden_layers == 2


def test_packed_pairs_shared_prompts_and_packed_kto_train_through_the_cli(tiny_cache):
    """data.packing=true with DPO (live reference, then precomputed) and with KTO: isolation verified on the model,
    whole pairs per row, and the preference learned; data.shared_prompt=true. Exactness of the layouts against
    unpacked batches: tests/batching/test_packing.py."""
    common = [*PREF, "loss=dpo", f"cache_dir={tiny_cache}", "data.packing=true", "model.batch_size=2", "lr=1e-3"]
    live = run_cli([*common, "exp_name=dpo-packed", "max_steps=10", "eval_every_steps=10"])
    assert live.returncode == 0, live.stderr[-3000:]
    assert "packing verified" in live.stderr and "into 32 rows of up to 256 tokens" in live.stderr  # 140 pairs
    run = evals(tiny_cache / "dpo-packed")
    assert run[0]["loss/eval"] == pytest.approx(math.log(2), abs=1e-6) and run[-1]["rewards_eval/accuracies"] >= 0.9
    cached = run_cli([*common, "exp_name=dpo-packed-cached", "max_steps=10", "reference.precompute=true"])
    assert cached.returncode == 0, cached.stderr[-3000:]
    live_losses = [m["loss/train"] for m in read_metrics(tiny_cache / "dpo-packed") if "loss/train" in m]
    cached_losses = [m["loss/train"] for m in read_metrics(tiny_cache / "dpo-packed-cached") if "loss/train" in m]
    assert cached_losses == pytest.approx(live_losses, rel=1e-4)
    # The prompt run once per pair (data.shared_prompt=true): the same losses as separate rows, step after step
    args = [*PREF, "loss=dpo", f"cache_dir={tiny_cache}", "lr=1e-3", "max_steps=3", "log_every_steps=1"]
    for name, extra in (("dpo-separate", ["data.shared_prompt=false"]), ("dpo-shared", [])):
        result = run_cli([*args, f"exp_name={name}", *extra])
        assert result.returncode == 0, result.stderr[-3000:]
        assert ("each prompt runs once" in result.stderr) == (name == "dpo-shared")  # the default where it applies
    separate, shared = (
        [m["loss/train"] for m in read_metrics(tiny_cache / name) if "loss/train" in m]
        for name in ("dpo-separate", "dpo-shared")
    )
    assert len(shared) == 3 and shared == pytest.approx(separate, rel=1e-5)
    kto = run_cli(
        ["model=tiny", "loss=kto", f"cache_dir={tiny_cache}", "datasets=[data/demo/kto_train.jsonl]", "lr=1e-3"]
        + ["data.packing=true", "model.batch_size=2", "max_steps=6", "log_every_steps=1", "exp_name=kto-packed"]
    )
    assert kto.returncode == 0, kto.stderr[-3000:]
    assert read_metrics(tiny_cache / "kto-packed")[-1]["kl_train"] > 0
