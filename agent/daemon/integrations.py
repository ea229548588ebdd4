"""Home Assistant discovery and the Sparkplug B edge node, started, reloaded and stopped with
the daemon.

The main thread calls everything here except ``observe_result``, which the pipelines'
workers call for every result (one attribute read when Sparkplug is off).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

import structlog

from agent import __version__
from agent.config.schema import AgentConfig
from agent.integrations.home_assistant.publisher import HomeAssistantDiscovery
from agent.integrations.sparkplug.node import SparkplugNode
from agent.transport.mqtt import MqttConnection
from agent.transport.subscriptions import Subscription

log = structlog.get_logger(__name__)


class Host(Protocol):
    """What the integrations use of the daemon's parts (``agent.daemon.wiring.Parts``)."""

    @property
    def uplink(self) -> MqttConnection:
        """Where results, telemetry and the discovery config go."""
        ...

    def publish_retained(self, topic: str, payload: bytes) -> None:
        """Make ``payload`` the retained value of ``topic`` on the uplink."""
        ...


class Integrations:
    """The integrations the config turns on; owned by the main thread."""

    def __init__(self, host: Host, config: AgentConfig, hardware: str) -> None:
        self._host = host
        self.home_assistant = HomeAssistantDiscovery(
            Path(config.state_dir),
            host.publish_retained,
            agent_version=__version__,
            hardware=hardware,
        )
        self._status_subscription: Subscription | None = None
        # Replaced by the main thread; read by the workers (a reference read is atomic).
        self.sparkplug: SparkplugNode | None = None

    def start(self, config: AgentConfig) -> None:
        """Publish the discovery config and start the Sparkplug node, as ``config`` says."""
        self._apply_home_assistant(config)
        if config.sparkplug.enabled:
            self._start_sparkplug(config)

    def reload(self, old: AgentConfig, new: AgentConfig, *, reconnected: bool) -> None:
        """Apply a reloaded config; ``reconnected``: the uplink is a new connection, so its
        subscription to Home Assistant's status is made again."""
        if reconnected:
            self._status_subscription = None
        self._apply_home_assistant(new)
        node = self.sparkplug
        broker_changed = (old.mqtt, old.upstream) != (new.mqtt, new.upstream)
        if node is not None and (new.sparkplug != old.sparkplug or broker_changed):
            self.sparkplug = None
            node.stop()
            node = None
        if node is None and new.sparkplug.enabled:
            self._start_sparkplug(new)
        elif node is not None:
            node.reconfigure(new)

    def observe_result(self, pipeline: str, topic: str, result: Mapping[str, Any]) -> None:
        """A pipeline handed a result on (its worker thread)."""
        node = self.sparkplug
        if node is not None:
            node.offer_result(pipeline, topic, result)

    def health(self, document: dict[str, Any]) -> None:
        """Add the integrations' figures to a health report and pass it on."""
        node = self.sparkplug
        if node is not None:
            document["sparkplug"] = node.stats()
            node.update_health(document)

    def stop(self) -> None:
        """Stop the Sparkplug node: NDEATH, then its connection closes."""
        node, self.sparkplug = self.sparkplug, None
        if node is not None:
            node.stop()

    def _start_sparkplug(self, config: AgentConfig) -> None:
        node = SparkplugNode(config)
        node.start()
        self.sparkplug = node

    def _apply_home_assistant(self, config: AgentConfig) -> None:
        self.home_assistant.apply(config)
        wanted = self.home_assistant.status_subscription(config)
        current = self._status_subscription
        uplink = self._host.uplink
        if current is not None and (
            wanted is None or wanted.subscribe_filter != current.subscribe_filter
        ):
            uplink.unsubscribe(current.subscribe_filter)
            current = None
        if wanted is not None and current is None:
            uplink.subscribe(wanted)
            current = wanted
        self._status_subscription = current
