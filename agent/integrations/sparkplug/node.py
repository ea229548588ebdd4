"""The agent as a Sparkplug B edge node: births, data, deaths and rebirths.

Threads: the "sparkplug" thread owns the session (``EdgeSession``: seq, aliases, devices) and
publishes every message but the will. The others only queue work under ``_cond``: paho's
thread its events (``link``), the pipelines' workers their results (``offer_result``), the
main thread health reports, reconfiguration and the stop.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import structlog

from agent.config.integrations import SparkplugConfig
from agent.config.schema import AgentConfig
from agent.integrations.sparkplug.feed import DeviceFeed, Offered, now_ms
from agent.integrations.sparkplug.link import (
    Connected,
    Disconnected,
    Event,
    HostState,
    RebirthRequested,
    SparkplugLink,
)
from agent.integrations.sparkplug.result_metrics import node_metrics
from agent.integrations.sparkplug.session import EdgeSession, Message, NodeTopics

log = structlog.get_logger(__name__)

STOP_TIMEOUT_S = 2.0


@dataclass(frozen=True)
class _Reconfigure:
    config: AgentConfig


class SparkplugNode:
    """Publishes the agent's health as node metrics and each result as device data."""

    def __init__(self, config: AgentConfig) -> None:
        settings = config.sparkplug
        broker = config.upstream if settings.broker == "upstream" else config.mqtt
        assert broker is not None, "the config check requires upstream for broker: upstream"
        self._config = config
        self._settings: SparkplugConfig = settings
        self._session = EdgeSession(NodeTopics(settings.group_id, settings.edge_node_id))
        self._link = SparkplugLink(
            broker, self._session.topics, settings.primary_host_id, self._put
        )
        self._cond = threading.Condition()
        self._events: deque[Event | _Reconfigure] = deque()
        self._results: deque[Offered] = deque()
        self._health: Mapping[str, Any] | None = None
        self._health_changed = False
        self._stopping = False
        # Counters (written by the sparkplug thread or under _cond; health reads them).
        self.dropped = 0  # results that did not fit history_max (under _cond)
        # The sparkplug thread's own state.
        self._connected = False
        self._host_online = settings.primary_host_id is None
        self._host_timestamp = -1
        self._feed = DeviceFeed(
            self._session,
            self._publish,
            max_devices=settings.max_devices,
            max_held=settings.history_max,
        )
        self._thread = threading.Thread(target=self._run, name="sparkplug", daemon=True)

    # -- any thread ------------------------------------------------------------------------

    def start(self) -> None:
        """Start the node's thread and connection."""
        self._thread.start()
        self._link.start()

    def offer_result(self, pipeline: str, topic: str, result: Mapping[str, Any]) -> None:
        """A result a pipeline published (its worker thread): sent as its device's DDATA,
        or kept (up to ``history_max``, the oldest dropped) until the host can have it."""
        with self._cond:
            if len(self._results) >= self._settings.history_max:
                if not self._results:
                    self.dropped += 1
                    return
                self._results.popleft()
                self.dropped += 1
            self._results.append(Offered(pipeline, topic, result, not self._session.born))
            self._cond.notify()

    def update_health(self, document: Mapping[str, Any]) -> None:
        """The latest health report (the main thread): NDATA with what changed."""
        with self._cond:
            self._health = document
            self._health_changed = True
            self._cond.notify()

    def reconfigure(self, config: AgentConfig) -> None:
        """A reloaded config (the main thread): devices of removed pipelines die, and a
        changed set of node metrics is born again. Sparkplug's own settings are not
        changed here: the daemon replaces the node for that."""
        self._put(_Reconfigure(config))

    def stop(self) -> None:
        """Publish NDEATH, disconnect and stop the thread (the main thread)."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._thread.join(timeout=STOP_TIMEOUT_S * 2)

    def stats(self) -> dict[str, Any]:
        """Figures for health."""
        return {
            "connected": self._connected,
            "born": self._session.born,
            "devices": self._session.device_count,
            "waiting": len(self._results),
            "dropped": self.dropped + self._feed.dropped,
            "refused_devices": self._feed.refused,
        }

    def _put(self, event: Event | _Reconfigure) -> None:
        # paho's thread (link events) or the main thread (reconfigure).
        with self._cond:
            self._events.append(event)
            self._cond.notify()

    # -- the sparkplug thread ----------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._cond:
                while not (
                    self._stopping
                    or self._events
                    or self._health_changed
                    or (self._results and self._session.born)
                    or self._birth_is_due()
                ):
                    self._cond.wait(self._until_birth())
                if self._stopping:
                    break
                events = list(self._events)
                self._events.clear()
                health = self._health if self._health_changed else None
                self._health_changed = False
            try:
                for event in events:
                    self._handle(event)
                if health is not None:
                    self._node_changed()
                if self._birth_is_due():
                    self._birth()
                self._send_results()
            except Exception:  # the node must never take the daemon down
                log.exception("sparkplug_failed")
        self._shut_down()

    def _handle(self, event: Event | _Reconfigure) -> None:
        if isinstance(event, Connected):
            self._connected = True
            self._session.connection_lost()  # a new session: everything is born again
            self._birth_if_ready()
        elif isinstance(event, Disconnected):
            self._connected = False
            self._session.connection_lost()
        elif isinstance(event, RebirthRequested):
            if self._session.born:
                self._birth()
        elif isinstance(event, HostState):
            self._host_state(event)
        else:
            self._reconfigured(event.config)

    def _host_state(self, state: HostState) -> None:
        if state.timestamp < self._host_timestamp:
            log.info("sparkplug_state_stale", online=state.online, timestamp=state.timestamp)
            return
        self._host_timestamp = state.timestamp
        self._host_online = state.online
        log.info("sparkplug_host_state", online=state.online, timestamp=state.timestamp)
        if state.online:
            self._birth_if_ready()
        elif self._session.born:
            # The specification: NDEATH, disconnect, and start over; the births wait for
            # the host's next online STATE.
            self._link.say_death(STOP_TIMEOUT_S)
            self._session.connection_lost()
            self._connected = False
            self._link.reconnect()

    def _reconfigured(self, config: AgentConfig) -> None:
        # A pipeline whose input topic changed names its devices anew: the old ones die.
        removed = [
            name
            for name, pipeline in self._config.pipelines.items()
            if name not in config.pipelines
            or config.pipelines[name].input.topic != pipeline.input.topic
        ]
        self._config = config
        for pipeline in removed:
            for device in self._session.devices_of(pipeline):
                if self._session.born:
                    self._publish(self._session.device_death(device, now_ms()))
                self._session.forget(device)
        self._node_changed()

    def _node_changed(self) -> None:
        """Health or the config changed: NDATA, or a new birth when the metric set did."""
        if not self._session.born:
            return
        metrics = self._node_metrics()
        if set(metrics) != self._session.node_metric_names():
            self._birth()
            return
        message = self._session.node_data(metrics, now_ms())
        if message is not None:
            self._publish(message)

    def _birth_if_ready(self) -> None:
        if self._connected and self._host_online and not self._session.born:
            self._birth()

    def _birth(self) -> None:
        """NBIRTH, then a DBIRTH per known device (the same bdSeq: no new CONNECT), then
        the results that waited for it."""
        now = now_ms()
        self._publish(self._session.node_birth(self._link.bdseq, self._node_metrics(), now))
        for device in self._session.devices():
            self._publish(self._session.device_birth(device, now))
        log.info("sparkplug_born", bdseq=self._link.bdseq, devices=len(self._session.devices()))
        self._feed.born(self._config.pipelines)

    def _birth_is_due(self) -> bool:
        due = self._feed.birth_due
        return due is not None and self._session.born and time.monotonic() >= due

    def _until_birth(self) -> float | None:
        due = self._feed.birth_due
        if due is None or not self._session.born:
            return None
        return max(0.0, due - time.monotonic())

    def _node_metrics(self) -> dict[str, Any]:
        with self._cond:
            health = self._health
        pipelines = self._config.pipelines
        drifting = [name for name, pipeline in pipelines.items() if pipeline.drift is not None]
        return node_metrics(self._config.models, pipelines, health, drifting)

    def _send_results(self) -> None:
        while self._session.born:
            with self._cond:
                if not self._results:
                    return
                item = self._results.popleft()
            self._feed.send(item, self._config.pipelines)

    def _publish(self, message: Message) -> None:
        if not self._link.publish(message):
            log.debug("sparkplug_publish_skipped", topic=message.topic)

    def _shut_down(self) -> None:
        if self._connected:
            self._link.say_death(STOP_TIMEOUT_S)
        self._link.stop()
        log.info("sparkplug_stopped")
