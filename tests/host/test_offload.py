"""AdamW with its moments in a file: the same updates bit for bit as torch's AdamW, the same checkpoints, and moments
that are out of the process's memory between updates."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import sftune.host.offload as offload
from sftune.config import TrainConfig
from sftune.host.offload import OffloadedAdamW, moment_slices
from sftune.training.optim import build_optimizer, build_scheduler
from tests.helpers import tiny_config

SHAPES = {"embed": (300, 24), "w1": (24, 48), "w2": (48, 24), "norm": (24,), "bias": (48,), "head": (7, 24)}


def named_params(seed: int = 0, dtype: torch.dtype = torch.float32) -> list[tuple[str, torch.nn.Parameter]]:
    generator = torch.Generator().manual_seed(seed)
    return [
        (name, torch.nn.Parameter(torch.randn(shape, generator=generator).to(dtype))) for name, shape in SHAPES.items()
    ]


def train_steps(params, optimizer, scheduler, steps: int, seed: int = 1) -> None:
    """Random gradients; 'bias' has none at the first step (AdamW leaves it and its state alone then)."""
    generator = torch.Generator().manual_seed(seed)
    for step in range(steps):
        for name, p in params:
            gradient = torch.randn(p.shape, generator=generator).to(p.dtype)
            p.grad = None if (name == "bias" and step == 0) else gradient
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)


def assert_same(params_a, params_b, optimizer_a, optimizer_b) -> None:
    for (name, a), (_, b) in zip(params_a, params_b, strict=True):
        assert torch.equal(a, b), name
        state_a, state_b = optimizer_a.state.get(a, {}), optimizer_b.state.get(b, {})
        assert state_a.keys() == state_b.keys(), name
        for key in state_a:
            assert torch.equal(state_a[key], state_b[key]), f"{name} {key}"


@pytest.fixture
def small_slices(monkeypatch):
    """Slices of 4 KiB of moments: every update runs in several slices, and 'embed' alone exceeds one."""
    monkeypatch.setattr(offload, "MOMENT_SLICE_BYTES", 4096)


@pytest.mark.parametrize(("fused", "dtype"), [(True, torch.float32), (False, torch.float32), (True, torch.bfloat16)])
def test_updates_equal_torch_adamw_bit_for_bit(tmp_path, small_slices, fused, dtype):
    """fp32 (fused and multi-tensor kernels) and bf16 weights (train.precision=bf16-true: bf16 moments too)."""
    cfg = TrainConfig(learning_rate=1e-2, weight_decay=0.1, warmup_steps=2, lr_scheduler="cosine")
    plain_params, offloaded_params = named_params(dtype=dtype), named_params(dtype=dtype)
    plain = build_optimizer(plain_params, cfg)
    offloaded = build_optimizer(offloaded_params, cfg.model_copy(update={"offload_optimizer_state": True}), tmp_path)
    assert isinstance(offloaded, OffloadedAdamW) and type(plain) is torch.optim.AdamW
    if not fused:
        for optimizer in (plain, offloaded):
            for group in optimizer.param_groups:
                group["fused"], group["foreach"] = None, True
    assert len(list(moment_slices(offloaded.param_groups[0]["params"]))) > 1
    train_steps(plain_params, plain, build_scheduler(plain, cfg, 6), 6)
    train_steps(offloaded_params, offloaded, build_scheduler(offloaded, cfg, 6), 6)
    assert_same(plain_params, offloaded_params, plain, offloaded)
    assert offloaded.state[offloaded_params[0][1]]["exp_avg"].dtype == dtype
    assert not list(tmp_path.iterdir())  # the moments' file is unlinked from the start: nothing left behind


def test_moments_live_in_the_file_and_leave_memory_after_each_update(tmp_path, small_slices):
    params = named_params()
    optimizer = OffloadedAdamW([p for _, p in params], tmp_path, lr=1e-2)
    train_steps(params, optimizer, build_scheduler(optimizer, TrainConfig(), 3), 3)
    base = optimizer.moments.views(params[0][1])["exp_avg"].data_ptr()
    for name, p in params:
        views = optimizer.moments.views(p)
        for key in ("exp_avg", "exp_avg_sq"):
            assert optimizer.state[p][key].data_ptr() == views[key].data_ptr(), f"{name} {key} is not in the file"
        assert 0 <= views["exp_avg"].data_ptr() - base < optimizer.moments.size
    if sys.platform == "linux":  # the mapping's resident pages, as the kernel counts them for this process
        assert resident_kib_of_moments() == 0
        assert float(optimizer.state[params[0][1]]["exp_avg_sq"].sum()) > 0  # read back from the file: the values
        assert resident_kib_of_moments() > 0
        optimizer.release_moments()
        assert resident_kib_of_moments() == 0


def resident_kib_of_moments() -> int:
    """Rss of this process's mappings of moment files (/proc/self/smaps)."""
    total, inside = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        if line[:1] in "0123456789abcdef" and "-" in line.split()[0]:
            inside = ".optimizer-moments-" in line
        elif inside and line.startswith("Rss:"):
            total += int(line.split()[1])
    return total


