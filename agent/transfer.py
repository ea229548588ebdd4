"""Getting an update's bytes onto disk: MQTT chunks or an https download.

Both write straight into the update's staging file, so memory stays at one chunk (or one
read buffer) whatever the model's size. Neither trusts the bytes: the caller checks length
and sha256 once the transfer is complete.
"""

from __future__ import annotations

import os
import ssl
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from http.client import HTTPMessage, HTTPResponse
from pathlib import Path
from typing import IO

from agent.errors import UpdateFailedError
from agent.manifest import ChunkSource

INDEX_BYTES = 4
READ_SIZE = 64 * 1024


class ChunkTransfer:
    """Assembles the MQTT chunks of one update in its staging file, in any order.

    Used by the update intake thread only.
    """

    def __init__(self, source: ChunkSource, length: int, staged: Path) -> None:
        self.source = source
        self.length = length
        self.staged = staged
        self._have = bytearray(source.chunks)  # 1 where chunk i is written
        self.received = 0
        self.duplicates = 0
        self.bytes_written = 0
        self.last_activity = time.monotonic()
        self._fd = os.open(staged, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)

    @property
    def complete(self) -> bool:
        """Whether every chunk has been written."""
        return self.received == self.source.chunks

    def add(self, message: bytes) -> None:
        """Write one chunk (4-byte big-endian index + bytes); a duplicate is ignored.

        ``UpdateFailedError`` when the chunk cannot belong to this update: the transfer is then
        abandoned rather than guessed at.
        """
        self.last_activity = time.monotonic()
        if len(message) < INDEX_BYTES:
            raise UpdateFailedError(f"chunk message of {len(message)} bytes is shorter than its "
                               "4-byte index")
        index = int.from_bytes(message[:INDEX_BYTES], "big")
        if index >= self.source.chunks:
            raise UpdateFailedError(f"chunk index {index} is out of range: the manifest announces "
                               f"{self.source.chunks} chunks (0..{self.source.chunks - 1})")
        expected = self.source.expected_size(index, self.length)
        size = len(message) - INDEX_BYTES
        if size != expected:
            raise UpdateFailedError(f"chunk {index} carries {size} bytes, expected {expected} "
                               f"(chunk_size {self.source.chunk_size}, length {self.length})")
        if self._have[index]:
            self.duplicates += 1
            return
        os.pwrite(self._fd, memoryview(message)[INDEX_BYTES:], index * self.source.chunk_size)
        self._have[index] = 1
        self.received += 1
        self.bytes_written += size

    def progress(self) -> str:
        """``received k of M chunks (X of Y bytes)``, for status reasons."""
        return (f"received {self.received} of {self.source.chunks} chunks "
                f"({self.bytes_written} of {self.length} bytes)")

    def close(self) -> None:
        """Flush to disk and close the staging file."""
        if self._fd >= 0:
            os.fsync(self._fd)
            os.close(self._fd)
            self._fd = -1

    def abandon(self) -> None:
        """Close without syncing (the file is deleted next)."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class _HttpsOnlyRedirects(urllib.request.HTTPRedirectHandler):
    """Follows redirects only to https: a downgrade would let anyone on the path serve
    bytes (they would fail the sha256 check, but should not be fetched at all)."""

    def redirect_request(  # noqa: PLR0917 - urllib's signature
            self, req: urllib.request.Request, fp: IO[bytes], code: int, msg: str,
                         headers: HTTPMessage, newurl: str) -> urllib.request.Request | None:
        if not newurl.lower().startswith("https://"):
            raise UpdateFailedError(f"refused a redirect from {req.full_url} to non-https {newurl}")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def download(url: str, staged: Path, length: int, *, ca_file: str | None,
             connect_timeout_s: float, deadline_s: float,
             cancelled: Callable[[], bool] = lambda: False) -> None:
    """Stream ``url`` into ``staged``: at most ``length`` bytes (one more is a failure), no
    socket operation longer than ``connect_timeout_s``, the whole within ``deadline_s``.

    Runs on a download thread of its own. Raises ``UpdateFailedError`` with the reason.
    """
    if not url.lower().startswith("https://"):
        raise UpdateFailedError(f"refusing to download from non-https {url}")
    context = ssl.create_default_context(cafile=ca_file)
    opener = urllib.request.build_opener(urllib.request.HTTPSHandler(context=context),
                                         _HttpsOnlyRedirects())
    started = time.monotonic()
    # The scheme is checked above: https only, never file: or ftp:.
    request = urllib.request.Request(url, headers={"User-Agent": "edge-agent"})  # noqa: S310
    try:
        response: HTTPResponse = opener.open(request, timeout=connect_timeout_s)
    except urllib.error.HTTPError as exc:
        raise UpdateFailedError(f"download of {url} failed: HTTP {exc.code} {exc.reason}") from exc
    except urllib.error.URLError as exc:
        raise UpdateFailedError(f"download of {url} failed: {exc.reason}") from exc
    except (OSError, ssl.SSLError) as exc:
        raise UpdateFailedError(f"download of {url} failed: {exc}") from exc
    with response, staged.open("wb") as out:
        announced = response.headers.get("Content-Length")
        if announced is not None and announced.isdigit() and int(announced) > length:
            raise UpdateFailedError(f"server announces {announced} bytes, more than the signed "
                               f"length {length}")
        total = 0
        while True:
            if cancelled():
                raise UpdateFailedError("download cancelled: the agent is stopping")
            if time.monotonic() - started > deadline_s:
                raise UpdateFailedError(f"download took longer than {deadline_s:g} s "
                                   f"({total} of {length} bytes)")
            try:
                block = response.read(min(READ_SIZE, length + 1 - total))
            except (OSError, ssl.SSLError) as exc:
                raise UpdateFailedError(f"download broke off after {total} of {length} bytes: "
                                   f"{exc}") from exc
            if not block:
                break
            total += len(block)
            if total > length:
                raise UpdateFailedError(f"download is larger than the signed length {length}")
            out.write(block)
        if total < length:
            raise UpdateFailedError(f"download ended after {total} of {length} bytes")
        out.flush()
        os.fsync(out.fileno())


class DownloadThread(threading.Thread):
    """Runs ``download`` and reports the outcome with ``on_done(error_or_None)``, which is
    called on this thread."""

    def __init__(self, name: str, work: Callable[[], None],
                 on_done: Callable[[UpdateFailedError | None], None]) -> None:
        super().__init__(name=name, daemon=True)
        self._work = work
        self._on_done = on_done

    def run(self) -> None:
        try:
            self._work()
        except UpdateFailedError as exc:
            self._on_done(exc)
        except Exception as exc:  # any other failure must still end the update
            self._on_done(UpdateFailedError(f"download failed: {exc!r}"))
        else:
            self._on_done(None)
