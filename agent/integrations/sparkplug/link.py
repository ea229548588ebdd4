"""The edge node's own MQTT connection: a clean session (Sparkplug requires one, while the
readings' connection keeps a persistent session for at-least-once), the NDEATH will with a
new ``bdSeq`` before every CONNECT, and the NCMD and STATE subscriptions.

paho's network thread runs every callback here. They never raise (an exception would kill
that thread) and only hand an event to ``on_event``; the edge node's thread acts on it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson
import paho.mqtt.client as paho
import structlog
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from agent.config.schema import MqttConfig
from agent.integrations.sparkplug.payloads import asks_rebirth, decode
from agent.integrations.sparkplug.session import Message, NodeTopics, death_payload, state_topic
from agent.transport.mqtt import CONNECT_TIMEOUT_S, RECONNECT_MIN_S, read_password
from agent.transport.mqtt import set_credentials as set_mqtt_credentials
from agent.transport.packet_guard import BoundedClient

log = structlog.get_logger(__name__)

# NCMD and STATE messages are small; anything larger is refused before it is buffered.
MAX_PACKET_BYTES = 64 * 1024


@dataclass(frozen=True)
class Connected:
    """A CONNECT was accepted; ``bdseq`` is the one its will carries."""

    bdseq: int


@dataclass(frozen=True)
class Disconnected:
    """The connection ended (by us, the broker or the network)."""


@dataclass(frozen=True)
class RebirthRequested:
    """A host sent NCMD ``Node Control/Rebirth`` = true."""


@dataclass(frozen=True)
class HostState:
    """The primary host application's STATE: online or not, and its timestamp."""

    online: bool
    timestamp: int


Event = Connected | Disconnected | RebirthRequested | HostState


