"""A run folder that nothing can clobber: one writer at a time, never replaced without output.overwrite, never
filled past the free space without a word.

- `RunLock`: an exclusive lock (flock) on RUN/.sftune.lock for the life of the run, holding the owner's pid. A
  second writer is refused with that pid; the kernel drops the lock of a process that dies (kill -9), so a stale
  lock is taken over, with a note.
- `prepare_run_dir`: an existing run is only continued (--resume) or replaced (output.overwrite); `--resume auto`
  on a finished run with nothing to resume from is refused rather than trained again over its model.
- `check_free_space`: what the run will still write (checkpoints beyond those on disk, the final model), before
  step 1.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import socket
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from sftune.config import Config, config_to_yaml
from sftune.training.checkpoint import list_checkpoints
from sftune.training.distributed import SINGLE, Distributed
from sftune.training.run import RunError, refuse_finished_run

LOCK_NAME = ".sftune.lock"
LOCK_GRACE_SECONDS = 2.0


class RunLock:
    """An exclusive, non-blocking lock on a run folder, released by `release` or by the death of the process."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.path = run_dir / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            lock_within(fd, LOCK_GRACE_SECONDS)
        except BlockingIOError:
            holder = read_holder(fd)
            os.close(fd)
            raise RunError(
                f"run folder '{self.run_dir}' is in use by another sftune run (pid {holder.get('pid', '?')} on "
                f"{holder.get('host', '?')}, started {holder.get('started', '?')}): two runs writing one folder "
                "would corrupt it. Wait for that run to end or stop it, or choose another output.dir"
            ) from None
        previous = read_holder(fd)
        if previous:  # released by a process that died holding it (kill -9, a crash of the machine)
            print(f"run folder {self.run_dir}: taking over the lock of pid {previous.get('pid')}, which ended "
                  "without releasing it")  # fmt: skip
        holder = {"pid": os.getpid(), "host": socket.gethostname(),
                  "started": datetime.now(timezone.utc).isoformat(timespec="seconds")}  # fmt: skip
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(holder).encode(), 0)
        self._fd = fd

    def release(self) -> None:
        """Emptied, then unlocked: an empty lock file is one that ended cleanly. The file stays (removing it would
        let a process still opening it lock a file nobody else sees)."""
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            os.ftruncate(self._fd, 0)
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None


def lock_within(fd: int, seconds: float) -> None:
    """flock, retried for `seconds`: a holder just killed (kill -9) frees its memory before its files, so its lock
    outlives it by a moment; a live holder still has it after that and BlockingIOError is raised."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.05)


def read_holder(fd: int) -> dict[str, Any]:
    text = os.pread(fd, 4096, 0).decode(errors="replace").strip()
    try:
        holder = json.loads(text) if text else {}
    except ValueError:
        holder = {"pid": text[:40]}
    return holder if isinstance(holder, dict) else {}


def setup_run_dir(config: Config, resume: str | None, info: Distributed = SINGLE) -> tuple[Path, RunLock | None]:
    """Rank 0 locks and prepares the run folder; a refusal there is raised on every rank (rank 0 reports it, the
    others end quietly), so no rank waits for a barrier rank 0 never reaches."""
    run_dir = Path(config.output.dir)
    lock = RunLock(run_dir) if info.is_main else None
    info.on_main(lambda: prepare_run_dir(run_dir, config, resume, lock))
    return run_dir, lock


def prepare_run_dir(run_dir: Path, config: Config, resume: str | None, lock: RunLock | None = None) -> None:
    """Lock the folder first, then decide: continue it (resume), replace it (output.overwrite) or refuse."""
    if run_dir.exists() and not run_dir.is_dir():
        raise RunError(f"output.dir '{run_dir}' is a file, not a folder: choose another output.dir")
    if lock is not None:
        lock.acquire()
    try:
        contents = [p for p in run_dir.iterdir() if p.name != LOCK_NAME] if run_dir.is_dir() else []
        nothing_to_resume = resume == "auto" and not list_checkpoints(run_dir / "checkpoints")
        if contents and not resume and not config.output.overwrite:
            raise RunError(
                f"output folder '{run_dir}' already exists and is not empty: replace it with --overwrite "
                "(output.overwrite=true), continue it with --resume auto, or choose another output.dir"
            )
        if nothing_to_resume and not config.output.overwrite:
            refuse_finished_run(run_dir)
        if contents and config.output.overwrite and (not resume or nothing_to_resume):
            for path in contents:  # everything but the lock this process holds
                shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(config_to_yaml(config))
    except BaseException:
        if lock is not None:
            lock.release()
        raise


def saved_step(run_dir: Path) -> int | None:
    """The step the run folder's saved model was trained to (its manifest), None without a saved model."""
    manifest = run_dir / "manifest.json"
    if not (run_dir / "model").is_dir() or not manifest.is_file():
        return None
    try:
        step = json.loads(manifest.read_text()).get("global_step")
    except (OSError, ValueError):
        return None
    return step if isinstance(step, int) else None


def checkpoint_bytes(model: Any) -> int:
    """fp32 trainable weights and AdamW's two moments."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad) * 4 * 3


def check_free_space(run_dir: Path, model: Any, config: Config, global_step: int, total_steps: int) -> None:
    """Refuse to go on when what the run will still write does not fit on the output disk: finding out after hours
    of training loses them. Counted: the checkpoints the remaining steps write beyond those already on disk (a new
    one is written before the oldest is pruned), the checkpoint written before the final save, the final model,
    and the offloaded moments' file; what already sits on the disk is not asked for again."""
    cfg = config.train
    remaining = max(0, total_steps - global_step)
    parameters = list(model.parameters())
    trainable = sum(p.numel() for p in parameters if p.requires_grad)
    writes = remaining // cfg.checkpoint_every if cfg.checkpoint_every else 0
    writes += remaining > 0 and (not cfg.checkpoint_every or total_steps % cfg.checkpoint_every != 0)  # the last
    existing = len(list_checkpoints(run_dir / "checkpoints"))
    new_checkpoints = max(0, min(cfg.keep_checkpoints + 1, existing + writes) - existing)
    final = 0
    if remaining or saved_step(run_dir) != global_step:
        final = (sum(p.numel() for p in parameters) if cfg.method == "full" else trainable) * 4
    moments = trainable * 8 if cfg.offload_optimizer_state is True and remaining else 0  # host/offload.py's file
    needed = int((new_checkpoints * checkpoint_bytes(model) + final + moments) * 1.1)
    free = shutil.disk_usage(run_dir).free
    if free < needed:
        raise RunError(
            f"the output disk of '{run_dir}' has {size_text(free)} free, and this run still needs about "
            f"{size_text(needed)} for its checkpoints and final model: free space, or choose another output.dir"
        )


def size_text(n: int) -> str:
    """Bytes as a person reads them: 3.20 GiB, 41.5 MiB, 812 KiB."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}" if unit == "GiB" else f"{n / scale:.1f} {unit}"
    return f"{n / 1024:.0f} KiB"
