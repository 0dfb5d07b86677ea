"""Host memory that training frees goes back to the operating system, so peak RSS follows the live tensors.

PyTorch's CPU allocator is plain malloc. glibc maps a block of at least its mmap threshold on its own and unmaps it
when freed, but the threshold starts at 128 KiB and rises to the size of every such block freed (up to 32 MiB):
after the first micro-batch, the activations of a step (1 to 13 MiB each for the default model at 4 x 512 tokens)
come from the heap, whose freed pages stay resident and fragment. Measured on the bench (bench/memory_profile.py,
bench/results/memory_profile.md): 4.8 GiB peak RSS for at most 2.0 GiB of tensors alive at once. Fixing the threshold
at its starting value stops the rise (setting M_MMAP_THRESHOLD also fixes the trim threshold): every block of 128 KiB
or more is mapped for its tensor and unmapped with it, so RSS is the live tensors + the weights + the runtime: the
LoRA bench peak fell from 4.8 to 2.7 GiB. It costs CPU time: every step's activations are mapped and faulted in
afresh (full fine-tuning, 3 steps, interleaved: 51-52 -> 64-67 CPU s; bench/compare.py LoRA 2.69x -> 2.08x TRL's
speed). Hence a choice, `train.release_freed_memory`, off by default; a threshold of 4 or 16 MiB costs nothing and
saves nothing (measured).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform
import resource

import torch

from sftune.training.allocator import active_allocator

M_MMAP_THRESHOLD = -3  # glibc <malloc.h>: mallopt parameter number
# glibc's own starting value, kept: activations and gradients are mapped per tensor, Python's small objects are not.
# Measured against 1 MiB (bench/results/memory_profile.md): 0.3 GiB lower peak, the same CPU time.
MMAP_THRESHOLD_BYTES = 128 * 1024


def glibc() -> ctypes.CDLL | None:
    """The C library when it is glibc (mallopt's parameters are glibc's), else None (macOS, musl, Windows)."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")


def return_freed_memory(device: torch.device, threshold: int = MMAP_THRESHOLD_BYTES) -> str:
    """Fix glibc's mmap threshold at `threshold` bytes for this process (CPU training only: on a GPU the large
    tensors are not malloc's); returns the line for the run log, saying what was done or why not."""
    if device.type != "cpu":
        return f"host memory: glibc defaults (tensors live on {device.type})"
    if active_allocator() == "mimalloc":  # its purge delay is read when the process starts (training/allocator.py)
        if os.environ.get("MIMALLOC_PURGE_DELAY") == "0":
            return "host memory: mimalloc gives freed memory back at once (MIMALLOC_PURGE_DELAY=0)"
        return ("host memory: mimalloc gives freed memory back after its purge delay (set MIMALLOC_PURGE_DELAY=0 "
                "before the process starts to give it back at once)")  # fmt: skip
    libc = glibc()
    if libc is None:
        return "host memory: allocator defaults (not glibc: freed memory may stay resident)"
    if libc.mallopt(M_MMAP_THRESHOLD, ctypes.c_int(threshold)) != 1:
        return f"host memory: glibc refused an mmap threshold of {threshold} bytes; allocator defaults"
    return f"host memory: freed blocks of {threshold // 1024} KiB and more go back to the OS (glibc mmap threshold)"


def peak_memory() -> dict[str, float]:
    """This process's peak host memory (RSS) so far, and the peak of GPU tensors where CUDA is in use, in GiB."""
    peaks = {"peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        peaks["peak_gpu_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
    return peaks
