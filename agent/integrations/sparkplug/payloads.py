"""Sparkplug B payloads: metric values to protobuf bytes, and the commands a host sends.

Pure functions over the generated ``sparkplug_b_pb2`` module; the edge node's session
(``session``) decides which metrics go into which message.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from enum import IntEnum

from google.protobuf.message import DecodeError

from agent.integrations.sparkplug.sparkplug_b_pb2 import Payload

REBIRTH = "Node Control/Rebirth"
BDSEQ = "bdSeq"

Value = bool | int | float | str | None


class DataType(IntEnum):
    """The Sparkplug datatypes this agent publishes (specification section 6.4.16)."""

    INT64 = 4
    UINT64 = 8
    DOUBLE = 10
    BOOLEAN = 11
    STRING = 12


@dataclass(frozen=True)
class MetricValue:
    """One metric in one message: ``name`` is sent only in births (DATA carries the alias)."""

    datatype: DataType
    value: Value
    name: str | None = None
    alias: int | None = None
    timestamp_ms: int | None = None
    historical: bool = False


def coerce(datatype: DataType, value: object) -> Value:
    """``value`` as ``datatype`` holds it, or None where it cannot be (a string where a
    number was declared, a NaN): a metric keeps the type its birth declared."""
    if value is None:
        return None
    if datatype is DataType.STRING:
        return value if isinstance(value, str) else str(value)
    if datatype is DataType.BOOLEAN:
        return bool(value) if isinstance(value, bool | int | float) else None
    if isinstance(value, str | bytes):
        return None
    try:
        number = float(value) if datatype is DataType.DOUBLE else int(value)  # type: ignore[call-overload, arg-type]
    except (TypeError, ValueError, OverflowError):
        return None
    return number if _in_range(datatype, number) else None


def _in_range(datatype: DataType, number: float) -> bool:
    if datatype is DataType.DOUBLE:
        return math.isfinite(number)
    low = 0 if datatype is DataType.UINT64 else -(2**63)
    return low <= number < 2**64


def encode(metrics: Iterable[MetricValue], *, timestamp_ms: int, seq: int | None) -> bytes:
    """A Sparkplug B payload holding ``metrics``; ``seq`` None for NDEATH, which has none."""
    payload = Payload(timestamp=timestamp_ms)
    if seq is not None:
        payload.seq = seq
    for metric in metrics:
        _add_metric(payload, metric)
    return payload.SerializeToString()


def _add_metric(payload: Payload, metric: MetricValue) -> None:
    entry = payload.metrics.add()
    if metric.name is not None:
        entry.name = metric.name
    if metric.alias is not None:
        entry.alias = metric.alias
    if metric.timestamp_ms is not None:
        entry.timestamp = metric.timestamp_ms
    entry.datatype = int(metric.datatype)
    if metric.historical:
        entry.is_historical = True
    value = metric.value
    if value is None:
        entry.is_null = True
    elif metric.datatype is DataType.STRING:
        entry.string_value = str(value)
    elif metric.datatype is DataType.BOOLEAN:
        entry.boolean_value = bool(value)
    elif metric.datatype is DataType.DOUBLE:
        entry.double_value = float(value)
    else:
        # Int64 travels in the uint64 field as two's complement (specification 6.4.16).
        entry.long_value = int(value) & 0xFFFF_FFFF_FFFF_FFFF


def decode(data: bytes | bytearray) -> Payload:
    """Parse a Sparkplug B payload; raises ValueError naming what is wrong."""
    payload = Payload()
    try:
        payload.ParseFromString(bytes(data))
    except (DecodeError, RuntimeError) as exc:
        raise ValueError(f"not a Sparkplug B payload: {exc}") from exc
    return payload


def asks_rebirth(payload: Payload) -> bool:
    """Whether an NCMD payload is a rebirth request: the metric ``Node Control/Rebirth``,
    by name (our NBIRTH gives it no alias, as the specification requires), set true."""
    return any(
        metric.name == REBIRTH
        and metric.WhichOneof("value") == "boolean_value"
        and metric.boolean_value
        for metric in payload.metrics
    )


def value_of(metric: Payload.Metric) -> Value:
    """A decoded metric's value in Python terms (Int64 sign restored); None when null."""
    if metric.is_null:
        return None
    kind = metric.WhichOneof("value")
    if kind is None:
        return None
    value = getattr(metric, kind)
    if kind == "long_value" and metric.datatype == DataType.INT64 and value >= 2**63:
        return int(value) - 2**64
    if isinstance(value, bool | int | float | str):
        return value
    return None
