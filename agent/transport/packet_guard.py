"""A paho client that never holds more than a bounded slice of one incoming packet in memory.

paho reads a whole packet into memory before handing it on, and asks the socket for the
whole remaining length in one ``recv``: a 64 MB message cost 180-240 MB of RSS before any
size check of ours could run. MQTT 5's Maximum Packet Size (sent in CONNECT) makes a
conforming broker drop such messages for this client; MQTT 3.1.1 has no such field, and a
broker may ignore it. So this client reads in bounded slices, and for a PUBLISH over the
limit keeps only the head (topic, packet id, properties) and discards the rest as it arrives.
The message is then handed on with an empty payload and flagged (``too_large``): the
connection reports and acknowledges it instead of routing it, so a QoS 1 message is not sent
again after every reconnect.

This leans on two private parts of paho (``_sock_recv`` and ``_handle_publish``, and the
``_in_packet`` dict they share), the same from paho 2.0 to 2.2; tests exercise it against a
real broker on every supported version.
"""

from __future__ import annotations

from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import MQTTErrorCode

RECV_SLICE = 64 * 1024  # bytes asked of the socket at a time
HEAD_BYTES = 2 + 65_535 + 2 + 16 * 1024  # topic length, topic, packet id, some properties


class BoundedClient(paho.Client):
    """``paho.Client`` with a ceiling on incoming packets (``max_packet_bytes``)."""

    def __init__(self, *args: Any, max_packet_bytes: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.max_packet_bytes = max_packet_bytes
        # Set on paho's network thread while it hands on an oversized PUBLISH (QoS 0 and 1
        # are handed on from inside _handle_publish): (topic, size).
        self.too_large: tuple[str, int] | None = None
        self.discarded = 0  # oversized packets skipped since start (paho's thread writes)
        # QoS 2 messages are handed on later, at PUBREL: their ids and sizes wait here.
        self._too_large_qos2: dict[int, int] = {}

    def oversized(self, message: paho.MQTTMessage) -> int | None:
        """The size of ``message``'s packet when it was too large (its payload was dropped),
        else None. Call it from on_message, on paho's thread."""
        if self.too_large is not None:
            return self.too_large[1]
        if message.qos == 2:
            return self._too_large_qos2.pop(message.mid, None)
        return None

    def _sock_recv(self, bufsize: int) -> bytes:
        packet = self._in_packet
        if packet["have_remaining"] and packet["remaining_length"] > self.max_packet_bytes:
            # The body of an oversized packet: drop what paho buffered beyond the head
            # before it appends the next slice.
            del packet["packet"][HEAD_BYTES:]
        return super()._sock_recv(min(bufsize, RECV_SLICE))

    def _handle_publish(self) -> MQTTErrorCode:
        size = int(self._in_packet["remaining_length"])
        if size <= self.max_packet_bytes:
            return super()._handle_publish()
        self.discarded += 1
        head = self._in_packet["packet"]
        qos = (self._in_packet["command"] & 0x06) >> 1
        topic_length = int.from_bytes(head[:2], "big")
        topic_end = 2 + topic_length
        # Everything after the topic and packet id goes, properties included (MQTT 5): an
        # empty property block (one zero byte) keeps the packet well-formed for paho.
        keep = topic_end + (2 if qos else 0)
        del head[keep:]
        if self._protocol == paho.MQTTv5:
            head.append(0)
        topic = bytes(head[2:topic_end]).decode("utf-8", "replace")
        if qos == 2:
            mid = int.from_bytes(head[topic_end : topic_end + 2], "big")
            self._too_large_qos2[mid] = size
            return super()._handle_publish()
        self.too_large = (topic, size)
        try:
            return super()._handle_publish()
        finally:
            self.too_large = None
