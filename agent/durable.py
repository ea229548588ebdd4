"""Writes that survive a power cut: temp file, fsync, rename, fsync the folder; and files the
agent creates that no one else can redirect.

A rename is atomic, but only the folder's fsync makes the new name durable; without it a
power cut can bring back the old file, or (on some filesystems) an empty one.

Every file and folder the agent creates, cleans or installs is opened without following
symbolic links: a local user who can write to ``models_dir`` or ``state_dir`` could
otherwise point one at any file the daemon (often root) can write, and have it truncated,
overwritten or deleted.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
from pathlib import Path

from agent.errors import EdgeAgentError, UnsafePathError

# For files the agent creates: fail on a symlink in place of the name (ELOOP), never write
# through it; O_EXCL after an unlink makes sure the file opened is the one just created.
CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)


def own_folder(folder: Path, mode: int = 0o700) -> Path:
    """Create ``folder`` (the agent's own: staging, update state) if missing and make sure it
    is a real folder, not a symlink; ``UnsafePathError`` otherwise. Its parent is the user's
    (``models_dir``, ``state_dir``) and may itself be a link."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileExistsError):
        os.mkdir(folder, mode)
    info = os.lstat(folder)
    if stat.S_ISLNK(info.st_mode):
        raise UnsafePathError(
            f"{folder} is a symbolic link; the agent keeps its own files there "
            "and does not follow links: remove the link (the agent creates "
            "the folder again)"
        )
    if not stat.S_ISDIR(info.st_mode):
        raise UnsafePathError(
            f"{folder} is not a folder; the agent needs it for its own files: remove it"
        )
    return folder


def refuse_symlink(path: Path) -> None:
    """``UnsafePathError`` when ``path`` exists as a symbolic link (for files opened by
    libraries that cannot be given O_NOFOLLOW, such as SQLite)."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISLNK(info.st_mode):
        raise _symlink_error(path)


def _symlink_error(path: Path) -> UnsafePathError:
    return UnsafePathError(
        f"{path} is a symbolic link; the agent does not follow links for its own files: remove it"
    )


def create_file(path: Path, mode: int = 0o600) -> int:
    """A new file at ``path`` opened for writing (a descriptor), replacing a regular file of
    that name; never through a symlink (``UnsafePathError``)."""
    refuse_symlink(path)
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    try:
        return os.open(path, CREATE_FLAGS, mode)
    except FileExistsError as exc:  # recreated between the unlink and the open: a race
        raise UnsafePathError(f"{path} appeared while the agent was creating it") from exc
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise _symlink_error(path) from exc
        raise


def open_for_append(path: Path) -> int:
    """An existing regular file at ``path`` opened for writing without truncating it (a
    descriptor at offset 0); never through a symlink (``UnsafePathError``)."""
    refuse_symlink(path)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise _symlink_error(path) from exc
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise UnsafePathError(f"{path} is not a regular file")
    return fd


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
    fd = create_file(temp, mode)
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
    ``state_dir`` would send each other's stored results and fight over update state.
    A folder that cannot be written (read-only, full, no permission) is an ``EdgeAgentError``
    saying so: the daemon cannot keep its promises without it."""
    path = folder / "agent.lock"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        # Not truncated through a link: it would empty whatever file the link names.
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise _symlink_error(path) from exc
        raise EdgeAgentError(
            f"state_dir {folder} cannot be written ({exc.strerror}): it holds the outbox of "
            "unsent results, the update staging and the key set; make it writable (a "
            "read-write mount with free space, owned by the service user) or point state_dir "
            "at a folder that is"
        ) from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError as exc:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise EdgeAgentError(
            f"state_dir {folder} is in use by another edge-agent (pid "
            f"{holder}); give each daemon its own state_dir"
        ) from exc
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd
