"""The helper scripts: plots of runs, chatting with checkpoints, the demo data."""

import json
import os
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
        "save_merged=both",
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
    assert script("plot_metrics.py", lora_run) == str(lora_run / "metrics.png")  # the default: beside the metrics


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
    assert merged  # a non-empty answer
    assert merged == adapter  # the merged model and base + adapter are the same function
    assert script("generate.py", lora_run / "step-3", "--prompt", prompt, "--max-new-tokens", "8") is not None


def test_generate_chats_over_turns_batches_and_samples(lora_run, tmp_path):
    """One process each: a 3-turn chat with a reset (the model loaded once), a batch file, sampling settings."""
    final, prompt = lora_run / "FINAL", "What is the capital of France?"
    chat = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "generate.py"), str(final), "--max-new-tokens", "8", "--system", "Be brief."],
        input=f"{prompt}\nAnd of Spain?\n/reset\n{prompt}\n", capture_output=True, text=True, cwd=REPO,
    )  # fmt: skip
    assert chat.returncode == 0, chat.stderr[-2000:]
    assert (
        chat.stdout.count("you> ") == 5
        and chat.stdout.count("assistant> ") == 3
        and "(conversation reset)" in chat.stdout
    )
    rows = tmp_path / "prompts.jsonl"
    rows.write_text(
        json.dumps({"prompt": prompt}) + "\n" + json.dumps({"messages": [{"role": "user", "content": prompt}]}) + "\n"
    )
    script("generate.py", final, "--batch", rows, "--out", tmp_path / "out.jsonl", "--max-new-tokens", "8")
    answered = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    greedy = answered[0]["completion"]
    assert greedy and answered[1]["completion"] == greedy  # the same conversation, greedy by default
    sampled = script(
        "generate.py", final, "--prompt", prompt, "--max-new-tokens", "8", "--temperature", "1.5", "--top-p", "0.95"
    )
    assert sampled != greedy  # a random-init model: sampling at T=1.5 all but surely leaves the greedy path


def test_chat_keeps_the_conversation_and_the_system_prompt():
    import io

    import generate

    seen = []

    def fake_reply(model, tokenizer, messages, sampling, stream=False):
        seen.append([m["content"] for m in messages])
        return f"answer {len(seen)}"

    generate.reply, original = fake_reply, generate.reply
    try:
        generate.chat(None, None, "sys", generate.Sampling(), lines=io.StringIO("a\nb\n/reset\nc\n"))
    finally:
        generate.reply = original
    assert seen == [["sys", "a"], ["sys", "a", "answer 1", "b"], ["sys", "c"]]


def test_demo_data_is_what_the_generator_writes(tmp_path):
    script("make_demo_data.py", "--out", tmp_path)
    for name in ("train.jsonl", "eval.jsonl", "heldout_prompt.txt"):
        assert (tmp_path / name).read_text() == (REPO / "data" / "demo" / name).read_text(), name
    train = [json.loads(line) for line in (tmp_path / "train.jsonl").read_text().splitlines()]
    assert not any("France" in json.dumps(row) for row in train)  # the held-out prompt is really held out


def test_push_to_hub_dry_run_lists_the_files_and_the_card(lora_run):
    out = script("push_to_hub.py", lora_run, "me/tiny-pirate", "--dry-run", "--base-model", "org/base")
    assert "would upload" in out and "me/tiny-pirate" in out
    for name in ("model.safetensors", "adapter/adapter_model.safetensors", "tokenizer.json", "README.md"):
        assert f"  {name}  " in out, name
    card = out.split("model card (README.md):\n", 1)[1]
    assert (
        card.startswith("---\nbase_model: org/base\nlibrary_name: transformers\n")
        and "# Fine-tuned with Halyard" in card
    )


def test_push_to_hub_offline_is_a_clear_error(lora_run):
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "push_to_hub.py"), str(lora_run), "me/tiny-pirate"],
        capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_TOKEN": "hf_fake"},
    )  # fmt: skip
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "could not upload to me/tiny-pirate" in result.stderr and "HF_HUB_OFFLINE" in result.stderr


def test_clean_lists_sizes_removes_checkpoints_runs_and_the_demo_model(tmp_path, monkeypatch):
    import clean

    runs, home = tmp_path / "runs", tmp_path / "home"
    for run in ("a", "b"):
        (runs / run / "FINAL").mkdir(parents=True)
        (runs / run / "config.yaml").write_text("x: 1\n")
        (runs / run / "FINAL" / "model.safetensors").write_bytes(b"0" * 2048)
        (runs / run / "step-5").mkdir()
        (runs / run / "step-5" / "optimizer-rank0.safetensors").write_bytes(b"0" * 4096)
    (runs / "preprocessed").mkdir()
    (home / "models").mkdir(parents=True)
    (home / "models" / "weights").write_bytes(b"0" * 1024)
    monkeypatch.setenv("HALYARD_HOME", str(home))
    common = ["--cache-dir", str(runs)]
    assert clean.main([*common, "--all-runs", "--caches", "--demo-model", "--dry-run"]) == 0
    assert (runs / "a").exists() and home.exists()  # a dry run removes nothing
    assert clean.main([*common, "--checkpoints"]) == 0
    assert not (runs / "a" / "step-5").exists() and (runs / "a" / "FINAL" / "model.safetensors").exists()
    assert clean.main([*common, "a", "--demo-model"]) == 0
    assert not (runs / "a").exists() and (runs / "b").exists() and not home.exists()


def test_clean_dry_run_output(tmp_path, capsys):
    import clean

    (tmp_path / "r" / "step-1").mkdir(parents=True)
    (tmp_path / "r" / "metrics.jsonl").write_text("{}\n")
    (tmp_path / "r" / "step-1" / "w").write_bytes(b"0" * 3000)
    clean.main(["--cache-dir", str(tmp_path), "r", "--dry-run"])
    assert f"would remove 1 folder(s), 2.9 KB:\n     2.9 KB  {tmp_path / 'r'}\n" == capsys.readouterr().out


def test_clean_checkpoints_of_one_run(tmp_path):
    import clean

    for run in ("a", "b"):
        (tmp_path / run / "step-2").mkdir(parents=True)
        (tmp_path / run / "config.yaml").write_text("x: 1\n")
    assert clean.main(["--cache-dir", str(tmp_path), "--checkpoints", "a"]) == 0
    assert (
        not (tmp_path / "a" / "step-2").exists() and (tmp_path / "a").exists() and (tmp_path / "b" / "step-2").exists()
    )
