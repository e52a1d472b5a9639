"""The typed schema of Halyard's configuration: every key, its type, its one default, its documentation and, where
the values are a fixed set, its choices.

Every key has exactly one default and one line of documentation, here. The YAML files under `config/` are presets
that choose values (a model, a loss); `python launch.py --help` prints this schema as a table (train/app/help.py),
and train/app/validate.py checks a composed config against it. Hydra learns every key's default from here
(`register_defaults`).

This module imports no torch: every layer may import it (the trainer modules for `LossConfig` and `setting`), and
launch.py reads the keys from it before anything heavy loads.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from train.data.formats import FORMAT_NAMES
from train.data.templates import CHAT_TEMPLATES

CONFIG_DIR = Path(__file__).resolve().parents[2] / "config"  # Hydra's presets: config.yaml, loss/, model/
CHANGES_MATH = "changes_math"  # a field's metadata: False where a resumed run may change it (see `setting`)


def setting(default: Any, help: str, choices: Sequence | Mapping[Any, str] = (), changes_math: bool = True) -> Any:
    """A dataclass field with its one default and its documentation (lists get a fresh copy per instance).

    `choices`: the only values allowed, or a mapping from each to what it means ('' for nothing to add). Validation
    rejects any other value, listing these; `--help` prints them after `help`, so `help` does not list them again:
    setting("sdpa", "Attention kernel", choices={"eager": "", "sdpa": "", "flash_attention_2": "CUDA only"}) reads
    "Attention kernel: eager | sdpa | flash_attention_2 (CUDA only)."

    `changes_math=False`: the key leaves the trained numbers as they are (where and how often the run logs, saves
    and evaluates; how a step's examples are split into passes; which kernel computes the same function), so a
    resumed run may change it; a resume that changes any other key is refused (`keys_that_keep_the_math`).
    """
    metadata: dict[str, Any] = {"help": help}
    if choices:
        metadata["choices"] = dict(choices) if isinstance(choices, Mapping) else dict.fromkeys(choices, "")
    if not changes_math:
        metadata[CHANGES_MATH] = False
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def keys_that_keep_the_math(node: Any = None, prefix: str = "", keeps: bool = False) -> set[str]:
    """The dotted keys declared with `changes_math=False`, or inside a section declared so (wandb, benchmarks...):
    the settings a resumed run may change (train/app/run.py compares every other key with the checkpoint's)."""
    node = Config() if node is None else node
    keys: set[str] = set()
    for f in dataclasses.fields(node):
        value, keeps_here = getattr(node, f.name), keeps or f.metadata.get(CHANGES_MATH) is False
        if dataclasses.is_dataclass(value):
            keys |= keys_that_keep_the_math(value, f"{prefix}{f.name}.", keeps_here)
        elif keeps_here:
            keys.add(prefix + f.name)
    return keys


def leaf_settings(node: Any, prefix: str = "") -> Iterator[tuple[str, dataclasses.Field, Any]]:
    """(dotted key, field, value) of every setting of a config dataclass instance, nested sections walked in order;
    a loss's own settings are those of the instance `node.loss` holds."""
    for f in dataclasses.fields(node):
        value = getattr(node, f.name)
        if dataclasses.is_dataclass(value):
            yield from leaf_settings(value, f"{prefix}{f.name}.")
        else:
            yield prefix + f.name, f, value


# Choices that code elsewhere reads too: train/loop/optim.py builds each of these.
OPTIMIZERS = {
    "adamw": "torch's default path: multi-tensor on CUDA, per parameter on CPU",
    "adamw_fused": "torch's fused kernel (CUDA, CPU, MPS): one pass over each parameter, the fastest; as transformers' "
    "default (adamw_torch_fused)",
    "adafactor": "transformers; no first moment, its own decay and epsilons: betas and eps do not apply",
    "adamw_8bit": "needs bitsandbytes",
}
QUANTIZATIONS = {  # train/app/models.py builds transformers' BitsAndBytesConfig for each
    "none": "16/32-bit base (model.dtype)",
    "nf4": "4-bit NormalFloat, QLoRA's",
    "fp4": "4-bit float",
    "int8": "LLM.int8(): 8-bit rows, outlier features in 16-bit",
}
SCHEDULERS = {
    "cosine": "to min_lr_ratio x lr at the last step",
    "linear": "the same, in a straight line",
    "constant": "",
    "warmup_stable_decay": "lr held, then linear decay over the last lr_decay_ratio of the steps",
}


@dataclass
class PeftConfig:
    lora_r: int = setting(16, "LoRA rank (the inner dimension of each low-rank update).")
    lora_alpha: float = setting(32.0, "LoRA scaling numerator: updates are scaled by lora_alpha / lora_r.")
    lora_dropout: float = setting(0.05, "Dropout probability on the LoRA input, in [0, 1).")
    target_modules: list[str] = setting(
        ["all-linear"],
        "Module names to adapt, e.g. [q_proj,v_proj]; [all-linear] adapts every linear layer but the head.",
    )
    use_dora: bool = setting(
        False,
        "DoRA: each adapted weight's magnitude trained apart from its direction (a vector per layer besides A and B); "
        "better at low ranks, slower per step.",
    )
    use_rslora: bool = setting(
        False, "rsLoRA: scale updates by lora_alpha / sqrt(lora_r) instead of lora_alpha / lora_r (stable at high r)."
    )
    modules_to_save: list[str] = setting(
        [],
        "Modules trained whole (not adapted) and saved with the adapter, e.g. [embed_tokens,lm_head]; the "
        "embeddings and head are added by themselves when model.add_special_tokens grows the vocabulary.",
    )


@dataclass
class ModelConfig:
    name_or_path: str | None = setting(
        None, "Local folder (or hub id, when online) of the model to fine-tune.", changes_math=False
    )
    tokenizer_name_or_path: str | None = setting(
        None, "Tokenizer folder or hub id; defaults to model.name_or_path.", changes_math=False
    )
    dtype: str = setting(
        "auto",
        "Compute dtype",
        choices={
            "auto": "bfloat16 where the hardware computes it fast, a CUDA GPU with bf16 or a CPU with AMX, else "
            "float32 (AVX512-BF16 without AMX was slower in bfloat16); the run logs and records which",
            "float32": "",
            "bfloat16": "autocasts the forward pass; trained weights and optimizer state stay float32, and with "
            "use_peft the frozen base weights are loaded in bfloat16",
        },
    )
    attn_implementation: str = setting(
        "sdpa",
        "Attention kernel",
        choices={"eager": "", "sdpa": "", "flash_attention_2": "CUDA only"},
        changes_math=False,
    )
    attention_float32: bool | None = setting(
        None,
        "Under bfloat16 or float16, compute sdpa attention in float32 (queries, keys and values upcast, the output "
        "cast back): a more precise softmax, and faster where the device's low-precision attention kernel is slow. "
        "null: on for sdpa on a CPU without AMX tiles (its bfloat16 attention about 2x slower than float32's; SmolLM2 "
        "trained 1.08-1.12x faster in bfloat16, docs/BENCHMARKS.md), off on GPUs and AMX CPUs; the log says why.",
    )
    compile: bool | None = setting(
        None,
        "Compile each decoder layer's training passes with torch.compile (regional: one graph serves every layer; "
        "dynamic shapes, so new sequence lengths reuse it; evaluation and generation stay eager). Costs compilation "
        "time at the first steps and at each new kind of batch (with or without padding, one row or several): tens "
        "of seconds each on CPU, so it pays off only on long runs. Needs a C++ compiler on CPU (g++, or $CXX), "
        "Triton on CUDA. null: on where it was measured to win, a CPU with AMX in bfloat16 for runs of 200 steps or more "
        "(the log says why, either way).",
        changes_math=False,
    )
    batch_size: int = setting(
        8,
        "Global batch per optimizer step, in examples (pairs for paired losses, packed rows with data.packing), summed over processes and accumulation.",
    )
    eval_batch_size: int = setting(8, "Global batch for evaluation, in examples.", changes_math=False)
    gradient_accumulation_steps: int = setting(
        1, "Micro-batches accumulated per optimizer step on each process.", changes_math=False
    )
    micro_batch_tokens: int | None = setting(
        None,
        "Most tokens one forward pass holds on a process, padding included (items x the longest): a micro-batch "
        "over it runs as several passes of the same optimizer step (the same examples, so the same gradient), so "
        "peak memory follows this budget, not which long examples meet. null: the data's mean micro-batch plus a "
        "quarter, at least its longest item.",
        changes_math=False,
    )
    max_length: int = setting(512, "Maximum tokens per example (prompt + response); longer examples are truncated.")
    max_grad_norm: float | None = setting(
        1.0, "Clip the global gradient L2 norm to this value; null disables clipping."
    )
    gradient_checkpointing: bool = setting(
        False, "Recompute activations in the backward pass: less memory, ~30% slower.", changes_math=False
    )
    head_loss: str = setting(
        "logits",
        "How the SFT and pretraining loss goes from the final hidden states to token losses",
        choices={
            "logits": "the model's head returns the supervised positions' logits, then a chunked float32 "
            "cross-entropy: (supervised tokens x vocab) logits and their gradient exist whole",
            "fused": "a fused linear cross-entropy: hidden states in, loss out, the head's logits one chunk at a "
            "time with their gradients taken in the forward pass (liger-kernel on CUDA when installed, "
            "pip install .[gpu]); not under FSDP",
        },
        changes_math=False,
    )
    trust_remote_code: bool = setting(
        False, "Allow model code shipped with the checkpoint to run. Off unless you trust it."
    )
    add_special_tokens: list[str] = setting(
        [],
        "Special tokens added to the tokenizer, e.g. ['<tool_call>','</tool_call>']: the embeddings (and head) grow "
        "by their new rows, which are trained (under LoRA through peft.modules_to_save) and saved with FINAL/.",
    )
    use_peft: bool = setting(False, "Train LoRA adapters (through PEFT) instead of every weight.")
    quantization: str = setting(
        "none",
        "The frozen base under LoRA, loaded quantized by bitsandbytes (QLoRA; needs use_peft, e.g. method=qlora)",
        choices=QUANTIZATIONS,
    )
    double_quantization: bool | None = setting(
        None,
        "4-bit bases: quantize the per-block scales too (about 0.37 bits per weight saved, QLoRA's setting); null: "
        "true for nf4 and fp4; int8 has no such option.",
    )
    quantization_compute_dtype: str = setting(
        "auto",
        "4-bit bases: the dtype weights are dequantized to for each matmul",
        choices={"auto": "model.dtype", "float32": "", "bfloat16": "", "float16": ""},
    )
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
        f"Row format: auto (detected from each row's columns) | {' | '.join(FORMAT_NAMES[1:])} "
        "(see train/data/formats.py).",
    )
    train_on: str = setting(
        "assistant",
        "Supervised tokens",
        choices={
            "assistant": "every assistant turn",
            "last_assistant": "the last assistant turn",
            "all": "every token",
        },
    )
    chat_template: str | None = setting(
        None,
        f"Chat template for a tokenizer that has none (or to replace its own): a built-in one "
        f"({' | '.join(CHAT_TEMPLATES)}) or the path of a Jinja file; set on the tokenizer before tokenizing and saved "
        f"with the model. null: the tokenizer's own.",
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
        "Examples longer than model.max_length",
        choices={
            "truncate": "cut the prompt from the left first, then the response's end",
            "drop": "skip, counted",
            "error": "",
        },
    )
    on_bad_row: str = setting(
        "error",
        "A malformed row",
        choices={"error": "stop, naming file, row and field", "skip": "counted, reported"},
    )
    num_proc: int = setting(
        1,
        "Processes tokenizing in parallel when preprocessing (shards of rows; the cache is the same either way).",
        changes_math=False,
    )
    num_workers: int = setting(
        1,
        "Data loader processes per training process that gather and collate the next steps' batches while the "
        "current step computes; 0: collate in the training process.",
        changes_math=False,
    )
    cache_preprocessing: bool = setting(
        True, "Reuse tokenized data cached under ${cache_dir}/preprocessed/ when inputs match.", changes_math=False
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
        """Checks of this loss's own settings that `choices` cannot say (ranges, rules between them); a subclass
        with such settings adds its own. A setting declared with `choices` is checked by validation already."""
        return []


@dataclass
class OptimizerConfig:
    name: str = setting("adamw_fused", "The optimizer", choices=OPTIMIZERS)
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
    mode: str | None = setting(
        None,
        "Weights & Biases mode",
        choices={None: "follows WANDB_MODE, online if unset", "online": "", "offline": "", "disabled": ""},
    )


@dataclass
class TensorboardConfig:
    enabled: bool = setting(False, "Write TensorBoard event files under the run directory.")


@dataclass
class BenchmarksConfig:
    """Benchmark evaluation through lm-evaluation-harness during training (train/loop/benchmarks.py)."""

    tasks: list[str] = setting(
        [],
        "lm-evaluation-harness tasks, groups or tags to evaluate the model on (`.venv/bin/lm_eval ls tasks`, or your "
        "own task YAMLs under benchmarks.include_path); logged as bench/<task>/<metric>. Empty: no benchmarks.",
    )
    every_steps: int | None = setting(
        None,
        "Evaluate the benchmarks before training and every this many optimizer steps; always on the final model. "
        "Null: on the final model only.",
    )
    limit_per_task: int | None = setting(
        None, "Examples evaluated per task (the first ones of its test split), for quick checks; null: all."
    )
    num_fewshot: int | None = setting(None, "Few-shot examples in each prompt; null: each task's own default (or 0).")
    batch_size: int = setting(8, "Sequences per forward pass of the benchmark evaluation, on each process.")
    include_path: str | None = setting(
        None, "A folder of your own task YAML files (local JSON/JSONL data named in them); they override built-ins."
    )
    apply_chat_template: bool = setting(
        False,
        "Render each prompt with the tokenizer's chat template, as a user turn the answer follows (as `lm_eval "
        "--apply_chat_template`): how a chat model is used. false: plain text, the harness's default.",
    )


SWEEP_OBJECTIVES = {  # what sweep.objective may name besides a benchmark metric
    "loss/eval": "the final eval loss (the final train loss when there is no eval data)",
    "loss/train": "the final train loss",
}


@dataclass
class SweepConfig:
    objective: str = setting(
        "loss/eval",
        "What a sweep's best job and the Optuna search optimize, read from each job's summary.json: loss/eval (the "
        "final train loss when there is no eval data), loss/train, or a metric of benchmarks.tasks such as "
        "bench/<task>/acc.",
    )
    direction: str = setting(
        "minimize",
        "Whether sweep.objective is better low or high (it sets the Optuna sweeper's direction too)",
        choices=["minimize", "maximize"],
    )


@dataclass
class Config:
    exp_name: str = setting("default", "Name of the run; its files go to ${cache_dir}/${exp_name}.", changes_math=False)
    seed: int = setting(0, "Seed for data order, initialization and dropout.")
    cache_dir: str = setting("runs", "Folder that holds run directories.", changes_math=False)
    run_dir: str = setting(
        "${cache_dir}/${exp_name}", "Where this run writes config.yaml, metrics.jsonl and FINAL/.", changes_math=False
    )
    datasets: list[str] = setting([], "Training data: .json/.jsonl/.parquet/.csv files, save_to_disk folders or names.")
    eval_datasets: list[str] = setting(
        [], "Held-out data evaluated every eval_every_steps; empty disables evaluation.", changes_math=False
    )
    n_epochs: int = setting(1, "Passes over the training data.")
    max_steps: int | None = setting(
        None, "Stop after this many optimizer steps (caps n_epochs); null runs every epoch."
    )
    lr: float = setting(1e-5, "Peak learning rate (reached after warmup); see the README for values by method.")
    lr_scheduler: str = setting("cosine", "Decay after warmup", choices=SCHEDULERS)
    min_lr_ratio: float = setting(0.0, "Floor of the schedule, as a fraction of lr (cosine, linear, WSD).")
    lr_decay_ratio: float = setting(0.1, "warmup_stable_decay: fraction of the steps, at the end, spent decaying.")
    warmup_ratio: float = setting(0.1, "Fraction of the optimizer steps spent in linear warmup (see warmup_steps).")
    warmup_steps: int | None = setting(None, "Warmup length in optimizer steps; when set, replaces warmup_ratio.")
    weight_decay: float = setting(0.0, "Decoupled weight decay, applied to matrices only (not to biases or norms).")
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig, metadata={"help": "The optimizer."})
    eval_every_steps: int = setting(
        100, "Evaluate every this many optimizer steps (and before the first, and at the end).", changes_math=False
    )
    log_every_steps: int | None = setting(
        None,
        "Write a metrics line every this many optimizer steps (and at the last step); null: about 50 lines per run "
        "(every max(1, total steps // 50) steps), so short runs plot a curve too.",
        changes_math=False,
    )
    profile_steps: int = setting(
        0,
        "Profile this many optimizer steps from step 2: each step's time by phase (data wait, copy to the device, "
        "forward, reference model, loss, backward, reduction, clipping, optimizer, logging), the device synced at each "
        "boundary, and torch.profiler's top operators, in profile.md and summary.json, with a Chrome trace in "
        "profile_trace.json; 0: off.",
        changes_math=False,
    )
    eval_samples: int = setting(
        0, "At each evaluation, generate answers to this many held-out prompts (samples.jsonl).", changes_math=False
    )
    eval_samples_max_new_tokens: int = setting(
        64, "Longest generated answer for eval_samples, in tokens.", changes_math=False
    )
    eval_reward_model: str | None = setting(
        None,
        "A reward model folder (a loss=rm run's FINAL/) that scores the eval_samples answers at each evaluation, "
        "each prompt and answer rendered with its own chat template: the mean is logged as samples/reward, each "
        "answer's reward goes into samples.jsonl. Needs eval_samples > 0 and eval_datasets; null: no scoring.",
        changes_math=False,
    )
    peak_flops_per_second: float | None = setting(
        None,
        "Peak FLOP/s per process for mfu; null: the GPU's datasheet bf16 rate, or a matmul rate measured on CPU.",
        changes_math=False,
    )
    save_every_steps: int | None = setting(
        None, "Write a resumable checkpoint ${run_dir}/step-<N>/ every this many steps; null: none.", changes_math=False
    )
    save_total_limit: int | None = setting(
        None, "Keep only the newest this many step checkpoints; null keeps all.", changes_math=False
    )
    save_merged: str = setting(
        "adapter",
        "LoRA runs, what FINAL/ holds",
        choices={
            "adapter": "the PEFT adapter only, megabytes; merge later with scripts/merge_lora.py",
            "merged": "the merged model",
            "both": "merged, and the adapter in FINAL/adapter/",
        },
        changes_math=False,
    )
    save_dtype: str = setting(
        "auto",
        "Dtype of FINAL/'s weights (a full or merged model; a LoRA adapter stays float32)",
        choices={
            "auto": "the dtype model.name_or_path's config.json says its weights are stored in, as transformers "
            "saves; float32 if it says none",
            "float32": "",
            "bfloat16": "",
            "float16": "",
        },
        changes_math=False,
    )
    resume_from_checkpoint: str | None = setting(
        None,
        "auto: continue from this run's newest complete checkpoint (or start fresh if none); or a checkpoint path.",
        changes_math=False,
    )
    overwrite_run: bool = setting(
        False,
        "Start over in a run directory that already holds a run (its checkpoints, metrics and FINAL/ are deleted "
        "first). false: such a run is refused, saying how to continue it (resume_from_checkpoint=auto).",
        changes_math=False,
    )
    resume_allow_config_change: bool = setting(
        False,
        "Resume even if settings that change the math (lr, batch, data...) differ. Where, how often and how the "
        "run logs, saves, evaluates and reports, how a step's examples split into passes (model.micro_batch_tokens, "
        "model.gradient_accumulation_steps) and which kernels compute them may change on any resume.",
        changes_math=False,
    )
    on_nonfinite: str = setting(
        "stop",
        "A step with a NaN/inf loss or gradient",
        choices={"stop": "exit 2", "skip": "no update, counted"},
        changes_math=False,
    )
    keep_freed_host_memory: bool = setting(
        True,
        "CPU training on Linux (glibc): memory freed by a step stays in the process for the next step's tensors "
        "instead of going back to the system and being faulted in again (malloc: no trimming, no mmap). Measured on "
        "SmolLM2 on a 2-core CPU: 12-43% more tokens/s in float32, 3-13% in bfloat16, at a peak up to 26% higher "
        "(docs/BENCHMARKS.md). GPU runs are left alone.",
        changes_math=False,
    )
    memory_check: str = setting(
        "error",
        "Before anything loads, the run's peak memory per process is estimated from the model's config "
        "(train/app/memory_plan.py) and compared with the device's",
        choices={
            "error": "a run that clearly does not fit (above 1.25x the device's memory) is refused, naming the "
            "settings that would fit",
            "warn": "it is logged with that advice, and the run starts anyway",
        },
        changes_math=False,
    )
    verbose: bool = setting(
        False,
        "Print every metric in each progress line (not only step, loss, lr, tokens/s, time left), and let the "
        "libraries' warnings, info logs and progress bars (loading, saving) through.",
        changes_math=False,
    )
    accelerate_config: str | None = setting(
        None,
        "An accelerate config file (e.g. accelerate_config/fsdp_8gpu.yaml): `python launch.py` runs the job's "
        "processes through `accelerate launch --config_file <this>` (each job of a sweep, on its SLURM node); null: "
        "train in this process.",
        changes_math=False,
    )
    loss: LossConfig = field(default_factory=LossConfig, metadata={"help": "The loss; chosen with loss=<name>."})
    model: ModelConfig = field(default_factory=ModelConfig, metadata={"help": "The model; chosen with model=<name>."})
    data: DataConfig = field(default_factory=DataConfig, metadata={"help": "How rows of the data files are read."})
    reference: ReferenceConfig = field(default_factory=ReferenceConfig, metadata={"help": "The reference model."})
    wandb: WandbConfig = field(
        default_factory=WandbConfig, metadata={"help": "Weights & Biases logging.", CHANGES_MATH: False}
    )
    tensorboard: TensorboardConfig = field(
        default_factory=TensorboardConfig, metadata={"help": "TensorBoard logging.", CHANGES_MATH: False}
    )
    benchmarks: BenchmarksConfig = field(
        default_factory=BenchmarksConfig,
        metadata={"help": "Benchmark evaluation with lm-evaluation-harness.", CHANGES_MATH: False},
    )
    sweep: SweepConfig = field(
        default_factory=SweepConfig,
        metadata={"help": "What a sweep's best job and the Optuna search optimize.", CHANGES_MATH: False},
    )


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
    return set(leaf_paths(OmegaConf.structured(Config)))


def leaf_paths(node: DictConfig, prefix: str = "") -> list[str]:
    """Every dotted key of a config node, nested sections walked."""
    paths = []
    for key in node:
        child = node._get_node(key)
        path = f"{prefix}{key}"
        paths += leaf_paths(child, path + ".") if isinstance(child, DictConfig) else [path]
    return paths
