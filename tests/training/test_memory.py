"""Freed tensor memory goes back to the OS: resident memory follows the live tensors, not the most ever held.

Each case runs in a fresh interpreter: malloc's thresholds are process-wide state, and a fresh process starts
from glibc's defaults, as a training run does.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from sftune.training.memory import glibc, return_freed_memory

# A step's pattern: many activation-sized tensors (4 MiB) allocated, then all but the newest freed. The newest
# sits at the top of the heap, so glibc cannot trim below it: the freed ones stay resident unless each was mapped.
CHILD = """
import json, sys, torch
from sftune.training.memory import return_freed_memory

def rss_mib():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024

if sys.argv[1] == "fixed":
    print(return_freed_memory(torch.device("cpu")), file=sys.stderr)
warm = torch.ones(1 << 21)  # 8 MiB mapped and freed: under the defaults this raises the mmap threshold to 8 MiB
del warm
before = rss_mib()
tensors = [torch.ones(1 << 20) for _ in range(64)]  # 64 x 4 MiB, touched
held = rss_mib()
del tensors[:-1]
print(json.dumps({"grown": held - before, "left": rss_mib() - before}))
"""


def run_child(mode: str) -> tuple[dict[str, float], str]:
    """(RSS growth and what is left after the frees, in MiB; the child's run-log line)."""
    done = subprocess.run([sys.executable, "-c", CHILD, mode], capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1]), done.stderr


glibc_only = pytest.mark.skipif(glibc() is None, reason="mallopt's thresholds are glibc's")


@glibc_only
def test_freed_activations_leave_resident_memory_with_the_fixed_threshold() -> None:
    result, log = run_child("fixed")
    assert result["grown"] > 200  # the 256 MiB were really resident
    assert result["left"] < 16  # only the newest 4 MiB tensor (and noise) stays
    assert "128 KiB and more go back to the OS" in log


@glibc_only
def test_glibc_defaults_keep_the_freed_activations_resident() -> None:
    """The mechanism the fix exists for: without it the freed 252 MiB stay in the process."""
    result, _ = run_child("defaults")
    assert result["grown"] > 200
    assert result["left"] > 200


def test_gpu_runs_keep_the_allocator_defaults() -> None:
    line = return_freed_memory(torch.device("meta"))
    assert "defaults" in line
