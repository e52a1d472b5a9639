"""The helper scripts: plots of runs, chatting with checkpoints, the demo data."""

import itertools
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import pytest
import yaml

from conftest import DEMO_EVAL, DEMO_TRAIN, OFFLINE_ENV, REPO, read_metrics, run_cli

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


def run_script(name: str, *args) -> subprocess.CompletedProcess:
    """`python scripts/NAME ARGS` from the repository root, as a user types it; never raises."""
    return subprocess.run(
        [sys.executable, str(REPO / "scripts" / name), *map(str, args)], capture_output=True, text=True, cwd=REPO
    )


def script(name: str, *args) -> str:
    result = run_script(name, *args)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout.strip()


def library_noise(stderr: str) -> list[str]:
    """The progress bars and warnings of transformers, datasets and peft found in `stderr`."""
    marks = ("Loading weights", "Writing model shards", "Generating train split", "it/s]", "Warning", "LOAD REPORT")
    return [mark for mark in marks if mark in stderr]


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


def test_plot_metrics_draws_what_a_preference_loss_logs(tmp_path):
    """A DPO run's rewards, accuracy, margin and log-probs (train solid, eval dashed) get panels of their own after
    the four every run has; KTO's KL estimate too. The metrics are written by hand, as the trainer names them."""
    import plot_metrics

    def split(name, step, value):
        return {f"rewards_{name}/{metric}": value for metric in ("chosen", "rejected", "accuracies", "margins")} | {
            f"logps_{name}/chosen": -value,
            f"logps_{name}/rejected": -2 * value,
        }

    rows = [{"step": 0, "loss/eval": 0.69, **split("eval", 0, 0.0)}]
    rows += [{"step": s, "loss/train": 0.6, "lr": 1e-6, "grad_norm": 1.0, **split("train", s, s / 10)} for s in (1, 2)]
    rows += [{"step": 2, "loss/eval": 0.5, **split("eval", 2, 0.3)}, {"step": 2, "kl_train": 0.1}]
    run = tmp_path / "dpo"
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    titles = plot_metrics.plot([run], tmp_path / "dpo.png")
    assert titles == [
        "loss",
        "learning rate",
        "gradient norm",
        "throughput (tokens/s)",
        "rewards (chosen / rejected)",
        "rewards accuracies",
        "rewards margins",
        "logps (chosen / rejected)",
        "kl",
    ]
    assert plot_metrics.loss_panels(rows)[1] == (
        "rewards accuracies",
        ("rewards_train/accuracies", "rewards_eval/accuracies"),
    )
    assert matplotlib.image.imread(tmp_path / "dpo.png").shape[1] >= 1500  # three columns


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


@pytest.mark.parametrize(
    "options, message",
    [
        (["--temperature", "-1"], "argument --temperature: -1 is invalid: must be >= 0 (0: greedy)"),
        (["--top-p", "0"], "argument --top-p: 0 is invalid: must be in (0, 1]"),
        (["--top-p", "1.5"], "argument --top-p: 1.5 is invalid: must be in (0, 1]"),
        (["--top-k", "-1"], "argument --top-k: -1 is invalid: must be >= 0 (0: no cut)"),
        (["--repetition-penalty", "0"], "argument --repetition-penalty: 0 is invalid: must be > 0 (1: none)"),
        (["--temperature", "0", "--top-p", "0.9"], "--temperature 0 decodes greedily, which ignores --top-p"),
    ],
)
def test_generate_rejects_invalid_sampling_values(options, message, tmp_path):
    result = run_script("generate.py", tmp_path, "--prompt", "Hi", *options)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"generate.py: error: {message}" in result.stderr


