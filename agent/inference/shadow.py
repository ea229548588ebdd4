"""A shadow run: the candidate of an update runs beside the serving model on copies of the
live batches, and the two are compared reading by reading.

Threads: the pipelines' serving threads (a worker, or the network loop for a model that
runs inline) ``offer`` what they ran: the feeds and outputs they already hold, no copy, as
neither is written again. The trial's thread (the update install thread) takes them, runs
the candidate and keeps the tally. The serving path pays a dict lookup per batch when no
shadow runs, and a bounded append when one does: a candidate that falls behind loses
batches (counted as ``skipped``), never delays a result.
"""

from __future__ import annotations

import random
import statistics
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from agent.config.schema import Postprocess
from agent.errors import first_line
from agent.inference.agreement import BatchAgreement, Judge
from agent.inference.golden import DEFAULT_ATOL, DEFAULT_RTOL
from agent.inference.runplan import RunPlan
from agent.inference.session import LoadedModel
from agent.inference.validation import json_number

# Batches waiting for the candidate; beyond this the newest offer is skipped (counted).
TAP_CAPACITY = 64
# Run times kept for the latency figures (per batch, the latest).
TIMINGS_KEPT = 10_000
STOP_POLL_S = 0.5


@dataclass(frozen=True)
class Offered:
    """One batch the serving model ran, as its pipeline offers it."""

    pipeline: str
    plan: RunPlan
    postprocess: Postprocess | None
    labels: list[str] | None
    feeds: dict[str, Any]
    served: dict[str, Any]
    size: int
    seconds: float  # the serving model's run time for this batch


class ShadowTap:
    """Where serving threads leave batches for the candidate (any thread offers; the trial's
    thread takes)."""

    def __init__(self, sample: float = 1.0, capacity: int = TAP_CAPACITY) -> None:
        self._sample = sample
        self._capacity = capacity
        self._cond = threading.Condition()
        self._items: deque[Offered] = deque()
        self.skipped = 0  # batches the candidate had no room for (under _cond)

    def offer(self, item: Offered) -> None:
        """A batch the serving model just ran (its serving thread): kept unless sampled
        out or the candidate is behind."""
        if self._sample < 1.0 and random.random() >= self._sample:  # noqa: S311 (sampling)
            return
        with self._cond:
            if len(self._items) >= self._capacity:
                self.skipped += item.size
                return
            self._items.append(item)
            self._cond.notify()

    def take(self, timeout_s: float) -> list[Offered]:
        """Everything offered so far, waiting up to ``timeout_s`` for the first (trial's
        thread)."""
        with self._cond:
            if not self._items:
                self._cond.wait(max(0.0, timeout_s))
            items = list(self._items)
            self._items.clear()
            return items


class ShadowTaps:
    """The tap of each model with a shadow trial in progress, by model name. Written by the
    trials' thread, read without a lock by the pipelines (a dict get is atomic in CPython)."""

    def __init__(self) -> None:
        self._taps: dict[str, ShadowTap] = {}

    def get(self, name: str) -> ShadowTap | None:
        """The tap of model ``name``'s shadow trial, if one runs (any thread)."""
        return self._taps.get(name)

    def open(self, name: str, tap: ShadowTap) -> None:
        """Have ``name``'s pipelines offer their batches to ``tap`` (the trial's thread)."""
        self._taps[name] = tap

    def close(self, name: str) -> None:
        """Stop offering ``name``'s batches (the trial's thread)."""
        self._taps.pop(name, None)


@dataclass
class _PipelineTally:
    readings: int = 0
    disagreeing: int = 0
    max_abs_err: float = 0.0

    @property
    def disagreement(self) -> float:
        """The share of readings whose results differ."""
        return self.disagreeing / self.readings if self.readings else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "readings": self.readings,
            "disagreement": _share(self.disagreeing, self.readings),
            "max_abs_err": json_number(self.max_abs_err),
        }


