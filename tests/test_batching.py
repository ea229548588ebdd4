"""The drop-oldest queue and its batching rule."""

from __future__ import annotations

import threading
import time

from agent.inference.batching import DropOldestQueue


def make(capacity: int = 10) -> DropOldestQueue[tuple[int, float]]:
    return DropOldestQueue(capacity, arrival=lambda item: item[1])


def test_overflow_drops_the_oldest() -> None:
    """A full queue drops (and returns) its oldest item to make room."""
    queue = make(capacity=2)
    now = time.monotonic()
    assert queue.put((1, now)) is None
    assert queue.put((2, now)) is None
    assert queue.put((3, now)) == (1, now)
    assert [i for i, _ in queue.take_batch(10, 0)] == [2, 3]


def test_a_lone_item_is_not_held_back() -> None:
    """One waiting reading is returned at once, even with a long max delay."""
    queue = make()
    queue.put((1, time.monotonic()))
    started = time.monotonic()
    assert len(queue.take_batch(32, max_delay_s=60.0)) == 1
    # Held back would mean 60 s; half of that leaves any loaded machine room.
    assert time.monotonic() - started < 30.0


def test_under_load_waits_for_company_up_to_the_deadline() -> None:
    """With several waiting, the batch tops up with items arriving before the deadline."""
    queue = make()
    now = time.monotonic()
    queue.put((1, now))
    queue.put((2, now))

    def late() -> None:
        time.sleep(0.05)
        queue.put((3, time.monotonic()))

    thread = threading.Thread(target=late)
    thread.start()
    batch = queue.take_batch(3, max_delay_s=30.0)  # returns as soon as the third arrives
    thread.join()
    assert [i for i, _ in batch] == [1, 2, 3]


def test_batch_is_capped() -> None:
    """No batch is larger than the limit."""
    queue = make(capacity=100)
    for i in range(50):
        queue.put((i, time.monotonic()))
    assert len(queue.take_batch(8, 0.001)) == 8
    assert len(queue) == 42


def test_close_drains_then_returns_empty() -> None:
    """After close the remaining items are still handed out, then empty batches."""
    queue = make()
    queue.put((1, time.monotonic()))
    queue.close()
    assert len(queue.take_batch(4, 0)) == 1
    assert queue.take_batch(4, 0) == []


def test_abandon_empties_a_closed_queue() -> None:
    """abandon() drops what waits and says how many; the consumer then sees the end."""
    queue: DropOldestQueue[int] = DropOldestQueue(10, arrival=lambda item: 0.0)
    for item in range(4):
        queue.put(item)
    queue.close()
    assert queue.abandon() == 4
    assert queue.take_batch(8, 0.0) == []