def test_generate_sampling_options_imply_sampling(lora_run):
    """--top-p or --top-k alone samples (at temperature 1); --top-k 1 keeps only the likeliest token, so it is greedy;
    a repetition penalty changes the greedy answer of a model that repeats itself. generate.py's own parser and
    sampling, on one loaded model (its command line runs in the tests above and in the README's)."""
    import generate
    from transformers import set_seed

    parser, final = generate.build_parser(), lora_run / "FINAL"
    model, tokenizer = generate.load(final)
    messages = [{"role": "user", "content": "What is the capital of France?"}]

    def answer_with(*options: str) -> str:
        args = parser.parse_args([str(final), "--max-new-tokens", "24", *options])
        set_seed(args.seed)  # as generate.py seeds each run
        return generate.reply(model.eval(), tokenizer, messages, generate.sampling_from(args, parser))

    greedy = answer_with()
    assert answer_with("--top-p", "0.95") != greedy
    assert answer_with("--top-k", "1") == greedy
    assert answer_with("--repetition-penalty", "5") != greedy
    assert "--top-k" in parser.format_help() and "--repetition-penalty" in parser.format_help()


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
    for name in ("train.jsonl", "eval.jsonl", "heldout_prompts.txt", "benchmark/pirate_style.jsonl"):
        assert (tmp_path / name).read_text() == (REPO / "data" / "demo" / name).read_text(), name


def test_the_demo_benchmark_task_reads_its_data_from_beside_its_yaml_wherever_it_is(tmp_path, monkeypatch):
    """The demo's lm-eval task (data/demo/benchmark/pirate_style.yaml), copied to another folder and indexed from
    another working directory, offline: its 40 questions load, each choosing between the same answer in the pirate's
    voice and a plain one, `label` pointing at the pirate's; no training question is asked."""
    from lm_eval.tasks import TaskManager

    shutil.copytree(REPO / "data" / "demo" / "benchmark", tmp_path / "elsewhere")
    monkeypatch.chdir(tmp_path)
    task = TaskManager(include_path=str(tmp_path / "elsewhere"), include_defaults=False).load_task_or_group(
        ["pirate_style"]
    )["pirate_style"]
    docs = list(task.test_docs())
    assert len(docs) == 40 and task.OUTPUT_TYPE == "multiple_choice"
    for doc in docs:
        pirate, plain = doc["choices"][doc["label"]], doc["choices"][1 - doc["label"]]
        answer = pirate.removeprefix("Arr, ").removesuffix(", matey!")
        assert pirate == f"Arr, {answer}, matey!" and plain == f"Well, {answer}, my friend."
    training = (REPO / "data" / "demo" / "train.jsonl").read_text()
    assert not [doc["question"] for doc in docs if doc["question"] in training]


def test_the_demo_benchmark_choices_have_equal_token_length_for_the_demo_model():
    """Summed log-likelihood accuracy is biased by the choices' length: for the demo model's tokenizer both voices of
    every answer have the same number of tokens (as lm-eval tokenizes a choice: after a space)."""
    import prepare_smollm2
    from transformers import AutoTokenizer

    folder = prepare_smollm2.DEFAULT_OUT
    if not (folder / "tokenizer.json").exists():
        pytest.skip(f"the demo model is not converted here ({folder}): python scripts/prepare_smollm2.py")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    rows = [json.loads(line) for line in (REPO / "data/demo/benchmark/pirate_style.jsonl").read_text().splitlines()]
    lengths = [[len(tokenizer(" " + choice)["input_ids"]) for choice in row["choices"]] for row in rows]
    assert [row for row, (a, b) in zip(rows, lengths, strict=True) if a != b] == []


def test_the_held_out_prompts_are_asked_in_no_training_form():
    """The quickstart's held-out prompts (two or more) share no training question's opening words (its form:
    "What is the capital of", "What color is", ...), so an answer in the pirate voice shows the style carried over,
    not a template copied."""
    prompts = (REPO / "data" / "demo" / "heldout_prompts.txt").read_text().splitlines()
    rows = [json.loads(line) for line in (REPO / "data" / "demo" / "train.jsonl").read_text().splitlines()]
    questions = [row["instruction"] for row in rows if "instruction" in row]
    questions += [m["content"] for row in rows for m in row.get("messages", []) if m["role"] == "user"]
    forms = {" ".join(question.split()[:2]) for question in questions}
    assert len(prompts) >= 2 and forms == {"What is", "What color", "What sound"}
    assert [prompt for prompt in prompts if " ".join(prompt.split()[:2]) in forms] == []


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


