"""The daemon's lifecycle: connect, load models, serve pipelines, stop cleanly on a signal."""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path
from types import FrameType

import onnxruntime
import structlog
from paho.mqtt.properties import Properties

from agent import __version__
from agent.config import AgentConfig
from agent.errors import EdgeAgentError
from agent.hardware import detect as detect_hardware
from agent.models import ModelRegistry
from agent.mqtt import MqttConnection
from agent.pipeline import Pipeline
from agent.providers import hints
from agent.reporting import ErrorReporter
from agent.retained import RetainedPublisher
from agent.watcher import ModelFileWatcher

log = structlog.get_logger(__name__)

# SIGTERM must end the process within 5 s (systemd's and the tests' expectation): most of it
# goes to finishing queued readings, the rest to saying "offline" and disconnecting.
DRAIN_DEADLINE_S = 2.5
OFFLINE_DEADLINE_S = 1.5


class Daemon:
    """Owns the connection, the model registry and the pipelines for one ``run``."""

    def __init__(self, config: AgentConfig, source: Path | None) -> None:
        self.config = config
        self.source = source
        prefix = config.topic_prefix
        self._stop = threading.Event()
        self.connection = MqttConnection(config.mqtt, f"{prefix}/status")
        self.errors = ErrorReporter(
            lambda topic, payload: self._publish(topic, payload, 0), f"{prefix}/errors")
        self.retained = RetainedPublisher(self.connection)
        self.hardware = detect_hardware()
        self.registry = ModelRegistry(
            config, self.hardware,
            lambda name, payload: self.retained.set(f"{prefix}/models/{name}", payload),
            on_failure=self.errors.report_model_failure)
        self.watcher = ModelFileWatcher(
            {name: config.model_path(name) for name in config.models}, self.registry.load,
            config.watch)
        self.pipelines: dict[str, Pipeline] = {}

    def request_stop(self) -> None:
        """Ask ``run`` to stop (thread-safe; also what the signal handlers do)."""
        self._stop.set()

    def run(self) -> int:
        """Serve until asked to stop; returns the process exit code."""
        self._install_signal_handlers()
        log.info("agent_starting", version=__version__, device_id=self.config.device_id,
                 config=str(self.source) if self.source else "built-in defaults",
                 models=len(self.config.models), pipelines=len(self.config.pipelines))
        self._log_hardware()
        self._warn_inactive_settings()
        self.retained.start()
        self.connection.start()
        # Watch first: a file that changes during the initial load is loaded again (a no-op
        # when the bytes did not change) instead of being missed.
        self.watcher.start()
        self.registry.load_all()
        for name, pipeline_config in self.config.pipelines.items():
            try:
                pipeline = Pipeline(name, pipeline_config, self.registry,
                                    publish=self._publish_result, errors=self.errors,
                                    models_dir=Path(self.config.models_dir))
            except EdgeAgentError as exc:
                log.error("pipeline_not_started", pipeline=name, error=str(exc))
                self.errors.report(name, pipeline_config.input.topic, str(exc))
                continue
            self.pipelines[name] = pipeline
            pipeline.start()
            self.connection.subscribe(pipeline.subscription())
        log.info("agent_serving", pipelines=list(self.pipelines))
        while not self._stop.wait(timeout=1.0):
            pass
        self._shutdown()
        return 0

    def _shutdown(self) -> None:
        started = time.monotonic()
        log.info("agent_stopping")
        self.connection.unsubscribe_all()
        self.watcher.stop()
        deadline = started + DRAIN_DEADLINE_S
        for pipeline in self.pipelines.values():
            pipeline.stop(max(0.0, deadline - time.monotonic()))
        self.retained.stop()
        self.connection.stop(timeout_s=OFFLINE_DEADLINE_S)
        log.info("agent_stopped", took_s=round(time.monotonic() - started, 3))

    def _publish(self, topic: str, payload: bytes, qos: int, retain: bool = False) -> None:
        self.connection.publish(topic, payload, qos=qos, retain=retain)

    def _publish_result(self, topic: str, payload: bytes, qos: int,
                        properties: Properties | None) -> None:
        self.connection.publish(topic, payload, qos=qos, properties=properties)

    def _install_signal_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # embedded use (tests): the owner calls request_stop()

        # Runs on the main thread, between bytecodes of whatever it was doing.
        def on_signal(signum: int, frame: FrameType | None) -> None:
            log.info("signal_received", signal=signal.Signals(signum).name)
            self._stop.set()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)

    def _log_hardware(self) -> None:
        available = onnxruntime.get_available_providers()
        log.info("hardware_detected", summary=self.hardware.summary(), board=self.hardware.board,
                 available_providers=available)
        for hint in hints(self.hardware, available):
            log.warning("provider_hint", hint=hint)

    def _warn_inactive_settings(self) -> None:
        """Say loudly which configured features this version does not act on yet."""
        config = self.config
        inactive = {
            "metrics.listen": config.metrics.listen is not None,
            "updates.trusted_keys": bool(config.updates.trusted_keys),
            "upstream": config.upstream is not None,
        }
        for key, configured in inactive.items():
            if configured:
                log.warning("setting_not_active", key=key,
                            reason="this version of edge-agent does not implement it yet")
