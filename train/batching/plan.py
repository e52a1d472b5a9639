"""Which examples each process trains on at each step, and the loader that prepares them ahead of the step.

The global batch of a step depends only on the seed, the epoch and the step: a permutation per epoch (or, with
data.group_by_length, length-sorted runs with the batches shuffled), cut into batches of `batch_size`. Each
process takes a contiguous slice of it and cuts that into `accumulation_steps` micro-batches, so the union over
processes is always the same global batch, however it is split. A resumed run starts directly at its step: nothing
is replayed. Everything here is index arrays; the tokens are gathered from the memory-mapped store per micro-batch.

A token budget per forward pass (model.micro_batch_tokens) bounds peak memory: a micro-batch whose padded size
(items x its longest item) exceeds it runs as several passes of the same step, its items sorted by length and cut
where the budget is reached. The step's examples, and so its gradient (the loss is normalized over the whole step),
do not change; every process runs the same number of passes, since a sharded model communicates in each forward.
"""

from __future__ import annotations

import logging
import math
import multiprocessing
import signal
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from train.batching.collate import Batch

logger = logging.getLogger(__name__)

GROUP_BATCHES = 32  # data.group_by_length sorts runs of this many global batches by length
# model.micro_batch_tokens=null: a pass may hold this much more than the data's mean micro-batch before it is split.
# Grouped batches pad a little, and every extra pass costs a little, so only the long tail of micro-batches splits.
AUTO_TOKEN_HEADROOM = 1.25


def auto_micro_batch_tokens(item_tokens: np.ndarray, micro_batch_size: int) -> int:
    """model.micro_batch_tokens=null: the tokens of the data's mean micro-batch plus AUTO_TOKEN_HEADROOM, and at
    least its longest item (one item always forms a pass of its own)."""
    mean_micro_batch = micro_batch_size * float(item_tokens.mean()) if len(item_tokens) else 0.0
    return max(int(item_tokens.max(initial=1)), math.ceil(mean_micro_batch * AUTO_TOKEN_HEADROOM))


def steps_per_epoch(n_items: int, batch_size: int) -> int:
    """Optimizer steps in an epoch of `n_items` in global batches of `batch_size`: the last partial batch is left out."""
    return n_items // batch_size


def padded_tokens(item_tokens: np.ndarray) -> int:
    """Token slots of a pass holding items of these lengths: each is padded to the longest."""
    return len(item_tokens) * int(item_tokens.max(initial=0))


def token_passes(item_tokens: np.ndarray, max_tokens: int) -> list[np.ndarray]:
    """Offsets into a micro-batch of items of `item_tokens` lengths, cut into passes of at most `max_tokens` padded
    tokens: the items sorted by length, each pass extended while it fits (an item longer than the budget alone)."""
    order = np.argsort(item_tokens, kind="stable")
    passes, start = [], 0
    for end in range(1, len(order) + 1):
        if end == len(order) or (end + 1 - start) * item_tokens[order[end]] > max_tokens:
            passes.append(order[start:end])
            start = end
    return passes


def split_evenly(passes: list[np.ndarray], item_tokens: np.ndarray, n_passes: int) -> list[np.ndarray]:
    """`passes` cut further, the largest in halves, until there are `n_passes` (as many as another process needs)."""
    passes = list(passes)
    while len(passes) < n_passes:
        splittable = [i for i, p in enumerate(passes) if len(p) > 1]
        largest = max(splittable, key=lambda i: padded_tokens(item_tokens[passes[i]]))
        cut = passes.pop(largest)
        middle = len(cut) // 2
        passes[largest:largest] = [cut[:middle], cut[middle:]]
    return passes


