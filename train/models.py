"""Loading the tokenizer and the model (optionally wrapped with LoRA adapters through PEFT)."""

from __future__ import annotations

import logging
import re
import socket
import threading
from pathlib import Path
from urllib.parse import urlparse

import torch
from accelerate.utils import set_seed
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from train.config import ModelConfig
from train.data import IGNORE_INDEX, PackedExample, collate_packed
from train.errors import HalyardError

logger = logging.getLogger(__name__)

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin", "adapter_model.*")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
HUB_ID = re.compile(r"^[\w.-]+(/[\w.-]+)?$")  # "org/name" (or a legacy "name"): what the hub accepts
HUB_PROBE_SECONDS = 3.0


def model_path_problems(settings: ModelConfig) -> list[str]:
    """Why the model or the tokenizer cannot be loaded from where the config points, found before anything loads:
    a folder that does not exist, lacks config.json, weights or tokenizer files; a hub id that is not cached while
    offline, or while the hub cannot be reached (checked with one connection of at most HUB_PROBE_SECONDS, instead
    of the minute of retries a download would spend)."""
    problems = []
    model, tokenizer = settings.name_or_path, settings.tokenizer_name_or_path or settings.name_or_path
    if model:
        problems += _source_problems("model.name_or_path", model, need_weights=True, need_tokenizer=tokenizer == model)
    if tokenizer and tokenizer != model:
        problems += _source_problems("model.tokenizer_name_or_path", tokenizer, need_weights=False, need_tokenizer=True)
    return problems


def _source_problems(key: str, source: str, need_weights: bool, need_tokenizer: bool) -> list[str]:
    path = Path(source).expanduser()
    if path.is_dir():
        return _folder_problems(key, path, need_weights, need_tokenizer)
    if path.exists():
        return [f"{key}={source} is a file; give the folder that holds config.json and the weights"]
    if source.startswith(("/", ".", "~")) or not HUB_ID.match(source):
        return [
            f"{key}={source}: no such folder ({path.resolve()} does not exist); fix the path (a folder saved with "
            f"save_pretrained, e.g. a run's FINAL/), or give a hub id such as HuggingFaceTB/SmolLM2-135M-Instruct"
        ]
    return _hub_problems(key, source)


def _folder_problems(key: str, path: Path, need_weights: bool, need_tokenizer: bool) -> list[str]:
    problems = []
    is_adapter = (path / "adapter_config.json").exists()  # a PEFT adapter folder names its base model
    if need_weights and not (path / "config.json").exists() and not is_adapter:
        problems.append(
            f"{key}={path}: the folder has no config.json; give the folder saved with save_pretrained (config.json "
            f"and the weights), e.g. a run's FINAL/"
        )
    if need_weights and not any(next(path.glob(pattern), None) for pattern in WEIGHT_PATTERNS):
        problems.append(
            f"{key}={path}: the folder has no weights (model.safetensors, model-*.safetensors with their index, or "
            f"pytorch_model.bin); copy them there, or point at the folder that holds them"
        )
    if need_tokenizer and not any((path / name).exists() for name in TOKENIZER_FILES):
        problems.append(
            f"{key}={path}: the folder has no tokenizer ({', '.join(TOKENIZER_FILES)}); save the tokenizer there, or "
            f"set model.tokenizer_name_or_path to a folder that has one"
        )
    return problems


def _hub_problems(key: str, hub_id: str) -> list[str]:
    from huggingface_hub import constants, try_to_load_from_cache

    cached = isinstance(try_to_load_from_cache(hub_id, "config.json"), str) or isinstance(
        try_to_load_from_cache(hub_id, "tokenizer_config.json"), str
    )
    if constants.HF_HUB_OFFLINE:
        if cached:
            return []
        return [
            f"{key}={hub_id}: no folder of that name here, and as a hub id it is not in the local cache "
            f"({constants.HF_HUB_CACHE}) while the hub is offline (HF_HUB_OFFLINE=1); download it where the hub is "
            f"reachable (`hf download {hub_id}`), or give a local folder"
        ]
    unreachable = _hub_unreachable(constants.ENDPOINT)
    if unreachable is None:
        return []
    fix = "set HF_HUB_OFFLINE=1 to load it from the cache" if cached else "give a local folder"
    return [
        f"{key}={hub_id}: no folder of that name here, and the hub ({constants.ENDPOINT}) cannot be reached "
        f"({unreachable}); {fix}, or run where the hub is reachable"
    ]


def _hub_unreachable(endpoint: str) -> str | None:
    """Why a connection to the hub fails within HUB_PROBE_SECONDS (name lookup included), or None if it opens."""
    url = urlparse(endpoint)
    address = (url.hostname or "", url.port or (443 if url.scheme == "https" else 80))
    outcome: list[str | None] = []

    def probe() -> None:
        try:
            socket.create_connection(address, timeout=HUB_PROBE_SECONDS).close()
            outcome.append(None)
        except OSError as error:
            outcome.append(str(error) or type(error).__name__)

    thread = threading.Thread(target=probe, daemon=True)  # the name lookup has no timeout of its own
    thread.start()
    thread.join(HUB_PROBE_SECONDS)
    return outcome[0] if outcome else f"no answer within {HUB_PROBE_SECONDS:.0f} s"


def build_tokenizer(settings: ModelConfig):
    """The tokenizer, with a pad token (EOS when it has none: padding is masked out of the labels, not matched by id)."""
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
    return tokenizer


def build_model(settings: ModelConfig, seed: int, sharded: bool = False, score_pad_token_id: int | None = None):
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
    logger.info(f"model: {n_total / 1e6:.1f}M parameters, {n_trainable / 1e6:.2f}M trainable")
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
