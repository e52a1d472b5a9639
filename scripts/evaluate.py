"""Benchmark a model with lm-evaluation-harness, and compare it with another: what training bought.

    python scripts/evaluate.py MODEL [--compare OTHER | --no-compare] [--tasks T ...] [--include-path DIR]
        [--limit N] [--num-fewshot K] [--batch-size B] [--seed S] [--apply-chat-template]
        [--dtype auto|float32|bfloat16] [--json PATH]

MODEL is one of:
  - a run directory (runs/NAME): its FINAL/, compared by default with the base model it trained from, and evaluated
    with the run's own benchmark settings (benchmarks.* of its config.yaml) and seed unless options say otherwise;
  - a model folder: a run's FINAL/ (compared by default with its base, named in FINAL/halyard_config.yaml), or any
    Hugging Face model folder;
  - a PEFT adapter folder (a LoRA run's FINAL/ or FINAL/adapter/): loaded onto its base, adapters active;
  - a model preset of config/model/ (smollm2, llama, ...), resolved as `launch.py model=NAME` resolves it.
--compare takes the same kinds. The table has one line per task and metric: before (--compare), after (MODEL), the
difference and MODEL's standard error; without a model to compare with, MODEL's value and standard error.

Tasks are the harness's (`.venv/bin/lm_eval ls tasks`) or your own task YAMLs in --include-path, e.g. the demo's:
    python scripts/evaluate.py runs/quickstart --tasks pirate_style --include-path data/demo/benchmark \
        --apply-chat-template
Models are evaluated as `lm_eval --model hf` evaluates a saved model (in the dtype its weights are stored in, unless
--dtype), one after the other; unknown tasks and tasks needing a download while offline are reported before any
model loads (exit code 2). The libraries' progress bars and warnings are kept out unless --verbose.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_BATCH_SIZE = 8


@dataclass(frozen=True)
class Source:
    """A model to evaluate: where its weights are, what it is called in the output, and the base it came from."""

    path: Path  # a model folder or a PEFT adapter folder
    label: str  # what the user gave
    base: str | None  # the model it was trained from, where known (a run, a Halyard FINAL/, an adapter)
    config: dict | None  # the Halyard config it was trained with, where there is one

    @property
    def is_adapter(self) -> bool:
        return (self.path / "adapter_config.json").exists()

    @property
    def weights(self) -> str:
        """The model folder to load: the base of an adapter, else the folder itself."""
        return str(self.base if self.is_adapter else self.path)

    @property
    def tokenizer(self) -> str:
        """An adapter folder's own tokenizer where it has one (the run's: its chat template, its added tokens)."""
        own = not self.is_adapter or (self.path / "tokenizer_config.json").exists()
        return str(self.path) if own else str(self.base)


def positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text} is invalid: must be > 0")
    return value


def preset_names() -> list[str]:
    return sorted(path.stem for path in (REPO / "config" / "model").glob("*.yaml") if path.stem != "base_model")


def preset_path(name: str, cache_dir: str | None) -> str:
    """model.name_or_path of config/model/NAME.yaml, interpolations resolved as `launch.py model=NAME` does."""
    from omegaconf import OmegaConf

    import launch

    overrides = [f"model={name}"] + ([f"cache_dir={cache_dir}"] if cache_dir else [])
    return str(OmegaConf.select(launch.compose_raw(overrides, None, "config"), "model.name_or_path"))


def read_yaml(path: Path) -> dict | None:
    import yaml

    return yaml.safe_load(path.read_text()) if path.exists() else None


def resolve(given: str, cache_dir: str | None) -> Source:
    """What MODEL (or --compare) names; SystemExit(2) with the kinds it can be when it is none of them."""
    from train.loop.run_files import CONFIG_FILE, FINAL_CONFIG_FILE, FINAL_DIR

    path = Path(given).expanduser()
    if path.is_dir() and (path / CONFIG_FILE).exists() and (path / FINAL_DIR).is_dir():  # a run directory
        config = read_yaml(path / CONFIG_FILE)
        return Source(path / FINAL_DIR, given, config["model"]["name_or_path"], config)
    if path.is_dir() and (path / "adapter_config.json").exists():
        config = read_yaml(path / FINAL_CONFIG_FILE)
        base = json.loads((path / "adapter_config.json").read_text()).get("base_model_name_or_path")
        return Source(path, given, base, config)
    if path.is_dir() and (path / "config.json").exists():
        config = read_yaml(path / FINAL_CONFIG_FILE)
        return Source(path, given, config["model"]["name_or_path"] if config else None, config)
    if not path.exists() and given in preset_names():
        return Source(Path(preset_path(given, cache_dir)).expanduser(), given, None, None)
    fail(
        f"{given}: not a run directory (with config.yaml and FINAL/), a model folder (config.json), a PEFT adapter "
        f"folder (adapter_config.json) or a model preset ({', '.join(preset_names())})"
    )


def fail(message: str) -> None:
    print(f"evaluate.py: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def settings_from(args, source: Source):
    """The benchmark settings: the options given, else the run's own (benchmarks.* and seed of its config)."""
    from train.loop.benchmarks import BenchmarkSettings

    own = (source.config or {}).get("benchmarks") or {}

    def pick(option, key: str, default):
        if option is not None:
            return option
        return default if own.get(key) is None else own[key]

    tasks = tuple(args.tasks or own.get("tasks") or ())
    if not tasks:
        fail("no tasks: name them with --tasks (e.g. --tasks pirate_style --include-path data/demo/benchmark)")
    return BenchmarkSettings(
        tasks=tasks,
        include_path=pick(args.include_path, "include_path", None),
        num_fewshot=pick(args.num_fewshot, "num_fewshot", None),
        limit=pick(args.limit, "limit_per_task", None),
        batch_size=pick(args.batch_size, "batch_size", DEFAULT_BATCH_SIZE),
        seed=args.seed if args.seed is not None else (source.config or {}).get("seed", 0),
        apply_chat_template=pick(args.apply_chat_template, "apply_chat_template", False),
    )


