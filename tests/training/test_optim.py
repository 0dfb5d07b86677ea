"""The optimizer: AdamW's fused kernel where it applies, the same update as the multi-tensor one; decay on matrices."""

from __future__ import annotations

import torch

from sftune.config import TrainConfig
from sftune.training.optim import build_optimizer, fused_kernel_applies


def named_params(seed: int) -> list[tuple[str, torch.nn.Parameter]]:
    generator = torch.Generator().manual_seed(seed)
    shapes = {"w1": (16, 8), "w2": (8, 16), "norm": (8,), "bias": (16,)}
    return [(name, torch.nn.Parameter(torch.randn(shape, generator=generator))) for name, shape in shapes.items()]


def run_steps(params: list[tuple[str, torch.nn.Parameter]], optimizer: torch.optim.Optimizer, steps: int) -> None:
    generator = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for _, p in params:
            p.grad = torch.randn(p.shape, generator=generator)
        optimizer.step()


def test_fused_adamw_on_plain_cpu_parameters_matches_the_multi_tensor_update():
    cfg = TrainConfig(learning_rate=1e-2, weight_decay=0.1)
    fused_params, reference_params = named_params(0), named_params(0)
    fused = build_optimizer(fused_params, cfg)
    assert all(group["fused"] for group in fused.param_groups)
    decays = {id(p): g["weight_decay"] for g in fused.param_groups for p in g["params"]}
    assert [decays[id(p)] for _, p in fused_params] == [0.1, 0.1, 0.0, 0.0]  # matrices only

    reference = torch.optim.AdamW(
        [
            {"params": [p for _, p in reference_params if p.ndim >= 2], "weight_decay": 0.1},
            {"params": [p for _, p in reference_params if p.ndim < 2], "weight_decay": 0.0},
        ],
        lr=1e-2,
        betas=cfg.adam_betas,
        foreach=True,
    )
    run_steps(fused_params, fused, 5)
    run_steps(reference_params, reference, 5)
    for (name, a), (_, b) in zip(fused_params, reference_params, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=name)


def test_fused_kernel_only_for_plain_floating_point_tensors():
    assert fused_kernel_applies([torch.nn.Parameter(torch.zeros(3))])
    assert not fused_kernel_applies([])

    class Wrapped(torch.Tensor):  # stands for a tensor subclass such as FSDP2's DTensor
        pass

    assert not fused_kernel_applies([torch.zeros(3).as_subclass(Wrapped)])
    assert not fused_kernel_applies([torch.nn.Parameter(torch.zeros(3)), torch.zeros(3, dtype=torch.int64)])
