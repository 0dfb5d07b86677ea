"""Examples -> padded micro-batches, and the seeded order in which an epoch visits them."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import torch

from sftune.data.types import IGNORE_INDEX, Example


@dataclass
class Batch:
    input_ids: torch.Tensor  # [batch, seq]
    labels: torch.Tensor  # [batch, seq], IGNORE_INDEX where not supervised (padding included)
    attention_mask: torch.Tensor  # [batch, seq], 0 on padding

    @property
    def num_supervised(self) -> int:
        """Tokens the loss counts: labels shift by one, so position 0 never is a target."""
        return int((self.labels[:, 1:] != IGNORE_INDEX).sum())

    @property
    def num_tokens(self) -> int:
        return int(self.attention_mask.sum())

    def to(self, device: torch.device) -> Batch:
        return Batch(self.input_ids.to(device), self.labels.to(device), self.attention_mask.to(device))


def collate(examples: list[Example], pad_token_id: int) -> Batch:
    """Right-pad to the longest example. Padding is masked by position, never by token id (pad may equal eos)."""
    length = max(len(e.input_ids) for e in examples)
    input_ids = torch.full((len(examples), length), pad_token_id, dtype=torch.long)
    labels = torch.full((len(examples), length), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), length), dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example.input_ids)
        input_ids[row, :n] = torch.tensor(example.input_ids)
        labels[row, :n] = torch.tensor(example.labels)
        attention_mask[row, :n] = 1
    return Batch(input_ids, labels, attention_mask)


def epoch_order(num_examples: int, seed: int, epoch: int, shuffle: bool) -> list[int]:
    """The order of examples in one epoch; a function of (seed, epoch) only, so resume can recompute it."""
    order = list(range(num_examples))
    if shuffle:
        random.Random(seed * 100_003 + epoch).shuffle(order)
    return order


def micro_batch_indices(order: list[int], micro_batch_size: int) -> list[list[int]]:
    return [order[i : i + micro_batch_size] for i in range(0, len(order), micro_batch_size)]


def accumulation_windows(num_examples: int, micro_batch_size: int, gradient_accumulation_steps: int) -> int:
    """Optimizer steps in one epoch: micro-batches grouped into windows; the last window may be shorter."""
    num_micro_batches = -(-num_examples // micro_batch_size)
    return -(-num_micro_batches // gradient_accumulation_steps)


def window_micro_batches(
    num_examples: int, seed: int, epoch: int, window: int, micro_batch_size: int, accumulation: int, shuffle: bool
) -> list[list[int]]:
    """Example indices of each micro-batch in accumulation window `window` of `epoch`."""
    chunks = micro_batch_indices(epoch_order(num_examples, seed, epoch, shuffle), micro_batch_size)
    return chunks[window * accumulation : (window + 1) * accumulation]


# ------------------------------------------------------------------------------------ batching estimates


def padding_waste(
    lengths: list[int], micro_batch_size: int, max_length: int, seed: int, shuffle: bool
) -> dict[str, Any]:
    """Padding share of the first epoch's micro-batches (the recipe's order), and with packing into max_length bins."""
    order = epoch_order(len(lengths), seed, 0, shuffle)
    batches = micro_batch_indices(order, micro_batch_size)
    padded = sum(max(lengths[i] for i in batch) * len(batch) for batch in batches)
    tokens = sum(lengths)
    bins = count_packed_bins([lengths[i] for i in order], max_length)
    packed_padded = -(-bins // micro_batch_size) * micro_batch_size * max_length if bins else 0
    return {
        "micro_batch_size": micro_batch_size,
        "micro_batches": len(batches),
        "padding_share": round(1 - tokens / padded, 4) if padded else 0.0,
        "packed_max_length": max_length,
        "packed_sequences": bins,
        "packed_padding_share": round(1 - tokens / packed_padded, 4) if packed_padded else 0.0,
    }


def count_packed_bins(lengths: list[int], max_length: int) -> int:
    """Sequences concatenated in order into bins of max_length tokens; a new bin when the next does not fit."""
    bins, used = 0, max_length
    for length in lengths:
        if used + length > max_length:
            bins, used = bins + 1, 0
        used += length
    return bins


def longest_micro_batch(lengths: list[int], micro_batch_size: int) -> tuple[int, int]:
    """Tokens (padded) in the largest micro-batch, micro_batch_size x the longest example; and that length."""
    longest = max(lengths, default=0)
    return micro_batch_size * longest, longest
