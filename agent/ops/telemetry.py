"""Health telemetry: the JSON on ``P/health``, built every ``health.interval_s``.

Everything is read from counters other threads own (ints, read atomically) and from /proc,
/sys and the disk; nothing here blocks serving.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent import __version__
from agent.hardware.detect import Hardware, read_temperatures
from agent.inference.pipeline import Pipeline
from agent.inference.registry import ModelRegistry

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


def rss_mb(pid: int | str = "self") -> float | None:
    """Resident memory of process ``pid`` (default: this one) in MB; None when unreadable."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        return None
    return None


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


def disk_free_mb(path: str) -> float | None:
    """Free space where ``path`` lives (its nearest existing ancestor)."""
    folder = Path(path)
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        return round(shutil.disk_usage(folder).free / 1024 / 1024, 1)
    except OSError:
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


@dataclass
class _Previous:
    """Counter values at the previous report, for per-interval rates."""

    when: float
    cpu_s: float
    processed: dict[str, int] = field(default_factory=dict)


class HealthReporter:
    """Builds health reports; called from one thread (the daemon's main loop)."""

    def __init__(self, view: AgentView) -> None:
        self._view = view
        self._started = time.monotonic()
        self._previous = _Previous(time.monotonic(), process_cpu_seconds())

    def update_view(self, view: AgentView) -> None:
        """Read from ``view`` from now on (config reloaded); uptime and rates carry on."""
        self._view = view

    def report(self) -> dict[str, Any]:
        """The health document for the interval since the previous call."""
        now = time.monotonic()
        elapsed = max(now - self._previous.when, 1e-6)
        cpu_s = process_cpu_seconds()
        pipelines = {}
        processed_now = {}
        view = self._view
        for name, pipeline in view.pipelines().items():
            counters = pipeline.counters
            processed_now[name] = counters.processed
            done = counters.processed - self._previous.processed.get(name, 0)
            pipelines[name] = {
                "model": pipeline.config.model,
                "received": counters.received,
                "processed": counters.processed,
                "dropped": counters.dropped,
                "errors": counters.errors,
                "queue_depth": pipeline.queue_depth,
                "latency_ms": pipeline.latency.take_interval().to_dict(),
                "throughput": round(max(done, 0) / elapsed, 2),
            }
        models = {}
        for name in view.registry.names():
            status = view.registry.status(name)
            models[name] = {
                "state": status.state.value,
                "version": status.version,
                "providers": list(status.providers),
                "degraded": status.degraded,
                "error": status.error,
            }
        document: dict[str, Any] = {
            "device_id": view.device_id,
            "ts": round(time.time(), 3),
            "interval_s": view.interval_s,
            "groups": list(view.groups),
            "uptime_s": round(now - self._started, 1),
            "agent_version": __version__,
            "hardware": view.hardware.summary(),
            "models": models,
            "pipelines": pipelines,
            "cpu_percent": round((cpu_s - self._previous.cpu_s) / elapsed * 100, 1),
            "rss_mb": rss_mb(),
            "temperatures_c": read_temperatures(view.hardware),
            "disk_free_mb": disk_free_mb(view.models_dir),
        }
        if view.delivery is not None:
            document["delivery"] = view.delivery()
        load = gpu_load_percent()
        if load is not None:
            document["gpu_load_percent"] = load
        self._previous = _Previous(now, cpu_s, processed_now)
        return document
