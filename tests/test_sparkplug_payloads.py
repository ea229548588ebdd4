"""Sparkplug B payloads, metrics and the session's numbering: pure logic, no broker."""

from __future__ import annotations

import math

import numpy as np
import pytest

from agent.config.schema import PipelineConfig
from agent.integrations.sparkplug.feed import DeviceFeed, Offered
from agent.integrations.sparkplug.payloads import (
    REBIRTH,
    DataType,
    MetricValue,
    asks_rebirth,
    coerce,
    decode,
    encode,
    value_of,
)
from agent.integrations.sparkplug.result_metrics import (
    MAX_ELEMENTS,
    Metrics,
    device_id,
    node_metrics,
    result_metrics,
)
from agent.integrations.sparkplug.session import EdgeSession, Message, NodeTopics, death_payload

PIPELINE = {
    "model": "m",
    "input": {"topic": "sensors/+/x"},
    "output": {"topic": "results/{1}"},
}


def test_the_wire_format_is_the_specifications() -> None:
    """Field numbers and wire types as Sparkplug B fixes them (Payload: timestamp 1,
    metrics 2, seq 3; Metric: name 1, alias 2, datatype 4, double_value 13), byte for byte."""
    data = encode([MetricValue(DataType.DOUBLE, 1.5, name="a", alias=2)], timestamp_ms=1, seq=3)
    metric = bytes.fromhex("0a0161" + "1002" + "200a" + "69" + "000000000000f83f")
    assert data == bytes.fromhex("0801") + b"\x12" + bytes([len(metric)]) + metric + b"\x18\x03"


def test_values_round_trip_with_their_types() -> None:
    """Int64 travels as two's complement in the uint64 field and comes back negative; a
    null is is_null with no value; NDEATH carries no seq."""
    data = encode(
        [
            MetricValue(DataType.INT64, -5, name="i", alias=1),
            MetricValue(DataType.STRING, "x", name="s", alias=2),
            MetricValue(DataType.BOOLEAN, True, name="b", alias=3),
            MetricValue(DataType.DOUBLE, None, name="n", alias=4, historical=True),
        ],
        timestamp_ms=1000,
        seq=0,
    )
    payload = decode(data)
    assert [value_of(m) for m in payload.metrics] == [-5, "x", True, None]
    assert payload.metrics[3].is_null
    assert payload.metrics[3].is_historical
    death = decode(death_payload(7, 1))
    assert not death.HasField("seq")
    assert value_of(death.metrics[0]) == 7
    assert death.metrics[0].datatype == DataType.INT64


def test_coerce_keeps_the_declared_type_or_gives_null() -> None:
    """A metric keeps the datatype its birth declared: what cannot be that type is null."""
    assert coerce(DataType.DOUBLE, 2) == 2.0
    assert coerce(DataType.DOUBLE, math.nan) is None
    assert coerce(DataType.DOUBLE, "3") is None
    assert coerce(DataType.INT64, 2**70) is None
    assert coerce(DataType.UINT64, -1) is None
    assert coerce(DataType.STRING, 5) == "5"
    assert coerce(DataType.BOOLEAN, "yes") is None
    assert coerce(DataType.INT64, None) is None


def test_rebirth_requests_and_garbage() -> None:
    """Only ``Node Control/Rebirth`` = true by name is a rebirth request; bytes that are
    not a payload raise ValueError."""
    ask = encode([MetricValue(DataType.BOOLEAN, True, name=REBIRTH)], timestamp_ms=1, seq=None)
    no = encode([MetricValue(DataType.BOOLEAN, False, name=REBIRTH)], timestamp_ms=1, seq=None)
    assert asks_rebirth(decode(ask))
    assert not asks_rebirth(decode(no))
    with pytest.raises(ValueError, match="not a Sparkplug B payload"):
        decode(b"\xff\xff\xff")


def test_seq_wraps_from_255_to_0_and_nbirth_starts_at_0() -> None:
    """One counter per edge node: NBIRTH 0, then +1 per message, 255 -> 0."""
    session = EdgeSession(NodeTopics("g", "n"))
    birth = decode(session.node_birth(0, {"x": (DataType.INT64, 0)}, 1).payload)
    assert birth.seq == 0
    seqs = []
    for value in range(1, 301):
        message = session.node_data({"x": (DataType.INT64, value)}, 1)
        assert message is not None
        seqs.append(decode(message.payload).seq)
    assert seqs[:3] == [1, 2, 3]
    assert seqs[254:257] == [255, 0, 1]
    assert session.node_data({"x": (DataType.INT64, 300)}, 1) is None  # nothing changed


