"""Training on several processes with torch.distributed: torchrun / srun launch, DDP or FSDP2, gloo or NCCL.

The run is the same run as on one process with the same global batch: every window's micro-batches come from the
same seeded order (`data.batching.window_micro_batches` with micro-batch x world size), each global micro-batch is
split across the ranks with balanced token counts, and the loss is divided by the supervised tokens of the whole
window on all ranks (an all-reduce of the count), not averaged per rank. DDP and FSDP2 average gradients over the
ranks, so each rank's loss is scaled by the world size: the update equals the one-process update.

Only rank 0 prints, logs and writes files; the model is saved gathered from all ranks (`gather_trainable_state`).
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, replace
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from sftune.config import Config, UserError
from sftune.data.types import IGNORE_INDEX, Example
from sftune.model.blocks import decoder_layers, unwrapped_model

T = TypeVar("T")


class DistributedError(UserError, RuntimeError):
    """A distributed setting that cannot work as configured; the message names the combination and the fix."""


@dataclass(frozen=True)
class Distributed:
    """Who this process is in the job. One process: rank 0 of 1, strategy 'single', every collective a no-op."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    strategy: str = "single"  # single | ddp | fsdp2
    backend: str = ""

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_sum(self, *values: float) -> list[float]:
        """The sum over all ranks of each value (float64 on the wire, so token counts stay exact)."""
        if not self.enabled:
            return [float(v) for v in values]
        tensor = torch.tensor(values, dtype=torch.float64, device=self.collective_device)
        dist.all_reduce(tensor)
        return [float(v) for v in tensor.tolist()]

    def any_rank(self, flag: bool) -> bool:
        """True on every rank when `flag` is true on any (a stop request that reached only some ranks)."""
        return self.all_sum(float(flag))[0] > 0 if self.enabled else flag

    def broadcast(self, tensor: torch.Tensor) -> torch.Tensor:
        """Rank 0's `tensor` on every rank (the others pass one of the same shape and dtype), on the CPU."""
        if not self.enabled:
            return tensor
        on_wire = tensor.to(self.collective_device)
        dist.broadcast(on_wire, src=0)
        return on_wire.cpu()

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def on_main(self, action: Callable[[], object]) -> None:
        """Rank 0 does `action` while the others wait; a user error it raises is raised on every rank (rank 0
        reports it, the others end quietly: cli.py), so no rank is left waiting at a barrier rank 0 never reaches."""
        error: UserError | None = None
        if self.is_main:
            try:
                action()
            except UserError as exc:
                error = exc
        if self.enabled:
            message = [str(error) if error is not None else None]
            dist.broadcast_object_list(message, src=0)
            if error is None and message[0] is not None:
                error = UserError(message[0])
        if error is not None:
            raise error

    @property
    def collective_device(self) -> torch.device:
        return torch.device("cuda", torch.cuda.current_device()) if self.backend == "nccl" else torch.device("cpu")

    def describe(self) -> str:
        return f"{self.strategy} on {self.world_size} processes ({self.backend}), rank {self.rank}"


SINGLE = Distributed()


