"""The broker connection: one paho client, its last will, reconnects and subscriptions.

The connection's network loop (``agent.transport.network_loop``: the threads that own the
socket) runs every callback below. An exception escaping a callback would end that turn of
the loop's work half-done (and under paho's own loop, kill its thread: paho issues #365,
#704), so each callback catches everything and logs it.

The connection builds and delegates to: ``subscriptions`` (the filters, their routing and
resubscribing), ``inbound`` (each arriving message to its handlers), ``acks`` (what the
broker has not acknowledged yet, and when we acknowledge what it sent) and ``churn``
(what a dropped connection tells the operator).
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
import time
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as paho
import structlog
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from agent.config.loader import secret_file_warning
from agent.config.schema import MqttConfig
from agent.errors import EdgeAgentError
from agent.transport.acks import ManualAcks, PublishAcks
from agent.transport.churn import ConnectionLog
from agent.transport.inbound import Inbound
from agent.transport.network_loop import LoopClient, NetworkLoop
from agent.transport.session_memory import SessionMemory
from agent.transport.subscriptions import Subscription, Subscriptions

log = structlog.get_logger(__name__)

STATUS_ONLINE = b"online"
STATUS_OFFLINE = b"offline"
RECONNECT_MIN_S = 1.0
# A connect attempt to an unreachable host blocks the network thread; keep it short so a
# stop request is honoured within the 5 s systemd and the tests expect.
CONNECT_TIMEOUT_S = 3.0


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
        self._persistent = persistent
        self._max_packet_bytes = max_packet_bytes
        self._log = log.bind(broker=f"{config.host}:{config.port}", role=role)
        self._client = _make_client(
            config,
            status_topic,
            persistent=persistent,
            manual_ack=manual_ack,
            max_packet_bytes=max_packet_bytes,
        )
        self.connected = threading.Event()
        self._subscriptions = Subscriptions(
            self._client,
            connected=self.connected,
            v5=self.protocol_is_v5,
            session_memory=session_memory,
            log=self._log,
        )
        self._publish_acks = PublishAcks()
        self._manual_acks = ManualAcks(manual_ack, self._client.ack, self.connected.is_set)
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_unsubscribe = self._subscriptions.on_unsubscribe
        self._client.on_subscribe = self._subscriptions.on_subscribe
        self._client.on_publish = self._on_publish
        self._client.on_message = Inbound(
            self._client, self._subscriptions, self._manual_acks, self._log
        ).on_message
        self._started = False
        self._loop = NetworkLoop(
            self._client,
            config.client_id,
            reconnect_min_s=RECONNECT_MIN_S,
            reconnect_max_s=config.reconnect_max_s,
            on_connect_fail=lambda: self._connection_log.on_connect_fail(self._client, None),
        )
        self._stopping = False  # set by stop(): the coming disconnect is ours, not a failure
        # Used only by paho's network thread (on_connect / on_disconnect).
        self._connection_log = ConnectionLog(self._log, config.client_id, config.reconnect_max_s)
        self._connect_listeners: list[Callable[[], None]] = []

    @property
    def protocol_is_v5(self) -> bool:
        """Whether the connection speaks MQTT 5 (properties, response topics)."""
        return self._config.protocol == "5"

    @property
    def generation(self) -> int:
        """Incremented on every connect: what a connection sent or received before the
        latest reconnect is from an earlier generation."""
        return self._manual_acks.generation

    def subscribe(self, subscription: Subscription) -> None:
        """Route messages matching the filter to its handler; kept across reconnects."""
        self._subscriptions.add(subscription)

    @property
    def network_loop(self) -> NetworkLoop:
        """The threads that drive the client (``after_read`` hooks run the readings of the
        pipelines that run in them)."""
        return self._loop

    def add_connect_listener(self, listener: Callable[[], None]) -> None:
        """Call ``listener()`` on paho's thread after every successful connect (must not block)."""
        self._connect_listeners.append(listener)

    def unsubscribe(self, subscribe_filter: str) -> None:
        """Stop one subscription (its ``subscribe_filter``)."""
        self._subscriptions.remove(subscribe_filter)

    def wait_subscribed(self, timeout_s: float) -> bool:
        """Wait until connected and the broker acknowledged the subscriptions sent on
        connect (at once when there are none); False on timeout."""
        return self._subscriptions.wait_acked(timeout_s)

    @property
    def loop_alive(self) -> bool:
        """Whether the network loop's threads run (they reconnect by themselves)."""
        return self._loop.alive

    def unsubscribe_all(self, wait_s: float = 1.0) -> None:
        """Stop taking messages (first thing on shutdown, so queued work can drain).

        Waits for the broker's UNSUBACK: messages it sent before that are still routed to
        their handlers (they are already acknowledged, dropping them would lose them); none
        come after it.
        """
        self._subscriptions.remove_all(wait_s)

    def start(self) -> None:
        """Connect in the background; failures are retried with backoff, never raised."""
        _connect_async(
            self._client,
            self._config,
            self._log,
            persistent=self._persistent,
            max_packet_bytes=self._max_packet_bytes,
        )
        self._loop.start()
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

        ``on_acked()`` runs once the broker acknowledged the message (QoS 1/2), on the
        network loop's thread or on this one; for QoS 0, here once paho has queued it (QoS 0
        promises no more). It must not block and must not publish. Never called for a QoS 0
        message paho refused (not connected).
        """
        info = self._client.publish(topic, payload, qos=qos, retain=retain, properties=properties)
        self._publish_acks.track(info.rc, info.mid, qos, on_acked)
        return info

    def ack_token(self, message: paho.MQTTMessage) -> Callable[[], None] | None:
        """With manual acknowledgement, a function that acknowledges ``message`` (call it
        once, from any thread, when the message's work is safely done); None when there is
        nothing to acknowledge (QoS 0, or acknowledged on arrival). Called on paho's thread.
        """
        return self._manual_acks.token(message)

    @property
    def unacked(self) -> int:
        """QoS 1/2 messages the broker has not acknowledged yet."""
        return self._publish_acks.unacked

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
        self._loop.stop(timeout_s)
        self._started = False
        self._log.info("mqtt_stopped")

    # -- paho callbacks: all run on the network loop's thread --------------------------------

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
            self._loop.connected()
            self._connection_log.connected()
            self._manual_acks.connected()
            self.connected.set()
            self._subscriptions.resubscribe()
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
            self._subscriptions.lost()
            self._publish_acks.disconnected()
            self._connection_log.dropped(
                reason_code, was_connected=was_connected, ours=self._stopping
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
            registered, callback = self._publish_acks.acknowledged(mid)
            if not registered:
                return  # acknowledged before publish() registered it
            if reason_code.is_failure:
                self._log.error("mqtt_publish_refused", mid=mid, reason=str(reason_code))
            if callback is not None:
                callback()
        except Exception:
            self._log.exception("mqtt_on_publish_failed")


def _nodelay(client: paho.Client, userdata: Any, sock: Any) -> None:
    """paho's on_socket_open (the network loop's thread): TCP_NODELAY, or small messages
    wait for Nagle's algorithm (measured ~140/s instead of ~13,000/s for 2 KB messages)."""
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except Exception as exc:  # not a TCP socket (unix transport)
        log.debug("tcp_nodelay_not_set", error=str(exc))