def check_paths(*sources: Source) -> None:
    """A model folder whose files are missing is named before anything loads (train/app/model_paths.py)."""
    from train.app.config import ModelConfig
    from train.app.model_paths import model_path_problems

    problems = []
    for source in sources:
        settings = ModelConfig(name_or_path=str(source.path), tokenizer_name_or_path=source.tokenizer)
        if source.is_adapter and not source.base:
            problems.append(f"{source.path}: its adapter_config.json names no base model (base_model_name_or_path)")
        for problem in model_path_problems(settings):
            problems.append(problem.replace("model.name_or_path=", "").replace("model.tokenizer_name_or_path=", ""))
    if problems:
        fail("\n  ".join(problems))


def load(source: Source, dtype: str):
    """(model, tokenizer) in eval mode: a model folder as `lm_eval --model hf` loads it (dtype "auto": the dtype its
    weights are stored in), an adapter folder on its base with the adapters active (and the run's tokenizer)."""
    import torch
    from transformers import AutoModelForCausalLM

    from train.app.config import ModelConfig
    from train.app.models import build_tokenizer

    torch_dtype = "auto" if dtype == "auto" else getattr(torch, dtype)
    model = AutoModelForCausalLM.from_pretrained(source.weights, dtype=torch_dtype)
    tokenizer = build_tokenizer(ModelConfig(name_or_path=source.weights, tokenizer_name_or_path=source.tokenizer))
    if source.is_adapter:
        from peft import PeftModel

        if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:  # the run added tokens
            model.resize_token_embeddings(len(tokenizer))
        model = PeftModel.from_pretrained(model, source.path)
    return model.eval(), tokenizer


def evaluate(source: Source, settings, dtype: str):
    from train.loop.benchmarks import evaluate_tasks

    model, tokenizer = load(source, dtype)
    results = evaluate_tasks(model, tokenizer, settings)
    del model
    gc.collect()
    return results


def table_rows(after: dict[str, float], before: dict[str, float] | None) -> list[dict]:
    """One row per task and metric (bench/<task>/<metric>), its stderr beside it."""
    from train.loop.benchmarks import STDERR_SUFFIX, task_and_metric

    rows = []
    for key in sorted(k for k in after if task_and_metric(k)):
        task, metric = task_and_metric(key)
        row = {"task": task, "metric": metric, "after": after[key], "stderr": after.get(key + STDERR_SUFFIX)}
        if before is not None:
            row |= {"before": before.get(key), "before_stderr": before.get(key + STDERR_SUFFIX)}
            row["difference"] = None if row["before"] is None else after[key] - row["before"]
        rows.append(row)
    return rows


