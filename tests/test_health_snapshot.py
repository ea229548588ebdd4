"""One HealthSnapshot feeds both the P/health document and the Prometheus metrics: for a
snapshot built by hand, the two say the same (no broker, no daemon)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import Metric

from agent.inference.latency import BOUNDS_MS, LatencySummary
from agent.inference.model_status import ModelState
from agent.ops.metrics import MIB, snapshot_metrics
from agent.ops.telemetry import Baseline, HealthSnapshot, ModelFigures, PipelineFigures

Samples = dict[str, dict[tuple[tuple[str, str], ...], float]]


def figures(model: str, processed: int, *, interval: bool = True) -> PipelineFigures:
    """A pipeline's figures with ``processed`` readings, all in the first bucket."""
    return PipelineFigures(
        model=model,
        received=processed + 5,
        processed=processed,
        dropped=2,
        rejected=2,
        failed=1,
        queue_depth=3,
        latency_buckets=tuple((bound, processed) for bound in BOUNDS_MS),
        latency_count=processed,
        latency_sum_ms=processed * 0.01,
        latency_interval=LatencySummary(processed, 0.01, 0.01, 0.01) if interval else None,
    )


def build_snapshot(*, interval: bool = True) -> HealthSnapshot:
    return HealthSnapshot(
        device_id="dev1",
        agent_version="1.2.3",
        groups=("line-a",),
        interval_s=10.0,
        hardware="board, x86_64, 4 cores",
        taken_at=110.0,
        ts=1700000000.12345,
        pipelines={
            "good": figures("lin", 20, interval=interval),
            "busy": figures("slow", 7, interval=interval),
        },
        models={
            "lin": ModelFigures(
                ModelState.READY, "sha256:ab", ("CPUExecutionProvider",), False, None
            ),
            "slow": ModelFigures(ModelState.FAILED, None, (), True, "not an ONNX model"),
        },
        cpu_s=12.5,
        rss_mb=80.5,
        temperatures_c={"cpu": 51.0, "gpu": 48.5},
        disk_free_mb=1024.0,
        delivery={
            "connected": {"local": True, "upstream": False},
            "outbox": {"depth": 4, "bytes": 400, "dropped": 1, "expired": 0, "oldest_age_s": 2.5},
        },
    )


def samples(families: Iterator[Metric]) -> Samples:
    """Sample name -> labels -> value."""
    found: Samples = {}
    for family in families:
        found.setdefault(family.name, {})  # a family without samples is still declared
        for sample in family.samples:
            found.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return found


def test_the_document_keeps_its_keys_and_order() -> None:
    """The P/health document's fields, in their order, with the snapshot's values."""
    document = build_snapshot().to_document(Baseline(100.0, 12.0, {"good": 10}), started=50.0)
    assert list(document) == [
        "device_id",
        "ts",
        "interval_s",
        "groups",
        "uptime_s",
        "agent_version",
        "hardware",
        "models",
        "pipelines",
        "cpu_percent",
        "rss_mb",
        "temperatures_c",
        "disk_free_mb",
        "delivery",
    ]
    assert document["ts"] == 1700000000.123
    assert document["uptime_s"] == 60.0
    assert document["cpu_percent"] == 5.0  # 0.5 CPU s in 10 s
    assert document["groups"] == ["line-a"]
    good = document["pipelines"]["good"]
    assert list(good) == [
        "model",
        "received",
        "processed",
        "dropped",
        "errors",
        "queue_depth",
        "latency_ms",
        "throughput",
    ]
    assert good["throughput"] == 1.0  # 10 more processed in 10 s
    assert document["pipelines"]["busy"]["throughput"] == 0.7  # new since the baseline
    assert good["latency_ms"] == {"p50": 0.01, "p95": 0.01, "p99": 0.01}
    assert document["models"]["lin"] == {
        "state": "READY",
        "version": "sha256:ab",
        "providers": ["CPUExecutionProvider"],
        "degraded": False,
        "error": None,
    }


def test_optional_fields_appear_only_when_read() -> None:
    """No delivery report and no GPU load: neither key; a GPU load: it comes last."""
    base = build_snapshot()
    bare = replace(base, delivery=None)
    assert "delivery" not in bare.to_document(Baseline(100.0, 12.0), started=50.0)
    with_gpu = replace(base, gpu_load_percent=42.0)
    document = with_gpu.to_document(Baseline(100.0, 12.0), started=50.0)
    assert list(document)[-1] == "gpu_load_percent"
    assert document["gpu_load_percent"] == 42.0


