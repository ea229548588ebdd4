"""Run a golden set through a session and judge its outputs: the on-device check of a model.

One run per sample, as a reading would come: inputs with a batch axis get a batch of one,
the others (a stream's state, a constant) their sample's value. The same code checks an
update in its trial, a model dropped into ``models_dir`` beside its golden set, and the
``edge-agent model`` commands, so an operator sees on the bench what the device will decide.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from agent.errors import GoldenMismatchError, first_line
from agent.inference.codecs import TensorSpec
from agent.inference.golden import Comparison, GoldenSet, Tolerances, compare

Feeds = dict[str, np.ndarray]
# Runs each feed dict once, in order; returns each run's outputs and its seconds. A run that
# onnxruntime refuses raises ``SampleRunError``; anything else (a deadline) propagates.
RunMany = Callable[[Sequence[Feeds]], list[tuple[list[Any], float]]]


class SampleRunError(Exception):
    """onnxruntime failed to run a golden sample (a bad shape, a kernel error)."""


def timed_runs(run: Callable[[Feeds], list[Any]]) -> RunMany:
    """A ``RunMany`` from a plain ``session.run(None, feeds)``-like callable."""

    def run_many(feeds: Sequence[Feeds]) -> list[tuple[list[Any], float]]:
        results = []
        for one in feeds:
            started = time.perf_counter()
            try:
                outputs = run(one)
            except Exception as exc:  # onnxruntime's own exception types
                raise SampleRunError(first_line(exc)) from exc
            results.append((outputs, time.perf_counter() - started))
        return results

    return run_many


@dataclass(frozen=True)
class ValidationReport:
    """A golden set's verdict on one model with the providers it serves with."""

    comparison: Comparison
    tolerances: Tolerances
    latency_p50_ms: float | None
    latency_p99_ms: float | None
    providers: tuple[str, ...]

    @property
    def passed(self) -> bool:
        """Whether the model may serve as far as its golden set is concerned."""
        return self.comparison.passed

    def reason(self) -> str:
        """What went wrong, for a FAILED status and the log (empty when it passed)."""
        problems = self.comparison.problems
        if not problems:
            return ""
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        return f"golden set check failed: {problems[0]}{more}"

    def to_dict(self) -> dict[str, Any]:
        """The ``validation`` of a SUCCEEDED status and of ``P/models/NAME``: the contract's
        figures, then ``rtol``, ``atol`` (and ``min_top1_agreement``), ``passed`` and, when
        it failed, ``problems``."""
        comparison = self.comparison
        document: dict[str, Any] = {
            "samples": comparison.samples,
            "max_abs_err": json_number(comparison.max_abs_err),
            "max_rel_err": json_number(comparison.max_rel_err),
        }
        if comparison.top1_agreement is not None:
            document["top1_agreement"] = round(comparison.top1_agreement, 6)
        document["latency_ms"] = {
            "p50": _rounded(self.latency_p50_ms),
            "p99": _rounded(self.latency_p99_ms),
        }
        document["providers"] = list(self.providers)
        # The thresholds after the figures; the top-1 threshold under a name of its own, so
        # it never stands in for the measured top1_agreement.
        document["rtol"] = self.tolerances.rtol
        document["atol"] = self.tolerances.atol
        if self.tolerances.top1_agreement is not None:
            document["min_top1_agreement"] = self.tolerances.top1_agreement
        document["passed"] = self.passed
        if not self.passed:
            document["problems"] = list(comparison.problems)
        return document


def sample_feeds(golden: GoldenSet, specs: Sequence[TensorSpec]) -> tuple[list[Feeds], list[str]]:
    """One feed dict per sample, and the problems that stop the set from being run at all
    (an input the set lacks or has too many of, a dtype it cannot be converted to)."""
    problems: list[str] = []
    names = [spec.name for spec in specs]
    for spec in specs:
        if spec.name not in golden.inputs:
            problems.append(
                f"the golden set has no input:{spec.name} (the model takes {', '.join(names)})"
            )
    for name in golden.inputs:
        if name not in names:
            problems.append(
                f"the golden set feeds input {name!r}, which the model lacks (it takes "
                f"{', '.join(names)})"
            )
    if problems:
        return [], problems
    columns: dict[str, np.ndarray] = {}
    for spec in specs:
        values = golden.inputs[spec.name]
        if values.dtype.kind != spec.dtype.kind and not (
            values.dtype.kind in "iu" and spec.dtype.kind in "iuf"
        ):
            problems.append(f"input:{spec.name} holds {values.dtype}, the model takes {spec.dtype}")
            continue
        columns[spec.name] = values.astype(spec.dtype, copy=False)
    if problems:
        return [], problems
    feeds: list[Feeds] = []
    by_name = {spec.name: spec for spec in specs}
    for index in range(golden.samples):
        # ``asarray`` rather than ``ascontiguousarray``: the latter makes a scalar sample (an
        # unbatched 0-d input, a Loop's count) one-dimensional, which the model refuses.
        feeds.append(
            {
                name: np.asarray(
                    column[index : index + 1] if by_name[name].batched else column[index],
                    order="C",
                )
                for name, column in columns.items()
            }
        )
    return feeds, []


