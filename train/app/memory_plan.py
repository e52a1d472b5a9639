"""The memory plan: the peak memory one training process will need, estimated before anything loads, and what the
device has.

Read from the model's config alone (config.json; the parameters are counted on a model built on the meta device, no
weight is read) and the run's settings: how Halyard holds the weights (train/app/models.py `build_model`: float32
master weights for full training, the frozen base in the compute dtype under LoRA, a 4-/8-bit base under QLoRA), the
optimizer's state (train/loop/optim.py), the activations the backward pass keeps (a table per method and dtype, from
the tensors autograd saves in a Llama-style decoder layer: checked against them by tests/app/test_memory_plan.py), the
logits (only at supervised positions, float32 in chunks: train/objectives/losses.py), the reference model of the
preference losses, and FSDP2's sharding over processes.

The peak is the larger of two moments of a step: the start of the backward pass (weights, optimizer state, every saved
activation, the logits and their gradient) and the optimizer step (weights, gradients, optimizer state and the step's
temporaries). Every row is assumed full: micro-batch rows x model.max_length tokens, each position supervised; real
data with shorter examples or prompts needs less. Measured against real steps in docs/BENCHMARKS.md
(`python scripts/memory_plan.py --measure`).

`python launch.py ... --cfg job` and `python scripts/memory_plan.py ...` print it; a run logs it before loading.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import warnings
from dataclasses import dataclass

from train.app.config import Config

logger = logging.getLogger(__name__)

GB = 1e9
FIT_MARGIN = 1.25  # the estimate's accuracy goal: a plan above 1.25x the device's memory clearly does not fit
LOGIT_CHUNK_POSITIONS = 4096  # train/objectives/losses.py token_logps: positions per float32 log-softmax chunk
FUSED_CHUNK_ELEMENTS = 2**26  # train/objectives/losses.py fused_linear_nll_sum: float32 logits per chunk
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}

# Bytes that autograd keeps per token in one decoder layer (a Llama-style block, sdpa attention), as multiples of the
# hidden size h, the key/value width kv (heads x head dim) and the MLP width i, by method and compute dtype. Counted
# from the tensors saved for backward (torch.autograd.graph.saved_tensors_hooks) on transformers 5.23: full float32
# keeps 8 h-, 2 kv- and 4 i-sized float32 tensors; under bfloat16 autocast the norms stay float32. A frozen base
# (LoRA, QLoRA) saves no inputs for weight gradients. Keys: (method, "float32" or "bfloat16").
LAYER_BYTES_PER_TOKEN = {
    ("full", "float32"): (32, 8, 16),
    ("full", "bfloat16"): (30, 4, 8),
    ("lora", "float32"): (25, 8, 16),
    ("lora", "bfloat16"): (24.5, 4, 8),
    ("qlora", "float32"): (25, 8, 16),
    ("qlora", "bfloat16"): (24.5, 4, 8),
}
# model.attention_float32 under bfloat16: attention saves its query, key, value and output in float32, not bfloat16:
# more bytes per token as multiples of h and kv, counted as above (tests: to the byte on the tiny model).
FLOAT32_ATTENTION_BYTES_PER_TOKEN = (6, 4)
# Outside the layers (embedding output, final norm), bytes per token as a multiple of h.
OUTSIDE_BYTES_PER_TOKEN = {"full": {"float32": 12, "bfloat16": 8}, "lora": {"float32": 4, "bfloat16": 4}}
# LoRA dropout (lora_dropout > 0) keeps a dropped-out copy of each adapted module's input: bytes per input element.
DROPOUT_BYTES = {"float32": 6, "bfloat16": 4}
# Stored bytes per weight of a quantized linear layer: 4-bit codes plus one float32 absmax per block of 64 weights
# (with double quantization: one byte per block, and a float32 per 256 blocks); 8-bit: a byte and a row scale.
QUANTIZED_BYTES = {"nf4": 0.5 + 4 / 64, "fp4": 0.5 + 4 / 64, "int8": 1.0}
DOUBLE_QUANT_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)


@dataclass(frozen=True)
class ModelShape:
    """What the plan needs to know about the model, from its config (numbers of parameters, not bytes)."""

    n_params: int  # every parameter, tied ones once
    n_block_linear: int  # weights of the decoder layers' linear layers: what QLoRA quantizes and autocast copies
    n_head: int  # the output head's weight (an embedding-sized matrix even when tied to the input embedding)
    head_tied: bool
    n_root: int  # outside the decoder layers: embeddings, final norm, head (FSDP2 keeps them gathered)
    n_layers: int
    hidden: int
    kv_width: int
    intermediate: int
    vocab: int
    trainable_shapes: tuple[tuple[int, ...], ...]  # shape of every trained parameter, for the optimizer's state
    adapted_inputs_per_layer: int  # sum of in_features of one layer's LoRA-adapted linear layers
    adapters_per_layer: int
    lora_r: int

    @property
    def n_trainable(self) -> int:
        return sum(math.prod(shape) for shape in self.trainable_shapes)

    @property
    def n_block(self) -> int:
        """Parameters of one decoder layer."""
        return (self.n_params - self.n_root) // max(self.n_layers, 1)


@dataclass(frozen=True)
class PlanSettings:
    """The run's settings that decide its memory, each read from the config once (`plan_settings`)."""

    method: str  # "full", "lora" or "qlora"
    compute_dtype: str  # "float32", "bfloat16" or "float16"
    quantization: str | None = None  # qlora: "nf4", "fp4" or "int8"
    double_quant: bool = True
    optimizer: str = "adamw"
    rows_per_micro_batch: int = 1  # sequences in one micro-batch (a pair is two)
    gradient_accumulation_steps: int = 1
    tokens_per_row: int = 512
    micro_batch_tokens: int | None = None  # model.micro_batch_tokens when set: a forward pass holds at most this
    gradient_checkpointing: bool = False
    lora_dropout: float = 0.0
    reference: str = "none"  # "none", "model" (a separate copy), "adapters" (the policy without them), "precomputed"
    n_processes: int = 1
    sharded: bool = False  # FSDP2: weights, gradients and optimizer state split over the processes
    offload: bool = False  # FSDP2 CPU offload: sharded weights, gradients and optimizer state in CPU RAM
    lm_head: bool = True  # False: a reward model's one-output score head, no vocabulary logits
    fused_head: bool = False  # model.head_loss=fused: logits one chunk at a time, gradients taken in the forward
    attention_float32: bool = False  # model.attention_float32: sdpa in float32 under bfloat16 or float16


