"""Resumable checkpoints: trainable weights, optimizer, scheduler, RNG and data position, written atomically.

Only parameters that train are saved, so the same code serves full fine-tuning and adapters; frozen weights
come back from the base model on resume. Nothing in a checkpoint can run code: weights and RNG tensors are
safetensors, the rest JSON, and the optimizer/scheduler state is read with `torch.load(weights_only=True)`, which
refuses any pickled object that is not plain data. A manifest of sha256 sums, written last, lets resume verify a
checkpoint and fall back to the newest intact one, saying which it skipped and why.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pickle
import random
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from sftune.config import UserError
from sftune.host.offload import release_offloaded_moments
from sftune.model.save import normal_permissions
from sftune.training.distributed import SINGLE, Distributed, unwrap

CHECKPOINT_PREFIX = "step-"
MANIFEST = "checkpoint_manifest.json"
SHARDS = "shards"  # a distributed checkpoint's weight and optimizer shards, one safetensors file per rank
DISTRIBUTED_LAYOUT = "distributed.json"  # world size and strategy of the run that wrote the checkpoint


class CheckpointError(UserError, ValueError):
    """A checkpoint that cannot be trusted or used; the message says which file and why."""


@dataclass
class TrainerState:
    global_step: int  # optimizer steps done
    epoch: int  # epoch of the next window
    window: int  # next accumulation window within that epoch
    tokens_seen: int = 0


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().contiguous().clone() for name, p in model.named_parameters() if p.requires_grad}


def save_rng(folder: Path, suffix: str = "") -> None:
    """Python's and numpy's generator states as JSON, torch's (and CUDA's) as tensors in safetensors. `suffix`:
    one pair of files per rank of a distributed run ('-rank1')."""
    version, internal, gauss = random.getstate()
    name, keys, position, has_gauss, cached = np.random.get_state(legacy=True)  # type: ignore[misc]
    state = {
        "python": [version, list(internal), gauss],
        "numpy": [name, np.asarray(keys).tolist(), position, has_gauss, cached],
    }
    (folder / f"rng{suffix}.json").write_text(json.dumps(state))
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors |= {f"cuda{i}": t for i, t in enumerate(torch.cuda.get_rng_state_all())}
    save_file(tensors, str(folder / f"rng{suffix}.safetensors"))


def restore_rng(folder: Path, suffix: str = "") -> None:
    state = json.loads((folder / f"rng{suffix}.json").read_text())
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, position, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), position, has_gauss, cached))
    tensors = load_file(str(folder / f"rng{suffix}.safetensors"))
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[f"cuda{i}"] for i in range(len(tensors) - 1)]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest_last(folder: Path) -> None:
    """sha256 of every file, written after all of them and fsynced with them: a checkpoint is complete and intact
    exactly when its manifest exists and matches."""
    files = [p for p in sorted(folder.rglob("*")) if p.is_file() and p.name != MANIFEST]
    sums = {p.relative_to(folder).as_posix(): sha256_file(p) for p in files}
    (folder / MANIFEST).write_text(json.dumps(sums, indent=2))
    for path in sorted(folder.rglob("*"), reverse=True):  # files, then the folders holding them
        fsync(path)
    fsync(folder)


def fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def verify_checkpoint(folder: Path) -> str:
    """'' for an intact checkpoint, else why it cannot be trusted."""
    manifest = folder / MANIFEST
    if not manifest.is_file():
        return "no manifest (an interrupted or foreign write)"
    try:
        sums = json.loads(manifest.read_text())
    except (OSError, ValueError) as error:
        return f"unreadable manifest: {error}"
    for name, expected in sums.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if sha256_file(path) != expected:
            return f"{name} does not match its sha256 in the manifest (damaged or altered)"
    return ""


def save_checkpoint(
    checkpoints_dir: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    state: TrainerState,
    keep: int,
    config: dict[str, Any] | None = None,
    info: Distributed = SINGLE,
) -> Path:
    """Write into a temporary folder, then rename: a crash never leaves a checkpoint that looks complete. The run's
    resolved config goes with it, so a resume can tell what changed.

    On several processes (`info`; `model` is then the DDP / FSDP2-wrapped module) every rank writes its own shards
    of the trainable weights and optimizer state (torch.distributed.checkpoint, safetensors files: no pickle) and
    its own RNG state; rank 0 writes the rest, the manifest and does the rename."""
    final = checkpoints_dir / f"{CHECKPOINT_PREFIX}{state.global_step:08d}"
    tmp = checkpoints_dir / f".tmp-{final.name}"
    try:
        write_checkpoint(tmp, final, model, optimizer, scheduler, state, keep, config, info)
    except OSError:  # a full disk: the partial folder goes, so it does not hold the space the user must free
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def write_checkpoint(
    tmp: Path,
    final: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    state: TrainerState,
    keep: int,
    config: dict[str, Any] | None,
    info: Distributed,
) -> None:
    checkpoints_dir = final.parent
    if info.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    info.barrier()
    if info.enabled:
        param_groups = save_sharded_state(tmp / SHARDS, model, optimizer)
        save_rng(tmp, f"-rank{info.rank}")
        optimizer_state: dict[str, Any] = {"param_groups": param_groups}
    else:
        save_file(trainable_state(model), str(tmp / "trainable.safetensors"))
        save_rng(tmp)
        optimizer_state = {"optimizer": optimizer.state_dict()}
    if info.is_main:
        torch.save({**optimizer_state, "scheduler": scheduler.state_dict()}, tmp / "optimizer.pt")
        (tmp / "trainer_state.json").write_text(json.dumps(asdict(state), indent=2))
        if info.enabled:
            layout = {"world_size": info.world_size, "strategy": info.strategy}
            (tmp / DISTRIBUTED_LAYOUT).write_text(json.dumps(layout, indent=2))
        if config is not None:
            (tmp / "config.json").write_text(json.dumps(config, indent=2))
    release_offloaded_moments(optimizer)  # read whole for the file: out of memory again
    info.barrier()  # every rank's files are in place before the manifest sums them
    if info.is_main:
        normal_permissions(tmp)
        write_manifest_last(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync(checkpoints_dir)
        prune_checkpoints(checkpoints_dir, keep, state.global_step)
    info.barrier()


def save_sharded_state(folder: Path, wrapped: torch.nn.Module, optimizer: torch.optim.Optimizer) -> Any:
    """Each rank's shards of the trainable weights and of the optimizer's tensors, with torch.distributed.checkpoint
    into safetensors files (its HuggingFace storage: the offsets are JSON metadata, nothing is pickled). Returns
    the optimizer's param groups (plain numbers and names), which rank 0 stores beside them."""
    import torch.distributed.checkpoint as dcp

    weights, optimizer_state = sharded_state(wrapped, optimizer)
    writer = dcp.HuggingFaceStorageWriter(str(folder), save_distributed=True)
    dcp.save(flat_tensors(weights, optimizer_state), storage_writer=writer)
    return optimizer_state["param_groups"]


