"""Keeps the agent's Home Assistant discovery config published: retained at start and after
every reload, again whenever Home Assistant announces ``online`` on ``PREFIX/status``, with
removals for the entities a new config dropped, and an empty config (the device's removal)
when discovery is turned off.

What was published is recorded in ``state_dir/home-assistant.json`` (the topic and every
component id with its platform), so removals survive a restart with a smaller config.

Threads: ``apply`` runs on the main thread (start, SIGHUP); ``on_status`` on paho's network
thread, which only hands the latest payload to the retained publisher (never blocks).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import orjson
import paho.mqtt.client as paho
import structlog

from agent.config.schema import AgentConfig
from agent.durable import write_atomically
from agent.integrations.home_assistant.discovery import build
from agent.transport.subscriptions import Subscription

log = structlog.get_logger(__name__)

RECORD_FILE = "home-assistant.json"

PublishRetained = Callable[[str, bytes], None]


class HomeAssistantDiscovery:
    """The discovery config's publisher and its record."""

    def __init__(
        self,
        state_dir: Path,
        publish_retained: PublishRetained,
        *,
        agent_version: str,
        hardware: str,
    ) -> None:
        self._record_path = state_dir / RECORD_FILE
        self._publish = publish_retained
        self._agent_version = agent_version
        self._hardware = hardware
        self._lock = threading.Lock()  # the latest (topic, payload): main thread vs paho's
        self._latest: tuple[str, bytes] | None = None

    def status_subscription(self, config: AgentConfig) -> Subscription | None:
        """Home Assistant's birth topic (``PREFIX/status``) when discovery is on."""
        settings = config.home_assistant
        if not settings.discovery:
            return None
        return Subscription(f"{settings.prefix}/status", 1, self.on_status)

    def apply(self, config: AgentConfig) -> None:
        """Publish what ``config`` declares, and remove what it no longer does."""
        record = self._read_record()
        old_topic = record.get("topic")
        if not config.home_assistant.discovery:
            with self._lock:
                self._latest = None
            if isinstance(old_topic, str):
                self._publish(old_topic, b"")
                self._record_path.unlink(missing_ok=True)
                log.info("home_assistant_discovery_removed", topic=old_topic)
            return
        known = record.get("components")
        published: dict[str, str] = dict(known) if isinstance(known, dict) else {}
        current = build(config, agent_version=self._agent_version, hardware=self._hardware)
        if isinstance(old_topic, str) and old_topic != current.topic:
            # The prefix or the device id changed: the old device goes as a whole.
            self._publish(old_topic, b"")
            published = {}
        removed = {cid: p for cid, p in published.items() if cid not in current.platforms}
        discovery = build(
            config, agent_version=self._agent_version, hardware=self._hardware, removed=removed
        )
        payload = orjson.dumps(discovery.payload)
        with self._lock:
            self._latest = (discovery.topic, payload)
        self._publish(discovery.topic, payload)
        self._write_record({"topic": discovery.topic, "components": discovery.platforms})
        log.info(
            "home_assistant_discovery_published",
            topic=discovery.topic,
            entities=len(current.platforms),
            removed=sorted(removed),
        )

    def on_status(self, message: paho.MQTTMessage) -> None:
        """Home Assistant's birth or will (paho's thread): after ``online`` it has
        (re)subscribed to discovery, so the config goes out again."""
        if message.payload.strip() != b"online":
            return
        with self._lock:
            latest = self._latest
        if latest is not None:
            self._publish(*latest)
            log.info("home_assistant_online", republished=latest[0])

    def _read_record(self) -> dict[str, object]:
        try:
            document = orjson.loads(self._record_path.read_bytes())
        except FileNotFoundError:
            return {}
        except (OSError, orjson.JSONDecodeError) as exc:
            log.warning(
                "home_assistant_record_unreadable",
                path=str(self._record_path),
                error=str(exc),
                action="entities removed from the config while it was unreadable may stay "
                "in Home Assistant until deleted there",
            )
            return {}
        return document if isinstance(document, dict) else {}

    def _write_record(self, document: dict[str, object]) -> None:
        try:
            write_atomically(self._record_path, orjson.dumps(document), mode=0o600)
        except OSError as exc:
            log.warning(
                "home_assistant_record_not_written", path=str(self._record_path), error=str(exc)
            )