@dataclass(frozen=True)
class MemoryPlan:
    """Estimated bytes per process at the peak of a training step, by what holds them."""

    weights: int
    gradients: int
    optimizer_state: int
    activations: int
    logits: int
    moment: str  # when the peak happens: "the backward pass" or "the optimizer step"
    offloaded: int = 0  # bytes FSDP2 keeps in CPU RAM instead (offload)

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer_state + self.activations + self.logits

    def breakdown(self) -> str:
        parts = [
            ("weights", self.weights),
            ("gradients", self.gradients),
            ("optimizer state", self.optimizer_state),
            ("activations", self.activations),
            ("logits", self.logits),
        ]
        text = ", ".join(f"{name} {gb(value)}" for name, value in parts)
        return text + (f"; {gb(self.offloaded)} offloaded to CPU RAM" if self.offloaded else "")


def gb(n_bytes: float) -> str:
    return f"{n_bytes / GB:.2f} GB"


# ---- the estimate: numbers in, bytes out ----


def estimate(shape: ModelShape, settings: PlanSettings) -> MemoryPlan:
    """The peak of a training step: the larger of the start of backward and the optimizer step."""
    shards = settings.n_processes if settings.sharded else 1
    weights, autocast_copies = weight_bytes(shape, settings, shards)
    gradients = gradient_bytes(shape, settings, shards)
    state, step_temporaries = optimizer_bytes(shape, settings, shards)
    activations = activation_bytes(shape, settings)
    logits = logit_bytes(shape, settings)
    offloaded = 0
    if settings.offload:  # the sharded weights, gradients and state live in CPU RAM; the device holds the rest
        offloaded = weights - gathered_bytes(shape, settings) + gradients + state
        weights, gradients, state = gathered_bytes(shape, settings), shape.n_block * 4, 0
    early_gradients = head_gradient_bytes(shape, settings, shards)
    backward = weights + autocast_copies + state + activations + logits + early_gradients
    step = weights + gradients + state + step_temporaries
    if backward >= step:
        return MemoryPlan(
            weights + autocast_copies, early_gradients, state, activations, logits, "the backward pass", offloaded
        )
    return MemoryPlan(weights, gradients, state + step_temporaries, 0, 0, "the optimizer step", offloaded)