def test_push_to_hub_dry_run_warns_when_the_card_names_no_hub_base_model(lora_run):
    """The tiny model is a local folder that names no hub model: the card can have no base_model, and the dry run
    says so; with --base-model it does not."""
    result = run_script("push_to_hub.py", lora_run, "me/tiny-pirate", "--dry-run")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "warning: the model card names no base_model on the Hub" in result.stderr and "--base-model" in result.stderr
    named = run_script("push_to_hub.py", lora_run, "me/tiny-pirate", "--dry-run", "--base-model", "org/base")
    assert named.returncode == 0 and "warning" not in named.stderr


def test_the_card_of_a_run_lists_its_loss_settings(lora_run):
    assert "| loss.reduction | token |" in (lora_run / "FINAL" / "README.md").read_text()


def test_merged_model_has_a_card_naming_the_hub_model_of_a_marked_base(lora_run, tiny_cache, tmp_path):
    """prepare_smollm2.py marks the converted folder with its hub id (also one converted before the marker existed);
    merge_lora.py writes a card that names it, the adapter and the run's tags; push_to_hub --dry-run then has a base."""
    base = tmp_path / "SmolLM2-135M-Instruct"
    shutil.copytree(tiny_cache / "tiny-llama", base)  # stands in for a converted folder: prepare_smollm2 keeps it
    assert script("prepare_smollm2.py", "--out", base).splitlines()[-1] == str(base)
    assert (base / "halyard_hub_id.txt").read_text().strip() == "HuggingFaceTB/SmolLM2-135M-Instruct"
    merged = tmp_path / "merged"
    result = run_script("merge_lora.py", base, lora_run / "FINAL" / "adapter", merged)
    assert result.returncode == 0, result.stderr[-2000:]
    assert library_noise(result.stderr) == []  # no loading or writing bars, no known warnings
    card = (merged / "README.md").read_text()
    _, front, body = card.split("---\n", 2)
    assert yaml.safe_load(front) == {
        "base_model": "HuggingFaceTB/SmolLM2-135M-Instruct",
        "library_name": "transformers",
        "tags": ["halyard", "sft", "lora", "merged"],
    }
    assert (
        f"(trained from the local copy `{base}`)" in body
        and f"- **Adapter:** `{lora_run / 'FINAL' / 'adapter'}`" in body
    )
    pushed = run_script("push_to_hub.py", merged, "me/merged", "--dry-run")
    assert pushed.returncode == 0 and "warning" not in pushed.stderr
    assert "base_model: HuggingFaceTB/SmolLM2-135M-Instruct" in pushed.stdout


def test_score_and_preview_keep_library_output_out_unless_verbose(tiny_cache, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = tmp_path / "rm"  # a sequence classifier with one output, as a loss=rm run writes
    tokenizer = AutoTokenizer.from_pretrained(tiny_cache / "tiny-llama")
    classifier = AutoModelForSequenceClassification.from_pretrained(tiny_cache / "tiny-llama", num_labels=1)
    classifier.config.pad_token_id = tokenizer.eos_token_id
    classifier.save_pretrained(model)
    tokenizer.save_pretrained(model)
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"prompt": "Hi?", "completion": "Arr, hello!"}) + "\n")
    scored = run_script("score.py", model, rows, tmp_path / "scored.jsonl")
    assert scored.returncode == 0 and library_noise(scored.stderr) == [], scored.stderr[-2000:]
    verbose = run_script("score.py", model, rows, tmp_path / "scored.jsonl", "--verbose")
    assert verbose.returncode == 0 and "Loading weights" in verbose.stderr

    table = tmp_path / "train.csv"  # a CSV goes through datasets' CSV builder, which draws a bar
    table.write_text('instruction,output\nWhat color is the sky?,"Arr, blue, matey!"\n')
    args = ["model=tiny", f"cache_dir={tiny_cache}", f"datasets=[{table}]", "--n", "1"]
    preview = run_script("preview_data.py", *args)
    assert preview.returncode == 0 and library_noise(preview.stderr) == [], preview.stderr[-2000:]


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


