"""Loading the tokenizer and the model (optionally wrapped with LoRA adapters through PEFT)."""

from __future__ import annotations

import logging
import os
from typing import Any

import torch
from accelerate.utils import set_seed
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from train.app.attention import float32_sdpa
from train.app.config import ModelConfig
from train.batching.collate import collate_packed
from train.data.store import IGNORE_INDEX, PackedExample
from train.data.templates import chat_template_text
from train.errors import HalyardError
from train.loop.distributed import decoder_layers

logger = logging.getLogger(__name__)

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(dtype: str) -> tuple[str, str]:
    """model.dtype with `auto` decided for this machine, and why: bfloat16 where it is fast (autocast on a CUDA GPU
    that supports it, or a CPU with AMX tiles: 2.3x float32's speed for a SmolLM2 step), float32 elsewhere: a CPU
    with AVX512-BF16 but no AMX ran the same step 1.75x slower in bfloat16, and emulated bf16 is slower still
    (docs/BENCHMARKS.md, cpu-options)."""
    if dtype != "auto":
        return dtype, "set"
    if torch.cuda.is_available():
        fast = torch.cuda.is_bf16_supported()
        return ("bfloat16" if fast else "float32"), f"CUDA {'with' if fast else 'without'} bf16"
    if cpu_has_amx():
        return "bfloat16", "this CPU has AMX bf16 tiles"
    if getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)():
        return "float32", "this CPU has AVX512-BF16 but no AMX: bfloat16 measured 1.75x slower than float32 there"
    return "float32", "this CPU has no bf16 matrix instructions"


def cpu_has_amx() -> bool:
    """Whether this CPU has AMX tiles, where bfloat16 matmuls are fast (torch's check; False where it has none)."""
    return getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()


def resolve_attention_float32(setting: bool | None, dtype: str, attn_implementation: str) -> tuple[bool, str]:
    """model.attention_float32 with null decided for this machine, and why: on for bfloat16 or float16 sdpa on a CPU
    without AMX tiles, where the float32 kernel is the faster one (train/app/attention.py)."""
    if setting is not None:
        return setting, "set"
    if dtype == "float32":
        return False, "the model computes in float32"
    if attn_implementation != "sdpa":
        return False, f"attn_implementation={attn_implementation} keeps its own kernel"
    if torch.cuda.is_available():
        return False, f"CUDA's {dtype} attention kernels are the fast ones"
    if cpu_has_amx():
        return False, f"this CPU has AMX tiles for {dtype} attention"
    return True, f"a CPU without AMX: its {dtype} attention kernel ran about 2x slower than float32's"


def resolve_save_dtype(save_dtype: str, settings: ModelConfig) -> tuple[str, str]:
    """save_dtype with `auto` decided: the dtype model.name_or_path's config.json says its weights are stored in
    (read without loading a weight), float32 where it says none; and why."""
    if save_dtype != "auto":
        return save_dtype, "set"
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(settings.name_or_path, trust_remote_code=settings.trust_remote_code)
    stored = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    name = str(stored).removeprefix("torch.") if stored is not None else None
    if name in ("float32", "bfloat16", "float16"):
        return name, f"the dtype {settings.name_or_path} is stored in"
    return "float32", f"{settings.name_or_path} names no stored dtype"


def build_tokenizer(settings: ModelConfig, chat_template: str | None = None):
    """The tokenizer, with a pad token (EOS when it has none: padding is masked out of the labels, not matched by id),
    and `chat_template` (data.chat_template: a built-in name or a Jinja file, train/data/templates.py) in place of
    its own when given: set before anything is tokenized, it is saved with the model."""
    tokenizer, new = load_tokenizer(settings)
    if settings.add_special_tokens:
        present = [t for t in settings.add_special_tokens if t not in new]
        logger.info(
            f"model.add_special_tokens: {len(new)} new special token(s) {new} (ids "
            f"{tokenizer.convert_tokens_to_ids(new[0])}-{len(tokenizer) - 1}); already in the vocabulary: {present}"
            if new
            else f"model.add_special_tokens: {present} are in the vocabulary already (each one special token now)"
        )
    if chat_template is not None:
        tokenizer.chat_template = chat_template_text(chat_template)
        logger.info(f"chat template: data.chat_template={chat_template}")
    return tokenizer


