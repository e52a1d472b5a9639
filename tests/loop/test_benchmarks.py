"""train/loop/benchmarks.py: lm-evaluation-harness on a live model. The harness's own numbers are the reference:
a live model gives what the harness gives on the same weights loaded from disk (in-process, and through the `lm_eval`
command on a run's FINAL/), and problems with tasks are found from their YAML alone. The end-to-end runs check the
loop's side: benchmarks at their steps and on the final model, equal to a standalone evaluation of the step's
checkpoint, the same with one process and with two (FSDP2), in metrics.jsonl, summary.json, the console and the card.

The local task (tests/bench_helpers.py) has brier_score, a continuous metric: equal values there mean equal
log-likelihoods, not accuracies that agree by chance."""

from __future__ import annotations

import json
import os
import random
import subprocess

import numpy as np
import pytest
import torch
from bench_helpers import TASK, write_task

from conftest import DEMO_EVAL, DEMO_TRAIN, OFFLINE_ENV, REPO, read_metrics, run_cli
from train.loop.benchmarks import (
    HARNESS_VERSION,
    BenchmarkSettings,
    evaluate_tasks,
    flatten_results,
    run_benchmarks,
    task_problems,
)


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    return write_task(tmp_path_factory.mktemp("bench_task"))


@pytest.fixture(scope="module")
def tiny(tiny_cache):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = tiny_cache / "tiny-llama"
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32), AutoTokenizer.from_pretrained(folder)


def settings(task_dir, **changes) -> BenchmarkSettings:
    values = dict(tasks=(TASK,), include_path=str(task_dir), num_fewshot=None, limit=None, batch_size=8, seed=0)
    return BenchmarkSettings(**{**values, **changes})


def test_the_harness_version_is_the_installed_one():
    import lm_eval

    assert lm_eval.__version__ == HARNESS_VERSION


def test_results_are_named_by_task_metric_and_filter():
    results = {
        "results": {
            "arc": {"alias": "arc", "acc,none": 0.5, "acc_stderr,none": 0.1, "acc_norm,none": 0.75},
            "gsm": {"exact_match,strict-match": 0.25, "exact_match_stderr,strict-match": "N/A"},
        }
    }
    assert flatten_results(results) == {
        "bench/arc/acc": 0.5,
        "bench/arc/acc_stderr": 0.1,
        "bench/arc/acc_norm": 0.75,
        "bench/gsm/exact_match_strict-match": 0.25,
    }