def test_clean_with_nothing_to_remove_says_only_that(tmp_path):
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "metrics.jsonl").write_text("{}\n")
    result = run_script("clean.py", "--cache-dir", tmp_path, "--checkpoints", "--dry-run")
    assert result.returncode == 0 and result.stdout == f"nothing to remove: no step-N/ checkpoints in {tmp_path}\n"


def test_clean_checkpoints_of_one_run(tmp_path):
    import clean

    for run in ("a", "b"):
        (tmp_path / run / "step-2").mkdir(parents=True)
        (tmp_path / run / "config.yaml").write_text("x: 1\n")
    assert clean.main(["--cache-dir", str(tmp_path), "--checkpoints", "a"]) == 0
    assert (
        not (tmp_path / "a" / "step-2").exists() and (tmp_path / "a").exists() and (tmp_path / "b" / "step-2").exists()
    )


def test_evaluate_compares_a_run_with_its_base_as_lm_eval_scores_them(lora_run, tmp_path):
    """scripts/evaluate.py RUN: the run's FINAL/ (after) against the base model its config names (before) on the demo
    benchmark task, one table and --json; the values are those of the `lm_eval` command run on each folder."""
    task = ["--tasks", "pirate_style", "--include-path", REPO / "data" / "demo" / "benchmark", "--limit", "12"]
    out = script("evaluate.py", lora_run, *task, "--json", tmp_path / "table.json")
    record = json.loads((tmp_path / "table.json").read_text())
    base = yaml.safe_load((lora_run / "config.yaml").read_text())["model"]["name_or_path"]
    assert record["compare"] == base and record["examples"] == {"pirate_style": 12}
    [row] = record["rows"]
    assert row["difference"] == pytest.approx(row["after"] - row["before"])
    assert out.splitlines()[1:] == [
        f"before: {base}",
        f"after:  {lora_run}",
        "task          metric  before  after   difference  stderr",
        f"pirate_style  acc     {row['before']:.4f}  {row['after']:.4f}  {row['difference']:+.4f}     {row['stderr']:.4f}",
    ]
    for folder, value in ((lora_run / "FINAL", row["after"]), (base, row["before"])):
        harness = subprocess.run(
            [str(Path(sys.executable).parent / "lm_eval"), "--model", "hf", "--model_args", f"pretrained={folder}",
             "--include_path", str(REPO / "data" / "demo" / "benchmark"), "--tasks", "pirate_style", "--limit", "12",
             "--output_path", str(tmp_path / "harness")],
            capture_output=True, text=True, cwd=tmp_path, env={**os.environ, **OFFLINE_ENV},
        )  # fmt: skip
        assert harness.returncode == 0, harness.stderr[-2000:]
        [results] = sorted((tmp_path / "harness").rglob("results_*.json"), key=os.path.getmtime)[-1:]
        assert json.loads(results.read_text())["results"]["pirate_style"]["acc,none"] == value


