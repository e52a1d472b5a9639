"""Throughput accounting against hand-derived numbers."""

import pytest
import torch

from train.throughput import Throughput, example_lengths, step_counts


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
    throughput = Throughput(
        n_body_parameters=100, head_parameters=10, n_layers=2, hidden_size=3, peak_flops=1000.0, n_processes=2
    )
    throughput.add(torch.tensor([8.0, 5.0, 10.0, 34.0, 2.0]), seconds=2.0)
    report = throughput.report()
    flops = 6 * 100 * 8 + 6 * 10 * 5 + 6 * 2 * 3 * 34  # body x tokens + head x supervised + attention
    assert report["mfu"] == pytest.approx(flops / 2.0 / 2000.0)
    assert (report["tokens_per_second"], report["supervised_tokens_per_second"]) == (4.0, 2.5)
    assert report["padding_fraction"] == pytest.approx(0.2) and report["examples"] == 2
    assert throughput.report()["tokens_per_second"] == 0.0  # the window restarts after each report


def test_pairs_are_counted_once_under_their_own_name():
    throughput = Throughput(unit="pairs", rows_per_example=2)  # chosen and rejected: two rows of a batch
    throughput.add(torch.tensor([8.0, 5.0, 10.0, 34.0, 16.0]), seconds=1.0)
    report = throughput.report()
    assert report["pairs"] == 8 and "examples" not in report
