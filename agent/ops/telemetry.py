"""Health telemetry: the JSON on ``P/health``, built every ``health.interval_s``.

Everything is read from counters other threads own (ints, read atomically) and from /proc,
/sys and the disk; nothing here blocks serving. One reading of all that is a
``HealthSnapshot``: the JSON document and the Prometheus endpoint (``agent.ops.metrics``)
are both views of it, so a new health figure is read in one place.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from agent import __version__
from agent.hardware.condition import (
    DeviceCondition,
    NvmlReader,
    WarningTracker,
    read_condition,
)
from agent.hardware.detect import Hardware, read_temperatures
from agent.inference.drift import DriftState
from agent.inference.latency import LatencySummary
from agent.inference.model_status import ModelState
from agent.inference.pipeline import Pipeline
from agent.inference.registry import ModelRegistry
from agent.ops.heap import HeapTrimmer
from agent.procfs import rss_mb

log = structlog.get_logger(__name__)

# Where Jetson kernels expose the integrated GPU's load, in tenths of a percent.
JETSON_GPU_LOAD_FILES = (
    "/sys/devices/gpu.0/load",
    "/sys/devices/platform/gpu.0/load",
    "/sys/devices/platform/17000000.ga10b/load",  # Orin
    "/sys/devices/platform/17000000.gv11b/load",  # Xavier
    "/sys/devices/17000000.ga10b/load",
    "/sys/devices/17000000.gv11b/load",
)
CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def process_cpu_seconds(stat_file: Path = Path("/proc/self/stat")) -> float:
    """User + system CPU seconds of this process."""
    try:
        fields = stat_file.read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def gpu_load_percent(root: Path = Path("/")) -> float | None:
    """Jetson GPU load (0-100) where the kernel exposes it."""
    for name in JETSON_GPU_LOAD_FILES:
        try:
            text = (root / name.lstrip("/")).read_text().strip()
        except OSError:
            continue
        if text.isdigit():
            return int(text) / 10.0
    return None


@dataclass(frozen=True)
class AgentView:
    """What telemetry reads: the daemon's parts, by reference (pipelines can change)."""

    device_id: str
    hardware: Hardware
    registry: ModelRegistry
    pipelines: Callable[[], Mapping[str, Pipeline]]
    models_dir: str
    delivery: Callable[[], dict[str, Any]] | None = None
    # Copied into every report so that ``edge-agent status`` can filter by group and judge
    # staleness (a health older than a few intervals) without the device's config.
    groups: tuple[str, ...] = ()
    interval_s: float = 10.0
    # Where the update keys come from (a key set's version and expiry, or trusted_keys), so
    # a fleet operator sees which devices took a rotation or revocation.
    update_keys: Callable[[], dict[str, Any]] | None = None
    # Per model the highest update version accepted: what a rollout has reached.
    update_versions: Callable[[], dict[str, int]] | None = None
    state_dir: str | None = None  # its free space is reported beside models_dir's
    nvml: NvmlReader = field(default_factory=NvmlReader)


@dataclass(frozen=True)
class PipelineFigures:
    """One pipeline's counters, queue and latency at one reading."""

    model: str
    received: int
    processed: int
    dropped: int
    rejected: int
    failed: int
    queue_depth: int
    # Since start: (upper bound ms, cumulative count) per bucket, the count and the sum.
    latency_buckets: tuple[tuple[float, int], ...]
    latency_count: int
    latency_sum_ms: float
    # Since the previous health report; None in a reading that did not take the interval
    # (a scrape must not steal the health report's interval).
    latency_interval: LatencySummary | None = None
    drift: DriftState | None = None  # with drift settings only

    @property
    def errors(self) -> int:
        """Readings that got an error instead of a result."""
        return self.rejected + self.failed

    def to_dict(self, throughput: float) -> dict[str, Any]:
        """The pipeline's entry in the health document."""
        return {
            "model": self.model,
            "received": self.received,
            "processed": self.processed,
            "dropped": self.dropped,
            "errors": self.errors,
            "queue_depth": self.queue_depth,
            "latency_ms": (self.latency_interval or _NO_LATENCY).to_dict(),
            "throughput": throughput,
        } | ({"drift": self.drift.to_dict()} if self.drift is not None else {})


