"""train/loop/distributed.py on one process: the FSDP settings read from accelerate's environment, and the replicated
(unsharded) path of every helper. The sharded path runs over two processes in tests/test_launch.py."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from train.errors import HalyardError
from train.loop.distributed import (
    FsdpSettings,
    clip_gradients,
    fsdp_settings_from_launcher,
    full_state_dict,
    is_sharded,
    local_parameter_fraction,
    no_gradient_sync,
    shard_model,
    unsharded_copy,
)


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=32,
    )  # fmt: skip
    return LlamaForCausalLM(config)


class FakeAccelerator:
    """Records the DDP-side calls an unsharded model must go through."""

    def __init__(self):
        self.calls = []

    def no_sync(self, model):
        self.calls.append("no_sync")
        return torch.no_grad()  # any context manager

    def clip_grad_norm_(self, parameters, max_norm):
        self.calls.append(("clip", max_norm))
        return torch.nn.utils.clip_grad_norm_(list(parameters), max_norm)


@pytest.fixture
def fsdp_environment(monkeypatch):
    for name in ("ACCELERATE_USE_FSDP", "FSDP_VERSION", "FSDP_TRANSFORMER_CLS_TO_WRAP", "FSDP_RESHARD_AFTER_FORWARD"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_no_fsdp_settings_unless_accelerate_asked_for_fsdp(fsdp_environment):
    assert fsdp_settings_from_launcher() is None
    fsdp_environment.setenv("ACCELERATE_USE_FSDP", "false")
    assert fsdp_settings_from_launcher() is None


def test_fsdp_settings_read_from_accelerates_environment(fsdp_environment):
    fsdp_environment.setenv("ACCELERATE_USE_FSDP", "true")
    fsdp_environment.setenv("FSDP_VERSION", "2")
    assert fsdp_settings_from_launcher() == FsdpSettings([], reshard_after_forward=True)
    fsdp_environment.setenv("FSDP_TRANSFORMER_CLS_TO_WRAP", "LlamaDecoderLayer, MLP,")
    fsdp_environment.setenv("FSDP_RESHARD_AFTER_FORWARD", "False")
    assert fsdp_settings_from_launcher() == FsdpSettings(["LlamaDecoderLayer", "MLP"], reshard_after_forward=False)


def test_fsdp_version_1_is_refused_with_the_fix(fsdp_environment):
    fsdp_environment.setenv("ACCELERATE_USE_FSDP", "true")  # FSDP_VERSION unset: accelerate's default, 1
    with pytest.raises(HalyardError, match="fsdp_version: 2"):
        fsdp_settings_from_launcher()


def test_sharding_a_model_without_the_named_layer_class_says_what_to_set():
    with pytest.raises(HalyardError, match="fsdp_transformer_layer_cls_to_wrap"):
        shard_model(tiny_llama(), FsdpSettings(["NoSuchLayer"], True), torch.device("cpu"), bf16=False)


def test_an_unsharded_model_stores_every_parameter_here():
    model = tiny_llama()
    assert not is_sharded(model)
    assert local_parameter_fraction(model) == 1.0


def test_an_unsharded_model_syncs_and_clips_through_the_accelerator():
    model = tiny_llama()
    accelerator = FakeAccelerator()
    with no_gradient_sync(accelerator, model):
        pass
    model(input_ids=torch.tensor([[1, 2, 3]]), labels=torch.tensor([[1, 2, 3]])).loss.backward()
    expected = torch.nn.utils.get_total_norm([p.grad for p in model.parameters()]).item()
    assert clip_gradients(accelerator, model, max_norm=1e-3) == pytest.approx(expected)  # the norm before clipping
    assert accelerator.calls == ["no_sync", ("clip", 1e-3)]
    assert torch.nn.utils.get_total_norm([p.grad for p in model.parameters()]).item() == pytest.approx(1e-3, rel=1e-4)


def test_the_full_state_dict_and_an_unsharded_copy_hold_the_same_weights():
    model = tiny_llama()
    state = full_state_dict(model)
    assert state.keys() == model.state_dict().keys()
    assert all(tensor.device.type == "cpu" for tensor in state.values())
    copy = unsharded_copy(model, state)
    assert copy is not model and type(copy) is type(model)
    ids = torch.tensor([[4, 5, 6, 7]])
    assert torch.equal(copy(input_ids=ids).logits, model(input_ids=ids).logits)