def load_tokenizer(settings: ModelConfig) -> tuple[Any, list[str]]:
    """The tokenizer with a pad token and model.add_special_tokens added (as special tokens: never split, one id
    each; one it has already keeps its id), and which of those were new; without a word in the log: the model's
    builder reads its length too."""
    source = _tokenizer_source(settings)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=settings.trust_remote_code)
    except (OSError, ValueError) as error:
        raise HalyardError(f"could not load the tokenizer from '{source}': {error}") from None
    if not tokenizer.is_fast:
        raise HalyardError(
            f"the tokenizer at '{source}' is a slow tokenizer; label masks need a fast one (tokenizer.json)"
        )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    vocabulary = tokenizer.get_vocab()
    new = [token for token in dict.fromkeys(settings.add_special_tokens) if token not in vocabulary]
    if settings.add_special_tokens:
        tokenizer.add_tokens(list(settings.add_special_tokens), special_tokens=True)
    return tokenizer, new


def _tokenizer_source(settings: ModelConfig) -> str:
    return settings.tokenizer_name_or_path or settings.name_or_path


def build_model(
    settings: ModelConfig,
    seed: int,
    sharded: bool = False,
    score_pad_token_id: int | None = None,
    role: str = "model",
    compile_layers_now: bool | None = None,
):
    """The causal LM to train, in float32; for LoRA without FSDP, the frozen base in the compute dtype.

    With `score_pad_token_id` set, a sequence classifier with one output (a reward model: the base model and a new,
    randomly initialized score head); it scores the last token that is not the padding token.
    Under FSDP every weight loads in float32: FSDP2 casts to the compute dtype itself, and one sharding unit needs
    one dtype.
    """
    set_seed(seed)  # LoRA and score-head initialization are random
    load_dtype = TORCH_DTYPES[settings.dtype] if settings.use_peft and not sharded else torch.float32
    attention = float32_sdpa() if settings.attention_float32 else settings.attn_implementation
    options = {"dtype": load_dtype, "attn_implementation": attention}
    if settings.quantization != "none":  # validation allows it only under LoRA, without FSDP
        options |= {"quantization_config": bits_and_bytes_config(settings), "device_map": quantized_device_map()}
    if score_pad_token_id is not None:
        options |= {"num_labels": 1, "pad_token_id": score_pad_token_id}
    auto_class = AutoModelForCausalLM if score_pad_token_id is None else AutoModelForSequenceClassification
    try:
        model = auto_class.from_pretrained(
            settings.name_or_path, trust_remote_code=settings.trust_remote_code, **options
        )
    except (OSError, ValueError) as error:
        raise HalyardError(
            f"could not load the model from model.name_or_path='{settings.name_or_path}': {error}\n"
            f"Give a local folder with config.json and weights (offline, hub ids cannot be downloaded)."
        ) from None
    model.config.use_cache = False  # the KV cache is useless in training and costs memory
    fit_embeddings_to_tokenizer(model, settings)  # before LoRA wraps the embeddings
    if settings.quantization != "none":
        prepare_quantized_base(model, settings)
    elif settings.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if settings.use_peft:
        model = add_lora(model, settings, task_type="CAUSAL_LM" if score_pad_token_id is None else "SEQ_CLS")
    compiled = settings.compile if compile_layers_now is None else compile_layers_now  # run.py decides null
    if compiled and role == "model":  # after the adapters (they are in the graph), before FSDP2 shards
        compile_layers(model)
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_total = sum(p.numel() for p in model.parameters())
    if role == "model":
        logger.info(f"model: {n_total / 1e6:.1f}M parameters, {n_trainable / 1e6:.2f}M trainable")
    else:  # `role` says what it is, e.g. "frozen reference" (it is frozen by its trainer)
        logger.info(f"{role}: {n_total / 1e6:.1f}M parameters, none trained")
    return model


AUTO_COMPILE_MIN_STEPS = 200  # model.compile=null: runs this long earn back ~20 s of compilation many times over
# On a CPU, where compiled layers were measured faster by the most (docs/BENCHMARKS.md): bfloat16 1.22-1.29x, float32
# 1.09-1.14x (left to model.compile=true: the tiny test models' runs would pay compilation for nothing).
AUTO_COMPILE_DTYPES = ("bfloat16",)


