"""Every `auto` of a training run, resolved in one place: `resolve_settings`, called once during a run's setup (and by
`sftune data check` for its estimate). Each decision is made concrete in the config the run trains with, printed
with its reason, and written into the run folder's config.yaml beside the value (`record_settings`), so "why is
activation checkpointing on in my run?" has its answer in one function and in one file.

Order matters: the precision and the LoRA base dtype come from the hardware; activation checkpointing first from the
hardware, then from the memory estimate (which needs the resolved dtypes); the optimizer offload from the estimate
with checkpointing as resolved; lean activations only where checkpointing is off.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from sftune.config import Config
from sftune.host.allocator import active_allocator, allocator_reason
from sftune.host.memory import available_memory_bytes, is_ram_backed
from sftune.model.load import bf16_supported
from sftune.model.memory import ESTIMATE_MARGIN, GIB, strategy_for

# The memory estimate of a config (model/memory.py through training/data.py), or None where it cannot be made.
Estimator = Callable[[Config], "dict[str, Any] | None"]


@dataclass(frozen=True)
class Decision:
    key: str  # section.field
    value: Any  # what the run uses
    reason: str
    given: Any = "auto"  # what the config said

    def describe(self) -> str:
        return f"{self.key}: {self.given} -> {self.value} ({self.reason})"


@dataclass
class Settings:
    """The config with every `auto` made concrete, the decisions behind them, and the memory estimate they used."""

    config: Config
    precision: str
    decisions: list[Decision] = field(default_factory=list)
    memory: dict[str, Any] | None = None


def resolve_settings(
    config: Config,
    device: torch.device,
    world_size: int = 1,
    estimate: Estimator | None = None,
    continued_adapter: bool = False,
    objective: str = "sft",
    available_bytes: int | None = None,
) -> Settings:
    """Resolve every `auto` of `config` for a run on `device` with `world_size` processes. `estimate`: the memory
    estimate of a config (None: no estimate, e.g. preference pairs); `continued_adapter`: DPO goes on training an
    SFT adapter (its reference cannot be the adapter switched off); `objective`: sft or dpo."""
    decisions: list[Decision] = []
    train, lora = config.train, config.lora

    def decide(key: str, value: Any, reason: str) -> Any:
        section, name = key.split(".")
        decisions.append(Decision(key, value, reason, getattr(getattr(config, section), name)))
        return value

    precision = train.precision
    if precision == "auto":
        native = bf16_supported(device)
        precision = decide(
            "train.precision",
            "bf16-mixed" if native else "fp32",
            f"{device.type} {'computes' if native else 'does not compute'} bf16 natively",
        )
    train = train.model_copy(update={"precision": precision})
    strategy = strategy_for(config, world_size)
    if train.strategy == "auto" and world_size > 1:
        decide("train.strategy", strategy, f"{world_size} processes: every rank a full replica")
        train = train.model_copy(update={"strategy": strategy})
    if train.method == "lora" and lora.base_dtype == "auto":
        lora = lora.model_copy(
            update={"base_dtype": decide("lora.base_dtype", *lora_base_dtype(device, precision, strategy))}
        )
    if train.gradient_checkpointing == "auto":
        checkpointing, why = cheap_recompute(device, precision, train.method, lora.base_dtype)
        train = train.model_copy(
            update={"gradient_checkpointing": decide("train.gradient_checkpointing", checkpointing, why)}
        )
    resolved = config.model_copy(update={"train": train, "lora": lora})
    memory = estimate(resolved) if estimate is not None else None
    train = fit_memory_budget(train, memory, decisions)
    if train.offload_optimizer_state == "auto":
        offload, why = needs_offload(train, memory, device, world_size, Path(config.output.dir), available_bytes)
        train = train.model_copy(
            update={"offload_optimizer_state": decide("train.offload_optimizer_state", offload, why)}
        )
    if train.lean_activations and (train.gradient_checkpointing or train.compile):
        why = "activation checkpointing keeps no block activations" if train.gradient_checkpointing else "compiled"
        decisions.append(Decision("train.lean_activations", False, f"not used: {why}", True))
    if train.release_freed_memory:
        decisions.append(
            Decision(
                "train.release_freed_memory",
                False,
                "deprecated and ignored: the host allocator (mimalloc, train.host_allocator) returns freed memory",
                True,
            )
        )
        train = train.model_copy(update={"release_freed_memory": False})
    if lora.fuse_shared_inputs:
        decisions.append(Decision("lora.fuse_shared_inputs", False, "deprecated and ignored", True))
        lora = lora.model_copy(update={"fuse_shared_inputs": False})
    decisions.append(
        Decision("train.host_allocator", active_allocator(), allocator_reason(train), train.host_allocator)
    )
    dpo = config.dpo
    if objective == "dpo" and dpo.reference == "auto" and not dpo.is_reference_free:
        dpo = dpo.model_copy(update={"reference": decide("dpo.reference", *dpo_reference(config, continued_adapter))})
    save_dtype = config.output.save_dtype
    if save_dtype == "auto":
        save_dtype = decide("output.save_dtype", *saved_dtype(config.model.dtype, device))
    output = config.output.model_copy(update={"save_dtype": save_dtype})
    final = resolved.model_copy(update={"train": train, "lora": lora, "dpo": dpo, "output": output})
    return Settings(final, precision, decisions, memory)


def lora_base_dtype(device: torch.device, precision: str, strategy: str) -> tuple[str, str]:
    """lora.base_dtype auto: bf16 where the device computes bf16 natively (half the memory, faster products)."""
    if precision == "bf16-true":
        return "fp32", "bf16-true keeps every weight in bf16 already"
    if strategy == "fsdp2":
        return "fp32", "fsdp2 shards a layer in one dtype"
    if bf16_supported(device):
        return "bf16", f"{device.type} computes bf16 natively"
    return "fp32", f"{device.type} does not compute bf16 natively (emulated bf16 is slower than fp32)"


def cheap_recompute(device: torch.device, precision: str, method: str, base_dtype: str) -> tuple[bool, str]:
    """train.gradient_checkpointing auto, from the hardware: on a CPU for full fine-tuning and for lora on a bf16
    frozen base, where recomputing the forward costs little against the memory it saves; off for an fp32 lora base
    (the recompute is a large part of the step there), bf16-true and GPUs (a small model's step is bound by kernel
    launches). Measured: bench/results/memory_profile.md, bench/results/compare-gpu-h100-*.md."""
    if device.type != "cpu":
        return False, f"{device.type}: the recompute costs more than it saves"
    if precision == "bf16-true":
        return False, "bf16-true: activations are half size already"
    if method == "full":
        return True, "CPU, full fine-tuning: the recompute is cheap against a step's backward"
    if method == "lora" and base_dtype == "bf16":
        return True, "CPU, lora on a bf16 frozen base: the recompute's products are the fast bf16 ones"
    return False, f"CPU, {method} on an fp32 base: the recompute would be a large part of the step"


def fit_memory_budget(train: Any, memory: dict[str, Any] | None, decisions: list[Decision]) -> Any:
    """Activation checkpointing switched on where the estimate is above train.memory_budget_gib."""
    budget = train.memory_budget_gib
    if budget is None or memory is None or train.gradient_checkpointing is True:
        return train
    estimate, checkpointed = memory[f"{train.method}_gib"], memory["with_checkpointing_gib"][train.method]
    if estimate <= budget:
        print(f"memory: estimate {estimate:.2f} GiB is within train.memory_budget_gib={budget}")
        return train
    still_above = "; still above the budget: lower micro_batch_size or data.max_length" if checkpointed > budget else ""
    why = f"estimate {estimate:.2f} GiB > train.memory_budget_gib={budget}; {checkpointed:.2f} GiB with it{still_above}"
    decisions.append(Decision("train.gradient_checkpointing", True, why, False))
    return train.model_copy(update={"gradient_checkpointing": True})


def needs_offload(
    train: Any,
    memory: dict[str, Any] | None,
    device: torch.device,
    world_size: int,
    run_dir: Path | None = None,
    available_bytes: int | None = None,
) -> tuple[bool, str]:
    """train.offload_optimizer_state auto: on for full fine-tuning on a CPU whose estimate (checkpointed where train
    says so), x ESTIMATE_MARGIN, is above train.memory_budget_gib or the memory available to this process
    (`available_bytes`; default MemAvailable or its cgroup's headroom, shared by the local ranks). Never for
    LoRA/QLoRA (small optimizer state), GPUs, fsdp2 (its shards divide the state already) or a run folder in RAM."""
    if train.method != "full":
        return False, f"{train.method}: the optimizer state is the adapters' only"
    if device.type != "cpu" or sys.platform != "linux":
        return False, "CPU parameters on Linux only"
    if world_size > 1 and strategy_for_train(train) == "fsdp2":
        return False, "fsdp2 shards the optimizer state already"
    if run_dir is not None and is_ram_backed(run_dir):
        return False, "the run folder is in RAM (tmpfs): the file would stay in memory"
    if memory is None:
        return False, "no memory estimate for this run"
    estimate = memory["with_checkpointing_gib"]["full"] if train.gradient_checkpointing else memory["full_gib"]
    available = available_memory_bytes() if available_bytes is None else available_bytes
    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    limits = [(train.memory_budget_gib, "train.memory_budget_gib")]
    limits += [] if available is None else [(available / GIB / local_ranks, "the memory available")]
    limit, name = min(((v, n) for v, n in limits if v is not None), default=(None, ""))
    if limit is None:
        return False, "no memory limit known"
    if estimate * ESTIMATE_MARGIN <= limit:
        return False, f"estimate {estimate:.2f} GiB x {ESTIMATE_MARGIN} fits {name} ({limit:.2f} GiB)"
    offloaded = memory.get("with_offload_gib", {}).get("full")
    after = "" if offloaded is None else f"; {offloaded:.2f} GiB offloaded"
    if offloaded is not None and offloaded * ESTIMATE_MARGIN > limit:
        after += ", still above: lower micro_batch_size or data.max_length"
    return True, f"estimate {estimate:.2f} GiB x {ESTIMATE_MARGIN} > {name} ({limit:.2f} GiB){after}"


def strategy_for_train(train: Any) -> str:
    return "ddp" if train.strategy == "auto" else train.strategy


def dpo_reference(config: Config, continued_adapter: bool) -> tuple[str, str]:
    """dpo.reference auto: the adapter switched off where the run trains a fresh adapter (no second copy, no pass
    before training); else log-probs computed once before training and cached."""
    if config.train.method in ("lora", "qlora") and not continued_adapter:
        return "adapter_off", "a fresh adapter: the model with it switched off is the starting model"
    why = "full fine-tuning has no adapter" if config.train.method == "full" else "the continued SFT adapter is part of"
    return "precomputed", why + (" the starting model" if continued_adapter else "")


def saved_dtype(model_dtype: str, device: torch.device) -> tuple[str, str]:
    if model_dtype != "auto":
        return model_dtype, "model.dtype"
    if bf16_supported(device):
        return "bf16", f"model.dtype auto: {device.type} supports bf16 natively"
    return "fp32", f"model.dtype auto: {device.type} has no native bf16"


def describe_settings(settings: Settings) -> str:
    return "\n".join(f"setting {d.describe()}" for d in settings.decisions)


def settings_yaml(settings: Settings) -> str:
    """The resolved config as YAML, each decided value followed by a comment with what was asked for and why."""
    notes = {tuple(d.key.split(".")): f"{d.given} -> {d.reason}" for d in settings.decisions}
    lines, section = [], ""
    for line in yaml.safe_dump(settings.config.model_dump(mode="json"), sort_keys=False).splitlines():
        if line and not line.startswith(" "):
            section = line.rstrip(":")
        elif line.startswith("  ") and not line.startswith("   ") and ":" in line:
            note = notes.get((section, line.strip().split(":")[0]))
            line += f"  # {note}" if note else ""
        lines.append(line)
    return "\n".join(lines) + "\n"