def test_a_live_model_scores_what_the_harness_scores_on_it_loaded_from_disk(tiny, task_dir, tiny_cache):
    """The reference: the harness's own HF model loaded from the folder by name, as `lm_eval --model hf` does."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    model, tokenizer = tiny
    model.train()  # as the loop leaves it: the evaluation runs in eval mode and gives the mode back
    got = run_benchmarks(model, tokenizer, settings(task_dir))
    assert model.training
    reference = simple_evaluate(
        model="hf",
        model_args={"pretrained": str(tiny_cache / "tiny-llama"), "device": "cpu", "dtype": "float32"},
        tasks=[TASK],
        batch_size=8,
        task_manager=TaskManager(include_path=str(task_dir), include_defaults=False),
        log_samples=False,
        random_seed=0,
        numpy_random_seed=0,
        torch_random_seed=0,
        fewshot_random_seed=0,
    )
    assert got == flatten_results(reference)
    names = ("acc", "acc_stderr", "acc_norm", "acc_norm_stderr", "brier_score")  # brier_score has no stderr
    assert set(got) == {f"bench/{TASK}/{m}" for m in names}


def test_limit_fewshot_and_seed_reach_the_harness(tiny, task_dir):
    model, tokenizer = tiny
    results = evaluate_tasks(model, tokenizer, settings(task_dir, limit=8, num_fewshot=2, seed=3))
    assert results.samples == {TASK: 8}
    assert results.num_fewshot == {TASK: 2}
    # 8 items: accuracy is a multiple of 1/8
    assert results.metrics[f"bench/{TASK}/acc"] * 8 == pytest.approx(round(results.metrics[f"bench/{TASK}/acc"] * 8))


def test_the_training_random_state_is_untouched(tiny, task_dir):
    model, tokenizer = tiny
    random.seed(11), np.random.seed(11), torch.manual_seed(11)
    expected = random.random(), np.random.rand(), torch.rand(1).item()
    random.seed(11), np.random.seed(11), torch.manual_seed(11)
    run_benchmarks(model, tokenizer, settings(task_dir, limit=4))
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_lora_is_evaluated_with_its_adapters_active(tiny, task_dir):
    from peft import LoraConfig, get_peft_model

    model, tokenizer = tiny
    base = run_benchmarks(model, tokenizer, settings(task_dir))
    torch.manual_seed(0)
    # init_lora_weights=False: random A and B, so the adapters change the model from the first step
    lora = get_peft_model(
        model, LoraConfig(r=8, lora_alpha=64, target_modules=["q_proj", "v_proj", "up_proj"], init_lora_weights=False)
    )
    try:
        adapted = run_benchmarks(lora, tokenizer, settings(task_dir))
        with lora.disable_adapter():
            disabled = run_benchmarks(lora, tokenizer, settings(task_dir))
    finally:
        lora.unload()  # the module-scoped base model without the LoRA layers again
    assert disabled == base
    assert adapted != base


def test_an_unknown_task_is_named_with_its_fix(task_dir):
    (problem,) = task_problems(settings(task_dir, tasks=("halyard_tiny_mcq",)))
    assert "unknown task 'halyard_tiny_mcq'" in problem
    assert f"did you mean {TASK}" in problem
    assert "benchmarks.include_path" in problem


def test_a_task_that_needs_a_download_offline_is_named_with_its_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    (tmp_path / "remote.yaml").write_text(
        "task: remote_mc\ndataset_path: someone/not_downloaded_dataset\ntest_split: test\n"
        "output_type: multiple_choice\ndoc_to_text: q\ndoc_to_choice: choices\ndoc_to_target: label\n"
    )
    (tmp_path / "missing.yaml").write_text(
        "task: missing_file\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: /no/such/items.jsonl\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: q\ndoc_to_choice: choices\ndoc_to_target: label\n"
    )
    problems = task_problems(settings(tmp_path, tasks=("remote_mc", "missing_file")))
    assert len(problems) == 2
    assert "'remote_mc' needs the dataset 'someone/not_downloaded_dataset'" in problems[0]
    assert "offline" in problems[0]
    assert "'missing_file' reads /no/such/items.jsonl, which does not exist" in problems[1]
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "0")
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    assert len(task_problems(settings(tmp_path, tasks=("remote_mc",)))) == 0  # online: the harness downloads it


def test_a_group_s_tasks_that_share_a_missing_dataset_are_one_problem(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for name in ("part_a", "part_b"):
        (tmp_path / f"{name}.yaml").write_text(
            f"task: {name}\ndataset_path: someone/shared_dataset\ndataset_name: {name}\ntest_split: test\n"
            "output_type: multiple_choice\ndoc_to_text: q\ndoc_to_choice: choices\ndoc_to_target: label\n"
        )
    (tmp_path / "both.yaml").write_text("group: both\ntask: [part_a, part_b]\n")
    (problem,) = task_problems(settings(tmp_path, tasks=("both",)))
    assert problem.startswith("benchmarks.tasks: 'both' (2 of its tasks, e.g. 'part_a') needs the dataset 'someone/")


def test_a_local_task_has_no_problem(task_dir):
    assert task_problems(settings(task_dir)) == []


def test_a_missing_include_path_is_a_problem(tmp_path):
    (problem,) = task_problems(settings(tmp_path / "nowhere"))
    assert "benchmarks.include_path" in problem and "no such folder" in problem


# ---- end to end: the loop (two CLI runs and one `lm_eval` command, shared by the tests below) ----

# Non-default values of every benchmarks.* key and of the seed, so that each is seen to reach the harness: the
# `lm_eval` command below is given the same values and must give the same numbers.
BENCH_RUN = [
    "loss=sft", "model=tiny", f"datasets=[{DEMO_TRAIN}]", f"eval_datasets=[{DEMO_EVAL}]", "max_steps=4", "lr=1e-2",
    "save_every_steps=2", "data.group_by_length=false", "seed=3", f"benchmarks.tasks=[{TASK}]",
    "benchmarks.every_steps=2", "benchmarks.limit_per_task=24", "benchmarks.num_fewshot=1", "benchmarks.batch_size=4",
]  # fmt: skip
SCORES = ("acc", "acc_norm", "brier_score")


@pytest.fixture(scope="module")
def bench_runs(tiny_cache, tmp_path_factory):
    """The same 4 steps in one process and in two (FSDP2, each holding half of every weight: the harder case for
    lock-step evaluation than DDP's replicas); benchmarks before training, at step 2 and on the final model."""
    tasks = write_task(tmp_path_factory.mktemp("bench_run_task"))
    runs = {}
    layouts = {
        "bench_1proc": [],
        "bench_fsdp": ["accelerate_config=accelerate_config/fsdp_cpu_2proc.yaml"],
    }
    for name, layout in layouts.items():
        args = [*BENCH_RUN, f"benchmarks.include_path={tasks}", f"cache_dir={tiny_cache}", f"exp_name={name}", *layout]
        result = run_cli(args, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
        runs[name] = (tiny_cache / name, result.stderr)
    return runs, tasks


def bench_rows(run_dir) -> dict[int, dict[str, float]]:
    return {
        row["step"]: {k: v for k, v in row.items() if k.startswith("bench/")}
        for row in read_metrics(run_dir)
        if any(k.startswith("bench/") for k in row)
    }


@pytest.mark.slow
def test_benchmarks_run_at_their_steps_and_reach_every_output(bench_runs):
    runs, _ = bench_runs
    run, console = runs["bench_1proc"]
    rows = bench_rows(run)
    assert sorted(rows) == [0, 2, 4]  # before training, every_steps=2, the final model
    assert set(rows[4]) == {
        f"bench/{TASK}/{m}" for m in ("acc", "acc_stderr", "acc_norm", "acc_norm_stderr", "brier_score")
    }
    assert rows[4] != rows[0]  # training moved the scores
    summary = json.loads((run / "summary.json").read_text())
    assert {k: summary[k] for k in rows[4]} == rows[4]
    assert summary["benchmarks"] == {
        "harness": f"lm-eval {HARNESS_VERSION}", "num_fewshot": {TASK: 1}, "examples": {TASK: 24}, "limit_per_task": 24,
        "seed": 3, "apply_chat_template": False,
    }  # fmt: skip
    assert summary["benchmarks_before_training"] == rows[0]
    acc, before = rows[4][f"bench/{TASK}/acc"], rows[0][f"bench/{TASK}/acc"]
    assert f"benchmark {TASK} acc {acc:.3f} ± " in console and f"(before training {before:.3f})" in console
    assert f"{TASK} acc {acc:.3g}" in console  # the progress line of the final step
    card = (run / "FINAL" / "README.md").read_text()
    assert "## Evaluation" in card
    stderr = rows[4][f"bench/{TASK}/acc_stderr"]
    assert f"| {TASK} | acc | {acc:.4f} | {stderr:.4f} | 1 | 24 | lm-eval {HARNESS_VERSION} |" in card
    assert f"| {TASK} | brier_score | {rows[4][f'bench/{TASK}/brier_score']:.4f} | - | 1 | 24 |" in card


@pytest.mark.slow
def test_an_evaluation_during_training_equals_one_of_the_step_s_checkpoint(bench_runs):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    runs, tasks = bench_runs
    run = runs["bench_1proc"][0]
    model = AutoModelForCausalLM.from_pretrained(run / "step-2" / "model", dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(run / "step-2" / "model")
    standalone = run_benchmarks(model, tokenizer, BenchmarkSettings((TASK,), str(tasks), 1, 24, 4, seed=3))
    assert standalone == pytest.approx(bench_rows(run)[2], rel=1e-6)


@pytest.mark.slow
def test_the_lm_eval_command_on_final_gives_the_final_numbers(bench_runs, tmp_path):
    runs, tasks = bench_runs
    run = runs["bench_1proc"][0]
    command = [
        str(REPO / ".venv" / "bin" / "lm_eval"), "--model", "hf", "--model_args", f"pretrained={run / 'FINAL'}",
        "--tasks", TASK, "--include_path", str(tasks), "--num_fewshot", "1", "--limit", "24", "--batch_size", "4",
        "--seed", "3", "--device", "cpu", "--output_path", str(tmp_path),
    ]  # fmt: skip
    done = subprocess.run(command, env={**os.environ, **OFFLINE_ENV}, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    (results_file,) = tmp_path.rglob("results_*.json")
    assert flatten_results(json.loads(results_file.read_text())) == pytest.approx(bench_rows(run)[4], rel=1e-6)


@pytest.mark.slow
def test_one_process_and_two_sharded_processes_give_the_same_scores(bench_runs):
    """1-shot prompts too: every process draws the same few-shot examples (the harness's own split would not)."""
    runs, _ = bench_runs
    one, fsdp = (bench_rows(runs[name][0]) for name in ("bench_1proc", "bench_fsdp"))
    summary = json.loads((runs["bench_fsdp"][0] / "summary.json").read_text())
    assert (summary["num_processes"], summary["parallelism"]) == (2, "fsdp2")
    assert sorted(fsdp) == sorted(one)
    for step in one:
        assert fsdp[step] == pytest.approx(one[step], rel=1e-5), step


def test_benchmarks_apply_chat_template_reaches_the_harness(tiny, task_dir, monkeypatch):
    """benchmarks.apply_chat_template=true (a chat model answering as in a chat: the demo's pirate_style task moves
    from 0 to 1 with it on SmolLM2, docs/BENCHMARKS.md) is passed to the harness; off by default, as in lm_eval."""
    import lm_eval

    import launch

    cfg = launch.compose_config(["model=tiny", f"datasets=[{DEMO_TRAIN}]", "benchmarks.apply_chat_template=true"])
    chosen = BenchmarkSettings.from_config(cfg.benchmarks, seed=0)
    assert chosen.apply_chat_template and not settings(task_dir).apply_chat_template
    calls = []

    def recording(**kwargs):
        calls.append(kwargs["apply_chat_template"])
        return {"results": {}, "n-shot": {}, "n-samples": {}}

    monkeypatch.setattr(lm_eval, "simple_evaluate", recording)
    model, tokenizer = tiny
    evaluate_tasks(model, tokenizer, settings(task_dir, apply_chat_template=True))
    evaluate_tasks(model, tokenizer, settings(task_dir))
    assert calls == [True, False]
