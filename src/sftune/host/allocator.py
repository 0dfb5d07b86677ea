"""The host allocator of a training process: mimalloc where it is installed (train.host_allocator).

PyTorch's CPU tensors come from plain malloc. glibc's malloc serves a step's activations from its heap, where
freed blocks stay resident and fragment, and it maps and faults in afresh what it does return. mimalloc (the
`cmeel-mimalloc` package, a dependency on Linux) reuses freed blocks by size and gives idle memory back on its own:
lower peak RSS and faster CPU steps, the same losses (measured: bench/results/memory_profile.md).

malloc is chosen when a process starts, so `sftune train` / `sftune dpo` start themselves again (exec, same process
id, same arguments) with mimalloc preloaded before anything is imported; the variable `SFTUNE_HOST_ALLOCATOR` (the
process id) in the new environment stops it from happening twice. The Python API runs inside its caller's process
and cannot swap malloc: it says so in the run log. This module imports no torch: the command decides before
loading it.
"""

from __future__ import annotations

import ctypes
import importlib.metadata
import os
import platform
import sys
from pathlib import Path

from sftune.config import TrainConfig, UserError

MIMALLOC_PACKAGE = "cmeel-mimalloc"
RELAUNCHED = "SFTUNE_HOST_ALLOCATOR"  # in the environment of a command started again with its allocator


def mimalloc_library() -> Path | None:
    """libmimalloc.so of the installed cmeel-mimalloc package (Linux only: it is preloaded with LD_PRELOAD)."""
    if platform.system() != "Linux":
        return None
    try:
        files = importlib.metadata.files(MIMALLOC_PACKAGE) or []
    except importlib.metadata.PackageNotFoundError:
        return None
    for file in files:
        if file.name == "libmimalloc.so":
            path = Path(str(file.locate())).resolve()
            if path.is_file():
                return path
    return None


def active_allocator() -> str:
    """'mimalloc' when this process runs on it (preloaded: its symbols are in the global namespace), else
    'system'."""
    try:
        process = ctypes.CDLL(None)
    except OSError:
        return "system"
    return "mimalloc" if hasattr(process, "mi_version") else "system"


def is_started_again() -> bool:
    """True in the process this command started again (exec keeps the process id; a child process of it, e.g. a
    `sftune train` it runs, has another and may start itself again)."""
    return os.environ.get(RELAUNCHED) == str(os.getpid())


def relaunch_environment(train: TrainConfig) -> dict[str, str] | None:
    """The environment to start this command again in so that mimalloc is its malloc; None to go on as it is
    (system allocator asked for, mimalloc already in use, already started again, or not installed under auto)."""
    if train.host_allocator == "system" or is_started_again() or active_allocator() == "mimalloc":
        return None
    library = mimalloc_library()
    if library is None:
        if train.host_allocator == "mimalloc":
            raise UserError(
                f"train.host_allocator=mimalloc, but its library was not found (package {MIMALLOC_PACKAGE}, Linux "
                "only): `pip install cmeel-mimalloc`, or set train.host_allocator=auto or system"
            )
        return None
    preload = " ".join(part for part in (str(library), os.environ.get("LD_PRELOAD", "")) if part)
    environment = {**os.environ, "LD_PRELOAD": preload, RELAUNCHED: str(os.getpid())}
    return environment


def allocator_reason(train: TrainConfig) -> str:
    """Why this process runs on the malloc it runs on (active_allocator): the run log's reason."""
    if active_allocator() == "mimalloc":
        return "preloaded when the command started"
    library = mimalloc_library()
    if train.host_allocator == "system":
        return "asked for"
    if library is None:
        return f"mimalloc is not installed ({MIMALLOC_PACKAGE}, Linux)"
    if is_started_again():
        return f"LD_PRELOAD={os.environ.get('LD_PRELOAD')} did not load"
    return (
        "a run started from Python keeps its process's malloc: `sftune train` starts itself on mimalloc; here, start "
        f"Python with LD_PRELOAD={library} for lower peak memory and faster CPU steps"
    )


def is_own_command_line(arguments: list[str]) -> bool:
    """True when this process was started as this very sftune command (the `sftune` script or `python -m
    sftune.cli`, with these arguments), so that starting it again runs it again and nothing else: never for a
    call from Python (a notebook, a test, a wrapper script), whose process must not be replaced."""
    command = list(sys.orig_argv)
    if not arguments or command[-len(arguments) :] != arguments:
        return False
    before = command[: -len(arguments)]
    return before[-2:] == ["-m", "sftune.cli"] or (len(before) >= 2 and Path(before[-1]).name == "sftune")


def restart_on_allocator(train: TrainConfig, arguments: list[str]) -> None:
    """Start this command again, same process and arguments, with mimalloc as malloc, where train.host_allocator
    wants it, it is not in use yet and this process is the command itself; returns where nothing needs to change."""
    environment = relaunch_environment(train) if is_own_command_line(arguments) else None
    if environment is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], environment)
    except OSError as exc:  # the system's malloc then: slower and more memory, never a failed run
        print(f"host allocator: could not start again on mimalloc ({exc}); the system's malloc", file=sys.stderr)
