"""Optional Prometheus endpoint (``metrics.listen``) with the figures of the health report.

Uses the official client library, imported only when the endpoint is enabled (it costs
~12 MB of RSS). Values are collected at scrape time from the counters the pipelines keep
anyway, so serving pays nothing per reading for metrics.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import structlog

from agent.hardware import read_temperatures
from agent.telemetry import AgentView, disk_free_mb, process_cpu_seconds, rss_mb

log = structlog.get_logger(__name__)


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
        self._server, _ = prometheus_client.start_http_server(int(port), host.strip("[]"),
                                                              registry=registry)
        log.info("metrics_listening", address=self._listen)

    def stop(self) -> None:
        """Stop serving."""
        if self._server is not None:
            self._server.shutdown()
            self._server = None


class _Collector:
    """Reads the daemon's counters when Prometheus scrapes."""

    def __init__(self, view: AgentView) -> None:
        self._view = view

    def collect(self) -> Iterator[Any]:
        """Yield the metric families (called by the client library on each scrape)."""
        from prometheus_client.core import (  # noqa: PLC0415
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
        )

        view = self._view
        counters = {
            "received": "Readings received",
            "processed": "Readings answered with a result",
            "dropped": "Readings dropped because the queue was full",
            "errors": "Readings answered with an error",
        }
        for key, help_text in counters.items():
            family = CounterMetricFamily(f"edge_agent_readings_{key}", help_text,
                                         labels=["pipeline"])
            for name, pipeline in view.pipelines().items():
                family.add_metric([name], getattr(pipeline.counters, key))
            yield family
        depth = GaugeMetricFamily("edge_agent_queue_depth", "Readings waiting for inference",
                                  labels=["pipeline"])
        latency = HistogramMetricFamily("edge_agent_latency_seconds",
                                        "Receive-to-publish latency", labels=["pipeline"])
        for name, pipeline in view.pipelines().items():
            depth.add_metric([name], pipeline.queue_depth)
            buckets, count, total_ms = pipeline.latency.cumulative()
            # A Prometheus histogram with ~200 buckets is heavy; keep every 8th (x2 steps).
            kept = [(f"{bound / 1000:.6g}", cumulative)
                    for index, (bound, cumulative) in enumerate(buckets) if index % 8 == 7]
            latency.add_metric([name], [*kept, ("+Inf", count)], total_ms / 1000)
        yield depth
        yield latency
        ready = GaugeMetricFamily("edge_agent_model_ready", "1 when the model serves",
                                  labels=["model", "version"])
        degraded = GaugeMetricFamily("edge_agent_model_degraded",
                                     "1 when requested execution providers did not load",
                                     labels=["model"])
        for name in view.registry.names():
            status = view.registry.status(name)
            ready.add_metric([name, status.version or ""],
                             1.0 if status.state.value == "READY" else 0.0)
            degraded.add_metric([name], 1.0 if status.degraded else 0.0)
        yield ready
        yield degraded
        yield CounterMetricFamily("edge_agent_cpu_seconds", "CPU time of the agent",
                                  value=process_cpu_seconds())
        yield GaugeMetricFamily("edge_agent_resident_memory_bytes", "RSS of the agent",
                                value=(rss_mb() or 0.0) * 1024 * 1024)
        temperature = GaugeMetricFamily("edge_agent_temperature_celsius",
                                        "Thermal zone temperatures", labels=["zone"])
        for zone, celsius in read_temperatures(view.hardware).items():
            temperature.add_metric([zone], celsius)
        yield temperature
        yield GaugeMetricFamily("edge_agent_models_disk_free_bytes",
                                "Free disk where models_dir lives",
                                value=(disk_free_mb(view.models_dir) or 0.0) * 1024 * 1024)
