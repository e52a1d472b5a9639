"""Throughput accounting against hand-derived numbers."""

import dataclasses

import pytest
import torch

from train.batching.collate import collate, collate_packed
from train.batching.layout import Layout
from train.data.store import IGNORE_INDEX, Example, PackedExample, PackedItems, PairExample, UnpairedExample
from train.loop.throughput import (
    ModelFlops,
    PassCounts,
    PassFlops,
    Throughput,
    Work,
    model_flops,
    pass_counts,
    peak_flops_per_second,
    trained_work,
)

X = IGNORE_INDEX


def test_work_of_padded_and_packed_batches():
    padded = collate([Example([1, 2, 3], [X, 2, 3]), Example([1, 2, 3, 4, 5], [X, X, 3, 4, 5])], pad_token_id=0)
    packed = collate_packed([PackedExample([1, 2, 3, 4, 5], [X, 2, X, 4, 5], lengths=[2, 3])], pad_token_id=0)
    # A causal sequence of T tokens attends to T (T + 1) / 2 (query, key) pairs: token i sees i + 1 tokens.
    # padded: 3 + 5 tokens, 2 + 3 supervised (the head runs where they are predicted), 3*4/2 + 5*6/2 pairs; 2 x 5 slots
    assert trained_work(padded) == Work(trained=PassCounts(8, 5, 6 + 15), supervised_tokens=5, slots=10, sequences=2)
    # packed: sequences of 2 and 3 tokens in one row, 1 + 2 supervised, 2*3/2 + 3*4/2 pairs (none across them)
    assert trained_work(packed) == Work(trained=PassCounts(5, 3, 3 + 6), supervised_tokens=3, slots=5, sequences=2)
    assert trained_work(padded).tokens == 8  # the input tokens of tokens_per_second


def test_rates_padding_and_mfu_hand_derived():
    trained = PassFlops(per_token=6 * 100, per_head_position=6 * 10, per_attended_pair=12 * 2 * 3)
    flops = ModelFlops(trained=trained, forward_only=PassFlops(0, 0, 0), reference=PassFlops(0, 0, 0))
    throughput = Throughput(flops, peak_flops=1000.0, n_processes=2)
    throughput.add(Work(trained=PassCounts(8, 5, 21), supervised_tokens=5, slots=10, sequences=2), seconds=2.0)
    report = throughput.report()
    expected = 6 * 100 * 8 + 6 * 10 * 5 + 12 * 2 * 3 * 21  # body x tokens + head x positions + attention x pairs
    assert report["mfu"] == pytest.approx(expected / 2.0 / 2000.0)
    assert (report["tokens_per_second"], report["supervised_tokens_per_second"]) == (4.0, 2.5)
    assert report["padding_fraction"] == pytest.approx(0.2) and report["examples"] == 2
    assert throughput.report()["tokens_per_second"] == 0.0  # the window restarts after each report


def test_work_survives_the_all_reduce_tensor():
    work = Work(PassCounts(1, 2, 3), PassCounts(4, 5, 6), PassCounts(7, 8, 9), 10, 11, 12)
    assert Work.from_tensor(work.as_tensor()) == work and work + work == Work.from_tensor(2 * work.as_tensor())


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
    # A forward: 2 per weight and 4 x layers x hidden per attended pair; with the backward, 6 and 12
    forward = PassFlops(2 * body, 2 * vocab * hidden, 4 * layers * hidden)
    assert model_flops(tiny_model, lm_head=True) == ModelFlops(
        trained=PassFlops(6 * body, 6 * vocab * hidden, 12 * layers * hidden), forward_only=forward, reference=forward
    )
    lora = get_peft_model(copy.deepcopy(tiny_model), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    adapters = layers * 4 * ((hidden + hidden) + (hidden + kv))  # A (r x in) and B (out x r) of q and v
    # LoRA: the frozen base needs no weight gradients (4 FLOPs per weight, the head too), the adapters 6; the
    # reference is the base alone (adapters switched off)
    assert model_flops(lora, lm_head=True) == ModelFlops(
        trained=PassFlops(4 * body + 6 * adapters, 4 * vocab * hidden, 12 * layers * hidden),
        forward_only=PassFlops(2 * (body + adapters), 2 * vocab * hidden, 4 * layers * hidden),
        reference=forward,
    )


# A 2-layer Llama small enough to count by hand: hidden 8, MLP 16, vocabulary 32 (tied), 2 heads of 4.
# Body weights: per layer q, k, v, o 4 x 8 x 8 = 256, MLP 3 x 8 x 16 = 384, 2 norms 2 x 8 = 16: 656;
# 2 layers and the final norm: 2 x 656 + 8 = 1320. Head 32 x 8 = 256. Attention: layers x hidden = 16.
BODY, HEAD, LAYERS_X_HIDDEN = 1320, 256, 16


@pytest.fixture(scope="module")
def small_flops() -> ModelFlops:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=32, hidden_size=8, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, tie_word_embeddings=True,
    )  # fmt: skip
    flops = model_flops(LlamaForCausalLM(config), lm_head=True)
    assert flops.trained == PassFlops(6 * BODY, 6 * HEAD, 12 * LAYERS_X_HIDDEN)
    return flops


