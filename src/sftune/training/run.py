"""The parts of a run every recipe shares: its folder, seeding, device and precision, step counting, restore."""

from __future__ import annotations

import contextlib
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
from sftune.data.batching import accumulation_windows
from sftune.model.load import bf16_supported, resolve_device
from sftune.training.checkpoint import TrainerState, find_resume_checkpoint, load_checkpoint
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


def setup_run_dir(config: Config, resume: str | None) -> Path:
    """An existing, non-empty run folder is only reused to resume, or replaced with output.overwrite."""
    run_dir = Path(config.output.dir)
    if run_dir.exists() and any(run_dir.iterdir()) and not resume:
        if not config.output.overwrite:
            raise RunError(
                f"output folder '{run_dir}' already exists and is not empty: pass --overwrite "
                "(output.overwrite=true) to replace it, --resume auto to continue it, or choose another output.dir"
            )
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(config_to_yaml(config))
    return run_dir


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def setup_device(config: Config) -> tuple[torch.device, str]:
    """The device to train on and the precision resolved for it (auto = bf16-mixed where bf16 is native)."""
    if config.train.num_threads:
        torch.set_num_threads(config.train.num_threads)
    device = resolve_device(config.train.device)
    precision = config.train.precision
    if precision == "auto":
        precision = "bf16-mixed" if bf16_supported(device.type) else "fp32"
    return device, precision


def autocast_context(device: torch.device, precision: str) -> contextlib.AbstractContextManager[Any]:
    if precision == "bf16-mixed":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def count_total_steps(config: Config, num_examples: int) -> int:
    cfg = config.train
    if cfg.max_steps:
        return cfg.max_steps
    per_epoch = accumulation_windows(num_examples, cfg.micro_batch_size, cfg.gradient_accumulation_steps)
    return max(1, round(cfg.epochs * per_epoch))


def restore_state(resume: str | None, run_dir: Path, model: Any, optimizer: Any, scheduler: Any) -> TrainerState:
    """The checkpoint's weights, optimizer, scheduler, RNG and data position; step 0 when not resuming."""
    checkpoint = find_resume_checkpoint(resume, run_dir / "checkpoints") if resume else None
    if checkpoint is None:
        if resume:  # nothing to resume from: start over, without the records of the run that crashed
            print(f"resume: no intact checkpoint in {run_dir / 'checkpoints'}: starting from step 0")
            for log_name in ("metrics.jsonl", "samples.jsonl"):
                MetricsLog(run_dir / log_name).truncate_after(0)
        return TrainerState(global_step=0, epoch=0, window=0)
    state = load_checkpoint(checkpoint, model, optimizer, scheduler)
    for log_name in ("metrics.jsonl", "samples.jsonl"):
        MetricsLog(run_dir / log_name).truncate_after(state.global_step)
    print(f"resumed from {checkpoint} at step {state.global_step} (epoch {state.epoch}, window {state.window})")
    return state


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
