"""Getting an update's bytes onto disk: MQTT chunks or an https download.

Both write straight into the update's staging file, so memory stays at one chunk (or one
read buffer) whatever the model's size. Neither trusts the bytes: the caller checks length
and sha256 once the transfer is complete. Neither trusts the sender's pace either: an https
download ends at its deadline to the second, whatever the server does (``_Deadline``).
"""

from __future__ import annotations

import contextlib
import http.client
import os
import socket
import ssl
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from http.client import HTTPMessage, HTTPResponse
from pathlib import Path
from typing import IO, Any

from agent.durable import create_file
from agent.errors import UnsafePathError, UpdateFailedError
from agent.updates.manifest import ChunkSource

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
        self._fd = create_file(staged)

    @property
    def complete(self) -> bool:
        """Whether every chunk has been written."""
        return self.received == self.source.chunks

    def add(self, message: bytes | bytearray) -> None:
        """Write one chunk (4-byte big-endian index + bytes); a duplicate is ignored.

        ``UpdateFailedError`` when the chunk cannot belong to this update: the transfer is then
        abandoned rather than guessed at.
        """
        self.last_activity = time.monotonic()
        if len(message) < INDEX_BYTES:
            raise UpdateFailedError(
                f"chunk message of {len(message)} bytes is shorter than its 4-byte index"
            )
        index = int.from_bytes(message[:INDEX_BYTES], "big")
        if index >= self.source.chunks:
            raise UpdateFailedError(
                f"chunk index {index} is out of range: the manifest announces "
                f"{self.source.chunks} chunks (0..{self.source.chunks - 1})"
            )
        expected = self.source.expected_size(index, self.length)
        size = len(message) - INDEX_BYTES
        if size != expected:
            raise UpdateFailedError(
                f"chunk {index} carries {size} bytes, expected {expected} "
                f"(chunk_size {self.source.chunk_size}, length {self.length})"
            )
        if self._have[index]:
            self.duplicates += 1
            return
        os.pwrite(self._fd, memoryview(message)[INDEX_BYTES:], index * self.source.chunk_size)
        self._have[index] = 1
        self.received += 1
        self.bytes_written += size

    def progress(self) -> str:
        """``received k of M chunks (X of Y bytes)``, for status reasons."""
        return (
            f"received {self.received} of {self.source.chunks} chunks "
            f"({self.bytes_written} of {self.length} bytes)"
        )

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
        self,
        req: urllib.request.Request,
        fp: IO[bytes],
        code: int,
        msg: str,
        headers: HTTPMessage,
        newurl: str,
    ) -> urllib.request.Request | None:
        if not newurl.lower().startswith("https://"):
            raise UpdateFailedError(f"refused a redirect from {req.full_url} to non-https {newurl}")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


class _Deadline:
    """Ends a download at ``deadline_s`` whatever the server does.

    A socket timeout bounds one read, and every byte that arrives starts it again: a server
    sending a byte every half second keeps ``read(64 KiB)`` blocked for nine hours, and the
    headers and the TLS handshake can be trickled the same way. So a timer shuts the
    connection's sockets down at the deadline instead; the blocked read, handshake or header
    line then returns at once, on the download thread. It shuts down a duplicate of each
    socket (the same connection, a descriptor of its own), so it never touches a descriptor
    that the download thread may have closed and the process reused.
    """

    def __init__(self, deadline_s: float) -> None:
        self.deadline_s = deadline_s
        self.expired = False
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self._timer = threading.Timer(deadline_s, self._expire)
        self._timer.daemon = True
        self._timer.name = "update-download-deadline"

    def __enter__(self) -> _Deadline:
        self._timer.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._timer.cancel()
        with self._lock:
            for sock in self._sockets:
                sock.close()
            self._sockets.clear()

    def track(self, sock: socket.socket) -> None:
        """Shut ``sock``'s connection down at the deadline (called on the download thread)."""
        with self._lock:
            duplicate = sock.dup()
            if self.expired:
                duplicate.shutdown(socket.SHUT_RDWR)
            self._sockets.append(duplicate)

    def _expire(self) -> None:  # the timer's thread
        with self._lock:
            self.expired = True
            for sock in self._sockets:
                with contextlib.suppress(OSError):  # already closed by the peer
                    sock.shutdown(socket.SHUT_RDWR)


