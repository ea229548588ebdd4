"""What a partial https download staged so far is a prefix of: the ``.part.meta`` sidecar.

A resume asks the server for the rest of exactly the file the staged bytes came from, so the
sidecar records the url, the signed length and sha256, and the server's validator (ETag or
Last-Modified) for ``If-Range``. Used by the download threads, the intake thread (to report
a resume) and the start-up recovery (to keep a partial download across a restart).
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path

from agent.durable import refuse_symlink
from agent.errors import UnsafePathError

MAX_META_BYTES = 64 * 1024  # the sidecar is ours, but it is read back from disk: bounded


def meta_path(staged: Path) -> Path:
    """The sidecar that says what a staged prefix is a prefix of: ``<staged>.meta``."""
    return staged.with_name(staged.name + ".meta")


@dataclass(frozen=True)
class StagedResource:
    """What the bytes staged so far were downloaded from, and the server's validator of that
    version of the file (ETag, else Last-Modified): a resume asks for the rest of exactly it."""

    url: str
    length: int
    sha256: str
    etag: str | None = None
    last_modified: str | None = None

    @property
    def validator(self) -> str | None:
        """What ``If-Range`` carries: a strong ETag, else the Last-Modified date."""
        if self.etag and not self.etag.startswith("W/"):
            return self.etag
        return self.last_modified


def staged_prefix(staged: Path, url: str, length: int, sha256: str) -> int:
    """Bytes already staged that a resume would keep: 0 unless the sidecar describes this
    url, length and sha256 with a validator, and the file is shorter than ``length``."""
    resource = read_meta(staged)
    if resource is None or resource.validator is None:
        return 0
    if (resource.url, resource.length, resource.sha256) != (url, length, sha256):
        return 0
    try:
        refuse_symlink(staged)
        size = staged.stat().st_size
    except (OSError, UnsafePathError):
        return 0
    return size if 0 < size < length else 0


def read_meta(staged: Path) -> StagedResource | None:
    path = meta_path(staged)
    try:
        refuse_symlink(path)
        with path.open("rb") as handle:
            data = json.loads(handle.read(MAX_META_BYTES))
        return StagedResource(**{key: data.get(key) for key in StagedResource.__dataclass_fields__})
    except (OSError, UnsafePathError, ValueError, TypeError):
        return None


def discard_staged(staged: Path) -> None:
    """Delete a staging file and its sidecar."""
    for path in (staged, meta_path(staged)):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
