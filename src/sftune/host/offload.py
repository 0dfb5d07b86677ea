"""AdamW whose two moment estimates live in a file on the run's disk, in memory only while they are updated.

Full fine-tuning keeps four fp32 values per weight: the weight, its gradient and AdamW's two moments (exp_avg,
exp_avg_sq). The moments are read and written only in the update, so between updates they need not be resident:
here they are views into a shared mapping of a file in the run folder, and the update runs a slice of parameters
at a time (about MOMENT_SLICE_BYTES of moments), faulting that slice's pages in first and dropping them from the
process after (madvise MADV_DONTNEED on a shared mapping: the values stay in the file). The kernel keeps the file
in its page cache while RAM is free and writes it back; under memory pressure the next update reads it from disk.
Peak memory falls by 8 bytes per trainable weight for a file of that size, read and written once per optimizer
step (the kernel writes its dirty pages back on its own schedule; measured: bench/results/compare-full-offload.md).

The update of each slice is torch's own AdamW (the fused kernel where it applies): the same numbers bit for bit as
an in-memory AdamW, and the same state_dict layout, so checkpoints resume with or without the offload.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

MOMENT_SLICE_BYTES = 64 * 1024 * 1024  # moments faulted in at once during the update (a larger tensor: itself)
MOMENTS = ("exp_avg", "exp_avg_sq")
_MADV_POPULATE_WRITE = 23  # Linux >= 5.14: fault a range in, writable, in one call (not in Python 3.11's mmap)


class MomentFile:
    """Two moments per parameter (in its dtype) in one shared file mapping, each parameter's pair on its own pages,
    so a run of consecutive parameters is one byte range to fault in or drop. The file is unlinked at once: it leaves
    no trace on a local disk if the process dies; its blocks are reserved up front where the OS can (posix_fallocate),
    so a full disk is an error here and not a SIGBUS in the middle of an update."""

    def __init__(self, directory: Path, parameters: list[torch.Tensor]) -> None:
        self.offsets: dict[int, tuple[int, int]] = {}  # id(parameter) -> (start byte of its exp_avg, of exp_avg_sq)
        position = 0
        for parameter in parameters:
            size = _page_aligned(parameter.numel() * parameter.element_size())
            self.offsets[id(parameter)] = (position, position + size)
            position += 2 * size
        self.size = max(position, mmap.PAGESIZE)
        fd, path = tempfile.mkstemp(prefix=".optimizer-moments-", dir=directory)
        try:
            os.unlink(path)
            try:
                reserve = getattr(os, "posix_fallocate", None)  # not on macOS: a sparse file, filled as written
                reserve(fd, 0, self.size) if reserve else os.ftruncate(fd, self.size)
            except OSError as error:
                raise OSError(
                    f"cannot reserve {self.size / 2**30:.2f} GiB for the optimizer's moments in {directory} ({error}): "
                    "free disk space there, choose another output.dir, or set train.offload_optimizer_state=false"
                ) from error
            self._map = mmap.mmap(fd, self.size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)

    def views(self, parameter: torch.Tensor) -> dict[str, torch.Tensor]:
        """exp_avg and exp_avg_sq of `parameter`: tensors of its shape and dtype backed by the file."""
        count, dtype = parameter.numel(), parameter.dtype
        return {
            name: torch.frombuffer(self._map, dtype=dtype, count=count, offset=start).view(parameter.shape)
            for name, start in zip(MOMENTS, self.offsets[id(parameter)], strict=True)
        }

    def byte_range(self, parameters: list[torch.Tensor]) -> tuple[int, int]:
        first, last = self.offsets[id(parameters[0])], self.offsets[id(parameters[-1])]
        return first[0], last[1] + (last[1] - last[0])

    def fault_in(self, parameters: list[torch.Tensor]) -> None:
        """Map the moments of these parameters in one call (instead of a page fault per 4 KiB in the update)."""
        start, end = self.byte_range(parameters)
        with contextlib.suppress(OSError):  # an older kernel: the update faults the pages in itself
            self._map.madvise(_MADV_POPULATE_WRITE, start, end - start)

    def release(self, parameters: list[torch.Tensor] | None = None) -> None:
        """Drop these parameters' moments (all, for None) from the process: the values stay in the file."""
        start, end = self.byte_range(parameters) if parameters else (0, self.size)
        self._map.madvise(mmap.MADV_DONTNEED, start, end - start)


