"""The one training loop under every objective (SFT, DPO, and what comes after): start the run, fit, finish.

An objective supplies what differs (`Objective`): how a window of item indices becomes this rank's micro-batches
(built from data, or produced during training: a rollout objective generates, scores, then batches here), what a
micro-batch's loss is divided by (supervised tokens, pairs, ...), its extra metrics and its validation. The loop
owns what must never drift between objectives: the run folder, every `auto` resolved once (training/settings.py),
the free-disk check, DDP / FSDP2, the optimizer and schedule, exact resume, signals, health checks, logging every
train.log_every steps, checkpoints, and the final save.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Protocol

import torch

from sftune.config import Config
from sftune.data.templates import ChatTemplate
from sftune.model.load import resolve_device
from sftune.training.checkpoint import TrainerState, list_checkpoints, remove_checkpoints, save_checkpoint
from sftune.training.distributed import (
    Distributed,
    LossModule,
    gathered_model,
    init_distributed,
    shutdown,
    training_device,
    wrap_model,
)
from sftune.training.metrics import MetricsLog, Throughput, log_step, progress_bar
from sftune.training.optim import build_optimizer, build_scheduler
from sftune.training.outputs import save_outputs
from sftune.training.run import (
    RunError,
    StopRequest,
    TrainResult,
    advance,
    count_total_steps,
    restore_state,
    resume_fingerprint,
    seed_everything,
    steps_per_epoch,
    window_indices,
)
from sftune.training.run_folder import RunLock, check_free_space, saved_step, setup_run_dir
from sftune.training.settings import Estimator, Settings, describe_settings, resolve_settings, settings_yaml
from sftune.training.step import backward_window, optimizer_step


@dataclass
class Run:
    """One training run's context: its config (every `auto` resolved once `resolve` ran), where it runs, its folder."""

    config: Config
    device: torch.device
    info: Distributed
    run_dir: Path
    resume: str | None = None
    resume_changed: bool = False
    settings: Settings | None = None
    lock: RunLock | None = None
    log: MetricsLog = field(init=False)

    def __post_init__(self) -> None:
        self.log = MetricsLog(self.run_dir / "metrics.jsonl", enabled=self.info.is_main)

    def __enter__(self) -> Run:
        return self

    def __exit__(self, *exc: object) -> None:
        """The run folder's lock is released however the run ends (a process that dies loses it anyway)."""
        if self.lock is not None:
            self.lock.release()

    @property
    def precision(self) -> str:
        assert self.settings is not None, "Run.resolve first: the precision is one of the run's `auto` settings"
        return self.settings.precision

    @property
    def memory(self) -> dict[str, Any] | None:
        """The memory estimate the run's settings were resolved with (None: no estimate)."""
        return self.settings.memory if self.settings else None

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.precision == "bf16-mixed":
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def resolve(
        self, estimate: Estimator | None = None, continued_adapter: bool = False, objective: str = "sft"
    ) -> None:
        """Every `auto` of the run, resolved once: printed with its reason and written into config.yaml."""
        world_size = self.info.world_size
        self.settings = resolve_settings(self.config, self.device, world_size, estimate, continued_adapter, objective)
        self.config = self.settings.config
        if self.info.enabled:
            self.info = replace(self.info, strategy=self.config.train.strategy)
        print(describe_settings(self.settings))
        if self.info.is_main:
            (self.run_dir / "config.yaml").write_text(settings_yaml(self.settings))


class Objective(Protocol):
    """What an objective supplies to the loop. `items` is what an epoch runs over (examples, pairs, prompts)."""

    @property
    def items(self) -> list[Any]: ...

    def loss_module(self) -> LossModule:
        """The model and this objective's summed loss as one module: what DDP / FSDP2 wrap."""

    def window_batches(self, window: list[list[int]], run: Run) -> list[Any]:
        """This rank's micro-batches (on the device) of a window of global micro-batches of item indices."""

    def count(self, batch: Any) -> int:
        """What a micro-batch's summed loss is divided by, summed over the window: its supervised tokens, pairs."""

    def window_tokens(self, window: list[list[int]]) -> int:
        """Tokens of the whole window (all ranks): the throughput and tokens_seen."""

    def sources(self, window: list[list[int]]) -> list[str]:
        """Where each item of the window came from (named when a step is not finite)."""

    def step_metrics(self, info: Distributed) -> dict[str, float]:
        """Extra metrics of the steps since the last call (every rank calls it at the same step)."""

    def has_validation(self) -> bool: ...

    def validate(self, wrapped: torch.nn.Module, run: Run, state: TrainerState) -> dict[str, float]:
        """Validation metrics (val_loss first), logged; `wrapped` runs the loss module on every rank."""

    def end_token_ids(self) -> list[int]:
        """Where generation from the trained model must stop."""

    def counts(self) -> dict[str, Any]:
        """What was trained, validated and rejected: the manifest's and the result's counts."""

    def write_outputs(self, run: Run) -> None:
        """The objective's own files beside the model (rank 0, after the save): curves, tables."""


