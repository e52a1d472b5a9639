"""train/loop/benchmarks.py: lm-evaluation-harness on a live model. The harness's own numbers are the reference:
a live model gives what the harness gives on the same weights loaded from disk (here in-process, and through the
`lm_eval` command in tests/test_launch_benchmarks.py), and problems with tasks are found from their YAML alone."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from bench_helpers import TASK, write_task

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
    assert set(got) == {f"bench/{TASK}/{m}" for m in ("acc", "acc_stderr", "acc_norm", "acc_norm_stderr")}


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


def test_a_local_task_has_no_problem(task_dir):
    assert task_problems(settings(task_dir)) == []


def test_a_missing_include_path_is_a_problem(tmp_path):
    (problem,) = task_problems(settings(tmp_path / "nowhere"))
    assert "benchmarks.include_path" in problem and "no such folder" in problem
