"""The typed schema of Halyard's configuration, and its validation.

Every key has exactly one default and one line of documentation, here. The YAML files under `config/` are presets
that choose values (a model, a loss); `python launch.py --help` prints this schema as a table.

This module imports no torch, so that `--help` and config errors answer in about a second.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import os
import sys
import textwrap
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from train.app.launcher import accelerate_config_problem, planned_world_size
from train.errors import ConfigError

CONFIG_DIR = Path(__file__).resolve().parents[2] / "config"  # Hydra's presets: config.yaml, loss/, model/


def setting(default: Any, help: str) -> Any:
    """A dataclass field with its one default and its documentation (lists get a fresh copy per instance)."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class PeftConfig:
    lora_r: int = setting(16, "LoRA rank (the inner dimension of each low-rank update).")
    lora_alpha: float = setting(32.0, "LoRA scaling numerator: updates are scaled by lora_alpha / lora_r.")
    lora_dropout: float = setting(0.05, "Dropout probability on the LoRA input, in [0, 1).")
    target_modules: list[str] = setting(
        ["all-linear"],
        "Module names to adapt, e.g. [q_proj,v_proj]; [all-linear] adapts every linear layer but the head.",
    )


@dataclass
class ModelConfig:
    name_or_path: str | None = setting(None, "Local folder (or hub id, when online) of the model to fine-tune.")
    tokenizer_name_or_path: str | None = setting(None, "Tokenizer folder or hub id; defaults to model.name_or_path.")
    dtype: str = setting(
        "auto",
        "Compute dtype: auto | float32 | bfloat16. bfloat16 autocasts the forward pass; trained weights and "
        "optimizer state stay float32, and with use_peft the frozen base weights are loaded in bfloat16. auto: "
        "bfloat16 where the hardware computes it fast (a CUDA GPU with bf16, a CPU with AMX or AVX512-BF16), else "
        "float32; the run logs and records which.",
    )
    attn_implementation: str = setting("sdpa", "Attention kernel: eager | sdpa | flash_attention_2 (CUDA only).")
    batch_size: int = setting(
        8,
        "Global batch per optimizer step, in examples (pairs for paired losses, packed rows with data.packing), summed over processes and accumulation.",
    )
    eval_batch_size: int = setting(8, "Global batch for evaluation, in examples.")
    gradient_accumulation_steps: int = setting(1, "Micro-batches accumulated per optimizer step on each process.")
    max_length: int = setting(512, "Maximum tokens per example (prompt + response); longer examples are truncated.")
    max_grad_norm: float | None = setting(
        1.0, "Clip the global gradient L2 norm to this value; null disables clipping."
    )
    gradient_checkpointing: bool = setting(
        False, "Recompute activations in the backward pass: less memory, ~30% slower."
    )
    trust_remote_code: bool = setting(
        False, "Allow model code shipped with the checkpoint to run. Off unless you trust it."
    )
    use_peft: bool = setting(False, "Train LoRA adapters (through PEFT) instead of every weight.")
    peft: PeftConfig = field(default_factory=PeftConfig, metadata={"help": "LoRA settings, read when use_peft=true."})