class OffloadedAdamW(torch.optim.AdamW):
    """torch's AdamW with its moments in a MomentFile (module docstring). Construct it as AdamW, plus the folder
    for the file; `release_moments()` after anything that reads the whole state (saving a checkpoint)."""

    def __init__(self, params: Any, directory: Path, **options: Any) -> None:
        if options.get("amsgrad"):
            raise ValueError(
                "train.offload_optimizer_state keeps exp_avg and exp_avg_sq only: amsgrad is not supported"
            )
        super().__init__(params, **options)
        if any(p.device.type != "cpu" for group in self.param_groups for p in group["params"]):
            raise ValueError(
                "train.offload_optimizer_state moves AdamW's moments out of host memory: it applies to parameters in "
                "host memory (a CPU run), not to GPU ones; set train.offload_optimizer_state=false"
            )
        self.moments = MomentFile(directory, [p for group in self.param_groups for p in group["params"]])

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        """AdamW's step, a slice of parameters at a time with only that slice's moments resident."""
        if closure is not None:
            raise ValueError("OffloadedAdamW.step takes no closure: compute the loss and backward first")
        adamw_step = torch.optim.AdamW.step
        if getattr(adamw_step, "hooked", False):  # torch's hook/profiler wrapper: it runs once, around this step
            adamw_step = adamw_step.__wrapped__  # type: ignore[attr-defined]
        groups = self.param_groups
        try:
            for group in groups:
                for parameters in moment_slices(group["params"]):
                    self.moments.fault_in(parameters)
                    # the group's settings (learning rate as the scheduler set it) for this slice only
                    self.param_groups = [{**group, "params": parameters}]
                    adamw_step(self)
                    self._adopt(parameters)
                    self.moments.release(parameters)
        finally:
            self.param_groups = groups
        return None

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch's loading, then the loaded moments into the file a slice at a time (the peak: one slice above the
        loaded state, which training/checkpoint.read_optimizer_file maps from the file rather than reading it)."""
        super().load_state_dict(state_dict)
        for group in self.param_groups:
            for parameters in moment_slices(group["params"]):
                self._adopt(parameters)
                self.moments.release(parameters)

    def release_moments(self) -> None:
        self.moments.release()

    def _adopt(self, parameters: list[torch.Tensor]) -> None:
        """Moments that torch created in memory (the first update) or that a checkpoint loaded move into the file."""
        for parameter in parameters:
            state = self.state.get(parameter)
            if not state or "exp_avg" not in state or parameter.numel() == 0:
                continue  # no gradient yet (AdamW has not touched it), or nothing to store
            views = self.moments.views(parameter)
            for name, view in views.items():
                if state[name].data_ptr() != view.data_ptr():
                    view.copy_(state[name])
                    state[name] = view


def moment_slices(parameters: list[torch.Tensor]) -> Iterator[list[torch.Tensor]]:
    """Consecutive runs of parameters whose moments total at most MOMENT_SLICE_BYTES (one larger tensor alone)."""
    current: list[torch.Tensor] = []
    size = 0
    for parameter in parameters:
        moment_bytes = parameter.numel() * parameter.element_size() * 2
        if current and size + moment_bytes > MOMENT_SLICE_BYTES:
            yield current
            current, size = [], 0
        current.append(parameter)
        size += moment_bytes
    if current:
        yield current


def release_offloaded_moments(optimizer: Any) -> None:
    """After saving a checkpoint: an offloaded optimizer's moments, read whole for the file, leave memory again."""
    if isinstance(optimizer, OffloadedAdamW):
        optimizer.release_moments()


def _page_aligned(size: int) -> int:
    return -(-size // mmap.PAGESIZE) * mmap.PAGESIZE
