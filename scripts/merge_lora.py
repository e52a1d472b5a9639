"""Merge a LoRA adapter (FINAL/adapter/ or a step checkpoint's model/ folder) into its base model.

Usage: python scripts/merge_lora.py BASE ADAPTER OUT
Writes OUT as a plain Hugging Face model folder (safetensors) with the base model's tokenizer.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def merge(base: Path, adapter: Path, out: Path) -> Path:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(base)
    merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    merged.save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(base).save_pretrained(out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("base", type=Path, help="the base model folder the adapter was trained on")
    parser.add_argument("adapter", type=Path, help="a PEFT adapter folder (adapter_config.json + weights)")
    parser.add_argument("out", type=Path, help="where to write the merged model")
    args = parser.parse_args()
    print(merge(args.base, args.adapter, args.out))


if __name__ == "__main__":
    main()
