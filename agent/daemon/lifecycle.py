"""The daemon's lifecycle: connect, load models, serve pipelines, report health, reload the
config on SIGHUP, and stop cleanly on SIGTERM/SIGINT.

The main thread runs ``run``: start-up, then a loop that publishes health, performs
reloads and waits for a stop request. Signal handlers only set flags for that loop.
The parts are built by ``agent.daemon.wiring``; a reload is planned and applied by
``agent.daemon.reload``.
"""

from __future__ import annotations

import platform
import signal
import threading
import time
from pathlib import Path
from types import FrameType

import onnxruntime
import structlog

from agent import __version__
from agent.config.loader import default_config, load_config
from agent.config.schema import AgentConfig, DeliveryMode
from agent.daemon.deadlines import DRAIN_DEADLINE_S, FLUSH_DEADLINE_S, OFFLINE_DEADLINE_S
from agent.daemon.reload import apply_plan, plan_reload
from agent.daemon.wakeup import Wakeup
from agent.daemon.wiring import Parts
from agent.errors import ConfigError
from agent.hardware.detect import Hardware
from agent.hardware.providers import hints
from agent.inference.codecs import encode_json
from agent.inference.reporting import ErrorReporter
from agent.logs import set_log_level
from agent.ops.metrics import MetricsServer
from agent.ops.systemd import SdNotifier, StartupExtender, Watchdog, watchdog_interval

log = structlog.get_logger(__name__)

# The longest the main loop waits: it also checks the other threads' progress for the
# systemd watchdog (``_main_tick``), and a signal or request ends the wait at once.
MAIN_LOOP_MAX_WAIT_S = 5.0
FIRST_SUBSCRIBE_WAIT_S = 5.0


