"""Latency percentiles from a fixed set of buckets: bounded memory whatever the traffic.

Buckets grow by 2^(1/8) (~9 %) from 10 us to about 10 min, so a percentile is within one
bucket (~9 %) of the truth. The worker records; the telemetry thread takes an interval's
counts (and Prometheus reads the cumulative ones) under a lock held for microseconds.
"""

from __future__ import annotations

import bisect
import math
import threading
from dataclasses import dataclass

_STEP = 2 ** (1 / 8)
BOUNDS_MS: tuple[float, ...] = tuple(0.01 * _STEP**i for i in range(8 * 26))  # to ~671 s


@dataclass(frozen=True)
class LatencySummary:
    """Percentiles of one interval, in milliseconds (None when nothing was recorded)."""

    count: int
    p50: float | None
    p95: float | None
    p99: float | None

    def to_dict(self) -> dict[str, float | None]:
        """JSON view, rounded to microseconds."""
        return {
            name: None if value is None else round(value, 3)
            for name, value in (("p50", self.p50), ("p95", self.p95), ("p99", self.p99))
        }


class LatencyHistogram:
    """Counts of latencies per bucket, for the current interval and since start."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._interval = [0] * (len(BOUNDS_MS) + 1)
        self._total = [0] * (len(BOUNDS_MS) + 1)
        self._sum_ms = 0.0

    def record(self, latency_ms: float) -> None:
        """Add one latency (called by an inference worker)."""
        index = bisect.bisect_left(BOUNDS_MS, latency_ms)
        with self._lock:
            self._interval[index] += 1
            self._total[index] += 1
            self._sum_ms += latency_ms

    def take_interval(self) -> LatencySummary:
        """Percentiles since the last call, and start a new interval."""
        with self._lock:
            counts, self._interval = self._interval, [0] * (len(BOUNDS_MS) + 1)
        return summarize(counts)

    def cumulative(self) -> tuple[list[tuple[float, int]], int, float]:
        """(upper bound ms, cumulative count) pairs, total count and sum, since start."""
        with self._lock:
            counts, total_sum = list(self._total), self._sum_ms
        running, buckets = 0, []
        for bound, count in zip(BOUNDS_MS, counts, strict=False):
            running += count
            buckets.append((bound, running))
        running += counts[-1]
        return buckets, running, total_sum


def summarize(counts: list[int]) -> LatencySummary:
    """Percentiles from bucket counts: each reported as its bucket's upper bound."""
    total = sum(counts)
    if total == 0:
        return LatencySummary(0, None, None, None)

    def percentile(fraction: float) -> float:
        rank = max(1, math.ceil(fraction * total))
        running = 0
        for index, count in enumerate(counts):
            running += count
            if running >= rank:
                return BOUNDS_MS[min(index, len(BOUNDS_MS) - 1)]
        return BOUNDS_MS[-1]

    return LatencySummary(total, percentile(0.50), percentile(0.95), percentile(0.99))
