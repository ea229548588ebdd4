"""The receiving path of a connection: each arriving message to its handlers, then settled.

A message too large to read (its payload was never buffered, see ``packet_guard``) is not
routed: it is reported to the subscriptions it matches and acknowledged.
"""

from __future__ import annotations

from typing import Any

import paho.mqtt.client as paho
import structlog

from agent.transport.acks import ManualAcks
from agent.transport.packet_guard import BoundedClient
from agent.transport.subscriptions import Subscriptions


class Inbound:
    """paho's ``on_message`` for one connection; everything here runs on paho's thread.

    An exception escaping a handler would kill paho's thread: each is caught and logged.
    """

    def __init__(
        self,
        client: BoundedClient,
        subscriptions: Subscriptions,
        acks: ManualAcks,
        log: structlog.stdlib.BoundLogger,
    ) -> None:
        self._client = client
        self._subscriptions = subscriptions
        self._acks = acks
        self._log = log

    def on_message(self, client: paho.Client, userdata: Any, message: paho.MQTTMessage) -> None:
        """paho's callback: route ``message``, then acknowledge it unless a handler will."""
        size = self._client.oversized(message)
        if size is not None:
            self._too_large(message, size)
            return
        topic = message.topic
        handlers, acknowledged_by_handler = self._subscriptions.route(topic)
        for handler in handlers:
            try:
                handler(message)
            except Exception:
                self._log.exception("message_handler_failed", topic=topic)
        self._acks.handled(message, acknowledged_by_handler)

    def _too_large(self, message: paho.MQTTMessage, size: int) -> None:
        """A message over ``max_packet_bytes``: its payload was never kept. Tell the
        subscriptions it matches, then acknowledge it: it would only come again."""
        try:
            topic = message.topic
        except UnicodeDecodeError:
            topic = "<topic not UTF-8>"
        discarded = self._client.discarded
        if discarded <= 10 or discarded % 100 == 0:  # a flood must not flood the log too
            self._log.warning(
                "mqtt_message_too_large",
                topic=topic,
                bytes=size,
                limit=self._client.max_packet_bytes,
                discarded=discarded,
                hint="mqtt.max_packet_bytes; the broker's max_packet_size / "
                "message_size_limit stops such messages earlier",
            )
        for subscription in self._subscriptions.matching(topic):
            if subscription.on_too_large is None:
                continue
            try:
                subscription.on_too_large(topic, size)
            except Exception:
                self._log.exception("message_handler_failed", topic=topic)
        self._acks.discarded(message)
