"""The short-lived MQTT client of the operator commands (``status``, ``publish-update``)."""

from __future__ import annotations

import argparse
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from agent.config.loader import default_config, load_config
from agent.config.schema import MqttConfig
from agent.errors import EdgeAgentError
from agent.transport.mqtt import set_credentials

CONNECT_WAIT_S = 10.0


def connect(
    mqtt: MqttConfig,
    password: str | None,
    subscriptions: list[tuple[str, int]],
    on_message: Callable[[paho.Client, Any, paho.MQTTMessage], None],
) -> paho.Client:
    """Connect, subscribe and start the network thread; returns once the broker accepted
    the connection. ``on_message`` runs on paho's network thread. Stop the client with
    ``disconnect()`` and ``loop_stop()``."""
    connected = threading.Event()
    subscribed = threading.Event()
    failure: list[str] = []

    # Both callbacks run on paho's network thread.
    def on_connect(
        client: paho.Client, userdata: Any, flags: Any, reason: Any, properties: Any
    ) -> None:
        if reason.is_failure:
            failure.append(str(reason))
        elif subscriptions:
            client.subscribe(subscriptions)
        else:
            subscribed.set()
        connected.set()

    def on_subscribe(
        client: paho.Client, userdata: Any, mid: int, reason_codes: Any, properties: Any
    ) -> None:
        subscribed.set()

    client = paho.Client(CallbackAPIVersion.VERSION2)
    set_credentials(client, mqtt, password)
    client.on_connect = on_connect
    client.on_subscribe = on_subscribe
    client.on_message = on_message
    try:
        client.connect(mqtt.host, mqtt.port, keepalive=30)
    except OSError as exc:
        raise EdgeAgentError(f"cannot connect to {mqtt.host}:{mqtt.port}: {exc}") from exc
    client.loop_start()
    if not connected.wait(CONNECT_WAIT_S) or failure or not subscribed.wait(CONNECT_WAIT_S):
        client.disconnect()
        client.loop_stop()
        raise EdgeAgentError(
            f"broker {mqtt.host}:{mqtt.port} refused the connection: "
            f"{failure[0] if failure else 'no answer'}"
        )
    return client


def broker_settings(args: argparse.Namespace) -> tuple[MqttConfig, str | None]:
    """Broker address, credentials and TLS: ``--config``'s ``mqtt`` section (or the
    defaults) with the command-line options on top; and the password read from its file."""
    mqtt = load_config(Path(args.config)).mqtt if args.config else default_config().mqtt
    overrides = {
        key: getattr(args, key, None) for key in ("host", "port", "username", "password_file")
    }
    mqtt = mqtt.model_copy(update={k: v for k, v in overrides.items() if v is not None})
    if getattr(args, "ca_file", None):
        mqtt = mqtt.model_copy(
            update={"tls": mqtt.tls.model_copy(update={"ca_file": args.ca_file})}
        )
    password = None
    if mqtt.password_file:
        try:
            password = Path(mqtt.password_file).read_text(encoding="utf-8").rstrip("\r\n")
        except OSError as exc:
            raise EdgeAgentError(
                f"cannot read password file {mqtt.password_file}: {exc.strerror}"
            ) from exc
    return mqtt, password
