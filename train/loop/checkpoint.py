"""Step checkpoints: everything needed to continue a run exactly, written atomically, read without pickle.

`${run_dir}/step-<N>/` holds:
- `model/`: a Hugging Face folder (safetensors; with LoRA, the adapter only), written by the main process; under
  FSDP instead `model-rank<r>.safetensors`, each process's shard.
- `optimizer-rank<r>.safetensors` + `optimizer.json`: the optimizer's state (AdamW moments, Adafactor's factored
  second moments and step count) (per shard under FSDP; rank 0's copy otherwise).
- `scheduler.json`, `trainer_state.json` (step, epoch, counters, tracker run id, world size), `rng-rank<r>.json`
  (every process's Python, NumPy and torch RNG states), and `config.yaml` (the resolved config).

The data position is the step itself: the order of an epoch is a pure function of (seed, epoch), so a resumed run
jumps to it instead of replaying consumed batches.

Atomicity: files go to `step-<N>.partial/`, which the main process renames to `step-<N>/` once every process has
finished; then the `latest` pointer file is replaced (os.replace is atomic). A crash at any point leaves the previous
checkpoint and pointer intact. Everything is safetensors or JSON: loading never unpickles.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import logging
import os
import random
import shutil
import signal
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from train import files
from train.app.serialize import flatten
from train.errors import HalyardError
from train.loop.distributed import full_state_dict, is_sharded, unsharded_copy
from train.loop.faults import fault_at

# The files of a run directory, named in train/loop/run_files.py (torch-free: the sweep's table reads them too); the trainer
# and the tests read them as checkpoint.<NAME>.
from train.loop.run_files import (  # noqa: F401
    CONFIG_FILE,
    FINAL_CONFIG_FILE,
    FINAL_DIR,
    LATEST,
    LAUNCH_FILES,
    METRICS_FILE,
    MODEL_CARD_FILE,
    PREFIX,
    SAMPLES_FILE,
    STATE_FILE,
    SUMMARY_FILE,
)

logger = logging.getLogger(__name__)


@dataclass
class TrainerState:
    """trainer_state.json: where a run stands. Written last into a checkpoint, so its presence marks it complete."""

    step: int  # optimizer steps completed
    epoch: int
    world_size: int
    sharded: bool
    use_peft: bool
    skipped_steps: int
    throughput: dict
    summary: dict
    data_fingerprint: str
    wandb_run_id: str | None = None


@dataclass
class TrainingParts:
    """What a checkpoint saves and restores besides the state (the model as prepared: wrapped or sharded)."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    tokenizer: object


def checkpoint_name(step: int) -> str:
    return f"{PREFIX}{step}"


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """Complete step checkpoints of a run, oldest first."""
    found = [
        p
        for p in run_dir.glob(f"{PREFIX}*")
        if p.is_dir() and p.name[len(PREFIX) :].isdigit() and (p / STATE_FILE).exists()
    ]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX) :]))


def find_latest(run_dir: Path) -> Path | None:
    """The checkpoint the `latest` pointer names; the newest complete one if the pointer is missing or stale."""
    pointer = run_dir / LATEST
    if pointer.exists():
        named = run_dir / pointer.read_text().strip()
        if (named / STATE_FILE).exists():
            return named
    checkpoints = complete_checkpoints(run_dir)
    return checkpoints[-1] if checkpoints else None


def resolve_resume(setting: str | None, run_dir: Path) -> Path | None:
    """`resume_from_checkpoint`: null (fresh start), `auto` (newest of this run, or fresh) or a checkpoint path."""
    if not setting:
        return None
    if setting == "auto":
        return find_latest(run_dir)
    path = Path(setting)
    if not (path / STATE_FILE).exists():
        raise HalyardError(f"resume_from_checkpoint={setting}: not a complete checkpoint (no {STATE_FILE} in it)")
    return path