def test_evaluate_loads_an_adapter_on_its_base_and_refuses_what_it_cannot_run(lora_run, tmp_path):
    """An adapter folder evaluates as the merged model it equals; an unknown task, a folder that is no model and a bad
    option are refused with exit code 2 before any model loads."""
    task = ["--tasks", "pirate_style", "--include-path", REPO / "data" / "demo" / "benchmark", "--limit", "12"]
    merged = script("evaluate.py", lora_run / "FINAL", "--no-compare", *task)
    adapter = script("evaluate.py", lora_run / "FINAL" / "adapter", "--no-compare", *task)
    assert merged.splitlines()[-1] == adapter.splitlines()[-1] and merged.splitlines()[-1].startswith("pirate_style")
    unknown = run_script("evaluate.py", lora_run, "--tasks", "pirate_stlye", "--include-path", task[3])
    assert unknown.returncode == 2 and "Traceback" not in unknown.stderr
    assert "unknown task 'pirate_stlye' (did you mean pirate_style?)" in unknown.stderr
    nothing = run_script("evaluate.py", tmp_path, *task)
    assert (
        nothing.returncode == 2
        and "not a run directory (with config.yaml and FINAL/), a model folder" in nothing.stderr
    )
    assert "smollm2" in nothing.stderr  # the presets are listed
    bad = run_script("evaluate.py", lora_run, *task[:-1], "0")
    assert bad.returncode == 2 and "argument --limit: 0 is invalid: must be > 0" in bad.stderr


def test_every_benchmark_subcommand_parses_and_runs_a_function_of_scripts_bench():
    """scripts/benchmark.py is the command line of scripts/bench/: each subcommand parses with its defaults and names
    a function of the package, and each runner has its subcommand."""
    import importlib

    import benchmark

    parser = benchmark.build_parser()
    [subcommands] = [action.choices for action in parser._actions if action.dest == "what"]
    assert sorted(subcommands) == sorted(benchmark.RUNNERS)
    for subcommand, (module, function) in benchmark.RUNNERS.items():
        assert parser.parse_args([subcommand]).what == subcommand
        assert callable(getattr(importlib.import_module(f"scripts.bench.{module}"), function)), subcommand


@pytest.mark.slow
def test_the_bare_loop_replays_a_halyard_run_s_exact_passes(tiny_cache, tmp_path):
    """scripts/bench/replay.py rebuilds a run's forward passes with Halyard's own plan and collation (here passes of
    at most 150 tokens, so steps hold several): step by step they hold the supervised tokens the run logged, and the
    peer runs' program (scripts/bench/child.py, its own process) trains the bare loop on them."""
    from scripts.bench.replay import halyard_passes, save_passes, supervised_tokens
    from scripts.bench.runs import run_child

    overrides = ["loss=sft", "model=tiny", f"datasets=[{DEMO_TRAIN}]", f"cache_dir={tiny_cache}", "exp_name=replayed",
                 "max_steps=3", "log_every_steps=1", "model.micro_batch_tokens=150"]  # fmt: skip
    assert run_cli(overrides).returncode == 0
    logged = [row["supervised_tokens"] for row in read_metrics(tiny_cache / "replayed") if "loss/train" in row]
    steps = halyard_passes(overrides, 3)
    assert max(map(len, steps)) > 1  # the budget split some micro-batch
    assert list(itertools.accumulate(map(supervised_tokens, steps))) == logged
    save_passes(steps, tmp_path / "passes.safetensors")
    settings = {"model": str(tiny_cache / "tiny-llama"), "dtype": "float32", "lr": 1e-5, "steps": 3, "warmup_steps": 1,
                "passes": "passes.safetensors", "phases": True}  # fmt: skip
    result = run_child("bare", tmp_path, settings)
    assert result["per_step"] == [supervised_tokens(step) for step in steps] and len(result["losses"]) == 2
    assert result["step_seconds"] > 0 and result["rate"] > 0 and result["peak_mb"] > 0
    assert set(result["phases"]) == {"forward", "backward", "optimizer"}


def test_a_run_s_warm_up_is_its_steps_or_its_whole_first_epoch():
    """The benchmarks time a run after its warm-up: a number of steps, or with --same-examples (None) the whole first
    epoch, read from the epoch progress the run logs (3 steps per epoch: 1/3, 2/3, 1, 4/3, ...)."""
    from scripts.bench.runs import warmup_of

    rows = [{"epoch": epoch} for epoch in (1 / 3, 2 / 3, 1.0, 1 + 1 / 3, 1 + 2 / 3, 2.0)]
    assert warmup_of(rows, None) == 3
    assert warmup_of(rows, 1) == 1