_NO_LATENCY = LatencySummary(0, None, None, None)


@dataclass(frozen=True)
class ModelFigures:
    """One model's published status at one reading."""

    state: ModelState
    version: str | None
    providers: tuple[str, ...]
    degraded: bool
    error: str | None

    def to_dict(self) -> dict[str, Any]:
        """The model's entry in the health document."""
        return {
            "state": self.state.value,
            "version": self.version,
            "providers": list(self.providers),
            "degraded": self.degraded,
            "error": self.error,
        }


@dataclass(frozen=True)
class Baseline:
    """Counter values at the previous health report, for per-interval rates."""

    when: float  # time.monotonic()
    cpu_s: float
    processed: Mapping[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class HealthSnapshot:
    """Every health figure of the agent at one reading (``read_snapshot``): the source of
    both the ``P/health`` document (``to_document``) and the Prometheus metrics."""

    device_id: str
    agent_version: str
    groups: tuple[str, ...]
    interval_s: float
    hardware: str  # Hardware.summary()
    taken_at: float  # time.monotonic()
    ts: float  # time.time()
    pipelines: Mapping[str, PipelineFigures]
    models: Mapping[str, ModelFigures]
    cpu_s: float
    rss_mb: float | None
    temperatures_c: Mapping[str, float]
    disk_free_mb: float | None
    delivery: Mapping[str, Any] | None = None
    gpu_load_percent: float | None = None
    update_keys: Mapping[str, Any] | None = None
    update_versions: Mapping[str, int] | None = None
    device: DeviceCondition | None = None

    def baseline(self) -> Baseline:
        """This reading as the start of the next report's interval."""
        return Baseline(
            self.taken_at, self.cpu_s, {name: p.processed for name, p in self.pipelines.items()}
        )

    def to_document(self, previous: Baseline, started: float) -> dict[str, Any]:
        """The health document: rates over the interval since ``previous``, uptime since
        ``started`` (both ``time.monotonic()``)."""
        elapsed = max(self.taken_at - previous.when, 1e-6)
        pipelines = {}
        for name, figures in self.pipelines.items():
            done = figures.processed - previous.processed.get(name, 0)
            pipelines[name] = figures.to_dict(throughput=round(max(done, 0) / elapsed, 2))
        document: dict[str, Any] = {
            "device_id": self.device_id,
            "ts": round(self.ts, 3),
            "interval_s": self.interval_s,
            "groups": list(self.groups),
            "uptime_s": round(self.taken_at - started, 1),
            "agent_version": self.agent_version,
            "hardware": self.hardware,
            "models": {name: figures.to_dict() for name, figures in self.models.items()},
            "pipelines": pipelines,
            "cpu_percent": round((self.cpu_s - previous.cpu_s) / elapsed * 100, 1),
            "rss_mb": self.rss_mb,
            "temperatures_c": dict(self.temperatures_c),
            "disk_free_mb": self.disk_free_mb,
        }
        if self.delivery is not None:
            document["delivery"] = dict(self.delivery)
        if self.gpu_load_percent is not None:
            document["gpu_load_percent"] = self.gpu_load_percent
        if self.update_keys is not None:
            document["update_keys"] = dict(self.update_keys)
        if self.update_versions is not None:
            document["update_versions"] = dict(self.update_versions)
        if self.device is not None:
            document["device"] = self.device.to_dict()
            document["warnings"] = [
                {"code": w.code, "message": w.message} for w in self.device.warnings()
            ]
        drifted = _drift_warnings(self.pipelines)
        if drifted:
            document["warnings"] = [*document.get("warnings", []), *drifted]
        return document


def _drift_warnings(pipelines: Mapping[str, PipelineFigures]) -> list[dict[str, str]]:
    """A warning per pipeline whose readings have drifted (``drift_<pipeline>``)."""
    found = []
    for name, figures in pipelines.items():
        drift = figures.drift
        if drift is None or not drift.flagged:
            continue
        worst = f"; worst: {', '.join(drift.worst)}" if drift.worst else ""
        found.append(
            {
                "code": f"drift_{name}",
                "message": f"pipeline {name}: the readings have drifted from its reference "
                f"(PSI {drift.score:.2f}){worst}",
            }
        )
    return found


def read_snapshot(view: AgentView, *, take_interval: bool) -> HealthSnapshot:
    """Read every health figure once. ``take_interval``: also take each pipeline's latency
    interval, which starts a new one (the health report's, never a scrape's)."""
    taken_at = time.monotonic()
    cpu_s = process_cpu_seconds()
    pipelines = {}
    # A copy: a scrape runs on the metrics thread while a reload changes the pipelines.
    for name, pipeline in dict(view.pipelines()).items():
        counters = pipeline.counters
        buckets, count, sum_ms = pipeline.latency.cumulative()
        pipelines[name] = PipelineFigures(
            model=pipeline.config.model,
            received=counters.received,
            processed=counters.processed,
            dropped=counters.dropped,
            rejected=counters.rejected,
            failed=counters.failed,
            queue_depth=pipeline.queue_depth,
            latency_buckets=tuple(buckets),
            latency_count=count,
            latency_sum_ms=sum_ms,
            latency_interval=pipeline.latency.take_interval() if take_interval else None,
            drift=pipeline.drift,
        )
    models = {}
    for name in view.registry.names():
        status = view.registry.status(name)
        models[name] = ModelFigures(
            state=status.state,
            version=status.version,
            providers=tuple(status.providers),
            degraded=status.degraded,
            error=status.error,
        )
    device = read_condition(view.hardware, folders_of(view), nvml=view.nvml)
    return HealthSnapshot(
        device_id=view.device_id,
        agent_version=__version__,
        groups=tuple(view.groups),
        interval_s=view.interval_s,
        hardware=view.hardware.summary(),
        taken_at=taken_at,
        ts=time.time(),
        pipelines=pipelines,
        models=models,
        cpu_s=cpu_s,
        rss_mb=rss_mb(),
        temperatures_c=read_temperatures(view.hardware),
        disk_free_mb=device.free_mb.get("models_dir"),  # read once, for both fields
        delivery=view.delivery() if view.delivery is not None else None,
        gpu_load_percent=gpu_load_percent(),
        update_keys=view.update_keys() if view.update_keys is not None else None,
        update_versions=view.update_versions() if view.update_versions is not None else None,
        device=device,
    )


def folders_of(view: AgentView) -> dict[str, str]:
    """The folders whose free space health reports."""
    folders = {"models_dir": view.models_dir}
    if view.state_dir is not None:
        folders = {"state_dir": view.state_dir, **folders}
    return folders


class HealthReporter:
    """Builds health reports; called from one thread (the daemon's main loop)."""

    def __init__(self, view: AgentView) -> None:
        self._view = view
        self._started = time.monotonic()
        self._previous = Baseline(time.monotonic(), process_cpu_seconds())
        self._warnings = WarningTracker()
        self._heap = HeapTrimmer(rss_mb)

    def update_view(self, view: AgentView) -> None:
        """Read from ``view`` from now on (config reloaded); uptime and rates carry on."""
        self._view = view

    def report(self) -> dict[str, Any]:
        """The health document for the interval since the previous call."""
        snapshot = read_snapshot(self._view, take_interval=True)
        document = snapshot.to_document(self._previous, self._started)
        self._previous = snapshot.baseline()
        if snapshot.device is not None:
            turned_on, cleared = self._warnings.update(snapshot.device.warnings())
            for warning in turned_on:
                log.warning("device_warning", code=warning.code, message=warning.message)
            for code in cleared:
                log.info("device_warning_cleared", code=code)
        self._heap.maybe_trim()  # after a burst: the freed pages back to the system
        return document
