"""Loading the tokenizer and the model (optionally wrapped with LoRA adapters through PEFT)."""

from __future__ import annotations

import logging

import torch
from accelerate.utils import set_seed
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from train.app.config import ModelConfig
from train.batching.collate import collate_packed
from train.data.store import IGNORE_INDEX, PackedExample
from train.data.templates import chat_template_text
from train.errors import HalyardError

logger = logging.getLogger(__name__)

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(dtype: str) -> tuple[str, str]:
    """model.dtype with `auto` decided for this machine, and why: bfloat16 where it is fast (autocast on a CUDA GPU
    that supports it, or a CPU with bf16 matrix instructions: 2.3x float32's speed for a SmolLM2 step on an AMX
    Xeon, docs/BENCHMARKS.md), float32 elsewhere (bf16 emulated on older CPUs is slower than float32)."""
    if dtype != "auto":
        return dtype, "set"
    if torch.cuda.is_available():
        fast = torch.cuda.is_bf16_supported()
        return ("bfloat16" if fast else "float32"), f"CUDA {'with' if fast else 'without'} bf16"
    cpu = torch.cpu
    amx = getattr(cpu, "_is_amx_tile_supported", lambda: False)()
    avx512_bf16 = getattr(cpu, "_is_avx512_bf16_supported", lambda: False)()
    if amx or avx512_bf16:
        return "bfloat16", "this CPU has " + ("AMX" if amx else "AVX512-BF16") + " bf16 instructions"
    return "float32", "this CPU has no bf16 matrix instructions"


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
    source = settings.tokenizer_name_or_path or settings.name_or_path
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
    if chat_template is not None:
        tokenizer.chat_template = chat_template_text(chat_template)
        logger.info(f"chat template: data.chat_template={chat_template}")
    return tokenizer


def build_model(
    settings: ModelConfig,
    seed: int,
    sharded: bool = False,
    score_pad_token_id: int | None = None,
    role: str = "model",
):
    """The causal LM to train, in float32; for LoRA without FSDP, the frozen base in the compute dtype.

    With `score_pad_token_id` set, a sequence classifier with one output (a reward model: the base model and a new,
    randomly initialized score head); it scores the last token that is not the padding token.
    Under FSDP every weight loads in float32: FSDP2 casts to the compute dtype itself, and one sharding unit needs
    one dtype.
    """
    set_seed(seed)  # LoRA and score-head initialization are random
    load_dtype = TORCH_DTYPES[settings.dtype] if settings.use_peft and not sharded else torch.float32
    options = {"dtype": load_dtype, "attn_implementation": settings.attn_implementation}
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
    if settings.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if settings.use_peft:
        model = add_lora(model, settings, task_type="CAUSAL_LM" if score_pad_token_id is None else "SEQ_CLS")
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_total = sum(p.numel() for p in model.parameters())
    if role == "model":
        logger.info(f"model: {n_total / 1e6:.1f}M parameters, {n_trainable / 1e6:.2f}M trainable")
    else:  # `role` says what it is, e.g. "frozen reference" (it is frozen by its trainer)
        logger.info(f"{role}: {n_total / 1e6:.1f}M parameters, none trained")
    return model


def add_lora(model, settings: ModelConfig, task_type: str = "CAUSAL_LM"):
    """LoRA adapters on `settings.peft.target_modules`; for a sequence classifier (SEQ_CLS) its new score head is
    trained whole (PEFT's modules_to_save)."""
    from peft import LoraConfig, get_peft_model

    targets = settings.peft.target_modules
    lora = LoraConfig(
        r=settings.peft.lora_r,
        lora_alpha=settings.peft.lora_alpha,
        lora_dropout=settings.peft.lora_dropout,
        target_modules="all-linear" if targets == ["all-linear"] else list(targets),
        task_type=task_type,
    )
    try:
        # Adapter weights are created in float32 (PEFT's default) even over a bfloat16 base.
        return get_peft_model(model, lora)
    except ValueError as error:
        raise HalyardError(f"model.peft.target_modules={list(targets)}: {error}") from None


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
