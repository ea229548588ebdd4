"""Acknowledgements both ways, as bookkeeping that needs no broker.

``PublishAcks``: the broker acknowledging what we publish. Results are acknowledged to their
sensors only once the broker has them, so every publish waits here for its PUBACK.

``ManualAcks``: us acknowledging what the broker delivers. With manual acknowledgement a
QoS 1/2 reading is acknowledged only once its result is safely handed off (ack after result):
a crash before that makes the broker deliver it again.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable

import paho.mqtt.client as paho

Callback = Callable[[], None]
# Sends one acknowledgement: (mid, qos); paho's ``Client.ack``.
SendAck = Callable[[int, int], object]


class PublishAcks:
    """The QoS 1/2 messages handed to paho whose acknowledgement has not come yet.

    mid -> what to call when the broker acknowledged it. Every QoS 1/2 publish registers, so
    an acknowledgement that overtakes its registration (the network loop is faster than the
    publishing thread) is the only thing ``_early`` can hold, and the entries are exactly the
    messages the broker has not acknowledged yet (``unacked``, which a clean stop waits
    for). QoS 0 is not tracked: handed to paho is as far as it goes. Thread-safe; the lock is
    never held while calling paho or a callback.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._on_acked: dict[int, Callback | None] = {}
        self._early: set[int] = set()

    def track(self, rc: int, mid: int, qos: int, on_acked: Callback | None) -> None:
        """paho's answer (``rc``, ``mid``) to a publish at ``qos`` (on the publishing thread).
        QoS 0: ``on_acked()`` now when paho took it. QoS 1/2 queued (paho keeps them while
        disconnected too): registered; ``on_acked()`` here and now when the acknowledgement
        already overtook it."""
        if qos == 0:
            if rc == paho.MQTT_ERR_SUCCESS and on_acked is not None:
                on_acked()
            return
        if rc not in (paho.MQTT_ERR_SUCCESS, paho.MQTT_ERR_NO_CONN):
            return
        with self._lock:
            acked_already = mid in self._early
            if acked_already:
                self._early.discard(mid)
            else:
                self._on_acked[mid] = on_acked
        if acked_already and on_acked is not None:
            on_acked()

    def acknowledged(self, mid: int) -> tuple[bool, Callback | None]:
        """The broker acknowledged ``mid`` (on the network loop's thread): whether it was
        registered, and its callback for the caller to run. An unregistered mid is kept for
        the ``track`` that is still to come."""
        with self._lock:
            if mid not in self._on_acked:
                self._early.add(mid)
                return False, None
            return True, self._on_acked.pop(mid)

    def disconnected(self) -> None:
        """The connection dropped (on the network loop's thread): its early acknowledgements
        will never be registered. QoS 1/2 stay: paho sends them again after the reconnect."""
        with self._lock:
            self._early.clear()

    @property
    def unacked(self) -> int:
        """QoS 1/2 messages the broker has not acknowledged yet."""
        with self._lock:
            return len(self._on_acked)


class ManualAcks:
    """When and whether a delivered QoS 1/2 message is acknowledged to the broker.

    Disabled (``enabled`` False), paho acknowledges every message on arrival and this does
    nothing. ``send`` is called on paho's thread or, through a token, on any thread.
    """

    def __init__(self, enabled: bool, send: SendAck, is_connected: Callable[[], bool]) -> None:
        """``send(mid, qos)`` sends an acknowledgement; ``is_connected()`` tells whether the
        connection a token's message came on is up."""
        self.enabled = enabled
        self._send = send
        self._is_connected = is_connected
        # Incremented on every connect: an acknowledgement for a message of an earlier
        # connection is not sent (the broker redelivers that message instead).
        self.generation = 0

    def connected(self) -> None:
        """A connect succeeded (on paho's thread, before anything of it is delivered)."""
        self.generation += 1

    def token(self, message: paho.MQTTMessage) -> Callback | None:
        """A function that acknowledges ``message`` (call it once, from any thread, when the
        message's work is safely done); None when there is nothing to acknowledge (QoS 0,
        or acknowledged on arrival). Called on paho's thread."""
        if not self.enabled or message.qos == 0:
            return None
        mid, qos, generation = message.mid, message.qos, self.generation

        def ack() -> None:
            if generation == self.generation and self._is_connected():
                self._send(mid, qos)

        return ack

    def handled(self, message: paho.MQTTMessage, acknowledged_by_handler: bool) -> None:
        """``message``'s handlers returned (on paho's thread): acknowledge it now unless one
        of them acknowledges it through its token."""
        if self.enabled and message.qos > 0 and not acknowledged_by_handler:
            # Handlers that keep no delivery promise (updates), and filters the persistent
            # session still holds from an earlier config: acknowledge now, or the message
            # comes back after every reconnect.
            with contextlib.suppress(Exception):
                self._send(message.mid, message.qos)

    def discarded(self, message: paho.MQTTMessage) -> None:
        """``message`` was dropped unread (too large, on paho's thread): acknowledge it, as
        it would only come again."""
        if self.enabled and message.qos > 0:
            with contextlib.suppress(Exception):
                self._send(message.mid, message.qos)
