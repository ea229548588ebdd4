"""``edge-agent model bench``: latency, throughput and memory per batch size on this device.

The model is first loaded once by the daemon's own code (``common.open_model``), which
checks that it loads and says which providers did and where its nodes ran. Then, per batch
size, a fresh session is built with the daemon's session options and providers
(``session_options(plan)``, ``plan.for_session()``): its first run is the cold latency a
reload costs, the runs after it for ``seconds`` give p50/p99 and throughput, and the
resident memory before the session and after its runs is what it added. The sessions are
built one after another in one process, so memory an earlier one freed may be reused: a
later batch size can show less than it would alone.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from agent.config.schema import AgentConfig
from agent.errors import ModelLoadError, first_line
from agent.hardware.detect import Hardware, detect
from agent.hardware.providers import ProviderPlan
from agent.inference.codecs import TensorSpec
from agent.inference.golden import GoldenSet, read_golden_file
from agent.inference.session import SessionFactory, session_options
from agent.modeltools.check import (
    engine_build_note,
    engine_build_summary,
    file_version,
    loaded_summary,
    model_summary,
    plan_summary,
    session_summary,
)
from agent.modeltools.common import (
    as_model,
    golden_feeds,
    open_model,
    synthetic_feeds,
)
from agent.procfs import rss_mb

PROGRESS_INTERVAL_S = 0.1
# Timed runs per batch size. Their times go into one array allocated (and its pages
# touched) before any session: a Python list of a million floats would itself add some
# 30 MB to the RSS the sessions are charged with.
MAX_RUNS = 1_000_000

# ``progress`` gets a one-line summary of the batch size being measured, at most every
# PROGRESS_INTERVAL_S; ``notice`` gets a warning for the operator (a TensorRT build).
Progress = Callable[[str], None]
Notice = Callable[[str], None]
Feeds = dict[str, np.ndarray]


@dataclass(frozen=True)
class BenchRequest:
    """What ``model bench`` was asked: the file, batch sizes, measuring seconds per batch
    size, providers (None: the config's), and a golden set to take the inputs from."""

    model_file: Path
    batches: tuple[int, ...]
    seconds: float
    providers: tuple[str, ...] | None = None
    golden_file: Path | None = None


def bench_model(
    config: AgentConfig,
    request: BenchRequest,
    *,
    hardware: Hardware | None = None,
    progress: Progress | None = None,
    notice: Notice | None = None,
) -> dict[str, Any]:
    """The ``model bench`` report: one result per batch size. Raises ``ModelLoadError``
    when the model does not load, ``GoldenSetError`` when the golden set is unusable."""
    hardware = hardware or detect()
    tool = as_model(config, request.model_file, None, request.providers)
    # The pipelines do not matter here: the model's own speed does.
    tool = replace(tool, config=tool.config.model_copy(update={"pipelines": {}}))
    version, size = file_version(tool.path)
    plan = SessionFactory(hardware).plan(tool.config, tool.name, version)
    engine = engine_build_summary(plan)
    if notice is not None and engine["first_build"]:
        notice(engine_build_note(engine["cache"]))
    golden = read_golden_file(request.golden_file) if request.golden_file else None
    try:
        opened = open_model(tool, hardware)
    except ModelLoadError as exc:
        raise ModelLoadError(f"{tool.path} does not load: {exc}") from exc
    model = opened.model
    specs = model.inputs
    providers = plan_summary(plan, from_command_line=bool(request.providers))
    providers.update(loaded_summary(model))
    placement = model.placement.to_dict() if model.placement is not None else None
    del opened, model  # its session must not count in the first batch size's memory
    gc.collect()
    try:
        data = tool.path.read_bytes()
    except OSError as exc:
        raise ModelLoadError(f"cannot read {tool.path}: {exc.strerror}") from exc
    times = np.full(MAX_RUNS, np.nan)  # written now, so its pages are resident before
    results = []
    for batch in request.batches:
        feeds = _feeds(specs, batch, golden)
        results.append(
            _bench_one(
                data,
                plan,
                specs=specs,
                batch=batch,
                feeds=feeds,
                seconds=request.seconds,
                progress=progress,
                times=times,
            )
        )
    return {
        "model": model_summary(tool, version, size),
        "providers": providers,
        "session": session_summary(plan),
        "placement": placement,
        "engine_build": engine,
        "inputs": "golden" if golden is not None else "random",
        "seconds": request.seconds,
        "notes": _notes(specs, golden),
        "results": results,
    }


def _feeds(specs: Sequence[TensorSpec], batch: int, golden: GoldenSet | None) -> Feeds | None:
    """The inputs of a run of ``batch`` readings (None when the model cannot take them)."""
    if batch_problem(specs, batch) is not None:
        return None
    if golden is not None:
        return golden_feeds(golden, specs, batch)
    return synthetic_feeds(specs, batch, np.random.default_rng(0))


def batch_problem(specs: Sequence[TensorSpec], batch: int) -> str | None:
    """Why the model cannot run ``batch`` readings at once, or None."""
    if batch == 1:
        return None
    if not any(spec.batched for spec in specs):
        return "the model has no batch axis: it takes one reading per run"
    for spec in specs:
        if spec.batched and spec.max_batch is not None and batch > spec.max_batch:
            return f"input {spec.name!r} takes at most {spec.max_batch} reading(s) per run"
    return None


def _bench_one(
    data: bytes,
    plan: ProviderPlan,
    *,
    specs: Sequence[TensorSpec],
    batch: int,
    feeds: Feeds | None,
    seconds: float,
    progress: Progress | None,
    times: np.ndarray,
) -> dict[str, Any]:
    """One batch size on a fresh session: cold run, timed runs (their seconds written into
    ``times``), memory added."""
    result: dict[str, Any] = {
        "batch": batch,
        "load_ms": None,
        "cold_ms": None,
        "p50_ms": None,
        "p99_ms": None,
        "runs": 0,
        "throughput_per_s": None,
        "rss_added_mb": None,
    }
    if feeds is None:
        result["skipped"] = batch_problem(specs, batch)
        return result
    gc.collect()
    before = rss_mb()
    began = time.perf_counter()
    try:
        session = ort.InferenceSession(
            data, sess_options=session_options(plan), providers=plan.for_session()
        )
    except Exception as exc:  # onnxruntime's own exception types
        result["error"] = f"onnxruntime could not build the session: {first_line(exc)}"
        return result
    result["load_ms"] = _ms(time.perf_counter() - began)
    try:
        began = time.perf_counter()
        session.run(None, feeds)
        result["cold_ms"] = _ms(time.perf_counter() - began)
        runs, elapsed = _timed_runs(
            session, feeds, batch=batch, seconds=seconds, progress=progress, times=times
        )
    except Exception as exc:  # a kernel that refuses this batch size
        result["error"] = f"running a batch of {batch} failed: {first_line(exc)}"
        return result
    after = rss_mb()
    del session
    result.update(
        p50_ms=_percentile_ms(times[:runs], 50),
        p99_ms=_percentile_ms(times[:runs], 99),
        runs=runs,
        throughput_per_s=round(batch * runs / elapsed, 1) if elapsed > 0 else None,
        rss_added_mb=round(after - before, 1) if after is not None and before is not None else None,
    )
    return result


def _timed_runs(
    session: ort.InferenceSession,
    feeds: Feeds,
    *,
    batch: int,
    seconds: float,
    progress: Progress | None,
    times: np.ndarray,
) -> tuple[int, float]:
    """Run ``feeds`` again and again for ``seconds`` (at least once, at most ``len(times)``
    times), each run's seconds written into ``times``; the runs and the measuring time."""
    runs = 0
    began = time.perf_counter()
    report_at = began
    while True:
        start = time.perf_counter()
        session.run(None, feeds)
        end = time.perf_counter()
        times[runs] = end - start
        runs += 1
        if end - began >= seconds or runs >= len(times):
            break
        if progress is not None and end >= report_at:
            progress(f"batch {batch}: {runs} runs, {end - began:.1f} of {seconds:g} s")
            report_at = end + PROGRESS_INTERVAL_S
    return runs, time.perf_counter() - began


def _notes(specs: Sequence[TensorSpec], golden: GoldenSet | None) -> list[str]:
    """What the operator should know about the inputs the figures come from."""
    if golden is not None:
        return []
    return [
        f"input {spec.name!r} has dynamic axes {spec.describe_shape()}: the random inputs "
        "give them length 1; --golden times real shapes"
        for spec in specs
        if any(axis is None for axis in spec.item_shape)
    ]


def _percentile_ms(seconds: np.ndarray, percent: float) -> float:
    """As ``common.percentile_ms``, for an array of run times."""
    return round(float(np.percentile(seconds, percent)) * 1000, 4)


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 4)
