"""How the model is spread over processes: replicated (DDP, through Accelerate) or sharded (FSDP2).

Processes are started by `accelerate launch`. When its config asks for FSDP (`distributed_type: FSDP`,
`fsdp_version: 2`), Halyard shards the model itself with PyTorch's FSDP2 (`fully_shard`), following that config's
`fsdp_config` (which layer classes to wrap, resharding after forward). Accelerate's own FSDP plugin does not run on
CPU (it silently falls back to DDP), so sharding this way is what lets the same code path run, and be tested, on
CPU with gloo and on GPUs with NCCL.

Mixed precision under FSDP is FSDP2's: parameters are all-gathered in bfloat16 for compute, gradients are reduced in
float32, and the sharded master weights and optimizer state stay float32.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass

import torch
from accelerate import Accelerator

from train.errors import HalyardError

logger = logging.getLogger(__name__)


@dataclass
class FsdpSettings:
    layer_class_names: list[str]  # module classes that each become one FSDP unit; empty: the model's _no_split_modules
    reshard_after_forward: bool
    offload_params: bool = False  # sharded parameters, gradients and optimizer state live in CPU memory


def fsdp_settings_from_launcher() -> FsdpSettings | None:
    """The FSDP settings `accelerate launch` passed in its environment, or None when it did not ask for FSDP."""
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() != "true":
        return None
    if os.environ.get("FSDP_VERSION", "1") != "2":
        raise HalyardError(
            "Halyard shards with FSDP2 only: set `fsdp_version: 2` under fsdp_config in your accelerate config"
        )
    names = [n.strip() for n in os.environ.get("FSDP_TRANSFORMER_CLS_TO_WRAP", "").split(",") if n.strip()]
    return FsdpSettings(
        names,
        reshard_after_forward=os.environ.get("FSDP_RESHARD_AFTER_FORWARD", "true").lower() == "true",
        offload_params=os.environ.get("FSDP_OFFLOAD_PARAMS", "false").lower() == "true",  # fsdp_offload_params
    )


def shard_model(model: torch.nn.Module, settings: FsdpSettings, device: torch.device, bf16: bool) -> torch.nn.Module:
    """Apply FSDP2 to each transformer block, then to the whole model (embeddings, final norm, head)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    names = settings.layer_class_names or list(getattr(model, "_no_split_modules", None) or [])
    blocks = decoder_layers(model, names)
    if not blocks:
        raise HalyardError(
            f"FSDP found no module of class {names} to shard in {type(model).__name__}; set "
            f"fsdp_transformer_layer_cls_to_wrap in your accelerate config to the model's decoder layer class"
        )
    mesh = init_device_mesh(device.type, (int(os.environ["WORLD_SIZE"]),))
    policy = (
        MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else MixedPrecisionPolicy()
    )
    # Offload: each process keeps its shard of the parameters, their gradients and so the optimizer state (built on
    # the parameters it is given) in CPU memory; a unit's parameters are copied to the device for its forward and
    # backward only, and the optimizer steps on the CPU. Pinned memory makes those copies asynchronous on a GPU.
    offload = CPUOffloadPolicy(pin_memory=device.type == "cuda") if settings.offload_params else OffloadPolicy()
    kwargs = {
        "mesh": mesh,
        "mp_policy": policy,
        "reshard_after_forward": settings.reshard_after_forward,
        "offload_policy": offload,
    }
    for block in blocks:
        fully_shard(block, **kwargs)
    fully_shard(model, **kwargs)
    where = ", parameters and optimizer state offloaded to CPU memory" if settings.offload_params else ""
    logger.info(f"FSDP2: {len(blocks)} {type(blocks[0]).__name__} blocks sharded over {mesh.size()} processes{where}")
    return model


def decoder_layers(model: torch.nn.Module, class_names: list[str] | None = None) -> list[torch.nn.Module]:
    """The model's repeated blocks, in order: every module whose class is named in `class_names`, by default the
    model's `_no_split_modules` (transformers' decoder layer class, e.g. LlamaDecoderLayer; read through PEFT's
    wrappers). The units FSDP2 shards and model.compile compiles; empty when the model names none."""
    names = class_names or list(getattr(model, "_no_split_modules", None) or [])
    return [module for module in model.modules() if type(module).__name__ in names]


def is_sharded(model: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def local_parameter_fraction(model: torch.nn.Module) -> float:
    """Share of the parameter elements stored on this process: 1.0 replicated, about 1/N sharded over N."""
    from torch.distributed.tensor import DTensor

    local = sum((p.to_local() if isinstance(p, DTensor) else p).numel() for p in model.parameters())
    return local / sum(p.numel() for p in model.parameters())


def no_gradient_sync(accelerator: Accelerator, model: torch.nn.Module):
    """A context in which backward accumulates gradients locally, without communication between processes."""
    if is_sharded(model):
        return _fsdp_no_sync(model)
    return accelerator.no_sync(model)


@contextlib.contextmanager
def _fsdp_no_sync(model):
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def clip_gradients(accelerator: Accelerator, model: torch.nn.Module, max_norm: float) -> float:
    """Clip the global gradient norm (over every process's shard) to max_norm; return the norm before clipping."""
    if not is_sharded(model):
        return float(accelerator.clip_grad_norm_(model.parameters(), max_norm))
    from torch.distributed.tensor import DTensor

    norm = torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], max_norm)
    return float(norm.full_tensor() if isinstance(norm, DTensor) else norm)


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The complete state dict on CPU, gathered from every shard. Call on every process (it communicates)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def unsharded_copy(model: torch.nn.Module, state_dict: dict[str, torch.Tensor]) -> torch.nn.Module:
    """A plain CPU model of the same architecture (and LoRA adapters) holding `state_dict`, for saving."""
    from transformers import AutoModelForCausalLM

    peft_config = getattr(model, "peft_config", None)
    base_config = model.get_base_model().config if peft_config else model.config
    dtype = next(iter(state_dict.values())).dtype
    copy = AutoModelForCausalLM.from_config(base_config, dtype=dtype)
    if peft_config:
        from peft import get_peft_model

        copy = get_peft_model(copy, peft_config["default"])
    copy.load_state_dict(state_dict)
    copy.generation_config = model.generation_config if not peft_config else model.get_base_model().generation_config
    return copy
