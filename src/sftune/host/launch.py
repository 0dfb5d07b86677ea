"""`--nproc N`: the same command on N local processes, launched in this process by torch.distributed's elastic agent
(what torchrun runs, without its failure dump: a rank's error is the rank's own message)."""

from __future__ import annotations

import logging
import os
import signal
import sys
import uuid

from sftune.config import UserError

# How long the ranks get to finish their step and checkpoint after a SIGTERM / Ctrl-C before they are killed.
SHUTDOWN_SECONDS = 300


def launch_processes(nproc: int, argv: list[str]) -> int:
    """Run this same command on `nproc` local processes (one machine, c10d rendezvous on a free port). SIGTERM and
    Ctrl-C are passed on to every rank (each finishes its step, checkpoints and stops) and 128 + the signal
    returned; otherwise rank 0's exit code (a refusal: 2, rank 0 printed why; the other ranks exit quietly)."""
    if nproc < 1:
        raise UserError(f"--nproc {nproc}: give a number of processes >= 1")
    from torch.distributed.elastic.multiprocessing.api import DefaultLogsSpecs, SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    quiet_elastic_agent()
    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=nproc,
        run_id=f"sftune-{uuid.uuid4().hex[:8]}",
        rdzv_backend="c10d",
        rdzv_endpoint="localhost:0",
        max_restarts=0,
        start_method="spawn",
        logs_specs=DefaultLogsSpecs(),
        shutdown_timeout=SHUTDOWN_SECONDS,
    )
    try:
        elastic_launch(config, sys.executable)("-m", "sftune.cli", *without_nproc(argv))
    except ChildFailedError as failed:
        codes = {failure.local_rank: failure.exitcode for failure in failed.failures.values()}
        # A rank that exits first makes the agent SIGTERM the others: their -15 is not what went wrong.
        own = {rank: code for rank, code in codes.items() if code != -signal.SIGTERM} or codes
        code = own.get(0, next(iter(own.values()))) or 1
        return 128 - code if code < 0 else code  # a rank killed by a signal: -N
    except SignalException as stopped:
        return 128 + int(stopped.sigval)
    return 0


def without_nproc(argv: list[str]) -> list[str]:
    """The same arguments without --nproc N / --nproc=N."""
    rest, skip = [], False
    for token in argv:
        if skip or token.startswith("--nproc="):
            skip = False
            continue
        if token == "--nproc":
            skip = True
            continue
        rest.append(token)
    return rest


def quiet_elastic_agent() -> None:
    """The agent logs its rendezvous, worker states and a failure table: not for users (SFTUNE_DEBUG keeps them)."""
    if os.environ.get("SFTUNE_DEBUG"):
        return
    for name in list(logging.root.manager.loggerDict):
        if name.startswith("torch.distributed"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    logging.getLogger("torch.distributed").setLevel(logging.CRITICAL)