def _make_client(
    config: MqttConfig,
    status_topic: str | None,
    *,
    persistent: bool,
    manual_ack: bool,
    max_packet_bytes: int,
) -> LoopClient:
    """The paho client for ``config``, its last will and credentials set; not connected."""
    protocol = (
        MQTTProtocolVersion.MQTTv5 if config.protocol == "5" else MQTTProtocolVersion.MQTTv311
    )
    client = LoopClient(
        CallbackAPIVersion.VERSION2,
        client_id=config.client_id,
        protocol=protocol,
        clean_session=(not persistent) if protocol == MQTTProtocolVersion.MQTTv311 else None,
        manual_ack=manual_ack,
        max_packet_bytes=max_packet_bytes,
    )
    client.enable_logger(_paho_logger())
    client.connect_timeout = CONNECT_TIMEOUT_S
    client.on_socket_open = _nodelay
    # How many QoS 1 results may await the broker's PUBACK. paho scans this window on
    # every PUBACK, so wider costs CPU (measured: 1,000 gave 9 % less throughput than 100
    # on loopback); narrower limits throughput on long round trips.
    client.max_inflight_messages_set(config.max_inflight)
    if status_topic is not None:
        client.will_set(status_topic, STATUS_OFFLINE, qos=1, retain=True)
    password = read_password(config.password_file) if config.username is not None else None
    set_credentials(client, config, password)
    return client


def set_credentials(client: paho.Client, config: MqttConfig, password: str | None) -> None:
    """``config``'s username (with ``password``) and TLS settings on ``client``, before it
    connects; the daemon and the operator commands connect alike."""
    if config.username is not None:
        client.username_pw_set(config.username, password)
    if config.tls.enabled:
        client.tls_set(
            ca_certs=config.tls.ca_file,
            certfile=config.tls.cert_file,
            keyfile=config.tls.key_file,
            cert_reqs=ssl.CERT_REQUIRED,
        )


def _connect_async(
    client: paho.Client,
    config: MqttConfig,
    log: structlog.stdlib.BoundLogger,
    *,
    persistent: bool,
    max_packet_bytes: int,
) -> None:
    """Say so, and set the broker and CONNECT options the network loop connects (and
    reconnects) with."""
    log.info(
        "mqtt_connecting",
        client_id=config.client_id,
        protocol=config.protocol,
        tls=config.tls.enabled,
        persistent_session=persistent,
        max_packet_bytes=max_packet_bytes,
    )
    if config.protocol != "5":
        client.connect_async(config.host, config.port, keepalive=config.keepalive_s)
        return
    properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
    properties.ReceiveMaximum = config.receive_maximum
    # The broker must not send this client anything larger (MQTT 5, 3.1.2.11.4).
    properties.MaximumPacketSize = max_packet_bytes
    if persistent:
        properties.SessionExpiryInterval = config.session_expiry_s
    # Never a clean start when persistent, not even the first connect of a process:
    # the session holds the readings that arrived while the agent was restarting.
    client.connect_async(
        config.host,
        config.port,
        keepalive=config.keepalive_s,
        clean_start=False if persistent else paho.MQTT_CLEAN_START_FIRST_ONLY,
        properties=properties,
    )


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


def read_password(path: str | None) -> str | None:
    """The password in the file ``path`` (None when no file is set); warns when the file
    can be read by others, raises EdgeAgentError when it cannot be read."""
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