def test_state_dict_is_interchangeable_with_torch_adamw(tmp_path, small_slices):
    """A checkpoint of either resumes the other: the same layout, the same continuation."""
    cfg = TrainConfig(learning_rate=1e-2, weight_decay=0.1)
    offload_cfg = cfg.model_copy(update={"offload_optimizer_state": True})
    params_a, params_b = named_params(), named_params()
    a, b = build_optimizer(params_a, cfg), build_optimizer(params_b, offload_cfg, tmp_path)
    train_steps(params_a, a, build_scheduler(a, cfg, 8), 2)
    train_steps(params_b, b, build_scheduler(b, cfg, 8), 2)
    saved_a, saved_b = a.state_dict(), b.state_dict()
    assert json.dumps(saved_a["param_groups"]) == json.dumps(saved_b["param_groups"])

    resumed_params_a, resumed_params_b = named_params(5), named_params(5)
    for (_, target), (_, source) in zip(resumed_params_a + resumed_params_b, params_a + params_b, strict=True):
        target.data.copy_(source.data)
    into_offloaded = build_optimizer(resumed_params_a, offload_cfg, tmp_path)
    into_offloaded.load_state_dict(saved_a)
    into_plain = build_optimizer(resumed_params_b, cfg)
    into_plain.load_state_dict(saved_b)
    train_steps(resumed_params_a, into_offloaded, build_scheduler(into_offloaded, cfg, 8), 3, seed=2)
    train_steps(resumed_params_b, into_plain, build_scheduler(into_plain, cfg, 8), 3, seed=2)
    assert_same(resumed_params_a, resumed_params_b, into_offloaded, into_plain)


def test_refuses_amsgrad_gpu_and_sharded_parameters(tmp_path):
    with pytest.raises(ValueError, match="amsgrad"):
        OffloadedAdamW([torch.nn.Parameter(torch.zeros(3))], tmp_path, amsgrad=True)
    with pytest.raises(ValueError, match="host memory"):  # a parameter off the host (meta stands for a GPU here)
        OffloadedAdamW([torch.nn.Parameter(torch.zeros(3, device="meta"))], tmp_path)

    class Sharded(torch.Tensor):  # stands for FSDP2's DTensor
        pass

    sharded = torch.nn.Parameter(torch.zeros(4)).as_subclass(Sharded)
    with pytest.raises(Exception, match="fsdp2"):
        build_optimizer([("w", sharded)], TrainConfig(offload_optimizer_state=True), tmp_path)


@pytest.mark.integration
def test_training_run_with_offloaded_moments_equals_the_plain_run_and_resumes_either_way(tmp_path, tiny_model_dir):
    """The whole recipe: the same losses and weights with and without the offload; the offloaded run's step-3
    checkpoint resumes, offloaded or not, to the uninterrupted run's final weights."""
    from sftune.recipes.sft import train

    plain = train(tiny_config(tmp_path / "a", tiny_model_dir, offload_optimizer_state=False))
    offloaded = train(tiny_config(tmp_path / "b", tiny_model_dir, offload_optimizer_state=True))
    final = load_file(str(offloaded.model_dir / "model.safetensors"))
    assert plain.final_loss == offloaded.final_loss
    assert all(
        torch.equal(tensor, final[name])
        for name, tensor in load_file(str(plain.model_dir / "model.safetensors")).items()
    )

    for resume_offloaded in (True, False):
        crashed = tmp_path / f"resume-{resume_offloaded}"
        shutil.copytree(tmp_path / "b", crashed)
        shutil.rmtree(crashed / "run" / "model")
        shutil.rmtree(crashed / "run" / "checkpoints" / "step-00000006")
        resumed = train(tiny_config(crashed, tiny_model_dir, offload_optimizer_state=resume_offloaded), resume="auto")
        weights = load_file(str(resumed.model_dir / "model.safetensors"))
        assert resumed.global_step == 6 and resumed.final_loss == offloaded.final_loss
        assert all(torch.equal(weights[name], final[name]) for name in final), resume_offloaded
