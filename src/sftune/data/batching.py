"""Examples -> micro-batches (padding-free rows, or padded), and the seeded order in which an epoch visits them.

Padding-free (the default, `train.padding_free`): a micro-batch's examples go back to back into one row, position
ids restarting at each example and `cu_seq_lens` marking the boundaries, so no token is padding and attention
stays within each example (model/attention.py; plain sdpa models build the same block-diagonal mask from the
position ids). The first label of each example is IGNORE_INDEX, so the shifted loss never asks the last token of
one example to predict the first of the next: the targets are exactly those of the examples unpacked.
"""

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
    position_ids: torch.Tensor | None = None  # [1, seq] in a padding-free row: restarting at each example
    cu_seq_lens: torch.Tensor | None = None  # [examples + 1] boundaries of the examples in a padding-free row

    @property
    def num_supervised(self) -> int:
        """Tokens the loss counts: labels shift by one, so position 0 never is a target."""
        return int((self.labels[:, 1:] != IGNORE_INDEX).sum())

    @property
    def num_tokens(self) -> int:
        return int(self.attention_mask.sum())

    def to(self, device: torch.device) -> Batch:
        moved = [t.to(device) if t is not None else None for t in (self.position_ids, self.cu_seq_lens)]
        return Batch(self.input_ids.to(device), self.labels.to(device), self.attention_mask.to(device), *moved)

    def model_inputs(self) -> dict[str, Any]:
        """Keyword arguments of the model's forward: a padded batch's mask, or a padding-free row's boundaries."""
        if self.cu_seq_lens is None:
            return {"input_ids": self.input_ids, "attention_mask": self.attention_mask}
        longest = int((self.cu_seq_lens[1:] - self.cu_seq_lens[:-1]).max())
        return {
            "input_ids": self.input_ids,
            "position_ids": self.position_ids,
            "cu_seq_lens_q": self.cu_seq_lens,
            "cu_seq_lens_k": self.cu_seq_lens,
            "max_length_q": longest,
            "max_length_k": longest,
        }


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


def collate_packed(examples: list[Example]) -> Batch:
    """One padding-free row: the examples back to back, positions restarting, each example's first label ignored."""
    input_ids = [t for e in examples for t in e.input_ids]
    labels = [IGNORE_INDEX if i == 0 else label for e in examples for i, label in enumerate(e.labels)]
    positions = [i for e in examples for i in range(len(e.input_ids))]
    lengths = [len(e.input_ids) for e in examples]
    bounds = [0]
    for length in lengths:
        bounds.append(bounds[-1] + length)
    return Batch(
        torch.tensor([input_ids]),
        torch.tensor([labels]),
        torch.ones((1, len(input_ids)), dtype=torch.long),
        torch.tensor([positions]),
        torch.tensor(bounds, dtype=torch.int32),
    )


def make_batch(examples: list[Example], pad_token_id: int, padding_free: bool = True) -> Batch:
    """The micro-batch the training loop and the validation loss use: padding-free, or padded (`collate`)."""
    return collate_packed(examples) if padding_free else collate(examples, pad_token_id)


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
