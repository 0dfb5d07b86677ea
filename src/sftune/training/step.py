"""One optimizer step's worth of backward passes over an accumulation window, and gradient clipping."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch

from sftune.config import TrainConfig
from sftune.data.batching import Batch
from sftune.training.distributed import SINGLE, Distributed, gradient_sync, total_norm
from sftune.training.run import RunError

BatchT = TypeVar("BatchT")


def supervised_tokens(batch: Batch) -> int:
    return batch.num_supervised


def backward_window(
    batches: Sequence[BatchT],
    loss_sum: Callable[[BatchT], torch.Tensor],
    autocast: Any = None,
    count: Callable[[BatchT], int] = supervised_tokens,  # type: ignore[assignment]
    info: Distributed = SINGLE,
) -> float:
    """Backward over every micro-batch of a window; returns the window's loss per counted unit.

    `loss_sum(batch)` is the loss summed over the batch's units and `count(batch)` how many units it holds:
    supervised tokens for SFT (TokenLoss), preference pairs for a DPO loss. The loss is the sum over the whole
    window divided by the window's units, not a mean of per-micro-batch means, so micro-batch 8 x accumulation 1
    and micro-batch 1 x accumulation 8 give the same loss and the same gradients, whatever the example lengths.

    On several processes (`info`; `loss_sum` is then the DDP / FSDP2-wrapped loss module) the units are summed
    over all ranks, each rank's loss is scaled by the world size (DDP and FSDP2 average gradients over ranks), the
    gradients are reduced once per window, and the returned loss is the whole window's: the same as on one process.
    """
    (window_units,) = info.all_sum(sum(count(b) for b in batches))
    window_units, scale = max(1.0, window_units), float(info.world_size)
    total = 0.0
    for index, batch in enumerate(batches):
        with gradient_sync(loss_sum, info, sync=index == len(batches) - 1):  # type: ignore[arg-type]
            with autocast or contextlib.nullcontext():
                loss = loss_sum(batch) / window_units
            (loss * scale if info.enabled else loss).backward()
        total += loss.item()
    (total,) = info.all_sum(total)
    return total


def clip_gradients(model: Any, max_norm: float | None) -> float:
    """Clip the global gradient norm to `max_norm` (None: measure only); returns the norm before clipping."""
    params = [p for p in model.parameters() if p.grad is not None]
    if max_norm is None:
        return total_norm(params)
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)  # FSDP2: a replicated DTensor, whole across shards
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)


class NonFiniteError(RunError):
    """A step whose loss or gradient norm is NaN or infinite: training on would save a broken model."""


def is_finite_step(loss: float, grad_norm: float, step: int, sources: list[str], policy: str) -> bool:
    """True when the step may update the weights. A non-finite loss or gradient norm stops the run (policy
    'stop', naming the step and its examples) or is skipped (policy 'skip': False, the caller drops the update)."""
    collapsed = loss > 0 and grad_norm == 0.0  # a loss no parameter can lower: saturated, dead activations
    if math.isfinite(loss) and math.isfinite(grad_norm) and not collapsed:
        return True
    what = f"step {step}: loss {loss}, gradient norm {grad_norm}"
    problem = (
        "every gradient is exactly zero while the loss is not: the model has collapsed"
        if collapsed
        else ("is not finite")
    )
    shown = ", ".join(sources[:8]) + (f" and {len(sources) - 8} more" if len(sources) > 8 else "")
    if policy == "skip":
        print(f"{what}: {problem}; update skipped (train.on_nonfinite=skip; examples {shown})")
        return False
    raise NonFiniteError(
        f"{what}: {problem} (examples: {shown}). Stopped before the update: no model is saved, and the checkpoints "
        "on disk are from earlier steps. Lower train.learning_rate, check the data and the model's weights, or set "
        "train.on_nonfinite=skip to skip such steps"
    )


def optimizer_step(
    model: Any, optimizer: Any, scheduler: Any, cfg: TrainConfig, loss: float, step: int, sources: list[str]
) -> tuple[float, float, bool]:
    """Clip, check health, update, clear: (gradient norm, the learning rate this step used, whether it updated)."""
    grad_norm = clip_gradients(model, cfg.max_grad_norm)
    lr = float(optimizer.param_groups[0]["lr"])  # the rate this step uses (group 0: the matrices)
    updated = is_finite_step(loss, grad_norm, step, sources, cfg.on_nonfinite)
    if updated:
        optimizer.step()
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm, lr, updated