def weight_bytes(shape: ModelShape, settings: PlanSettings, shards: int) -> tuple[int, int]:
    """(stored weights, the bfloat16 copies autocast makes of full training's linear weights for the step).

    Full training holds float32 master weights; LoRA a frozen base in the compute dtype (float32 under FSDP, which
    casts itself) and float32 adapters; QLoRA quantized linear layers, the rest (embeddings, head) in the compute
    dtype (train/app/models.py prepare_quantized_base), and float32 adapters. A separate reference model is a
    float32 copy."""
    compute = DTYPE_BYTES[settings.compute_dtype]
    adapters = shape.n_trainable * 4 if settings.method != "full" else 0
    if settings.method == "full":
        stored = shape.n_params * 4 / shards
    elif settings.method == "lora":
        stored = shape.n_params * (4 / shards if settings.sharded else compute) + adapters / shards
    else:
        per_weight = DOUBLE_QUANT_BYTES if settings.double_quant and settings.quantization != "int8" else None
        per_weight = per_weight or QUANTIZED_BYTES[settings.quantization or "nf4"]
        rest = (shape.n_params - shape.n_block_linear) * compute
        stored = (shape.n_block_linear * per_weight + rest + adapters) / shards
    if settings.reference == "model":
        stored += shape.n_params * 4 / shards
    if settings.sharded:
        stored += gathered_bytes(shape, settings)
    copies = 0
    if settings.method == "full" and compute < 4 and not settings.sharded:
        copies = (shape.n_block_linear + shape.n_head) * compute
    return int(stored), int(copies)


def gathered_bytes(shape: ModelShape, settings: PlanSettings) -> int:
    """FSDP2's unsharded parameters in the compute dtype: the root (embeddings, norm, head: gathered for the whole
    step) and two decoder layers (the one computing and the one prefetched)."""
    return int((shape.n_root + 2 * shape.n_block) * DTYPE_BYTES[settings.compute_dtype])


def gradient_bytes(shape: ModelShape, settings: PlanSettings, shards: int) -> int:
    """float32 gradients of the trained parameters; under FSDP2 a shard of each, and one layer's unsharded ones
    before they are reduce-scattered."""
    unsharded = shape.n_block * 4 if settings.sharded and settings.method == "full" else 0
    return int(shape.n_trainable * 4 / shards + unsharded)


def head_gradient_bytes(shape: ModelShape, settings: PlanSettings, shards: int) -> int:
    """The gradient that exists at the start of backward, beside every activation: the head's, when it is trained."""
    if settings.method != "full" or not settings.lm_head:
        return 0
    return int(shape.n_head * 4 / shards)


def optimizer_bytes(shape: ModelShape, settings: PlanSettings, shards: int) -> tuple[int, int]:
    """(the optimizer's state, the temporaries of its step).

    AdamW: two float32 moments per trained weight; its multi-tensor step adds a float32 buffer of the whole group
    (fused: none). 8-bit AdamW: two one-byte moments and a float32 scale per block of 256 for tensors of 4096+
    elements (smaller ones stay float32). Adafactor: no first moment, the second factored into row and column
    sums for matrices."""
    name = settings.optimizer
    if name in ("adamw", "adamw_fused"):
        state = 8 * shape.n_trainable
        temporaries = 4 * shape.n_trainable if name == "adamw" else 0
    elif name == "adamw_8bit":
        state = sum(_eight_bit_state(math.prod(s)) for s in shape.trainable_shapes)
        temporaries = 0
    elif name == "adafactor":
        state = sum(_adafactor_state(s) for s in shape.trainable_shapes)
        temporaries = 3 * 4 * max((math.prod(s) for s in shape.trainable_shapes), default=0)
    else:
        raise ValueError(f"no memory model for optimizer {name!r}")
    return int(state / shards), int(temporaries / shards)


