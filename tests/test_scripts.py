"""The helper scripts: plots of runs, chatting with checkpoints, the demo data."""

import json
import subprocess
import sys

import matplotlib.image
import pytest

from conftest import DEMO_EVAL, DEMO_TRAIN, REPO, run_cli

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def lora_run(tiny_cache):
    args = ["model=tiny", f"cache_dir={tiny_cache}", "exp_name=scripts_lora", f"datasets=[{DEMO_TRAIN}]"]
    args += [
        f"eval_datasets=[{DEMO_EVAL}]",
        "++model.use_peft=true",
        "lr=1e-2",
        "max_steps=6",
        "save_every_steps=3",
        "log_every_steps=1",
    ]
    result = run_cli(args)
    assert result.returncode == 0, result.stderr[-2000:]
    return tiny_cache / "scripts_lora"


def script(name: str, *args) -> str:
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts" / name), *map(str, args)], capture_output=True, text=True, cwd=REPO
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout.strip()


def test_plot_metrics_writes_a_png_with_four_panels(lora_run, tiny_cache, tmp_path):
    import plot_metrics

    out = tmp_path / "curves.png"
    titles = plot_metrics.plot([lora_run, lora_run], out)
    assert titles == ["loss", "learning rate", "gradient norm", "throughput (tokens/s)"]
    image = matplotlib.image.imread(out)
    assert image.shape[0] >= 600 and image.shape[1] >= 900
    assert image.std() > 0.05  # not blank
    assert script("plot_metrics.py", lora_run, "--out", tmp_path / "cli.png") == str(tmp_path / "cli.png")


def test_plot_metrics_names_a_folder_without_metrics(tmp_path):
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "plot_metrics.py"), str(tmp_path), "--out", "x.png"],
        capture_output=True,
        text=True,
    )
    assert result.returncode != 0 and "no metrics.jsonl here" in result.stderr


def test_generate_answers_from_final_adapter_and_step_checkpoint(lora_run):
    prompt = "What is the capital of France?"
    merged = script("generate.py", lora_run / "FINAL", "--prompt", prompt, "--max-new-tokens", "8")
    adapter = script("generate.py", lora_run / "FINAL" / "adapter", "--prompt", prompt, "--max-new-tokens", "8")
    assert merged == adapter  # the merged model and base + adapter are the same function
    assert script("generate.py", lora_run / "step-3", "--prompt", prompt, "--max-new-tokens", "8") is not None


def test_demo_data_is_what_the_generator_writes(tmp_path):
    script("make_demo_data.py", "--out", tmp_path)
    for name in ("train.jsonl", "eval.jsonl", "heldout_prompt.txt"):
        assert (tmp_path / name).read_text() == (REPO / "data" / "demo" / name).read_text(), name
    train = [json.loads(line) for line in (tmp_path / "train.jsonl").read_text().splitlines()]
    assert not any("France" in json.dumps(row) for row in train)  # the held-out prompt is really held out
