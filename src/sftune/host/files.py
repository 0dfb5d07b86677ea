"""Writes that a crash or a full disk can never leave half done: a file or a folder appears whole, or not at all."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


def write_text_atomic(path: Path, text: str) -> None:
    """`path` holds either its old text or all of `text`: written to a temporary sibling, fsynced, then renamed."""
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".tmp-{path.name}.")
    try:
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes it 0600; the file gets what open() would give it
        with os.fdopen(handle, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def staged_folder(out_dir: Path) -> Iterator[Path]:
    """A temporary sibling of `out_dir` to write into; renamed to `out_dir` when the block ends without an error
    (an older `out_dir` is moved aside first and removed after), removed when it raises: a half-written folder
    never takes the place of a whole one, and never stays behind to fill the disk."""
    tmp = out_dir.with_name(f".tmp-{out_dir.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = out_dir.with_name(f".old-{out_dir.name}")
    shutil.rmtree(old, ignore_errors=True)
    if out_dir.exists():
        os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    shutil.rmtree(old, ignore_errors=True)
