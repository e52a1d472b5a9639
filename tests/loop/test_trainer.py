"""The trainers' seams: each loss's settings reach its loss (hand-derived values), and the one log-prob path."""

import math

import pytest
import torch

import launch
from conftest import DEMO_TRAIN
from train.app.loss_registry import builtin_losses, loss_spec
from train.loop.trainer import forward_supervised
from train.objectives.losses import IGNORE_INDEX, masked_nll_sum, selected_sequence_logps
from train.objectives.preference import PairLogps


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


# Summed log-probs of one pair: the policy prefers chosen by 3 nats, the reference by 1, so the margin is 2.
LOGPS = PairLogps(
    policy_chosen=torch.tensor([-3.0]),
    policy_rejected=torch.tensor([-6.0]),
    reference_chosen=torch.tensor([-4.0]),
    reference_rejected=torch.tensor([-5.0]),
    chosen_tokens=torch.tensor([2]),  # SimPO: mean token log-probs -1.5 and -2
    rejected_tokens=torch.tensor([3]),
)
CASES = {  # loss and its non-default settings: the loss of that pair, derived by hand
    "dpo beta": (["loss=dpo", "loss.beta=0.3"], softplus(-0.3 * 2)),
    "cdpo label_smoothing": (
        ["loss=cdpo", "loss.beta=0.3", "loss.label_smoothing=0.2"],
        0.8 * softplus(-0.3 * 2) + 0.2 * softplus(0.3 * 2),
    ),
    "ipo tau": (["loss=ipo", "loss.tau=0.4"], (2 - 1 / (2 * 0.4)) ** 2),
    "simpo beta gamma": (
        ["loss=simpo", "loss.beta=1.5", "loss.gamma_beta_ratio=0.3"],
        softplus(-1.5 * ((-1.5 - -2.0) - 0.3)),
    ),
    # Per token: policy -1.5 and -2, reference -2 and -5/3, so the margin is 0.5 + 1/3.
    "ipo length_normalized": (["loss=ipo", "loss.tau=0.4", "loss.length_normalized=true"], (5 / 6 - 1.25) ** 2),
    "rdpo label_flip_rate": (
        ["loss=rdpo", "loss.beta=0.3", "loss.label_flip_rate=0.2"],
        (0.8 * softplus(-0.6) - 0.2 * softplus(0.6)) / 0.6,
    ),
    "hinge beta": (["loss=hinge", "loss.beta=0.3"], 1 - 0.3 * 2),
    # Rewards 0.3 * (-3 + 4) = 0.3 (chosen) and 0.3 * (-6 + 5) = -0.3 (rejected).
    "apo_zero beta": (["loss=apo_zero", "loss.beta=0.3"], (1 - sigmoid(0.3)) + sigmoid(-0.3)),
    "apo_down beta": (["loss=apo_down", "loss.beta=0.3"], sigmoid(0.3) + (1 - sigmoid(0.6))),
    "rpo nll_weight": (["loss=rpo", "loss.beta=0.3", "loss.nll_weight=0.5"], softplus(-0.6) + 0.5 * 3 / 2),
    "cpo beta nll_weight": (["loss=cpo", "loss.beta=0.3", "loss.nll_weight=0.5"], softplus(-0.3 * 3) + 0.5 * 3 / 2),
    "orpo odds_ratio_weight": (
        ["loss=orpo", "loss.odds_ratio_weight=0.2"],
        1.5 + 0.2 * softplus(-((-1.5 - math.log(1 - math.exp(-1.5))) - (-2 - math.log(1 - math.exp(-2))))),
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_paired_loss_reads_its_own_settings(case):
    overrides, expected = CASES[case]
    cfg = launch.compose_config(["model=tiny", f"datasets=[{DEMO_TRAIN}]", *overrides])
    trainer = loss_spec(cfg).trainer.__new__(loss_spec(cfg).trainer)  # the loss alone: no model, no data
    trainer.settings = cfg.loss  # what BasicTrainer.__init__ does with the validated settings
    assert trainer.loss(LOGPS).losses.item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("name", sorted(builtin_losses()))
def test_every_built_in_loss_declares_a_settings_class_its_yaml_composes_to(name):
    cfg = launch.compose_config(["model=tiny", f"datasets=[{DEMO_TRAIN}]", f"loss={name}"])
    assert type(cfg.loss) is loss_spec(cfg).trainer.settings_class


def test_the_log_prob_path_matches_full_logits(tiny_cache):
    """Logits only where a label follows, float32 in chunks: the same sums as a log-softmax over full logits."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_cache / "tiny-llama")
    input_ids = torch.randint(0, model.config.vocab_size, (3, 12), generator=torch.Generator().manual_seed(0))
    labels = input_ids.clone()
    labels[:, :5] = IGNORE_INDEX
    labels[1, 9:] = IGNORE_INDEX
    batch = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels}
    logits, keep = forward_supervised(model, batch)
    assert logits.shape == (int((labels[:, 1:] != IGNORE_INDEX).sum()), model.config.vocab_size)
    sums, counts = selected_sequence_logps(logits, labels, keep, chunk_size=5)
    full = model(input_ids=input_ids).logits
    for row in range(3):
        expected = -masked_nll_sum(full[row : row + 1], labels[row : row + 1]).total
        assert sums[row].item() == pytest.approx(expected.item(), rel=1e-5)
    assert counts.tolist() == [7, 4, 7]