@dataclass
class DataConfig:
    prompt_key: str = setting("instruction", "Instruction-style rows: field holding the user's instruction.")
    query_key: str = setting("input", "Instruction-style rows: optional field appended to the instruction.")
    response_key: str = setting("output", "Instruction-style rows: field holding the response to train on.")
    system_key: str = setting("system", "Instruction-style rows: optional field holding a system prompt.")
    messages_key: str = setting("messages", "Chat rows: field holding the list of {role, content} messages.")
    format: str = setting(
        "auto",
        "Row format: auto (detected from each row's columns) | instruction | messages | sharegpt | prompt_completion "
        "| text | preference | unpaired (see train/data/formats.py).",
    )
    train_on: str = setting(
        "assistant", "Supervised tokens: assistant (every assistant turn) | last_assistant | all (every token)."
    )
    train_on_reasoning: bool = setting(
        True,
        "Assistant reasoning (<think>...</think> opening the content, or a reasoning_content field): true trains "
        "it where the chat template renders it; false keeps it as unsupervised context.",
    )
    max_prompt_length: int | None = setting(
        None, "Cut prompts longer than this many tokens (from the left); null: no limit."
    )
    truncation: str = setting(
        "truncate",
        "Examples longer than model.max_length: truncate (cut the prompt from the left first, then the response's "
        "end) | drop (skip, counted) | error.",
    )
    on_bad_row: str = setting(
        "error", "A malformed row: error (stop, naming file, row and field) | skip (counted, reported)."
    )
    num_proc: int = setting(
        1, "Processes tokenizing in parallel when preprocessing (shards of rows; the cache is the same either way)."
    )
    num_workers: int = setting(
        1,
        "Data loader processes per training process that gather and collate the next steps' batches while the "
        "current step computes; 0: collate in the training process.",
    )
    cache_preprocessing: bool = setting(
        True, "Reuse tokenized data cached under ${cache_dir}/preprocessed/ when inputs match."
    )
    dataset_samples: list[float] = setting(
        [], "Per training dataset, in order: a count (>= 1, repeats data if larger) or a fraction (< 1); empty: all."
    )
    eval_split_ratio: float = setting(
        0.0,
        "Without eval_datasets, hold out this fraction of the training examples (before dataset_samples repeats or "
        "samples the rest).",
    )
    packing: bool = setting(
        False,
        "Pack training examples into rows of up to model.max_length tokens (best-fit decreasing); attention stays "
        "within each example. model.batch_size then counts packed rows.",
    )
    group_by_length: bool = setting(
        True,
        "Batch examples of similar length together (sorted runs of 32 batches; the batches' order stays random): "
        "almost no padding, so unpacked training runs about as fast as packed. false: fully random batches.",
    )
    shared_prompt: bool | None = setting(
        None,
        "Preference pairs: run each pair's prompt once, as one row `prompt, chosen, rejected` whose rejected tokens "
        "see the prompt but not the chosen ones (a 4D mask: sdpa, no packing); null: wherever that applies.",
    )
    n_examples: int | None = setting(None, "Cap on training examples after mixing (a seeded random subset); null: all.")


@dataclass
class LossConfig:
    """Base of every loss's settings. A loss's YAML names the loss and the trainer class that implements it; the
    trainer class names its settings dataclass (`settings_class`), a subclass of this one."""

    name: str | None = setting(None, "Loss name; pick one with loss=<name> (a file in config/loss/).")
    trainer: str | None = setting(
        None,
        "Import path of the trainer class that implements the loss, e.g. train.objectives.preference.DPOTrainer, or "
        "my_losses.HingeTrainer for a module in the working directory or on PYTHONPATH.",
    )

    def problems(self) -> list[str]:
        """Checks of this loss's own settings; a subclass with settings adds its own."""
        return []


@dataclass(frozen=True)
class LossSpec:
    """Everything validation needs to know about a loss, read from its trainer class before anything loads."""

    name: str
    trainer_path: str
    trainer: type  # a train.loop.trainer.BasicTrainer subclass
    settings: type[LossConfig]
    data_kind: str  # the rows it trains on: "sft", "text", "paired" or "unpaired" (train/data/formats.py)
    supports_packing: bool
    supports_shared_prompt: bool
    uses_reference: bool  # holds a frozen reference model (or the policy with its LoRA adapters disabled)
    supports_reference_precompute: bool
    model_head: str  # "lm" (a causal LM) or "score" (a sequence classifier: a reward model)