def _example(prompt: int, response: int, first: int = 1) -> Example:
    ids = list(range(first, first + prompt + response))
    return Example(ids, [X] * prompt + ids[prompt:])


def test_kto_counts_its_mismatched_sequences_as_forwards_only_by_hand(small_flops):
    """KTO trains on its matched sequences; each mismatched one (a prompt with the next example's completion) gets a
    policy forward without gradients and a reference forward, for the KL estimate, and no backward."""
    from train.objectives.kto import KTOTrainer

    trainer = KTOTrainer.__new__(KTOTrainer)  # the counting alone: no model, no data
    trainer.pad_token_id = 0
    a = UnpairedExample(_example(prompt=3, response=2), desirable=True)  # 5 tokens
    b = UnpairedExample(_example(prompt=2, response=4, first=10), desirable=False)  # 6 tokens
    batch = trainer.collate([a, b], Layout.PADDED, successors=[b, a])
    work = trainer.batch_work(batch)
    # trained (matched): a (5 tokens, 2 supervised) and b (6, 4): pairs 5*6/2 + 6*7/2 = 15 + 21
    assert work.trained == PassCounts(tokens=11, head_positions=6, attended_pairs=36)
    # forward only (mismatched): a's prompt + b's completion (3 + 4 = 7, 4 supervised), b's + a's (2 + 2 = 4, 2):
    # pairs 7*8/2 + 4*5/2 = 28 + 10
    assert work.forward_only == PassCounts(tokens=11, head_positions=6, attended_pairs=38)
    assert work.reference == PassCounts(tokens=22, head_positions=12, attended_pairs=74)  # all four sequences
    trained = 6 * BODY * 11 + 6 * HEAD * 6 + 12 * LAYERS_X_HIDDEN * 36  # 87,120 + 9,216 + 6,912 = 103,248
    forward_only = 2 * BODY * 11 + 2 * HEAD * 6 + 4 * LAYERS_X_HIDDEN * 38  # 29,040 + 3,072 + 2,432 = 34,544
    reference = 2 * BODY * 22 + 2 * HEAD * 12 + 4 * LAYERS_X_HIDDEN * 74  # 58,080 + 6,144 + 4,736 = 68,960
    assert small_flops.of(work) == trained + forward_only + reference == 206_752
    # The same examples packed into one row (and their mismatched sequences into another): the same work.
    packed = trainer.collate([PackedItems([a, b])], Layout.PACKED, successors=[PackedItems([a])])
    assert dataclasses.replace(trainer.batch_work(packed), slots=work.slots) == work  # (packed: fewer slots)
    throughput = Throughput(small_flops, peak_flops=1e6, unit="examples", rows_per_example=2)
    throughput.add(work, seconds=0.5)
    report = throughput.report()
    assert report["mfu"] == pytest.approx(206_752 / 0.5 / 1e6) and report["examples"] == 2
    assert report["tokens_per_second"] == 44  # all 22 tokens the policy ran on, over half a second