class Daemon:
    """Runs the agent: builds its ``Parts`` (connections, registry, pipelines, ...) in
    ``run``, serves until SIGTERM, applies SIGHUP reloads, and stops everything in order.

    Constructing one does no I/O (the CLI and tests may build one and never run it): ``run``
    scans the hardware, locks the state folder, opens the outbox and builds the other parts.
    """

    def __init__(
        self, config: AgentConfig, source: Path | None, log_level_override: str | None = None
    ) -> None:
        self._initial_config = config
        self.source = source
        self._log_level_override = log_level_override
        self._stop = threading.Event()
        self._reload = threading.Event()
        self._signals = _SignalFlags()
        self._wakeup = Wakeup()
        self._main_tick = time.monotonic()
        self.notifier = SdNotifier.from_environment()
        self._parts: Parts | None = None  # built by run

    @property
    def config(self) -> AgentConfig:
        """The config served: the one given, and after a reload the reloaded one."""
        return self._initial_config if self._parts is None else self._parts.config

    @property
    def parts(self) -> Parts:
        """The running parts; only once ``run`` has built them."""
        assert self._parts is not None, "Daemon.run builds the parts"
        return self._parts

    # -- control (any thread) ----------------------------------------------------------------

    def request_stop(self) -> None:
        """Ask ``run`` to stop."""
        self._stop.set()
        self._wakeup.poke()

    def request_reload(self) -> None:
        """Ask ``run`` to re-read the config."""
        self._reload.set()
        self._wakeup.poke()

    # -- the main thread ---------------------------------------------------------------------

    def run(self) -> int:
        """Serve until asked to stop; returns the process exit code."""
        parts = self._parts = Parts(self._initial_config)
        self._signals.install()
        self._wakeup.install()
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
        _log_hardware(parts.hardware)
        _warn_unmet_settings(self.config)
        self.notifier.status("starting: loading models")
        extender = StartupExtender(self.notifier)
        extender.start()
        try:
            self._start(parts)
        finally:
            extender.stop()
        if self._stop_requested():
            return self._shutdown(parts)
        self.notifier.ready(_status_line(parts))
        watchdog = self._start_watchdog()
        next_health = time.monotonic()
        while not self._stop_requested():
            self._main_tick = time.monotonic()
            if self._reload.is_set():
                self._reload.clear()
                self._apply_reload(parts)
            if time.monotonic() >= next_health:
                self._publish_health(parts)
                next_health = time.monotonic() + self.config.health.interval_s
            if not self._stop.is_set():
                self._wakeup.wait(min(next_health - time.monotonic(), MAIN_LOOP_MAX_WAIT_S))
        if watchdog is not None:
            watchdog.stop()
        self._wakeup.close()
        return self._shutdown(parts)

    def _start(self, parts: Parts) -> None:
        """Start the parts in the order that loses no reading, then wait for the broker."""
        parts.retained.start()
        # At-least-once: the readings' broker is connected only once the pipelines can
        # take them. Its persistent session delivers what waited at once, and readings
        # nobody routes, or that arrive before the model serves, would be lost.
        connect_late = self.config.delivery is DeliveryMode.AT_LEAST_ONCE
        if parts.uplink is not parts.connection:
            parts.uplink.start()
        if not connect_late:
            parts.connection.start()
        parts.delivery.start()
        # Before any model loads: a model left half-way through an update's trial by a
        # crash is rolled back now, so it never serves.
        parts.updates.recover()
        # Watch first: a file that changes during the initial load is loaded again (a
        # no-op when the bytes did not change) instead of being missed.
        parts.watcher.start()
        parts.registry.load_all()
        for name, pipeline_config in self.config.pipelines.items():
            parts.start_pipeline(name, pipeline_config)
        for subscription in parts.updates.subscriptions():
            parts.uplink.subscribe(subscription)
        parts.updates.start()
        parts.integrations.start(self.config)
        if connect_late:
            parts.connection.start()
            self._wait_subscribed(parts)
        parts.metrics = _start_metrics(parts)
        log.info("agent_serving", pipelines=list(parts.pipelines))
        self._wait_for_broker(parts)

    def _stop_requested(self) -> bool:
        """Whether to stop: asked by ``request_stop`` or by a signal (logged here, on the
        main thread, where taking the log's locks is safe). A SIGHUP becomes a reload
        request."""
        if self._signals.take_hangup():
            log.info("signal_received", signal="SIGHUP")
            self._reload.set()
        stop_signal = self._signals.stop_signal
        if stop_signal is not None and not self._stop.is_set():
            log.info("signal_received", signal=stop_signal)
            self._stop.set()
        return self._stop.is_set()

    def _wait_subscribed(self, parts: Parts) -> None:
        """A little while for the first connect to take the subscriptions (readings sent
        before a first-ever subscription exists are not kept by any broker); a broker that
        is down is waited for by ``_wait_for_broker`` instead."""
        deadline = time.monotonic() + FIRST_SUBSCRIBE_WAIT_S
        while time.monotonic() < deadline and not self._stop_requested():
            if parts.connection.wait_subscribed(0.1):
                return

    def _wait_for_broker(self, parts: Parts) -> None:
        mqtt = self.config.mqtt
        while not parts.connection.connected.wait(1.0):
            if self._stop_requested():
                return
            self.notifier.status(f"waiting for the MQTT broker {mqtt.host}:{mqtt.port}")

    def _shutdown(self, parts: Parts) -> int:
        started = time.monotonic()
        log.info("agent_stopping")
        self.notifier.stopping()
        if self.config.delivery is DeliveryMode.AT_LEAST_ONCE:
            # Keep the subscriptions: the persistent session collects what arrives until
            # the next start. What comes meanwhile is left unacknowledged, so it comes again.
            for pipeline in parts.pipelines.values():
                pipeline.close_intake()
        else:
            for connection in parts.connections_in_use():
                connection.unsubscribe_all()
        # A warm-up still running (an update's trial, a reload) is stopped now: exiting with a
        # thread inside onnxruntime's run ends the process with SIGABRT.
        parts.registry.cancel_loads()
        parts.updates.stop()
        parts.watcher.stop()
        deadline = started + DRAIN_DEADLINE_S
        for pipeline in parts.pipelines.values():
            pipeline.stop(max(0.0, deadline - time.monotonic()), final=True)
        if not parts.uplink.flush(FLUSH_DEADLINE_S):
            log.warning(
                "results_not_acknowledged",
                count=parts.uplink.unacked,
                reason="the broker did not acknowledge them before the stop deadline; "
                "at_least_once: their readings are delivered again after the restart",
            )
        parts.delivery.stop()
        parts.integrations.stop()
        if parts.metrics is not None:
            parts.metrics.stop()
        parts.retained.stop()
        for connection in parts.connections_in_use():
            connection.stop(timeout_s=OFFLINE_DEADLINE_S)
        parts.outbox.close()
        log.info("agent_stopped", took_s=round(time.monotonic() - started, 3))
        return 0

    def _start_watchdog(self) -> Watchdog | None:
        interval = watchdog_interval()
        if interval is None or not self.notifier.enabled:
            return None
        watchdog = Watchdog(self.notifier, interval, self.progress_problem)
        watchdog.start()
        log.info("watchdog_started", interval_s=interval)
        return watchdog

    def progress_problem(self) -> str | None:
        """Why the daemon is not making progress, or None (the systemd watchdog's check,
        on its thread); None before ``run`` has built the parts."""
        if self._parts is None:
            return None
        return _progress_problem(self._parts, self._main_tick)

    def _publish_health(self, parts: Parts) -> None:
        try:
            document = parts.health.report()
            parts.integrations.health(document)
            parts.retained.set(f"{self.config.topic_prefix}/health", encode_json(document))
            self.notifier.status(_status_line(parts, document))
        except Exception:  # telemetry must never take the daemon down
            log.exception("health_report_failed")

    # -- SIGHUP ------------------------------------------------------------------------------

    def _apply_reload(self, parts: Parts) -> None:
        """Re-read the config and apply it; an invalid one is refused and the old one kept."""
        self.notifier.reloading()
        log.info("config_reloading", path=str(self.source) if self.source else None)
        try:
            new = load_config(self.source) if self.source else default_config()
        except ConfigError as exc:
            _report_refused_reload(exc, parts.errors)
            self.notifier.ready("reload refused (invalid config); " + _status_line(parts))
            return
        plan = plan_reload(parts.config, new)
        if not plan.changed:
            log.info("config_unchanged")
            self.notifier.ready(_status_line(parts))
            return
        if self._log_level_override is None:
            set_log_level(new.log_level)
        old = parts.config
        removed_models = apply_plan(parts, plan, new)
        parts.integrations.reload(old, new, reconnected=plan.reconnect)
        log.info(
            "config_reloaded",
            reconnected=plan.reconnect,
            removed_models=removed_models,
            pipelines=list(parts.pipelines),
        )
        self.notifier.ready(_status_line(parts))


