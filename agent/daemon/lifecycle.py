"""The daemon's lifecycle: connect, load models, serve pipelines, report health, reload the
config on SIGHUP, and stop cleanly on SIGTERM/SIGINT.

The main thread runs ``run``: start-up, then a loop that publishes health, performs
reloads and waits for a stop request. Signal handlers only set flags for that loop.
"""

from __future__ import annotations

import platform
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType

import onnxruntime
import paho.mqtt.client as paho
import structlog

from agent import __version__
from agent.config.schema import (
    AgentConfig,
    DeliveryMode,
    PipelineConfig,
    default_config,
    load_config,
)
from agent.durable import lock_folder
from agent.errors import ConfigError, EdgeAgentError
from agent.hardware.detect import detect as detect_hardware
from agent.hardware.providers import hints
from agent.inference.codecs import encode_json
from agent.inference.pipeline import Pipeline
from agent.inference.registry import ModelRegistry
from agent.inference.reporting import ErrorReporter
from agent.inference.watcher import ModelFileWatcher
from agent.logs import set_log_level
from agent.ops.metrics import MetricsServer
from agent.ops.systemd import SdNotifier, Watchdog, watchdog_interval
from agent.ops.telemetry import AgentView, HealthReporter
from agent.transport.delivery import Delivery
from agent.transport.mqtt import MqttConnection
from agent.transport.outbox import Outbox, PendingResult, SeqCounter
from agent.transport.retained import RetainedPublisher
from agent.transport.session_memory import SessionMemory
from agent.updates.manager import UpdateManager

log = structlog.get_logger(__name__)

# SIGTERM must end the process within 5 s (systemd's and the tests' expectation): most of it
# goes to finishing queued readings, the rest to saying "offline" and disconnecting.
DRAIN_DEADLINE_S = 2.0
FLUSH_DEADLINE_S = 1.0
OFFLINE_DEADLINE_S = 1.0
# While starting (model loads, waiting for the broker) ask systemd for this much more time,
# this often, so a slow TensorRT build or a broker down at boot is not a failed start.
EXTEND_TIMEOUT_S = 30.0
EXTEND_EVERY_S = 10.0
MAIN_LOOP_TICK_S = 0.2
FIRST_SUBSCRIBE_WAIT_S = 5.0