def _eight_bit_state(n: int) -> float:
    return 2 * (n + 4 * n / 256) if n >= 4096 else 8 * n


def _adafactor_state(shape: tuple[int, ...]) -> int:
    if len(shape) < 2:
        return 4 * math.prod(shape)
    rows, columns = math.prod(shape[:-1]), math.prod(shape[:-2]) * shape[-1]
    return 4 * (rows + columns)


def activation_bytes(shape: ModelShape, settings: PlanSettings) -> int:
    """What autograd keeps for backward over one micro-batch: every layer's saved tensors, or with gradient
    checkpointing each layer's input and one layer's tensors at a time (recomputed in backward)."""
    tokens = pass_tokens(settings)
    dtype = "float32" if settings.compute_dtype == "float32" else "bfloat16"
    per_layer = layer_bytes_per_token(shape, settings.method, dtype, settings.lora_dropout)
    if settings.attention_float32 and dtype != "float32":
        h_bytes, kv_bytes = FLOAT32_ATTENTION_BYTES_PER_TOKEN
        per_layer += h_bytes * shape.hidden + kv_bytes * shape.kv_width
    kind = "full" if settings.method == "full" else "lora"
    outside = OUTSIDE_BYTES_PER_TOKEN[kind][dtype] * shape.hidden
    if not settings.gradient_checkpointing:
        return int(tokens * (shape.n_layers * per_layer + outside))
    # The residual stream between layers is float32, but for a LoRA base held in bfloat16.
    residual = 2 if settings.method == "lora" and dtype == "bfloat16" else 4
    return int(tokens * (shape.n_layers * residual * shape.hidden + per_layer + outside))


def pass_tokens(settings: PlanSettings) -> int:
    """Tokens of the largest forward pass: a full micro-batch, or model.micro_batch_tokens where that is less (one
    full row always fits: an item over the budget runs alone)."""
    tokens = settings.rows_per_micro_batch * settings.tokens_per_row
    if settings.micro_batch_tokens is None:
        return tokens
    return min(tokens, max(settings.micro_batch_tokens, settings.tokens_per_row))


def layer_bytes_per_token(shape: ModelShape, method: str, dtype: str, lora_dropout: float) -> float:
    h_bytes, kv_bytes, i_bytes = LAYER_BYTES_PER_TOKEN[(method, dtype)]
    per_layer = h_bytes * shape.hidden + kv_bytes * shape.kv_width + i_bytes * shape.intermediate
    if method != "full":
        per_layer += shape.adapters_per_layer * shape.lora_r * DTYPE_BYTES[dtype]  # each adapter's r-wide middle
        if lora_dropout > 0:
            per_layer += shape.adapted_inputs_per_layer * DROPOUT_BYTES[dtype]
    return per_layer