class _SignalFlags:
    """SIGTERM, SIGINT and SIGHUP as flags for the main loop to act on.

    Written only by the signal handlers, with plain assignments: a handler runs on the
    main thread between two bytecodes, possibly while that thread holds the very lock
    Event.set() would take (a deadlock seen in CI). The main thread turns them into
    requests (``Daemon._stop_requested``).
    """

    def __init__(self) -> None:
        self.stop_signal: str | None = None  # the name of the latest stop signal
        self._hangups = 0
        self._hangups_seen = 0

    def install(self) -> None:
        """Handle the signals (from the main thread only; elsewhere nothing is done)."""
        if threading.current_thread() is not threading.main_thread():
            return  # embedded use (tests): the owner calls request_stop()/request_reload()

        # Run on the main thread, between bytecodes of whatever it was doing: they only
        # assign (no lock, no logging); _stop_requested acts on it within a loop tick.
        def on_stop(signum: int, frame: FrameType | None) -> None:
            self.stop_signal = signal.Signals(signum).name

        def on_reload(signum: int, frame: FrameType | None) -> None:
            self._hangups += 1

        signal.signal(signal.SIGTERM, on_stop)
        signal.signal(signal.SIGINT, on_stop)
        signal.signal(signal.SIGHUP, on_reload)

    def take_hangup(self) -> bool:
        """Whether a SIGHUP came since the last call (main thread)."""
        if self._hangups == self._hangups_seen:
            return False
        self._hangups_seen = self._hangups
        return True