class Daemon:
    """Owns the connection, the model registry and the pipelines for one ``run``."""

    def __init__(
        self, config: AgentConfig, source: Path | None, log_level_override: str | None = None
    ) -> None:
        self.config = config
        self.source = source
        self._log_level_override = log_level_override
        self._stop = threading.Event()
        self._reload = threading.Event()
        # Written only by the signal handlers, with plain assignments: a handler runs on the
        # main thread between two bytecodes, possibly while that thread holds the very lock
        # Event.set() would take (a deadlock seen in CI). The main thread turns them into
        # requests (_take_signals).
        self._stop_signal: str | None = None
        self._hangups = 0
        self._hangups_seen = 0
        self._main_tick = time.monotonic()
        self.notifier = SdNotifier.from_environment()
        self.hardware = detect_hardware()
        prefix = config.topic_prefix
        # Results, telemetry and updates go through ``uplink``: the upstream broker when one
        # is configured, else the same connection the readings come from.
        self.connection, self.uplink = _connections(config)
        self.retained = RetainedPublisher(self.uplink)
        self._state_lock = lock_folder(Path(config.state_dir))
        self.outbox = Outbox(Path(config.state_dir), config.outbox.max_mb, config.outbox.max_age_s)
        self.delivery = self._make_delivery(config)
        self.errors = ErrorReporter(
            lambda topic, payload: self._publish(topic, payload, 0), f"{prefix}/errors"
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
            config, self.registry, lambda topic, payload: self._publish(topic, payload, 1)
        )
        self.watcher = self._make_watcher(config)
        self.pipelines: dict[str, Pipeline] = {}
        self.health = HealthReporter(self._view())
        self.metrics: MetricsServer | None = None

    # -- control (any thread) ----------------------------------------------------------------

    def request_stop(self) -> None:
        """Ask ``run`` to stop."""
        self._stop.set()

    def request_reload(self) -> None:
        """Ask ``run`` to re-read the config."""
        self._reload.set()

    # -- the main thread ---------------------------------------------------------------------

    def run(self) -> int:
        """Serve until asked to stop; returns the process exit code."""
        self._install_signal_handlers()
        log.info(
            "agent_starting",
            version=__version__,
            device_id=self.config.device_id,
            machine=platform.machine(),
            python=platform.python_version(),
            onnxruntime=onnxruntime.__version__,
            config=str(self.source) if self.source else "built-in defaults",
            models=len(self.config.models),
            pipelines=len(self.config.pipelines),
        )
        self._log_hardware()
        self._warn_unmet_settings()
        self.notifier.status("starting: loading models")
        extender = _StartupExtender(self.notifier)
        extender.start()
        try:
            self.retained.start()
            # At-least-once: the readings' broker is connected only once the pipelines can
            # take them. Its persistent session delivers what waited at once, and readings
            # nobody routes, or that arrive before the model serves, would be lost.
            connect_late = self.config.delivery is DeliveryMode.AT_LEAST_ONCE
            if self.uplink is not self.connection:
                self.uplink.start()
            if not connect_late:
                self.connection.start()
            self.delivery.start()
            # Before any model loads: a model left half-way through an update's trial by a
            # crash is rolled back now, so it never serves.
            self.updates.recover()
            # Watch first: a file that changes during the initial load is loaded again (a
            # no-op when the bytes did not change) instead of being missed.
            self.watcher.start()
            self.registry.load_all()
            for name, pipeline_config in self.config.pipelines.items():
                self._start_pipeline(name, pipeline_config)
            self._start_updates()
            if connect_late:
                self.connection.start()
                self._wait_subscribed()
            self._start_metrics()
            log.info("agent_serving", pipelines=list(self.pipelines))
            self._wait_for_broker()
        finally:
            extender.stop()
        if self._stop_requested():
            return self._shutdown()
        self.notifier.ready(self._status_line())
        watchdog = self._start_watchdog()
        next_health = time.monotonic()
        while not self._stop_requested():
            self._main_tick = time.monotonic()
            if self._reload.is_set():
                self._reload.clear()
                self._apply_reload()
            if time.monotonic() >= next_health:
                self._publish_health()
                next_health = time.monotonic() + self.config.health.interval_s
            self._stop.wait(MAIN_LOOP_TICK_S)
        if watchdog is not None:
            watchdog.stop()
        return self._shutdown()

    def _stop_requested(self) -> bool:
        """Whether to stop: asked by ``request_stop`` or by a signal (logged here, on the
        main thread, where taking the log's locks is safe). A SIGHUP becomes a reload
        request."""
        if self._hangups != self._hangups_seen:
            self._hangups_seen = self._hangups
            log.info("signal_received", signal="SIGHUP")
            self._reload.set()
        if self._stop_signal is not None and not self._stop.is_set():
            log.info("signal_received", signal=self._stop_signal)
            self._stop.set()
        return self._stop.is_set()

    def _wait_subscribed(self) -> None:
        """A little while for the first connect to take the subscriptions (readings sent
        before a first-ever subscription exists are not kept by any broker); a broker that
        is down is waited for by ``_wait_for_broker`` instead."""
        deadline = time.monotonic() + FIRST_SUBSCRIBE_WAIT_S
        while time.monotonic() < deadline and not self._stop_requested():
            if self.connection.wait_subscribed(0.1):
                return

    def _wait_for_broker(self) -> None:
        mqtt = self.config.mqtt
        while not self.connection.connected.wait(1.0):
            if self._stop_requested():
                return
            self.notifier.status(f"waiting for the MQTT broker {mqtt.host}:{mqtt.port}")

    def _shutdown(self) -> int:
        started = time.monotonic()
        log.info("agent_stopping")
        self.notifier.stopping()
        if self.config.delivery is DeliveryMode.AT_LEAST_ONCE:
            # Keep the subscriptions: the persistent session collects what arrives until
            # the next start. What comes meanwhile is left unacknowledged, so it comes again.
            for pipeline in self.pipelines.values():
                pipeline.close_intake()
        else:
            for connection in self._connections():
                connection.unsubscribe_all()
        # A warm-up still running (an update's trial, a reload) is stopped now: exiting with a
        # thread inside onnxruntime's run ends the process with SIGABRT.
        self.registry.cancel_loads()
        self.updates.stop()
        self.watcher.stop()
        deadline = started + DRAIN_DEADLINE_S
        for pipeline in self.pipelines.values():
            pipeline.stop(max(0.0, deadline - time.monotonic()), final=True)
        if not self.uplink.flush(FLUSH_DEADLINE_S):
            log.warning(
                "results_not_acknowledged",
                count=self.uplink.unacked,
                reason="the broker did not acknowledge them before the stop deadline; "
                "at_least_once: their readings are delivered again after the restart",
            )
        self.delivery.stop()
        if self.metrics is not None:
            self.metrics.stop()
        self.retained.stop()
        for connection in self._connections():
            connection.stop(timeout_s=OFFLINE_DEADLINE_S)
        self.outbox.close()
        log.info("agent_stopped", took_s=round(time.monotonic() - started, 3))
        return 0

    def _start_pipeline(self, name: str, config: PipelineConfig) -> None:
        try:
            pipeline = Pipeline(
                name,
                config,
                self.registry,
                deliver=self._deliver,
                acker=self._ack_token,
                seq=SeqCounter(self.outbox, name),
                errors=self.errors,
                models_dir=Path(self.config.models_dir),
            )
        except EdgeAgentError as exc:
            log.error("pipeline_not_started", pipeline=name, error=str(exc))
            self.errors.report(name, config.input.topic, str(exc))
            return
        self.pipelines[name] = pipeline
        pipeline.start()
        self.connection.subscribe(pipeline.subscription())

    def _admission(self, name: str, version: str) -> str | None:
        # Called on a loading thread; self.updates exists by then (it needs the registry).
        return self.updates.admission(name, version)

    def _start_updates(self) -> None:
        for subscription in self.updates.subscriptions():
            self.uplink.subscribe(subscription)
        self.updates.start()

    def _start_metrics(self) -> None:
        listen = self.config.metrics.listen
        if listen is None:
            return
        host = listen.rpartition(":")[0].strip("[]")
        if host not in ("127.0.0.1", "localhost", "::1"):
            log.warning(
                "metrics_exposed",
                address=listen,
                reason="the metrics endpoint has no authentication; listen on "
                "127.0.0.1 and scrape through a tunnel or a local Prometheus agent, or "
                "firewall the port",
            )
        self.metrics = MetricsServer(listen, self._view())
        try:
            self.metrics.start()
        except OSError as exc:
            log.error("metrics_not_started", address=listen, error=str(exc))
            self.metrics = None

    def _start_watchdog(self) -> Watchdog | None:
        interval = watchdog_interval()
        if interval is None or not self.notifier.enabled:
            return None
        watchdog = Watchdog(self.notifier, interval, self.progress_problem)
        watchdog.start()
        log.info("watchdog_started", interval_s=interval)
        return watchdog

    def progress_problem(self) -> str | None:
        """Why the daemon is not making progress, or None (the systemd watchdog's check)."""
        now = time.monotonic()
        if not self.connection.loop_alive:
            return "the MQTT network loop is not running"
        if (
            now - self._main_tick > max(10.0, self.config.health.interval_s * 2)
            and not self.registry.loading
        ):  # a reload may legitimately take minutes
            return "the main loop is stuck"
        limit = self.config.health.stuck_after_s
        for name, pipeline in self.pipelines.items():
            stuck = pipeline.stuck_for(now)
            if stuck is not None and stuck > limit:
                return (
                    f"pipeline {name!r} worker has been inside one batch for "
                    f"{stuck:.0f} s (health.stuck_after_s {limit:g})"
                )
        return None

    def _publish_health(self) -> None:
        try:
            document = self.health.report()
            self.retained.set(f"{self.config.topic_prefix}/health", encode_json(document))
            self.notifier.status(self._status_line(document))
        except Exception:  # telemetry must never take the daemon down
            log.exception("health_report_failed")

    def _status_line(self, health: dict[str, object] | None = None) -> str:
        ready = sum(1 for name in self.registry.names() if self.registry.get(name) is not None)
        models = len(self.registry.names())
        line = (
            f"serving {len(self.pipelines)} pipeline{'' if len(self.pipelines) == 1 else 's'}"
            f", {ready}/{models} model{'' if models == 1 else 's'} ready, "
            f"{'connected' if self.connection.connected.is_set() else 'broker down'}"
        )
        if health is not None:
            pipelines = health.get("pipelines")
            if isinstance(pipelines, dict):
                rate = sum(float(p.get("throughput", 0)) for p in pipelines.values())
                line += f", {rate:.0f} readings/s"
        return line

    def _publish(self, topic: str, payload: bytes, qos: int, retain: bool = False) -> None:
        self.uplink.publish(topic, payload, qos=qos, retain=retain)

    # Through these two methods, not bound methods of the parts: a reload may replace the
    # delivery and the connection while the pipelines keep running.
    def _deliver(self, result: PendingResult, done: Callable[[], None] | None) -> None:
        self.delivery.submit(result, done)

    def _ack_token(self, message: paho.MQTTMessage) -> Callable[[], None] | None:
        return self.connection.ack_token(message)

    def _connections(self) -> list[MqttConnection]:
        """The local connection, and the upstream one when there is one."""
        if self.uplink is self.connection:
            return [self.connection]
        return [self.connection, self.uplink]

    def _make_delivery(self, config: AgentConfig) -> Delivery:
        at_least_once = config.delivery is DeliveryMode.AT_LEAST_ONCE
        return Delivery(
            lambda: self.uplink,
            self.outbox if at_least_once else None,
            flush_rate=config.outbox.flush_rate,
            window=(config.upstream or config.mqtt).max_inflight,
        )

    def _delivery_health(self) -> dict[str, object]:
        connections = {"local": self.connection.connected.is_set()}
        if self.uplink is not self.connection:
            connections["upstream"] = self.uplink.connected.is_set()
        return {
            "mode": self.config.delivery,
            "connected": connections,
            "backlog": self.delivery.backlog,
            "outbox": self.outbox.stats(),
        }

    # -- SIGHUP ------------------------------------------------------------------------------

    def _apply_reload(self) -> None:
        """Re-read the config and apply it; an invalid one is refused and the old one kept."""
        self.notifier.reloading()
        log.info("config_reloading", path=str(self.source) if self.source else None)
        try:
            new = load_config(self.source) if self.source else default_config()
        except ConfigError as exc:
            for problem in exc.problems:
                log.error("config_reload_refused", problem=str(problem))
            # Where, not what: a problem's text may quote the value, and the value may be a
            # secret. The log and `edge-agent check-config` on the device have the details.
            where = ", ".join(
                sorted({f"{p.file}:{p.line} {p.key or '(top level)'}" for p in exc.problems})
            )
            self.errors.report_step(
                f"config reload refused, still running the previous "
                f"config: {len(exc.problems)} problem(s) at {where}; "
                "run `edge-agent check-config` on the device for details"
            )
            self.notifier.ready("reload refused (invalid config); " + self._status_line())
            return
        old = self.config
        if new == old:
            log.info("config_unchanged")
            self.notifier.ready(self._status_line())
            return
        reconnect = (new.mqtt, new.upstream, new.delivery) != (old.mqtt, old.upstream, old.delivery)
        self.config = new
        if self._log_level_override is None:
            set_log_level(new.log_level)
        if reconnect:
            self._reconnect(new)
        self.outbox.set_bounds(new.outbox.max_mb, new.outbox.max_age_s)
        self.delivery.flush_rate = new.outbox.flush_rate
        if new.state_dir != old.state_dir:
            log.warning(
                "restart_needed",
                key="state_dir",
                active=old.state_dir,
                reason="the outbox and update state stay where they are until the agent restarts",
            )
        self._reconfigure_updates(old, new, reconnect)
        removed_models = self.registry.reconfigure(new)
        changed_pipelines = self._diff_pipelines(old, new)
        self._reload_models(old, new, changed_pipelines)
        if (
            removed_models
            or {n: m.file for n, m in new.models.items()}
            != {n: m.file for n, m in old.models.items()}
            or new.watch != old.watch
            or new.models_dir != old.models_dir
        ):
            self.watcher.stop()
            self.watcher = self._make_watcher(new)
            self.watcher.start()
        self._apply_pipelines(old, new, changed_pipelines)
        self.health.update_view(self._view())
        log.info(
            "config_reloaded",
            reconnected=reconnect,
            removed_models=removed_models,
            pipelines=list(self.pipelines),
        )
        self.notifier.ready(self._status_line())

    def _reconfigure_updates(self, old: AgentConfig, new: AgentConfig, reconnected: bool) -> None:
        before = self.updates.subscriptions()
        self.updates.reconfigure(new)
        if reconnected:
            return  # the new connection subscribed to the new topics already
        after = {s.subscribe_filter for s in self.updates.subscriptions()}
        for subscription in before:
            if subscription.subscribe_filter not in after:
                self.uplink.unsubscribe(subscription.subscribe_filter)
        for subscription in self.updates.subscriptions():
            if subscription.subscribe_filter not in {s.subscribe_filter for s in before}:
                self.uplink.subscribe(subscription)

    def _diff_pipelines(self, old: AgentConfig, new: AgentConfig) -> set[str]:
        return {
            name
            for name, config in new.pipelines.items()
            if name in old.pipelines and old.pipelines[name] != config
        }

    def _reload_models(self, old: AgentConfig, new: AgentConfig, changed: set[str]) -> None:
        """Load new models; rebuild those whose settings or users' pipelines changed."""
        users_changed = {new.pipelines[name].model for name in changed} | {
            config.model for name, config in new.pipelines.items() if name not in old.pipelines
        }
        for name, model in new.models.items():
            if name not in old.models:
                self.registry.load(name)
            elif (
                model != old.models[name]
                or name in users_changed
                or new.providers != old.providers
                or new.models_dir != old.models_dir
            ):
                self.registry.load(name, force=True)

    def _apply_pipelines(self, old: AgentConfig, new: AgentConfig, changed: set[str]) -> None:
        for name in [n for n in old.pipelines if n not in new.pipelines]:
            pipeline = self.pipelines.pop(name, None)
            if pipeline is not None:
                self.connection.unsubscribe(pipeline.subscription().subscribe_filter)
                pipeline.stop(DRAIN_DEADLINE_S)
        for name in changed:
            previous = self.pipelines.pop(name, None)
            self._start_pipeline(name, new.pipelines[name])
            if previous is not None:
                old_filter = previous.subscription().subscribe_filter
                if (
                    name not in self.pipelines
                    or self.pipelines[name].subscription().subscribe_filter != old_filter
                ):
                    self.connection.unsubscribe(old_filter)
                previous.stop(DRAIN_DEADLINE_S)
        for name in [n for n in new.pipelines if n not in old.pipelines]:
            self._start_pipeline(name, new.pipelines[name])

    def _reconnect(self, new: AgentConfig) -> None:
        """Broker or delivery settings changed: say offline, connect anew, subscribe
        everything again."""
        log.info(
            "mqtt_reconnecting",
            host=new.mqtt.host,
            port=new.mqtt.port,
            upstream=f"{new.upstream.host}:{new.upstream.port}" if new.upstream else None,
            delivery=new.delivery,
        )
        self.retained.stop()
        self.delivery.stop()
        for connection in self._connections():
            connection.stop(timeout_s=OFFLINE_DEADLINE_S)
        self.connection, self.uplink = _connections(new)
        self.retained = RetainedPublisher(self.uplink)
        self.delivery = self._make_delivery(new)
        self.errors.set_topic(f"{new.topic_prefix}/errors")
        for pipeline in self.pipelines.values():
            self.connection.subscribe(pipeline.subscription())
        self.updates.reconfigure(new)
        for subscription in self.updates.subscriptions():
            self.uplink.subscribe(subscription)
        self.retained.start()
        for connection in self._connections():
            connection.start()
        self.delivery.start()
        for name in self.registry.names():
            self.retained.set(
                f"{new.topic_prefix}/models/{name}", self.registry.status(name).to_json()
            )

    def _view(self) -> AgentView:
        return AgentView(
            self.config.device_id,
            self.hardware,
            self.registry,
            lambda: self.pipelines,
            self.config.models_dir,
            self._delivery_health,
            groups=self.config.groups,
            interval_s=self.config.health.interval_s,
        )

    def _make_watcher(self, config: AgentConfig) -> ModelFileWatcher:
        return ModelFileWatcher(
            {name: config.model_path(name) for name in config.models},
            self.registry.reload_if_idle,
            config.watch,
        )

    # -- start-up helpers --------------------------------------------------------------------

    def _install_signal_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # embedded use (tests): the owner calls request_stop()/request_reload()

        # Run on the main thread, between bytecodes of whatever it was doing: they only
        # assign (no lock, no logging); _stop_requested acts on it within a loop tick.
        def on_stop(signum: int, frame: FrameType | None) -> None:
            self._stop_signal = signal.Signals(signum).name

        def on_reload(signum: int, frame: FrameType | None) -> None:
            self._hangups += 1

        signal.signal(signal.SIGTERM, on_stop)
        signal.signal(signal.SIGINT, on_stop)
        signal.signal(signal.SIGHUP, on_reload)

    def _log_hardware(self) -> None:
        available = onnxruntime.get_available_providers()
        log.info(
            "hardware_detected",
            summary=self.hardware.summary(),
            board=self.hardware.board,
            available_providers=available,
        )
        for hint in hints(self.hardware, available):
            log.warning("provider_hint", hint=hint)

    def _warn_unmet_settings(self) -> None:
        """Say loudly which settings cannot do what the config asks for."""
        config = self.config
        if config.delivery is DeliveryMode.AT_LEAST_ONCE:
            qos0 = [
                name
                for name, p in config.pipelines.items()
                if p.input.qos == 0 or p.output.qos == 0
            ]
            if qos0:
                log.warning(
                    "delivery_not_guaranteed",
                    pipelines=qos0,
                    reason="at_least_once needs input.qos and output.qos 1: QoS 0 "
                    "messages are never redelivered",
                )


def _connections(config: AgentConfig) -> tuple[MqttConnection, MqttConnection]:
    """(the readings' connection, the results' and telemetry's connection): one and the
    same unless ``upstream`` is set. At-least-once makes both sessions persistent and the
    readings' acknowledgements manual."""
    durable = config.delivery is DeliveryMode.AT_LEAST_ONCE
    status = f"{config.topic_prefix}/status"
    state = Path(config.state_dir)

    def memory(role: str) -> SessionMemory | None:
        return SessionMemory(state / f"session-{role}.json") if durable else None

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


class _StartupExtender:
    """Sends EXTEND_TIMEOUT_USEC while the daemon starts, so systemd's start timeout does not
    kill a device that is building TensorRT engines or waiting for its broker."""

    def __init__(self, notifier: SdNotifier) -> None:
        self._notifier = notifier
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sd-extend", daemon=True)

    def start(self) -> None:
        if self._notifier.enabled:
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=2)

    def _run(self) -> None:
        while True:
            self._notifier.extend_timeout(EXTEND_TIMEOUT_S)
            if self._stop.wait(EXTEND_EVERY_S):
                return
