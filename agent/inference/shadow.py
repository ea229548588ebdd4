"""A shadow run: the candidate of an update runs beside the serving model on copies of the
live batches, and the two are compared reading by reading.

Threads: the pipelines' serving threads (a worker, or the network loop for a model that
runs inline) ``offer`` what they ran: the feeds and outputs they already hold, no copy, as
neither is written again. The shadow's own thread takes them, runs the candidate (which
sessions, and how they are timed: ``shadow_models``) and keeps the tally. The serving path
pays a dict lookup per batch when no shadow runs, and a bounded append when one does: a
candidate that falls behind loses batches (counted as ``skipped``), never delays a result.
"""

from __future__ import annotations

import random
import statistics
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from agent.config.schema import Postprocess
from agent.errors import first_line
from agent.inference.agreement import BatchAgreement, Differences, Judge
from agent.inference.golden import DEFAULT_ATOL, DEFAULT_RTOL
from agent.inference.runplan import RunPlan
from agent.inference.shadow_models import (
    SERVING_TIMED_EVERY,
    SERVING_TIMED_FIRST,
    ShadowModels,
)
from agent.inference.validation import json_number

# Batches waiting for the candidate; beyond this the newest offer is skipped (counted).
TAP_CAPACITY = 64
# Run times kept for the latency figures (per batch, the latest).
TIMINGS_KEPT = 10_000
STOP_POLL_S = 0.5
GATHER_S = 0.05  # the least time between two takes from the tap


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
    seconds: float  # the serving model's run time for this batch (its serving thread's clock)


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
    apart: Differences = field(default_factory=Differences)

    @property
    def disagreement(self) -> float:
        """The share of readings whose results differ."""
        return self.disagreeing / self.readings if self.readings else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "readings": self.readings,
            "disagreement": _share(self.disagreeing, self.readings),
            **_apart(self.apart),
        }


@dataclass
class ShadowTally:
    """The running figures of one shadow run (the trial's thread)."""

    pipelines: dict[str, _PipelineTally] = field(default_factory=dict)
    errors: int = 0  # readings the candidate failed to run
    last_error: str | None = None
    batches: int = 0  # batches the candidate ran
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

    def add(
        self, pipeline: str, agreement: BatchAgreement, served_s: float | None, ran_s: float
    ) -> None:
        """One compared batch, with both models' run times (``served_s`` None: the
        serving model was not timed on it, and neither counts for latency)."""
        tally = self.pipelines.setdefault(pipeline, _PipelineTally())
        tally.readings += agreement.readings
        tally.disagreeing += agreement.disagreeing
        tally.apart.add(agreement.apart)
        if served_s is None:
            return
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
        apart = Differences()
        for pipeline in self.pipelines.values():
            apart.add(pipeline.apart)
        document: dict[str, Any] = {
            "readings": readings,
            "disagreement": _share(self.disagreeing, readings),
            **_apart(apart),
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
    models: ShadowModels,
    tap: ShadowTap,
    *,
    until: float,
    stopped: threading.Event,
    progress: Callable[[ShadowTally], None],
    progress_every_s: float,
    rtol: float = DEFAULT_RTOL,
    atol: float = DEFAULT_ATOL,
) -> ShadowTally:
    """Run the candidate of ``models`` on what the tap receives until the monotonic time
    ``until`` or ``stopped``; ``progress`` hears the tally every ``progress_every_s``
    (this thread)."""
    tally = ShadowTally()
    judges: dict[str, Judge] = {}
    next_progress = time.monotonic() + progress_every_s
    while not stopped.is_set():
        now = time.monotonic()
        if now >= until:
            break
        # Waits of half a second at most: ``stopped`` is an Event the tap does not hear.
        items = tap.take(min(until, next_progress, now + STOP_POLL_S) - now)
        if models.serving is not None:  # both timed here: one run may serve many batches
            items = coalesce(items)
        for item in items:
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
            _compare(models, item, judge, tally)
        if time.monotonic() >= next_progress:
            progress(tally)
            next_progress = time.monotonic() + progress_every_s
        if items:
            # Let batches gather: fewer, larger runs cost less per reading, and wake the
            # process (and take the GIL from the serving threads) less often.
            stopped.wait(GATHER_S)
    return tally


