"""Writes that survive a power cut: temp file, fsync, rename, fsync the folder.

A rename is atomic, but only the folder's fsync makes the new name durable; without it a
power cut can bring back the old file, or (on some filesystems) an empty one.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path


def fsync_dir(folder: Path) -> None:
    """Make renames and unlinks inside ``folder`` durable."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomically(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Replace ``path`` with ``data`` so that readers see the old or the new bytes, never a
    mix, whatever happens to the process or the power."""
    temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            temp.unlink()
        raise
    fsync_dir(path.parent)


def replace_durably(source: Path, target: Path) -> None:
    """``os.replace`` made durable (both paths in one folder, as atomic renames need)."""
    os.replace(source, target)
    fsync_dir(target.parent)
