"""Model settings decided for the machine."""

import torch

from train.app.models import resolve_dtype


def test_auto_dtype_is_bfloat16_only_where_the_hardware_is_fast_at_it(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for amx, avx512_bf16, expected in ((True, True, "bfloat16"), (False, True, "bfloat16"), (False, False, "float32")):
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda amx=amx: amx, raising=False)
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda v=avx512_bf16: v, raising=False)
        dtype, why = resolve_dtype("auto")
        assert dtype == expected and "CPU" in why
    assert resolve_dtype("float32") == ("float32", "set") and resolve_dtype("bfloat16") == ("bfloat16", "set")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    assert resolve_dtype("auto") == ("float32", "CUDA without bf16")