def test_a_new_device_or_metric_waits_for_a_birth_sequence() -> None:
    """A device's first result declares it (no DDATA yet); once born, DDATA carries only
    what changed, by alias; a metric its birth did not declare sends it back to birth."""
    session = EdgeSession(NodeTopics("g", "n"))
    session.node_birth(0, {}, 1)
    first: Metrics = {"Id": (DataType.STRING, "1"), "Outputs/y": (DataType.DOUBLE, 0.5)}
    assert session.device_data("p:s1", "p", first, taken_ms=1, now_ms=1) is None
    assert session.needs_birth("p:s1")
    dbirth = decode(session.device_birth("p:s1", 2).payload)
    assert {m.name: value_of(m) for m in dbirth.metrics} == {"Id": "1", "Outputs/y": 0.5}
    second: Metrics = {"Id": (DataType.STRING, "2"), "Outputs/y": (DataType.DOUBLE, 0.5)}
    message = session.device_data("p:s1", "p", second, taken_ms=3, now_ms=3)
    assert message is not None
    ddata = decode(message.payload)
    assert [(m.name, value_of(m)) for m in ddata.metrics] == [("", "2")]
    assert ddata.metrics[0].alias == dbirth.metrics[0].alias
    wider: Metrics = {**second, "Label": (DataType.STRING, "ok")}
    assert session.device_data("p:s1", "p", wider, taken_ms=4, now_ms=4) is None
    assert session.needs_birth("p:s1")


def test_results_become_device_metrics() -> None:
    """Scalars and one-element outputs by name, tensors by flat index (capped), ZipMaps by
    key, the postprocess fields, and the JSON fields of the result."""
    result = {
        "id": 17,
        "seq": 4,
        "version": "sha256:ab",
        "latency_ms": 0.7,
        "outputs": {
            "score": np.array([[0.25]], dtype=np.float32),
            "label": np.array([2], dtype=np.int64),
            "probabilities": [{"ok": 0.9, "bad": 0.1}],
            "embedding": np.zeros(100, dtype=np.float32),
        },
        "label": "bad",
        "score": 0.9,
        "labels": ["bad", "ok"],
        "scores": [0.9, 0.1],
    }
    metrics = result_metrics(result)
    assert metrics["Id"] == (DataType.STRING, "17")
    assert metrics["Outputs/score"] == (DataType.DOUBLE, 0.25)
    assert metrics["Outputs/label"] == (DataType.INT64, 2)
    assert metrics["Outputs/probabilities/bad"] == (DataType.DOUBLE, 0.1)
    assert f"Outputs/embedding/{MAX_ELEMENTS - 1}" in metrics
    assert f"Outputs/embedding/{MAX_ELEMENTS}" not in metrics
    assert metrics["Top/1/Label"] == (DataType.STRING, "ok")
    assert metrics["Score"] == (DataType.DOUBLE, 0.9)


def test_device_ids_come_from_the_wildcards() -> None:
    """The pipeline, then each wildcard's match; a multi-level match keeps no slash."""
    assert device_id("vib", "sensors/+/vib", "sensors/pump1/vib") == "vib:pump1"
    assert device_id("vib", "plant/+/+/#", "plant/a/b/c/d") == "vib:a:b:c:d"
    assert device_id("vib", "sensors/pump1/vib", "sensors/pump1/vib") == "vib"


def test_node_metrics_are_named_by_the_config_and_null_until_reported() -> None:
    """The set of names depends on the models and pipelines only; values from health."""
    before = node_metrics(["m"], ["p"], None)
    after = node_metrics(
        ["m"],
        ["p"],
        {
            "models": {"m": {"state": "READY", "degraded": False}},
            "pipelines": {"p": {"throughput": 5.0, "latency_ms": {"p95": 1.0}}},
            "temperatures_c": {"a": 40.0, "b": 45.5},
            "delivery": {"outbox": {"depth": 3}},
        },
    )
    assert set(before) == set(after)
    assert before["Models/m/State"] == (DataType.STRING, None)
    assert after["Models/m/State"] == (DataType.STRING, "READY")
    assert after["Health/Temperature C"] == (DataType.DOUBLE, 45.5)
    assert after["Health/Outbox Depth"] == (DataType.INT64, 3)
    assert after["Pipelines/p/Latency p95 ms"] == (DataType.DOUBLE, 1.0)


def test_the_device_bound_and_the_wait_for_a_birth_sequence() -> None:
    """Beyond max_devices a new stream's results are refused and counted; results of a
    device waiting for its birth sequence are held and sent, by alias, after it."""
    session = EdgeSession(NodeTopics("g", "n"))
    session.node_birth(0, {}, 1)
    sent: list[Message] = []
    feed = DeviceFeed(session, sent.append, max_devices=1, max_held=10)
    pipelines = {"p": PipelineConfig.model_validate(PIPELINE)}

    def offered(sensor: str, reading_id: int) -> Offered:
        result = {"id": reading_id, "ts": 1.0, "outputs": {"y": [1.0]}}
        return Offered("p", f"sensors/{sensor}/x", result, late=False)

    feed.send(offered("s1", 1), pipelines)
    assert feed.birth_due is not None
    feed.send(offered("s1", 2), pipelines)
    feed.send(offered("s2", 3), pipelines)
    assert feed.refused == 1
    assert sent == []
    session.node_birth(0, {}, 2)
    sent.append(session.device_birth("p:s1", 2))
    feed.born(pipelines)
    assert feed.birth_due is None
    assert [m.topic for m in sent] == ["spBv1.0/g/DBIRTH/n/p:s1", "spBv1.0/g/DDATA/n/p:s1"]
    assert value_of(decode(sent[1].payload).metrics[0]) == "2"
