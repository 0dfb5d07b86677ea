"""One optimizer step's worth of backward passes over an accumulation window."""

from __future__ import annotations

import contextlib
from typing import Any

from sftune.data.batching import Batch
from sftune.training.loss import token_loss_sum


def backward_window(model: Any, batches: list[Batch], autocast: Any = None) -> float:
    """Backward over every micro-batch of a window; returns the window's loss per supervised token.

    The loss is the sum over the whole window divided by the window's supervised tokens, not a mean of
    per-micro-batch means, so micro-batch 8 x accumulation 1 and micro-batch 1 x accumulation 8 give the
    same loss and the same gradients, whatever the example lengths.
    """
    window_tokens = max(1, sum(b.num_supervised for b in batches))
    total = 0.0
    for batch in batches:
        with autocast or contextlib.nullcontext():
            loss = token_loss_sum(model, batch) / window_tokens
        loss.backward()
        total += loss.item()
    return total
