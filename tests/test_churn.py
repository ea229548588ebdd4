"""ShortConnectionStreak: connections the broker keeps closing right after accepting them."""

from __future__ import annotations

from agent.transport.churn import ShortConnectionStreak


def test_reported_once_when_the_streak_reaches_the_threshold() -> None:
    """Three short connections in a row are reported once; the fourth is not repeated."""
    streak = ShortConnectionStreak(short_s=10, report_at=3)
    reports = []
    for start in (0.0, 2.0, 4.0, 6.0):
        streak.connected(start)
        reports.append(streak.dropped(start + 1))
    assert reports == [None, None, 3, None]


def test_a_connection_that_lasted_starts_over() -> None:
    """A connection that lived past the limit resets the count: a broker restart now and
    then is not a client id clash."""
    streak = ShortConnectionStreak(short_s=10, report_at=2)
    streak.connected(0)
    assert streak.dropped(1) is None
    streak.connected(2)
    assert streak.dropped(60) is None
    streak.connected(61)
    assert streak.dropped(62) is None
    streak.connected(63)
    assert streak.dropped(64) == 2


def test_failed_connect_attempts_do_not_count() -> None:
    """A refused or unreachable connect was never accepted, so it is not a short connection."""
    streak = ShortConnectionStreak(short_s=10, report_at=1)
    assert streak.dropped(5) is None
    streak.connected(6)
    assert streak.dropped(7) == 1
