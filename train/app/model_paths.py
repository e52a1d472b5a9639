"""Where the model and the tokenizer come from, checked before anything loads: a local folder and its files, or a
hub id (cached while offline, or a hub that answers). Imports nothing heavy: validation calls it (train/app/config.py)."""

from __future__ import annotations

import json
import re
import socket
import threading
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlparse

if TYPE_CHECKING:  # config.py imports this module to check model settings
    from train.app.config import ModelConfig

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


def reward_model_problems(key: str, source: str) -> list[str]:
    """Why `source` is not a reward model Halyard can score with (a `loss=rm` run's FINAL/: a local folder whose
    config.json names a sequence classifier with one output, with weights and a tokenizer with a chat template),
    read from its files without loading a weight."""
    path = Path(source).expanduser()
    fix = "give a loss=rm run's FINAL/ (a sequence classifier with one output)"
    if not path.is_dir():
        return [f"{key}={source}: no such folder ({path.resolve()}); {fix}"]
    if not (path / "config.json").exists():
        return [f"{key}={source}: the folder has no config.json, so it is no model folder; {fix}"]
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as error:
        return [f"{key}={source}: its config.json cannot be read ({error}); {fix}"]
    architectures = config.get("architectures") or []
    outputs = config.get("num_labels", len(config.get("id2label") or {}) or None)
    if not any(str(a).endswith("ForSequenceClassification") for a in architectures) or outputs != 1:
        what = ", ".join(map(str, architectures)) or "no architecture"
        return [f"{key}={source}: its config.json describes {what} with {outputs or 'no'} output(s), not a reward "
                f"model; {fix}"]  # fmt: skip
    problems = _folder_problems(key, path, need_weights=True, need_tokenizer=True)
    tokenizer_config = path / "tokenizer_config.json"
    has_template = (path / "chat_template.jinja").exists() or (
        tokenizer_config.exists() and "chat_template" in json.loads(tokenizer_config.read_text())
    )
    if not problems and not has_template:
        problems.append(
            f"{key}={source}: its tokenizer has no chat template, so a prompt and its answer cannot be rendered "
            f"as it was trained on; save the tokenizer with its chat template there"
        )
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
