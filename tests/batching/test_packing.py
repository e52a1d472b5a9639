"""Packing: exact rows, no cross-contamination, and the same loss and gradients as the examples unpacked."""

import math

import pytest
import torch
from packing_helpers import pack_examples, packing_efficiency

from conftest import DEMO_TRAIN, read_metrics, run_cli
from train.app.models import verify_packing_isolation
from train.batching.collate import collate, collate_packed
from train.batching.layout import Layout
from train.data.store import IGNORE_INDEX, Example, PackedExample
from train.errors import HalyardError
from train.objectives.losses import count_loss_units, selected_nll_sum, supervised_positions


def example(length: int, start: int) -> Example:
    ids = list(range(start, start + length))
    return Example(ids, [IGNORE_INDEX] * 2 + ids[2:])


def test_best_fit_decreasing_rows_are_exact():
    examples = [example(n, 10 * i) for i, n in enumerate([6, 3, 5, 2, 4])]
    rows = pack_examples(examples, max_length=8)
    # Longest first: 6 opens row 0; 5 opens row 1; 4 opens row 2; 3 fits best in row 1 (room 3); 2 in row 0 (room 2).
    assert [row.lengths for row in rows] == [[6, 2], [5, 3], [4]]
    assert rows[0].input_ids == examples[0].input_ids + examples[3].input_ids
    assert rows[0].labels == examples[0].labels + [IGNORE_INDEX, IGNORE_INDEX]  # each start is never a target
    assert packing_efficiency(rows, 8) == pytest.approx(20 / 24)
    batch = collate_packed(rows, pad_token_id=0)
    assert batch["position_ids"][0].tolist() == [0, 1, 2, 3, 4, 5, 0, 1]
    assert batch["position_ids"][2].tolist() == [0, 1, 2, 3, 0, 1, 2, 3]  # the padding tail is its own segment
    assert batch["labels"][2, 4:].tolist() == [IGNORE_INDEX] * 4
    assert batch["example_ids"][1].tolist() == [2, 2, 2, 2, 2, 3, 3, 3] and batch["segment_lengths"].tolist() == [
        6,
        2,
        5,
        3,
        4,
    ]
    assert "attention_mask" not in batch


@pytest.fixture(scope="module")
def model_and_examples(tiny_cache):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_cache / "tiny-llama", attn_implementation="sdpa")
    model.config.use_cache = False
    generator = torch.Generator().manual_seed(0)
    examples = []
    for length in (9, 30, 4, 17, 23, 12):
        ids = torch.randint(0, model.config.vocab_size, (length,), generator=generator).tolist()
        prompt = length // 3
        examples.append(Example(ids, [IGNORE_INDEX] * prompt + ids[prompt:]))
    return model, examples


