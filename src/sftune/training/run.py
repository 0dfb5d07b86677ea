"""The parts of a run every recipe shares: its folder, seeding, device and precision, step counting, restore."""

from __future__ import annotations

import json
import random
import signal
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sftune.config import Config, UserError
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
            refuse_finished_run(run_dir)
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


def refuse_finished_run(run_dir: Path) -> None:
    """--resume with no checkpoint to resume from would train from step 0 over a finished model: refused."""
    if (run_dir / "model").exists():
        raise RunError(
            f"--resume auto: '{run_dir}' holds a finished model and no intact checkpoint to resume from, so there is "
            "nothing to resume. Train it again from step 0 with --overwrite (output.overwrite=true; it replaces "
            "model/), or choose another output.dir"
        )


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


class StoppedAtOnce(KeyboardInterrupt):
    """A second SIGINT / SIGTERM: the run stops mid-step, without a checkpoint (the command line prints one line
    and exits 128 + the signal's number)."""

    def __init__(self, number: int) -> None:
        super().__init__(signal.Signals(number).name)
        self.exit_code = 128 + number


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
            raise StoppedAtOnce(number)
        self.requested = number
        print(f"\n{signal.Signals(number).name} received: stopping after this step, with a checkpoint")

    def stop(self, checkpoint: Path, step: int) -> TrainingInterrupted:
        name = signal.Signals(self.requested or signal.SIGTERM).name
        return TrainingInterrupted(
            f"{name}: stopped after step {step}; checkpoint {checkpoint} written. Continue with --resume auto",
            128 + int(self.requested or signal.SIGTERM),
        )