def resolve_loss(name: str, trainer_path: str) -> tuple[LossSpec | None, list[str]]:
    """Import the trainer class named by `loss.trainer` and read its capabilities; or say why it cannot be used."""
    where = f"loss.trainer={trainer_path!r}"
    module_name, _, class_name = trainer_path.replace(":", ".").rpartition(".")
    if not module_name:
        return None, [
            f"{where}: give the trainer's import path, module and class, e.g. train.objectives.preference.{trainer_path} or "
            f"my_losses.{trainer_path}"
        ]
    if os.getcwd() not in sys.path:
        sys.path.append(os.getcwd())  # a user's loss module in the working directory, as with `python -m`
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        if error.name and module_name.startswith(error.name):
            return None, [
                f"{where}: no module named '{error.name}'; put {module_name.replace('.', '/')}.py in the working "
                f"directory ({os.getcwd()}) or add its folder to PYTHONPATH"
            ]
        raise
    trainer = getattr(module, class_name, None)
    if not _is_trainer_class(trainer):
        candidates = [name for name, value in vars(module).items() if _is_trainer_class(value)]
        guess = difflib.get_close_matches(class_name, candidates, n=1)
        hint = f" (did you mean '{module_name}.{guess[0]}'?)" if guess else f"; trainers there: {sorted(candidates)}"
        return None, [f"{where}: {module_name} has no trainer class (a BasicTrainer subclass) '{class_name}'{hint}"]
    settings = trainer.settings_class
    if not (isinstance(settings, type) and issubclass(settings, LossConfig) and dataclasses.is_dataclass(settings)):
        return None, [
            f"{where}: {class_name}.settings_class must be a dataclass subclassing train.app.config.LossConfig, "
            f"not {settings!r}"
        ]
    spec = LossSpec(
        name=name,
        trainer_path=trainer_path,
        trainer=trainer,
        settings=settings,
        data_kind=trainer.data_kind,
        supports_packing=trainer.supports_packing,
        supports_shared_prompt=trainer.supports_shared_prompt,
        uses_reference=trainer.uses_reference,
        supports_reference_precompute=trainer.supports_reference_precompute,
        model_head=trainer.model_head,
    )
    return spec, []


def _is_trainer_class(value: object) -> bool:
    # By its interface rather than issubclass: this module stays free of train.loop.trainer (which imports it).
    hooks = ("settings_class", "data_kind", "loss_units", "batch_loss", "train")
    return isinstance(value, type) and all(hasattr(value, hook) for hook in hooks)


def builtin_losses() -> dict[str, str]:
    """The losses that ship with Halyard: name -> trainer import path, read from config/loss/*.yaml."""
    return {file.stem: OmegaConf.load(file).trainer for file in sorted((CONFIG_DIR / "loss").glob("*.yaml"))}


@dataclass
class OptimizerConfig:
    name: str = setting(
        "adamw",
        "adamw (torch) | adamw_fused (torch's fused kernel: CUDA, CPU) | adafactor (transformers; no first moment, "
        "its own decay and epsilons: betas and eps do not apply) | adamw_8bit (needs bitsandbytes).",
    )
    betas: list[float] = setting([0.9, 0.999], "AdamW's decay rates of the first and second moment estimates.")
    eps: float = setting(1e-8, "AdamW's epsilon, added to the square root of the second moment.")


@dataclass
class ReferenceConfig:
    precompute: bool = setting(
        False,
        "Preference losses: compute the reference model's log-probs once, cache them under "
        "${cache_dir}/reference_logps/, and train without a reference model in memory.",
    )


@dataclass
class WandbConfig:
    enabled: bool = setting(False, "Log to Weights & Biases (set WANDB_MODE=offline to log without an account).")
    project: str = setting("halyard", "Weights & Biases project name.")
    entity: str | None = setting(None, "Weights & Biases team or user; null uses your default entity.")
    mode: str | None = setting(None, "online | offline | disabled; null follows WANDB_MODE (online if unset).")


@dataclass
class TensorboardConfig:
    enabled: bool = setting(False, "Write TensorBoard event files under the run directory.")


