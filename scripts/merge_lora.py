"""Merge a LoRA adapter (FINAL/adapter/ or a step checkpoint's model/ folder) into its base model.

Usage: python scripts/merge_lora.py BASE ADAPTER OUT [--verbose]
Writes OUT as a plain Hugging Face model folder (safetensors) with the run's tokenizer (the adapter folder's, else the
base model's; embeddings grown to it where the run added tokens) and a model card
(README.md: the base model, with its hub id where the folder says it, the adapter, and the run's tags and datasets).
The libraries' loading bars and known warnings are kept out unless --verbose.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def merge(base: Path, adapter: Path, out: Path) -> Path:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from train.loop.card import render_merged
    from train.loop.run_files import MODEL_CARD_FILE

    model = AutoModelForCausalLM.from_pretrained(base)
    # The run's tokenizer where the adapter folder has one: it carries model.add_special_tokens and the chat template
    # the run trained with. Embeddings grown for added tokens are grown on the base too (the adapter holds them).
    tokenizer = AutoTokenizer.from_pretrained(adapter if (adapter / "tokenizer_config.json").exists() else base)
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer))
    merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    merged.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    (out / MODEL_CARD_FILE).write_text(render_merged(str(base), adapter))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("base", type=Path, help="the base model folder the adapter was trained on")
    parser.add_argument("adapter", type=Path, help="a PEFT adapter folder (adapter_config.json + weights)")
    parser.add_argument("out", type=Path, help="where to write the merged model")
    parser.add_argument("--verbose", action="store_true", help="let the libraries' progress bars and warnings through")
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    from train.loop.progress import quiet_libraries

    quiet_libraries(verbose=args.verbose)
    print(merge(args.base, args.adapter, args.out))


if __name__ == "__main__":
    main()
