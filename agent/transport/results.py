"""What a pipeline hands on: one result to publish, and the ``seq`` numbers that order them.

Apart from the outbox so that building a result needs no SQLite: the pipelines import this
module, and only delivery and the daemon know where results are stored.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


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

    def reserve_seq(self, pipeline: str) -> tuple[int, int]:
        """A block ``[start, end)`` of seq numbers for ``pipeline``, never handed out before."""
        ...


class SeqCounter:
    """Monotonic result numbers of one pipeline; used by that pipeline's worker only."""

    def __init__(self, outbox: SeqStore, pipeline: str) -> None:
        self._outbox = outbox
        self._pipeline = pipeline
        self._next, self._end = 0, 0

    def take(self) -> int:
        """The next seq (a database write once per ``outbox.SEQ_BLOCK`` results)."""
        if self._next >= self._end:
            self._next, self._end = self._outbox.reserve_seq(self._pipeline)
        value = self._next
        self._next += 1
        return value