def render(rows: list[dict], compared: bool) -> str:
    def number(value, signed=False) -> str:
        return "-" if value is None else f"{value:+.4f}" if signed else f"{value:.4f}"

    header = ["task", "metric"] + (["before", "after", "difference"] if compared else ["value"]) + ["stderr"]
    lines = [header]
    for row in rows:
        values = [number(row["before"]), number(row["after"]), number(row["difference"], signed=True)] if compared \
            else [number(row["after"])]  # fmt: skip
        lines.append([row["task"], row["metric"], *values, number(row["stderr"])])
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip() for line in lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="a run directory, a model or adapter folder, or a model preset")
    compare = parser.add_mutually_exclusive_group()
    compare.add_argument("--compare", help="the model to compare with (default: MODEL's base model, where known)")
    compare.add_argument("--no-compare", action="store_true", help="evaluate MODEL alone")
    parser.add_argument("--tasks", nargs="+", help="harness tasks, groups or tags (default: the run's benchmarks)")
    parser.add_argument("--include-path", help="a folder of your own task YAML files")
    parser.add_argument("--limit", type=positive, help="examples per task (the first ones); default: all")
    parser.add_argument("--num-fewshot", type=int, help="few-shot examples per prompt; default: each task's own")
    parser.add_argument(
        "--batch-size", type=positive, help=f"sequences per forward pass (default {DEFAULT_BATCH_SIZE})"
    )
    parser.add_argument("--seed", type=int, help="the harness's seeds (default: the run's seed, else 0)")
    parser.add_argument("--apply-chat-template", action=argparse.BooleanOptionalAction,
                        help="render prompts with the chat template, as a user turn (default: the run's setting, "
                        "else no, as lm_eval)")  # fmt: skip
    parser.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto",
                        help="weights' dtype; auto: as stored, as `lm_eval --model hf` loads them")  # fmt: skip
    parser.add_argument("--cache-dir", help="cache_dir for presets whose folder is under it (model=tiny)")
    parser.add_argument("--json", type=Path, help="also write the table, the models and the settings here")
    parser.add_argument("--verbose", action="store_true", help="let the libraries' progress bars and warnings through")
    args = parser.parse_args()
    if args.num_fewshot is not None and args.num_fewshot < 0:
        parser.error(f"argument --num-fewshot: {args.num_fewshot} is invalid: must be >= 0")
    sys.path.insert(0, str(REPO))
    from train.loop.benchmarks import HARNESS_VERSION, task_problems
    from train.loop.progress import quiet_libraries

    quiet_libraries(verbose=args.verbose)
    after = resolve(args.model, args.cache_dir)
    before = None
    if args.compare:
        before = resolve(args.compare, args.cache_dir)
    elif not args.no_compare and after.base:
        before = Source(Path(after.base).expanduser(), after.base, None, None)
    settings = settings_from(args, after)
    problems = task_problems(settings)
    if problems:
        fail("\n  ".join(problems))
    check_paths(*[s for s in (before, after) if s is not None])
    results = {"before": evaluate(before, settings, args.dtype)} if before is not None else {}
    results["after"] = evaluate(after, settings, args.dtype)
    rows = table_rows(results["after"].metrics, results["before"].metrics if before else None)
    shots = ", ".join(f"{task} {n}-shot" for task, n in sorted(results["after"].num_fewshot.items()))
    examples = ", ".join(f"{task} {n} examples" for task, n in sorted(results["after"].samples.items()))
    chat = ", chat template" if settings.apply_chat_template else ""
    print(f"lm-eval {HARNESS_VERSION}, seed {settings.seed}{chat}: {shots}; {examples}")
    if before is not None:
        print(f"before: {before.label}\nafter:  {after.label}")
    print(render(rows, compared=before is not None))
    if args.json:
        record = {
            "model": after.label,
            "compare": before.label if before else None,
            "harness": f"lm-eval {HARNESS_VERSION}",
            "settings": {**settings.__dict__, "tasks": list(settings.tasks), "dtype": args.dtype},
            "num_fewshot": results["after"].num_fewshot,
            "examples": results["after"].samples,
            "rows": rows,
        }
        args.json.write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
