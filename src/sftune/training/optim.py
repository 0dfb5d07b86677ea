"""AdamW with decay only on matrices, and a warmup + cosine / linear / constant learning-rate schedule."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from sftune.config import TrainConfig, UserError
from sftune.host.offload import OffloadedAdamW


def build_optimizer(
    parameters: list[tuple[str, torch.nn.Parameter]], cfg: TrainConfig, run_dir: Path | None = None
) -> torch.optim.AdamW:
    """Weight decay on weight matrices only: decaying norms and biases hurts and is not what the recipe means.
    With train.offload_optimizer_state (resolved true) the moments live in a file in `run_dir` (host/offload.py)."""
    trainable = [(name, p) for name, p in parameters if p.requires_grad]
    decay = [p for _, p in trainable if p.ndim >= 2]
    no_decay = [p for _, p in trainable if p.ndim < 2]
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    fused = fused_kernel_applies([p for _, p in trainable])
    options: dict[str, Any] = {"lr": cfg.learning_rate, "betas": cfg.adam_betas, "fused": fused or None}
    if cfg.offload_optimizer_state is True:
        if run_dir is None or not all(type(p) in (torch.Tensor, torch.nn.Parameter) for _, p in trainable):
            raise UserError(
                "train.offload_optimizer_state=true needs plain (unsharded) parameters and a run folder; under fsdp2 "
                "the shards already divide the optimizer state: set train.offload_optimizer_state=false"
            )
        optimizer = OffloadedAdamW(groups, run_dir, **options)
        print(f"optimizer: AdamW moments offloaded to a file in {run_dir} ({optimizer.moments.size / 2**30:.2f} GiB)")
        return optimizer
    return torch.optim.AdamW(groups, **options)


def fused_kernel_applies(params: list[torch.Tensor]) -> bool:
    """Whether AdamW's fused kernel (one pass per parameter) takes these: plain floating-point tensors on a device
    it has a kernel for. The same update as the default multi-tensor one, several times faster on a CPU
    (bench/results/step-profile.md); sharded FSDP2 parameters (DTensors) keep the default."""
    supported = getattr(torch.utils._foreach_utils, "_get_fused_kernels_supported_devices", lambda: ["cpu", "cuda"])
    devices = set(supported())
    return bool(params) and all(
        type(p) in (torch.Tensor, torch.nn.Parameter) and p.is_floating_point() and p.device.type in devices
        for p in params
    )


def warmup_steps(cfg: TrainConfig, total_steps: int) -> int:
    return cfg.warmup_steps or math.ceil(cfg.warmup_ratio * total_steps)


def lr_multiplier(step: int, total_steps: int, warmup: int, kind: str) -> float:
    """Learning-rate factor for optimizer step `step` (0-based): linear warmup, then the chosen decay."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if kind == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total_steps - warmup)
    if kind == "linear":
        return max(0.0, 1.0 - progress)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: TrainConfig, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    warmup = warmup_steps(cfg, total_steps)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_multiplier(step, total_steps, warmup, cfg.lr_scheduler)
    )