def earlier_run_files(run_dir: Path) -> list[Path]:
    """What an earlier run left in `run_dir` (checkpoints, metrics, FINAL/...); the files this launch wrote into it
    before the run (Hydra's, a sweep job's record) aside."""
    if not run_dir.is_dir():
        return []
    return sorted(p for p in run_dir.iterdir() if p.name not in LAUNCH_FILES)


def belongs_to(checkpoint: Path, run_dir: Path) -> bool:
    """Whether `checkpoint` (a step-<N>/ folder) is one of `run_dir`'s own."""
    return checkpoint.resolve().parent == run_dir.resolve()


def refuse_to_overwrite(run_dir: Path, resume_dir: Path | None, resume_setting: str | None) -> None:
    """A run never overwrites another run's results: starting fresh (or from another run's checkpoint) in a folder
    that holds a run is refused with the ways out. `auto` declares the folder this run's own."""
    continuing = resume_setting == "auto" or (resume_dir is not None and belongs_to(resume_dir, run_dir))
    found = earlier_run_files(run_dir)
    if continuing or not found:
        return
    names = ", ".join(p.name + ("/" if p.is_dir() else "") for p in found[:6]) + (", ..." if len(found) > 6 else "")
    latest = find_latest(run_dir)
    ways = [f"continue it from {latest.name} with resume_from_checkpoint=auto"] if latest else []
    ways += ["name this run differently (exp_name=...)", "start over on purpose with overwrite_run=true (deletes them)"]
    raise HalyardError(f"{run_dir} already holds a run ({names}); this run would overwrite it. " + "; or ".join(ways))


def remove_earlier_run(run_dir: Path) -> None:
    """overwrite_run=true: delete what an earlier run left in `run_dir` (main process only)."""
    for path in earlier_run_files(run_dir):
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    logger.info(f"overwrite_run=true: removed the earlier run's files from {run_dir}")


def read_state(checkpoint: Path) -> TrainerState:
    return TrainerState(**json.loads((checkpoint / STATE_FILE).read_text()))


def config_differences(saved_yaml: str, current: dict[str, object], may_change: Collection[str]) -> list[str]:
    """Differences between a checkpoint's config and the current one (dotted keys), but in the keys that
    `may_change` (train/app/config.py: keys_that_keep_the_math)."""
    saved = flatten(OmegaConf.to_container(OmegaConf.create(saved_yaml)))
    keys = sorted((set(saved) | set(current)) - set(may_change))
    return [
        f"{key}: {saved.get(key, '(unset)')} -> {current.get(key, '(unset)')}"
        for key in keys
        if str(saved.get(key)) != str(current.get(key))
    ]


def check_disk_space(run_dir: Path, model) -> None:
    """Refuse to start when the disk cannot hold a checkpoint (weights + two AdamW moments per trained weight)."""
    params = list(model.parameters())
    trained = sum(p.numel() * 4 for p in params if p.requires_grad)
    needed = 2 * trained + sum(p.numel() * p.element_size() for p in params)
    free = shutil.disk_usage(run_dir).free
    if free < 1.2 * needed:
        raise HalyardError(
            f"not enough free disk for checkpoints in {run_dir}: one needs about {needed / 1e9:.2f} GB, "
            f"{free / 1e9:.2f} GB are free. Free some space or set cache_dir to a larger disk."
        )


def save_rng_state(directory: Path, rank: int) -> None:
    state = {
        "python": _to_json(random.getstate()),
        "numpy": _to_json(np.random.get_state()),
        "torch": torch.get_rng_state().tolist(),
        "cuda": [s.tolist() for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else [],
    }
    (directory / f"rng-rank{rank}.json").write_text(json.dumps(state))


def load_rng_state(directory: Path, rank: int) -> None:
    state = json.loads((directory / f"rng-rank{rank}.json").read_text())
    random.setstate(_python_rng(state["python"]))
    numpy_state = state["numpy"]
    np.random.set_state((numpy_state[0], np.array(numpy_state[1], dtype=np.uint32), *numpy_state[2:]))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


def _to_json(value):
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, tuple | list):
        return [_to_json(v) for v in value]
    return value


