"""What the machine lets a run use: host memory still available (its cgroup's limit included, as containers and job
schedulers set it), and whether a folder's files live in RAM (tmpfs), where moving data into a file frees nothing.

Linux only; elsewhere nothing is known (no limit, not RAM-backed). `proc` and `cgroup_root` are parameters so that
tests can hand in a fake /proc and /sys/fs/cgroup.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform
import resource
from pathlib import Path

import torch

PROC, CGROUP_ROOT = Path("/proc"), Path("/sys/fs/cgroup")
UNLIMITED = 2**60  # cgroup v1 writes a limit near 2**63 for "none"
# (limit, usage, memory.stat key of page cache the kernel can drop at once) per cgroup version
V1_FILES = ("memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file")
V2_FILES = ("memory.max", "memory.current", "inactive_file")
RAM_FILESYSTEMS = {"tmpfs", "ramfs"}


def available_memory_bytes(proc: Path = PROC, cgroup_root: Path = CGROUP_ROOT) -> int | None:
    """Memory this process may still use: the kernel's MemAvailable, or less under a memory cgroup's limit (None
    where neither is known)."""
    known = [value for value in (_mem_available(proc), cgroup_headroom(proc, cgroup_root)) if value is not None]
    return max(0, min(known)) if known else None


def cgroup_headroom(proc: Path = PROC, cgroup_root: Path = CGROUP_ROOT) -> int | None:
    """The smallest limit - (usage - inactive page cache) over this process's memory cgroup and its ancestors (a
    limit may sit on a parent: a systemd slice, a batch job), cgroup v1 or v2; None where none is limited. A
    container that sees its own cgroup at the mount root (no cgroup namespace on v1) is covered by the root."""
    try:
        lines = (proc / "self" / "cgroup").read_text().splitlines()
    except OSError:
        return None
    headrooms = []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":
            base, files = cgroup_root, V2_FILES
        elif "memory" in controllers.split(","):
            base, files = cgroup_root / "memory", V1_FILES
        else:
            continue
        folder = base / path.strip("/")
        for candidate in [folder, *folder.parents]:
            if candidate == base or base in candidate.parents:
                headroom = _headroom(candidate, files)
                headrooms += [] if headroom is None else [headroom]
    return min(headrooms) if headrooms else None


def _headroom(folder: Path, files: tuple[str, str, str]) -> int | None:
    limit_file, usage_file, inactive_key = files
    try:
        limit = (folder / limit_file).read_text().strip()
        if limit == "max" or int(limit) >= UNLIMITED:
            return None
        usage = int((folder / usage_file).read_text())
    except (OSError, ValueError):
        return None
    return int(limit) - usage + _stat_value(folder / "memory.stat", inactive_key)


def _stat_value(path: Path, key: str) -> int:
    try:
        for line in path.read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == key:
                return int(value)
    except (OSError, ValueError):
        pass
    return 0


def _mem_available(proc: Path) -> int | None:
    try:
        for line in (proc / "meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def is_ram_backed(folder: Path, proc: Path = PROC) -> bool:
    """Whether files in `folder` live in RAM (tmpfs, ramfs): the mount with the longest mount point above it."""
    try:
        lines = (proc / "self" / "mountinfo").read_text().splitlines()
    except OSError:
        return False
    target = folder.resolve()
    best, best_type = Path("/"), ""
    for line in lines:
        fields, _, rest = line.partition(" - ")
        parts = fields.split()
        if len(parts) < 5 or not rest:
            continue
        mount_point = Path(parts[4].replace("\\040", " "))
        if (mount_point == target or mount_point in target.parents) and len(mount_point.parts) >= len(best.parts):
            best, best_type = mount_point, rest.split()[0]
    return best_type in RAM_FILESYSTEMS


def peak_memory() -> dict[str, float]:
    """This process's peak host memory (RSS) so far, and the peak of GPU tensors where CUDA is in use, in GiB."""
    peaks = {"peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        peaks["peak_gpu_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
    return peaks


def glibc() -> ctypes.CDLL | None:
    """The C library when it is glibc (its malloc's behaviour is what some measurements are about), else None."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
