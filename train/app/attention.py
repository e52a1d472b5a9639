"""Attention in float32 inside a bfloat16 (or float16) run: model.attention_float32.

Autocast hands torch's scaled-dot-product attention bfloat16 queries, keys and values. On a CPU without AMX tiles
its bfloat16 kernel is about 2x slower than the float32 one for SmolLM2's shapes (docs/BENCHMARKS.md), so there the
attention is upcast, computed in float32 and cast back: a faster step, and a more precise softmax. The masks and
the kernel are transformers' sdpa ones, registered under a name of our own, so padding and packed rows are handled
exactly as with `attn_implementation=sdpa`.
"""

from __future__ import annotations

import torch

FLOAT32_SDPA = "halyard_sdpa_float32"  # the name the model's config carries when attention runs in float32


def float32_sdpa() -> str:
    """Register the float32 sdpa attention with transformers (idempotent) and return the name to load models with."""
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import sdpa_mask

    AttentionInterface.register(FLOAT32_SDPA, _sdpa_in_float32)
    AttentionMaskInterface.register(FLOAT32_SDPA, sdpa_mask)
    return FLOAT32_SDPA


def _sdpa_in_float32(module, query, key, value, attention_mask, **kwargs):
    """transformers' sdpa attention on float32 copies of query, key and value; its output in the dtype sdpa's has."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    device = query.device.type
    # the dtype sdpa's output has in this run: autocast's (RoPE leaves query and key float32 under autocast)
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else query.dtype
    if attention_mask is not None and attention_mask.is_floating_point():  # an additive mask: float32 like the rest
        attention_mask = attention_mask.float()
    with torch.autocast(device, enabled=False):  # autocast would cast them straight back
        output, weights = sdpa_attention_forward(
            module, query.float(), key.float(), value.float(), attention_mask, **kwargs
        )
    return output.to(dtype), weights