def validate(
    golden: GoldenSet,
    specs: Sequence[TensorSpec],
    outputs: Sequence[str],
    providers: Sequence[str],
    run_many: RunMany,
) -> ValidationReport:
    """Run every sample through ``run_many`` and compare with the expected outputs."""
    feeds, problems = sample_feeds(golden, specs)
    latencies: list[float] = []
    comparison: Comparison
    if problems:
        comparison = _failed(golden, problems)
    else:
        try:
            results = run_many(feeds)
        except SampleRunError as exc:
            comparison = _failed(golden, [f"running the golden samples failed: {exc}"])
        else:
            latencies = [seconds * 1000 for _, seconds in results]
            actual, problems = _stack_outputs(golden, outputs, [r for r, _ in results])
            comparison = _failed(golden, problems) if problems else compare(golden, actual)
    return ValidationReport(
        comparison=comparison,
        tolerances=golden.tolerances,
        latency_p50_ms=float(np.percentile(latencies, 50)) if latencies else None,
        latency_p99_ms=float(np.percentile(latencies, 99)) if latencies else None,
        providers=tuple(providers),
    )


def require_pass(report: ValidationReport) -> ValidationReport:
    """``report`` when it passed; else ``GoldenMismatchError`` carrying it."""
    if not report.passed:
        raise GoldenMismatchError(report.reason(), report)
    return report


def as_array(value: Any) -> np.ndarray:
    """An output as an array: a ZipMap classifier's list of {class: probability} dicts
    becomes rows of probabilities in class order."""
    if isinstance(value, list) and value and isinstance(value[0], Mapping):
        keys = sorted(value[0])
        return np.array([[row[key] for key in keys] for row in value], dtype=np.float64)
    return np.asarray(value)


def stack_runs(per_run: Sequence[np.ndarray]) -> np.ndarray:
    """Outputs of one run per sample as one array, one row per sample: batch-of-one results
    are joined along their batch axis, unbatched ones stacked."""
    if all(array.ndim >= 1 and array.shape[0] == 1 for array in per_run):
        return np.concatenate(per_run, axis=0)
    return np.stack(per_run)


def _stack_outputs(
    golden: GoldenSet, outputs: Sequence[str], runs: Sequence[list[Any]]
) -> tuple[dict[str, np.ndarray], list[str]]:
    """Each expected output of every run, aligned to the expected array's shape."""
    stacked: dict[str, np.ndarray] = {}
    problems: list[str] = []
    for name, expected in golden.expected.items():
        if name not in outputs:
            problems.append(
                f"the model has no output {name!r} (it gives {', '.join(outputs) or 'none'})"
            )
            continue
        position = list(outputs).index(name)
        rows = []
        for index, run in enumerate(runs):
            value = as_array(run[position])
            row_shape = expected.shape[1:]
            if value.shape == row_shape:
                rows.append(value)
            elif value.shape == (1, *row_shape):
                rows.append(value[0])
            else:
                problems.append(
                    f"output {name!r} of sample {index} has shape {list(value.shape)}, the "
                    f"golden set expects {list(row_shape)} per sample"
                )
                break
        else:
            stacked[name] = np.stack(rows)
    return stacked, problems


def _failed(golden: GoldenSet, problems: list[str]) -> Comparison:
    return Comparison(
        samples=golden.samples,
        max_abs_err=float("nan"),
        max_rel_err=float("nan"),
        top1_agreement=None,
        problems=tuple(problems),
    )


def json_number(value: float) -> float | None:
    """JSON has no NaN or infinity: an error that could not be measured is null."""
    return float(f"{value:.6g}") if np.isfinite(value) else None


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 4)