@pytest.mark.parametrize("reduction", ["token", "sequence"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_loss_and_gradients_equal_unpacked(model_and_examples, reduction, attn):
    model, examples = model_and_examples
    model.config._attn_implementation = attn

    def loss_and_grads(batch):
        model.zero_grad()
        keep = supervised_positions(batch["labels"])
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
        result = selected_nll_sum(
            model(**inputs, logits_to_keep=keep).logits,
            batch["labels"],
            keep,
            reduction,
            example_ids=batch.example_ids,
        )
        units = count_loss_units(batch["labels"], reduction, batch.example_ids)
        assert units == result.count
        (result.total / result.count).backward()
        return (result.total / result.count).item(), {n: p.grad.clone() for n, p in model.named_parameters()}

    unpacked_loss, unpacked_grads = loss_and_grads(collate(examples, pad_token_id=0))
    rows = pack_examples(examples, max_length=48)
    assert len(rows) < len(examples)
    packed_loss, packed_grads = loss_and_grads(collate_packed(rows, pad_token_id=0))
    assert packed_loss == pytest.approx(unpacked_loss, rel=1e-5)
    for name, grad in unpacked_grads.items():
        assert (packed_grads[name] - grad).norm() <= 1e-5 * grad.norm() + 1e-9, name


def test_a_backend_that_lets_examples_attend_to_each_other_is_refused(model_and_examples):
    model, _ = model_and_examples
    model.config._attn_implementation = "sdpa"
    verify_packing_isolation(model, "sdpa")
    model.config.use_cache = True  # transformers then ignores the restarting position_ids: contamination
    try:
        with pytest.raises(HalyardError, match="would let packed examples attend to each other"):
            verify_packing_isolation(model, "sdpa")
    finally:
        model.config.use_cache = False


@pytest.mark.slow
def test_packed_training_through_the_cli(tiny_cache):
    args = [
        "model=tiny",
        f"cache_dir={tiny_cache}",
        f"datasets=[{DEMO_TRAIN}]",
        "lr=3e-3",
        "n_epochs=3",
        "log_every_steps=5",
    ]
    result = run_cli([*args, "exp_name=packed", "data.packing=true", "model.batch_size=2"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "packing verified" in result.stderr and "efficiency" in result.stderr
    rows = read_metrics(tiny_cache / "packed")
    assert rows[-1]["loss/train"] < 0.7 * rows[0]["loss/train"]
    assert rows[-1]["padding_fraction"] < 0.15 and rows[-1]["examples"] == 3 * 123
    assert all(0 < row["mfu"] <= 1 for row in rows if "mfu" in row)  # a measured peak, not a noisy one
    too_few = run_cli([*args, "exp_name=packed_few", "data.packing=true", "model.batch_size=64"])
    assert too_few.returncode == 2 and "Traceback" not in too_few.stderr
    assert (
        "the training data packs into 38 rows (123 examples in rows of up to 128 tokens, from model.max_length=128), "
        "fewer than model.batch_size=64 packed rows" in too_few.stderr
    )
    # Packing with a loss that does not support it is refused at validation: tests/app/test_config.py.


def test_packed_example_type():
    assert PackedExample([1], [IGNORE_INDEX], [1]).lengths == [1]


# ---- packed preference data: whole pairs (or unpaired examples) per row ----


def _preference_trainer(trainer_class, model, reference):
    """The parts of a trainer that collate and batch_loss use, without building a run."""
    from types import SimpleNamespace

    from accelerate import Accelerator

    trainer = SimpleNamespace(
        pad_token_id=0, uses_reference=True, reference_model=reference, model=model,
        settings=trainer_class.settings_class(beta=0.5), accelerator=Accelerator(cpu=True),
    )  # fmt: skip
    for name in ("collate", "_collate_packed", "batch_loss", "loss", "reference_logps", "before_step", "kl_estimate"):
        if hasattr(trainer_class, name):
            setattr(trainer, name, getattr(trainer_class, name).__get__(trainer))
    return trainer


def _pairs_and_models(model_and_examples):
    """Six pairs (a shared prompt, responses of different lengths) and a reference that differs from the policy."""
    import copy

    from train.data.store import PairExample

    model, examples = model_and_examples
    model.config._attn_implementation = "sdpa"
    reference = copy.deepcopy(model)
    with torch.no_grad():
        for parameter in reference.parameters():
            parameter.add_(0.02 * torch.randn(parameter.shape, generator=torch.Generator().manual_seed(1)))
    pairs = []
    for a, b in zip(examples, examples[1:] + examples[:1], strict=True):
        prompt = [i for i, label in zip(a.input_ids, a.labels, strict=True) if label == IGNORE_INDEX]
        chosen = Example(a.input_ids, a.labels)
        rejected_ids = prompt + b.input_ids[len(b.input_ids) // 3 :]
        rejected = Example(rejected_ids, [IGNORE_INDEX] * len(prompt) + rejected_ids[len(prompt) :])
        pairs.append(PairExample(chosen, rejected))
    return model, reference, pairs


def _loss_and_grads(trainer, model, batch, with_kl=False):
    model.zero_grad()
    if with_kl:
        trainer.before_step([batch])
    result = trainer.batch_loss(model, batch)
    (result.total / result.count).backward()
    return (result.total / result.count).item(), {n: p.grad.clone() for n, p in model.named_parameters()}


def _assert_same(packed, unpacked):
    assert packed[0] == pytest.approx(unpacked[0], rel=1e-5)
    for name, grad in unpacked[1].items():
        assert (packed[1][name] - grad).norm() <= 1e-5 * grad.norm() + 1e-9, name


def test_packed_pairs_give_the_dpo_loss_and_gradients_of_unpacked_pairs(model_and_examples):
    """Whole pairs packed two and three to a row: the same per-pair log-probs, loss and gradients as one sequence
    per row, with the live reference model packed the same way."""
    from train.batching.sequences import n_sequences
    from train.data.store import PackedItems
    from train.objectives.preference import DPOTrainer

    model, reference, pairs = _pairs_and_models(model_and_examples)
    trainer = _preference_trainer(DPOTrainer, model, reference)
    unpacked = trainer.collate(pairs, Layout.PADDED)
    packed = trainer.collate([PackedItems(pairs[:3]), PackedItems(pairs[3:5]), PackedItems(pairs[5:])], Layout.PACKED)
    assert packed["input_ids"].shape[0] == 3 and n_sequences(packed) == 12 and "attention_mask" not in packed
    # sequence j is pair j's chosen response, 6 + j its rejected one, as in the unpacked rows
    first = packed["example_ids"][0]
    assert first[first >= 0].unique_consecutive().tolist() == [0, 6, 1, 7, 2, 8]
    loss_unpacked = _loss_and_grads(trainer, model, unpacked)
    assert abs(loss_unpacked[0] - math.log(2)) > 1e-3  # the reference differs from the policy
    _assert_same(_loss_and_grads(trainer, model, packed), loss_unpacked)


def test_packed_kto_gives_the_loss_and_gradients_of_unpacked_kto(model_and_examples):
    """KTO packed: matched sequences packed per row, each row's mismatched ones (each prompt with the next
    example's completion, the next row's first for the last) in a row of their own; the same KL estimate, loss
    and gradients as one sequence per row with the same successors."""
    from train.data.store import PackedItems, UnpairedExample
    from train.objectives.kto import KTOTrainer

    reference, model, pairs = _pairs_and_models(model_and_examples)  # this way round the KL estimate is above 0
    items = [UnpairedExample(p.chosen if i % 3 else p.rejected, desirable=bool(i % 3)) for i, p in enumerate(pairs)]
    trainer = _preference_trainer(KTOTrainer, model, reference)
    unpacked = trainer.collate(items, Layout.PADDED, items[1:] + items[:1])
    rows = [PackedItems(items[:2]), PackedItems(items[2:5]), PackedItems(items[5:])]
    packed = trainer.collate(rows, Layout.PACKED, rows[1:] + rows[:1])
    assert packed["input_ids"].shape[0] == 6
    loss_unpacked = _loss_and_grads(trainer, model, unpacked, with_kl=True)
    assert unpacked["kl"].item() > 0
    loss_packed = _loss_and_grads(trainer, model, packed, with_kl=True)
    assert packed["kl"].item() == pytest.approx(unpacked["kl"].item(), rel=1e-5)
    _assert_same(loss_packed, loss_unpacked)


def test_shared_prompt_rows_give_the_dpo_loss_and_gradients_of_separate_rows(model_and_examples):
    """data.shared_prompt=true: each pair as one row `prompt, chosen, rejected`, the rejected tokens masked from the
    chosen ones; the same per-pair log-probs, loss and gradients as the prompt run twice (policy and reference)."""
    from train.batching.collate import collate_shared_prompt
    from train.batching.sequences import n_sequences
    from train.data.store import PairExample
    from train.objectives.preference import DPOTrainer

    model, reference, pairs = _pairs_and_models(model_and_examples)
    prompt = sum(next(i for i, t in enumerate(p.chosen.labels) if t != IGNORE_INDEX) for p in pairs)
    tokens = sum(len(p.chosen.input_ids) + len(p.rejected.input_ids) for p in pairs)
    # Responses that do not start where the prompt ends: unsupervised tokens (reasoning left out of the loss) open
    # the chosen one, longer than the whole rejected sequence; the rows share only what both start with.
    head, chosen_tail, rejected_tail = [5, 6, 7], [20, 21, 22, 23, 24, 25], [30, 31]
    chosen = Example(head + chosen_tail + [40, 41], [IGNORE_INDEX] * 9 + [40, 41])
    rejected = Example(head + rejected_tail, [IGNORE_INDEX] * 4 + rejected_tail[1:])
    pairs.append(PairExample(chosen, rejected))
    trainer = _preference_trainer(DPOTrainer, model, reference)
    separate = trainer.collate(pairs, Layout.PADDED)
    shared = collate_shared_prompt(pairs, pad_token_id=0)
    assert shared["segment_lengths"].sum().item() == tokens - prompt + 11 + 5 - 3  # each prompt once
    assert n_sequences(shared) == 14 and shared["attention_mask"].shape[:2] == (7, 1)
    assert shared["input_ids"][6, :13].tolist() == chosen.input_ids + rejected_tail
    _assert_same(_loss_and_grads(trainer, model, shared), _loss_and_grads(trainer, model, separate))
    # the trainer's collate lays pairs out so in the shared-prompt layout
    assert torch.equal(trainer.collate(pairs, Layout.SHARED_PROMPT)["logit_rows"], shared["logit_rows"])
