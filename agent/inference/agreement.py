"""Whether two models' results on the same readings agree: the judge of a shadow trial.

Pure logic on the outputs of two ``session.run`` calls over one batch. What "agree" means
follows what the pipeline publishes:

- with ``output.postprocess`` (a classifier): the top-1 label after the pipeline's own
  softmax, labels and threshold, so with a threshold it is the flag that must agree;
- otherwise each published output: integer, boolean and string tensors exactly, floating
  point ones within ``atol + rtol * |serving value|`` (the update's golden set tolerances
  when it carries one, else those a golden set has by default), and per-reading maps (a
  ZipMap) by their top key.

Beside the verdict, how far apart the floating point values are (``Differences``), the
figures a regressor's operator reads: the largest and mean absolute difference, and the
largest and mean relative one, against ``|serving value|`` (at least ``atol``, so that
values near zero do not make it explode).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from agent.config.schema import Postprocess
from agent.errors import PayloadError
from agent.inference import postprocess
from agent.inference.golden import DEFAULT_ATOL, DEFAULT_RTOL
from agent.inference.runplan import split_output


@dataclass
class Differences:
    """How far apart two models' floating point values are, over ``count`` values."""

    count: int = 0
    abs_max: float = 0.0
    abs_sum: float = 0.0
    rel_max: float = 0.0
    rel_sum: float = 0.0

    def add(self, other: Differences) -> None:
        """Count ``other``'s values too."""
        self.count += other.count
        self.abs_max = max(self.abs_max, other.abs_max)
        self.abs_sum += other.abs_sum
        self.rel_max = max(self.rel_max, other.rel_max)
        self.rel_sum += other.rel_sum

    def figures(self) -> dict[str, float]:
        """max/mean absolute and relative difference (0 with no float values compared;
        infinite when a value was not finite)."""
        mean = 1 / self.count if self.count else 0.0
        return {
            "max_abs_err": self.abs_max,
            "mean_abs_err": self.abs_sum * mean,
            "max_rel_err": self.rel_max,
            "mean_rel_err": self.rel_sum * mean,
        }


def differences(ours: np.ndarray, theirs: np.ndarray, atol: float) -> Differences:
    """The differences of two float arrays of one shape (``ours`` the serving model's)."""
    wide = ours.astype(np.float64, copy=False)
    return _summary(np.abs(theirs.astype(np.float64, copy=False) - wide), np.abs(wide), atol)


def _summary(diff: np.ndarray, magnitude: np.ndarray, atol: float) -> Differences:
    """``Differences`` of absolute differences ``diff`` against the serving values'
    ``magnitude``."""
    if not np.isfinite(diff).all():
        return Differences(int(diff.size), math.inf, math.inf, math.inf, math.inf)
    relative = diff / np.maximum(magnitude, max(atol, _TINY))
    return Differences(
        int(diff.size),
        float(diff.max()),
        float(diff.sum()),
        float(relative.max()),
        float(relative.sum()),
    )


_TINY = float(np.finfo(np.float64).tiny)


@dataclass(frozen=True)
class BatchAgreement:
    """One batch compared: readings, how many disagree, and how far apart the float
    outputs are."""

    readings: int
    disagreeing: int
    apart: Differences = field(default_factory=Differences)

    @property
    def max_abs_err(self) -> float:
        """The largest absolute difference between two float values."""
        return self.apart.abs_max


