"""Work paho does for every incoming PUBLISH and PUBACK that is not needed when the packet
carries no MQTT 5 properties, which readings from sensors and a broker's acknowledgements
almost never do.

paho 2.2 decodes each MQTT 5 PUBLISH into a fresh ``Properties`` object, whose constructor
builds a table of every property name: measured, a tenth of the network loop's time at 500
readings/s. A PUBLISH whose property block is empty (its length byte is 0) gets one shared,
empty ``Properties`` here instead; every other packet goes through paho's own decoder. A
PUBACK of two bytes (a packet id and nothing else: success, MQTT 3.1.1 or 5) gets a shared
success reason code and empty properties: paho builds both for every PUBACK, in either
protocol, and at-least-once delivery receives one per result. The shared objects are never
written to: the agent only reads properties and reason codes, and paho reads them too.

paho 2.0 and 2.1 decode inside ``Client._handle_publish`` with no separate function, so there
the module is left as it is (``install`` does nothing).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from paho.mqtt.enums import MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

try:
    from paho.mqtt import _packet
except ImportError:  # paho before 2.2
    _packet = None  # type: ignore[assignment]

_EMPTY = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
_EMPTY_PUBACK = Properties(PacketTypes.PUBACK)  # type: ignore[no-untyped-call]
_PUBACK_SUCCESS = ReasonCode(PacketTypes.PUBACK)


def install() -> None:
    """Wrap paho's PUBLISH and PUBACK decoders once per process (nothing on paho before
    2.2)."""
    if _packet is None or getattr(_packet.decode_publish, "edge_agent_fast", False):
        return
    _packet.decode_publish = _fast(_packet.decode_publish)
    _packet.decode_puback = _fast_puback(_packet.decode_puback)


def _fast(original: Callable[..., Any]) -> Callable[..., Any]:
    def decode_publish(header: int, packet: bytes | bytearray, protocol: Any) -> Any:
        if protocol == MQTTProtocolVersion.MQTTv5 and len(packet) > 2:
            qos = (header & 0x06) >> 1
            topic_end = 2 + ((packet[0] << 8) | packet[1])
            properties_at = topic_end + (2 if qos else 0)
            if len(packet) > properties_at and packet[properties_at] == 0:
                return _packet.PublishPacket(
                    dup=bool(header & 0x08),
                    qos=qos,
                    retain=bool(header & 0x01),
                    topic=bytes(packet[2:topic_end]),
                    mid=int.from_bytes(packet[topic_end:properties_at], "big") if qos else 0,
                    properties=_EMPTY,
                    payload=bytes(packet[properties_at + 1 :]),
                )
        return original(header, packet, protocol)

    decode_publish.edge_agent_fast = True  # type: ignore[attr-defined]
    decode_publish.__wrapped__ = original  # type: ignore[attr-defined]
    return decode_publish


def _fast_puback(original: Callable[..., Any]) -> Callable[..., Any]:
    def decode_puback(header: int, packet: bytes | bytearray, protocol: Any) -> Any:
        if len(packet) == 2:
            return _packet.PubackPacket(
                mid=(packet[0] << 8) | packet[1], reason=_PUBACK_SUCCESS, properties=_EMPTY_PUBACK
            )
        return original(header, packet, protocol)

    decode_puback.__wrapped__ = original  # type: ignore[attr-defined]
    return decode_puback


def debug_enabled() -> bool:
    """Whether paho's debug lines would be logged at all (they are one call per packet)."""
    return logging.getLogger("paho.mqtt").isEnabledFor(logging.DEBUG)