@dataclass
class Config:
    exp_name: str = setting("default", "Name of the run; its files go to ${cache_dir}/${exp_name}.")
    seed: int = setting(0, "Seed for data order, initialization and dropout.")
    cache_dir: str = setting("runs", "Folder that holds run directories.")
    run_dir: str = setting("${cache_dir}/${exp_name}", "Where this run writes config.yaml, metrics.jsonl and FINAL/.")
    datasets: list[str] = setting([], "Training data: .json/.jsonl/.parquet/.csv files, save_to_disk folders or names.")
    eval_datasets: list[str] = setting([], "Held-out data evaluated every eval_every_steps; empty disables evaluation.")
    n_epochs: int = setting(1, "Passes over the training data.")
    max_steps: int | None = setting(
        None, "Stop after this many optimizer steps (caps n_epochs); null runs every epoch."
    )
    lr: float = setting(1e-5, "Peak learning rate (reached after warmup); see the README for values by method.")
    lr_scheduler: str = setting(
        "cosine",
        "Decay after warmup: cosine | linear (to min_lr_ratio x lr at the last step) | constant | "
        "warmup_stable_decay (lr held, then linear decay over the last lr_decay_ratio of the steps).",
    )
    min_lr_ratio: float = setting(0.0, "Floor of the schedule, as a fraction of lr (cosine, linear, WSD).")
    lr_decay_ratio: float = setting(0.1, "warmup_stable_decay: fraction of the steps, at the end, spent decaying.")
    warmup_ratio: float = setting(0.1, "Fraction of the optimizer steps spent in linear warmup (see warmup_steps).")
    warmup_steps: int | None = setting(None, "Warmup length in optimizer steps; when set, replaces warmup_ratio.")
    weight_decay: float = setting(0.0, "Decoupled weight decay, applied to matrices only (not to biases or norms).")
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig, metadata={"help": "The optimizer."})
    eval_every_steps: int = setting(
        100, "Evaluate every this many optimizer steps (and before the first, and at the end)."
    )
    log_every_steps: int = setting(10, "Write a metrics line every this many optimizer steps (and at the last step).")
    eval_samples: int = setting(
        0, "At each evaluation, generate answers to this many held-out prompts (samples.jsonl)."
    )
    eval_samples_max_new_tokens: int = setting(64, "Longest generated answer for eval_samples, in tokens.")
    peak_flops_per_second: float | None = setting(
        None, "Peak FLOP/s per process for mfu; null: the GPU's datasheet bf16 rate, or a matmul rate measured on CPU."
    )
    save_every_steps: int | None = setting(
        None, "Write a resumable checkpoint ${run_dir}/step-<N>/ every this many steps; null: none."
    )
    save_total_limit: int | None = setting(None, "Keep only the newest this many step checkpoints; null keeps all.")
    save_merged: str = setting(
        "adapter",
        "LoRA runs, what FINAL/ holds: adapter (the PEFT adapter only, megabytes; merge later with "
        "scripts/merge_lora.py) | merged (the merged model) | both (merged, and the adapter in FINAL/adapter/).",
    )
    save_dtype: str = setting(
        "auto",
        "Dtype of FINAL/'s weights (a full or merged model; a LoRA adapter stays float32): auto (the dtype "
        "model.name_or_path's config.json says its weights are stored in, as transformers saves; float32 if it "
        "says none) | float32 | bfloat16 | float16.",
    )
    resume_from_checkpoint: str | None = setting(
        None,
        "auto: continue from this run's newest complete checkpoint (or start fresh if none); or a checkpoint path.",
    )
    overwrite_run: bool = setting(
        False,
        "Start over in a run directory that already holds a run (its checkpoints, metrics and FINAL/ are deleted "
        "first). false: such a run is refused, saying how to continue it (resume_from_checkpoint=auto).",
    )
    resume_allow_config_change: bool = setting(
        False, "Resume even if settings that change the math (lr, batch, data...) differ."
    )
    on_nonfinite: str = setting(
        "stop", "A step with a NaN/inf loss or gradient: stop (exit 2) or skip (no update, counted)."
    )
    verbose: bool = setting(
        False,
        "Print every metric in each progress line (not only step, loss, lr, tokens/s, time left), and let the "
        "libraries' warnings, info logs and progress bars (loading, saving) through.",
    )
    accelerate_config: str | None = setting(
        None,
        "An accelerate config file (e.g. accelerate_config/fsdp_8gpu.yaml): `python launch.py` runs the job's "
        "processes through `accelerate launch --config_file <this>` (each job of a sweep, on its SLURM node); null: "
        "train in this process.",
    )
    loss: LossConfig = field(default_factory=LossConfig, metadata={"help": "The loss; chosen with loss=<name>."})
    model: ModelConfig = field(default_factory=ModelConfig, metadata={"help": "The model; chosen with model=<name>."})
    data: DataConfig = field(default_factory=DataConfig, metadata={"help": "How rows of the data files are read."})
    reference: ReferenceConfig = field(default_factory=ReferenceConfig, metadata={"help": "The reference model."})
    wandb: WandbConfig = field(default_factory=WandbConfig, metadata={"help": "Weights & Biases logging."})
    tensorboard: TensorboardConfig = field(default_factory=TensorboardConfig, metadata={"help": "TensorBoard logging."})


