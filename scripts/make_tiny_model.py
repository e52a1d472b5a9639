"""Build a tiny random-init Llama and a byte-level BPE tokenizer with a chat template, offline, for tests.

The tokenizer is trained in a fraction of a second on the demo data plus a fixed vocabulary; the model has 2 layers
and about 0.3M parameters. Deterministic for a given seed.

Usage: python scripts/make_tiny_model.py OUT_DIR [--template chatml|llama3|inst] [--seed 0]
"""

from __future__ import annotations

import argparse
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# Three common chat template styles. None has {% generation %} markers: labels are derived from the rendering.
TEMPLATES = {
    "chatml": {
        "special": ["<|im_start|>", "<|im_end|>"],
        "eos": "<|im_end|>",
        "bos": None,
        "template": (
            "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
            "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
        ),
    },
    "llama3": {
        "special": ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|end_of_text|>"],
        "eos": "<|end_of_text|>",
        "bos": "<|begin_of_text|>",
        "template": (
            "{{ bos_token }}{% for message in messages %}<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n"
            "{{ message['content'] | trim }}<|eot_id|>{% endfor %}"
            "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
        ),
    },
    "inst": {
        "special": ["<s>", "</s>"],
        "eos": "</s>",
        "bos": "<s>",
        "template": (
            "{% for message in messages %}{% if message['role'] == 'user' %}{{ bos_token }}[INST] {{ message['content'] }} [/INST]"
            "{% elif message['role'] == 'system' %}<<SYS>>{{ message['content'] }}<</SYS>>"
            "{% else %} {{ message['content'] }}{{ eos_token }}{% endif %}{% endfor %}"
        ),
    },
}


def corpus() -> list[str]:
    lines = [
        line for path in sorted((REPO / "data" / "demo").glob("*.jsonl")) for line in path.read_text().splitlines()
    ]
    lines += ["system user assistant", "The quick brown fox jumps over the lazy dog. 0 1 2 3 4 5 6 7 8 9"] * 4
    return lines


def build_tokenizer(style: str):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    spec = TEMPLATES[style]
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600, special_tokens=spec["special"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    backend.train_from_iterator(corpus(), trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=spec["eos"], bos_token=spec["bos"])
    tokenizer.chat_template = spec["template"]
    return tokenizer


def build_model(vocab_size: int, tokenizer, seed: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
        pad_token_id=None,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config)


def make(out: Path, style: str = "chatml", seed: int = 0) -> Path:
    tokenizer = build_tokenizer(style)
    model = build_model(len(tokenizer), tokenizer, seed)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--template", choices=sorted(TEMPLATES), default="chatml")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(make(args.out, args.template, args.seed))


if __name__ == "__main__":
    main()
