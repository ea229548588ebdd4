"""The paho-thread half of a pipeline: one MQTT message in, one checked reading on the
worker's queue (or one error on the errors topic) out.

Everything here runs on paho's network thread, for every reading, so it only decodes,
checks and enqueues; inference is the worker's (``agent.inference.pipeline``).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as paho

from agent import topics
from agent.config.schema import PipelineConfig
from agent.errors import PayloadError, PipelineFitError
from agent.inference.batching import DropOldestQueue
from agent.inference.codecs import Tensor, decode_payload
from agent.inference.registry import ModelRegistry
from agent.inference.reporting import ErrorReporter
from agent.inference.runplan import RunPlan
from agent.inference.session import LoadedModel

DROP_REPORT_INTERVAL_S = 1.0
TOPIC_CACHE_SIZE = 4096

# Acknowledges one reading to its broker; called once, from any thread.
Ack = Callable[[], None]
# The acknowledgement of a message (None: nothing to acknowledge); called on paho's thread.
AckerFn = Callable[[paho.MQTTMessage], "Ack | None"]


@dataclass(slots=True)
class Reading:
    """A decoded reading waiting for inference."""

    topic: str
    tensors: dict[str, Tensor]
    reading_id: Any
    received: float  # time.monotonic() on arrival
    output_topic: str
    stream_key: str | None = None  # stateful pipelines: the stream this reading is in
    response_topic: str | None = None  # MQTT 5 request/response
    correlation: bytes | None = None
    ack: Ack | None = None  # at-least-once: acknowledge once handed off


@dataclass
class PipelineCounters:
    """Counters for health. ``received``, ``dropped`` and ``rejected`` are written by paho's
    thread only; ``processed`` and ``failed`` by the worker only."""

    received: int = 0
    processed: int = 0
    dropped: int = 0
    rejected: int = 0
    failed: int = 0

    @property
    def errors(self) -> int:
        """Readings that got an error instead of a result."""
        return self.rejected + self.failed


def not_serving_reason(registry: ModelRegistry, model: str) -> str:
    """Why readings for ``model`` get an error instead of a result (it is not serving)."""
    status = registry.status(model)
    detail = f": {status.error}" if status.error else ""
    return f"model {model!r} is not serving ({status.state.value}{detail})"


class DropReporter:
    """Counts readings dropped from a full queue and reports them on the errors topic, at
    most once a second so that overload is not made worse.

    Paho's thread counts and reports while dropping; the worker reports the rest once the
    queue is empty again. The lock makes each drop reported exactly once.
    """

    def __init__(
        self, name: str, config: PipelineConfig, counters: PipelineCounters, errors: ErrorReporter
    ) -> None:
        self._name = name
        self._config = config
        self._counters = counters
        self._errors = errors
        self._lock = threading.Lock()
        self._reported = 0
        self._reported_at = 0.0

    @property
    def pending(self) -> bool:
        """Whether some drops were not reported yet."""
        return self._counters.dropped != self._reported

    def count(self, topic: str) -> None:
        """Count one drop of a reading on ``topic`` (paho's thread)."""
        self._counters.dropped += 1
        if time.monotonic() - self._reported_at >= DROP_REPORT_INTERVAL_S:
            self.report(topic)

    def report(self, topic: str | None) -> None:
        """Report the drops not reported yet, if any (paho's thread or the worker)."""
        with self._lock:
            total = self._counters.dropped
            count = total - self._reported
            if count <= 0:
                return
            self._reported = total
            self._reported_at = time.monotonic()
        self._errors.report(
            self._name,
            topic or self._config.input.topic,
            f"queue full ({self._config.queue.max} readings): dropped the "
            f"{count} oldest since the last report ({total} in all)",
        )


class ReadingTopics:
    """The result topic and stream key of a reading, from the topic it came on.

    Paho's thread only: the cache is not locked.
    """

    def __init__(self, name: str, config: PipelineConfig) -> None:
        self._name = name
        self._config = config
        self._cache: dict[str, tuple[str, str | None]] = {}

    def for_topic(self, topic: str) -> tuple[str, str | None]:
        """The result topic and stream key of a reading on ``topic`` (cached: sensors publish
        on a small set of topics). Raises PayloadError when ``topic`` cannot fill them."""
        cached = self._cache.get(topic)
        if cached is None:
            cached = self._render(topic)
            if len(self._cache) >= TOPIC_CACHE_SIZE:
                self._cache.clear()
            self._cache[topic] = cached
        return cached

    def _render(self, topic: str) -> tuple[str, str | None]:
        """Every placeholder the result topic and stream key use must get a non-empty level
        from ``topic``."""
        config = self._config
        if not topics.matches(config.input.topic, topic):
            raise PayloadError(
                f"topic {topic!r} does not match the pipeline's filter {config.input.topic!r}"
            )
        matches = topics.wildcard_values(config.input.topic, topic)
        templates = [("output.topic", config.output.topic)]
        if config.state is not None:
            templates.append(("state.key", config.state.key))
        for where, template in templates:
            missing = topics.unfilled(template, matches)
            if missing:
                raise PayloadError(
                    f"topic {topic!r} has no level for {{{missing[0]}}} of {where} {template!r}"
                )
        output = topics.render(
            config.output.topic, matches, pipeline=self._name, model=config.model
        )
        key = None
        if config.state is not None:
            key = topics.render(config.state.key, matches, pipeline=self._name, model=config.model)
        return output, key


class Intake:
    """Turns the messages of one pipeline's subscription into readings on its queue.

    Both callbacks are called on paho's network thread; ``close`` on the daemon's.
    """

    def __init__(
        self,
        name: str,
        config: PipelineConfig,
        registry: ModelRegistry,
        *,
        queue: DropOldestQueue[Reading],
        counters: PipelineCounters,
        drops: DropReporter,
        errors: ErrorReporter,
        acker: AckerFn,
        plan_for: Callable[[LoadedModel], RunPlan],
    ) -> None:
        self._name = name
        self._config = config
        self._registry = registry
        self._queue = queue
        self._counters = counters
        self._drops = drops
        self._errors = errors
        self._acker = acker
        self._plan_for = plan_for
        self._topics = ReadingTopics(name, config)
        self._closed = False  # set on shutdown in at-least-once mode

    def close(self) -> None:
        """Ignore readings from now on without acknowledging them (the daemon's thread)."""
        self._closed = True

    def on_message(self, message: paho.MQTTMessage) -> None:
        """Decode, check and enqueue one reading; report a bad one on the errors topic.
        Called on paho's network thread."""
        if self._closed:
            return
        received = time.monotonic()
        ack = self._acker(message)
        self._counters.received += 1
        model = self._registry.get(self._config.model)
        if model is None:
            self._reject(message.topic, not_serving_reason(self._registry, self._config.model), ack)
            return
        try:
            output_topic, stream_key = self._topics.for_topic(message.topic)
            specs = self._plan_for(model).payload
            tensors, reading_id = decode_payload(message.payload, self._config.input, specs)
        except (PayloadError, PipelineFitError) as exc:
            self._reject(message.topic, str(exc), ack, getattr(exc, "reading_id", None))
            return
        response_topic, correlation = response_properties(message)
        dropped = self._queue.put(
            Reading(
                message.topic,
                tensors,
                reading_id,
                received,
                output_topic,
                stream_key,
                response_topic,
                correlation,
                ack,
            )
        )
        if dropped is not None:
            self._drops.count(dropped.topic)
            if dropped.ack is not None:
                dropped.ack()  # dropped on purpose and counted: do not have it sent again

    def on_too_large(self, topic: str, size: int) -> None:
        """A reading over ``mqtt.max_packet_bytes`` arrived; its payload was never kept. The
        connection acknowledges it; this counts and reports it (paho's thread)."""
        if self._closed:
            return
        self._counters.received += 1
        self._reject(
            topic,
            f"message of {size} bytes is larger than mqtt.max_packet_bytes; "
            "dropped unread (input.max_payload_bytes "
            f"{self._config.input.max_payload_bytes})",
            None,
        )

    def _reject(self, topic: str, reason: str, ack: Ack | None, reading_id: object = None) -> None:
        self._counters.rejected += 1
        self._errors.report(self._name, topic, reason, reading_id)
        if ack is not None:
            ack()  # the error is the answer: sending the reading again would not change it


def response_properties(message: paho.MQTTMessage) -> tuple[str | None, bytes | None]:
    """MQTT 5 response topic and correlation data of a request, if it carries them."""
    properties = getattr(message, "properties", None)
    if properties is None:
        return None, None
    topic = getattr(properties, "ResponseTopic", None)
    correlation = getattr(properties, "CorrelationData", None)
    if not topic or "+" in topic or "#" in topic:
        return None, None
    return str(topic), bytes(correlation) if correlation is not None else None


def group_by_shape(batch: Sequence[Reading]) -> list[list[Reading]]:
    """Split a batch into groups that can be stacked (dynamic axes may differ per reading).

    Groups keep the order of their first reading, and readings keep their order in a group."""
    groups: dict[tuple[tuple[int, ...], ...], list[Reading]] = {}
    for reading in batch:
        key = tuple(t.shape for t in reading.tensors.values())
        groups.setdefault(key, []).append(reading)
    return list(groups.values())