def register_defaults() -> None:
    """Register every key's default with Hydra's ConfigStore as `halyard_defaults`, the first entry of
    config/config.yaml's defaults list: `--cfg job` shows every key, `key=value` overrides need no `+`, and
    interpolations such as `hydra.run.dir: ${run_dir}` resolve.

    The node is untyped on purpose: Hydra stops at the first type error, while `validate` reports them all."""
    from hydra.core.config_store import ConfigStore

    defaults = OmegaConf.create(OmegaConf.to_container(OmegaConf.structured(Config)))
    # A loss's own settings (loss.beta...) depend on the loss chosen: `loss.<key>=value` may add them.
    OmegaConf.set_struct(defaults.loss, False)
    ConfigStore.instance().store(name="halyard_defaults", node=defaults)


def schema_keys() -> set[str]:
    """Every dotted key of the schema but the loss's own settings (those depend on the loss chosen)."""
    return set(_leaf_paths(OmegaConf.structured(Config)))


DTYPES = ("auto", "float32", "bfloat16")
NONFINITE_POLICIES = ("stop", "skip")
WANDB_MODES = (None, "online", "offline", "disabled")
ATTN_IMPLEMENTATIONS = ("eager", "sdpa", "flash_attention_2")
TRAIN_ON = ("assistant", "last_assistant", "all")
TRUNCATIONS = ("truncate", "drop", "error")
BAD_ROW_POLICIES = ("error", "skip")
OPTIMIZERS = ("adamw", "adamw_fused", "adafactor", "adamw_8bit")  # built in train/loop/optim.py
SCHEDULERS = ("cosine", "linear", "constant", "warmup_stable_decay")
SAVE_MERGED = ("adapter", "merged", "both")  # what FINAL/ holds after a LoRA run (train/loop/checkpoint.py)
SAVE_DTYPES = ("auto", "float32", "bfloat16", "float16")  # FINAL/'s weights


