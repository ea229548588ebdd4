"""Optional Prometheus endpoint (``metrics.listen``) with the figures of the health report.

Uses the official client library, imported only when the endpoint is enabled (its import
adds about 1.2 MB of RSS, measured by ``scripts/rss_imports.py``). Values are collected at
scrape time from the counters the pipelines, the model registry and the outbox keep anyway,
so serving pays nothing per reading for metrics: each scrape reads one ``HealthSnapshot``,
the same reading the ``P/health`` document is made of.

Names follow the Prometheus conventions (checked with ``promtool check metrics`` in the
tests): base units in the name (``_seconds``, ``_bytes``, ``_celsius``), ``_total`` on
counters, enum-like states as one 0/1 series per state. ``docs/grafana-dashboard.json``
queries these names; a rename breaks it and its test.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

import structlog

from agent.inference.model_status import ModelState
from agent.ops.telemetry import AgentView, HealthSnapshot, read_snapshot

if TYPE_CHECKING:
    from prometheus_client.core import Metric

log = structlog.get_logger(__name__)

MIB = 1024 * 1024
# A Prometheus histogram with the ~200 buckets of LatencyHistogram is heavy to store and
# query; every 8th bound (x2 steps, 18 us .. 10 min) keeps percentiles within a factor 2.
LATENCY_BUCKET_STRIDE = 8

# Per-pipeline counters: PipelineCounters attribute -> (metric name, help text).
READING_COUNTERS = {
    "received": (
        "edge_agent_readings_received_total",
        "Readings received from the pipeline's input topic.",
    ),
    "processed": ("edge_agent_readings_processed_total", "Readings answered with a result."),
    "dropped": (
        "edge_agent_readings_dropped_total",
        "Readings dropped unprocessed because the pipeline's queue was full "
        "(the oldest waiting one goes).",
    ),
    "errors": (
        "edge_agent_readings_errors_total",
        "Readings answered with an error instead of a result (rejected + failed).",
    ),
    "rejected": (
        "edge_agent_readings_rejected_total",
        "Readings refused on arrival: payload not decodable, not fitting the "
        "model input or too large, or the model not serving.",
    ),
    "failed": (
        "edge_agent_readings_failed_total",
        "Readings whose inference or result step failed.",
    ),
}


class MetricsServer:
    """An HTTP server on ``listen`` (HOST:PORT) serving /metrics."""

    def __init__(self, listen: str, view: AgentView) -> None:
        self._listen = listen
        self._view = view
        self._server: Any = None

    def start(self) -> None:
        """Start serving (a daemon thread of the client library)."""
        # Imported here: only deployments that enable metrics pay for the library.
        import prometheus_client  # noqa: PLC0415

        host, _, port = self._listen.rpartition(":")
        registry = prometheus_client.CollectorRegistry()
        registry.register(_Collector(self._view))
        self._server, _ = prometheus_client.start_http_server(
            int(port), host.strip("[]"), registry=registry
        )
        log.info("metrics_listening", address=self._listen)

    def stop(self) -> None:
        """Stop serving."""
        if self._server is not None:
            self._server.shutdown()
            self._server = None


class _Collector:
    """Reads the daemon's counters when Prometheus scrapes (on the HTTP server's thread)."""

    def __init__(self, view: AgentView) -> None:
        self._view = view

    def collect(self) -> Iterator[Metric]:
        """Yield the metric families (called by the client library on each scrape)."""
        yield from snapshot_metrics(read_snapshot(self._view, take_interval=False))


def snapshot_metrics(snapshot: HealthSnapshot) -> Iterator[Metric]:
    """The metric families of ``snapshot``.

    Every family is yielded every time, also when it has no samples (no thermal zone, no
    model configured), so that the endpoint always declares the same names."""
    yield from _info(snapshot)
    yield from _pipelines(snapshot)
    yield from _models(snapshot)
    yield from _delivery(snapshot)
    yield from _process(snapshot)
    yield from _device_families(snapshot)


def _info(snapshot: HealthSnapshot) -> Iterator[Metric]:
    from prometheus_client.core import GaugeMetricFamily  # noqa: PLC0415

    # The info-metric pattern: labels that describe the target, value always 1, so that
    # dashboards can pick a device by its id rather than by its scrape address.
    info = GaugeMetricFamily(
        "edge_agent_info",
        "The agent's device id and version; always 1.",
        labels=["device_id", "version"],
    )
    info.add_metric([snapshot.device_id, snapshot.agent_version], 1.0)
    yield info


def _pipelines(snapshot: HealthSnapshot) -> Iterator[Metric]:
    from prometheus_client.core import (  # noqa: PLC0415
        CounterMetricFamily,
        GaugeMetricFamily,
        HistogramMetricFamily,
    )

    pipelines = snapshot.pipelines
    for key, (name, help_text) in READING_COUNTERS.items():
        family = CounterMetricFamily(name, help_text, labels=["pipeline"])
        for pipeline_name, pipeline in pipelines.items():
            family.add_metric([pipeline_name], getattr(pipeline, key))
        yield family
    depth = GaugeMetricFamily(
        "edge_agent_queue_depth",
        "Readings waiting in the pipeline's queue for inference.",
        labels=["pipeline"],
    )
    latency = HistogramMetricFamily(
        "edge_agent_latency_seconds",
        "Time from receiving a reading to publishing its result.",
        labels=["pipeline"],
    )
    for pipeline_name, pipeline in pipelines.items():
        depth.add_metric([pipeline_name], pipeline.queue_depth)
        kept = [
            (f"{bound / 1000:.6g}", cumulative)
            for index, (bound, cumulative) in enumerate(pipeline.latency_buckets)
            if index % LATENCY_BUCKET_STRIDE == LATENCY_BUCKET_STRIDE - 1
        ]
        latency.add_metric(
            [pipeline_name],
            [*kept, ("+Inf", pipeline.latency_count)],
            pipeline.latency_sum_ms / 1000,
        )
    yield depth
    yield latency
    yield from _drift(snapshot)


def _drift(snapshot: HealthSnapshot) -> Iterator[Metric]:
    """The pipelines with drift settings: the latest window's score and the flag."""
    from prometheus_client.core import GaugeMetricFamily  # noqa: PLC0415

    score = GaugeMetricFamily(
        "edge_agent_drift_score",
        "The latest window's population stability index of the pipeline's worst feature "
        "against its drift reference.",
        labels=["pipeline"],
    )
    flagged = GaugeMetricFamily(
        "edge_agent_drift_flagged",
        "1 while the pipeline's readings have drifted (the score over its threshold for "
        "drift.windows windows in a row).",
        labels=["pipeline"],
    )
    for pipeline_name, pipeline in snapshot.pipelines.items():
        drift = pipeline.drift
        if drift is None:
            continue
        if drift.score is not None:
            score.add_metric([pipeline_name], drift.score)
        flagged.add_metric([pipeline_name], 1.0 if drift.flagged else 0.0)
    yield score
    yield flagged


