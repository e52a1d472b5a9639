"""Losses against hand-derived values."""

import math

import torch

from train.losses import IGNORE_INDEX, count_loss_units, masked_nll_sum


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


def test_count_loss_units_skips_the_first_position():
    labels = torch.tensor([[5, 6, IGNORE_INDEX], [IGNORE_INDEX, 7, 8], [9, IGNORE_INDEX, IGNORE_INDEX]])
    assert count_loss_units(labels, "token").item() == 3
    assert count_loss_units(labels, "sequence").item() == 2  # the last row has no predicted token


def test_token_and_sequence_reductions_against_hand_derived_values():
    # Row 0: one supervised token with p = 6 / (6 + 1 + 1 + 1) = 2/3. Row 1: three tokens, uniform over 4.
    logits = torch.zeros(2, 4, 4)
    logits[0, 0, 0] = math.log(6.0)
    labels = torch.tensor([[IGNORE_INDEX, 0, IGNORE_INDEX, IGNORE_INDEX], [IGNORE_INDEX, 1, 2, 3]])
    token = masked_nll_sum(logits, labels, "token")
    sequence = masked_nll_sum(logits, labels, "sequence")
    assert (token.count.item(), sequence.count.item()) == (4, 2)
    assert math.isclose(token.total.item() / 4, (math.log(1.5) + 3 * math.log(4)) / 4, rel_tol=1e-6)
    assert math.isclose(sequence.total.item() / 2, (math.log(1.5) + math.log(4)) / 2, rel_tol=1e-6)
    assert torch.equal(count_loss_units(labels, "sequence"), sequence.count)


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
