"""One optimizer step's worth of backward passes over an accumulation window, and gradient clipping."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch

from sftune.data.batching import Batch

BatchT = TypeVar("BatchT")


def supervised_tokens(batch: Batch) -> int:
    return batch.num_supervised


def backward_window(
    batches: Sequence[BatchT],
    loss_sum: Callable[[BatchT], torch.Tensor],
    autocast: Any = None,
    count: Callable[[BatchT], int] = supervised_tokens,  # type: ignore[assignment]
) -> float:
    """Backward over every micro-batch of a window; returns the window's loss per counted unit.

    `loss_sum(batch)` is the loss summed over the batch's units and `count(batch)` how many units it holds:
    supervised tokens for SFT (TokenLoss), preference pairs for a DPO loss. The loss is the sum over the whole
    window divided by the window's units, not a mean of per-micro-batch means, so micro-batch 8 x accumulation 1
    and micro-batch 1 x accumulation 8 give the same loss and the same gradients, whatever the example lengths.
    """
    window_units = max(1, sum(count(b) for b in batches))
    total = 0.0
    for batch in batches:
        with autocast or contextlib.nullcontext():
            loss = loss_sum(batch) / window_units
        loss.backward()
        total += loss.item()
    return total


def clip_gradients(model: Any, max_norm: float | None) -> float:
    """Clip the global gradient norm to `max_norm` (None: measure only); returns the norm before clipping."""
    params = [p for p in model.parameters() if p.grad is not None]
    if max_norm is None:
        return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params])))
    return float(torch.nn.utils.clip_grad_norm_(params, max_norm))