def _models(snapshot: HealthSnapshot) -> Iterator[Metric]:
    from prometheus_client.core import GaugeMetricFamily  # noqa: PLC0415

    state = GaugeMetricFamily(
        "edge_agent_model_state",
        f"1 for the model's current state ({', '.join(ModelState)}), 0 for the others.",
        labels=["model", "state"],
    )
    ready = GaugeMetricFamily(
        "edge_agent_model_ready",
        "1 when the model serves, 0 otherwise.",
        labels=["model", "version"],
    )
    degraded = GaugeMetricFamily(
        "edge_agent_model_degraded",
        "1 when some requested execution providers did not load for the model.",
        labels=["model"],
    )
    for name, model in snapshot.models.items():
        for candidate in ModelState:
            state.add_metric([name, candidate.value], 1.0 if model.state is candidate else 0.0)
        ready.add_metric(
            [name, model.version or ""], 1.0 if model.state is ModelState.READY else 0.0
        )
        degraded.add_metric([name], 1.0 if model.degraded else 0.0)
    yield state
    yield ready
    yield degraded


def _delivery(snapshot: HealthSnapshot) -> Iterator[Metric]:
    from prometheus_client.core import (  # noqa: PLC0415
        CounterMetricFamily,
        GaugeMetricFamily,
    )

    report: Mapping[str, Any] = snapshot.delivery or {}
    connected = GaugeMetricFamily(
        "edge_agent_broker_connected",
        "1 while the MQTT connection is up: local (readings) and, when configured, "
        "upstream (results, telemetry).",
        labels=["connection"],
    )
    for connection, up in report.get("connected", {}).items():
        connected.add_metric([connection], 1.0 if up else 0.0)
    yield connected
    outbox: Mapping[str, Any] = report.get("outbox") or {}
    families = (
        (
            GaugeMetricFamily,
            "edge_agent_outbox_depth",
            "depth",
            "Results stored in the outbox, waiting to be published.",
        ),
        (
            GaugeMetricFamily,
            "edge_agent_outbox_bytes",
            "bytes",
            "Bytes of the results stored in the outbox.",
        ),
        (
            CounterMetricFamily,
            "edge_agent_outbox_dropped_total",
            "dropped",
            "Results dropped from the outbox because it reached outbox.max_mb.",
        ),
        (
            CounterMetricFamily,
            "edge_agent_outbox_expired_total",
            "expired",
            "Results dropped from the outbox because they outlived outbox.max_age_s.",
        ),
    )
    for family_type, name, key, help_text in families:
        family = family_type(name, help_text)
        if key in outbox:
            family.add_metric([], float(outbox[key]))
        yield family
    age = GaugeMetricFamily(
        "edge_agent_outbox_oldest_age_seconds",
        "Age of the oldest result in the outbox; 0 when it is empty.",
    )
    if outbox:
        # 0 rather than no sample when empty: an alert on "age > X" then sees a value.
        age.add_metric([], float(outbox.get("oldest_age_s") or 0.0))
    yield age


