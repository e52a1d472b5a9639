"""The model the sft and dpo benchmarks train: SmolLM2-135M's real weights, or a larger current layer shape."""

from __future__ import annotations

from pathlib import Path

from transformers import AutoConfig, AutoModelForCausalLM, Qwen2Config


def model_for(args, work: Path, tokenizer) -> tuple[Path, str]:
    """The benchmark's model folder and a description: SmolLM2-135M's real weights, or a larger current shape at
    reduced depth (random init, its own vocabulary size, SmolLM2's tokenizer)."""
    if args.model == "smollm2":
        config = AutoConfig.from_pretrained(args.smollm2)
        return Path(args.smollm2), (
            f"SmolLM2-135M-Instruct, real weights ({config.num_hidden_layers} layers, hidden {config.hidden_size}, "
            f"vocab {config.vocab_size}, tied)"
        )
    # Qwen2.5-0.5B's layer shape (hidden 896, 14 heads, 2 KV heads, MLP 4864, tied 151,936 vocabulary), 6 layers
    config = Qwen2Config(vocab_size=151_936, hidden_size=896, intermediate_size=4864, num_hidden_layers=6,
                         num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True, use_cache=False,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    folder = work / "qwen-shape"
    torch_model = AutoModelForCausalLM.from_config(config)
    torch_model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    n = sum(p.numel() for p in torch_model.parameters()) / 1e6
    return (
        folder,
        f"Qwen2.5-0.5B's layer shape at 6 of 24 layers, random init ({n:.0f}M parameters, tied vocab 151,936)",
    )