def test_the_document_and_the_metrics_agree() -> None:
    """Every figure both forms carry has the same value in each."""
    snapshot = build_snapshot()
    document = snapshot.to_document(snapshot.baseline(), started=50.0)
    metrics = samples(snapshot_metrics(snapshot))

    assert metrics["edge_agent_info"] == {
        (("device_id", document["device_id"]), ("version", document["agent_version"])): 1.0
    }
    for name, entry in document["pipelines"].items():
        label = (("pipeline", name),)
        for key in ("received", "processed", "dropped", "errors"):
            assert metrics[f"edge_agent_readings_{key}_total"][label] == entry[key]
        assert metrics["edge_agent_queue_depth"][label] == entry["queue_depth"]
        figures = snapshot.pipelines[name]
        assert metrics["edge_agent_readings_rejected_total"][label] == figures.rejected
        assert metrics["edge_agent_readings_failed_total"][label] == figures.failed
        assert metrics["edge_agent_latency_seconds_count"][label] == figures.latency_count
        assert metrics["edge_agent_latency_seconds_sum"][label] == figures.latency_sum_ms / 1000
    for name, entry in document["models"].items():
        for state in ModelState:
            value = metrics["edge_agent_model_state"][(("model", name), ("state", state.value))]
            assert value == (1.0 if entry["state"] == state.value else 0.0)
        ready = {
            (("model", name), ("version", entry["version"] or "")): float(entry["state"] == "READY")
        }
        assert {
            k: v for k, v in metrics["edge_agent_model_ready"].items() if k[0][1] == name
        } == ready
        assert metrics["edge_agent_model_degraded"][(("model", name),)] == float(entry["degraded"])
    for connection, up in document["delivery"]["connected"].items():
        assert metrics["edge_agent_broker_connected"][(("connection", connection),)] == float(up)
    outbox = document["delivery"]["outbox"]
    assert metrics["edge_agent_outbox_depth"][()] == outbox["depth"]
    assert metrics["edge_agent_outbox_bytes"][()] == outbox["bytes"]
    assert metrics["edge_agent_outbox_dropped_total"][()] == outbox["dropped"]
    assert metrics["edge_agent_outbox_expired_total"][()] == outbox["expired"]
    assert metrics["edge_agent_outbox_oldest_age_seconds"][()] == outbox["oldest_age_s"]
    assert metrics["edge_agent_cpu_seconds_total"][()] == snapshot.cpu_s
    assert metrics["edge_agent_resident_memory_bytes"][()] == document["rss_mb"] * MIB
    assert metrics["edge_agent_models_disk_free_bytes"][()] == document["disk_free_mb"] * MIB
    assert {
        dict(labels)["zone"]: value
        for labels, value in metrics["edge_agent_temperature_celsius"].items()
    } == document["temperatures_c"]


def test_the_exposition_declares_every_family() -> None:
    """Rendered as Prometheus text, with unreadable figures as families without samples."""
    base = build_snapshot()
    blind = replace(base, rss_mb=None, disk_free_mb=None, temperatures_c={})

    class Fixed:
        def collect(self) -> Iterator[Metric]:
            return snapshot_metrics(blind)

    registry = CollectorRegistry()
    registry.register(Fixed())
    text = generate_latest(registry).decode()
    assert 'edge_agent_readings_processed_total{pipeline="good"} 20.0' in text
    assert (
        "# HELP edge_agent_model_state 1 for the model's current state (LOADING, READY, FAILED)"
        in text
    )
    for name in (
        "edge_agent_resident_memory_bytes",
        "edge_agent_models_disk_free_bytes",
        "edge_agent_temperature_celsius",
    ):
        assert f"# TYPE {name} gauge" in text
        assert f"\n{name} " not in text
        assert f"\n{name}{{" not in text


def test_a_scrape_reading_leaves_the_interval_alone() -> None:
    """A snapshot read without taking the latency interval has no percentiles for it, and
    its metrics still carry the cumulative histogram."""
    snapshot = build_snapshot(interval=False)
    document = snapshot.to_document(snapshot.baseline(), started=50.0)
    assert document["pipelines"]["good"]["latency_ms"] == {"p50": None, "p95": None, "p99": None}
    metrics = samples(snapshot_metrics(snapshot))
    assert metrics["edge_agent_latency_seconds_count"][(("pipeline", "good"),)] == 20