class SparkplugLink:
    """One paho client for the edge node; ``publish`` is safe from any thread."""

    def __init__(
        self,
        config: MqttConfig,
        topics: NodeTopics,
        primary_host_id: str | None,
        on_event: Callable[[Event], None],
    ) -> None:
        self._config = config
        self._topics = topics
        self._host_id = primary_host_id
        self._on_event = on_event
        self._bdseq = -1  # the first CONNECT carries 0 (the specification's start)
        self._log = log.bind(broker=f"{config.host}:{config.port}", role="sparkplug")
        self._client = self._make_client()

    @property
    def bdseq(self) -> int:
        """The bdSeq of the latest CONNECT (paho's thread writes it before connecting)."""
        return max(self._bdseq, 0)

    def start(self) -> None:
        """Connect in the background; paho reconnects with backoff by itself."""
        self._log.info(
            "sparkplug_connecting",
            client_id=self._client_id,
            node=self._topics.node("NBIRTH"),
            primary_host_id=self._host_id,
        )
        self._client.connect_async(
            self._config.host,
            self._config.port,
            keepalive=self._config.keepalive_s,
            # A clean session: MQTT 5 clean start with no session expiry, or clean_session.
            clean_start=True if self._is_v5 else paho.MQTT_CLEAN_START_FIRST_ONLY,
        )
        self._client.loop_start()

    def publish(self, message: Message) -> bool:
        """Queue ``message``; False when paho cannot take it (not connected)."""
        info = self._client.publish(message.topic, message.payload, qos=message.qos)
        return info.rc == paho.MQTT_ERR_SUCCESS

    def say_death(self, timeout_s: float) -> None:
        """Publish NDEATH with the current bdSeq (QoS 1, as the will) and wait for it: an
        intentional disconnect must announce itself (the will is not sent then)."""
        info = self._client.publish(
            self._topics.node("NDEATH"),
            death_payload(self.bdseq, _now_ms()),
            qos=1,
        )
        try:
            info.wait_for_publish(timeout=timeout_s)
        except (RuntimeError, ValueError) as exc:  # the connection went meanwhile
            self._log.warning("sparkplug_ndeath_not_sent", error=str(exc))

    def stop(self) -> None:
        """Disconnect (no will is sent) and stop paho's thread."""
        self._client.disconnect()
        self._client.loop_stop()

    def reconnect(self) -> None:
        """Disconnect and start the connection over (after a primary host went offline)."""
        self.stop()
        self.start()

    # -- internals -------------------------------------------------------------------------

    @property
    def _is_v5(self) -> bool:
        return self._config.protocol == "5"

    @property
    def _client_id(self) -> str:
        return f"{self._config.client_id}-sparkplug"

    def _make_client(self) -> BoundedClient:
        client = BoundedClient(
            CallbackAPIVersion.VERSION2,
            client_id=self._client_id,
            protocol=MQTTProtocolVersion.MQTTv5 if self._is_v5 else MQTTProtocolVersion.MQTTv311,
            clean_session=None if self._is_v5 else True,
            max_packet_bytes=MAX_PACKET_BYTES,
        )
        client.reconnect_delay_set(int(RECONNECT_MIN_S), int(self._config.reconnect_max_s))
        client.connect_timeout = CONNECT_TIMEOUT_S
        password = read_password(self._config.password_file) if self._config.username else None
        set_mqtt_credentials(client, self._config, password)
        client.on_pre_connect = self._on_pre_connect
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        return client

    # -- paho callbacks: paho's network thread ------------------------------------------------

    def _on_pre_connect(self, client: paho.Client, userdata: Any) -> None:
        try:
            # One more on every CONNECT, 255 wraps to 0; the will carries it.
            self._bdseq = (self._bdseq + 1) % 256
            client.will_set(
                self._topics.node("NDEATH"),
                death_payload(self._bdseq, _now_ms()),
                qos=1,
                retain=False,
            )
        except Exception:
            self._log.exception("sparkplug_will_not_set")

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
                self._log.warning("sparkplug_connect_refused", reason=str(reason_code))
                return
            self._log.info("sparkplug_connected", bdseq=self._bdseq)
            client.subscribe(self._topics.node("NCMD"), qos=1)
            if self._host_id is not None:
                client.subscribe(state_topic(self._host_id), qos=1)
            self._on_event(Connected(self._bdseq))
        except Exception:
            self._log.exception("sparkplug_on_connect_failed")

    def _on_disconnect(
        self,
        client: paho.Client,
        userdata: Any,
        flags: Any,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        try:
            self._log.info("sparkplug_disconnected", reason=str(reason_code))
            self._on_event(Disconnected())
        except Exception:
            self._log.exception("sparkplug_on_disconnect_failed")

    def _on_message(self, client: paho.Client, userdata: Any, message: paho.MQTTMessage) -> None:
        try:
            if message.topic == self._topics.node("NCMD"):
                self._command(message.payload)
            elif self._host_id is not None and message.topic == state_topic(self._host_id):
                self._host_state(message.payload)
        except Exception:
            self._log.exception("sparkplug_on_message_failed", topic=message.topic)

    def _command(self, data: bytes | bytearray) -> None:
        try:
            payload = decode(data)
        except ValueError as exc:
            self._log.warning("sparkplug_ncmd_rejected", reason=str(exc), size=len(data))
            return
        if asks_rebirth(payload):
            self._log.info("sparkplug_rebirth_requested")
            self._on_event(RebirthRequested())
        else:
            self._log.info(
                "sparkplug_ncmd_ignored",
                metrics=[m.name for m in payload.metrics][:10],
                reason="only Node Control/Rebirth = true is acted on",
            )

    def _host_state(self, data: bytes | bytearray) -> None:
        try:
            document = orjson.loads(data)
        except orjson.JSONDecodeError as exc:
            self._log.warning("sparkplug_state_rejected", reason=f"not JSON: {exc}")
            return
        online = document.get("online") if isinstance(document, dict) else None
        timestamp = document.get("timestamp") if isinstance(document, dict) else None
        if not isinstance(online, bool) or not isinstance(timestamp, int):
            self._log.warning(
                "sparkplug_state_rejected",
                reason="a STATE payload needs a boolean 'online' and an integer 'timestamp'",
            )
            return
        self._on_event(HostState(online, timestamp))


def _now_ms() -> int:
    return int(time.time() * 1000)