def start_run(config: Config, resume: str | None = None, resume_changed: bool = False) -> Run:
    """This process's part of a run: threads, device, its place in a distributed job (one process: SINGLE, every
    collective a no-op), the run folder (locked; refused, replaced or resumed) and the seed. Used as a context
    (`with start_run(...) as run:`), which releases the lock when the run ends."""
    if config.train.num_threads:
        torch.set_num_threads(config.train.num_threads)
    device = resolve_device(config.train.device)
    info = init_distributed(config, device)
    run_dir, lock = setup_run_dir(config, resume, info)  # locked by rank 0 until the run ends
    seed_everything(config.train.seed)
    return Run(config, training_device(device, info), info, run_dir, resume, resume_changed, lock=lock)


def fit(
    run: Run,
    model: Any,
    objective: Objective,
    tokenizer: Any,
    template: ChatTemplate,
    rebuild: Callable[[], Any],
    saved_config: Config | None = None,
) -> TrainResult:
    """Train `model` on `objective` to the end of the run (or a stop request), then save. `rebuild`: the model built
    anew (FSDP2 gathers the trained weights into it); `saved_config`: the config whose model the outputs name (DPO
    from an SFT run: the folder the weights loaded from)."""
    # ------------------------------------------------------------------------------------------- setup
    config, info, cfg = run.config, run.info, run.config.train
    trainer = wrap_model(objective.loss_module(), info, run.device)  # DDP / FSDP2 around model + loss
    optimizer = build_optimizer(list(model.named_parameters()), cfg, run.run_dir)
    total_steps = count_total_steps(config, len(objective.items), info.world_size)
    scheduler = build_scheduler(optimizer, cfg, total_steps)
    checkpointed = trainer if info.enabled else model
    state = restore_state(run.resume, run.run_dir, checkpointed, optimizer, scheduler, config, run.resume_changed, info)
    if state.global_step >= total_steps and saved_step(run.run_dir) == state.global_step:
        return finished_result(run, objective, state)  # resumed a run that had ended and saved: nothing to do
    info.on_main(lambda: check_free_space(run.run_dir, model, config, state.global_step, total_steps))
    checkpointed_step = state.global_step if state.global_step else None  # a resume starts at a checkpoint
    fingerprint = resume_fingerprint(config)  # goes into every checkpoint: a resume compares against it
    windows_per_epoch = steps_per_epoch(config, len(objective.items), info.world_size)
    throughput, bar = Throughput(), progress_bar(total_steps, state.global_step, cfg.progress and info.is_main)
    last_loss, val_metrics, skipped = None, {}, 0

    def checkpoint() -> Path:
        nonlocal checkpointed_step
        with reported_write_errors(run.run_dir, f"checkpoint of step {state.global_step}"):
            path = save_checkpoint(run.run_dir / "checkpoints", checkpointed, optimizer, scheduler, state,
                                   cfg.keep_checkpoints, fingerprint, info)  # fmt: skip
        checkpointed_step = state.global_step
        return path

    # -------------------------------------------------------------------------------------------- loop
    model.train()
    first_step, loop_started = state.global_step + 1, time.perf_counter()
    with StopRequest() as stop:  # SIGTERM / Ctrl-C: finish the step, checkpoint, stop
        while state.global_step < total_steps:
            window = window_indices(config, len(objective.items), state, info.world_size)  # split across ranks
            batches = objective.window_batches(window, run)
            step_loss = backward_window(batches, trainer, run.autocast(), count=objective.count, info=info)
            tokens = objective.window_tokens(window)
            stopping = info.any_rank(stop.requested is not None)
            grad_norm, lr, updated = optimizer_step(
                model, optimizer, scheduler, cfg, step_loss, state.global_step + 1, objective.sources(window)
            )
            skipped += not updated
            state = advance(state, windows_per_epoch, tokens)
            throughput.add(tokens)
            last_loss = step_loss
            metrics = objective.step_metrics(info)  # every rank, every step: its sums restart
            if state.global_step % cfg.log_every == 0 or state.global_step == total_steps:
                values = {"loss": step_loss, "lr": lr, "grad_norm": grad_norm, "tokens_per_s": throughput.rate()}
                values |= metrics | ({"skipped_steps": skipped} if skipped else {})
                log_step(run.log, bar, state.global_step, state.epoch, state.tokens_seen, values)
            bar.update(1)
            if state.global_step == first_step and info.is_main:
                bar.write(first_step_line(state.global_step, total_steps, time.perf_counter() - loop_started))
            if objective.has_validation() and cfg.eval_every and state.global_step % cfg.eval_every == 0:
                val_metrics = objective.validate(trainer, run, state)
            if cfg.checkpoint_every and state.global_step % cfg.checkpoint_every == 0:
                checkpoint()
            if stopping:  # on every rank at the same step: the checkpoint is written by all of them
                bar.close()
                raise stop.stop(checkpoint(), state.global_step)
    bar.close()
    if objective.has_validation() and (not cfg.eval_every or state.global_step % cfg.eval_every != 0):
        val_metrics = objective.validate(trainer, run, state)

    # -------------------------------------------------------------------------------------------- save
    if checkpointed_step != state.global_step:
        checkpoint()  # first: a final save that fails (a full disk) loses no training, --resume auto saves again
    model_dir = run.run_dir / "model"
    trained = gathered_model(trainer, model, info, rebuild)
    counts = objective.counts() | {"trained": trained_counts(config, objective, state, info.world_size)}
    if info.is_main:
        with reported_write_errors(run.run_dir, "final model", resumable=True):
            model_dir = save_outputs(saved_config or config, run.run_dir, trained, tokenizer, template,
                                     objective.end_token_ids(), counts, state, run.device, run.precision)  # fmt: skip
            objective.write_outputs(run)
        if not cfg.checkpoint_every:  # the run asked for none: the ones written to stop or to save safely go
            remove_checkpoints(run.run_dir / "checkpoints")
    shutdown(info)
    val_loss = val_metrics.get("val_loss")
    return TrainResult(run.run_dir, model_dir, state.global_step, last_loss, val_loss, counts)


