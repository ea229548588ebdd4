"""What a pipeline hands on: one result to publish, and the ``seq`` numbers that order them.

Apart from the outbox so that building a result needs no SQLite: the pipelines import this
module, and only delivery and the daemon know where results are stored.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import structlog

from agent.errors import SeqReserveError

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class PendingResult:
    """A result to store: where it goes and what it says."""

    pipeline: str
    topic: str
    payload: bytes
    qos: int
    correlation: bytes | None = None


class SeqStore(Protocol):
    """Where blocks of seq numbers are reserved durably (the outbox)."""

    def reserve_seq(self, pipeline: str, at_least: int = 1) -> tuple[int, int]:
        """A block ``[start, end)`` of seq numbers for ``pipeline``, never handed out before,
        from ``at_least`` up. Raises SeqReserveError when it cannot be persisted."""
        ...


# While the next block cannot be persisted, numbers go on in memory and persisting is
# tried again after this many results.
UNPERSISTED_RETRY = 100


class SeqCounter:
    """Monotonic result numbers of one pipeline; used by that pipeline's worker only.

    A block that cannot be persisted (``state_dir`` full or read-only) does not fail the
    result: numbers continue in memory, still rising, and persisting is retried every
    ``UNPERSISTED_RETRY`` results. Only a restart before it succeeds can repeat numbers
    handed out meanwhile (at most the unpersisted stretch), since nothing on disk knows them.
    """

    def __init__(self, outbox: SeqStore, pipeline: str) -> None:
        self._outbox = outbox
        self._pipeline = pipeline
        self._next, self._end = 0, 0
        self._unpersisted_since: int | None = None  # first seq handed out unpersisted

    def take(self) -> int:
        """The next seq (a database write once per ``outbox.SEQ_BLOCK`` results)."""
        if self._next >= self._end:
            self._refill()
        value = self._next
        self._next += 1
        return value

    def _refill(self) -> None:
        try:
            start, end = self._outbox.reserve_seq(self._pipeline, at_least=max(self._next, 1))
        except SeqReserveError as exc:
            if self._unpersisted_since is None:
                self._unpersisted_since = max(self._next, 1)
                log.warning("seq_reserve_failed", pipeline=self._pipeline, error=str(exc))
            self._next = max(self._next, 1)
            self._end = self._next + UNPERSISTED_RETRY
            return
        if self._unpersisted_since is not None:
            log.warning(
                "seq_reserve_recovered",
                pipeline=self._pipeline,
                unpersisted=self._next - self._unpersisted_since,
            )
            self._unpersisted_since = None
        self._next, self._end = start, end
