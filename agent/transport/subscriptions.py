"""A connection's subscriptions: which handlers an arriving message goes to, and keeping the
broker subscribed to every filter across reconnects (and a persistent session to no more)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as paho
import structlog
from paho.mqtt.subscribeoptions import SubscribeOptions

from agent import topics
from agent.transport.session_memory import SessionMemory

ROUTE_CACHE_SIZE = 4096

MessageHandler = Callable[[paho.MQTTMessage], None]
# (topic, packet size): a message over mqtt.max_packet_bytes arrived, its payload dropped.
TooLargeHandler = Callable[[str, int], None]
# The handlers a topic reaches, and whether one of them acknowledges its messages itself.
Route = tuple[tuple[MessageHandler, ...], bool]


@dataclass(frozen=True)
class Subscription:
    """One subscribed filter and the function that receives its messages (on paho's thread)."""

    topic_filter: str
    qos: int
    handler: MessageHandler
    shared_group: str | None = None
    # With manual acknowledgement: True when the handler acknowledges through ack_token
    # itself; otherwise the message is acknowledged as soon as the handler returns.
    acknowledges: bool = False
    # Told (on paho's thread) about a message on this filter that was too large to read; the
    # connection acknowledges it. None: it is only logged and counted.
    on_too_large: TooLargeHandler | None = None

    @property
    def subscribe_filter(self) -> str:
        """The filter sent to the broker: ``$share/GROUP/filter`` for shared subscriptions."""
        if self.shared_group:
            return f"$share/{self.shared_group}/{self.topic_filter}"
        return self.topic_filter


class Subscriptions:
    """The filters of one connection, by ``subscribe_filter``, and their routing.

    Changed on the caller's thread (``add``, ``remove``, ``remove_all``); routed and
    resubscribed on paho's network thread. ``connected`` is the connection's own event.
    """

    def __init__(
        self,
        client: paho.Client,
        *,
        connected: threading.Event,
        v5: bool,
        session_memory: SessionMemory | None,
        log: structlog.stdlib.BoundLogger,
    ) -> None:
        """``session_memory``: where a persistent session's filters are remembered, so ones
        dropped from the config while the agent was stopped are unsubscribed."""
        self._client = client
        self._connected = connected
        self._v5 = v5
        self._session_memory = session_memory
        self._log = log
        self._lock = threading.Lock()
        # Written by the caller's thread, read by paho's thread in on_connect.
        self._subscriptions: dict[str, Subscription] = {}
        # topic -> (handlers, whether one of them acknowledges), filled on paho's thread:
        # sensors publish on a few topics, and a dict lookup beats matching every filter.
        self._routes: dict[str, Route] = {}
        self._subscribed = threading.Event()  # the subscriptions of this connect are acked
        self._unsubscribed = threading.Event()
        self._unsubscribe_mid: int | None = None

    # -- the caller's thread -------------------------------------------------------------------

    def add(self, subscription: Subscription) -> None:
        """Route messages matching the filter to its handler; kept across reconnects."""
        with self._lock:
            self._subscriptions[subscription.subscribe_filter] = subscription
            self._routes = {}
        self._remember()
        if self._connected.is_set():
            self._send_subscribe([subscription])

    def remove(self, subscribe_filter: str) -> None:
        """Stop one subscription (its ``subscribe_filter``)."""
        with self._lock:
            existed = self._subscriptions.pop(subscribe_filter, None) is not None
            self._routes = {}
        self._remember()
        if existed and self._connected.is_set():
            self._client.unsubscribe(subscribe_filter)

    def wait_acked(self, timeout_s: float) -> bool:
        """Wait until connected and the broker acknowledged the subscriptions sent on
        connect (at once when there are none); False on timeout."""
        with self._lock:
            none = not self._subscriptions
        if none:
            return self._connected.wait(timeout_s)
        return self._subscribed.wait(timeout_s)

    def remove_all(self, wait_s: float) -> None:
        """Unsubscribe every filter, waiting up to ``wait_s`` for the broker's UNSUBACK:
        messages it sent before that are still routed to their handlers (they are already
        acknowledged, dropping them would lose them); none come after it."""
        with self._lock:
            filters = list(self._subscriptions)
        if filters and self._connected.is_set():
            self._unsubscribed.clear()
            result, mid = self._client.unsubscribe(filters)
            self._unsubscribe_mid = mid
            if result == paho.MQTT_ERR_SUCCESS and not self._unsubscribed.wait(wait_s):
                self._log.warning("mqtt_unsubscribe_unacknowledged", wait_s=wait_s)
        with self._lock:
            self._subscriptions.clear()
            self._routes = {}

    def _remember(self) -> None:
        if self._session_memory is not None:
            with self._lock:
                current = set(self._subscriptions)
            self._session_memory.save(current)

    # -- paho's network thread -----------------------------------------------------------------

    def resubscribe(self) -> None:
        """After a connect: drop what a persistent session holds from an earlier config,
        then subscribe every filter again."""
        with self._lock:
            subscriptions = list(self._subscriptions.values())
        if self._session_memory is not None:
            stale = self._session_memory.stale({s.subscribe_filter for s in subscriptions})
            if stale:
                self._log.info(
                    "mqtt_stale_unsubscribed",
                    filters=stale,
                    reason="the persistent session held them from an earlier config",
                )
                self._client.unsubscribe(stale)
        if subscriptions:
            self._send_subscribe(subscriptions)
        else:
            self._subscribed.set()

    def lost(self) -> None:
        """The connection dropped: the next connect subscribes again."""
        self._subscribed.clear()

    def route(self, topic: str) -> Route:
        """The handlers messages on ``topic`` go to, and whether one of them acknowledges."""
        route = self._routes.get(topic)  # no lock: the dict is replaced, never changed in place
        if route is not None:
            return route
        with self._lock:
            matching = self._matching(topic)
            route = (tuple(s.handler for s in matching), any(s.acknowledges for s in matching))
            if len(self._routes) >= ROUTE_CACHE_SIZE:
                self._routes = {}
            self._routes[topic] = route
        if not matching:
            self._log.debug("mqtt_unrouted_message", topic=topic)
        return route

    def matching(self, topic: str) -> list[Subscription]:
        """The subscriptions whose filter matches ``topic`` (not cached)."""
        with self._lock:
            return self._matching(topic)

    def _matching(self, topic: str) -> list[Subscription]:
        return [s for s in self._subscriptions.values() if topics.matches(s.topic_filter, topic)]

    def on_subscribe(
        self, client: paho.Client, userdata: Any, mid: int, reason_codes: Any, properties: Any
    ) -> None:
        """paho's SUBACK callback."""
        self._subscribed.set()

    def on_unsubscribe(
        self, client: paho.Client, userdata: Any, mid: int, reason_codes: Any, properties: Any
    ) -> None:
        """paho's UNSUBACK callback."""
        if mid == self._unsubscribe_mid:
            self._unsubscribed.set()

    def _send_subscribe(self, subscriptions: list[Subscription]) -> None:
        if self._v5:
            v5 = [(s.subscribe_filter, SubscribeOptions(qos=s.qos)) for s in subscriptions]
            result, _ = self._client.subscribe(v5)
        else:
            v311 = [(s.subscribe_filter, s.qos) for s in subscriptions]
            result, _ = self._client.subscribe(v311)
        if result != paho.MQTT_ERR_SUCCESS:
            self._log.warning("mqtt_subscribe_failed", error=paho.error_string(result))
        else:
            self._log.info("mqtt_subscribed", filters=[s.subscribe_filter for s in subscriptions])