def _process(snapshot: HealthSnapshot) -> Iterator[Metric]:
    from prometheus_client.core import (  # noqa: PLC0415
        CounterMetricFamily,
        GaugeMetricFamily,
    )

    yield CounterMetricFamily(
        "edge_agent_cpu_seconds_total",
        "User and system CPU time of the agent process.",
        value=snapshot.cpu_s,
    )
    memory = GaugeMetricFamily(
        "edge_agent_resident_memory_bytes", "Resident memory (RSS) of the agent process."
    )
    if snapshot.rss_mb is not None:  # no sample rather than a false 0 when /proc is unreadable
        memory.add_metric([], snapshot.rss_mb * MIB)
    yield memory
    temperature = GaugeMetricFamily(
        "edge_agent_temperature_celsius",
        "Temperature of each thermal zone of the device.",
        labels=["zone"],
    )
    for zone, celsius in snapshot.temperatures_c.items():
        temperature.add_metric([zone], celsius)
    yield temperature
    disk = GaugeMetricFamily(
        "edge_agent_models_disk_free_bytes",
        "Free disk space on the file system holding models_dir.",
    )
    if snapshot.disk_free_mb is not None:
        disk.add_metric([], snapshot.disk_free_mb * MIB)
    yield disk


def _device_families(snapshot: HealthSnapshot) -> Iterator[Metric]:
    """Signs of trouble (agent.hardware.condition): active warnings, clocks, free space."""
    from prometheus_client.core import GaugeMetricFamily  # noqa: PLC0415

    device = snapshot.device
    warnings = GaugeMetricFamily(
        "edge_agent_device_warning",
        "1 for each active device warning (under-voltage, throttling, storage wear, low "
        "space); see the health document's warnings for the words.",
        labels=["code"],
    )
    clock = GaugeMetricFamily(
        "edge_agent_cpu_frequency_hertz",
        "CPU 0's current clock, and its maximum (kind=max).",
        labels=["kind"],
    )
    free = GaugeMetricFamily(
        "edge_agent_folder_free_bytes",
        "Free space on the file system holding each of the agent's folders.",
        labels=["folder"],
    )
    if device is not None:
        for warning in device.warnings():
            warnings.add_metric([warning.code], 1)
        for kind, mhz in (("current", device.cpu_mhz), ("max", device.cpu_max_mhz)):
            if mhz is not None:
                clock.add_metric([kind], mhz * 1_000_000)
        for folder, mb in device.free_mb.items():
            if mb is not None:
                free.add_metric([folder], mb * MIB)
    yield warnings
    yield clock
    yield free
