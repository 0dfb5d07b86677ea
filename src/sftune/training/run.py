"""The parts of a run every recipe shares: its folder, seeding, device and precision, step counting, restore."""

from __future__ import annotations

import json
import random
import shutil
import signal
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sftune.config import Config, UserError, config_to_yaml
from sftune.data.batching import accumulation_windows, window_micro_batches
from sftune.training.checkpoint import TrainerState, find_resume_checkpoint, load_checkpoint
from sftune.training.distributed import SINGLE, Distributed
from sftune.training.manifest import sha256_of
from sftune.training.metrics import MetricsLog


class RunError(UserError, RuntimeError):
    """A run that cannot start as configured; the message says how to fix it."""


@dataclass
class TrainResult:
    run_dir: Path
    model_dir: Path
    global_step: int
    final_loss: float | None
    val_loss: float | None
    counts: dict[str, Any] = field(default_factory=dict)


def setup_run_dir(config: Config, resume: str | None, info: Distributed = SINGLE) -> Path:
    """An existing, non-empty run folder is only reused to resume, or replaced with output.overwrite. Rank 0 of a
    distributed run prepares it; the other ranks wait for it."""
    run_dir = Path(config.output.dir)
    if not info.is_main:
        info.barrier()
        return run_dir
    prepare_run_dir(run_dir, config, resume)
    info.barrier()
    return run_dir


def prepare_run_dir(run_dir: Path, config: Config, resume: str | None) -> None:
    if run_dir.exists() and not run_dir.is_dir():
        raise RunError(f"output.dir '{run_dir}' is a file, not a folder: choose another output.dir")
    if run_dir.exists() and any(run_dir.iterdir()) and not resume:
        if not config.output.overwrite:
            raise RunError(
                f"output folder '{run_dir}' already exists and is not empty: pass --overwrite "
                "(output.overwrite=true) to replace it, --resume auto to continue it, or choose another output.dir"
            )
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(config_to_yaml(config))


def check_free_space(run_dir: Path, model: Any, config: Config) -> None:
    """Refuse to start a run whose first checkpoint and final model would not fit on the output disk: finding out
    after hours of training loses them."""
    parameters = list(model.parameters())
    trainable = sum(p.numel() for p in parameters if p.requires_grad)
    total = sum(p.numel() for p in parameters)
    checkpoint = trainable * 4 * 3 if config.train.checkpoint_every else 0  # fp32 weights + 2 AdamW states
    final = (total if config.train.method == "full" else trainable) * 4
    moments = trainable * 8 if config.train.offload_optimizer_state is True else 0  # host/offload.py's file
    needed = int((checkpoint * 2 + final + moments) * 1.1)  # a checkpoint is written beside the previous one
    free = shutil.disk_usage(run_dir).free
    if free < needed:
        raise RunError(
            f"the output disk of '{run_dir}' has {free / 2**30:.2f} GiB free, and this run needs about "
            f"{needed / 2**30:.2f} GiB for its checkpoints and final model: free space, or choose another output.dir"
        )


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def count_total_steps(config: Config, num_examples: int, world_size: int = 1) -> int:
    """Optimizer steps of the run (train.max_steps, or its epochs of windows of micro-batch x world size)."""
    cfg = config.train
    if cfg.max_steps:
        return cfg.max_steps
    per_epoch = steps_per_epoch(config, num_examples, world_size)
    return max(1, round(cfg.epochs * per_epoch))


def window_indices(config: Config, num_examples: int, state: TrainerState, world_size: int = 1) -> list[list[int]]:
    """Example indices of each global micro-batch (micro-batch x world size, split across the ranks after) of the
    window `state` is at: a function of (seed, epoch, window) only, so resume recomputes it."""
    cfg = config.train
    global_micro_batch = cfg.micro_batch_size * world_size
    return window_micro_batches(num_examples, cfg.seed, state.epoch, state.window, global_micro_batch,
                                cfg.gradient_accumulation_steps, config.data.shuffle)  # fmt: skip


def steps_per_epoch(config: Config, num_examples: int, world_size: int = 1) -> int:
    """Accumulation windows in one epoch; a window of a distributed run holds micro-batch x world size examples."""
    cfg = config.train
    return accumulation_windows(num_examples, cfg.micro_batch_size * world_size, cfg.gradient_accumulation_steps)


# What a resume may change without breaking exactness (how long to train, how often to log, where output goes);
# anything else (data, template, model, adapters, seed, batch geometry, optimizer settings) needs --resume-changed.
RESUME_FREE_KEYS = {
    "train": {"max_steps", "epochs", "progress", "log_every", "checkpoint_every", "keep_checkpoints", "eval_every",
              "num_threads", "device", "memory_budget_gib",
              "release_freed_memory", "lean_activations", "host_allocator", "offload_optimizer_state"},
    "output": {"dir", "overwrite", "save_dtype"},
    "lora": {"fuse_shared_inputs"},  # deprecated, ignored
    "eval": None,  # the whole section
    "generate": None,
    "data": {"train", "validation"},  # the paths: their content is compared through data_sha256
}  # fmt: skip


