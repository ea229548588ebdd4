"""agent.transport.paho_fast decodes the packets it takes over exactly as paho does."""

from __future__ import annotations

from typing import Any

import pytest
from paho.mqtt.enums import MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.transport import paho_fast

_packet = pytest.importorskip("paho.mqtt._packet", reason="paho 2.2 or later")

V5 = MQTTProtocolVersion.MQTTv5
V311 = MQTTProtocolVersion.MQTTv311


def publish_packet(topic: bytes, qos: int, payload: bytes, properties: bytes | None) -> bytes:
    """A PUBLISH's variable header and payload (what the decoder gets after the fixed
    header); ``properties`` None for MQTT 3.1.1."""
    body = len(topic).to_bytes(2, "big") + topic
    if qos:
        body += (4711).to_bytes(2, "big")
    if properties is not None:
        body += bytes([len(properties)]) + properties
    return body + payload


def fields(packet: Any) -> dict[str, Any]:
    """A decoded packet as plain values (Properties and ReasonCode compared by content)."""
    values: dict[str, Any] = packet._asdict()
    for key in ("properties", "reason"):
        if key in values:
            values[key] = str(values[key])
    return values


@pytest.mark.parametrize("qos", [0, 1])
@pytest.mark.parametrize(
    ("protocol", "properties"),
    [
        (V5, b""),
        (V5, b"\x08\x00\x03r/t"),  # a response topic: paho's own decoder
        (V311, None),
    ],
)
def test_publish_decodes_as_paho_does(qos: int, protocol: Any, properties: bytes | None) -> None:
    """With or without properties, QoS 0 or 1, both protocols: the same packet."""
    paho_fast.install()
    fast = _packet.decode_publish
    plain = fast.__wrapped__
    packet = publish_packet(b"sensors/a", qos, b'{"x": [1, 2]}', properties)
    header = 0x30 | (qos << 1)
    assert fields(fast(header, packet, protocol)) == fields(plain(header, packet, protocol))


@pytest.mark.parametrize(
    ("packet", "protocol"),
    [
        (b"\x12\x34", V5),
        (b"\x12\x34", V311),
        (b"\x12\x34\x10", V5),  # reason code 16: no matching subscribers
        (b"\x12\x34\x00\x05\x1f\x00\x02ok", V5),  # success with a reason string
    ],
)
def test_puback_decodes_as_paho_does(packet: bytes, protocol: Any) -> None:
    """A bare PUBACK (shared objects) and those with a reason code or properties (paho's
    decoder) decode alike."""
    paho_fast.install()
    fast = _packet.decode_puback
    plain = fast.__wrapped__
    assert fields(fast(0x40, packet, protocol)) == fields(plain(0x40, packet, protocol))
    assert fast(0x40, packet, protocol).mid == 0x1234


def test_shared_objects_stay_empty() -> None:
    """The shared success code and empty properties are what paho builds for them."""
    empty = Properties(PacketTypes.PUBACK)  # type: ignore[no-untyped-call]
    assert str(paho_fast._EMPTY_PUBACK) == str(empty)
    assert paho_fast._PUBACK_SUCCESS.value == 0