def first_step_line(step: int, total_steps: int, seconds: float) -> str:
    """The first step's sign of life: how long it took and, at that pace, when the run ends (the first step is
    usually the slowest: warm-up of kernels and allocator)."""
    left = total_steps - step
    if left <= 0:
        return f"step {step}/{total_steps} took {seconds:.1f} s"
    finish = datetime.now() + timedelta(seconds=seconds * left)
    return (f"step {step}/{total_steps} took {seconds:.1f} s; {left} to go: about {duration_text(seconds * left)} "
            f"at that pace (ETA {finish:%H:%M}, first steps are the slowest)")  # fmt: skip


def duration_text(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def trained_counts(config: Config, objective: Objective, state: TrainerState, world_size: int) -> dict[str, Any]:
    """What the run actually trained on, of what it had: a max_steps run may see a fraction of its data, a long one
    every item several times. Recomputed from the seeded window order (a resumed run counts its first part too)."""
    available = len(objective.items)
    seen: list[int] = []
    windows_per_epoch = steps_per_epoch(config, available, world_size)
    position = TrainerState(0, 0, 0)
    for _ in range(state.global_step):
        seen += [i for micro_batch in window_indices(config, available, position, world_size) for i in micro_batch]
        position = advance(position, windows_per_epoch, 0)
    return {
        "steps": state.global_step,
        "items": len(set(seen)),
        "items_with_repeats": len(seen),
        "items_available": available,
        "epochs": round(len(seen) / available, 4) if available else 0.0,
        "tokens": state.tokens_seen,
        "tokens_available": objective.window_tokens([list(range(available))]),
    }


def finished_result(run: Run, objective: Objective, state: TrainerState) -> TrainResult:
    """`--resume auto` on a run that ended and saved its model at the checkpoint's step: nothing is trained or
    written again."""
    records = run.log.read()
    losses = [r["loss"] for r in records if "loss" in r]
    model_dir = run.run_dir / "model"
    print(f"the run already ended at step {state.global_step} and saved its model in {model_dir}: nothing to do")
    shutdown(run.info)
    last_loss = losses[-1] if losses else None
    return TrainResult(run.run_dir, model_dir, state.global_step, last_loss, None, objective.counts())


@contextlib.contextmanager
def reported_write_errors(run_dir: Path, what: str, resumable: bool = False) -> Iterator[None]:
    """A write that fails (a full disk, a folder that became read-only) is one message that says what is safe and
    how to go on, never a traceback: each write is atomic, so nothing half written is left behind."""
    try:
        yield
    except OSError as error:
        newest = list_checkpoints(run_dir / "checkpoints")
        kept = f"the newest intact checkpoint is {newest[-1]}" if newest else "there is no checkpoint yet"
        after = "to write it without training again" if resumable else "to go on from there"
        raise RunError(
            f"could not write the {what} in '{run_dir}': {error.strerror or error}. Nothing half written was left; "
            f"{kept}. Free space on that disk (or fix the folder), then run the same command with --resume auto "
            f"{after}"
        ) from None
