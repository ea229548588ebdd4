"""Writes that survive a power cut: temp file, fsync, rename, fsync the folder.

A rename is atomic, but only the folder's fsync makes the new name durable; without it a
power cut can bring back the old file, or (on some filesystems) an empty one.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path

from agent.errors import EdgeAgentError


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


def lock_folder(folder: Path) -> int:
    """Take ``folder/agent.lock`` for this process (an flock, released when the process
    dies, however it dies); returns the descriptor to keep open. Two daemons sharing one
    ``state_dir`` would send each other's stored results and fight over update state."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "agent.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError as exc:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise EdgeAgentError(f"state_dir {folder} is in use by another edge-agent (pid "
                             f"{holder}); give each daemon its own state_dir") from exc
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd
