"""Losses against hand-derived values."""

import math

import torch

from train.losses import IGNORE_INDEX, count_supervised_tokens, masked_nll_sum


def test_masked_nll_sum_matches_hand_derived_value():
    # One row, vocab 2. Position 0 predicts token 1 with logits (0, ln 3): p(1) = 3/4.
    # Position 1 would predict token 2 but its label is -100; position 2 predicts nothing (last position).
    logits = torch.tensor([[[0.0, math.log(3.0)], [5.0, -5.0], [1.0, 2.0]]])
    labels = torch.tensor([[IGNORE_INDEX, 1, IGNORE_INDEX]])
    result = masked_nll_sum(logits, labels)
    assert result.count.item() == 1
    assert math.isclose(result.total.item(), -math.log(0.75), rel_tol=1e-6)


def test_masked_nll_sum_sums_over_rows_and_ignores_padding():
    # Uniform logits over a vocab of 4: each supervised token costs ln 4.
    logits = torch.zeros(2, 5, 4)
    labels = torch.tensor([[0, 1, 2, IGNORE_INDEX, IGNORE_INDEX], [IGNORE_INDEX, IGNORE_INDEX, 3, 3, 0]])
    result = masked_nll_sum(logits, labels)
    assert result.count.item() == 2 + 3
    assert math.isclose(result.total.item(), 5 * math.log(4), rel_tol=1e-6)


def test_masked_nll_sum_upcasts_bfloat16_logits():
    logits = torch.zeros(1, 3, 8, dtype=torch.bfloat16)
    labels = torch.tensor([[1, 2, 3]])
    result = masked_nll_sum(logits, labels)
    assert result.total.dtype == torch.float32
    assert math.isclose(result.total.item(), 2 * math.log(8), rel_tol=1e-6)


def test_count_supervised_tokens_skips_the_first_position():
    labels = torch.tensor([[5, 6, IGNORE_INDEX], [IGNORE_INDEX, 7, 8]])
    assert count_supervised_tokens(labels).item() == 3


def test_masked_nll_equals_the_models_own_loss(tiny_cache):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_cache / "tiny-llama")
    input_ids = torch.randint(0, model.config.vocab_size, (3, 12), generator=torch.Generator().manual_seed(0))
    labels = input_ids.clone()
    labels[:, :5] = IGNORE_INDEX
    labels[1, 9:] = IGNORE_INDEX
    output = model(input_ids=input_ids, labels=labels)
    ours = masked_nll_sum(output.logits, labels)
    assert torch.allclose(ours.total / ours.count, output.loss, rtol=1e-6)
