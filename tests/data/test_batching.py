"""Batching estimates: padding share in the recipe's order, and with packing."""

from __future__ import annotations

import pytest

from sftune.data.batching import longest_micro_batch, padding_waste


def test_padding_waste_in_order_and_packed():
    waste = padding_waste([10, 2, 6, 6], micro_batch_size=2, max_length=12, seed=0, shuffle=False)
    assert waste["padding_share"] == pytest.approx(1 - 24 / 32, abs=1e-4)  # batches [10, 2] and [6, 6]
    # Packed in order into 12-token bins: [10, 2], [6, 6] -> 2 full sequences, no padding.
    assert waste["packed_sequences"] == 2 and waste["packed_padding_share"] == 0.0


def test_longest_micro_batch_is_micro_batch_size_times_the_longest_example():
    assert longest_micro_batch([3, 9, 4], micro_batch_size=4) == (36, 9)
    assert longest_micro_batch([], micro_batch_size=4) == (0, 0)