def test_a_repeated_run_shows_its_median_repeat_and_the_range():
    """--repeats: each run's row is its repeat with the median rate (the lower middle one of an even count), its
    cell the range of all repeats."""
    from scripts.bench.sft import median_repeat, rate_text

    repeats = [{"rate": 120.0, "step_seconds": 4.0}, {"rate": 100.4, "step_seconds": 5.0}, {"rate": 131.0}]
    assert median_repeat(repeats) == {"rate": 120.0, "step_seconds": 4.0, "rates": [120.0, 100.4, 131.0]}
    assert median_repeat(repeats[:2])["rate"] == 100.4
    assert rate_text(median_repeat(repeats)) == "120 (100-131)"
    assert rate_text(median_repeat(repeats[:1])) == "120"


def test_the_matmul_table_times_a_linear_layers_three_products_per_shape():
    """cpu-options' matmul table: per layer shape, the forward, input-gradient and weight-gradient products (the
    shapes a training step multiplies), float32 beside bfloat16."""
    from types import SimpleNamespace

    import torch

    from scripts.bench.cpu import MATMUL_DIRECTIONS, matmul_table

    x, w, g = torch.ones(5, 3), torch.ones(4, 3), torch.ones(5, 4)  # 5 positions, 3 features in, 4 out
    shapes = [tuple(product(x, w, g).shape) for product in MATMUL_DIRECTIONS.values()]
    assert shapes == [(5, 4), (5, 3), (4, 3)]  # y, dx, dW
    rows = matmul_table(SimpleNamespace(hidden_size=8, intermediate_size=16, vocab_size=32), tokens=4, repeats=1)
    assert len(rows) == 2 + 4 * 3 and rows[-1].startswith("| head | 8 x 32 | weight gradient |")


def test_the_attention_table_times_one_layers_attention_and_its_gradients_per_shape():
    """cpu-options' attention table: one layer's causal attention with grouped-query heads, forward and the
    gradients of query, key and value, per (rows, tokens) shape, float32 beside bfloat16."""
    from types import SimpleNamespace

    import torch

    from scripts.bench.cpu import attention_pass, attention_table

    query = torch.randn(2, 4, 3, 2, requires_grad=True)  # 2 rows, 4 heads, 3 tokens, head dim 2
    key, value = (torch.randn(2, 2, 3, 2, requires_grad=True) for _ in range(2))  # 2 key/value heads
    assert [g.shape for g in attention_pass(query, key, value)] == [query.shape, key.shape, value.shape]
    config = SimpleNamespace(num_attention_heads=4, num_key_value_heads=2, hidden_size=8)
    rows = attention_table(config, {"padded": (2, 3), "packed": (1, 5)}, repeats=1)
    assert len(rows) == 2 + 2 and rows[-1].startswith("| packed | 1 x 5 |")


def test_the_sft_benchmark_times_every_run_on_the_same_examples_in_repeats(tiny_cache):
    """scripts/benchmark.py sft --same-examples --repeats 2 through the real CLI (the tiny model in SmolLM2's place):
    Halyard's default and the bare loop on its passes time the very same examples (equal supervised tokens per
    step), and each row shows the range of its two repeats."""
    result = run_script("benchmark.py", "sft", "--smollm2", tiny_cache / "tiny-llama", "--steps", "1",
                        "--same-examples", "--repeats", "2", "--runs", "default", "bare-default")  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [line.split(" | ") for line in result.stdout.splitlines() if line.startswith(("| Halyard", "| bare"))]
    assert len(rows) == 2 and "each run 2 epochs of these examples" in result.stdout
    rates, tokens_per_step = [row[1] for row in rows], {row[4] for row in rows}
    assert all(re.fullmatch(r"[\d,]+ \([\d,]+-[\d,]+\)", rate) for rate in rates), rates
    assert len(tokens_per_step) == 1, rows
