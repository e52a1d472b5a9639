"""Losses against hand-derived values."""

import math

import pytest
import torch

from train.objectives.losses import (
    IGNORE_INDEX,
    apo_loss,
    bradley_terry_loss,
    count_loss_units,
    cpo_loss,
    dpo_loss,
    fused_linear_nll_sum,
    hinge_loss,
    ipo_loss,
    kto_loss,
    masked_nll_sum,
    orpo_loss,
    robust_dpo_loss,
    rpo_loss,
    selected_sequence_logps,
    simpo_loss,
    supervised_positions,
)


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


# ---- preference losses, against hand-derived values ----

PC, PR, RC, RR = (torch.tensor([v]) for v in (-1.0, -2.0, -1.5, -1.5))  # margin of log-ratios: 1


def test_dpo_hand_derived():
    result = dpo_loss(PC, PR, RC, RR, beta=0.5)
    assert result.losses.item() == pytest.approx(math.log(1 + math.exp(-0.5)), rel=1e-6)  # -log sigmoid(0.5)
    assert (result.chosen_rewards.item(), result.rejected_rewards.item()) == pytest.approx((0.25, -0.25))


def test_dpo_is_ln2_when_policy_equals_reference():
    logps = torch.tensor([-3.0, -7.5])
    assert torch.allclose(dpo_loss(logps, logps * 2, logps, logps * 2, beta=0.1).losses, torch.full((2,), math.log(2)))


def test_cdpo_hand_derived():
    expected = 0.8 * math.log(1 + math.exp(-0.5)) + 0.2 * math.log(1 + math.exp(0.5))
    assert dpo_loss(PC, PR, RC, RR, beta=0.5, label_smoothing=0.2).losses.item() == pytest.approx(expected, rel=1e-6)


def test_ipo_hand_derived():
    assert ipo_loss(PC, PR, RC, RR, tau=0.25).losses.item() == pytest.approx((1 - 1 / 0.5) ** 2)


def test_simpo_hand_derived():
    # mean log-probs -4/2 = -2 and -9/3 = -3; beta 2, gamma/beta 0.5: logits = -2 + 3 - 0.5 = 0.5
    result = simpo_loss(torch.tensor([-4.0]), torch.tensor([-9.0]), torch.tensor([2]), torch.tensor([3]), 2.0, 0.5)
    assert result.losses.item() == pytest.approx(math.log(1 + math.exp(-1.0)), rel=1e-6)
    assert (result.chosen_rewards.item(), result.rejected_rewards.item()) == pytest.approx((-4.0, -6.0))


def test_kto_hand_derived():
    policy, reference = torch.tensor([-1.0, -2.0]), torch.tensor([-1.5, -1.5])  # log-ratios 0.5 and -0.5
    losses, rewards = kto_loss(
        policy,
        reference,
        torch.tensor([True, False]),
        torch.tensor(0.25),
        beta=1.0,
        desirable_weight=1.0,
        undesirable_weight=2.0,
    )
    sigmoid = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    assert losses.tolist() == pytest.approx([1 - sigmoid(0.5 - 0.25), 2 * (1 - sigmoid(0.25 + 0.5))], rel=1e-6)
    assert rewards.tolist() == pytest.approx([0.5, -0.5])


