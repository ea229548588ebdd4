"""Whether two models' results on the same readings agree: the judge of a shadow trial.

Pure logic on the outputs of two ``session.run`` calls over one batch. What "agree" means
follows what the pipeline publishes:

- with ``output.postprocess`` (a classifier): the top-1 label after the pipeline's own
  softmax, labels and threshold, so with a threshold it is the flag that must agree;
- otherwise each published output: integer, boolean and string tensors exactly, floating
  point ones within ``atol + rtol * |serving value|`` (the update's golden set tolerances
  when it carries one, else those a golden set has by default), and per-reading maps (a
  ZipMap) by their top key.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from agent.config.schema import Postprocess
from agent.errors import PayloadError
from agent.inference import postprocess
from agent.inference.golden import DEFAULT_ATOL, DEFAULT_RTOL
from agent.inference.runplan import split_output


@dataclass(frozen=True)
class BatchAgreement:
    """One batch compared: readings, how many disagree, and the largest absolute difference
    between two float outputs."""

    readings: int
    disagreeing: int
    max_abs_err: float


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
        max_abs_err = 0.0
        for index in range(size):
            agree, err = self._reading(served, candidate, index, size)
            disagreeing += not agree
            max_abs_err = max(max_abs_err, err)
        return BatchAgreement(size, disagreeing, max_abs_err)

    def _stacked_tensors(
        self, served: Mapping[str, Any], candidate: Mapping[str, Any], size: int
    ) -> BatchAgreement | None:
        """The batch compared at once when every published output is a tensor of the same
        shape with the batch first in both; None when not (then reading by reading)."""
        differs = np.zeros(size, dtype=bool)
        max_abs_err = 0.0
        for name in self.published:
            ours, theirs = served.get(name), candidate.get(name)
            if not (isinstance(ours, np.ndarray) and isinstance(theirs, np.ndarray)):
                return None
            if ours.shape != theirs.shape or ours.ndim == 0 or ours.shape[0] != size:
                return None
            mismatch, err = self._tensors(ours, theirs, size)
            differs |= mismatch
            max_abs_err = max(max_abs_err, err)
        return BatchAgreement(size, int(differs.sum()), max_abs_err)

    def _tensors(self, ours: np.ndarray, theirs: np.ndarray, size: int) -> tuple[np.ndarray, float]:
        """Two arrays of one shape, ``size`` items first: which items differ (numbers
        exactly unless both are floating point, then within the tolerances; NaN never
        is), and the largest absolute difference (infinite when one is not finite)."""
        if ours.dtype.kind not in "fc" or theirs.dtype.kind not in "fc" or ours.size == 0:
            return np.not_equal(ours, theirs).reshape(size, -1).any(axis=1), 0.0
        wide = ours.astype(np.float64, copy=False)
        diff = np.abs(theirs.astype(np.float64, copy=False) - wide)
        within = np.less_equal(diff, self.atol + self.rtol * np.abs(wide))
        err = float(diff.max()) if np.isfinite(diff).all() else math.inf
        return np.logical_not(within.reshape(size, -1).all(axis=1)), err

    def _reading(
        self, served: Mapping[str, Any], candidate: Mapping[str, Any], index: int, size: int
    ) -> tuple[bool, float]:
        agree = True
        max_err = 0.0
        for name in self.published:
            if name not in candidate:
                return False, max_err
            ours = split_output(served[name], index, size, self.stacked)
            theirs = split_output(candidate[name], index, size, self.stacked)
            same, err = self._values(ours, theirs)
            agree = agree and same
            max_err = max(max_err, err)
        if self.postprocess is not None:
            # The classifier's verdict, not its raw scores, is what must agree.
            source = self.postprocess.output or self.published[0]
            top1 = self._top1(
                split_output(served[source], index, size, self.stacked),
                split_output(candidate[source], index, size, self.stacked),
            )
            agree = agree if top1 is None else top1
        return agree, max_err

    def _values(self, ours: Any, theirs: Any) -> tuple[bool, float]:
        if isinstance(ours, dict) and isinstance(theirs, dict):
            return _maps(ours, theirs)
        try:
            left = np.asarray(ours)
            right = np.asarray(theirs)
        except (TypeError, ValueError):
            return False, 0.0
        if left.shape != right.shape:
            return False, 0.0
        mismatch, err = self._tensors(left[None], right[None], 1)
        return not mismatch[0], err

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


def _maps(ours: dict[Any, Any], theirs: dict[Any, Any]) -> tuple[bool, float]:
    """One reading's class -> score map (ZipMap): the top class must agree."""
    if not ours or set(ours) != set(theirs):
        return False, 0.0
    try:
        err = max(abs(float(ours[key]) - float(theirs[key])) for key in ours)
    except (TypeError, ValueError):
        return False, 0.0
    top = max(ours, key=lambda key: ours[key])
    return top == max(theirs, key=lambda key: theirs[key]), err
