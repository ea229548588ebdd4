"""The daemon's parts, built from the config and wired to each other.

Building does I/O (the hardware scan, the state folder's lock, the SQLite outbox, the session
files, the update keys), so ``Daemon.run`` builds the parts, never ``Daemon.__init__``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import paho.mqtt.client as paho
import structlog

from agent.config.schema import AgentConfig, DeliveryMode, PipelineConfig
from agent.daemon.integrations import Integrations
from agent.durable import lock_folder
from agent.errors import EdgeAgentError
from agent.hardware.detect import detect as detect_hardware
from agent.inference.pipeline import Pipeline
from agent.inference.registry import ModelRegistry
from agent.inference.reporting import ErrorReporter
from agent.inference.watcher import ModelFileWatcher
from agent.ops.metrics import MetricsServer
from agent.ops.telemetry import AgentView, HealthReporter
from agent.transport.delivery import Delivery
from agent.transport.mqtt import MqttConnection
from agent.transport.outbox import Outbox
from agent.transport.results import PendingResult, SeqCounter
from agent.transport.retained import RetainedPublisher
from agent.transport.session_memory import SessionMemory
from agent.updates.manager import UpdateManager

log = structlog.get_logger(__name__)


class Parts:
    """Everything one ``run`` serves with, built in dependency order from the config.

    Mutable: a reload replaces the config, the connections, the retained publisher, the
    delivery, the watcher and pipelines. So the callbacks handed to long-lived parts go
    through this object's methods, which read the current part, never bound methods of a
    part that may be replaced.
    """

    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.hardware = detect_hardware()
        prefix = config.topic_prefix
        # Results, telemetry and updates go through ``uplink``: the upstream broker when one
        # is configured, else the same connection the readings come from.
        self.connection, self.uplink = build_connections(config)
        self.retained = RetainedPublisher(self.uplink)
        self._state_lock = lock_folder(Path(config.state_dir))
        self.outbox = open_outbox(config)
        self.delivery = self.make_delivery(config)
        self.errors = ErrorReporter(
            lambda topic, payload: self.publish(topic, payload, 0), f"{prefix}/errors"
        )
        self.registry = ModelRegistry(
            config,
            self.hardware,
            lambda name, payload: self.retained.set(
                f"{self.config.topic_prefix}/models/{name}", payload
            ),
            on_failure=self.errors.report_model_failure,
            admission=self._admission,
        )
        self.updates = UpdateManager(
            config, self.registry, lambda topic, payload: self.publish(topic, payload, 1)
        )
        self.watcher = self.make_watcher(config)
        self.pipelines: dict[str, Pipeline] = {}
        self.health = HealthReporter(self.view())
        self.metrics: MetricsServer | None = None
        self.integrations = Integrations(self, config, self.hardware.summary())

    def start_pipeline(self, name: str, config: PipelineConfig) -> None:
        """Build, start and subscribe pipeline ``name``; one that cannot be built is logged
        and reported on the errors topic, and the others carry on."""
        try:
            pipeline = Pipeline(
                name,
                config,
                self.registry,
                deliver=self.deliver,
                acker=self.ack_token,
                seq=SeqCounter(self.outbox, name),
                errors=self.errors,
                models_dir=Path(self.config.models_dir),
                observe=self.integrations.observe_result,
                state_dir=Path(self.config.state_dir),
            )
        except EdgeAgentError as exc:
            log.error("pipeline_not_started", pipeline=name, error=str(exc))
            self.errors.report(name, config.input.topic, str(exc))
            return
        self.pipelines[name] = pipeline
        pipeline.start()
        self.connection.network_loop.add_after_read(pipeline.run_inline)
        self.connection.subscribe(pipeline.subscription())

    def connections_in_use(self) -> list[MqttConnection]:
        """The local connection, and the upstream one when there is one."""
        if self.uplink is self.connection:
            return [self.connection]
        return [self.connection, self.uplink]

    def publish_retained(self, topic: str, payload: bytes) -> None:
        """Make ``payload`` the retained value of ``topic`` on the current uplink (any
        thread; sent in order by the retained publisher)."""
        self.retained.set(topic, payload)

    def publish(self, topic: str, payload: bytes, qos: int, retain: bool = False) -> None:
        """Publish on the current uplink (any thread)."""
        self.uplink.publish(topic, payload, qos=qos, retain=retain)

    # Through these two methods, not bound methods of the parts: a reload may replace the
    # delivery and the connection while the pipelines keep running.
    def deliver(self, result: PendingResult, done: Callable[[], None] | None) -> None:
        """Hand a result to the current delivery (a pipeline's worker thread)."""
        self.delivery.submit(result, done)

    def ack_token(self, message: paho.MQTTMessage) -> Callable[[], None] | None:
        """The current readings' connection's acknowledgement of ``message`` (paho's thread)."""
        return self.connection.ack_token(message)

    def make_delivery(self, config: AgentConfig) -> Delivery:
        """A delivery for ``config`` onto whichever uplink is current when it sends."""
        return build_delivery(config, lambda: self.uplink, self.outbox)

    def make_watcher(self, config: AgentConfig) -> ModelFileWatcher:
        """A watcher of ``config``'s model files that reloads them into the registry."""
        return build_watcher(config, self.registry)

    def view(self) -> AgentView:
        """What telemetry reads, for the current config."""
        return AgentView(
            self.config.device_id,
            self.hardware,
            self.registry,
            lambda: self.pipelines,
            self.config.models_dir,
            self._delivery_health,
            groups=self.config.groups,
            interval_s=self.config.health.interval_s,
            update_keys=self.updates.key_status,
            update_versions=self.updates.versions,
            state_dir=self.config.state_dir,
        )

    def _admission(self, name: str, version: str) -> str | None:
        # Called on a loading thread; self.updates exists by then (it needs the registry).
        return self.updates.admission(name, version)

    def _delivery_health(self) -> dict[str, object]:
        connections = {"local": self.connection.connected.is_set()}
        if self.uplink is not self.connection:
            connections["upstream"] = self.uplink.connected.is_set()
        return {
            "mode": self.config.delivery,
            "connected": connections,
            "backlog": self.delivery.backlog,
            "outbox": {**self.outbox.stats(), "write_errors": self.delivery.store_errors},
        }


def build_connections(config: AgentConfig) -> tuple[MqttConnection, MqttConnection]:
    """(the readings' connection, the results' and telemetry's connection): one and the
    same unless ``upstream`` is set. At-least-once makes both sessions persistent and the
    readings' acknowledgements manual."""
    durable = config.delivery is DeliveryMode.AT_LEAST_ONCE
    status = f"{config.topic_prefix}/status"

    def memory(role: str) -> SessionMemory | None:
        return session_memory(config, role) if durable else None

    if config.upstream is None:
        local = MqttConnection(
            config.mqtt,
            status,
            persistent=durable,
            manual_ack=durable,
            session_memory=memory("local"),
            max_packet_bytes=config.max_packet_bytes(config.mqtt),
        )
        return local, local
    local = MqttConnection(
        config.mqtt,
        None,
        role="local",
        persistent=durable,
        manual_ack=durable,
        session_memory=memory("local"),
        max_packet_bytes=config.max_packet_bytes(config.mqtt),
    )
    return local, MqttConnection(
        config.upstream,
        status,
        role="upstream",
        persistent=durable,
        session_memory=memory("upstream"),
        max_packet_bytes=config.max_packet_bytes(config.upstream),
    )


def session_memory(config: AgentConfig, role: str) -> SessionMemory:
    """The remembered subscriptions of the ``role`` ("local", "upstream") connection."""
    return SessionMemory(Path(config.state_dir) / f"session-{role}.json")


def open_outbox(config: AgentConfig) -> Outbox:
    """The results' durable outbox in the state folder."""
    return Outbox(Path(config.state_dir), config.outbox.max_mb, config.outbox.max_age_s)


def build_delivery(
    config: AgentConfig, uplink: Callable[[], MqttConnection], outbox: Outbox
) -> Delivery:
    """The delivery of results onto ``uplink()``; at-least-once stores what waits in
    ``outbox``."""
    at_least_once = config.delivery is DeliveryMode.AT_LEAST_ONCE
    return Delivery(
        uplink,
        outbox if at_least_once else None,
        flush_rate=config.outbox.flush_rate,
        window=(config.upstream or config.mqtt).max_inflight,
    )


def build_watcher(config: AgentConfig, registry: ModelRegistry) -> ModelFileWatcher:
    """A watcher of ``config``'s model files; a changed file is reloaded when it is idle."""
    return ModelFileWatcher(
        {name: config.model_path(name) for name in config.models},
        registry.reload_if_idle,
        config.watch,
        models_dir=Path(config.models_dir),
    )