def validate(raw: DictConfig, world_size: int | None = None, check_model_files: bool = False) -> Config:
    """Check a composed config against the schema and the rules between keys; return it typed.

    Collects every problem (unknown keys with their closest valid name, wrong types, bad values, missing files, a
    loss that cannot be imported or does not support a setting) and raises one ConfigError listing them all. The
    loss's trainer is imported to read its settings schema and capabilities; no model or data is loaded.
    With `check_model_files` (the CLI, before a run), the model and tokenizer folders or hub ids are checked too.
    """
    problems: list[str] = []
    raw_tree = OmegaConf.to_container(raw, resolve=False)
    spec = _loss_spec(raw_tree.get("loss") or {}, problems)
    typed = OmegaConf.structured(Config(loss=spec.settings() if spec else LossConfig()))
    _merge_checked(raw_tree, typed, "", problems, schema_paths=sorted(_leaf_paths(typed)))
    try:
        cfg = OmegaConf.to_object(typed)
    except OmegaConfBaseException as error:
        problems.append(f"could not resolve the configuration: {error}")
        raise ConfigError(problems) from None
    problems += check_values(cfg, world_size if world_size is not None else planned_world_size(cfg.accelerate_config))
    if spec:
        problems += check_loss_capabilities(cfg, spec)
    if check_model_files:
        from train.app.model_paths import model_path_problems

        problems += model_path_problems(cfg.model)
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


def loss_spec(cfg: Config) -> LossSpec:
    """The spec of a validated config's loss (its module is already imported)."""
    spec, problems = resolve_loss(cfg.loss.name, cfg.loss.trainer)
    if spec is None:
        raise ConfigError(problems)
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
    if cfg.data.packing and not spec.supports_packing:
        problems.append(f"data.packing=true: {which} does not support packing; set data.packing=false")
    if cfg.data.shared_prompt:
        if not spec.supports_shared_prompt:
            problems.append(f"data.shared_prompt=true: {which} does not support it (paired losses on a causal LM do)")
        if cfg.data.packing:
            problems.append("data.shared_prompt=true and data.packing=true: pick one (a pair's row is laid out by one)")
        if cfg.model.attn_implementation != "sdpa":
            problems.append(
                f"data.shared_prompt=true needs model.attn_implementation=sdpa (its 4D attention mask), not "
                f"{cfg.model.attn_implementation}"
            )
    if cfg.reference.precompute and not spec.supports_reference_precompute:
        why = "it uses no reference model" if not spec.uses_reference else "its reference log-probs change every step"
        problems.append(f"reference.precompute=true: {which} cannot precompute them ({why}); set it to false")
    return problems


def _leaf_paths(node: DictConfig, prefix: str = "") -> list[str]:
    paths = []
    for key in node:
        child = node._get_node(key)
        path = f"{prefix}{key}"
        paths += _leaf_paths(child, path + ".") if isinstance(child, DictConfig) else [path]
    return paths


def _merge_checked(raw: dict, typed: DictConfig, prefix: str, problems: list[str], schema_paths: list[str]) -> None:
    """Copy raw values into the typed config one key at a time, recording every unknown key and type error."""
    for key, value in raw.items():
        path = f"{prefix}{key}"
        if key not in typed:
            problems.append(f"unknown key '{path}'{_did_you_mean(path, schema_paths)}")
            continue
        child = typed._get_node(key)
        if isinstance(child, DictConfig) and isinstance(value, dict):
            _merge_checked(value, child, path + ".", problems, schema_paths)
            continue
        try:
            typed[key] = value
        except OmegaConfBaseException:
            expected = _type_name(typing.get_type_hints(OmegaConf.get_type(typed))[key])
            problems.append(f"{path}={value!r}: expected {expected}")


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
        return f"a list of {_type_name(typing.get_args(annotation)[0])}"
    if origin in (typing.Union, types.UnionType):
        names = [_type_name(a) for a in typing.get_args(annotation) if a is not type(None)]
        return " or ".join(names) + " or null"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(
        annotation, str(annotation)
    )


