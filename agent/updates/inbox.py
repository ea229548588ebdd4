"""What the update intake thread is sent, one frozen dataclass per kind, and its bounded queue.

paho's network thread offers manifests and chunks; download threads and the install thread
put their outcomes; the intake thread ("updates") takes them one at a time. Anyone who can
publish to the manifest topics can fill this queue, so what paho offers is bounded (count
and bytes of manifests waiting, bytes of chunks waiting) and what does not fit is dropped
and counted here, for the intake thread to report.
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass
from typing import ClassVar

from agent.errors import UpdateFailedError

# Chunks waiting for the intake thread. It only writes them to disk, so the queue stays
# near-empty; the cap keeps a flood (or a stuck disk) from growing memory without bound.
INBOX_MAX_BYTES = 64 * 1024 * 1024
# Manifests waiting for the intake thread: verifying one takes a millisecond, so more than a
# few waiting is a flood; what does not fit is dropped, counted and reported in one status.
MANIFESTS_WAITING_MAX = 16
MANIFESTS_WAITING_MAX_BYTES = 8 * 1024 * 1024


@dataclass(frozen=True)
class ManifestArrived:
    """A manifest's bytes, not yet verified (from paho's thread)."""

    KIND: ClassVar[str] = "manifest"
    topic: str
    data: bytes
    # Delivered from the broker's retained store (on subscribing): desired state left by a
    # rollout, which a device already at that version (or past its expiry) ignores quietly.
    retained: bool = False


@dataclass(frozen=True)
class KeySetArrived:
    """A key set's bytes from ``fleet/keys`` or ``P/keys``, not yet verified (from paho's
    thread); empty bytes: the retained key set was cleared."""

    KIND: ClassVar[str] = "keyset"
    topic: str
    data: bytes


@dataclass(frozen=True)
class ManifestRefused:
    """A manifest refused unread, too large to read (from paho's thread)."""

    KIND: ClassVar[str] = "refused"
    reason: str


@dataclass(frozen=True)
class ChunkArrived:
    """One chunk message of the update ``update_id`` (from paho's thread)."""

    KIND: ClassVar[str] = "chunk"
    update_id: str
    data: bytes | bytearray  # paho's payload, not copied


@dataclass(frozen=True)
class ChunkTooLarge:
    """A message over ``mqtt.max_packet_bytes`` on the chunk topic of ``update_id``, unread
    (from paho's thread)."""

    KIND: ClassVar[str] = "chunk_too_large"
    update_id: str
    size: int


@dataclass(frozen=True)
class Downloaded:
    """An https download ended: ``error`` is None when the bytes are all on disk (from the
    download thread)."""

    KIND: ClassVar[str] = "downloaded"
    update_id: str
    error: UpdateFailedError | None


@dataclass(frozen=True)
class Finished:
    """The install thread is done with an update; ``accepted``: the version floor was
    raised, so the same manifest again is an echo (from the install thread)."""

    KIND: ClassVar[str] = "finished"
    update_id: str
    accepted: bool


@dataclass(frozen=True)
class Tick:
    """Nothing arrived for a while: the intake thread still looks for stalled transfers."""

    KIND: ClassVar[str] = "tick"


InboxMessage = (
    ManifestArrived
    | KeySetArrived
    | ManifestRefused
    | ChunkArrived
    | ChunkTooLarge
    | Downloaded
    | Finished
    | Tick
)


class Inbox:
    """The intake thread's queue; thread-safe. The ``offer_*`` methods (paho's thread) drop
    what does not fit the bounds; ``put`` takes the few messages that are never dropped."""

    def __init__(self) -> None:
        self._queue: queue.Queue[InboxMessage | None] = queue.Queue()  # None: closed
        self._lock = threading.Lock()  # guards the counters of what waits in _queue
        self._chunk_bytes = 0
        self._overflowed: set[str] = set()  # update ids whose chunks were dropped
        self._manifests_waiting = 0
        self._manifest_bytes_waiting = 0
        self._manifests_dropped = 0  # since the last take_dropped
        self._keysets_dropped = 0  # since the last take_dropped_keysets

    def offer_manifest(self, topic: str, data: bytes, retained: bool = False) -> None:
        """Queue a manifest, or drop and count it when too many (or too many bytes) wait."""
        size = len(data)
        with self._lock:
            if (
                self._manifests_waiting >= MANIFESTS_WAITING_MAX
                or self._manifest_bytes_waiting + size > MANIFESTS_WAITING_MAX_BYTES
            ):
                self._manifests_dropped += 1
                return
            self._manifests_waiting += 1
            self._manifest_bytes_waiting += size
        self._queue.put(ManifestArrived(topic, data, retained))

    def offer_keyset(self, topic: str, data: bytes) -> None:
        """Queue a key set; bounded like a manifest (count and bytes waiting), since anyone
        who can publish to the keys topics can send them."""
        size = len(data)
        with self._lock:
            if (
                self._manifests_waiting >= MANIFESTS_WAITING_MAX
                or self._manifest_bytes_waiting + size > MANIFESTS_WAITING_MAX_BYTES
            ):
                self._keysets_dropped += 1
                return
            self._manifests_waiting += 1
            self._manifest_bytes_waiting += size
        self._queue.put(KeySetArrived(topic, data))

    def offer_refusal(self, reason: str) -> None:
        """Queue the refusal of a manifest that was not read; counted like a manifest, so a
        flood of them is bounded too."""
        with self._lock:
            if self._manifests_waiting >= MANIFESTS_WAITING_MAX:
                self._manifests_dropped += 1
                return
            self._manifests_waiting += 1
        self._queue.put(ManifestRefused(reason))

    def offer_chunk(self, update_id: str, data: bytes | bytearray) -> None:
        """Queue a chunk, or drop it when the chunks waiting hold too many bytes; its update
        is then remembered as overflowed (its transfer cannot complete)."""
        size = len(data)
        with self._lock:
            if self._chunk_bytes + size > INBOX_MAX_BYTES:
                self._overflowed.add(update_id)
                return
            self._chunk_bytes += size
        self._queue.put(ChunkArrived(update_id, data))

    def put(self, message: ChunkTooLarge | Downloaded | Finished) -> None:
        """Queue a message that is never dropped: each is small and ends a transfer."""
        self._queue.put(message)

    def close(self) -> None:
        """Make ``get`` return None: the intake thread is to stop."""
        self._queue.put(None)

    def get(self, timeout_s: float) -> InboxMessage | None:
        """The next message (intake thread); ``Tick`` when none came within ``timeout_s``,
        None once closed. What it takes no longer counts against the bounds."""
        try:
            message = self._queue.get(timeout=timeout_s)
        except queue.Empty:
            return Tick()
        self._release(message)
        return message

    def drain(self) -> list[InboxMessage]:
        """Whatever is still queued, without waiting (after the intake thread stopped)."""
        left: list[InboxMessage] = []
        while True:
            try:
                message = self._queue.get_nowait()
            except queue.Empty:
                return left
            if message is not None:
                self._release(message)
                left.append(message)

    def take_overflowed(self) -> set[str]:
        """The updates whose chunks were dropped since the last call."""
        with self._lock:
            overflowed, self._overflowed = self._overflowed, set()
        return overflowed

    def take_dropped(self) -> int:
        """How many manifests were dropped unread since the last call."""
        with self._lock:
            dropped, self._manifests_dropped = self._manifests_dropped, 0
        return dropped

    def take_dropped_keysets(self) -> int:
        """How many key sets were dropped unread since the last call."""
        with self._lock:
            dropped, self._keysets_dropped = self._keysets_dropped, 0
        return dropped

    def _release(self, message: InboxMessage | None) -> None:
        with self._lock:
            if isinstance(message, ManifestArrived | KeySetArrived):
                self._manifests_waiting -= 1
                self._manifest_bytes_waiting -= len(message.data)
            elif isinstance(message, ManifestRefused):
                self._manifests_waiting -= 1
            elif isinstance(message, ChunkArrived):
                self._chunk_bytes -= len(message.data)