def test_sequence_logps_matches_log_softmax_gather():
    """From logits at the supervised positions only, as the model returns them with logits_to_keep."""
    logits = torch.randn(2, 5, 7, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([[IGNORE_INDEX, 3, 4, IGNORE_INDEX, IGNORE_INDEX], [1, 2, 3, 4, 5]])
    keep = supervised_positions(labels)
    logps, counts = selected_sequence_logps(logits[keep], labels, keep, chunk_size=3)
    assert logps.dtype == torch.float32
    log_probs = torch.log_softmax(logits, dim=-1)
    expected = [log_probs[0, 0, 3] + log_probs[0, 1, 4], sum(log_probs[1, t, labels[1, t + 1]] for t in range(4))]
    assert torch.allclose(logps, torch.stack(expected), atol=1e-6)
    assert counts.tolist() == [2, 4]


@pytest.mark.parametrize("reduction", ["token", "sequence"])
def test_lean_loss_equals_the_naive_loss_with_its_gradients(tiny_cache, reduction):
    """Projection at supervised positions only, float32 in chunks: same loss and gradients as full logits."""
    from transformers import AutoModelForCausalLM

    from train.objectives.losses import selected_nll_sum, supervised_positions

    model = AutoModelForCausalLM.from_pretrained(tiny_cache / "tiny-llama")
    input_ids = torch.randint(0, model.config.vocab_size, (3, 20), generator=torch.Generator().manual_seed(1))
    labels = input_ids.clone()
    labels[:, :8] = IGNORE_INDEX
    labels[2, 14:] = IGNORE_INDEX
    naive = masked_nll_sum(model(input_ids=input_ids).logits, labels, reduction)
    (naive.total / naive.count).backward()
    naive_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    keep = supervised_positions(labels)
    logits = model(input_ids=input_ids, logits_to_keep=keep).logits
    assert logits.shape == (int(keep.sum()), model.config.vocab_size)
    lean = selected_nll_sum(logits, labels, keep, reduction, chunk_size=7)
    (lean.total / lean.count).backward()
    assert lean.count == naive.count
    assert lean.total.item() == pytest.approx(naive.total.item(), rel=1e-6)
    for name, parameter in model.named_parameters():
        assert torch.allclose(parameter.grad, naive_grads[name], rtol=1e-5, atol=1e-8), name


# ---- the objectives added with the loss table: each against its paper's formula, in float64, with gradients ----


def softplus(x: float) -> float:
    """-log sigmoid(-x)."""
    return math.log1p(math.exp(x))


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


# One pair, summed log-probs: policy (-1, -2), reference (-1.5, -1.5): log-ratios 0.5 and -0.5, margin h = 1.
# Token counts 2 and 4: mean token log-probs -0.5 (chosen) and -0.5 (rejected).
PAIR = {"pc": -1.0, "pr": -2.0, "rc": -1.5, "rr": -1.5, "nc": 2, "nr": 4}


def _orpo_expected(lam: float) -> float:
    chosen, rejected = -1.0 / 2, -2.0 / 4
    log_odds = (chosen - math.log(1 - math.exp(chosen))) - (rejected - math.log(1 - math.exp(rejected)))
    return -chosen + lam * softplus(-log_odds)


NEW_LOSSES = {  # name: (the loss of PAIR, from the formula by hand; the call)
    "rdpo": (
        (0.8 * softplus(-0.5) - 0.2 * softplus(0.5)) / 0.6,
        lambda pc, pr, rc, rr, nc, nr: robust_dpo_loss(pc, pr, rc, rr, beta=0.5, label_flip_rate=0.2),
    ),
    "hinge": (1 - 0.5 * 1, lambda pc, pr, rc, rr, nc, nr: hinge_loss(pc, pr, rc, rr, beta=0.5)),
    "apo_zero": (
        (1 - sigmoid(0.25)) + sigmoid(-0.25),
        lambda pc, pr, rc, rr, nc, nr: apo_loss(pc, pr, rc, rr, beta=0.5, anchor="zero"),
    ),
    "apo_down": (
        sigmoid(0.25) + (1 - sigmoid(0.5)),
        lambda pc, pr, rc, rr, nc, nr: apo_loss(pc, pr, rc, rr, beta=0.5, anchor="down"),
    ),
    "rpo": (
        softplus(-0.5) + 0.7 * (1.0 / 2),
        lambda pc, pr, rc, rr, nc, nr: rpo_loss(pc, pr, rc, rr, nc, beta=0.5, nll_weight=0.7),
    ),
    "cpo": (
        softplus(-0.5 * 1.0) + 0.7 * (1.0 / 2),
        lambda pc, pr, rc, rr, nc, nr: cpo_loss(pc, pr, nc, beta=0.5, nll_weight=0.7),
    ),
    "orpo": (_orpo_expected(0.3), lambda pc, pr, rc, rr, nc, nr: orpo_loss(pc, pr, nc, nr, odds_ratio_weight=0.3)),
    # The reward model's scores stand in the policy's place: -log sigmoid(-1 + 2) + 0.1 (-1 - 2)^2.
    "rm": (softplus(-1.0) + 0.1 * 9, lambda pc, pr, rc, rr, nc, nr: bradley_terry_loss(pc, pr, center_coefficient=0.1)),
}


@pytest.mark.parametrize("name", sorted(NEW_LOSSES))
def test_new_objectives_hand_derived_with_gradients(name):
    expected, call = NEW_LOSSES[name]
    tensors = {k: torch.tensor([float(v)], dtype=torch.float64) for k, v in PAIR.items() if k[0] in "pr"}
    nc, nr = torch.tensor([PAIR["nc"]]), torch.tensor([PAIR["nr"]])
    assert call(**tensors, nc=nc, nr=nr).losses.item() == pytest.approx(expected, rel=1e-12)

    def of_policy(pc, pr):
        return call(pc, pr, tensors["rc"], tensors["rr"], nc, nr).losses

    inputs = (tensors["pc"].clone().requires_grad_(), tensors["pr"].clone().requires_grad_())
    assert torch.autograd.gradcheck(of_policy, inputs)


def test_apo_refuses_an_unknown_anchor():
    with pytest.raises(ValueError, match="use 'zero' or 'down'"):
        apo_loss(PC, PR, RC, RR, beta=0.1, anchor="up")


def test_robust_dpo_is_dpo_in_expectation_over_flipped_labels():
    """Its defining property: (1-e) L(h) + e L(-h) with the robust loss equals the clean DPO loss L_dpo(h)."""
    e, h = 0.2, torch.tensor([1.3], dtype=torch.float64)
    zero = torch.zeros(1, dtype=torch.float64)
    robust = lambda m: robust_dpo_loss(m, zero, zero, zero, beta=0.5, label_flip_rate=e).losses  # noqa: E731
    clean = dpo_loss(h, zero, zero, zero, beta=0.5).losses
    assert ((1 - e) * robust(h) + e * robust(-h)).item() == pytest.approx(clean.item(), rel=1e-12)


def _orpo_float64(chosen: float, rejected: float, lam: float) -> tuple[float, float, float]:
    """ORPO's loss of one pair and its derivatives in the mean token log-probs (chosen, rejected), by hand in float64
    with the exact log(1 - e^x)."""

    def log1mexp(x: float) -> float:
        return math.log(-math.expm1(x)) if x > -math.log(2) else math.log1p(-math.exp(x))

    log_odds = (chosen - log1mexp(chosen)) - (rejected - log1mexp(rejected))
    # d log_odds / d chosen = 1 / (1 - e^chosen), d log_odds / d rejected = -1 / (1 - e^rejected)
    weight = lam * sigmoid(-log_odds)  # -d softplus(-log_odds) / d log_odds, times lambda
    return -chosen + lam * softplus(-log_odds), -1 - weight / -math.expm1(chosen), weight / -math.expm1(rejected)


@pytest.mark.parametrize("x", [-1e-3, -1e-4, -1e-6, -1e-8, -2.0])
def test_orpo_float32_keeps_precision_when_a_response_is_nearly_certain(x):
    """Mean token log-prob x near 0 (p = e^x near 1), where 1 - p must not cancel: float32 loss and gradients against
    the float64 formula. log1p(-exp(x)) put errors of 1.3e-2 into both at x = -1e-6; at x = -1e-8, where exp(x)
    rounds to 1, it gave an infinite loss and NaN gradients."""
    lam, tokens = 1.0, torch.tensor([4, 4])
    # pair 0: x on the chosen side, pair 1: on the rejected side; the other response at a mean log-prob of -2
    policy_chosen = torch.tensor([4 * x, 4 * -2.0], requires_grad=True)  # float32: times and over 4 tokens are exact
    policy_rejected = torch.tensor([4 * -2.0, 4 * x], requires_grad=True)
    result = orpo_loss(policy_chosen, policy_rejected, tokens, tokens, odds_ratio_weight=lam)
    result.losses.sum().backward()
    x32 = torch.tensor(x).item()  # the float32 value the loss sees
    for i, (chosen, rejected) in enumerate([(x32, -2.0), (-2.0, x32)]):
        loss, d_chosen, d_rejected = _orpo_float64(chosen, rejected, lam)
        assert result.losses[i].item() == pytest.approx(loss, rel=5e-7)  # float32: a few ulp
        # the inputs are summed log-probs: d / d sum = (d / d mean) / tokens
        assert policy_chosen.grad[i].item() == pytest.approx(d_chosen / 4, rel=5e-6)
        assert policy_rejected.grad[i].item() == pytest.approx(d_rejected / 4, rel=5e-6)


# ---- the fused linear cross-entropy head ----


def _naive_head_loss(hidden, weight, targets, bias=None):
    """Loss and gradients of hidden, weight (and bias) through the full logits: what the fused head must equal."""
    hidden, weight = hidden.detach().requires_grad_(), weight.detach().requires_grad_()
    bias = bias.detach().requires_grad_() if bias is not None else None
    loss = torch.nn.functional.cross_entropy(
        torch.nn.functional.linear(hidden, weight, bias).float(), targets, reduction="sum"
    )
    loss.backward()
    return loss.detach(), hidden.grad, weight.grad, bias.grad if bias is not None else None


def _fused_head_loss(hidden, weight, targets, bias=None, **options):
    hidden, weight = hidden.detach().requires_grad_(), weight.detach().requires_grad_()
    bias = bias.detach().requires_grad_() if bias is not None else None
    loss = fused_linear_nll_sum(hidden, weight, targets, bias=bias, **options)
    loss.backward()
    return loss.detach(), hidden.grad, weight.grad, bias.grad if bias is not None else None


def test_fused_head_hand_derived_on_two_tokens():
    # hidden (1, 0) and (0, 1); weight rows (0, 0), (ln 3, 0), (0, 0): token 0 gets logits (0, ln 3, 0), p = (1, 3, 1)/5
    # and its target 1 costs ln(5/3); token 1 gets logits (0, 0, 0) and its target 2 costs ln 3.
    hidden = torch.eye(2)
    weight = torch.tensor([[0.0, 0.0], [math.log(3), 0.0], [0.0, 0.0]])
    targets = torch.tensor([1, 2])
    loss, grad_hidden, grad_weight, _ = _fused_head_loss(hidden, weight, targets, chunk_size=1)
    assert loss.item() == pytest.approx(math.log(5 / 3) + math.log(3), rel=1e-6)
    assert loss.dtype == torch.float32
    # d loss / d logits = softmax - one_hot: token 0 (1/5, 3/5 - 1, 1/5), token 1 (1/3, 1/3, 1/3 - 1).
    grad_logits = torch.tensor([[0.2, -0.4, 0.2], [1 / 3, 1 / 3, -2 / 3]])
    assert torch.allclose(grad_hidden, grad_logits @ weight, atol=1e-6)
    assert torch.allclose(grad_weight, grad_logits.T @ hidden, atol=1e-6)


@pytest.mark.parametrize("chunk_size", [1, 4, 7, 64])  # 7 rows: chunks that do not divide them, and one chunk
@pytest.mark.parametrize("with_bias", [False, True])
def test_fused_head_equals_the_full_logits_loss_and_gradients(chunk_size, with_bias):
    generator = torch.Generator().manual_seed(0)
    hidden, weight = torch.randn(7, 16, generator=generator), torch.randn(50, 16, generator=generator)
    bias = torch.randn(50, generator=generator) if with_bias else None
    targets = torch.randint(0, 50, (7,), generator=generator)
    expected = _naive_head_loss(hidden, weight, targets, bias)
    got = _fused_head_loss(hidden, weight, targets, bias, chunk_size=chunk_size, kernel="torch")
    for name, want, have in zip(("loss", "hidden", "weight", "bias"), expected, got, strict=True):
        if want is not None:
            assert torch.allclose(have, want, rtol=1e-5, atol=1e-6), name


def test_fused_head_backward_scales_by_the_incoming_gradient():
    generator = torch.Generator().manual_seed(1)
    hidden = torch.randn(5, 8, generator=generator, requires_grad=True)
    weight = torch.randn(11, 8, generator=generator, requires_grad=True)
    targets = torch.randint(0, 11, (5,), generator=generator)
    (fused_linear_nll_sum(hidden, weight, targets, chunk_size=2) * 0.25).backward()
    _, grad_hidden, grad_weight, _ = _naive_head_loss(hidden, weight, targets)
    assert torch.allclose(hidden.grad, 0.25 * grad_hidden, rtol=1e-5, atol=1e-7)
    assert torch.allclose(weight.grad, 0.25 * grad_weight, rtol=1e-5, atol=1e-7)


def test_fused_head_token_weights_weigh_each_token():
    generator = torch.Generator().manual_seed(2)
    hidden, weight = torch.randn(6, 8, generator=generator), torch.randn(13, 8, generator=generator)
    targets = torch.randint(0, 13, (6,), generator=generator)
    token_weights = torch.tensor([0.5, 0.5, 1 / 3, 1 / 3, 1 / 3, 1.0])
    hidden_ref, weight_ref = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    per_token = torch.nn.functional.cross_entropy(hidden_ref @ weight_ref.T, targets, reduction="none")
    expected = (per_token * token_weights).sum()
    expected.backward()
    loss, grad_hidden, grad_weight, _ = _fused_head_loss(
        hidden, weight, targets, token_weights=token_weights, chunk_size=4
    )
    assert torch.allclose(loss, expected, rtol=1e-5)
    assert torch.allclose(grad_hidden, hidden_ref.grad, rtol=1e-5, atol=1e-7)
    assert torch.allclose(grad_weight, weight_ref.grad, rtol=1e-5, atol=1e-7)


def test_fused_head_with_no_targets_is_zero_and_connected():
    hidden = torch.randn(0, 4, requires_grad=True)
    weight = torch.randn(9, 4, requires_grad=True)
    loss = fused_linear_nll_sum(hidden, weight, torch.zeros(0, dtype=torch.long))
    assert loss.item() == 0.0 and loss.dtype == torch.float32
    loss.backward()
    assert hidden.grad.shape == (0, 4) and torch.equal(weight.grad, torch.zeros(9, 4))


def test_fused_head_without_gradients_keeps_no_graph():
    hidden, weight = torch.randn(3, 4, requires_grad=True), torch.randn(9, 4, requires_grad=True)
    targets = torch.tensor([0, 4, 8])
    with torch.no_grad():
        loss = fused_linear_nll_sum(hidden, weight, targets)
    assert loss.grad_fn is None
    assert torch.allclose(loss, _naive_head_loss(hidden, weight, targets)[0], rtol=1e-6)


def test_fused_head_under_bfloat16_autocast_matches_the_autocast_head():
    # The model's head under autocast: a bfloat16 matmul, logits upcast to float32 for the log-softmax.
    generator = torch.Generator().manual_seed(3)
    hidden, weight = torch.randn(9, 32, generator=generator), torch.randn(40, 32, generator=generator) * 0.3
    targets = torch.randint(0, 40, (9,), generator=generator)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = _naive_head_loss(hidden, weight, targets)
        got = _fused_head_loss(hidden, weight, targets, chunk_size=4)
    assert torch.allclose(got[0], expected[0], rtol=1e-5)  # the same bfloat16 logits, the same float32 loss
    assert got[1].dtype == torch.float32 and got[2].dtype == torch.float32  # gradients in the inputs' dtypes
    for want, have in zip(expected[1:3], got[1:3], strict=True):
        assert torch.allclose(have, want, rtol=2e-2, atol=2e-2)


def test_fused_head_bfloat16_inputs_are_close_to_float32():
    generator = torch.Generator().manual_seed(4)
    hidden, weight = torch.randn(8, 32, generator=generator), torch.randn(40, 32, generator=generator) * 0.3
    targets = torch.randint(0, 40, (8,), generator=generator)
    expected = _naive_head_loss(hidden, weight, targets)
    got = _fused_head_loss(hidden.bfloat16(), weight.bfloat16(), targets, chunk_size=3)
    assert got[1].dtype == torch.bfloat16 and got[2].dtype == torch.bfloat16
    assert torch.allclose(got[0], expected[0], rtol=2e-2)
    for want, have in zip(expected[1:3], got[1:3], strict=True):
        assert torch.allclose(have.float(), want, rtol=5e-2, atol=5e-2)


def test_fused_head_refuses_liger_where_it_cannot_run():
    with pytest.raises(ValueError, match="liger"):
        fused_linear_nll_sum(torch.randn(2, 4), torch.randn(5, 4), torch.tensor([1, 2]), kernel="liger")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_liger_fused_head_equals_the_torch_chunks_on_cuda(dtype):
    pytest.importorskip("liger_kernel")
    generator = torch.Generator(device="cuda").manual_seed(5)
    hidden = torch.randn(1000, 256, generator=generator, device="cuda")
    weight = torch.randn(4096, 256, generator=generator, device="cuda") * 0.05
    targets = torch.randint(0, 4096, (1000,), generator=generator, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        torch_chunks = _fused_head_loss(hidden, weight, targets, chunk_size=300, kernel="torch")
        liger = _fused_head_loss(hidden, weight, targets, kernel="liger")
    tolerance = 1e-4 if dtype == torch.float32 else 2e-2
    for name, want, have in zip(("loss", "hidden", "weight"), torch_chunks[:3], liger[:3], strict=True):
        assert torch.allclose(have.float(), want.float(), rtol=tolerance, atol=tolerance), name