def check_values(cfg: Config, world_size: int) -> list[str]:
    """Rules on values and between keys. Returns a list of problems, each with the value and how to fix it."""
    problems = []
    problems += _check_positive(cfg)
    if not 0 <= cfg.warmup_ratio < 1:
        problems.append(f"warmup_ratio={cfg.warmup_ratio}: must be in [0, 1)")
    if cfg.weight_decay < 0:
        problems.append(f"weight_decay={cfg.weight_decay}: must be >= 0")
    problems += _check_optimizer(cfg)
    if not cfg.exp_name.strip():
        problems.append("exp_name is empty: name the run, e.g. exp_name=my-run")
    if cfg.wandb.mode not in WANDB_MODES:
        problems.append(f"wandb.mode={cfg.wandb.mode!r}: must be one of {list(WANDB_MODES)}")
    if cfg.eval_samples < 0 or cfg.eval_samples_max_new_tokens <= 0:
        problems.append(
            f"eval_samples={cfg.eval_samples}, eval_samples_max_new_tokens={cfg.eval_samples_max_new_tokens}: must be >= 0 and > 0"
        )
    if cfg.save_merged not in SAVE_MERGED:
        problems.append(f"save_merged={cfg.save_merged!r}: must be one of {list(SAVE_MERGED)}")
    if cfg.save_dtype not in SAVE_DTYPES:
        problems.append(f"save_dtype={cfg.save_dtype!r}: must be one of {list(SAVE_DTYPES)}")
    if cfg.on_nonfinite not in NONFINITE_POLICIES:
        problems.append(f"on_nonfinite={cfg.on_nonfinite!r}: must be one of {list(NONFINITE_POLICIES)}")
    problems += cfg.loss.problems()
    problems += _check_data_files(cfg)
    if cfg.accelerate_config:
        problems += [p for p in [accelerate_config_problem(cfg.accelerate_config)] if p]
    problems += _check_model(cfg.model, world_size)
    return problems


def _check_optimizer(cfg: Config) -> list[str]:
    problems = []
    opt = cfg.optimizer
    if opt.name not in OPTIMIZERS:
        problems.append(f"optimizer.name={opt.name!r}: must be one of {list(OPTIMIZERS)}")
    elif opt.name == "adamw_8bit" and importlib.util.find_spec("bitsandbytes") is None:
        problems.append(
            "optimizer.name=adamw_8bit needs the bitsandbytes package, which is not installed: "
            "pip install -c constraints.txt bitsandbytes, or use optimizer.name=adamw"
        )
    if len(opt.betas) != 2 or not all(0 <= b < 1 for b in opt.betas):
        problems.append(f"optimizer.betas={opt.betas}: give two numbers in [0, 1), e.g. [0.9,0.999]")
    if opt.eps <= 0:
        problems.append(f"optimizer.eps={opt.eps}: must be > 0")
    if cfg.lr_scheduler not in SCHEDULERS:
        problems.append(f"lr_scheduler={cfg.lr_scheduler!r}: must be one of {list(SCHEDULERS)}")
    elif cfg.lr_scheduler == "constant" and cfg.min_lr_ratio:
        problems.append(f"min_lr_ratio={cfg.min_lr_ratio}: lr_scheduler=constant has no decay; set it to 0")
    if not 0 <= cfg.min_lr_ratio <= 1:
        problems.append(f"min_lr_ratio={cfg.min_lr_ratio}: must be in [0, 1]")
    if not 0 < cfg.lr_decay_ratio <= 1:
        problems.append(f"lr_decay_ratio={cfg.lr_decay_ratio}: must be in (0, 1]")
    if cfg.warmup_steps is not None and cfg.warmup_steps < 0:
        problems.append(f"warmup_steps={cfg.warmup_steps}: must be >= 0 (or null to use warmup_ratio)")
    return problems


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
    return [
        f"{key}={value}: must be > 0" for key, value in must_be_positive.items() if value is not None and value <= 0
    ]