def sharded_state(wrapped: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict[str, Any], Any]:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    weights, optimizer_state = get_state_dict(wrapped, optimizer, options=StateDictOptions(ignore_frozen_params=True))
    names = {name for name, p in unwrap(wrapped).named_parameters() if p.requires_grad}  # a tied weight once
    return {name: tensor for name, tensor in weights.items() if name in names}, optimizer_state


def flat_tensors(weights: dict[str, Any], optimizer_state: Any) -> dict[str, Any]:
    """One flat name -> tensor map of the weights and every optimizer state tensor (exp_avg, exp_avg_sq, step)."""
    tensors = {f"model.{name}": tensor for name, tensor in weights.items()}
    for name, states in optimizer_state["state"].items():
        tensors |= {f"optim.{name}.{key}": value for key, value in states.items()}
    return tensors


def load_sharded_state(
    folder: Path, wrapped: torch.nn.Module, optimizer: torch.optim.Optimizer, param_groups: Any
) -> None:
    """Read this rank's shards back into the wrapped model and the optimizer (the inverse of save_sharded_state)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    weights, optimizer_state = sharded_state(wrapped, optimizer)  # this rank's tensors, filled in place below
    dcp.load(flat_tensors(weights, optimizer_state), storage_reader=dcp.HuggingFaceStorageReader(str(folder)))
    optimizer_state["param_groups"] = param_groups
    options = StateDictOptions(ignore_frozen_params=True, strict=False)
    set_state_dict(wrapped, optimizer, model_state_dict=weights, optim_state_dict=optimizer_state, options=options)


def list_checkpoints(checkpoints_dir: Path) -> list[Path]:
    """The checkpoint folders (step-<digits>), oldest first; anything else in the folder is not a checkpoint."""
    if not checkpoints_dir.is_dir():
        return []
    found = [p for p in checkpoints_dir.iterdir() if p.is_dir() and is_checkpoint_name(p.name)]
    return sorted(found, key=step_of)


def is_checkpoint_name(name: str) -> bool:
    digits = name[len(CHECKPOINT_PREFIX) :]
    return name.startswith(CHECKPOINT_PREFIX) and digits.isascii() and digits.isdigit()


def foreign_entries(checkpoints_dir: Path) -> list[str]:
    """Names in checkpoints/ that sftune did not write (a copy such as step-latest, a stray file); ignored by resume,
    which says so. A `.tmp-` folder is a write that was interrupted: it is replaced by the next write."""
    if not checkpoints_dir.is_dir():
        return []
    return sorted(
        p.name
        for p in checkpoints_dir.iterdir()
        if not p.name.startswith(".tmp-") and not (p.is_dir() and is_checkpoint_name(p.name))
    )


def step_of(checkpoint: Path) -> int:
    return int(checkpoint.name[len(CHECKPOINT_PREFIX) :])


def prune_checkpoints(checkpoints_dir: Path, keep: int, current_step: int | None = None) -> None:
    """Keep the newest `keep` checkpoints of the current history (steps up to `current_step`). Checkpoints of
    later steps belong to a history a resume went back from: left alone (a later save of that step replaces it)."""
    history = [c for c in list_checkpoints(checkpoints_dir) if current_step is None or step_of(c) <= current_step]
    for old in history[:-keep]:
        shutil.rmtree(old)


def remove_checkpoints(checkpoints_dir: Path) -> None:
    """Every checkpoint of the run (its model is saved and it asked for none: train.checkpoint_every unset)."""
    for checkpoint in list_checkpoints(checkpoints_dir):
        shutil.rmtree(checkpoint)
    with contextlib.suppress(OSError):
        checkpoints_dir.rmdir()  # only when nothing else is in it


def find_resume_checkpoint(resume: str, checkpoints_dir: Path) -> Path | None:
    """'auto' -> the newest intact checkpoint of this run (None if there is none), naming each newer one skipped
    and why; otherwise the given folder, which must be intact."""
    if resume == "auto":
        for name in foreign_entries(checkpoints_dir):
            print(f"resume: ignoring {checkpoints_dir / name}: not a checkpoint sftune wrote (step-<number>)")
        for checkpoint in reversed(list_checkpoints(checkpoints_dir)):
            problem = verify_checkpoint(checkpoint)
            if not problem:
                return checkpoint
            print(f"resume: skipping {checkpoint}: {problem}")
        return None
    path = Path(resume)
    if not (path / "trainer_state.json").is_file():
        raise FileNotFoundError(f"--resume {resume}: not a checkpoint folder (no trainer_state.json in it)")
    problem = verify_checkpoint(path)
    if problem:
        raise CheckpointError(f"--resume {resume}: {problem}; resume from another checkpoint (--resume auto picks "
                              "the newest intact one)")  # fmt: skip
    return path


def check_layout(path: Path, info: Distributed) -> None:
    """A checkpoint resumes only with the process count and strategy that wrote it: each rank's shards, RNG and
    share of the data belong to that layout."""
    layout_file = path / DISTRIBUTED_LAYOUT
    layout: dict[str, Any] = {"world_size": 1, "strategy": "single"}
    if layout_file.is_file():
        layout = json.loads(layout_file.read_text())
    if (layout["world_size"], layout["strategy"]) != (info.world_size, info.strategy):
        raise CheckpointError(
            f"checkpoint {path} was written by {layout['world_size']} process(es) with strategy "
            f"{layout['strategy']}; this run has {info.world_size} with {info.strategy}. Resharding a checkpoint to "
            f"another layout is not supported: resume with the same layout (e.g. sftune train --nproc "
            f"{layout['world_size']}, train.strategy={layout['strategy'] if layout['world_size'] > 1 else 'auto'})"
        )


def load_checkpoint(
    path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, info: Distributed = SINGLE
) -> TrainerState:
    check_layout(path, info)
    if info.enabled:
        states = read_optimizer_file(path)
        load_sharded_state(path / SHARDS, model, optimizer, states["param_groups"])
        scheduler.load_state_dict(states["scheduler"])
        restore_rng(path, f"-rank{info.rank}")
        return TrainerState(**json.loads((path / "trainer_state.json").read_text()))
    weights = load_file(str(path / "trainable.safetensors"))
    expected = {name for name, p in model.named_parameters() if p.requires_grad}
    if set(weights) != expected:
        missing, extra = sorted(expected - set(weights))[:5], sorted(set(weights) - expected)[:5]
        raise CheckpointError(f"checkpoint {path} does not match the model: missing {missing}, unexpected {extra}")
    model.load_state_dict(weights, strict=False)
    del weights  # copied into the model: not held beside the optimizer state
    states = read_optimizer_file(path)
    optimizer.load_state_dict(states["optimizer"])
    scheduler.load_state_dict(states["scheduler"])
    restore_rng(path)
    return TrainerState(**json.loads((path / "trainer_state.json").read_text()))


def read_optimizer_file(path: Path) -> dict[str, Any]:
    try:  # plain data only: a pickled object that would run code is refused, never executed
        # mmap: the optimizer state stays file pages (reclaimable) until it is copied where it lives
        return torch.load(path / "optimizer.pt", weights_only=True, mmap=True)  # type: ignore[no-any-return]
    except pickle.UnpicklingError as error:
        raise CheckpointError(
            f"{path / 'optimizer.pt'} holds more than plain tensors and numbers: refused ({error})"
        ) from None
