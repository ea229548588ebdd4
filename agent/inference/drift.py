"""How far a pipeline's live readings have drifted from a reference: the population
stability index (PSI) of each feature, in rolling windows.

Why PSI: it is what model-risk teams already read (0.1 "some shift", 0.2 "significant" are
the customary marks), it needs nothing but bin counts, so a window costs a counter per bin
and feature instead of keeping readings, and it sees a shift of the mean and a change of the
spread alike. The bins are the reference's deciles per feature, fixed once.

Features: a reading's payload inputs, and the published outputs the reference has
``expected:<name>`` arrays for. An item of at most ``NARROW`` elements gives one feature per
element. A wider one is summarised, because a thousand pixels or samples each compared on
their own would flag noise: with two or more axes, the mean of each channel (the first
axis), which follows the gain and offset of a sensor or camera, the usual drift; a long
flat signal, the means of ``SEGMENTS`` equal stretches (a fixed projection).

Threads: ``DriftMonitor.observe`` runs on the thread that runs the pipeline's batches (its
worker, or the network loop); it owns the counts. ``DriftMonitor.state`` is read by the
health report on the main thread: an immutable snapshot replaced as a whole.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import structlog

log = structlog.get_logger(__name__)

BINS = 10
NARROW = 64
SEGMENTS = 16
MAX_FEATURES = 256  # beyond this, the first ones are kept (a window stays small)
CHUNK = 256  # readings binned together (numpy's per-call cost, spread over many)
MIN_WINDOW_READINGS = 50  # a window with fewer is not scored: too few for ten bins
SMOOTHING = 1e-4  # an empty bin counts as this share, so the log stays finite
WORST_SHOWN = 3


@dataclass(frozen=True)
class DriftState:
    """What health says about a pipeline's drift: the latest scored window's ``score`` (the
    worst feature's PSI), whether it is ``flagged``, how many windows in a row were over the
    threshold, the worst features, and when that window closed."""

    score: float | None = None
    flagged: bool = False
    windows_over: int = 0
    worst: tuple[str, ...] = ()
    readings: int = 0
    closed_at: float | None = None
    problem: str | None = None  # why drift is not measured (the readings do not fit)

    def to_dict(self) -> dict[str, Any]:
        """For ``P/health``."""
        document: dict[str, Any] = {
            "score": None if self.score is None else round(self.score, 4),
            "flagged": self.flagged,
            "windows_over": self.windows_over,
            "worst": list(self.worst),
            "readings": self.readings,
        }
        if self.problem is not None:
            document["problem"] = self.problem
        return document


def features(array: np.ndarray, stacked: bool) -> np.ndarray:
    """A (readings, features) float64 view of one input or output of a batch."""
    items = np.asarray(array) if stacked else np.asarray(array)[None]
    count = items.shape[0] if items.ndim else 1
    flat = items.reshape(count, -1)
    width = flat.shape[1]
    if width <= NARROW:
        result = flat
    elif items.ndim >= 3 and items.shape[1] <= MAX_FEATURES:
        result = items.reshape(count, items.shape[1], -1).mean(axis=2)
    else:
        usable = width - width % SEGMENTS
        result = flat[:, :usable].reshape(count, SEGMENTS, -1).mean(axis=2)
    return result[:, :MAX_FEATURES].astype(np.float64, copy=False)


def _joined(arrays: list[Any], stacked: bool) -> np.ndarray:
    """One source's arrays of many batches as one (readings, ...) array."""
    if stacked:
        return np.concatenate([np.asarray(a) for a in arrays])
    return np.stack([np.asarray(a) for a in arrays])


def feature_names(name: str, item_shape: tuple[int, ...]) -> list[str]:
    """The names ``features`` gives the columns of an item of ``item_shape``."""
    size = math.prod(item_shape)
    if size <= NARROW:
        names = [f"{name}[{i}]" for i in range(size)]
    elif len(item_shape) >= 2 and item_shape[0] <= MAX_FEATURES:
        names = [f"{name}:channel {c}" for c in range(item_shape[0])]
    else:
        names = [f"{name}:segment {s}" for s in range(SEGMENTS)]
    return names[:MAX_FEATURES]


class Reference:
    """Per feature, the reference's decile edges and share of readings per bin."""

    def __init__(self, columns: np.ndarray, names: list[str]) -> None:
        self.names = names
        quantiles = np.quantile(columns, np.linspace(0, 1, BINS + 1)[1:-1], axis=0).T
        self.edges = quantiles  # (features, BINS - 1)
        self.shares = _shares(self.counts(columns), len(columns))

    def counts(self, columns: np.ndarray) -> np.ndarray:
        """(features, BINS) counts of the rows of ``columns`` (readings, features)."""
        bins = (columns[:, :, None] > self.edges[None, :, :]).sum(axis=2)
        width = len(self.names)
        offsets = bins + np.arange(width) * BINS
        return np.bincount(offsets.ravel(), minlength=width * BINS).reshape(width, BINS)

    def psi(self, counts: np.ndarray, readings: int) -> np.ndarray:
        """Per feature, the PSI of ``counts`` against the reference."""
        live = _shares(counts, readings)
        psi: np.ndarray = ((live - self.shares) * np.log(live / self.shares)).sum(axis=1)
        return psi


def _shares(counts: np.ndarray, total: int) -> np.ndarray:
    return np.maximum(counts / max(total, 1), SMOOTHING)


@dataclass(frozen=True)
class DriftSettings:
    """A pipeline's ``drift`` settings, as the monitor uses them."""

    window_s: float
    threshold: float
    windows: int


class DriftMonitor:
    """Counts one pipeline's readings per feature and bin, and scores each window."""

    def __init__(
        self,
        reference: Reference,
        sources: tuple[tuple[str, bool], ...],
        settings: DriftSettings,
        *,
        width: int,
        clock: Callable[[], float] = time.monotonic,
        logger: Any = None,
    ) -> None:
        # sources: (name, is_output) in column order: payload inputs, then outputs; width:
        # the columns they give together (before MAX_FEATURES).
        self._reference = reference
        self._sources = sources
        self._width = width
        self._log = logger if logger is not None else log
        self._settings = settings
        self._clock = clock
        # Per batch, its arrays in source order (the serving thread's; binned by CHUNK).
        self._pending: list[tuple[Any, ...]] = []
        self._pending_rows = 0
        self._stacked = True
        self._counts = np.zeros((len(reference.names), BINS), np.int64)
        self._readings = 0
        self._window_ends = clock() + settings.window_s
        self._below = 0  # scored windows in a row under the threshold, while flagged
        self.state = DriftState()

    @property
    def feature_names(self) -> list[str]:
        """The features compared, in column order."""
        return self._reference.names

    def observe(self, feeds: Mapping[str, Any], outputs: Mapping[str, Any], stacked: bool) -> None:
        """One batch the serving model ran (the pipeline's serving thread). Keeps references
        to its arrays, which nobody writes again: the numpy work waits for ``CHUNK``
        readings, where its per-call cost is shared (one call per reading would cost
        tens of microseconds each at low rates, with cold caches)."""
        if self.state.problem is not None:
            return
        if self._clock() >= self._window_ends:
            self._close_window()
        try:
            arrays = tuple(
                (outputs if is_output else feeds)[name] for name, is_output in self._sources
            )
        except KeyError as exc:
            self._stop(f"the reference has {exc.args[0]!r}, which the model's batches lack")
            return
        self._pending.append(arrays)
        self._pending_rows += len(arrays[0]) if stacked else 1
        self._stacked = stacked
        if self._pending_rows >= CHUNK:
            self._bin_pending()

    def _stop(self, problem: str) -> None:
        self._log.warning("drift_not_measured", reason=problem)
        self._pending.clear()
        self._pending_rows = 0
        self.state = DriftState(problem=problem)

    def _bin_pending(self) -> None:
        if not self._pending:
            return
        pending, stacked = self._pending, self._stacked
        self._pending = []
        self._pending_rows = 0
        try:
            parts = [
                features(_joined([arrays[i] for arrays in pending], stacked), stacked=True)
                for i in range(len(self._sources))
            ]
        except ValueError as exc:  # readings of one input in different shapes
            self._stop(f"the readings differ in shape, which drift cannot compare: {exc}")
            return
        rows = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=1)
        if rows.shape[1] != self._width:
            self._stop(
                f"the readings give {rows.shape[1]} features, the reference {self._width}: "
                "its arrays do not have the shapes of the model's inputs and outputs"
            )
            return
        rows = rows[:, : len(self._reference.names)]
        finite = np.isfinite(rows).all(axis=1)
        if not finite.all():
            rows = rows[finite]
        self._counts += self._reference.counts(rows)
        self._readings += len(rows)

    def _close_window(self) -> None:
        self._bin_pending()
        if self.state.problem is not None:
            return
        now = self._clock()
        self._window_ends = now + self._settings.window_s
        readings, counts = self._readings, self._counts
        self._counts = np.zeros_like(counts)
        self._readings = 0
        if readings < MIN_WINDOW_READINGS:
            return  # too few to score: the state stands as it was
        psi = self._reference.psi(counts, readings)
        order = np.argsort(-psi)[:WORST_SHOWN]
        score = float(psi[order[0]])
        previous = self.state
        over = score > self._settings.threshold
        windows_over = previous.windows_over + 1 if over else 0
        self._below = 0 if over else self._below + 1
        flagged = windows_over >= self._settings.windows or (
            previous.flagged and self._below < self._settings.windows
        )
        worst = tuple(self._reference.names[i] for i in order if psi[i] > 0.1 or over)
        self.state = DriftState(score, flagged, windows_over, worst, readings, now)
        if flagged != previous.flagged:
            event = self._log.warning if flagged else self._log.info
            event(
                "drift_flagged" if flagged else "drift_cleared",
                score=round(score, 4),
                threshold=self._settings.threshold,
                windows=self._settings.windows,
                worst=list(worst),
            )
