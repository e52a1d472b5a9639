"""Answer a prompt with a model folder through its chat template (greedy decoding).

CHECKPOINT is a Hugging Face model folder (a base model, or a run's FINAL/), a step checkpoint (step-N/), or a PEFT
adapter folder (FINAL/adapter/, or a LoRA run's step-N/), which is loaded on top of the base model it names.

Usage: python scripts/generate.py CHECKPOINT --prompt "What is the capital of France?" [--max-new-tokens 64]
"""

from __future__ import annotations

import argparse
from pathlib import Path


def model_folder(checkpoint: Path) -> Path:
    if (checkpoint / "trainer_state.json").exists():  # a step checkpoint: its model is in model/
        if not (checkpoint / "model").is_dir():
            raise SystemExit(f"{checkpoint} was written under FSDP and holds only shards; chat with the run's FINAL/")
        return checkpoint / "model"
    return checkpoint


def load(checkpoint: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = model_folder(checkpoint)
    if (folder / "adapter_config.json").exists():
        from peft import AutoPeftModelForCausalLM  # loads the base model named in adapter_config.json

        return AutoPeftModelForCausalLM.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)
    return AutoModelForCausalLM.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)


def answer(model, tokenizer, prompt: str, max_new_tokens: int) -> str:
    import torch

    messages = [{"role": "user", "content": prompt}]
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        output = model.generate(
            **inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id
        )
    return tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    args = parser.parse_args()
    model, tokenizer = load(args.checkpoint)
    print(answer(model.eval(), tokenizer, args.prompt, args.max_new_tokens))


if __name__ == "__main__":
    main()