def resume_fingerprint(config: Config) -> dict[str, Any]:
    """What a checkpoint records to compare a resume against: the resolved config and the data files' sha256."""
    files = {"train": sha256_of(config.data.train), "validation": sha256_of(config.data.validation)}
    return {**config.model_dump(mode="json"), "data_sha256": files}


def config_changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """'section.key: old -> new' for every setting that differs and matters to an exact resume."""
    changes = []
    for section in sorted(set(old) | set(new)):
        free = RESUME_FREE_KEYS.get(section, set())
        if free is None:
            continue
        before, after = old.get(section) or {}, new.get(section) or {}
        for key in sorted(set(before) | set(after)):
            if key not in free and before.get(key) != after.get(key):
                changes.append(f"{section}.{key}: {before.get(key)!r} -> {after.get(key)!r}")
    return changes


def restore_state(
    resume: str | None,
    run_dir: Path,
    model: Any,
    optimizer: Any,
    scheduler: Any,
    config: Config | None = None,
    allow_changes: bool = False,
    info: Distributed = SINGLE,
) -> TrainerState:
    """The checkpoint's weights, optimizer, scheduler, RNG and data position; step 0 when not resuming. A config
    that differs from the checkpoint's in a way that breaks exactness is refused unless `allow_changes`; then the
    new optimizer settings (learning rate, betas, weight decay) are the ones used from here on, as recorded."""
    checkpoint = find_resume_checkpoint(resume, run_dir / "checkpoints") if resume else None
    if checkpoint is None:
        if resume:  # nothing to resume from: start over, without the records of the run that crashed
            print(f"resume: no intact checkpoint in {run_dir / 'checkpoints'}: starting from step 0")
            truncate_logs(run_dir, 0, info)
        return TrainerState(global_step=0, epoch=0, window=0)
    changes = resumed_config_changes(checkpoint, config)
    if changes and not allow_changes:
        raise RunError(
            f"resuming from {checkpoint} with a different config: {'; '.join(changes)}. The run would no longer be "
            "the one the checkpoint belongs to: resume with the same settings, or pass --resume-changed to go on "
            "with the new ones (they are recorded in config.yaml and manifest.json)"
        )
    state = load_checkpoint(checkpoint, model, optimizer, scheduler, info)
    if changes and config is not None:
        print(f"resume: going on with changed settings (--resume-changed): {'; '.join(changes)}")
        apply_optimizer_settings(optimizer, scheduler, config)
    truncate_logs(run_dir, state.global_step, info)
    print(f"resumed from {checkpoint} at step {state.global_step} (epoch {state.epoch}, window {state.window})")
    return state


def truncate_logs(run_dir: Path, step: int, info: Distributed) -> None:
    """Drop the log records of steps after `step` (a resume redoes them); rank 0 owns the logs."""
    if info.is_main:
        for log_name in ("metrics.jsonl", "samples.jsonl"):
            MetricsLog(run_dir / log_name).truncate_after(step)
    info.barrier()


def resumed_config_changes(checkpoint: Path, config: Config | None) -> list[str]:
    saved = checkpoint / "config.json"
    if config is None or not saved.is_file():
        return []
    return config_changes(json.loads(saved.read_text()), resume_fingerprint(config))


def apply_optimizer_settings(optimizer: Any, scheduler: Any, config: Config) -> None:
    """The new peak learning rate, betas and weight decay from here on (the checkpoint restored the old ones)."""
    cfg = config.train
    scheduler.base_lrs = [cfg.learning_rate for _ in optimizer.param_groups]
    rates = [
        base * factor(scheduler.last_epoch)
        for base, factor in zip(scheduler.base_lrs, scheduler.lr_lambdas, strict=True)
    ]
    for index, (group, rate) in enumerate(zip(optimizer.param_groups, rates, strict=True)):
        group["lr"], group["initial_lr"], group["betas"] = rate, cfg.learning_rate, tuple(cfg.adam_betas)
        group["weight_decay"] = cfg.weight_decay if index == 0 else 0.0  # group 0: the matrices (optim.py)


def advance(state: TrainerState, steps_per_epoch: int, tokens: int) -> TrainerState:
    """The state after one optimizer step: the next window, rolling over into the next epoch."""
    window, epoch = state.window + 1, state.epoch
    if window >= steps_per_epoch:
        window, epoch = 0, epoch + 1
    return TrainerState(state.global_step + 1, epoch, window, state.tokens_seen + tokens)


class TrainingInterrupted(RunError):
    """SIGTERM or SIGINT: the run stopped after a step and saved a checkpoint to resume from."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class StopRequest:
    """While active, SIGTERM and SIGINT only ask the loop to stop after the current step (`requested`), so it can
    write a checkpoint first; a second signal of the same kind stops at once."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.requested: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc: object) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)

    def _handle(self, number: int, frame: Any) -> None:
        if self.requested == number:  # asked twice: do not wait for the step
            raise KeyboardInterrupt
        self.requested = number
        print(f"\n{signal.Signals(number).name} received: stopping after this step, with a checkpoint")

    def stop(self, checkpoint: Path, step: int) -> TrainingInterrupted:
        name = signal.Signals(self.requested or signal.SIGTERM).name
        return TrainingInterrupted(
            f"{name}: stopped after step {step}; checkpoint {checkpoint} written. Continue with --resume auto",
            128 + int(self.requested or signal.SIGTERM),
        )