class _HttpsDeadlineHandler(urllib.request.HTTPSHandler):
    """urllib's https handler, with each connection's socket registered with a deadline as
    soon as it is connected, before the TLS handshake."""

    def __init__(self, context: ssl.SSLContext, deadline: _Deadline) -> None:
        super().__init__(context=context)
        self._context = context
        self._deadline = deadline

    def https_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        deadline = self._deadline

        def connect(*args: Any, **kwargs: Any) -> socket.socket:
            sock = socket.create_connection(*args, **kwargs)
            deadline.track(sock)
            return sock

        def connection(host: str, **kwargs: Any) -> http.client.HTTPSConnection:
            conn = http.client.HTTPSConnection(host, **kwargs)
            # http.client opens its socket through this attribute (``connect``), the one
            # place to see the socket before the handshake.
            conn._create_connection = connect  # type: ignore[attr-defined]
            return conn

        return self.do_open(connection, req, context=self._context)


def download(
    url: str,
    staged: Path,
    length: int,
    *,
    ca_file: str | None,
    connect_timeout_s: float,
    deadline_s: float,
    cancelled: Callable[[], bool] = lambda: False,
) -> None:
    """Stream ``url`` into ``staged``: at most ``length`` bytes (one more is a failure), no
    socket operation longer than ``connect_timeout_s``, the whole (connect, handshake,
    headers, body) within ``deadline_s``, enforced by a timer, not between reads.

    Runs on a download thread of its own. Raises ``UpdateFailedError`` with the reason.
    """
    if not url.lower().startswith("https://"):
        raise UpdateFailedError(f"refusing to download from non-https {url}")
    context = ssl.create_default_context(cafile=ca_file)
    with _Deadline(deadline_s) as deadline:
        opener = urllib.request.build_opener(
            _HttpsDeadlineHandler(context, deadline), _HttpsOnlyRedirects()
        )
        try:
            _fetch(
                opener,
                url,
                staged,
                length,
                connect_timeout_s=connect_timeout_s,
                cancelled=cancelled,
            )
        except UpdateFailedError as exc:
            if deadline.expired:  # the failure is the deadline's doing: say so
                raise UpdateFailedError(_too_slow(deadline_s, staged, length)) from exc
            raise


def _too_slow(deadline_s: float, staged: Path, length: int) -> str:
    try:
        received = staged.stat().st_size
    except OSError:
        received = 0
    return (
        f"download took longer than {deadline_s:g} s (updates.download_timeout_s): "
        f"{received} of {length} bytes"
    )


def _fetch(
    opener: urllib.request.OpenerDirector,
    url: str,
    staged: Path,
    length: int,
    *,
    connect_timeout_s: float,
    cancelled: Callable[[], bool],
) -> None:
    # The scheme is checked by the caller: https only, never file: or ftp:.
    request = urllib.request.Request(url, headers={"User-Agent": "edge-agent"})  # noqa: S310
    try:
        response: HTTPResponse = opener.open(request, timeout=connect_timeout_s)
    except urllib.error.HTTPError as exc:
        raise UpdateFailedError(f"download of {url} failed: HTTP {exc.code} {exc.reason}") from exc
    except urllib.error.URLError as exc:
        raise UpdateFailedError(f"download of {url} failed: {exc.reason}") from exc
    except (OSError, ssl.SSLError, http.client.HTTPException) as exc:
        raise UpdateFailedError(f"download of {url} failed: {exc!r}") from exc
    try:
        fd = create_file(staged)
    except UnsafePathError as exc:
        response.close()
        raise UpdateFailedError(str(exc)) from exc
    with response, os.fdopen(fd, "wb") as out:
        announced = response.headers.get("Content-Length")
        if announced is not None and announced.isdigit() and int(announced) > length:
            raise UpdateFailedError(
                f"server announces {announced} bytes, more than the signed length {length}"
            )
        total = 0
        while True:
            if cancelled():
                raise UpdateFailedError("download cancelled: the agent is stopping")
            try:
                block = response.read(min(READ_SIZE, length + 1 - total))
            except (OSError, ssl.SSLError, http.client.HTTPException) as exc:
                raise UpdateFailedError(
                    f"download broke off after {total} of {length} bytes: {exc!r}"
                ) from exc
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

    def __init__(
        self,
        name: str,
        work: Callable[[], None],
        on_done: Callable[[UpdateFailedError | None], None],
    ) -> None:
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
