"""The batch plan: the global batch is a pure function of (seed, epoch, step), however it is split; the loader's
workers prepare exactly the batches the main process would."""

import functools

import numpy as np
import pytest
import torch

from train.batching.collate import collate_batch
from train.batching.layout import Layout
from train.batching.plan import GROUP_BATCHES, BatchPlan, StepBatches, step_loader
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