def test_shared_prompt_rows_count_the_rejected_response_seeing_the_prompt_by_hand(small_flops):
    """One row per pair, `prompt, chosen, rejected`: the rejected tokens attend to the prompt and to themselves,
    not to the chosen ones; the prompt runs once, through the policy (forward and backward) and the reference."""
    from train.objectives.preference import DPOTrainer

    trainer = DPOTrainer.__new__(DPOTrainer)
    trainer.pad_token_id = 0
    prompt = [1, 2, 3, 4]
    first = PairExample(Example(prompt + [5, 6, 7], [X] * 4 + [5, 6, 7]), Example(prompt + [8, 9], [X] * 4 + [8, 9]))
    second = PairExample(Example([1, 2, 5], [X, X, 5]), Example([1, 2, 6, 7, 8], [X, X, 6, 7, 8]))
    batch = trainer.collate([first, second], Layout.SHARED_PROMPT)
    assert batch["attention_mask"].shape == (2, 1, 9, 9)  # rows of 4 + 3 + 2 = 9 and 2 + 1 + 3 = 6 tokens
    work = trainer.batch_work(batch)
    # Attended pairs. First row: the chosen sequence (prompt 4 + chosen 3 = 7 tokens) 7*8/2 = 28; each of the 2
    # rejected tokens sees the prompt's 4 and the rejected tokens up to itself: 2 x 4 + 2*3/2 = 11. Second row:
    # chosen (2 + 1) 3*4/2 = 6, the 3 rejected tokens 3 x 2 + 3*4/2 = 12. In all 28 + 11 + 6 + 12 = 57.
    # Head: 3 + 2 and 1 + 3 supervised tokens, but the prompt's last position predicts both responses' first token
    # with one logits row: 4 + 3 = 7 positions.
    counts = PassCounts(tokens=9 + 6, head_positions=7, attended_pairs=57)
    assert work == Work(trained=counts, reference=counts, supervised_tokens=9, slots=18, sequences=4)
    # Each pair as two rows: the rejected sequence also attends within its own copy of the prompt, 4*5/2 + 2*3/2
    # pairs more, and runs the prompt's 4 + 2 tokens again.
    separate = pass_counts(collate([first.chosen, second.chosen, first.rejected, second.rejected], pad_token_id=0))
    assert separate.attended_pairs == 57 + 4 * 5 // 2 + 2 * 3 // 2 and separate.tokens == 15 + 4 + 2
    trained = 6 * BODY * 15 + 6 * HEAD * 7 + 12 * LAYERS_X_HIDDEN * 57  # 118,800 + 10,752 + 10,944 = 140,496
    reference = 2 * BODY * 15 + 2 * HEAD * 7 + 4 * LAYERS_X_HIDDEN * 57  # 39,600 + 3,584 + 3,648 = 46,832
    assert small_flops.of(work) == trained + reference == 187_328
    # Precomputed reference log-probs: no reference forward runs, none is counted.
    cached = [
        PairExample(p.chosen, p.rejected, reference_chosen=-1.0, reference_rejected=-2.0) for p in (first, second)
    ]
    assert trainer.batch_work(trainer.collate(cached, Layout.SHARED_PROMPT)).reference == PassCounts()


def test_the_peak_is_measured_once_per_machine_and_cached(tmp_path, monkeypatch):
    from train.loop import throughput

    calls = []
    monkeypatch.setattr(throughput, "measure_matmul_flops", lambda device, dtype: calls.append(dtype) or 5e10)
    first = peak_flops_per_second(None, torch.device("cpu"), bf16=False, cache_dir=tmp_path)
    again = peak_flops_per_second(None, torch.device("cpu"), bf16=False, cache_dir=tmp_path)
    assert first.flops_per_second == again.flops_per_second == 5e10 and calls == [torch.float32]
    assert "measured" in again.source and "float32" in again.source and str(tmp_path) in again.source
    assert peak_flops_per_second(3e9, torch.device("cpu"), bf16=False).source == "config: peak_flops_per_second"


def test_pairs_are_counted_once_under_their_own_name():
    throughput = Throughput(unit="pairs", rows_per_example=2)  # chosen and rejected: two rows of a batch
    throughput.add(Work(trained=PassCounts(8, 5, 21), supervised_tokens=5, slots=10, sequences=16), seconds=1.0)
    report = throughput.report()
    assert report["pairs"] == 8 and "examples" not in report


def test_measuring_the_peak_leaves_the_run_s_random_state_alone():
    """The one run per cache_dir that measures the CPU's peak must draw the same dropout masks as the next."""
    from train.loop.throughput import measure_matmul_flops

    before = torch.get_rng_state()
    assert measure_matmul_flops(torch.device("cpu"), torch.float32, repeats=1) > 0
    assert torch.equal(torch.get_rng_state(), before)