@dataclass(frozen=True)
class Judge:
    """Compares the serving model's and the candidate's outputs of one pipeline."""

    published: tuple[str, ...]
    stacked: bool
    postprocess: Postprocess | None = None
    labels: list[str] | None = None
    rtol: float = DEFAULT_RTOL
    atol: float = DEFAULT_ATOL

    def compare(
        self, served: Mapping[str, Any], candidate: Mapping[str, Any], size: int
    ) -> BatchAgreement:
        """Compare a batch of ``size`` readings, reading by reading."""
        if self.stacked and self.postprocess is None:
            # Tensors with a batch axis: the whole batch in a few numpy calls, not a Python
            # loop per reading (the comparison holds the GIL the serving threads need).
            whole = self._stacked_tensors(served, candidate, size)
            if whole is not None:
                return whole
        disagreeing = 0
        apart = Differences()
        for index in range(size):
            agree, reading = self._reading(served, candidate, index, size)
            disagreeing += not agree
            apart.add(reading)
        return BatchAgreement(size, disagreeing, apart)

    def _stacked_tensors(
        self, served: Mapping[str, Any], candidate: Mapping[str, Any], size: int
    ) -> BatchAgreement | None:
        """The batch compared at once when every published output is a tensor of the same
        shape with the batch first in both; None when not (then reading by reading)."""
        differs = np.zeros(size, dtype=bool)
        apart = Differences()
        for name in self.published:
            ours, theirs = served.get(name), candidate.get(name)
            if not (isinstance(ours, np.ndarray) and isinstance(theirs, np.ndarray)):
                return None
            if ours.shape != theirs.shape or ours.ndim == 0 or ours.shape[0] != size:
                return None
            mismatch, output = self._tensors(ours, theirs, size)
            differs |= mismatch
            apart.add(output)
        return BatchAgreement(size, int(differs.sum()), apart)

    def _tensors(
        self, ours: np.ndarray, theirs: np.ndarray, size: int
    ) -> tuple[np.ndarray, Differences]:
        """Two arrays of one shape, ``size`` items first: which items differ (numbers
        exactly unless both are floating point, then within the tolerances; NaN never
        is), and how far apart their float values are."""
        if ours.dtype.kind not in "fc" or theirs.dtype.kind not in "fc" or ours.size == 0:
            return np.not_equal(ours, theirs).reshape(size, -1).any(axis=1), Differences()
        wide = ours.astype(np.float64, copy=False)
        diff = np.abs(theirs.astype(np.float64, copy=False) - wide)
        magnitude = np.abs(wide)
        within = np.less_equal(diff, self.atol + self.rtol * magnitude)
        return (
            np.logical_not(within.reshape(size, -1).all(axis=1)),
            _summary(diff, magnitude, self.atol),
        )

    def _reading(
        self, served: Mapping[str, Any], candidate: Mapping[str, Any], index: int, size: int
    ) -> tuple[bool, Differences]:
        agree = True
        apart = Differences()
        for name in self.published:
            if name not in candidate:
                return False, apart
            ours = split_output(served[name], index, size, self.stacked)
            theirs = split_output(candidate[name], index, size, self.stacked)
            same, output = self._values(ours, theirs)
            agree = agree and same
            apart.add(output)
        if self.postprocess is not None:
            # The classifier's verdict, not its raw scores, is what must agree.
            source = self.postprocess.output or self.published[0]
            top1 = self._top1(
                split_output(served[source], index, size, self.stacked),
                split_output(candidate[source], index, size, self.stacked),
            )
            agree = agree if top1 is None else top1
        return agree, apart

    def _values(self, ours: Any, theirs: Any) -> tuple[bool, Differences]:
        if isinstance(ours, dict) and isinstance(theirs, dict):
            return _maps(ours, theirs, self.atol)
        try:
            left = np.asarray(ours)
            right = np.asarray(theirs)
        except (TypeError, ValueError):
            return False, Differences()
        if left.shape != right.shape:
            return False, Differences()
        mismatch, apart = self._tensors(left[None], right[None], 1)
        return not mismatch[0], apart

    def _top1(self, ours: Any, theirs: Any) -> bool | None:
        """Whether the top-1 labels (or flags) agree; None when the postprocess names no
        label (softmax alone: the scores are compared as values)."""
        assert self.postprocess is not None
        try:
            left = postprocess.apply(self.postprocess, ours, self.labels)
            right = postprocess.apply(self.postprocess, theirs, self.labels)
        except PayloadError:
            return False
        if "label" in left or "label" in right:
            return bool(left.get("label") == right.get("label"))
        if "labels" in left or "labels" in right:
            return bool(left.get("labels", [])[:1] == right.get("labels", [])[:1])
        return None


def _maps(ours: dict[Any, Any], theirs: dict[Any, Any], atol: float) -> tuple[bool, Differences]:
    """One reading's class -> score map (ZipMap): the top class must agree."""
    if not ours or set(ours) != set(theirs):
        return False, Differences()
    keys = list(ours)
    try:
        left = np.array([float(ours[key]) for key in keys])
        right = np.array([float(theirs[key]) for key in keys])
    except (TypeError, ValueError):
        return False, Differences()
    top = max(ours, key=lambda key: ours[key])
    return top == max(theirs, key=lambda key: theirs[key]), differences(left, right, atol)