def resolve_compile(compile_layers: bool | None, dtype: str, total_steps: int) -> tuple[bool, str]:
    """model.compile with null decided, and why: on where it was measured to win (a CPU with AMX in bfloat16:
    SmolLM2's steps 1.22-1.29x faster after 12-20 s of compilation; without AMX 1.02-1.04x, docs/BENCHMARKS.md) for
    runs of at least AUTO_COMPILE_MIN_STEPS steps, with a compiler to build the kernels; off elsewhere."""
    if compile_layers is not None:
        return compile_layers, "set"
    if torch.cuda.is_available():
        return False, "not measured on GPUs here yet; model.compile=true compiles"
    if dtype not in AUTO_COMPILE_DTYPES:
        return False, f"{dtype} on a CPU: smaller gains, left to model.compile=true (docs/BENCHMARKS.md)"
    if not cpu_has_amx():
        return False, f"{dtype} on a CPU without AMX: 1.02-1.04x measured, left to model.compile=true"
    if total_steps < AUTO_COMPILE_MIN_STEPS:
        return False, f"{total_steps} steps, fewer than the {AUTO_COMPILE_MIN_STEPS} that earn back the compilation"
    if compiler_problem():
        return False, "no C++ compiler for torch.compile's CPU kernels (g++, or $CXX)"
    return True, f"a CPU with AMX in {dtype}, {total_steps} steps"


def compiler_problem() -> str | None:
    """Why torch.compile cannot build kernels here, or None: inductor writes C++ for the CPU (it looks for $CXX,
    else g++) and Triton kernels for CUDA GPUs."""
    if torch.cuda.is_available():
        from torch.utils._triton import has_triton

        return None if has_triton() else "on a CUDA GPU it needs Triton, which is not installed: pip install triton"
    from torch._inductor.cpp_builder import get_cpp_compiler
    from torch._inductor.exc import InvalidCxxCompiler

    try:
        get_cpp_compiler()
    except InvalidCxxCompiler:
        return (
            "torch.compile builds C++ kernels for the CPU and finds no C++ compiler ($CXX, or g++ on the PATH); "
            "install one (apt-get install g++) or set CXX"
        )
    return None


RECOMPILE_LIMIT = 16  # graphs per compiled forward; torch's default, 8, is close to what a run can meet (below)


def compile_layers(model) -> list:
    """model.compile: every decoder layer's forward compiled (regional compilation, as torchtune and torchtitan do
    it: each repeated block, not the whole model), in training passes only (_when_training). The layer itself stays
    in place, so the state dict keeps its names and FSDP2, sharding after this, wraps it as usual. Layers share their
    code, so one graph serves them all; the embeddings, the head and the loss stay eager. Returns the layers.

    dynamic=True: sequence lengths change at every step (grouped batches, packed rows padded to the longest), and
    the default (the first shape static, then recompiled dynamic) compiles one more graph for nothing. What still
    compiles a graph of its own (measured on the tiny Llama): a batch without padding (no attention mask) and one
    row (a dimension of size 1 is specialized). Past torch's limit of graphs per function, layers would fall back to
    eager with a single warning; RECOMPILE_LIMIT leaves room."""
    layers = decoder_layers(model)
    if not layers:
        raise HalyardError(
            f"model.compile=true: {type(model).__name__} names no decoder layer class (_no_split_modules) to "
            f"compile; set model.compile=false"
        )
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    for layer in layers:
        layer.forward = _when_training(torch.compile(layer.forward, dynamic=True), eager=layer.forward)
    logger.info(
        f"model.compile: {len(layers)} {type(layers[0]).__name__} layers compiled (torch.compile, dynamic shapes); "
        f"the first steps, and each new kind of batch, wait for compilation"
    )
    return layers


def _when_training(compiled, eager):
    """`compiled` in passes with gradients, `eager` in the others: evaluation, generation (its KV cache compiled a
    graph per layer and per kind of decoding step on the tiny model) and benchmarks meet shapes that would each cost
    a compilation, for a small share of the run's time."""

    def forward(*args, **kwargs):
        return (compiled if torch.is_grad_enabled() else eager)(*args, **kwargs)

    return forward


def compile_summary() -> dict[str, float]:
    """What torch.compile did in this process, logged and returned for summary.json: `compiled_graphs` (one per kind
    of batch the layers met, more where a layer's code breaks the graph), `compile_graph_breaks` (places it fell back
    to Python) and `compile_seconds` (spent capturing and compiling, as torch._dynamo counts it:
    entire_frame_compile)."""
    from torch._dynamo.utils import counters, cumulative_time_spent_ns

    summary = {
        "compiled_graphs": counters["stats"]["unique_graphs"],
        "compile_graph_breaks": sum(counters["graph_break"].values()),
        "compile_seconds": round(cumulative_time_spent_ns.get("entire_frame_compile", 0) / 1e9, 1),
    }
    logger.info(
        f"model.compile: {summary['compiled_graphs']} graph(s) compiled in {summary['compile_seconds']:.1f} s, "
        f"{summary['compile_graph_breaks']} graph break(s) (TORCH_LOGS=recompiles,graph_breaks says why)"
    )
    return summary