def logit_bytes(shape: ModelShape, settings: PlanSettings) -> int:
    """The logits at supervised positions (every position, at worst) in the compute dtype and their gradient, and
    the float32 chunk being log-softmaxed in backward: its upcast, its log-softmax and its gradient."""
    if not settings.lm_head:
        return 0
    positions = max(pass_tokens(settings) - settings.rows_per_micro_batch, 1)
    if settings.fused_head:  # a chunk's float32 logits and softmax, the head's float32 gradient, the hidden gradient
        chunk = min(positions, max(1, FUSED_CHUNK_ELEMENTS // shape.vocab))
        return int(chunk * shape.vocab * 2 * 4 + shape.vocab * shape.hidden * 4 + positions * shape.hidden * 4)
    logit = DTYPE_BYTES[settings.compute_dtype]
    chunk = min(positions, LOGIT_CHUNK_POSITIONS)
    return int(positions * shape.vocab * 2 * logit + chunk * shape.vocab * 3 * 4)


# ---- from the config ----


def model_shape(cfg: Config, method: str) -> ModelShape:
    """The model's shape from its config.json alone: built on the meta device (no memory, no weight read), with
    LoRA adapters added as build_model adds them, so every parameter and trained shape is counted exactly."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(cfg.model.name_or_path, trust_remote_code=cfg.model.trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=cfg.model.trust_remote_code)
    return shape_of(model, cfg, method)


def shape_of(model, cfg: Config, method: str) -> ModelShape:
    """The ModelShape of a causal LM (on the meta device or not), with LoRA adapters added for lora and qlora."""
    import torch

    text = model.config.get_text_config()
    head = model.get_output_embeddings()
    embedding = model.get_input_embeddings()
    layers = _decoder_layers(model)
    in_layers = {id(p) for layer in layers for p in layer.parameters()}
    n_params = sum(p.numel() for p in model.parameters())
    block_linear = [m for layer in layers for m in layer.modules() if isinstance(m, torch.nn.Linear) and m is not head]
    n_root = sum(p.numel() for p in model.parameters() if id(p) not in in_layers)
    heads = getattr(text, "num_attention_heads", 1)
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    shapes, adapted_inputs, n_adapters = _trained(model, cfg, method, len(layers))
    return ModelShape(
        n_params=n_params,
        n_block_linear=sum(m.weight.numel() for m in block_linear),
        n_head=head.weight.numel() if head is not None else 0,
        head_tied=head is not None and head.weight is embedding.weight,
        n_root=n_root,
        n_layers=len(layers),
        hidden=text.hidden_size,
        kv_width=getattr(text, "num_key_value_heads", heads) * head_dim,
        intermediate=getattr(text, "intermediate_size", 4 * text.hidden_size),
        vocab=text.vocab_size,
        trainable_shapes=shapes,
        adapted_inputs_per_layer=adapted_inputs,
        adapters_per_layer=n_adapters,
        lora_r=cfg.model.peft.lora_r if method != "full" else 0,
    )


def _decoder_layers(model) -> list:
    """The decoder layers: the longest ModuleList of the model (model.layers in Llama, Qwen, Mistral, Gemma)."""
    import torch

    lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList)]
    return list(max(lists, key=len)) if lists else []


def _trained(model, cfg: Config, method: str, n_layers: int) -> tuple[tuple[tuple[int, ...], ...], int, int]:
    """(shapes of the trained parameters, adapted input features per layer, adapters per layer)."""
    if method == "full":
        return tuple(tuple(p.shape) for p in model.parameters()), 0, 0
    import torch

    from train.app.models import add_lora

    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # PEFT's call of a renamed transformers method: noise here
        adapted = add_lora(model, cfg.model)
    shapes = tuple(tuple(p.shape) for p in adapted.parameters() if p.requires_grad)
    lora_a = [m for name, m in adapted.named_modules() if name.endswith("lora_A.default")]
    inputs = sum(m.in_features for m in lora_a)
    return shapes, inputs // max(n_layers, 1), len(lora_a) // max(n_layers, 1)


def method_of(cfg: Config) -> str:
    """full, lora or qlora (LoRA over a quantized base)."""
    if not cfg.model.use_peft:
        return "full"
    return "qlora" if quantization_of(cfg) else "lora"


def quantization_of(cfg: Config) -> str | None:
    """model.quantization ("nf4", "fp4", "int8"), or None for a 16/32-bit base."""
    return None if cfg.model.quantization == "none" else cfg.model.quantization


def plan_settings(cfg: Config, spec, n_processes: int, sharded: bool, offload: bool = False) -> PlanSettings:
    """The memory-deciding settings of a validated config whose loss is `spec` (train/app/loss_registry.py)."""
    from train.batching.layout import Layout, decide_layout
    from train.data.store import packed_row_tokens

    micro_batch = max(cfg.model.batch_size // max(n_processes * cfg.model.gradient_accumulation_steps, 1), 1)
    packed = decide_layout(cfg.data, cfg.model.attn_implementation, spec)[0] is Layout.PACKED
    rows_per_item = 1 if packed else spec.trainer.rows_per_example
    tokens = packed_row_tokens(spec.data_kind, cfg.model.max_length) if packed else cfg.model.max_length
    method = method_of(cfg)
    compute_dtype = cfg.model.dtype if cfg.model.dtype != "auto" else _resolved_dtype()
    return PlanSettings(
        method=method,
        compute_dtype=compute_dtype,
        quantization=quantization_of(cfg),
        double_quant=cfg.model.double_quantization is not False,  # null: on for 4-bit bases (models.py)
        optimizer=cfg.optimizer.name,
        rows_per_micro_batch=micro_batch * rows_per_item,
        gradient_accumulation_steps=cfg.model.gradient_accumulation_steps,
        tokens_per_row=tokens,
        micro_batch_tokens=cfg.model.micro_batch_tokens,
        gradient_checkpointing=cfg.model.gradient_checkpointing,
        lora_dropout=cfg.model.peft.lora_dropout if method != "full" else 0.0,
        reference=_reference_kind(cfg, spec),
        n_processes=n_processes,
        sharded=sharded,
        offload=offload,
        lm_head=spec.model_head == "lm",
        fused_head=cfg.model.head_loss == "fused",
        attention_float32=_resolved_attention_float32(cfg, compute_dtype),
    )


def _resolved_dtype() -> str:
    from train.app.models import resolve_dtype

    return resolve_dtype("auto")[0]


def _resolved_attention_float32(cfg: Config, compute_dtype: str) -> bool:
    from train.app.models import resolve_attention_float32

    return resolve_attention_float32(cfg.model.attention_float32, compute_dtype, cfg.model.attn_implementation)[0]


def _reference_kind(cfg: Config, spec) -> str:
    if not spec.uses_reference:
        return "none"
    if cfg.reference.precompute:
        return "precomputed"
    return "adapters" if cfg.model.use_peft else "model"


# ---- the device, the fit and the advice ----


@dataclass(frozen=True)
class Device:
    bytes_per_process: int
    description: str
    gpu: bool = False  # where more processes with FSDP2 each bring their own memory


def device_memory(n_local_processes: int) -> Device:
    """What one process may use: a CUDA device's total memory, or on CPU the RAM available now, shared by the
    machine's processes of this run."""
    import torch

    if torch.cuda.is_available():
        properties = torch.cuda.get_device_properties(torch.cuda.current_device())
        return Device(properties.total_memory, f"{gb(properties.total_memory)} ({properties.name})", gpu=True)
    available = _available_ram()
    share = available // max(n_local_processes, 1)
    shared = f", shared by {n_local_processes} processes" if n_local_processes > 1 else ""
    return Device(share, f"{gb(share)} (CPU RAM available: {gb(available)}{shared})")


def _available_ram() -> int:
    try:
        with open("/proc/meminfo") as meminfo:
            fields = dict(line.split(":", 1) for line in meminfo)
        return int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def fits(plan: MemoryPlan, device: Device) -> str:
    """ "fits", "tight" (above the device but within the estimate's margin) or "no" (clearly not)."""
    if plan.total <= device.bytes_per_process:
        return "fits"
    return "tight" if plan.total <= FIT_MARGIN * device.bytes_per_process else "no"


def advice(shape_for, settings: PlanSettings, device: Device) -> list[str]:
    """Settings that would make the run fit the device, each with its estimate: gradient checkpointing, LoRA,
    QLoRA, smaller micro-batches (more accumulation, the same batch), a token budget per pass (the same
    micro-batches in more passes), shorter rows, more GPUs with FSDP2.

    `shape_for(method)` gives the ModelShape for a method (LoRA adds adapters)."""
    shape = shape_for(settings.method)
    candidates = []
    if not settings.gradient_checkpointing:
        candidates.append(("model.gradient_checkpointing=true", shape, _with(settings, gradient_checkpointing=True)))
    if settings.method == "full":
        candidates.append(("method=lora", shape_for("lora"), _with(settings, method="lora")))
    if settings.method != "qlora":
        qlora = _with(settings, method="qlora", quantization="nf4")
        candidates.append(("method=qlora", shape_for("qlora"), qlora))
    candidates += _smaller_micro_batches(shape, settings, device)
    candidates += _smaller_passes(shape, settings, device)
    if settings.rows_per_micro_batch == 1 and settings.tokens_per_row > 256:
        shorter = _with(settings, tokens_per_row=settings.tokens_per_row // 2)
        candidates.append((f"model.max_length={shorter.tokens_per_row}", shape, shorter))
    if device.gpu:
        candidates += _more_gpus(shape, settings, device)
    found = []
    for setting, candidate_shape, candidate in candidates:
        total = estimate(candidate_shape, candidate).total
        if total <= device.bytes_per_process:
            found.append(f"{setting} (about {gb(total)})")
    return found


def _smaller_micro_batches(shape: ModelShape, settings: PlanSettings, device: Device) -> list:
    """The least extra accumulation (the same batch in smaller micro-batches) that fits, if any."""
    rows = settings.rows_per_micro_batch
    for factor in (2, 4, 8, 16, 32, 64, 128):
        if rows % factor == 0:
            smaller = _with(settings, rows_per_micro_batch=rows // factor)
            if estimate(shape, smaller).total <= device.bytes_per_process:
                steps = settings.gradient_accumulation_steps * factor
                return [
                    (f"model.gradient_accumulation_steps={steps} (micro-batches of {rows // factor})", shape, smaller)
                ]
    return []


def _smaller_passes(shape: ModelShape, settings: PlanSettings, device: Device) -> list:
    """The largest token budget per forward pass (model.micro_batch_tokens, in whole rows) that fits, if any: the
    same micro-batches, the long ones run in several passes."""
    for rows in range(settings.rows_per_micro_batch - 1, 0, -1):
        budget = rows * settings.tokens_per_row
        if pass_tokens(settings) <= budget:
            continue
        smaller = _with(settings, micro_batch_tokens=budget)
        if estimate(shape, smaller).total <= device.bytes_per_process:
            return [(f"model.micro_batch_tokens={budget}", shape, smaller)]
    return []


def _more_gpus(shape: ModelShape, settings: PlanSettings, device: Device) -> list:
    """The fewest GPUs that fit with FSDP2 sharding, if any (more processes on one CPU share its RAM: no help)."""
    for n in (2, 4, 8):
        if n > settings.n_processes:
            sharded = _with(settings, sharded=True, n_processes=n)
            if estimate(shape, sharded).total <= device.bytes_per_process:
                return [(f"FSDP2 over {n} GPUs (accelerate_config=accelerate_config/fsdp_{n}gpu.yaml)", shape, sharded)]
    return []


def _with(settings: PlanSettings, **changes) -> PlanSettings:
    return dataclasses.replace(settings, **changes)


# ---- a run's plan: what the CLI shows ----


@dataclass(frozen=True)
class PlannedRun:
    shape: ModelShape
    settings: PlanSettings
    plan: MemoryPlan
    device: Device
    fit: str  # see `fits`
    advice: list[str]


def plan_for_run(cfg: Config, spec) -> PlannedRun:
    """The plan of a validated config on this machine, with the processes and sharding its launcher will use."""
    n_processes, n_local, sharded, offload = process_layout(cfg)
    settings = plan_settings(cfg, spec, n_processes, sharded, offload)
    shapes = {}

    def shape_for(method: str) -> ModelShape:
        if method not in shapes:
            shapes[method] = model_shape(cfg, method)
        return shapes[method]

    plan = estimate(shape_for(settings.method), settings)
    device = device_memory(n_local)
    fit = fits(plan, device)
    found = advice(shape_for, settings, device) if fit != "fits" else []
    return PlannedRun(shape_for(settings.method), settings, plan, device, fit, found)


def process_layout(cfg: Config) -> tuple[int, int, bool, bool]:
    """(processes, processes on this machine, FSDP2 sharding, CPU offload) of the job: from the accelerate config it
    will relaunch through, or from the environment `accelerate launch` gave this process."""
    from train.app.launcher import launched_by_accelerate, read_accelerate_config

    if cfg.accelerate_config and not launched_by_accelerate():
        settings = read_accelerate_config(cfg.accelerate_config) or {}
        n = int(settings.get("num_processes", 1) or 1)
        local = max(n // int(settings.get("num_machines", 1) or 1), 1)
        fsdp = settings.get("fsdp_config") or {}
        sharded = settings.get("distributed_type") == "FSDP"
        return n, local, sharded, sharded and _is_true(fsdp.get("fsdp_offload_params", False))
    n = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_WORLD_SIZE", n))
    sharded = _is_true(os.environ.get("ACCELERATE_USE_FSDP", "false"))
    return n, local, sharded, sharded and _is_true(os.environ.get("FSDP_OFFLOAD_PARAMS", "false"))


def _is_true(value) -> bool:
    return str(value).lower() == "true"


def summary_line(planned: PlannedRun) -> str:
    """The start-up line: the estimate per process, what holds it, and what the device has."""
    plan, settings = planned.plan, planned.settings
    what = f"{settings.method}, {settings.compute_dtype}, {settings.optimizer}"
    what += f", micro-batch {settings.rows_per_micro_batch} x {settings.tokens_per_row} tokens"
    if pass_tokens(settings) < settings.rows_per_micro_batch * settings.tokens_per_row:
        what += f" in passes of at most {pass_tokens(settings)}"
    if settings.gradient_checkpointing:
        what += ", gradient checkpointing"
    if settings.sharded:
        what += f", FSDP2 over {settings.n_processes}" + (" with CPU offload" if settings.offload else "")
    return (
        f"memory plan: this run needs about {gb(plan.total)} per process ({what}; at {plan.moment}: "
        f"{plan.breakdown()}); the device has {planned.device.description}"
    )


def advice_text(planned: PlannedRun) -> str:
    """What to say when the plan does not fit: the settings that would make it fit."""
    over = f"about {gb(planned.plan.total)} per process, more than the {gb(planned.device.bytes_per_process)} available"
    if not planned.advice:
        return f"{over}, and no single setting Halyard knows would make it fit: use a larger device or a smaller model"
    return f"{over}; each of these would fit: " + "; ".join(planned.advice)


def report(planned: PlannedRun) -> str:
    """The plan for the dry run and scripts/memory_plan.py: the summary line, and the advice when it does not fit."""
    lines = [
        summary_line(planned),
        f"parameters: {planned.shape.n_params / 1e6:.1f}M, trained {planned.shape.n_trainable / 1e6:.2f}M",
    ]
    if planned.fit != "fits":
        lines.append(("does not fit: " if planned.fit == "no" else "may not fit: ") + advice_text(planned))
    return "\n".join(lines)


def log_plan(cfg: Config, spec) -> PlannedRun | None:
    """Log the plan on the main process at start-up (before anything loads); a plan that cannot be made (a model
    type transformers does not know offline) is said, not fatal. Returns it (None on other processes)."""
    if os.environ.get("RANK", "0") != "0":
        return None
    try:
        planned = plan_for_run(cfg, spec)
    except Exception as error:  # noqa: BLE001 - an estimate must never stop a run
        logger.info(f"memory plan: not estimated ({type(error).__name__}: {error})")
        return None
    logger.info(summary_line(planned))
    if planned.fit != "fits":
        logger.warning(("does not fit: " if planned.fit == "no" else "may not fit: ") + advice_text(planned))
    return planned


def memory_problem(cfg: Config, spec) -> str | None:
    """The validation problem of a run that clearly does not fit (memory_check=error), naming what would fit."""
    if cfg.memory_check != "error":
        return None
    try:
        planned = plan_for_run(cfg, spec)
    except Exception:  # noqa: BLE001 - a plan that cannot be made is logged at start-up, never a problem
        return None
    if planned.fit != "no":
        return None
    return (
        f"memory_check=error: the memory plan says this run clearly does not fit: {advice_text(planned)} "
        f"(memory_check=warn starts it anyway)"
    )