def _python_rng(value) -> tuple:
    version, internal, gauss = value
    return version, tuple(internal), gauss


def save_optimizer(optimizer, directory: Path, rank: int) -> None:
    """AdamW moments as safetensors (this process's shards when sharded), its hyperparameters as JSON."""
    state = optimizer.state_dict()
    tensors = {
        f"{index}.{name}": _local(value).contiguous().cpu()
        for index, param_state in state["state"].items()
        for name, value in param_state.items()
        if torch.is_tensor(value)
    }
    # Plain numbers in the state (Adafactor's step count) go in the file's metadata: they are per parameter too.
    scalars = {
        f"{index}.{name}": value
        for index, param_state in state["state"].items()
        for name, value in param_state.items()
        if isinstance(value, int | float)
    }
    save_file(tensors, str(directory / f"optimizer-rank{rank}.safetensors"), metadata={"scalars": json.dumps(scalars)})
    if rank == 0:
        (directory / "optimizer.json").write_text(json.dumps({"param_groups": state["param_groups"]}))


def load_optimizer(optimizer, directory: Path, rank: int, sharded: bool) -> None:
    from torch.distributed.tensor import DTensor

    source = directory / f"optimizer-rank{rank if sharded else 0}.safetensors"
    params = [p for group in optimizer.param_groups for p in group["params"]]
    state: dict[int, dict[str, torch.Tensor | float]] = {}
    with safe_open(str(source), framework="pt") as opened:
        scalars = json.loads((opened.metadata() or {}).get("scalars", "{}"))
    for key, value in scalars.items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    for key, tensor in load_file(str(source)).items():
        index, name = key.split(".", 1)
        param = params[int(index)]
        if isinstance(param, DTensor) and tensor.dim() > 0:
            tensor = DTensor.from_local(
                tensor.to(param.device), param.device_mesh, param.placements, shape=param.shape, stride=param.stride()
            )
        state.setdefault(int(index), {})[name] = tensor
    groups = json.loads((directory / "optimizer.json").read_text())["param_groups"]
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def save_sharded_model(model: torch.nn.Module, directory: Path, rank: int) -> None:
    tensors = {name: _local(value).contiguous().cpu() for name, value in model.state_dict().items()}
    save_file(tensors, str(directory / f"model-rank{rank}.safetensors"))


def load_sharded_model(model: torch.nn.Module, directory: Path, rank: int) -> None:
    from torch.distributed.tensor import DTensor

    loaded = load_file(str(directory / f"model-rank{rank}.safetensors"))
    with torch.no_grad():
        for name, value in model.state_dict().items():
            target = value.to_local() if isinstance(value, DTensor) else value
            target.copy_(loaded[name])


def load_model_folder(model: torch.nn.Module, folder: Path, adapter: bool) -> None:
    """Load weights written by save_pretrained (all safetensors files of the folder) into `model`."""
    state: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        state.update(load_file(str(file)))
    if adapter:
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(model, state)
        # Embeddings grown by model.add_special_tokens are saved by PEFT a second time (save_embedding_layers), the
        # trained copy also under `<module>.modules_to_save.weight`, a key its loader does not expect: it loads
        # that copy from `<module>.weight`.
        unexpected = [key for key in result.unexpected_keys if not key.endswith(".modules_to_save.weight")]
        if unexpected:
            raise HalyardError(f"checkpoint {folder} has adapter weights this model lacks: {unexpected[:5]}")
        return
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = _tied_parameter_names(model)
    if unexpected or set(missing) - tied:
        raise HalyardError(
            f"checkpoint {folder} does not match the model (missing {sorted(set(missing) - tied)[:5]}, unexpected {unexpected[:5]})"
        )