def bits_and_bytes_config(settings: ModelConfig):
    """transformers' BitsAndBytesConfig for model.quantization (nf4, fp4 or int8). A 4-bit base computes in
    model.quantization_compute_dtype (auto: model.dtype) with double quantization unless model.double_quantization
    is false; the output head is never quantized (transformers skips it: the logits need its precision)."""
    from transformers import BitsAndBytesConfig

    if settings.quantization == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    compute = settings.dtype if settings.quantization_compute_dtype == "auto" else settings.quantization_compute_dtype
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=settings.quantization,
        bnb_4bit_use_double_quant=settings.double_quantization is not False,
        bnb_4bit_compute_dtype=TORCH_DTYPES[compute],
    )


def numerics_id(settings: ModelConfig) -> str:
    """What the base model's outputs depend on besides its files: the dtype, and the quantization with its options
    (a 4-bit base gives other reference log-probs than the 16-bit one: the reference cache keys on this)."""
    if settings.quantization == "none":
        return settings.dtype
    config = bits_and_bytes_config(settings)
    return (
        f"{settings.dtype}|{settings.quantization}|{config.bnb_4bit_use_double_quant}|{config.bnb_4bit_compute_dtype}"
    )


def quantized_device_map() -> dict[str, str]:
    """Where bitsandbytes quantizes the weights: straight onto this process's GPU (so the 16-bit weights never sit
    there whole), or the CPU. Accelerate gives process LOCAL_RANK the GPU of that index."""
    if torch.cuda.is_available():
        return {"": f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"}
    return {"": "cpu"}


def prepare_quantized_base(model, settings: ModelConfig) -> None:
    """PEFT's k-bit preparation (peft.prepare_model_for_kbit_training), without the part that costs the memory
    QLoRA saves. PEFT freezes the base, casts every 16-bit weight that is not 4-bit to float32 and turns on
    gradient checkpointing with an input-gradient hook. Here: the base is frozen and the norms (1-D weights, a few
    thousand numbers each) are cast to float32 for stable statistics, as PEFT does; the embeddings and the output
    head keep model.dtype (PEFT's float32 cast would double them: 1.05B parameters, +2.1 GB, for Llama 3 8B's
    128k vocabulary), and the logits are upcast where the loss needs them. Gradient checkpointing, when set, is
    non-reentrant, which needs no input-gradient hook (PEFT's own note)."""
    for parameter in model.parameters():
        parameter.requires_grad_(False)
        if parameter.ndim == 1 and parameter.dtype in (torch.float16, torch.bfloat16):
            parameter.data = parameter.data.float()
    if settings.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    layers = [module for module in model.modules() if _is_quantized_linear(module)]
    for layer in layers:
        # bitsandbytes 0.50 on a CPU with AVX512-BF16 repacks a 4-bit weight for inference at its first forward in
        # eval mode without gradients (an evaluation, the packing check), for good; training then runs through an
        # op with no backward (gemv_4bit: "an autograd kernel was not registered"), and the gradients reaching the
        # adapters below it are silently wrong (a grad norm of 0.36 became 0.20 on the tiny model). Evaluation
        # keeps the training format: slower on such CPUs, never wrong.
        if hasattr(layer, "support_avx512bf16_for_cpu"):
            layer.support_avx512bf16_for_cpu = False
    logger.info(
        f"model.quantization={settings.quantization}: {len(layers)} linear layers quantized by bitsandbytes, "
        f"{model.get_memory_footprint() / 2**20:,.1f} MiB of weights"
    )


def _is_quantized_linear(module) -> bool:
    import bitsandbytes as bnb

    return isinstance(module, bnb.nn.Linear4bit | bnb.nn.Linear8bitLt)


def add_lora(model, settings: ModelConfig, task_type: str = "CAUSAL_LM"):
    """LoRA adapters on `settings.peft.target_modules` (DoRA and rsLoRA as model.peft says); the modules of
    model.peft.modules_to_save trained whole and saved with the adapter, and with them the embeddings and head when
    model.add_special_tokens is set (the new tokens' rows must learn). A sequence classifier's (SEQ_CLS) new score
    head is trained whole too: PEFT adds it to modules_to_save itself. Where the model ties its head to its
    embeddings and both are saved whole, they stay one tied matrix (PEFT's ensure_weight_tying)."""
    from peft import LoraConfig, get_peft_model

    peft = settings.peft
    targets = peft.target_modules
    to_save = list(peft.modules_to_save)
    embeddings = embedding_module_names(model)
    if settings.add_special_tokens:
        missing = [name for name in embeddings if name not in to_save]
        if missing:
            to_save += missing
            if not model.get_input_embeddings().weight.is_meta:  # the memory plan's shape-only copy says nothing
                logger.info(
                    f"model.add_special_tokens under LoRA: {', '.join(missing)} trained whole and saved with the "
                    f"adapter (model.peft.modules_to_save), so the new tokens' rows learn"
                )
    lora = LoraConfig(
        r=peft.lora_r,
        lora_alpha=peft.lora_alpha,
        lora_dropout=peft.lora_dropout,
        target_modules="all-linear" if targets == ["all-linear"] else list(targets),
        use_dora=peft.use_dora,
        use_rslora=peft.use_rslora,
        modules_to_save=to_save or None,
        ensure_weight_tying=ties_embeddings(model) and any(name in to_save for name in embeddings),
        task_type=task_type,
    )
    try:
        # Adapter weights are created in float32 (PEFT's default) even over a bfloat16 base.
        model = get_peft_model(model, lora)
    except ValueError as error:
        raise HalyardError(
            f"model.peft.target_modules={list(targets)}, model.peft.modules_to_save={to_save}: {error}"
        ) from None
    for parameter in model.parameters():  # modules_to_save copies keep the base's dtype: train them in float32 too
        if parameter.requires_grad and parameter.dtype != torch.float32:
            parameter.data = parameter.data.float()  # `.data`: a tied matrix stays one parameter
    return model


def embedding_module_names(model) -> list[str]:
    """The names (last part, as PEFT matches them) of the input embeddings and the output head, e.g.
    ["embed_tokens", "lm_head"]; a model without an output head (a sequence classifier) gives its embeddings only."""
    names = {id(module): name.rsplit(".", 1)[-1] for name, module in model.named_modules()}
    head = model.get_output_embeddings()
    return [names[id(model.get_input_embeddings())], *([names[id(head)]] if head is not None else [])]


def ties_embeddings(model) -> bool:
    """Whether the output head is the input embedding matrix itself (tie_word_embeddings), not a copy."""
    head = model.get_output_embeddings()
    return head is not None and head.weight is model.get_input_embeddings().weight


def fit_embeddings_to_tokenizer(model, settings: ModelConfig) -> None:
    """Grow the embeddings (and the head, tied or not) to the tokenizer's length when model.add_special_tokens gave
    it ids past their last row, before LoRA wraps the model. transformers initializes the new rows from the mean and
    covariance of the others, so a new token starts as an average token, not noise; under the run's seed, the
    policy and a frozen reference copy get the same rows. Never shrinks: many models carry spare rows (Qwen), and
    tokens added there reuse them."""
    if not settings.add_special_tokens:
        return
    size = len(load_tokenizer(settings)[0])
    rows = model.get_input_embeddings().weight.shape[0]
    if size <= rows:
        logger.info(f"model.add_special_tokens: the embeddings' {rows} rows hold the tokenizer's {size} ids already")
        return
    model.resize_token_embeddings(size)
    logger.info(f"model.add_special_tokens: embeddings resized from {rows} to {size} rows")


@torch.no_grad()
def verify_packing_isolation(model, attn_implementation: str) -> None:
    """Run two short examples packed into one row and separately: their logits must agree, or packing would let
    examples attend to each other. Checked on the real model before training, never assumed."""
    was_training = model.training
    model.eval()
    vocab = model.config.vocab_size
    first, second = (torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (5, 7))
    row = _concatenate_for_check(first, second)
    batch = collate_packed([row], pad_token_id=0)
    device = next(model.parameters()).device
    packed = model(input_ids=batch["input_ids"].to(device), position_ids=batch["position_ids"].to(device)).logits[0]
    alone = [model(input_ids=torch.tensor([ids], device=device)).logits[0] for ids in (first, second)]
    difference = (packed - torch.cat(alone)).abs().max().item()
    model.train(was_training)
    if difference > 1e-3:
        raise HalyardError(
            f"data.packing=true would let packed examples attend to each other with "
            f"model.attn_implementation={attn_implementation} (logits differ by {difference:.3g}); use sdpa, eager or "
            f"flash_attention_2, or set data.packing=false"
        )
    logger.info(f"packing verified: packed and separate logits agree to {difference:.1e}")


def _concatenate_for_check(first: list[int], second: list[int]) -> PackedExample:
    return PackedExample(first + second, [IGNORE_INDEX] * (len(first) + len(second)), [len(first), len(second)])
