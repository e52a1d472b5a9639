"""Validation: a composed config checked against the schema (train/app/config.py) and the rules between keys.

Every problem is collected (an unknown key with the closest valid one, a wrong type, a value outside a setting's
choices or range, a missing file, a loss that cannot be imported or does not support a setting) and raised once, as
one ConfigError. Nothing is loaded: reading the loss's settings imports its trainer module (train/app/loss_registry.py),
and with it torch, but no model, tokenizer or data.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import types
import typing
from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from train.app.config import SWEEP_OBJECTIVES, Config, LossConfig, ModelConfig, leaf_paths, leaf_settings
from train.app.launcher import accelerate_config_problem, planned_fsdp, planned_world_size
from train.app.loss_registry import LossSpec, builtin_losses, resolve_loss
from train.batching.layout import decide_layout
from train.errors import ConfigError

# What users of transformers' TrainingArguments and TRL's configs type, and Halyard's key for it (with a note where
# the meaning differs). Their names that Halyard shares (seed, max_steps, warmup_ratio, warmup_steps, weight_decay,
# save_total_limit, resume_from_checkpoint) need no entry. `launch.py --help` prints this table.
TRANSFORMERS_KEYS: dict[str, tuple[str, str]] = {
    "learning_rate": ("lr", ""),
    "num_train_epochs": ("n_epochs", ""),
    "per_device_train_batch_size": (
        "model.batch_size",
        "the GLOBAL batch: per-device batch x processes x model.gradient_accumulation_steps",
    ),
    "per_device_eval_batch_size": ("model.eval_batch_size", "the GLOBAL eval batch: per-device batch x processes"),
    "gradient_accumulation_steps": ("model.gradient_accumulation_steps", ""),
    "lr_scheduler_type": ("lr_scheduler", ""),
    "optim": ("optimizer.name", ""),
    "adam_beta1": ("optimizer.betas", "both rates in one list, e.g. optimizer.betas=[0.9,0.999]"),
    "adam_beta2": ("optimizer.betas", "both rates in one list, e.g. optimizer.betas=[0.9,0.999]"),
    "adam_epsilon": ("optimizer.eps", ""),
    "max_grad_norm": ("model.max_grad_norm", ""),
    "output_dir": ("run_dir", "or exp_name: a run's files go to ${cache_dir}/${exp_name}"),
    "run_name": ("exp_name", ""),
    "model_name_or_path": ("model.name_or_path", ""),
    "dataset_name": ("datasets", "a list, e.g. datasets=[data/train.jsonl]"),
    "max_seq_length": ("model.max_length", "prompt + response, in tokens"),
    "max_length": ("model.max_length", "prompt + response, in tokens"),
    "bf16": ("model.dtype", "model.dtype=bfloat16; the default, auto, picks it where the hardware is fast at it"),
    "gradient_checkpointing": ("model.gradient_checkpointing", ""),
    "save_steps": ("save_every_steps", ""),
    "eval_steps": ("eval_every_steps", ""),
    "logging_steps": ("log_every_steps", ""),
    "report_to": ("wandb.enabled", "and tensorboard.enabled, each true or false"),
}


def validate(
    raw: DictConfig, world_size: int | None = None, check_model_files: bool = False, check_memory: bool = False
) -> Config:
    """Check a composed config against the schema and the rules between keys; return it typed.

    Collects every problem (unknown keys with their closest valid name, wrong types, bad values, missing files, a
    loss that cannot be imported or does not support a setting) and raises one ConfigError listing them all. The
    loss's trainer is imported to read its settings schema and capabilities; no model or data is loaded.
    With `check_model_files` (the CLI, before a run), the model and tokenizer folders or hub ids are checked too;
    with `check_memory` as well (on the machine that will train), the memory plan against this machine's device
    (memory_check).
    """
    problems: list[str] = []
    raw_tree = OmegaConf.to_container(raw, resolve=False)
    spec = _loss_spec(raw_tree.get("loss") or {}, problems)
    typed = OmegaConf.structured(Config(loss=spec.settings() if spec else LossConfig()))
    rejected: set[str] = set()
    _merge_checked(raw_tree, typed, "", problems, rejected, _KeyHints(sorted(leaf_paths(typed)), spec))
    try:
        cfg = OmegaConf.to_object(typed)
    except OmegaConfBaseException as error:
        problems.append(f"could not resolve the configuration: {error}")
        raise ConfigError(problems) from None
    # A rejected value left its key at the default: a check of that default (`datasets is empty` after
    # `datasets=a.jsonl`) would report a second problem the user did not make.
    value_problems = check_values(
        cfg, world_size if world_size is not None else planned_world_size(cfg.accelerate_config)
    )
    problems += [p for p in value_problems if not any(_names_key(p, path) for path in rejected)]
    if spec:
        problems += check_loss_capabilities(cfg, spec)
    if check_model_files:
        from train.app.model_paths import model_path_problems

        problems += model_path_problems(cfg.model)
        if check_memory and not problems and spec:  # the plan reads config.json: once everything else is right
            from train.app.memory_plan import memory_problem

            problems += [p for p in [memory_problem(cfg, spec)] if p]
    if problems:
        raise ConfigError(problems)
    return cfg


def _loss_spec(raw_loss: dict, problems: list[str]) -> LossSpec | None:
    name, trainer_path = raw_loss.get("name"), raw_loss.get("trainer")
    if name is None:
        problems.append(f"no loss chosen: add loss=<name> with one of {sorted(builtin_losses())} (config/loss/)")
        return None
    if trainer_path is None:
        problems.append(f"loss={name} names no trainer: add `trainer: <module>.<TrainerClass>` to its YAML")
        return None
    spec, found = resolve_loss(name, str(trainer_path))
    problems += found
    return spec


def check_loss_capabilities(cfg: Config, spec: LossSpec) -> list[str]:
    """Settings the chosen loss does not support, found before anything loads."""
    problems = []
    which = f"loss={spec.name} ({spec.trainer_path})"
    from train.data.formats import FORMAT_RECORDS, KIND_COLUMNS, KINDS

    record = FORMAT_RECORDS.get(cfg.data.format)
    if record is not None and record not in KINDS.get(spec.data_kind, ()):
        problems.append(
            f"data.format={cfg.data.format}: {which} trains on {KIND_COLUMNS[spec.data_kind]} rows, which this "
            f"format does not give; set data.format=auto or a format of those rows"
        )
    problems += decide_layout(cfg.data, cfg.model.attn_implementation, spec)[1]  # the run decides it the same way
    if cfg.reference.precompute and not spec.supports_reference_precompute:
        why = "it uses no reference model" if not spec.uses_reference else "its reference log-probs change every step"
        problems.append(f"reference.precompute=true: {which} cannot precompute them ({why}); set it to false")
    return problems + _check_head_loss(cfg, spec, sharded=planned_fsdp(cfg.accelerate_config))


def _check_head_loss(cfg: Config, spec: LossSpec, sharded: bool) -> list[str]:
    """model.head_loss=fused where it cannot work: a loss that does not compute token NLLs from the head, FSDP."""
    if cfg.model.head_loss != "fused":
        return []
    problems = []
    if not getattr(spec.trainer, "supports_fused_head", False):
        problems.append(
            f"model.head_loss=fused: loss={spec.name} ({spec.trainer_path}) does not take its loss from fused hidden "
            f"states and head (only the SFT and pretraining losses do); set model.head_loss=logits"
        )
    if sharded:
        problems.append(
            "model.head_loss=fused under FSDP (the accelerate config's distributed_type: FSDP): the head's weight is "
            "a sharded DTensor outside the model's forward, so the fused loss cannot read it whole; set "
            "model.head_loss=logits, or train with DDP (accelerate_config/cpu_2proc.yaml, or --multi_gpu)"
        )
    return problems


def _merge_checked(
    raw: dict, typed: DictConfig, prefix: str, problems: list[str], rejected: set[str], hints: _KeyHints
) -> None:
    """Copy raw values into the typed config one key at a time, recording every unknown key and type error (the
    paths of values that could not be set go to `rejected`)."""
    for key, value in raw.items():
        path = f"{prefix}{key}"
        if key not in typed:
            problems.append(hints.unknown_key(path))
            continue
        child = typed._get_node(key)
        if isinstance(child, DictConfig) and isinstance(value, dict):
            _merge_checked(value, child, path + ".", problems, rejected, hints)
            continue
        try:
            typed[key] = value
        except OmegaConfBaseException:
            annotation = typing.get_type_hints(OmegaConf.get_type(typed))[key]
            rejected.add(path)
            problems.append(
                f"{path}={value!r}: expected {_type_name(annotation)}{_as_list_hint(path, value, annotation)}"
            )


def _as_list_hint(path: str, value: Any, annotation: Any) -> str:
    """`datasets=a.jsonl`: Hydra reads a value without brackets as one string."""
    if typing.get_origin(annotation) is list and isinstance(value, str | int | float):
        return f"; write it in brackets: {path}=[{value}]"
    return ""


def _names_key(problem: str, path: str) -> bool:
    """Whether a problem is about the key `path` (problems start with the key, then `=`, `:` or a space)."""
    return problem.startswith(path) and problem[len(path) : len(path) + 1] in ("=", ":", " ")


@dataclass(frozen=True)
class _KeyHints:
    """What to tell about a key the schema does not have: the chosen loss's own settings, the name transformers and
    TRL use for a Halyard key, or the closest valid key."""

    schema_paths: list[str]
    spec: LossSpec | None

    def unknown_key(self, path: str) -> str:
        if path in TRANSFORMERS_KEYS:
            key, note = TRANSFORMERS_KEYS[path]
            return f"unknown key '{path}': Halyard calls it '{key}'" + (f" ({note})" if note else "")
        if path.startswith("loss.") and self.spec is not None:
            return self._unknown_loss_setting(path.removeprefix("loss."))
        return f"unknown key '{path}'{_did_you_mean(path, self.schema_paths)}"

    def _unknown_loss_setting(self, name: str) -> str:
        """`loss.beta` after switching loss=dpo to loss=orpo: say that this loss has no such setting, and list its own
        (matching `beta` against `loss.trainer` would mislead)."""
        keys = [path for path, _, _ in leaf_settings(self.spec.settings())]  # in declaration order
        guess = difflib.get_close_matches(name, keys, n=1, cutoff=0.6)
        if guess:
            return f"unknown key 'loss.{name}' (did you mean 'loss.{guess[0]}'?)"
        base = {f.name for f in dataclasses.fields(LossConfig)}
        own = [f"loss.{k}" for k in keys if k not in base]
        listed = f"its settings: {', '.join(own)}" if own else "it has no settings of its own"
        owners = _losses_with_setting(name)
        elsewhere = f"; loss.{name} is a setting of loss={', '.join(owners)}" if owners else ""
        which = f"loss={self.spec.name}"
        if builtin_losses().get(self.spec.name) != self.spec.trainer_path:  # a loss YAML's trainer, replaced
            which += f" with loss.trainer={self.spec.trainer_path}"
        return f"unknown key 'loss.{name}': {which} has no setting '{name}' ({listed}){elsewhere}"


def _losses_with_setting(name: str) -> list[str]:
    """The built-in losses whose settings include `name` (their trainer modules are imported to read them)."""
    owners = []
    for loss, trainer_path in builtin_losses().items():
        spec, _ = resolve_loss(loss, trainer_path)
        if spec is not None and name in {f.name for f in dataclasses.fields(spec.settings)}:
            owners.append(loss)
    return owners


def _did_you_mean(path: str, schema_paths: list[str]) -> str:
    guess = difflib.get_close_matches(path, schema_paths, n=1, cutoff=0.6)
    if not guess:  # a misspelled leaf in the wrong section, e.g. `batch_sise` for `model.batch_size`
        by_leaf = {_leaf(p): p for p in schema_paths}
        guess = [by_leaf[m] for m in difflib.get_close_matches(_leaf(path), list(by_leaf), n=1, cutoff=0.6)]
    return f" (did you mean '{guess[0]}'?)" if guess else " (run `python launch.py --help` for every valid key)"


def _leaf(path: str) -> str:
    return path.rsplit(".", 1)[-1]


def _type_name(annotation: Any) -> str:
    if isinstance(annotation, str):
        return annotation
    origin = typing.get_origin(annotation)
    if origin is list:
        item = typing.get_args(annotation)[0]
        return "a list of " + {int: "integers", float: "numbers", bool: "true/false values", str: "strings"}.get(
            item, _type_name(item)
        )
    if origin in (typing.Union, types.UnionType):
        names = [_type_name(a) for a in typing.get_args(annotation) if a is not type(None)]
        return " or ".join(names) + " or null"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(
        annotation, str(annotation)
    )


def check_values(cfg: Config, world_size: int) -> list[str]:
    """Rules on values and between keys. Returns a list of problems, each with the value and how to fix it."""
    problems = []
    problems += check_choices(cfg)
    problems += _check_positive(cfg)
    if not 0 <= cfg.warmup_ratio < 1:
        problems.append(f"warmup_ratio={cfg.warmup_ratio}: must be in [0, 1)")
    if cfg.weight_decay < 0:
        problems.append(f"weight_decay={cfg.weight_decay}: must be >= 0")
    problems += _check_optimizer(cfg)
    if not cfg.exp_name.strip():
        problems.append("exp_name is empty: name the run, e.g. exp_name=my-run")
    if cfg.eval_samples < 0 or cfg.eval_samples_max_new_tokens <= 0:
        problems.append(
            f"eval_samples={cfg.eval_samples}, eval_samples_max_new_tokens={cfg.eval_samples_max_new_tokens}: must be >= 0 and > 0"
        )
    problems += cfg.loss.problems()
    problems += _check_eval_reward_model(cfg)
    problems += _check_data_files(cfg)
    if cfg.accelerate_config:
        problems += [p for p in [accelerate_config_problem(cfg.accelerate_config)] if p]
    problems += _check_model(cfg.model, world_size)
    problems += check_benchmarks(cfg)
    problems += _check_quantization(cfg, sharded=planned_fsdp(cfg.accelerate_config))
    return problems + _check_compile(cfg)


def _check_compile(cfg: Config) -> list[str]:
    """model.compile=true where torch.compile cannot build kernels on this machine (null decides at start-up, and
    stays off there). Works (tested on CPU): FSDP2, QLoRA, LoRA and DoRA (DoRA breaks the graph in many places:
    little gain), gradient checkpointing, bfloat16."""
    if not cfg.model.compile:
        return []
    from train.app.models import compiler_problem

    problem = compiler_problem()
    return [f"model.compile=true: {problem}; or set model.compile=false"] if problem else []


def _check_quantization(cfg: Config, sharded: bool) -> list[str]:
    """model.quantization (QLoRA) where it cannot work: without LoRA, with options of the other kind, under FSDP."""
    model = cfg.model
    if model.quantization == "none":
        return []  # the 4-bit options are moot, not wrong: a sweep over quantization=none,nf4 keeps them
    problems = []
    which = f"model.quantization={model.quantization}"
    if not model.use_peft:
        problems.append(
            f"{which} without model.use_peft: a quantized base cannot be trained itself; QLoRA trains LoRA adapters "
            f"on it: method=qlora (or ++model.use_peft=true), or model.quantization=none for full fine-tuning"
        )
    if model.quantization == "int8":
        extra = [key for key, value in _quantization_options(model).items() if value is not None]
        problems += [
            f"{key}: a setting of 4-bit bases; {which} (LLM.int8) has none: use model.quantization=nf4, or drop {key}"
            for key in extra
        ]
    if sharded:
        problems.append(
            f"{which} under FSDP (the accelerate config's distributed_type: FSDP): Halyard's FSDP2 path loads every "
            f"weight in float32 and all-gathers in model.dtype, which would reinterpret bitsandbytes' packed 4-bit "
            f"storage (accelerate 1.16 shards it only in its own GPU plugin, with bnb_4bit_quant_storage set to the "
            f"all-gather dtype; 8-bit weights not at all). Train QLoRA with one process per GPU (DDP: "
            f"accelerate_config/cpu_2proc.yaml or your GPU config without FSDP), or shard a 16-bit base with FSDP2 "
            f"and offload it to CPU memory (accelerate_config/fsdp_offload_cpu_2proc.yaml)"
        )
    return problems


def _quantization_options(model: ModelConfig) -> dict[str, object]:
    """The 4-bit options with the value set (None where left at their default)."""
    return {
        "model.double_quantization": model.double_quantization,
        "model.quantization_compute_dtype": None
        if model.quantization_compute_dtype == "auto"
        else model.quantization_compute_dtype,
    }


def _check_eval_reward_model(cfg: Config) -> list[str]:
    """eval_reward_model scores the eval_samples answers, whose prompts are read from eval_datasets."""
    if cfg.eval_reward_model is None:
        return []
    from train.app.model_paths import reward_model_problems

    problems = reward_model_problems("eval_reward_model", cfg.eval_reward_model)
    if cfg.eval_samples <= 0:
        problems.append(
            f"eval_reward_model={cfg.eval_reward_model}: it scores the answers generated at each evaluation, but "
            f"eval_samples={cfg.eval_samples} generates none; set eval_samples to the number of prompts to answer"
        )
    if not cfg.eval_datasets:
        problems.append(
            f"eval_reward_model={cfg.eval_reward_model}: the prompts it scores are read from eval_datasets, which "
            f"is empty; give eval_datasets=[...] (a split held out with data.eval_split_ratio cannot be scored)"
        )
    return problems


def check_choices(cfg: Config) -> list[str]:
    """A value outside its setting's declared `choices`, for every setting of the schema and of the loss's own."""
    return [
        f"{path}={value!r}: must be one of {list(field.metadata['choices'])}"
        for path, field, value in leaf_settings(cfg)
        if "choices" in field.metadata and value not in field.metadata["choices"]
    ]


def _check_optimizer(cfg: Config) -> list[str]:
    problems = []
    opt = cfg.optimizer
    if opt.name == "adamw_8bit" and importlib.util.find_spec("bitsandbytes") is None:
        problems.append(
            "optimizer.name=adamw_8bit needs the bitsandbytes package, which is not installed: "
            "pip install -c constraints.txt bitsandbytes, or use optimizer.name=adamw"
        )
    if len(opt.betas) != 2 or not all(0 <= b < 1 for b in opt.betas):
        problems.append(f"optimizer.betas={opt.betas}: give two numbers in [0, 1), e.g. [0.9,0.999]")
    if opt.eps <= 0:
        problems.append(f"optimizer.eps={opt.eps}: must be > 0")
    if cfg.lr_scheduler == "constant" and cfg.min_lr_ratio:
        problems.append(f"min_lr_ratio={cfg.min_lr_ratio}: lr_scheduler=constant has no decay; set it to 0")
    if not 0 <= cfg.min_lr_ratio <= 1:
        problems.append(f"min_lr_ratio={cfg.min_lr_ratio}: must be in [0, 1]")
    if not 0 < cfg.lr_decay_ratio <= 1:
        problems.append(f"lr_decay_ratio={cfg.lr_decay_ratio}: must be in (0, 1]")
    if cfg.warmup_steps is not None and cfg.warmup_steps < 0:
        problems.append(f"warmup_steps={cfg.warmup_steps}: must be >= 0 (or null to use warmup_ratio)")
    return problems


def check_benchmarks(cfg: Config) -> list[str]:
    """benchmarks.* and sweep.objective: bad values, unknown tasks, task data that needs a download while offline, an
    objective no configured task produces. lm-eval is imported (seconds) only when benchmarks.tasks is set."""
    bench = cfg.benchmarks
    problems = [
        f"{key}={value}: must be > 0"
        for key, value in (
            ("benchmarks.every_steps", bench.every_steps),
            ("benchmarks.limit_per_task", bench.limit_per_task),
            ("benchmarks.batch_size", bench.batch_size),
        )
        if value is not None and value <= 0
    ]
    if bench.num_fewshot is not None and bench.num_fewshot < 0:
        problems.append(f"benchmarks.num_fewshot={bench.num_fewshot}: must be >= 0 (or null for each task's default)")
    if bench.tasks:
        from train.loop.benchmarks import BenchmarkSettings, task_problems

        problems += task_problems(BenchmarkSettings.from_config(bench, cfg.seed))
    return problems + _check_objective(cfg)


def _check_objective(cfg: Config) -> list[str]:
    objective = cfg.sweep.objective
    if objective in SWEEP_OBJECTIVES:
        return []
    from train.loop.benchmarks import METRIC_PREFIX

    if not objective.startswith(METRIC_PREFIX):
        return [
            f"sweep.objective={objective}: not a metric a run reports; use one of {sorted(SWEEP_OBJECTIVES)} or a "
            f"benchmark metric bench/<task>/<metric> of benchmarks.tasks"
        ]
    if not cfg.benchmarks.tasks:
        return [
            f"sweep.objective={objective}: a benchmark metric, but benchmarks.tasks is empty; add its task, e.g. "
            f"benchmarks.tasks=[{objective.split('/')[1]}]"
        ]
    from fnmatch import fnmatchcase

    from train.loop.benchmarks import BenchmarkSettings, expected_metrics

    expected = expected_metrics(BenchmarkSettings.from_config(cfg.benchmarks, cfg.seed))
    if any(fnmatchcase(objective, name) for name in expected):
        return []
    close = difflib.get_close_matches(objective, sorted(expected), n=1)
    hint = f" (did you mean {close[0]}?)" if close else ""
    listed = ", ".join(sorted(expected)[:12]) + (", ..." if len(expected) > 12 else "")
    return [f"sweep.objective={objective}: no task of benchmarks.tasks produces it{hint}; they produce: {listed}"]


def _check_positive(cfg: Config) -> list[str]:
    must_be_positive = {
        "n_epochs": cfg.n_epochs,
        "lr": cfg.lr,
        "eval_every_steps": cfg.eval_every_steps,
        "log_every_steps": cfg.log_every_steps,
        "max_steps": cfg.max_steps,
        "save_every_steps": cfg.save_every_steps,
        "save_total_limit": cfg.save_total_limit,
        "model.batch_size": cfg.model.batch_size,
        "model.eval_batch_size": cfg.model.eval_batch_size,
        "model.gradient_accumulation_steps": cfg.model.gradient_accumulation_steps,
        "model.max_length": cfg.model.max_length,
        "model.max_grad_norm": cfg.model.max_grad_norm,
    }
    problems = [
        f"{key}={value}: must be > 0" for key, value in must_be_positive.items() if value is not None and value <= 0
    ]
    if cfg.profile_steps < 0:
        problems.append(f"profile_steps={cfg.profile_steps}: must be >= 0 (0: no profiling)")
    return problems


def _check_data_files(cfg: Config) -> list[str]:
    from train.data.formats import FORMAT_NAMES as FORMATS
    from train.data.sources import source_problem
    from train.data.templates import chat_template_problem

    problems = []
    if not cfg.datasets:
        problems.append("datasets is empty: give the training files, e.g. datasets=[data/train.jsonl]")
    for key, sources in (("datasets", cfg.datasets), ("eval_datasets", cfg.eval_datasets)):
        problems += [f"{key}: {problem}" for problem in map(source_problem, sources) if problem]
    data = cfg.data
    if data.format not in FORMATS:
        problems.append(f"data.format={data.format!r}: must be one of {list(FORMATS)}")
    problems += [p for p in [chat_template_problem(data.chat_template)] if p]
    if data.dataset_samples and len(data.dataset_samples) != len(cfg.datasets):
        problems.append(
            f"data.dataset_samples has {len(data.dataset_samples)} entries for {len(cfg.datasets)} datasets; give one per dataset"
        )
    if any(n <= 0 for n in data.dataset_samples):
        problems.append(f"data.dataset_samples={data.dataset_samples}: every entry must be > 0")
    if not 0 <= data.eval_split_ratio < 1:
        problems.append(f"data.eval_split_ratio={data.eval_split_ratio}: must be in [0, 1)")
    if data.num_workers < 0:
        problems.append(f"data.num_workers={data.num_workers}: must be >= 0 (0: collate in the training process)")
    for key, value in (
        ("data.num_proc", data.num_proc),
        ("data.n_examples", data.n_examples),
        ("data.max_prompt_length", data.max_prompt_length),
    ):
        if value is not None and value <= 0:
            problems.append(f"{key}={value}: must be > 0")
    return problems


def _check_model(model: ModelConfig, world_size: int) -> list[str]:
    problems = []
    if not model.name_or_path:
        problems.append("model.name_or_path is not set: pick a preset (model=smollm2) or set ++model.name_or_path=DIR")
    if model.attn_implementation == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        problems.append(
            "model.attn_implementation=flash_attention_2 needs the flash-attn package (CUDA): pip install .[gpu], or use sdpa"
        )
    if model.attention_float32 and model.attn_implementation != "sdpa":
        problems.append(
            f"model.attention_float32=true upcasts sdpa attention, but model.attn_implementation="
            f"{model.attn_implementation}; use attn_implementation=sdpa, or attention_float32=false"
        )
    micro_batches = world_size * model.gradient_accumulation_steps
    if model.batch_size > 0 and model.gradient_accumulation_steps > 0 and model.batch_size % micro_batches:
        problems.append(
            f"model.batch_size={model.batch_size} does not split into {world_size} process(es) x "
            f"{model.gradient_accumulation_steps} accumulation step(s); choose a multiple of {micro_batches}"
        )
    if model.micro_batch_tokens is not None and model.micro_batch_tokens <= 0:
        problems.append(
            f"model.micro_batch_tokens={model.micro_batch_tokens}: must be a positive number of tokens per forward "
            f"pass (null: from the data's mean micro-batch)"
        )
    if model.eval_batch_size > 0 and model.eval_batch_size % world_size:
        problems.append(
            f"model.eval_batch_size={model.eval_batch_size}: must be a multiple of the {world_size} processes"
        )
    if model.use_peft:
        peft = model.peft
        if peft.lora_r <= 0:
            problems.append(f"model.peft.lora_r={peft.lora_r}: must be > 0")
        if peft.lora_alpha <= 0:
            problems.append(f"model.peft.lora_alpha={peft.lora_alpha}: must be > 0")
        if not 0 <= peft.lora_dropout < 1:
            problems.append(f"model.peft.lora_dropout={peft.lora_dropout}: must be in [0, 1)")
        if not peft.target_modules:
            problems.append("model.peft.target_modules is empty: name modules to adapt, or use [all-linear]")
    return problems + _peft_option_problems(model)


def _peft_option_problems(model) -> list[str]:
    """The PEFT options and added tokens: what cannot work, found before the model loads."""
    problems, peft = [], model.peft
    if model.use_peft:
        both = sorted(set(peft.target_modules) & set(peft.modules_to_save))
        if both:
            problems.append(
                f"model.peft.modules_to_save={list(peft.modules_to_save)}: {both} are in model.peft.target_modules "
                f"too; a module is either adapted (LoRA) or trained whole, not both: remove it from one list"
            )
    else:
        lora_only = [
            f"model.peft.{key}={value}"
            for key, value in (("use_dora", peft.use_dora), ("use_rslora", peft.use_rslora))
            if value
        ] + ([f"model.peft.modules_to_save={list(peft.modules_to_save)}"] if peft.modules_to_save else [])
        if lora_only:
            problems.append(
                f"{', '.join(lora_only)}: LoRA options, but model.use_peft=false trains every weight; set "
                f"model.use_peft=true (method=lora), or remove them"
            )
    tokens = list(model.add_special_tokens)
    if any(not token.strip() for token in tokens) or len(set(tokens)) < len(tokens):
        problems.append(
            f"model.add_special_tokens={tokens}: each token must be a non-empty string, listed once; write them "
            f"quoted, e.g. model.add_special_tokens=['<tool_call>','</tool_call>']"
        )
    return problems
