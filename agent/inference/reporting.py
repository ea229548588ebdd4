"""Report rejected inputs and failed steps on ``P/errors`` and in the log, without flooding it."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import structlog

from agent.inference.codecs import encode_json

log = structlog.get_logger(__name__)

LOG_BURST = 20  # errors logged per source and window before the log goes quiet
LOG_WINDOW_S = 60.0


class ErrorReporter:
    """Publishes one JSON error per rejected input; logs them, at most a burst per minute each.

    Called from paho's thread (decode errors) and from inference workers (run errors); the
    only shared state, the log budget, is guarded by a lock.
    """

    def __init__(self, publish: Callable[[str, bytes], None], topic: str) -> None:
        self._publish = publish
        self._topic = topic
        self._lock = threading.Lock()
        # source -> (window start, logged in window, muted in window)
        self._budget: dict[str, tuple[float, int, int]] = {}

    def set_topic(self, topic: str) -> None:
        """Publish to ``topic`` from now on (the topic prefix changed on reload)."""
        self._topic = topic

    def report_step(self, reason: str, **fields: object) -> None:
        """Publish a failed step that is not about one reading (e.g. a refused reload)."""
        self._publish(
            self._topic,
            encode_json(
                {"pipeline": None, "topic": None, **fields, "reason": reason, "ts": time.time()}
            ),
        )

    def report(self, pipeline: str, topic: str, reason: str, reading_id: object = None) -> None:
        """Publish ``{"pipeline", "topic", "reason", "ts"}``, with ``"id"`` when the reading's
        id could be read, and log it (rate-limited)."""
        document: dict[str, object] = {"pipeline": pipeline, "topic": topic}
        if reading_id is not None:
            document["id"] = reading_id
        document.update(reason=reason, ts=time.time())
        self._publish(self._topic, encode_json(document))
        log_this, muted = self._take_budget(pipeline)
        if muted:
            log.warning(
                "errors_muted",
                pipeline=pipeline,
                muted=muted,
                window_s=LOG_WINDOW_S,
                hint=f"every error is on {self._topic}",
            )
        if log_this:
            log.warning(
                "input_rejected", pipeline=pipeline, topic=topic, id=reading_id, reason=reason
            )

    def report_model_failure(self, model: str, file: str, reason: str) -> None:
        """Publish a failed model load (called on the loading thread; logged by the registry)."""
        self.report_step(f"model {model!r} failed to load: {reason}", model=model, file=file)

    def _take_budget(self, source: str) -> tuple[bool, int]:
        """Whether to log this error, and how many were muted in the window that just ended."""
        now = time.monotonic()
        with self._lock:
            start, logged, muted = self._budget.get(source, (now, 0, 0))
            if now - start >= LOG_WINDOW_S:
                self._budget[source] = (now, 1, 0)
                return True, muted
            if logged < LOG_BURST:
                self._budget[source] = (start, logged + 1, muted)
                return True, 0
            self._budget[source] = (start, logged, muted + 1)
            return False, 0
