"""model.attention_float32: where null turns it on, and that the upcast attention is transformers' sdpa exactly,
masks included, with float32 inside a bfloat16 autocast run."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from train.app import models
from train.app.attention import FLOAT32_SDPA, float32_sdpa


def test_null_upcasts_low_precision_sdpa_only_on_a_cpu_without_amx(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(models, "cpu_has_amx", lambda: False)
    assert models.resolve_attention_float32(None, "bfloat16", "sdpa") == (
        True,
        "a CPU without AMX: its bfloat16 attention kernel ran about 2x slower than float32's",
    )
    assert models.resolve_attention_float32(None, "float16", "sdpa")[0] is True
    assert models.resolve_attention_float32(None, "float32", "sdpa") == (False, "the model computes in float32")
    assert models.resolve_attention_float32(None, "bfloat16", "eager")[0] is False
    assert models.resolve_attention_float32(False, "bfloat16", "sdpa") == (False, "set")
    monkeypatch.setattr(models, "cpu_has_amx", lambda: True)
    assert models.resolve_attention_float32(None, "bfloat16", "sdpa")[0] is False
    assert models.resolve_attention_float32(True, "bfloat16", "sdpa") == (True, "set")
    monkeypatch.setattr(models, "cpu_has_amx", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert models.resolve_attention_float32(None, "bfloat16", "sdpa")[0] is False


def tiny_llama(attention: str) -> LlamaForCausalLM:
    # without a cache, as in training: with one, transformers builds no block-diagonal mask for packed rows
    config = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, attn_implementation=attention,
                         use_cache=False)  # fmt: skip
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


def batches() -> dict[str, dict[str, torch.Tensor]]:
    torch.manual_seed(1)
    ids = torch.randint(0, 96, (2, 12))
    padded = torch.ones(2, 12, dtype=torch.long)
    padded[1, :5] = 0  # left padding on the second row
    packed = torch.tensor([list(range(5)) + list(range(7))])  # two documents in one row: positions restart
    shared = torch.ones(12, 12, dtype=torch.bool).tril()  # a shared-prompt row's 4D mask (collate_shared_prompt)
    shared[8:, 4:8] = False  # the rejected response does not see the chosen one
    return {
        "padded": {"input_ids": ids, "attention_mask": padded},
        "packed": {"input_ids": ids[:1], "position_ids": packed},
        "shared prompt": {"input_ids": ids[:1], "attention_mask": shared[None, None]},
    }


@pytest.mark.parametrize("batch", ["padded", "packed", "shared prompt"])
def test_the_upcast_attention_is_sdpa_exactly_with_its_masks(batch):
    """In float32 the upcast is a no-op, so the logits must equal sdpa's bit for bit: padding masks, packed rows
    (positions restarting) and the shared prompt's 4D mask reach the kernel the same way."""
    inputs = batches()[batch]
    with torch.no_grad():
        expected = tiny_llama("sdpa")(**inputs).logits
        upcast = tiny_llama(float32_sdpa())(**inputs).logits
    assert torch.equal(upcast, expected)
    if batch == "packed":  # the second document does not see the first: it matches that document alone
        with torch.no_grad():
            alone = tiny_llama("sdpa")(input_ids=inputs["input_ids"][:, 5:]).logits
        assert torch.allclose(upcast[:, 5:], alone, atol=1e-5)


class AttentionKernelDtypes(TorchDispatchMode):
    """Records the dtypes of the query, key and value each attention kernel computes with: below autocast, so after
    its casts (RoPE leaves query and key float32 under autocast; autocast casts them for the kernel)."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[torch.dtype, ...]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if "scaled_dot_product" in func.__name__ and "backward" not in func.__name__:
            self.seen.append(tuple(t.dtype for t in args[:3]))
        return func(*args, **(kwargs or {}))


def test_under_bfloat16_autocast_the_kernel_computes_in_float32():
    """The kernel computes with float32 queries, keys and values (sdpa alone: bfloat16), the layer hands its output
    on in bfloat16 as autocast would, and gradients reach every weight."""
    inputs = batches()["padded"]
    for attention, expected in (("sdpa", torch.bfloat16), (float32_sdpa(), torch.float32)):
        model = tiny_llama(attention).train()
        outputs = []
        model.model.layers[0].self_attn.o_proj.register_forward_hook(
            lambda m, args, out, seen=outputs: seen.append(args[0])
        )
        with AttentionKernelDtypes() as kernels, torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(**inputs).logits
        logits.float().sum().backward()
        assert kernels.seen == [(expected,) * 3] * 2, attention  # both layers
        assert outputs[0].dtype == torch.bfloat16
        assert all(p.grad is not None for p in model.parameters())
    assert model.config._attn_implementation == FLOAT32_SDPA


def test_an_additive_mask_in_bfloat16_is_upcast_with_the_rest():
    """A float mask (0 where a token may attend, the dtype's lowest value where not) in bfloat16, as eager-style
    masks come: the kernel needs it in the queries' dtype, and it hides what the boolean mask hides."""
    model = tiny_llama(float32_sdpa())
    attention = model.model.layers[0].self_attn
    generator = torch.Generator().manual_seed(2)
    query = torch.randn(1, 4, 6, 16, generator=generator, dtype=torch.bfloat16)
    key, value = (torch.randn(1, 2, 6, 16, generator=generator, dtype=torch.bfloat16) for _ in range(2))
    allowed = torch.ones(6, 6, dtype=torch.bool).tril()[None, None]
    additive = torch.zeros(allowed.shape, dtype=torch.bfloat16).masked_fill(~allowed, torch.finfo(torch.bfloat16).min)
    attend = ALL_ATTENTION_FUNCTIONS[FLOAT32_SDPA]
    with torch.no_grad():
        by_bool, _ = attend(attention, query, key, value, allowed, scaling=0.25)
        by_float, _ = attend(attention, query, key, value, additive, scaling=0.25)
    assert by_float.dtype == torch.bfloat16
    assert torch.equal(by_float, by_bool)
