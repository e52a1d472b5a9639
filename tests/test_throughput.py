"""Throughput accounting against hand-derived numbers."""

import pytest
import torch

from train.throughput import ModelFlops, Throughput, example_lengths, model_flops, peak_flops_per_second, step_counts


def test_step_counts_for_padded_and_packed_batches():
    padded = {
        "input_ids": torch.zeros(2, 5),
        "attention_mask": torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]),
        "labels": torch.tensor([[-100, 1, 1, -100, -100], [-100, -100, 1, 1, 1]]),
    }
    packed = {
        "input_ids": torch.zeros(1, 6),
        "segment_lengths": torch.tensor([2, 3]),
        "labels": torch.tensor([[-100, 1, -100, 1, 1, -100]]),
    }
    assert example_lengths(packed).tolist() == [2, 3]
    # tokens, supervised, slots, sum of squared lengths, examples
    assert step_counts([padded]).tolist() == [8, 5, 10, 9 + 25, 2]
    assert step_counts([packed]).tolist() == [5, 3, 6, 4 + 9, 2]


def test_rates_padding_and_mfu_hand_derived():
    flops = ModelFlops(per_token=6 * 100, per_supervised_token=6 * 10, per_length_squared=6 * 2 * 3)
    throughput = Throughput(flops, peak_flops=1000.0, n_processes=2)
    throughput.add(torch.tensor([8.0, 5.0, 10.0, 34.0, 2.0]), seconds=2.0)
    report = throughput.report()
    expected = 6 * 100 * 8 + 6 * 10 * 5 + 6 * 2 * 3 * 34  # body x tokens + head x supervised + attention
    assert report["mfu"] == pytest.approx(expected / 2.0 / 2000.0)
    assert (report["tokens_per_second"], report["supervised_tokens_per_second"]) == (4.0, 2.5)
    assert report["padding_fraction"] == pytest.approx(0.2) and report["examples"] == 2
    assert throughput.report()["tokens_per_second"] == 0.0  # the window restarts after each report


@pytest.fixture(scope="module")
def tiny_model(tiny_cache):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_cache / "tiny-llama")


def test_model_flops_count_trained_frozen_head_and_reference_by_hand(tiny_model):
    """The tiny Llama by hand: 2 layers of hidden 64 (4 heads of 16, 2 KV heads), MLP 128, tied vocabulary."""
    import copy

    from peft import LoraConfig, get_peft_model

    config = tiny_model.config
    hidden, mlp, layers, vocab = (
        config.hidden_size,
        config.intermediate_size,
        config.num_hidden_layers,
        config.vocab_size,
    )
    kv = config.num_key_value_heads * hidden // config.num_attention_heads
    per_layer = hidden * hidden * 2 + hidden * kv * 2 + 3 * hidden * mlp + 2 * hidden  # q, o; k, v; MLP; 2 norms
    body = layers * per_layer + hidden  # + the final norm
    full = model_flops(tiny_model, lm_head=True, reference_forward=False)
    assert full == ModelFlops(6 * body, 6 * vocab * hidden, 6 * layers * hidden)
    with_reference = model_flops(tiny_model, lm_head=True, reference_forward=True)
    assert with_reference == ModelFlops(8 * body, 8 * vocab * hidden, 8 * layers * hidden)
    lora = get_peft_model(copy.deepcopy(tiny_model), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    adapters = layers * 4 * ((hidden + hidden) + (hidden + kv))  # A (r x in) and B (out x r) of q and v
    # LoRA: the frozen base needs no weight gradients (4 FLOPs per weight, the head too), the adapters 6
    assert model_flops(lora, lm_head=True, reference_forward=False) == ModelFlops(
        4 * body + 6 * adapters, 4 * vocab * hidden, 6 * layers * hidden
    )


def test_the_peak_is_measured_once_per_machine_and_cached(tmp_path, monkeypatch):
    from train import throughput

    calls = []
    monkeypatch.setattr(throughput, "measure_matmul_flops", lambda device, dtype: calls.append(dtype) or 5e10)
    first = peak_flops_per_second(None, torch.device("cpu"), bf16=False, cache_dir=tmp_path)
    again = peak_flops_per_second(None, torch.device("cpu"), bf16=False, cache_dir=tmp_path)
    assert first.flops_per_second == again.flops_per_second == 5e10 and calls == [torch.float32]
    assert "measured" in again.source and "float32" in again.source and str(tmp_path) in again.source
    assert peak_flops_per_second(3e9, torch.device("cpu"), bf16=False).source == "config: peak_flops_per_second"


def test_pairs_are_counted_once_under_their_own_name():
    throughput = Throughput(unit="pairs", rows_per_example=2)  # chosen and rejected: two rows of a batch
    throughput.add(torch.tensor([8.0, 5.0, 10.0, 34.0, 16.0]), seconds=1.0)
    report = throughput.report()
    assert report["pairs"] == 8 and "examples" not in report