def coalesce(items: list[Offered]) -> list[Offered]:
    """``items`` with runs of batches of one pipeline and plan joined into one batch where
    they can be (readings stacked along a batch axis, no stream state, up to the plan's
    limit), so the candidate runs once for them; the order kept."""
    groups: list[list[Offered]] = []
    for item in items:
        if groups and _joinable(groups[-1], item):
            groups[-1].append(item)
        else:
            groups.append([item])
    return [group[0] if len(group) == 1 else _join(group) for group in groups]


def _joinable(group: list[Offered], item: Offered) -> bool:
    first = group[0]
    plan = first.plan
    if item.pipeline != first.pipeline or item.plan is not plan:
        return False
    if not plan.stacked or plan.state or sum(g.size for g in group) + item.size > plan.limit:
        return False
    return _parts_join(first.feeds, item.feeds, first.size, item.size) and _parts_join(
        first.served, item.served, first.size, item.size
    )


def _parts_join(first: dict[str, Any], second: dict[str, Any], size: int, more: int) -> bool:
    """Whether every value of two batches' feeds (or outputs) has the readings first: arrays
    alike but for their first axis, or lists (per-reading maps) of one item a reading."""
    if first.keys() != second.keys():
        return False
    for name, ours in first.items():
        theirs = second[name]
        if isinstance(ours, np.ndarray) and isinstance(theirs, np.ndarray):
            if ours.ndim == 0 or ours.shape[0] != size or theirs.shape[0:1] != (more,):
                return False
            if ours.shape[1:] != theirs.shape[1:] or ours.dtype != theirs.dtype:
                return False
        elif not (
            isinstance(ours, list)
            and isinstance(theirs, list)
            and (len(ours), len(theirs)) == (size, more)
        ):
            return False
    return True


def _join(group: list[Offered]) -> Offered:
    def joined(parts: list[Any]) -> Any:
        if isinstance(parts[0], np.ndarray):
            return np.concatenate(parts)
        return [value for part in parts for value in part]

    first = group[0]
    return replace(
        first,
        feeds={name: joined([g.feeds[name] for g in group]) for name in first.feeds},
        served={name: joined([g.served[name] for g in group]) for name in first.served},
        size=sum(g.size for g in group),
        seconds=sum(g.seconds for g in group),
    )


def _compare(models: ShadowModels, item: Offered, judge: Judge, tally: ShadowTally) -> None:
    fetch = item.plan.fetch
    try:
        values, ran_s = models.run_candidate(fetch, item.feeds)
    except Exception as exc:  # onnxruntime's own error types: the candidate failed here
        tally.failed(item.pipeline, item.size, f"the candidate failed: {first_line(exc)}")
        return
    tally.batches += 1
    outputs = dict(zip(fetch, values, strict=True))
    agreement = judge.compare(item.served, outputs, item.size)
    tally.add(item.pipeline, agreement, _serving_time(models, item, tally.batches), ran_s)


def _serving_time(models: ShadowModels, item: Offered, batch: int) -> float | None:
    """The serving model's time on ``item`` by the candidate's clock, when this batch is
    one to time it on."""
    if models.serving is None:
        return item.seconds
    if batch > SERVING_TIMED_FIRST and batch % SERVING_TIMED_EVERY:
        return None
    try:
        return models.time_serving(item.plan.fetch, item.feeds)
    except Exception:  # it ran these feeds when serving: no figure from this batch, no verdict
        return None


def _apart(apart: Differences) -> dict[str, float | None]:
    return {name: json_number(value) for name, value in apart.figures().items()}


def _share(part: int, whole: int) -> float:
    return round(part / whole, 4) if whole else 0.0


def _quantiles(values: deque[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p99": None}
    ordered = sorted(values)
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    return {"p50": round(statistics.median(ordered), 4), "p99": round(p99, 4)}