def _tied_parameter_names(model: torch.nn.Module) -> set[str]:
    """Names of parameters that share storage with another (save_pretrained writes only one of them)."""
    seen: dict[int, str] = {}
    tied = set()
    for name, tensor in model.state_dict(keep_vars=True).items():
        pointer = tensor.data_ptr()
        if pointer in seen:
            tied |= {name, seen[pointer]}
        seen[pointer] = name
    return tied


def _local(value: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return value.to_local() if isinstance(value, DTensor) else value


def finish(partial: Path, final: Path, run_dir: Path, keep: int | None) -> None:
    """Main process, after every process wrote into `partial`: publish it, move the pointer, prune old ones."""
    files.publish(partial, final)
    files.write_text_atomically(run_dir / LATEST, final.name + "\n")
    if keep:
        for old in complete_checkpoints(run_dir)[:-keep]:
            if old != final:
                shutil.rmtree(old, ignore_errors=True)


def remove_partials(run_dir: Path) -> None:
    """Leftovers of a save that was interrupted: never complete, never used."""
    for partial in run_dir.glob(f"{PREFIX}*{files.PARTIAL}"):
        shutil.rmtree(partial, ignore_errors=True)


# ---- saving and loading, on every process ----


def save_checkpoint(accelerator, parts: TrainingParts, state: TrainerState, run_dir: Path, config_text: str,
                    keep: int | None) -> Path:  # fmt: skip
    """Write ${run_dir}/step-<N>/ atomically; every process takes part. A failure on any process leaves the
    previous checkpoint as `latest` and raises."""
    final = run_dir / checkpoint_name(state.step)
    partial = files.partial_of(final)
    main = accelerator.is_main_process
    if main:
        remove_partials(run_dir)
        partial.mkdir(parents=True)
    accelerator.wait_for_everyone()
    error = None
    try:
        _write_checkpoint_files(partial, accelerator, parts, state, config_text)
    except OSError as caught:
        error = caught
    failures = accelerator.reduce(torch.tensor(float(error is not None), device=accelerator.device), "sum")
    if failures.item() > 0:
        if main:
            shutil.rmtree(partial, ignore_errors=True)
        latest = find_latest(run_dir)
        reason = f" ({error.strerror or error})" if error else " (on another process)"
        intact = f"the previous checkpoint {latest.name} is intact" if latest else "no earlier checkpoint exists"
        raise HalyardError(
            f"could not write checkpoint {final.name}{reason}; {intact}. Free disk space in {run_dir} or set "
            f"cache_dir to another disk, then resume_from_checkpoint=auto."
        )
    if main:
        finish(partial, final, run_dir, keep)
        logger.info(f"checkpoint {final}")
    accelerator.wait_for_everyone()
    return final


def _write_checkpoint_files(directory: Path, accelerator, parts: TrainingParts, state: TrainerState,
                            config_text: str) -> None:  # fmt: skip
    rank, main = accelerator.process_index, accelerator.is_main_process
    model = accelerator.unwrap_model(parts.model)
    if state.sharded:
        save_sharded_model(model, directory, rank)
    elif main:
        model.save_pretrained(directory / "model", safe_serialization=True)  # with LoRA: the adapter only
        parts.tokenizer.save_pretrained(directory / "model")  # so scripts/generate.py can chat with it
    if state.sharded or main:
        save_optimizer(parts.optimizer, directory, rank)
    save_rng_state(directory, rank)
    if main:
        (directory / "scheduler.json").write_text(json.dumps(parts.scheduler.state_dict()))
        (directory / CONFIG_FILE).write_text(config_text)
        if fault_at("enospc_in_save", state.step):
            raise OSError(errno.ENOSPC, "No space left on device (injected)")
        if fault_at("kill_in_save", state.step):
            os.kill(os.getpid(), signal.SIGKILL)
        (directory / STATE_FILE).write_text(json.dumps(dataclasses.asdict(state)))  # written last


def load_checkpoint(directory: Path, run_dir: Path, accelerator, parts: TrainingParts, data_fingerprint: str,
                    allow_data_change: bool) -> TrainerState:  # fmt: skip
    """Restore model, optimizer, scheduler and RNG from a step checkpoint on every process; return its state.
    `run_dir` is the run being written: its logged metrics and samples continue from the checkpoint's step.

    Refuses a checkpoint written with another process layout under FSDP, or on other training data."""
    state = read_state(directory)
    model = accelerator.unwrap_model(parts.model)
    sharded, world, rank = is_sharded(model), accelerator.num_processes, accelerator.process_index
    if state.sharded != sharded or (sharded and state.world_size != world):
        raise HalyardError(
            f"{directory} was written by {state.world_size} process(es) {'with' if state.sharded else 'without'} "
            f"FSDP; resume it the same way (now {world} process(es) {'with' if sharded else 'without'} FSDP)"
        )
    if state.data_fingerprint != data_fingerprint and not allow_data_change:
        raise HalyardError(
            f"the tokenized training data differs from the data {directory} was trained on; resuming would not "
            f"continue the same run. Restore the data, or set resume_allow_config_change=true."
        )
    if sharded:
        load_sharded_model(model, directory, rank)
    else:
        load_model_folder(model, directory / "model", adapter=state.use_peft)
    load_optimizer(parts.optimizer, directory, rank, sharded)
    parts.scheduler.load_state_dict(json.loads((directory / "scheduler.json").read_text()))
    load_rng_state(directory, rank % state.world_size)
    if accelerator.is_main_process:
        continue_logs(directory, run_dir, state.step)
    logger.info(f"resumed from {directory} at step {state.step}")
    return state


def continue_logs(checkpoint: Path, run_dir: Path, step: int) -> None:
    """The logged metrics and samples of `run_dir` up to `step`, where a resumed run continues them. Resumed in its
    own folder, the lines after `step` are dropped (they are about to be written again); resumed into a new folder,
    the checkpoint's run's lines up to `step` are copied, so the new run's curves and summary are whole. The
    checkpoint's run is only read: nothing a run does changes another run's folder."""
    source_run, same_run = checkpoint.parent, belongs_to(checkpoint, run_dir)
    for name in (METRICS_FILE, SAMPLES_FILE):
        if (source_run / name).exists():
            kept = logged_until(source_run / name, step)
            files.write_text_atomically(run_dir / name, "".join(line + "\n" for line in kept))
    if not same_run:
        logger.info(f"resumed into a new folder: metrics and samples up to step {step} copied from {source_run}")


def is_quantized(model: torch.nn.Module) -> bool:
    """Whether the (PEFT-wrapped) model's base was loaded quantized by bitsandbytes (model.quantization)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return bool(getattr(base, "is_loaded_in_4bit", False) or getattr(base, "is_loaded_in_8bit", False))


def unquantized_copy(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """The trained adapters of a QLoRA model over its base loaded again unquantized, in `dtype`, to merge into.
    Merging into the quantized base would round every merged weight to 4 (or 8) bits again, so the merged model
    would not be the one trained: the adapters learned on the dequantized weights, which the 16-bit base is closest
    to. The base comes from the folder PEFT recorded (model.name_or_path); its embeddings grow as training grew them
    (model.add_special_tokens)."""
    from peft import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    peft_config = model.peft_config["default"]
    trained = model.get_base_model()
    auto_class = AutoModelForSequenceClassification if peft_config.task_type == "SEQ_CLS" else AutoModelForCausalLM
    score_head = peft_config.task_type == "SEQ_CLS"  # a reward model: its score head's shape and padding token
    options = (
        {"num_labels": trained.config.num_labels, "pad_token_id": trained.config.pad_token_id} if score_head else {}
    )
    logger.info(
        f"merging the adapters into {peft_config.base_model_name_or_path} loaded again in {str(dtype).removeprefix('torch.')} (not into the "
        f"quantized base, whose weights would be rounded to {'8' if getattr(trained, 'is_loaded_in_8bit', False) else '4'} bits again)"
    )
    base = auto_class.from_pretrained(
        peft_config.base_model_name_or_path,
        dtype=dtype,
        trust_remote_code=bool(getattr(trained.config, "auto_map", None)),  # trusted already: it trained
        **options,
    )
    rows = trained.get_input_embeddings().weight.shape[0]
    if base.get_input_embeddings().weight.shape[0] != rows:
        base.resize_token_embeddings(rows)
    copy = get_peft_model(base, peft_config)
    set_peft_model_state_dict(copy, get_peft_model_state_dict(model))
    if getattr(trained, "generation_config", None) is not None:  # a causal LM's (a reward model has none)
        copy.generation_config = trained.generation_config
    return copy


def logged_until(path: Path, step: int) -> list[str]:
    """The JSON lines of a metrics or samples file logged at or before `step`."""
    return [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= step]


def save_final(accelerator, model, tokenizer, run_dir: Path, config_text: str, use_peft: bool,
               save_merged: str = "adapter", card: str | None = None,
               dtype: torch.dtype = torch.float32) -> Path | None:  # fmt: skip
    """Write ${run_dir}/FINAL/: a Hugging Face folder with the tokenizer, the config and the model card, published
    atomically. Under LoRA, `save_merged` chooses what it holds: `adapter` (the PEFT adapter, loadable with
    peft's AutoPeftModelForCausalLM), `merged` (the merged model) or `both` (merged, and the adapter in
    FINAL/adapter/). A full or merged model is written in `dtype` (an adapter in float32, as trained). Every process
    takes part (a sharded model is gathered); returns the folder on the main process.

    The model is cast (and merged) in place: saving FINAL/ is the last use of the trained model."""
    accelerator.wait_for_everyone()
    model = accelerator.unwrap_model(model)
    if is_sharded(model):
        state_dict = full_state_dict(model)  # every process takes part in gathering the shards
        model = unsharded_copy(model, state_dict) if accelerator.is_main_process else None
    if not accelerator.is_main_process:
        return None
    final = run_dir / FINAL_DIR
    partial = files.partial_of(final)
    shutil.rmtree(partial, ignore_errors=True)
    adapter_only = use_peft and save_merged == "adapter"
    if use_peft and save_merged in ("adapter", "both"):
        adapter_dir = partial if adapter_only else partial / "adapter"
        model.save_pretrained(adapter_dir)
        tokenizer.save_pretrained(adapter_dir)
    if not adapter_only:
        if use_peft and is_quantized(model):
            model = unquantized_copy(model, dtype)
        if use_peft:
            model = model.merge_and_unload()
        model.to(dtype)  # in place, not a copy: a second copy of a large model would not fit where the first did
        model.config.use_cache = True  # for whoever generates with it
        model.save_pretrained(partial, safe_serialization=True)
        tokenizer.save_pretrained(partial)
    (partial / FINAL_CONFIG_FILE).write_text(config_text)
    if card is not None:
        (partial / MODEL_CARD_FILE).write_text(card)
    files.publish(partial, final)
    logger.info(f"saved {final.resolve()}")
    if adapter_only:
        size = sum(f.stat().st_size for f in final.iterdir() if f.is_file()) / 2**20
        logger.info(
            f"FINAL/ holds the LoRA adapter ({size:.1f} MB), not a merged model; load it with peft's "
            f"AutoPeftModelForCausalLM (scripts/generate.py does), or write a merged model with "
            f".venv/bin/python scripts/merge_lora.py BASE {final} OUT (or train with save_merged=merged or both)"
        )
    return final