def _status_line(parts: Parts, health: dict[str, object] | None = None) -> str:
    """The one line ``systemctl status`` shows."""
    registry = parts.registry
    ready = sum(1 for name in registry.names() if registry.get(name) is not None)
    models = len(registry.names())
    pipelines = len(parts.pipelines)
    line = (
        f"serving {pipelines} pipeline{'' if pipelines == 1 else 's'}"
        f", {ready}/{models} model{'' if models == 1 else 's'} ready, "
        f"{'connected' if parts.connection.connected.is_set() else 'broker down'}"
    )
    if health is not None:
        reported = health.get("pipelines")
        if isinstance(reported, dict):
            rate = sum(float(p.get("throughput", 0)) for p in reported.values())
            line += f", {rate:.0f} readings/s"
    return line


def _progress_problem(parts: Parts, main_tick: float) -> str | None:
    """Why the parts are not making progress (``main_tick``: when the main loop last went
    round), or None."""
    config = parts.config
    now = time.monotonic()
    if not parts.connection.loop_alive:
        return "the MQTT network loop is not running"
    if (
        now - main_tick > max(10.0, config.health.interval_s * 2) and not parts.registry.loading
    ):  # a reload may legitimately take minutes
        return "the main loop is stuck"
    limit = config.health.stuck_after_s
    # A copy: this runs on the watchdog thread while a reload changes the pipelines.
    for name, pipeline in dict(parts.pipelines).items():
        stuck = pipeline.stuck_for(now)
        if stuck is not None and stuck > limit:
            return (
                f"pipeline {name!r} worker has been inside one batch for "
                f"{stuck:.0f} s (health.stuck_after_s {limit:g})"
            )
    return None


def _start_metrics(parts: Parts) -> MetricsServer | None:
    """The Prometheus endpoint when ``metrics.listen`` is set and its port can be had."""
    listen = parts.config.metrics.listen
    if listen is None:
        return None
    host = listen.rpartition(":")[0].strip("[]")
    if host not in ("127.0.0.1", "localhost", "::1"):
        log.warning(
            "metrics_exposed",
            address=listen,
            reason="the metrics endpoint has no authentication; listen on "
            "127.0.0.1 and scrape through a tunnel or a local Prometheus agent, or "
            "firewall the port",
        )
    metrics = MetricsServer(listen, parts.view())
    try:
        metrics.start()
    except OSError as exc:
        log.error("metrics_not_started", address=listen, error=str(exc))
        return None
    return metrics


def _report_refused_reload(exc: ConfigError, errors: ErrorReporter) -> None:
    """Log each problem of a refused config, and say where they are on the errors topic."""
    for problem in exc.problems:
        log.error("config_reload_refused", problem=str(problem))
    # Where, not what: a problem's text may quote the value, and the value may be a
    # secret. The log and `edge-agent check-config` on the device have the details.
    where = ", ".join(sorted({f"{p.file}:{p.line} {p.key or '(top level)'}" for p in exc.problems}))
    errors.report_step(
        f"config reload refused, still running the previous "
        f"config: {len(exc.problems)} problem(s) at {where}; "
        "run `edge-agent check-config` on the device for details"
    )


def _log_hardware(hardware: Hardware) -> None:
    available = onnxruntime.get_available_providers()
    log.info(
        "hardware_detected",
        summary=hardware.summary(),
        board=hardware.board,
        available_providers=available,
    )
    for hint in hints(hardware, available):
        log.warning("provider_hint", hint=hint)


def _warn_unmet_settings(config: AgentConfig) -> None:
    """Say loudly which settings cannot do what the config asks for."""
    if config.delivery is DeliveryMode.AT_LEAST_ONCE:
        qos0 = [
            name for name, p in config.pipelines.items() if p.input.qos == 0 or p.output.qos == 0
        ]
        if qos0:
            log.warning(
                "delivery_not_guaranteed",
                pipelines=qos0,
                reason="at_least_once needs input.qos and output.qos 1: QoS 0 "
                "messages are never redelivered",
            )
