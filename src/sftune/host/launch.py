"""`--nproc N`: the same command on N local processes under torchrun (--standalone)."""

from __future__ import annotations

import signal
import subprocess
import sys
from typing import Any

from sftune.config import UserError


def launch_processes(nproc: int, argv: list[str]) -> int:
    """Run this same command under torchrun on `nproc` local processes; SIGTERM is passed on (each rank then
    checkpoints and stops) and torchrun's exit code returned."""
    if nproc < 1:
        raise UserError(f"--nproc {nproc}: give a number of processes >= 1")
    rest, skip = [], False
    for token in argv:  # the same arguments without --nproc
        if skip or token.startswith("--nproc="):
            skip = False
            continue
        if token == "--nproc":
            skip = True
            continue
        rest.append(token)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    child = subprocess.Popen([*command, "-m", "sftune.cli", *rest])
    forwarded: list[int] = []

    def forward(number: int, frame: Any) -> None:
        forwarded.append(number)
        child.send_signal(number)

    previous = signal.signal(signal.SIGTERM, forward)
    try:
        code = child.wait()
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 128 + forwarded[0] if forwarded else code  # stopped by a signal: the ranks checkpointed, as on one process
