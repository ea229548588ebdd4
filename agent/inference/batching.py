"""The bounded reading queue between paho's thread and an inference worker."""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Generic, TypeVar

Item = TypeVar("Item")


class DropOldestQueue(Generic[Item]):
    """A bounded FIFO whose overflow drops the oldest item (fresh readings matter more).

    Producers: the network loop's thread. Consumer: one at a time, the pipeline's worker or
    the network loop running the readings inline (``agent.inference.inline``). Everything is
    guarded by one condition variable.
    """

    def __init__(self, capacity: int, arrival: Callable[[Item], float]) -> None:
        self._items: deque[Item] = deque()
        self._capacity = capacity
        self._arrival = arrival  # monotonic arrival time of an item, for the batching deadline
        self._lock = threading.Lock()
        # ``with self._lock`` where no one waits: Condition.__enter__ is a Python call.
        self._cond = threading.Condition(self._lock)
        self._closed = False
        self._waiting = False  # the consumer sleeps in take_batch: only then notify

    def __len__(self) -> int:
        return len(self._items)

    @property
    def closed(self) -> bool:
        """Whether ``close`` was called."""
        return self._closed

    def put(self, item: Item) -> Item | None:
        """Append ``item``; returns the item dropped to make room, if any."""
        with self._lock:
            dropped = self._items.popleft() if len(self._items) >= self._capacity else None
            self._items.append(item)
            if self._waiting:
                self._cond.notify()
            return dropped

    def close(self) -> None:
        """No more items will come; ``take_batch`` returns what is left, then empty lists."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def abandon(self) -> int:
        """Drop everything still waiting (the consumer then finds the queue closed and
        empty); returns how many items were dropped."""
        with self._cond:
            count = len(self._items)
            self._items.clear()
            self._cond.notify_all()
            return count

    def take_now(self, limit: int) -> list[Item]:
        """Up to ``limit`` items, without waiting (those the network loop runs inline)."""
        with self._lock:
            return self._pop(limit)

    def take_batch(self, limit: int, max_delay_s: float) -> list[Item]:
        """Block for at least one item; return up to ``limit`` of them.

        A lone item is returned at once. When several were waiting (the worker is behind,
        i.e. under load) and fewer than ``limit``, wait for more until ``max_delay_s`` after
        the first one arrived: the delay is an upper bound, never a fixed wait. Returns an
        empty list only once the queue is closed and drained.
        """
        with self._cond:
            while not self._items and not self._closed:
                self._wait(None)
            batch = self._pop(limit)
            if 1 < len(batch) < limit and max_delay_s > 0:
                deadline = self._arrival(batch[0]) + max_delay_s
                while len(batch) < limit and not self._closed:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        break
                    if not self._items:
                        self._wait(remaining)
                    batch.extend(self._pop(limit - len(batch)))
            return batch

    def _wait(self, timeout: float | None) -> None:
        self._waiting = True
        try:
            self._cond.wait(timeout)
        finally:
            self._waiting = False

    def _pop(self, count: int) -> list[Item]:
        items = self._items
        return [items.popleft() for _ in range(min(count, len(items)))]
