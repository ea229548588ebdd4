"""The worker's pure helpers: grouping a batch by input shapes, and the acknowledgement of
a result sent to two topics. No broker, no model."""

from __future__ import annotations

import threading
from collections.abc import Callable

import numpy as np

from agent.inference.intake import Reading, group_by_shape
from agent.inference.pipeline import ack_after_both


def reading(name: str, **shapes: tuple[int, ...]) -> Reading:
    """A reading called ``name`` with one zero tensor per keyword, of that shape."""
    tensors = {key: np.zeros(shape, dtype=np.float32) for key, shape in shapes.items()}
    return Reading(f"s/{name}", tensors, name, 0.0, f"r/{name}")


def ids(groups: list[list[Reading]]) -> list[list[object]]:
    """The reading ids of each group."""
    return [[r.reading_id for r in group] for group in groups]


def test_one_shape_is_one_group() -> None:
    """Readings of one shape stack into one run, in arrival order."""
    batch = [reading(n, x=(4,)) for n in "abc"]
    assert ids(group_by_shape(batch)) == [["a", "b", "c"]]


def test_dynamic_axes_split_the_batch() -> None:
    """Readings whose dynamic axis differs cannot be stacked: one group per shape, groups in
    the order of their first reading, readings in arrival order within a group."""
    batch = [
        reading("a", x=(3,)),
        reading("b", x=(5,)),
        reading("c", x=(3,)),
        reading("d", x=(7,)),
        reading("e", x=(5,)),
    ]
    assert ids(group_by_shape(batch)) == [["a", "c"], ["b", "e"], ["d"]]


def test_every_input_counts_for_the_shape() -> None:
    """A multi-input reading groups by the shapes of all its inputs together."""
    batch = [
        reading("a", x=(2,), y=(3,)),
        reading("b", x=(2,), y=(4,)),
        reading("c", x=(2,), y=(3,)),
    ]
    assert ids(group_by_shape(batch)) == [["a", "c"], ["b"]]


def test_every_reading_is_in_exactly_one_group() -> None:
    """Grouping neither loses nor duplicates a reading."""
    batch = [reading(str(n), x=(n % 3 + 1, 2)) for n in range(10)]
    grouped = [r for group in group_by_shape(batch) for r in group]
    assert sorted(r.reading_id for r in grouped) == sorted(r.reading_id for r in batch)
    assert len(grouped) == len(batch)


def test_empty_batch_has_no_groups() -> None:
    """Nothing to run, nothing to group."""
    assert group_by_shape([]) == []


class Counter:
    """An acknowledgement that counts its calls and remembers the calling threads."""

    def __init__(self) -> None:
        self.calls = 0
        self.threads: list[str] = []
        self._lock = threading.Lock()

    def __call__(self) -> None:
        with self._lock:
            self.calls += 1
            self.threads.append(threading.current_thread().name)


def test_after_both_fires_on_the_second_call_only() -> None:
    """The first delivery does not acknowledge; the second does, once; later calls do not."""
    ack = Counter()
    half = ack_after_both(ack)
    half()
    assert ack.calls == 0
    half()
    assert ack.calls == 1
    half()
    assert ack.calls == 1


def test_after_both_fires_on_the_thread_of_the_second_call() -> None:
    """Each delivery may hand its result off on another thread; the acknowledgement fires on
    whichever makes the second call."""
    ack = Counter()
    half = ack_after_both(ack)
    first = threading.Thread(target=half, name="first-delivery")
    first.start()
    first.join()
    assert ack.calls == 0
    second = threading.Thread(target=half, name="second-delivery")
    second.start()
    second.join()
    assert ack.threads == ["second-delivery"]


def test_after_both_fires_once_when_both_calls_race() -> None:
    """Two threads calling at the same moment: exactly one acknowledgement, every time."""

    def deliver(start: threading.Barrier, half: Callable[[], None]) -> None:
        start.wait()
        half()

    for _ in range(200):
        ack = Counter()
        half = ack_after_both(ack)
        start = threading.Barrier(2)
        threads = [threading.Thread(target=deliver, args=(start, half)) for _ in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert ack.calls == 1


def test_separate_results_are_acknowledged_separately() -> None:
    """Each wrapped acknowledgement counts its own calls."""
    first, second = Counter(), Counter()
    half_first, half_second = ack_after_both(first), ack_after_both(second)
    half_first()
    half_second()
    assert (first.calls, second.calls) == (0, 0)
    half_second()
    assert (first.calls, second.calls) == (0, 1)
    half_first()
    assert (first.calls, second.calls) == (1, 1)