def _check_data_files(cfg: Config) -> list[str]:
    from train.data.formats import FORMATS, source_problem

    problems = []
    if not cfg.datasets:
        problems.append("datasets is empty: give the training files, e.g. datasets=[data/train.jsonl]")
    for key, sources in (("datasets", cfg.datasets), ("eval_datasets", cfg.eval_datasets)):
        problems += [f"{key}: {problem}" for problem in map(source_problem, sources) if problem]
    data = cfg.data
    for key, value, allowed in (
        ("data.format", data.format, FORMATS),
        ("data.train_on", data.train_on, TRAIN_ON),
        ("data.truncation", data.truncation, TRUNCATIONS),
        ("data.on_bad_row", data.on_bad_row, BAD_ROW_POLICIES),
    ):
        if value not in allowed:
            problems.append(f"{key}={value!r}: must be one of {list(allowed)}")
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
    if model.dtype not in DTYPES:
        problems.append(f"model.dtype={model.dtype!r}: must be one of {list(DTYPES)}")
    if model.attn_implementation not in ATTN_IMPLEMENTATIONS:
        problems.append(
            f"model.attn_implementation={model.attn_implementation!r}: must be one of {list(ATTN_IMPLEMENTATIONS)}"
        )
    elif model.attn_implementation == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        problems.append(
            "model.attn_implementation=flash_attention_2 needs the flash-attn package (CUDA): pip install .[gpu], or use sdpa"
        )
    micro_batches = world_size * model.gradient_accumulation_steps
    if model.batch_size > 0 and model.gradient_accumulation_steps > 0 and model.batch_size % micro_batches:
        problems.append(
            f"model.batch_size={model.batch_size} does not split into {world_size} process(es) x "
            f"{model.gradient_accumulation_steps} accumulation step(s); choose a multiple of {micro_batches}"
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
    return problems


def describe_schema(width: int = 120) -> str:
    """A table of every key: its path, its default as you would write it on the command line, and what it means
    (for `launch.py --help`). A loss's own settings follow, with the losses that have them."""
    rows = []

    def walk(cls: type, prefix: str) -> None:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            path = prefix + f.name
            if dataclasses.is_dataclass(hints[f.name]):
                walk(hints[f.name], path + ".")
                continue
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            rows.append((path, _as_written(default), f.metadata["help"]))

    walk(Config, "")
    by_settings: dict[type, list[str]] = {}  # built-in losses that share a settings class are listed together
    for name, trainer_path in builtin_losses().items():
        spec, _ = resolve_loss(name, trainer_path)
        if spec is not None:
            by_settings.setdefault(spec.settings, []).append(name)
    base = {f.name for f in dataclasses.fields(LossConfig)}
    for settings, names in by_settings.items():
        for f in dataclasses.fields(settings):
            if f.name not in base:
                rows.append((f"loss.{f.name} ({', '.join(names)})", _as_written(f.default), f.metadata["help"]))
    key_width = max(len(r[0]) for r in rows)
    default_width = min(max(len(r[1]) for r in rows), 24)
    indent = 2 + key_width + 2 + default_width + 2
    lines = [f"  {'key':<{key_width}}  {'default':<{default_width}}  meaning"]
    for path, default, help in rows:
        if len(default) > default_width:  # a long default gets a line of its own
            lines.append(f"  {path:<{key_width}}  {default}")
            lead = " " * indent
        else:
            lead = f"  {path:<{key_width}}  {default:<{default_width}}  "
        wrapped = textwrap.wrap(help, width=max(width - indent, 40)) or [""]
        lines.append(lead + wrapped[0])
        lines += [" " * indent + line for line in wrapped[1:]]
    return "\n".join(lines)


def _as_written(value: Any) -> str:
    """A default as it is written in an override: null, true, [a,b], 1e-05."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return "[" + ",".join(_as_written(v) for v in value) + "]"
    return str(value) if value != "" else "''"


def config_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def flat_config(cfg: Config) -> dict[str, object]:
    """Dotted keys and scalar values (TensorBoard's hyperparameter table takes no lists or None)."""
    return flatten(OmegaConf.to_container(OmegaConf.structured(cfg)))


def flatten(tree: dict, prefix: str = "") -> dict[str, object]:
    """{"model": {"lr": 1}} -> {"model.lr": 1}; values that are not int, float, str or bool become strings."""
    flat: dict[str, object] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value if isinstance(value, int | float | str | bool) else str(value)
    return flat
