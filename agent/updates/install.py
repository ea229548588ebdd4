"""Putting verified model bytes in place atomically, and taking them back out.

The staging folder sits next to the model file (``.edge-agent-staging``), so the final
``os.replace`` never crosses filesystems and is atomic; the folder watcher ignores it (its
name starts with a dot and it is not the watched file). The replaced file is kept as
``NAME.onnx.prev`` for rollback. The staging folder and every file in it are the agent's
own: a symlink in their place is refused, never followed (``agent.durable``).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
from pathlib import Path

import structlog

from agent.durable import create_file, fsync_dir, own_folder, replace_durably
from agent.errors import UpdateFailedError

log = structlog.get_logger(__name__)

STAGING_FOLDER = ".edge-agent-staging"
PREVIOUS_SUFFIX = ".prev"
HASH_BLOCK = 1024 * 1024


def staging_dir(target: Path) -> Path:
    """The daemon-owned folder where the bytes of an update for ``target`` are written."""
    return target.parent / STAGING_FOLDER


def make_staging_dir(target: Path) -> Path:
    """Create the staging folder for ``target`` if needed; ``UnsafePathError`` when a
    symlink or a file stands in its place."""
    return own_folder(staging_dir(target))


def previous_path(target: Path) -> Path:
    """Where the file an update replaced is kept: ``NAME.onnx.prev``."""
    return target.with_name(target.name + PREVIOUS_SUFFIX)


def file_sha256(path: Path) -> str | None:
    """Hex sha256 of a file, read in blocks; None when there is no file."""
    digest = hashlib.sha256()
    try:
        with path.open("rb") as handle:
            while block := handle.read(HASH_BLOCK):
                digest.update(block)
    except (FileNotFoundError, IsADirectoryError):
        return None
    return digest.hexdigest()


def verify_staged(staged: Path, length: int, sha256: str) -> None:
    """Check the staged bytes against the signed length and digest."""
    try:
        size = staged.stat().st_size
    except FileNotFoundError as exc:
        raise UpdateFailedError(f"staged file {staged} is missing") from exc
    if size != length:
        raise UpdateFailedError(f"received {size} bytes, the manifest signs {length}")
    actual = file_sha256(staged)
    if actual != sha256:
        raise UpdateFailedError(
            f"sha256 of the received bytes is {actual}, the manifest signs "
            f"{sha256}: the model bytes were altered or corrupted"
        )


def install(staged: Path, target: Path) -> None:
    """Keep the current file as ``.prev``, then rename the staged file over it, durably."""
    if target.exists():
        keep = previous_path(target)
        temp = make_staging_dir(target) / (keep.name + ".tmp")
        with contextlib.suppress(FileNotFoundError):
            temp.unlink()
        _link_or_copy(target, temp)
        os.replace(temp, keep)
    replace_durably(staged, target)


def restore_previous(target: Path, previous_sha256: str | None) -> str:
    """Put the file an update replaced back in place; returns what was done, for the status.

    Idempotent: run again after a crash half-way it finds the work done.
    """
    current = file_sha256(target)
    if current == previous_sha256:
        return "the previous file is in place"
    if previous_sha256 is None:
        target.unlink()
        fsync_dir(target.parent)
        return "removed the new file (there was no previous one)"
    keep = previous_path(target)
    if file_sha256(keep) != previous_sha256:
        raise UpdateFailedError(f"cannot roll back: {keep} is missing or changed")
    temp = make_staging_dir(target) / (keep.name + ".restore")
    # A copy, not a link: .prev stays intact even if someone later rewrites the model file
    # in place, and rolling back twice still works.
    _copy_synced(keep, temp)
    replace_durably(temp, target)
    return "restored the previous file"


def clean_staging(folder: Path, keep: set[Path]) -> list[str]:
    """Delete leftovers of interrupted updates in a staging folder, except ``keep``.

    ``UnsafePathError`` when the folder is a symlink: following it would delete the files of
    whatever folder it names (the update state, say)."""
    removed: list[str] = []
    if not os.path.lexists(folder):
        return removed
    own_folder(folder)
    for path in folder.iterdir():
        if path not in keep and (path.is_symlink() or path.is_file()):  # a link: only it goes
            path.unlink()
            removed.append(path.name)
    if removed:
        fsync_dir(folder)
    return removed


def _link_or_copy(source: Path, destination: Path) -> None:
    try:
        os.link(source, destination)  # no copy of a large model where the filesystem allows
    except OSError:
        _copy_synced(source, destination)


def _copy_synced(source: Path, destination: Path) -> None:
    with source.open("rb") as reader, os.fdopen(create_file(destination), "wb") as writer:
        shutil.copyfileobj(reader, writer, HASH_BLOCK)
        writer.flush()
        os.fsync(writer.fileno())
