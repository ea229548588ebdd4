"""Returning memory freed after a burst (the trimming rule; glibc's malloc_trim for real)."""

from __future__ import annotations

from agent.ops.heap import GROWTH_MB, HeapTrimmer, _load_malloc_trim


def test_trims_while_above_the_floor() -> None:
    """The first call trims; later ones only while RSS is GROWTH_MB above the lowest a trim
    has left: near the floor the heap is not walked at all, and a trim in the middle of a
    burst (that frees little) does not stop the one after the burst."""
    rss = [100.0]
    calls: list[int] = []

    def trim(pad: int) -> int:
        calls.append(pad)
        rss[0] -= 10.0
        return 1

    trimmer = HeapTrimmer(lambda: rss[0], trim)
    trimmer.maybe_trim()
    assert calls == [0]
    assert rss[0] == 90.0
    rss[0] += GROWTH_MB / 2
    trimmer.maybe_trim()
    assert len(calls) == 1
    rss[0] += GROWTH_MB
    trimmer.maybe_trim()
    assert len(calls) == 2


def test_glibc_malloc_trim_is_called_for_real() -> None:
    """On glibc Linux the real malloc_trim loads and runs (returns 0 or 1)."""
    trim = _load_malloc_trim()
    if trim is None:  # musl or another libc: the trimmer does nothing there
        return
    assert trim(0) in (0, 1)
    HeapTrimmer(lambda: 50.0).maybe_trim()


def test_a_trim_during_a_burst_does_not_raise_the_floor() -> None:
    """RSS high while the burst's memory is live: the trim frees nothing, and the next
    report, after the burst, trims again."""
    rss = [100.0]
    calls: list[int] = []

    def trim(pad: int) -> int:
        calls.append(pad)
        return 1

    trimmer = HeapTrimmer(lambda: rss[0], trim)
    trimmer.maybe_trim()  # floor 100
    rss[0] = 150.0  # in the burst: nothing to give back
    trimmer.maybe_trim()
    trimmer.maybe_trim()
    assert len(calls) == 3