@dataclass
class ShadowTally:
    """The running figures of one shadow run (the trial's thread)."""

    pipelines: dict[str, _PipelineTally] = field(default_factory=dict)
    errors: int = 0  # readings the candidate failed to run
    last_error: str | None = None
    serving_ms: deque[float] = field(default_factory=lambda: deque(maxlen=TIMINGS_KEPT))
    candidate_ms: deque[float] = field(default_factory=lambda: deque(maxlen=TIMINGS_KEPT))

    @property
    def readings(self) -> int:
        """Readings compared so far, over all pipelines."""
        return sum(p.readings for p in self.pipelines.values())

    @property
    def disagreeing(self) -> int:
        """Readings whose results differ (a failed candidate run counts)."""
        return sum(p.disagreeing for p in self.pipelines.values())

    def add(self, pipeline: str, agreement: BatchAgreement, served_s: float, ran_s: float) -> None:
        """One compared batch, with both models' run times."""
        tally = self.pipelines.setdefault(pipeline, _PipelineTally())
        tally.readings += agreement.readings
        tally.disagreeing += agreement.disagreeing
        tally.max_abs_err = max(tally.max_abs_err, agreement.max_abs_err)
        per_reading = 1000 / agreement.readings
        self.serving_ms.append(served_s * per_reading)
        self.candidate_ms.append(ran_s * per_reading)

    def failed(self, pipeline: str, readings: int, error: str) -> None:
        """The candidate could not run a batch: every reading in it disagrees."""
        tally = self.pipelines.setdefault(pipeline, _PipelineTally())
        tally.readings += readings
        tally.disagreeing += readings
        self.errors += readings
        self.last_error = error

    @property
    def latency_ratio(self) -> float | None:
        """The candidate's median run time per reading over the serving model's."""
        if not self.serving_ms:
            return None
        serving = statistics.median(self.serving_ms)
        candidate = statistics.median(self.candidate_ms)
        return candidate / serving if serving > 0 else None

    def figures(self) -> dict[str, Any]:
        """The figures a status carries."""
        readings = self.readings
        ratio = self.latency_ratio
        max_abs_err = max((p.max_abs_err for p in self.pipelines.values()), default=0.0)
        document: dict[str, Any] = {
            "readings": readings,
            "disagreement": _share(self.disagreeing, readings),
            "max_abs_err": json_number(max_abs_err),
            "latency_ratio": round(ratio, 3) if ratio is not None else None,
            "latency_ms": {
                "serving": _quantiles(self.serving_ms),
                "candidate": _quantiles(self.candidate_ms),
            },
            "errors": self.errors,
            "pipelines": {name: p.to_dict() for name, p in sorted(self.pipelines.items())},
        }
        if self.last_error is not None:
            document["last_error"] = self.last_error
        return document


def run_beside(
    candidate: LoadedModel,
    tap: ShadowTap,
    *,
    until: float,
    stopped: threading.Event,
    progress: Callable[[ShadowTally], None],
    progress_every_s: float,
    rtol: float = DEFAULT_RTOL,
    atol: float = DEFAULT_ATOL,
) -> ShadowTally:
    """Run ``candidate`` on what the tap receives until the monotonic time ``until`` or
    ``stopped``; ``progress`` hears the tally every ``progress_every_s`` (this thread)."""
    tally = ShadowTally()
    judges: dict[str, Judge] = {}
    next_progress = time.monotonic() + progress_every_s
    while not stopped.is_set():
        now = time.monotonic()
        if now >= until:
            break
        # Waits of half a second at most: ``stopped`` is an Event the tap does not hear.
        for item in tap.take(min(until, next_progress, now + STOP_POLL_S) - now):
            judge = judges.get(item.pipeline)
            if judge is None:
                judge = Judge(
                    item.plan.published,
                    item.plan.stacked,
                    item.postprocess,
                    item.labels,
                    rtol=rtol,
                    atol=atol,
                )
                judges[item.pipeline] = judge
            _compare(candidate, item, judge, tally)
        if time.monotonic() >= next_progress:
            progress(tally)
            next_progress = time.monotonic() + progress_every_s
    return tally


def _compare(candidate: LoadedModel, item: Offered, judge: Judge, tally: ShadowTally) -> None:
    fetch = list(item.plan.fetch)
    started = time.perf_counter()
    try:
        values = candidate.session.run(fetch, item.feeds)
    except Exception as exc:  # onnxruntime's own error types: the candidate failed here
        tally.failed(item.pipeline, item.size, f"the candidate failed: {first_line(exc)}")
        return
    ran_s = time.perf_counter() - started
    outputs = dict(zip(fetch, values, strict=True))
    tally.add(item.pipeline, judge.compare(item.served, outputs, item.size), item.seconds, ran_s)


def _share(part: int, whole: int) -> float:
    return round(part / whole, 4) if whole else 0.0


def _quantiles(values: deque[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p99": None}
    ordered = sorted(values)
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    return {"p50": round(statistics.median(ordered), 4), "p99": round(p99, 4)}
