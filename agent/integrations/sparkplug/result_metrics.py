"""What a result and a health report look like as Sparkplug metrics.

A result becomes the metrics of the Sparkplug device of its stream; the health document
becomes the edge node's own metrics. Pure: the edge node's thread calls these.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from agent import topics
from agent.integrations.sparkplug.payloads import DataType, Value, coerce

# Elements of one output published as metrics; a wider output (an embedding, an image) is
# cut here, the result topic carries all of it.
MAX_ELEMENTS = 64

Metrics = dict[str, tuple[DataType, Value]]


def device_id(pipeline: str, input_filter: str, topic: str) -> str:
    """The Sparkplug device a reading's results belong to: the pipeline, then each wildcard
    match of its input topic (``vibration:pump1`` for ``sensors/+/vib``), joined by ``:``.
    A ``#`` match's ``/`` becomes ``:`` too: Sparkplug IDs must not hold ``/ + #``, and an
    MQTT topic level cannot hold ``+`` or ``#``."""
    values = topics.wildcard_values(input_filter, topic)
    return ":".join([pipeline, *(value.replace("/", ":") for value in values)])


def result_metrics(result: Mapping[str, Any]) -> Metrics:
    """The device metrics of one result (its JSON fields, model outputs flattened)."""
    reading_id = result.get("id")
    metrics: Metrics = {
        "Id": (DataType.STRING, None if reading_id is None else str(reading_id)),
        "Seq": (DataType.INT64, coerce(DataType.INT64, result.get("seq"))),
        "Model Version": (DataType.STRING, coerce(DataType.STRING, result.get("version"))),
        "Latency ms": (DataType.DOUBLE, coerce(DataType.DOUBLE, result.get("latency_ms"))),
    }
    outputs = result.get("outputs")
    if isinstance(outputs, Mapping):
        for name, value in outputs.items():
            metrics.update(_output_metrics(f"Outputs/{name}", value))
    if "label" in result:
        metrics["Label"] = (DataType.STRING, coerce(DataType.STRING, result["label"]))
    if "score" in result:
        metrics["Score"] = (DataType.DOUBLE, coerce(DataType.DOUBLE, result["score"]))
    for index, label in enumerate(_listed(result.get("labels"))):
        metrics[f"Top/{index}/Label"] = (DataType.STRING, coerce(DataType.STRING, label))
    for index, score in enumerate(_listed(result.get("scores"))):
        metrics[f"Top/{index}/Score"] = (DataType.DOUBLE, coerce(DataType.DOUBLE, score))
    return metrics


def _listed(value: object) -> list[object]:
    return list(value)[:MAX_ELEMENTS] if isinstance(value, list | tuple) else []


def _output_metrics(prefix: str, value: object) -> Metrics:
    """One output: a single value as ``prefix``, a tensor as ``prefix/0``, ``prefix/1``...
    (flattened, at most MAX_ELEMENTS), a map (scikit-learn's ZipMap) as ``prefix/KEY``."""
    if isinstance(value, list | tuple) and len(value) == 1 and isinstance(value[0], Mapping):
        value = value[0]
    if isinstance(value, Mapping):
        return {
            f"{prefix}/{key}": (DataType.DOUBLE, coerce(DataType.DOUBLE, item))
            for key, item in list(value.items())[:MAX_ELEMENTS]
        }
    array = np.asarray(value)
    datatype = _datatype_of(array.dtype)
    flat = array.reshape(-1)[:MAX_ELEMENTS].tolist()
    if array.size == 1:
        return {prefix: (datatype, coerce(datatype, flat[0]))}
    return {f"{prefix}/{i}": (datatype, coerce(datatype, item)) for i, item in enumerate(flat)}


def _datatype_of(dtype: np.dtype[Any]) -> DataType:
    if dtype.kind == "b":
        return DataType.BOOLEAN
    if dtype.kind in "iu":
        return DataType.INT64
    if dtype.kind == "f":
        return DataType.DOUBLE
    return DataType.STRING


def node_metrics(
    models: Iterable[str],
    pipelines: Iterable[str],
    health: Mapping[str, Any] | None,
    drifting: Iterable[str] = (),
) -> Metrics:
    """The edge node's metrics: the agent, each model and pipeline of the config, and the
    health figures; ``drifting``: the pipelines with drift settings. The names come from
    the config, so the set (which an NBIRTH must declare whole) changes only on a reload;
    values are null until the first health report."""
    report: Mapping[str, Any] = health or {}
    reported_models = _section(report, "models")
    reported_pipelines = _section(report, "pipelines")
    temperatures = _section(report, "temperatures_c")
    outbox = _section(_section(report, "delivery"), "outbox")
    warnings = report.get("warnings")
    metrics: Metrics = {
        "Properties/Agent Version": _string(report.get("agent_version")),
        "Properties/Hardware": _string(report.get("hardware")),
        "Health/Uptime s": _double(report.get("uptime_s")),
        "Health/CPU Percent": _double(report.get("cpu_percent")),
        "Health/RSS MB": _double(report.get("rss_mb")),
        "Health/Temperature C": _double(max(temperatures.values(), default=None)),
        "Health/Disk Free MB": _double(report.get("disk_free_mb")),
        "Health/Outbox Depth": (DataType.INT64, coerce(DataType.INT64, outbox.get("depth"))),
        "Health/Warnings": _string(
            ",".join(str(w.get("code")) for w in warnings if isinstance(w, Mapping))
            if isinstance(warnings, list)
            else None
        ),
    }
    for name in models:
        model = _section(reported_models, name)
        metrics[f"Models/{name}/State"] = _string(model.get("state"))
        metrics[f"Models/{name}/Version"] = _string(model.get("version"))
        metrics[f"Models/{name}/Degraded"] = (
            DataType.BOOLEAN,
            coerce(DataType.BOOLEAN, model.get("degraded")),
        )
    for name in pipelines:
        pipeline = _section(reported_pipelines, name)
        latency = _section(pipeline, "latency_ms")
        metrics[f"Pipelines/{name}/Throughput"] = _double(pipeline.get("throughput"))
        metrics[f"Pipelines/{name}/Latency p95 ms"] = _double(latency.get("p95"))
        for key, label in (
            ("received", "Received"),
            ("processed", "Processed"),
            ("dropped", "Dropped"),
            ("errors", "Errors"),
            ("queue_depth", "Queue Depth"),
        ):
            metrics[f"Pipelines/{name}/{label}"] = (
                DataType.INT64,
                coerce(DataType.INT64, pipeline.get(key)),
            )
    for name in drifting:
        drift = _section(_section(reported_pipelines, name), "drift")
        metrics[f"Pipelines/{name}/Drift Score"] = _double(drift.get("score"))
        metrics[f"Pipelines/{name}/Drift Flagged"] = (
            DataType.BOOLEAN,
            coerce(DataType.BOOLEAN, drift.get("flagged")),
        )
    return metrics


def _section(document: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    value = document.get(key)
    return value if isinstance(value, Mapping) else {}


def _string(value: object) -> tuple[DataType, Value]:
    return DataType.STRING, coerce(DataType.STRING, value)


def _double(value: object) -> tuple[DataType, Value]:
    return DataType.DOUBLE, coerce(DataType.DOUBLE, value)
