"""Work paho does for every incoming PUBLISH that is not needed when the packet carries no
MQTT 5 properties, which readings from sensors almost never do.

paho 2.2 decodes each MQTT 5 PUBLISH into a fresh ``Properties`` object, whose constructor
builds a table of every property name: measured, a tenth of the network loop's time at 500
readings/s. A PUBLISH whose property block is empty (its length byte is 0) gets one shared,
empty ``Properties`` here instead; every other packet goes through paho's own decoder. The
shared object is never written to: the agent only reads properties (response topic,
correlation data), and paho reads them too.

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

try:
    from paho.mqtt import _packet
except ImportError:  # paho before 2.2
    _packet = None  # type: ignore[assignment]

_EMPTY = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]


def install() -> None:
    """Wrap paho's PUBLISH decoder once per process (nothing on paho before 2.2)."""
    if _packet is None or getattr(_packet.decode_publish, "edge_agent_fast", False):
        return
    _packet.decode_publish = _fast(_packet.decode_publish)


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
    return decode_publish


def debug_enabled() -> bool:
    """Whether paho's debug lines would be logged at all (they are one call per packet)."""
    return logging.getLogger("paho.mqtt").isEnabledFor(logging.DEBUG)
