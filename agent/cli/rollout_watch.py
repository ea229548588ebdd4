"""What a rollout hears from the broker: the devices' statuses about its updates, and their
retained status, health and model documents (for the fleet's membership and for the health
of a wave that took the update)."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as paho

from agent.cli.status import DeviceView, FleetCollector
from agent.cli.update_sender import TERMINAL, answers

WAITING_FOR_TRANSFER = "waiting_for_transfer"
# What a rollout reads from a device's health: membership, freshness, versions accepted.
HEALTH_KEYS = frozenset({"ts", "interval_s", "groups", "update_versions"})


@dataclass(frozen=True)
class Expected:
    """The manifest a device was sent: its update id and digest."""

    update_id: str
    manifest_sha256: str


class RolloutWatcher:
    """Collects the statuses that answer the manifests sent, one device at a time.

    The main thread says what it sent (``expect``) and takes what came (``take_finals``,
    ``take_waiting``); ``on_message`` runs on paho's network thread. The lock guards the
    three maps; the fleet collector keeps its own."""

    def __init__(self, prefix: str) -> None:
        self._levels = len(prefix.split("/"))
        self.fleet = FleetCollector(prefix, HEALTH_KEYS)
        self._lock = threading.Lock()
        self._expected: dict[str, Expected] = {}
        self._finals: dict[str, dict[str, Any]] = {}  # device -> final status, not yet taken
        self._waiting: set[str] = set()  # devices that asked for their chunks again
        self.statuses = 0  # status documents that answered a manifest sent (for figures)

    def expect(self, device: str, update_id: str, manifest_sha256: str) -> None:
        """``device`` was sent this manifest: its statuses about it count from now on (a
        final one of an earlier expectation not yet taken is dropped)."""
        with self._lock:
            self._expected[device] = Expected(update_id, manifest_sha256)
            self._finals.pop(device, None)
            self._waiting.discard(device)

    def take_finals(self) -> dict[str, dict[str, Any]]:
        """The final statuses that arrived since the last call, by device."""
        with self._lock:
            finals, self._finals = self._finals, {}
            return finals

    def take_waiting(self) -> set[str]:
        """Devices that reported ``waiting_for_transfer`` since the last call."""
        with self._lock:
            waiting, self._waiting = self._waiting, set()
            return waiting

    def devices(self, names: Iterable[str] | None = None) -> dict[str, DeviceView]:
        """The retained view of every device seen under the prefix (or of ``names``)."""
        return self.fleet.snapshot(names)

    # paho's network thread: short, and never raises.
    def on_message(self, client: paho.Client, userdata: Any, message: paho.MQTTMessage) -> None:
        """Route one message: statuses here, the retained documents to the collector."""
        parts = message.topic.split("/")
        if parts[self._levels + 1 : self._levels + 3] != ["updates", "status"]:
            self.fleet.on_message(client, userdata, message)
            return
        try:
            status = json.loads(message.payload)
        except ValueError:
            return
        if not isinstance(status, dict):
            return
        device = parts[self._levels]
        with self._lock:
            expected = self._expected.get(device)
            if expected is None or not answers(
                status, expected.update_id, expected.manifest_sha256
            ):
                return
            self.statuses += 1
            state = status.get("state")
            if state in TERMINAL:
                self._finals.setdefault(device, status)  # the first final word counts
            elif status.get("step") == WAITING_FOR_TRANSFER:
                self._waiting.add(device)