def launched_world_size() -> int:
    """Processes in the job as torchrun started it (WORLD_SIZE; under SLURM, srun starts one torchrun per node);
    1 otherwise."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_distributed(config: Config, device: torch.device) -> Distributed:
    """Join the process group torchrun started (env:// rendezvous); a single process returns SINGLE untouched.

    Backend: NCCL on CUDA, gloo on CPU. Ranks above 0 stop printing to stdout (errors still reach stderr).
    """
    world_size = launched_world_size()
    if world_size <= 1:
        return SINGLE
    strategy = "ddp" if config.train.strategy == "auto" else config.train.strategy
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", 0))
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=timedelta(minutes=30))
    if rank != 0 and not os.environ.get("SFTUNE_LOG_ALL_RANKS"):
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - for the life of the process
    info = Distributed(rank, world_size, local_rank, strategy, backend)
    print(f"distributed: {info.describe()}")
    return info


# How long shutdown lets the backend's worker threads drop the collectives they finished (below).
WORK_RELEASE_SECONDS = 0.2


def shutdown(info: Distributed) -> None:
    """Barrier, then destroy the process group. In between, the main thread sleeps (releasing the GIL): a gloo
    worker thread frees a finished collective's tensors after the caller saw it complete, and doing so takes the GIL.
    Without the pause the DDP reducer, freed with the recipe's frame, could destroy the process group (joining that
    worker) while holding the GIL: a deadlock seen in about 1 of 8 two-rank runs (rank 1 hung after training)."""
    if info.enabled and dist.is_initialized():
        dist.barrier()
        time.sleep(WORK_RELEASE_SECONDS)
        dist.destroy_process_group()


def training_device(device: torch.device, info: Distributed) -> torch.device:
    """On CUDA each rank trains on its own GPU (LOCAL_RANK); on CPU every rank uses the CPU."""
    if info.enabled and device.type == "cuda":
        return torch.device("cuda", info.local_rank)
    return device


# ----------------------------------------------------------------------------------------------- data


def split_micro_batch(indices: list[int], lengths: Mapping[int, int], world_size: int) -> list[list[int]]:
    """One global micro-batch -> one list per rank: at most ceil(n / world) examples each, token counts balanced
    (longest first, each to the rank with the fewest tokens that has room). Deterministic: every rank computes the
    same split, so no example is trained twice or skipped."""
    capacity = -(-len(indices) // world_size)
    shares: list[list[int]] = [[] for _ in range(world_size)]
    tokens = [0] * world_size
    for index in sorted(indices, key=lambda i: (-lengths[i], i)):
        rank = min((r for r in range(world_size) if len(shares[r]) < capacity), key=lambda r: (tokens[r], r))
        shares[rank].append(index)
        tokens[rank] += lengths[index]
    return [sorted(share, key=indices.index) for share in shares]


def placeholder(example: Example) -> Example:
    """A rank with no example in a micro-batch still runs forward and backward (the collectives must match across
    ranks): on a copy of an example that supervises nothing, so it adds zero to the loss and the gradients."""
    return replace(example, labels=[IGNORE_INDEX] * len(example.labels), source=f"{example.source} (placeholder)")


def rank_examples(
    window: list[list[int]],
    examples: list[T],
    length: Callable[[T], int],
    info: Distributed,
    empty: Callable[[T], T] = placeholder,  # type: ignore[assignment]
) -> list[list[T]]:
    """This rank's examples of each global micro-batch of a window (`window_micro_batches` with micro-batch x
    world size). A share left empty near the end of an epoch gets `empty(...)` of the micro-batch's first example:
    a forward and backward that count for nothing, so every rank runs the same collectives."""
    if not info.enabled:
        return [[examples[i] for i in indices] for indices in window]
    lengths = {i: length(examples[i]) for indices in window for i in indices}
    shares = [split_micro_batch(indices, lengths, info.world_size)[info.rank] for indices in window]
    return [
        [examples[i] for i in share] or [empty(examples[indices[0]])]
        for share, indices in zip(shares, window, strict=True)
    ]


def rank_chunks(count: int, size: int, info: Distributed) -> list[slice | None]:
    """This rank's chunks of `size` consecutive items out of `count` (evaluation), dealt round-robin over the ranks:
    one entry per round, all ranks the same number of rounds; None where this rank has no chunk left and runs a
    placeholder (FSDP2 needs every rank in every forward). One process: every chunk, in order."""
    starts = list(range(0, count, size))
    mine, rounds = starts[info.rank :: info.world_size], -(-len(starts) // info.world_size)
    return [slice(mine[r], mine[r] + size) if r < len(mine) else None for r in range(rounds)]


# ---------------------------------------------------------------------------------------------- model


class LossModule(torch.nn.Module):
    """The model and its loss as one module: DDP and FSDP2 wrap this, so the loss's own way through the model (the
    body, then the head on supervised positions only) runs inside the wrapper's forward, where DDP prepares its
    gradient all-reduce and FSDP2 gathers the shards of the weights it uses (the tied embedding / head included)."""

    def __init__(self, loss: Callable[[Any], torch.Tensor], model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model
        self.loss = loss

    def forward(self, batch: Any) -> torch.Tensor:
        return self.loss(batch)


def sharded_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated blocks FSDP2 shards one by one: the classes the model names in `_no_split_modules`."""
    layers = decoder_layers(model)
    if not layers:
        raise DistributedError(
            f"{type(unwrapped_model(model)).__name__} names no decoder layer class (_no_split_modules), which fsdp2 "
            "shards one by one: use train.strategy=ddp for this model"
        )
    return layers


