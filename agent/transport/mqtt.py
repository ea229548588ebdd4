"""The broker connection: one paho client, its last will, reconnects and subscriptions.

paho's network thread runs every callback below. An exception escaping a callback kills
that thread (paho issues #365, #704), so each callback catches everything and logs it.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as paho
import structlog
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from agent import topics
from agent.config.schema import MqttConfig, secret_file_warning
from agent.errors import EdgeAgentError
from agent.transport.churn import SHORT_CONNECTION_S, ShortConnectionStreak
from agent.transport.packet_guard import BoundedClient
from agent.transport.session_memory import SessionMemory

log = structlog.get_logger(__name__)

STATUS_ONLINE = b"online"
STATUS_OFFLINE = b"offline"
RECONNECT_MIN_S = 1.0
# A connect attempt to an unreachable host blocks the network thread; keep it short so a
# stop request is honoured within the 5 s systemd and the tests expect.
CONNECT_TIMEOUT_S = 3.0

ROUTE_CACHE_SIZE = 4096
# MQTT 5 DISCONNECT reason "Session taken over": a newer connection with our client id.
_SESSION_TAKEN_OVER = 0x8E

MessageHandler = Callable[[paho.MQTTMessage], None]
# (topic, packet size): a message over mqtt.max_packet_bytes arrived, its payload dropped.
TooLargeHandler = Callable[[str, int], None]


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


class MqttConnection:
    """Owns one paho client: connect with backoff, ``online``/``offline`` status, and
    per-filter message routing that survives reconnects."""

    def __init__(
        self,
        config: MqttConfig,
        status_topic: str | None,
        *,
        role: str = "local",
        persistent: bool = False,
        manual_ack: bool = False,
        session_memory: SessionMemory | None = None,
        max_packet_bytes: int,
    ) -> None:
        """``status_topic``: where ``online``/``offline`` (and the last will) go, or None.
        ``persistent``: keep the broker session across disconnects and restarts (MQTT 5
        clean_start false with a session expiry; MQTT 3.1.1 clean_session false).
        ``manual_ack``: QoS 1/2 messages are acknowledged through ``ack_token``, not on
        arrival. ``session_memory``: where a persistent session's filters are remembered, so
        ones dropped from the config while the agent was stopped are unsubscribed.
        ``max_packet_bytes``: the largest packet taken (sent to MQTT 5 brokers in CONNECT);
        larger ones are skipped without being buffered."""
        self._config = config
        self._status_topic = status_topic
        self._role = role
        self._persistent = persistent
        self._manual_ack = manual_ack
        self._session_memory = session_memory
        self._max_packet_bytes = max_packet_bytes
        self._log = log.bind(broker=f"{config.host}:{config.port}", role=role)
        protocol = (
            MQTTProtocolVersion.MQTTv5 if config.protocol == "5" else MQTTProtocolVersion.MQTTv311
        )
        self._client = BoundedClient(
            CallbackAPIVersion.VERSION2,
            client_id=config.client_id,
            protocol=protocol,
            clean_session=(not persistent) if protocol == MQTTProtocolVersion.MQTTv311 else None,
            manual_ack=manual_ack,
            max_packet_bytes=max_packet_bytes,
        )
        self._client.enable_logger(_paho_logger())
        self._client.reconnect_delay_set(int(RECONNECT_MIN_S), int(config.reconnect_max_s))
        self._client.connect_timeout = CONNECT_TIMEOUT_S
        # How many QoS 1 results may await the broker's PUBACK. paho scans this window on
        # every PUBACK, so wider costs CPU (measured: 1,000 gave 9 % less throughput than 100
        # on loopback); narrower limits throughput on long round trips.
        self._client.max_inflight_messages_set(config.max_inflight)
        if status_topic is not None:
            self._client.will_set(status_topic, STATUS_OFFLINE, qos=1, retain=True)
        if config.username is not None:
            self._client.username_pw_set(config.username, _read_password(config.password_file))
        if config.tls.enabled:
            self._client.tls_set(
                ca_certs=config.tls.ca_file,
                certfile=config.tls.cert_file,
                keyfile=config.tls.key_file,
                cert_reqs=ssl.CERT_REQUIRED,
            )
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_connect_fail = self._on_connect_fail
        self._client.on_unsubscribe = self._on_unsubscribe
        self._client.on_subscribe = self._on_subscribe
        self._subscribed = threading.Event()  # the subscriptions of this connect are acked
        self._client.on_publish = self._on_publish
        # mid -> what to call when the broker acknowledged it (QoS 1) or it was written
        # (QoS 0). Every publish registers, so an acknowledgement that overtakes its
        # registration (the network thread is faster than the publishing thread) is the only
        # thing _early can hold, and the QoS 1/2 entries are exactly the messages the broker
        # has not acknowledged yet (``unacked``, which a clean stop waits for). Never held
        # while calling paho: on_publish runs under paho's own message lock.
        self._ack_lock = threading.Lock()
        self._on_acked: dict[int, Callable[[], None] | None] = {}
        self._early: set[int] = set()
        # QoS 0 messages dropped by a disconnect never get on_publish: forgotten then.
        self._qos0_mids: set[int] = set()
        # Incremented on every connect: an acknowledgement for a message of an earlier
        # connection is not sent (the broker redelivers that message instead).
        self.generation = 0
        self._unsubscribed = threading.Event()
        self._unsubscribe_mid: int | None = None
        self._client.on_socket_open = self._on_socket_open
        self._client.on_message = self._on_message
        # Written by the caller's thread, read by paho's thread in on_connect.
        self._subscriptions: dict[str, Subscription] = {}
        # topic -> (handlers, whether one of them acknowledges), filled on paho's thread:
        # sensors publish on a few topics, and a dict lookup beats matching every filter.
        self._routes: dict[str, tuple[tuple[MessageHandler, ...], bool]] = {}
        self._lock = threading.Lock()
        self.connected = threading.Event()
        self._started = False
        self._stopping = False  # set by stop(): the coming disconnect is ours, not a failure
        # Read and written only by paho's network thread (on_connect / on_disconnect).
        self._short_connections = ShortConnectionStreak()
        self._connect_listeners: list[Callable[[], None]] = []

    @property
    def protocol_is_v5(self) -> bool:
        """Whether the connection speaks MQTT 5 (properties, response topics)."""
        return self._config.protocol == "5"

    def subscribe(self, subscription: Subscription) -> None:
        """Route messages matching the filter to its handler; kept across reconnects."""
        with self._lock:
            self._subscriptions[subscription.subscribe_filter] = subscription
            self._routes = {}
        self._remember()
        if self.connected.is_set():
            self._send_subscribe([subscription])

    def add_connect_listener(self, listener: Callable[[], None]) -> None:
        """Call ``listener()`` on paho's thread after every successful connect (must not block)."""
        self._connect_listeners.append(listener)

    def unsubscribe(self, subscribe_filter: str) -> None:
        """Stop one subscription (its ``subscribe_filter``)."""
        with self._lock:
            existed = self._subscriptions.pop(subscribe_filter, None) is not None
            self._routes = {}
        self._remember()
        if existed and self.connected.is_set():
            self._client.unsubscribe(subscribe_filter)

    def _remember(self) -> None:
        if self._session_memory is not None:
            with self._lock:
                current = set(self._subscriptions)
            self._session_memory.save(current)

    def wait_subscribed(self, timeout_s: float) -> bool:
        """Wait until connected and the broker acknowledged the subscriptions sent on
        connect (at once when there are none); False on timeout."""
        with self._lock:
            if not self._subscriptions:
                return self.connected.wait(timeout_s)
        return self._subscribed.wait(timeout_s)

    @property
    def loop_alive(self) -> bool:
        """Whether paho's network thread runs (it reconnects by itself while it does)."""
        thread = getattr(self._client, "_thread", None)
        return thread is not None and thread.is_alive()

    def unsubscribe_all(self, wait_s: float = 1.0) -> None:
        """Stop taking messages (first thing on shutdown, so queued work can drain).

        Waits for the broker's UNSUBACK: messages it sent before that are still routed to
        their handlers (they are already acknowledged, dropping them would lose them); none
        come after it.
        """
        with self._lock:
            filters = list(self._subscriptions)
        if filters and self.connected.is_set():
            self._unsubscribed.clear()
            result, mid = self._client.unsubscribe(filters)
            self._unsubscribe_mid = mid
            if result == paho.MQTT_ERR_SUCCESS and not self._unsubscribed.wait(wait_s):
                self._log.warning("mqtt_unsubscribe_unacknowledged", wait_s=wait_s)
        with self._lock:
            self._subscriptions.clear()
            self._routes = {}

    def start(self) -> None:
        """Connect in the background; failures are retried with backoff, never raised."""
        self._log.info(
            "mqtt_connecting",
            client_id=self._config.client_id,
            protocol=self._config.protocol,
            tls=self._config.tls.enabled,
            persistent_session=self._persistent,
            max_packet_bytes=self._max_packet_bytes,
        )
        if self.protocol_is_v5:
            properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            properties.ReceiveMaximum = self._config.receive_maximum
            # The broker must not send this client anything larger (MQTT 5, 3.1.2.11.4).
            properties.MaximumPacketSize = self._max_packet_bytes
            if self._persistent:
                properties.SessionExpiryInterval = self._config.session_expiry_s
            # Never a clean start when persistent, not even the first connect of a process:
            # the session holds the readings that arrived while the agent was restarting.
            self._client.connect_async(
                self._config.host,
                self._config.port,
                keepalive=self._config.keepalive_s,
                clean_start=False if self._persistent else paho.MQTT_CLEAN_START_FIRST_ONLY,
                properties=properties,
            )
        else:
            self._client.connect_async(
                self._config.host, self._config.port, keepalive=self._config.keepalive_s
            )
        self._client.loop_start()
        self._started = True

    def publish(
        self,
        topic: str,
        payload: bytes | str,
        qos: int = 0,
        retain: bool = False,
        *,
        properties: Properties | None = None,
        on_acked: Callable[[], None] | None = None,
    ) -> paho.MQTTMessageInfo:
        """Queue a message for sending; thread-safe. QoS 1/2 messages are kept while
        disconnected and sent after the next connect.

        ``on_acked()`` runs once the broker acknowledged the message (QoS 1/2) or it was
        written to the socket (QoS 0), on paho's network thread or on this thread; it must
        not block and must not publish. Never called for a QoS 0 message that could not be
        sent.
        """
        info = self._client.publish(topic, payload, qos=qos, retain=retain, properties=properties)
        queued = info.rc == paho.MQTT_ERR_SUCCESS or (qos > 0 and info.rc == paho.MQTT_ERR_NO_CONN)
        if queued:
            with self._ack_lock:
                acked_already = info.mid in self._early
                if acked_already:
                    self._early.discard(info.mid)
                else:
                    self._on_acked[info.mid] = on_acked
                    if qos == 0:
                        self._qos0_mids.add(info.mid)
            if acked_already and on_acked is not None:
                on_acked()
        return info

    def ack_token(self, message: paho.MQTTMessage) -> Callable[[], None] | None:
        """With manual acknowledgement, a function that acknowledges ``message`` (call it
        once, from any thread, when the message's work is safely done); None when there is
        nothing to acknowledge (QoS 0, or acknowledged on arrival). Called on paho's thread.
        """
        if not self._manual_ack or message.qos == 0:
            return None
        mid, qos, generation = message.mid, message.qos, self.generation

        def ack() -> None:
            if generation == self.generation and self.connected.is_set():
                self._client.ack(mid, qos)

        return ack

    @property
    def unacked(self) -> int:
        """QoS 1/2 messages the broker has not acknowledged yet."""
        with self._ack_lock:
            return len(self._on_acked) - len(self._qos0_mids)

    def flush(self, timeout_s: float) -> bool:
        """Wait until the broker acknowledged every QoS 1/2 message (or ``timeout_s``)."""
        deadline = time.monotonic() + timeout_s
        while self.unacked and self.connected.is_set() and time.monotonic() < deadline:
            time.sleep(0.01)
        return self.unacked == 0

    def stop(self, timeout_s: float = 2.0) -> None:
        """Publish ``offline``, disconnect cleanly and stop the network thread."""
        if not self._started:
            return
        if self.connected.is_set() and self._status_topic is not None:
            info = self.publish(self._status_topic, STATUS_OFFLINE, qos=1, retain=True)
            try:
                info.wait_for_publish(timeout=timeout_s)
            except (RuntimeError, ValueError) as exc:  # lost the connection meanwhile
                self._log.warning("mqtt_offline_not_sent", error=str(exc))
        self._stopping = True
        self._client.disconnect()
        self._client.loop_stop()
        self._started = False
        self._log.info("mqtt_stopped")

    # -- paho callbacks: all run on paho's network thread ------------------------------------

    def _on_socket_open(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        try:
            # Without TCP_NODELAY small messages wait for Nagle's algorithm: measured ~140/s
            # instead of ~13,000/s for 2 KB messages on loopback.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except Exception as exc:  # not a TCP socket (unix transport)
            self._log.debug("tcp_nodelay_not_set", error=str(exc))

    def _on_connect(
        self,
        client: paho.Client,
        userdata: Any,
        flags: Any,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        try:
            if reason_code.is_failure:
                self._log.warning("mqtt_connect_refused", reason=str(reason_code))
                return
            self._log.info("mqtt_connected", session_present=bool(flags.session_present))
            self._short_connections.connected(time.monotonic())
            self.generation += 1
            self.connected.set()
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
                    client.unsubscribe(stale)
            if subscriptions:
                self._send_subscribe(subscriptions)
            else:
                self._subscribed.set()
            if self._status_topic is not None:
                self.publish(self._status_topic, STATUS_ONLINE, qos=1, retain=True)
            for listener in self._connect_listeners:
                listener()
        except Exception:
            self._log.exception("mqtt_on_connect_failed")

    def _on_disconnect(
        self,
        client: paho.Client,
        userdata: Any,
        flags: Any,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        try:
            was_connected = self.connected.is_set()
            self.connected.clear()
            self._subscribed.clear()
            with self._ack_lock:
                for mid in self._qos0_mids:
                    self._on_acked.pop(mid, None)
                self._qos0_mids.clear()
                self._early.clear()
            if self._stopping:
                self._log.info("mqtt_disconnected", reason=str(reason_code))
                return
            if was_connected:
                self._log.warning("mqtt_disconnected", reason=str(reason_code))
            else:
                self._log.warning("mqtt_connect_failed", reason=str(reason_code))
            streak = self._short_connections.dropped(time.monotonic())
            if getattr(reason_code, "value", None) == _SESSION_TAKEN_OVER:
                # Another client connected with our client id: with the default ids that is
                # two devices sharing one device_id, which an operator has to fix.
                self._log.error(
                    "mqtt_session_taken_over",
                    client_id=self._config.client_id,
                    action="another client uses this client id: give each device "
                    "its own device_id (or host name)",
                )
            elif streak is not None:
                self._log.error(
                    "mqtt_connection_keeps_dropping",
                    client_id=self._config.client_id,
                    connections=streak,
                    within_s=SHORT_CONNECTION_S,
                    action="the broker closes each connection soon after accepting "
                    "it: most often another client uses this client id (two "
                    "devices with one device_id or host name); else check "
                    "the broker's log",
                )
        except Exception:
            self._log.exception("mqtt_on_disconnect_failed")

    def _on_publish(
        self,
        client: paho.Client,
        userdata: Any,
        mid: int,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        try:
            with self._ack_lock:
                if mid in self._on_acked:
                    callback = self._on_acked.pop(mid)
                    self._qos0_mids.discard(mid)
                else:
                    self._early.add(mid)  # acknowledged before publish() registered it
                    return
            if reason_code.is_failure:
                self._log.error("mqtt_publish_refused", mid=mid, reason=str(reason_code))
            if callback is not None:
                callback()
        except Exception:
            self._log.exception("mqtt_on_publish_failed")

    def _on_subscribe(
        self, client: paho.Client, userdata: Any, mid: int, reason_codes: Any, properties: Any
    ) -> None:
        self._subscribed.set()

    def _on_unsubscribe(
        self, client: paho.Client, userdata: Any, mid: int, reason_codes: Any, properties: Any
    ) -> None:
        if mid == self._unsubscribe_mid:
            self._unsubscribed.set()

    def _on_connect_fail(self, client: paho.Client, userdata: Any) -> None:
        with contextlib.suppress(Exception):
            self._log.warning(
                "mqtt_connect_failed",
                reason="broker unreachable",
                retry_max_s=self._config.reconnect_max_s,
            )

    def _on_message(self, client: paho.Client, userdata: Any, message: paho.MQTTMessage) -> None:
        size = self._client.oversized(message)
        if size is not None:
            self._on_too_large(message, size)
            return
        topic = message.topic
        route = self._routes.get(topic)
        if route is None:
            route = self._route(topic)
        handlers, acknowledged_by_handler = route
        for handler in handlers:
            try:
                handler(message)
            except Exception:
                self._log.exception("message_handler_failed", topic=topic)
        if self._manual_ack and message.qos > 0 and not acknowledged_by_handler:
            # Handlers that keep no delivery promise (updates), and filters the persistent
            # session still holds from an earlier config: acknowledge now, or the message
            # comes back after every reconnect.
            with contextlib.suppress(Exception):
                client.ack(message.mid, message.qos)

    def _on_too_large(self, message: paho.MQTTMessage, size: int) -> None:
        """A message over ``max_packet_bytes`` (paho's thread): its payload was never kept.
        Tell the subscriptions it matches, then acknowledge it: it would only come again."""
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
                limit=self._max_packet_bytes,
                discarded=discarded,
                hint="mqtt.max_packet_bytes; the broker's max_packet_size / "
                "message_size_limit stops such messages earlier",
            )
        with self._lock:
            matching = [
                s for s in self._subscriptions.values() if topics.matches(s.topic_filter, topic)
            ]
        for subscription in matching:
            if subscription.on_too_large is None:
                continue
            try:
                subscription.on_too_large(topic, size)
            except Exception:
                self._log.exception("message_handler_failed", topic=topic)
        if self._manual_ack and message.qos > 0:
            with contextlib.suppress(Exception):
                self._client.ack(message.mid, message.qos)

    def _route(self, topic: str) -> tuple[tuple[MessageHandler, ...], bool]:
        with self._lock:
            matching = [
                s for s in self._subscriptions.values() if topics.matches(s.topic_filter, topic)
            ]
            route = (tuple(s.handler for s in matching), any(s.acknowledges for s in matching))
            if len(self._routes) >= ROUTE_CACHE_SIZE:
                self._routes = {}
            self._routes[topic] = route
        if not matching:
            self._log.debug("mqtt_unrouted_message", topic=topic)
        return route

    def _send_subscribe(self, subscriptions: list[Subscription]) -> None:
        if self.protocol_is_v5:
            v5 = [(s.subscribe_filter, SubscribeOptions(qos=s.qos)) for s in subscriptions]
            result, _ = self._client.subscribe(v5)
        else:
            v311 = [(s.subscribe_filter, s.qos) for s in subscriptions]
            result, _ = self._client.subscribe(v311)
        if result != paho.MQTT_ERR_SUCCESS:
            self._log.warning("mqtt_subscribe_failed", error=paho.error_string(result))
        else:
            self._log.info("mqtt_subscribed", filters=[s.subscribe_filter for s in subscriptions])


class _DropRepeatedNotConnected(logging.Filter):
    """paho logs "Client is not connected" at ERROR once per loop while the broker is away;
    ``mqtt_connect_failed`` already says so, once per attempt."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Client is not connected")


def _paho_logger() -> logging.Logger:
    logger = logging.getLogger("paho.mqtt")
    if not any(isinstance(f, _DropRepeatedNotConnected) for f in logger.filters):
        logger.addFilter(_DropRepeatedNotConnected())
    return logger


def _read_password(path: str | None) -> str | None:
    if path is None:
        return None
    warning = secret_file_warning(path)
    if warning is not None:
        log.warning("secret_file_mode", key="password_file", problem=warning)
    try:
        with open(path, encoding="utf-8") as handle:
            return handle.read().rstrip("\r\n")
    except OSError as exc:
        raise EdgeAgentError(f"cannot read mqtt.password_file {path}: {exc.strerror}") from exc