@dataclass
class BatchPlan:
    """The micro-batches (positions in the training data) of each process at each optimizer step."""

    n_items: int  # examples, or packed rows
    batch_size: int  # global, per optimizer step
    n_processes: int
    rank: int
    accumulation_steps: int
    seed: int
    lengths: np.ndarray | None = None  # (n_items,) tokens per item: with it, batches are grouped by length
    item_tokens: np.ndarray | None = None  # (n_items,) tokens per item, for the budget below
    micro_batch_tokens: int | None = None  # most padded tokens per forward pass; None: micro-batches as cut

    def __post_init__(self) -> None:
        self.per_process = self.batch_size // self.n_processes
        self.micro_batch_size = self.per_process // self.accumulation_steps
        self.steps_per_epoch = steps_per_epoch(self.n_items, self.batch_size)
        self._order: tuple[int, np.ndarray] | None = None  # the last epoch's order, reused by its steps

    def epoch_order(self, epoch: int) -> np.ndarray:
        """(n_items,) int64: the order of the items in `epoch`."""
        if self._order is not None and self._order[0] == epoch:
            return self._order[1]
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        order = torch.randperm(self.n_items, generator=generator).numpy()
        if self.lengths is not None:
            run = self.batch_size * GROUP_BATCHES
            for start in range(0, self.n_items, run):  # stable sort: equal lengths keep their random order
                chunk = order[start : start + run]
                order[start : start + run] = chunk[np.argsort(self.lengths[chunk], kind="stable")]
            n_batches = -(-self.n_items // self.batch_size)
            shuffled = torch.randperm(n_batches, generator=generator).numpy()
            order = np.concatenate([order[b * self.batch_size : (b + 1) * self.batch_size] for b in shuffled])
        self._order = (epoch, order)
        return order

    def micro_batches(self, step: int) -> tuple[int, list[np.ndarray]]:
        """(epoch, this process's forward passes) of optimizer step `step` (0-based): its `accumulation_steps`
        micro-batches, each cut into passes within the token budget."""
        epoch, global_batch = self._global_batch(step)
        mine = global_batch[self.rank * self.per_process : (self.rank + 1) * self.per_process]
        return epoch, self._cut(mine, self._pass_offsets(global_batch))

    def successors(self, step: int) -> list[np.ndarray]:
        """For each example of this process's passes, the next example of the global batch (the last one's
        successor is the first): a pairing of the whole step that does not depend on how it is split."""
        _, global_batch = self._global_batch(step)
        offsets = self.rank * self.per_process + np.arange(self.per_process)
        return self._cut(global_batch[(offsets + 1) % self.batch_size], self._pass_offsets(global_batch))

    def passes_per_step(self, step: int) -> int:
        """Forward passes each process runs at `step`: accumulation_steps, more where the token budget splits."""
        return sum(len(passes) for passes in self._pass_offsets(self._global_batch(step)[1]))

    def _global_batch(self, step: int) -> tuple[int, np.ndarray]:
        epoch, batch_index = divmod(step, self.steps_per_epoch)
        return epoch, self.epoch_order(epoch)[batch_index * self.batch_size : (batch_index + 1) * self.batch_size]

    def _pass_offsets(self, global_batch: np.ndarray) -> list[list[np.ndarray]]:
        """For each micro-batch of this process, the offsets of its passes within it. A micro-batch is split only
        where some process's copy of it exceeds the budget, and then into as many passes on every process."""
        size = self.micro_batch_size
        whole = [[np.arange(size)] for _ in range(self.accumulation_steps)]
        if self.micro_batch_tokens is None or self.item_tokens is None:
            return whole
        tokens = self.item_tokens[global_batch].reshape(self.n_processes, self.accumulation_steps, size)
        offsets = []
        for micro in range(self.accumulation_steps):
            cuts = [token_passes(tokens[rank, micro], self.micro_batch_tokens) for rank in range(self.n_processes)]
            n_passes = max(map(len, cuts))
            mine = tokens[self.rank, micro]
            offsets.append(whole[micro] if n_passes == 1 else split_evenly(cuts[self.rank], mine, n_passes))
        return offsets

    def _cut(self, positions: np.ndarray, pass_offsets: list[list[np.ndarray]]) -> list[np.ndarray]:
        size = self.micro_batch_size
        micro_batches = [positions[i * size : (i + 1) * size] for i in range(self.accumulation_steps)]
        return [micro[offsets] for micro, passes in zip(micro_batches, pass_offsets, strict=True) for offsets in passes]


class StepBatches(torch.utils.data.Dataset):
    """Item k: (epoch, this process's collated micro-batches) of optimizer step `start_step + k`.

    `collate(items, layout)` receives each micro-batch's items and the data's batch layout; with `with_successors`,
    also each item's successor in the global batch (KTO pairs each prompt with the next example's completion across
    the whole step)."""

    def __init__(
        self, plan: BatchPlan, data, collate: Callable, start_step: int, total_steps: int, with_successors: bool = False
    ) -> None:
        self.plan, self.data, self.collate = plan, data, collate
        self.start_step, self.total_steps = start_step, total_steps
        self.with_successors = with_successors

    def __len__(self) -> int:
        return max(self.total_steps - self.start_step, 0)

    def __getitem__(self, index: int) -> tuple[int, list[Batch]]:
        step = self.start_step + index
        epoch, micro_batches = self.plan.micro_batches(step)
        layout = self.data.layout
        if not self.with_successors:
            return epoch, [self.collate(self.data.gather(positions), layout) for positions in micro_batches]
        successors = self.plan.successors(step)
        return epoch, [
            self.collate(self.data.gather(positions), layout, self.data.gather(after))
            for positions, after in zip(micro_batches, successors, strict=True)
        ]


def step_loader(batches: StepBatches, num_workers: int, pin_memory: bool) -> torch.utils.data.DataLoader:
    """A DataLoader over steps, in order: `num_workers` processes gather and collate the next steps while this one
    computes (pinned for a fast copy to CUDA). Workers are forked: they share the memory-mapped data and start in
    milliseconds; where fork does not exist, collation runs in this process."""
    if num_workers and "fork" not in multiprocessing.get_all_start_methods():
        logger.info("data.num_workers: this platform cannot fork worker processes; collating in the main process")
        num_workers = 0
    return torch.utils.data.DataLoader(
        batches,
        batch_size=None,  # each item is already a whole step
        shuffle=False,
        num_workers=num_workers,
        pin_memory=pin_memory,
        prefetch_factor=2 if num_workers else None,
        worker_init_fn=_leave_signals_to_the_main_process if num_workers else None,
        multiprocessing_context="fork" if num_workers else None,
        # Its own generator: a loader otherwise draws its workers' seed from the global torch RNG, which would shift
        # the dropout masks of a resumed run away from those of an uninterrupted one.
        generator=torch.Generator().manual_seed(0),
    )


def _leave_signals_to_the_main_process(worker_id: int) -> None:
    # SIGINT/SIGTERM reach the whole process group; the main process saves a checkpoint and then shuts the workers
    # down, so a worker must not die first.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