def wrap_model(module: LossModule, info: Distributed, device: torch.device) -> torch.nn.Module:
    """DDP (every rank a full replica) or FSDP2 (each decoder layer, then the rest, sharded over one device mesh)."""
    if not info.enabled:
        return module
    if info.strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [device.index] if device.type == "cuda" else None
        # Frozen weights are the same base on every rank: not broadcast (a 4-bit NF4 weight would not survive it).
        frozen = [name for name, p in module.named_parameters() if not p.requires_grad]
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(module, frozen)
        return DistributedDataParallel(module, device_ids=device_ids, broadcast_buffers=False)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    check_nf4_shardable(module.model, info.world_size)
    mesh = init_device_mesh(device.type, (info.world_size,))
    for layer in sharded_blocks(module.model):
        fully_shard(layer, mesh=mesh)
    fully_shard(module, mesh=mesh)
    return module


def check_nf4_shardable(model: torch.nn.Module, world_size: int) -> None:
    """FSDP2 shards a 4-bit NF4 weight (QLoRA) by splitting its rows and each of its packed inner tensors (codes,
    block scales, their factors) evenly over the ranks; a weight whose parts do not divide is refused up front."""
    from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import _INNER_TENSOR_NAMES_FOR_SHARDING

    for name, parameter in model.named_parameters():
        if type(parameter).__name__ != "NF4Tensor":
            continue
        parts = {"rows": parameter.shape[0]}
        parts |= {attr: getattr(parameter, attr).numel() for attr in _INNER_TENSOR_NAMES_FOR_SHARDING}
        uneven = [f"{part} ({count})" for part, count in parts.items() if count % world_size]
        if uneven:
            raise DistributedError(
                f"qlora with strategy fsdp2 on {world_size} processes: the 4-bit weight '{name}' cannot be sharded "
                f"evenly ({', '.join(uneven)} not divisible by {world_size}). Use train.strategy=ddp (every rank "
                "holds the 4-bit base, which is small), another number of processes, or train.method=lora"
            )


@contextlib.contextmanager
def gradient_sync(wrapped: torch.nn.Module, info: Distributed, sync: bool) -> Iterator[None]:
    """Skip the gradient all-reduce / reduce-scatter on all but the last micro-batch of a window (the gradients
    accumulate locally and are reduced once, summed, at the end)."""
    if not info.enabled:
        yield
    elif info.strategy == "ddp":
        with contextlib.nullcontext() if sync else wrapped.no_sync():  # type: ignore[operator]
            yield
    else:
        wrapped.set_requires_gradient_sync(sync)  # type: ignore[operator]
        yield


def unwrap(wrapped: torch.nn.Module) -> LossModule:
    """The LossModule inside DDP (FSDP2 shards it in place: itself)."""
    return wrapped.module if hasattr(wrapped, "module") else wrapped  # type: ignore[return-value]


def gather_trainable_state(wrapped: torch.nn.Module, info: Distributed) -> dict[str, torch.Tensor]:
    """Every trainable weight in full, gathered from all shards onto rank 0's CPU (empty on the other ranks).
    Names are the model's own (as `model.named_parameters()` gives them on one process)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
    state: dict[str, Any] = get_model_state_dict(wrapped, options=options)
    return {name.removeprefix("model."): tensor for name, tensor in state.items()}


def gathered_model(wrapped: torch.nn.Module, model: Any, info: Distributed, rebuild: Callable[[], Any]) -> Any:
    """The trained model, whole, on rank 0 (None on the other ranks of an FSDP2 run): the model itself on one
    process or under DDP (every rank a full replica); under FSDP2, every trainable weight gathered from all shards
    into a model built anew by `rebuild` (the frozen weights are the base's, as on one process)."""
    if info.strategy != "fsdp2":
        return model
    weights = gather_trainable_state(wrapped, info)
    if not info.is_main:
        return None
    whole = rebuild()
    _, unexpected = whole.load_state_dict(weights, strict=False)
    missing = {name for name, p in whole.named_parameters() if p.requires_grad} - set(weights)
    if unexpected or missing:
        raise DistributedError(
            f"the weights gathered from the shards do not fit the model: missing {sorted(missing)[:5]}, unexpected "
            f"{sorted(unexpected)[:5]}"
        )
    return whole


def total_norm(parameters: list[torch.Tensor]) -> float:
    """The global L2 norm of the gradients, whole across shards (FSDP2's gradients are DTensors)."""
    norm = torch.nn.utils.get_total_norm([p.grad for p in parameters if p.grad is not None])
    full = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
    return float(full)
