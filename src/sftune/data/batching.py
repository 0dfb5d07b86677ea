"""Examples -> padded micro-batches, and the seeded order in which an epoch visits them."""

from __future__ import annotations

import random
from dataclasses import dataclass

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
