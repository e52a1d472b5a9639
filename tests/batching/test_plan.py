"""The batch plan: the global batch is a pure function of (seed, epoch, step), however it is split; the loader's
workers prepare exactly the batches the main process would."""

import functools

import numpy as np
import pytest
import torch

from train.batching.collate import collate_batch
from train.batching.layout import Layout
from train.batching.plan import (
    GROUP_BATCHES,
    BatchPlan,
    StepBatches,
    auto_micro_batch_tokens,
    split_evenly,
    step_loader,
    token_passes,
)
from train.data.store import Example


def global_batch(plan_args: dict, n_processes: int, accumulation_steps: int, step: int) -> list[int]:
    items = []
    for rank in range(n_processes):
        plan = BatchPlan(**plan_args, n_processes=n_processes, rank=rank, accumulation_steps=accumulation_steps)
        epoch, micro_batches = plan.micro_batches(step)
        assert len(micro_batches) == accumulation_steps
        assert all(len(m) == plan_args["batch_size"] // n_processes // accumulation_steps for m in micro_batches)
        items += [int(i) for m in micro_batches for i in m]
    return items


@pytest.mark.parametrize("grouped", [False, True])
def test_every_split_trains_on_the_same_global_batch(grouped):
    lengths = np.random.default_rng(0).integers(1, 500, 203) if grouped else None
    args = {"n_items": 203, "batch_size": 8, "seed": 3, "lengths": lengths}
    for step in (0, 5, 25, 26, 60):  # 25 steps per epoch: 25 and 26 are in the second epoch
        expected = global_batch(args, 1, 1, step)
        assert len(set(expected)) == 8
        for n_processes, accumulation_steps in ((1, 4), (2, 1), (2, 2), (4, 2)):
            assert global_batch(args, n_processes, accumulation_steps, step) == expected
    first_epoch = [i for step in range(25) for i in global_batch(args, 1, 1, step)]
    assert len(set(first_epoch)) == 200  # no example twice in an epoch (3 are left out)
    assert global_batch(args, 1, 1, 25) != global_batch(args, 1, 1, 0)  # reshuffled


def test_each_example_s_successor_is_the_next_of_the_global_batch_however_it_is_split():
    """KTO's mismatched pairs: example k of the global batch pairs with example k + 1 (the last with the first)."""
    args = {"n_items": 203, "batch_size": 8, "seed": 3}
    for step in (0, 26):
        order = global_batch(args, 1, 1, step)
        expected = dict(zip(order, order[1:] + order[:1], strict=True))
        for n_processes, accumulation_steps in ((1, 1), (1, 8), (2, 2), (4, 2)):
            pairs = {}
            for rank in range(n_processes):
                plan = BatchPlan(**args, n_processes=n_processes, rank=rank, accumulation_steps=accumulation_steps)
                for mine, after in zip(plan.micro_batches(step)[1], plan.successors(step), strict=True):
                    pairs |= dict(zip(mine.tolist(), after.tolist(), strict=True))
            assert pairs == expected


def plain_grouped_order(n_items: int, batch_size: int, seed: int, epoch: int, lengths: list[int]) -> list[int]:
    """The grouped order computed the plain way, with Python lists: the reference."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(n_items, generator=generator).tolist()
    run = batch_size * GROUP_BATCHES
    order = [i for s in range(0, n_items, run) for i in sorted(order[s : s + run], key=lambda i: lengths[i])]
    batches = [order[i : i + batch_size] for i in range(0, n_items, batch_size)]
    return [i for b in torch.randperm(len(batches), generator=generator).tolist() for i in batches[b]]


def test_grouped_order_equals_the_plain_computation_and_cuts_padding():
    lengths = np.random.default_rng(1).integers(1, 300, 1000)
    plan = BatchPlan(n_items=1000, batch_size=4, n_processes=1, rank=0, accumulation_steps=1, seed=7, lengths=lengths)
    for epoch in (0, 1):
        assert plan.epoch_order(epoch).tolist() == plain_grouped_order(1000, 4, 7, epoch, lengths.tolist())
    random = BatchPlan(n_items=1000, batch_size=4, n_processes=1, rank=0, accumulation_steps=1, seed=7)

    def padding(order):
        return sum(lengths[b].max() * 4 - lengths[b].sum() for b in np.split(order, 250))

    assert padding(plan.epoch_order(0)) < padding(random.epoch_order(0)) / 3


class ListData:
    """Examples held in memory, with the store's gather protocol."""

    layout = Layout.PADDED

    def __init__(self, examples):
        self.examples = examples

    def gather(self, positions):
        return [self.examples[i] for i in positions]


def test_loader_workers_prepare_the_same_batches_in_order():
    examples = [Example(list(range(1, 2 + i % 7)), [-100] + list(range(2, 2 + i % 7))) for i in range(40)]
    plan = BatchPlan(n_items=40, batch_size=8, n_processes=2, rank=1, accumulation_steps=2, seed=0)
    batches = StepBatches(plan, ListData(examples), functools.partial(collate_batch, pad_token_id=0), 3, 12)
    inline = list(step_loader(batches, num_workers=0, pin_memory=False))
    ahead = list(step_loader(batches, num_workers=2, pin_memory=False))
    assert len(inline) == len(ahead) == 9
    for (epoch_a, steps_a), (epoch_b, steps_b) in zip(inline, ahead, strict=True):
        assert epoch_a == epoch_b and len(steps_a) == len(steps_b) == 2
        for a, b in zip(steps_a, steps_b, strict=True):
            assert all(torch.equal(a[key], b[key]) for key in a)
            assert a.layout is b.layout is Layout.PADDED  # the layout survives the worker processes
    before = torch.get_rng_state()
    list(step_loader(batches, num_workers=1, pin_memory=False))
    assert torch.equal(torch.get_rng_state(), before)  # the global RNG (dropout) is untouched: resume stays exact


# ---- the token budget per forward pass (model.micro_batch_tokens) ----


def test_token_passes_sort_by_length_and_cut_where_the_budget_is_reached():
    # lengths 50, 10, 40, 30, 20: sorted 10, 20, 30, 40, 50. Budget 90: {10, 20, 30} pads to 3 x 30 = 90 (fits);
    # adding 40 would be 4 x 40 = 160; {40, 50}: 2 x 50 = 100 > 90, so 40 and 50 each alone.
    lengths = np.array([50, 10, 40, 30, 20])
    passes = token_passes(lengths, max_tokens=90)
    assert [lengths[p].tolist() for p in passes] == [[10, 20, 30], [40], [50]]
    assert [p.tolist() for p in passes] == [[1, 4, 3], [2], [0]]
    assert [lengths[p].tolist() for p in token_passes(lengths, max_tokens=250)] == [[10, 20, 30, 40, 50]]
    assert [lengths[p].tolist() for p in token_passes(lengths, max_tokens=5)] == [[10], [20], [30], [40], [50]]


def test_split_evenly_halves_the_largest_pass_until_there_are_enough():
    lengths = np.array([10, 10, 10, 10, 100])
    passes = split_evenly([np.array([0, 1, 2, 3]), np.array([4])], lengths, 4)
    assert [p.tolist() for p in passes] == [[0], [1], [2, 3], [4]]


def test_auto_budget_is_the_mean_micro_batch_plus_a_quarter_at_least_the_longest_item():
    assert auto_micro_batch_tokens(np.array([100, 300]), micro_batch_size=4) == 1000  # 4 x 200 x 1.25
    assert auto_micro_batch_tokens(np.array([10, 10, 10, 900]), micro_batch_size=1) == 900


@pytest.mark.parametrize("grouped", [False, True])
def test_a_token_budget_keeps_every_step_s_examples_and_equal_passes_on_every_process(grouped):
    """Splitting micro-batches into passes never changes which examples a step trains on (so the exactly normalized
    gradient is the same), bounds every pass's padded tokens unless one item alone exceeds the budget, and every
    process runs as many passes (a sharded model communicates in each forward)."""
    lengths = np.random.default_rng(1).lognormal(5, 0.8, 203).astype(np.int64) + 1
    args = {"n_items": 203, "batch_size": 8, "seed": 3, "lengths": lengths if grouped else None}
    budget = 600
    split_steps = 0
    for step in (0, 5, 25, 26, 60):
        expected = sorted(global_batch(args, 1, 1, step))
        for n_processes, accumulation_steps in ((1, 1), (2, 1), (2, 2), (4, 2)):
            seen, n_passes = [], set()
            for rank in range(n_processes):
                plan = BatchPlan(**args, n_processes=n_processes, rank=rank, accumulation_steps=accumulation_steps,
                                 item_tokens=lengths, micro_batch_tokens=budget)  # fmt: skip
                _, passes = plan.micro_batches(step)
                assert len(passes) == plan.passes_per_step(step)
                n_passes.add(len(passes))
                for items in passes:
                    assert len(items) == 1 or len(items) * lengths[items].max() <= budget
                for mine, after in zip(passes, plan.successors(step), strict=True):
                    assert len(mine) == len(after)
                seen += [int(i) for p in passes for i in p]
                split_steps += len(passes) > accumulation_steps
            assert sorted(seen) == expected
            assert len(n_passes) == 1
    assert split_steps  # the budget did split some micro-batches


def test_without_a_budget_the_micro_batches_are_cut_as_before():
    args = {"n_items": 40, "batch_size": 8, "n_processes": 2, "rank": 1, "accumulation_steps": 2, "seed": 0}
    lengths = np.arange(1, 41)
    plain = BatchPlan(**args).micro_batches(3)[1]
    roomy = BatchPlan(**args, item_tokens=lengths, micro_batch_tokens=10_000).micro_batches(3)[1]
    assert [m.tolist() for m in roomy] == [m.tolist() for m in plain]
