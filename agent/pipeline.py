"""One inference pipeline: MQTT readings -> bounded queue -> batched ``session.run`` -> results.

Threads: ``on_message`` runs on paho's network thread and only decodes, checks and enqueues.
The worker thread forms batches, runs the model and publishes. Inference never runs on
paho's thread.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import paho.mqtt.client as paho
import structlog

from agent.batching import DropOldestQueue
from agent.codecs import Tensor, TensorSpec, decode_payload, encode_json
from agent.config import PipelineConfig
from agent.errors import EdgeAgentError, ModelLoadError, PayloadError
from agent.models import LoadedModel, ModelRegistry, output_names
from agent.mqtt import Subscription
from agent.reporting import ErrorReporter

log = structlog.get_logger(__name__)

_PLACEHOLDER = re.compile(r"\{(\d+|pipeline|model)\}")

Publisher = Callable[[str, bytes, int], None]


def wildcard_matches(topic_filter: str, topic: str) -> list[str]:
    """The parts of ``topic`` matched by each ``+`` or ``#`` of ``topic_filter``, in order."""
    matches = []
    levels = topic.split("/")
    for index, level in enumerate(topic_filter.split("/")):
        if level == "#":
            matches.append("/".join(levels[index:]))
            break
        if level == "+" and index < len(levels):
            matches.append(levels[index])
    return matches


def render_topic(template: str, matches: list[str], *, pipeline: str, model: str) -> str:
    """Fill ``{1}``..``{n}``, ``{pipeline}`` and ``{model}`` (``{device_id}`` is filled at load)."""
    def fill(found: re.Match[str]) -> str:
        key = found.group(1)
        if key == "pipeline":
            return pipeline
        if key == "model":
            return model
        index = int(key) - 1
        return matches[index] if index < len(matches) else ""

    return _PLACEHOLDER.sub(fill, template)


@dataclass(frozen=True)
class Reading:
    """A decoded reading waiting for inference."""

    topic: str
    tensors: dict[str, Tensor]
    reading_id: Any
    received: float  # time.monotonic() on arrival


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


class Pipeline:
    """Subscribes to one input filter and publishes one result per reading."""

    def __init__(self, name: str, config: PipelineConfig, registry: ModelRegistry,
                 publish: Publisher, errors: ErrorReporter) -> None:
        if config.state is not None:
            raise EdgeAgentError(
                f"pipeline {name!r}: 'state' (stateful streams) is not supported by this "
                "version of edge-agent; remove it or upgrade")
        if config.output.postprocess is not None:
            raise EdgeAgentError(
                f"pipeline {name!r}: 'output.postprocess' is not supported by this version of "
                "edge-agent; remove it or upgrade")
        self.name = name
        self.config = config
        self.counters = PipelineCounters()
        self._registry = registry
        self._publish = publish
        self._errors = errors
        self._queue: DropOldestQueue[Reading] = DropOldestQueue(
            config.queue.max, arrival=lambda reading: reading.received)
        self._worker = threading.Thread(target=self._serve, name=f"pipeline-{name}", daemon=True)
        self._log = log.bind(pipeline=name, model=config.model)
        # Per-model derived data, rebuilt when the serving model changes. Worker-owned.
        self._constants_for: tuple[LoadedModel, dict[str, Tensor]] | None = None

    @property
    def queue_depth(self) -> int:
        """Readings waiting for inference."""
        return len(self._queue)

    def subscription(self) -> Subscription:
        """The MQTT subscription feeding this pipeline."""
        return Subscription(self.config.input.topic, self.config.input.qos, self.on_message,
                            self.config.input.shared_group)

    def start(self) -> None:
        """Start the inference worker."""
        self._worker.start()

    def stop(self, deadline_s: float) -> None:
        """Stop taking readings, finish the queued ones within ``deadline_s``, stop the worker."""
        self._queue.close()
        self._worker.join(timeout=deadline_s)
        if self._worker.is_alive():
            self._log.warning("pipeline_stop_timeout", abandoned=len(self._queue))

    # -- paho's network thread ---------------------------------------------------------------

    def on_message(self, message: paho.MQTTMessage) -> None:
        """Decode, check and enqueue one reading; report a bad one on the errors topic."""
        received = time.monotonic()
        self.counters.received += 1
        model = self._registry.get(self.config.model)
        if model is None:
            self._reject(message.topic, self._not_serving_reason())
            return
        try:
            tensors, reading_id = decode_payload(message.payload, self.config.input,
                                                 self._payload_specs(model))
        except PayloadError as exc:
            self._reject(message.topic, str(exc))
            return
        dropped = self._queue.put(Reading(message.topic, tensors, reading_id, received))
        if dropped is not None:
            self.counters.dropped += 1
            self._errors.report(self.name, dropped.topic,
                                f"queue full ({self.config.queue.max}): dropped the oldest "
                                "reading")

    def _payload_specs(self, model: LoadedModel) -> list[TensorSpec]:
        fixed = set(self.config.constants or ())
        return [spec for spec in model.inputs if spec.name not in fixed]

    def _reject(self, topic: str, reason: str) -> None:
        self.counters.rejected += 1
        self._errors.report(self.name, topic, reason)

    def _not_serving_reason(self) -> str:
        status = self._registry.status(self.config.model)
        detail = f": {status.error}" if status.error else ""
        return f"model {self.config.model!r} is not serving ({status.state.value}{detail})"

    # -- the worker thread -------------------------------------------------------------------

    def _serve(self) -> None:
        batching = self.config.batching
        while True:
            model = self._registry.get(self.config.model)
            limit = self._batch_limit(model)
            batch = self._queue.take_batch(limit, batching.max_delay_ms / 1000)
            if not batch:
                return  # closed and drained
            try:
                self._process(batch)
            except Exception:  # a bug must not stop the pipeline; every reading gets an answer
                self._log.exception("batch_failed", size=len(batch))
                for reading in batch:
                    self._fail(reading, "internal error while processing the reading")

    def _batch_limit(self, model: LoadedModel | None) -> int:
        if model is None or not model.batch_axis:
            return 1
        if model.max_batch is None:
            return self.config.batching.max_batch
        return min(self.config.batching.max_batch, model.max_batch)

    def _process(self, batch: list[Reading]) -> None:
        model = self._registry.get(self.config.model)
        if model is None:
            reason = self._not_serving_reason()
            for reading in batch:
                self._fail(reading, reason)
            return
        if not model.batch_axis and len(batch) > 1:
            for reading in batch:
                self._run(model, [reading])
            return
        for group in _group_by_shape(batch):
            self._run(model, group)

    def _run(self, model: LoadedModel, group: list[Reading]) -> None:
        try:
            names = output_names(model, self.config.output.outputs)
            feeds = self._feeds(model, group)
            outputs = model.session.run(names, feeds)
        except (ModelLoadError, PayloadError) as exc:
            for reading in group:
                self._fail(reading, str(exc))
            return
        except Exception as exc:  # onnxruntime's own error types
            first_line = str(exc).splitlines()[0] if str(exc) else repr(exc)
            for reading in group:
                self._fail(reading, f"inference failed: {first_line}")
            return
        size = len(group)
        for index, reading in enumerate(group):
            values = {name: _item(value, index, size, model.batch_axis)
                      for name, value in zip(names, outputs, strict=True)}
            self._publish_result(model, reading, values)

    def _feeds(self, model: LoadedModel, group: list[Reading]) -> dict[str, Any]:
        feeds: dict[str, Any] = {}
        for spec in self._payload_specs(model):
            if model.batch_axis:
                feeds[spec.name] = np.stack([r.tensors[spec.name] for r in group])
            else:
                feeds[spec.name] = group[0].tensors[spec.name]
        feeds.update(self._constants(model, len(group)))
        return feeds

    def _constants(self, model: LoadedModel, size: int) -> dict[str, Tensor]:
        if not self.config.constants:
            return {}
        if self._constants_for is None or self._constants_for[0] is not model:
            self._constants_for = (model, _prepare_constants(model, self.config.constants))
        constants = {}
        for name, value in self._constants_for[1].items():
            spec = model.input(name)
            assert spec is not None
            per_item = model.batch_axis and value.ndim == len(spec.item_shape)
            constants[name] = np.repeat(value[None], size, axis=0) if per_item else value
        return constants

    def _publish_result(self, model: LoadedModel, reading: Reading, values: dict[str, Any]
                        ) -> None:
        matches = wildcard_matches(self.config.input.topic, reading.topic)
        topic = render_topic(self.config.output.topic, matches, pipeline=self.name,
                             model=model.name)
        result = {
            "id": reading.reading_id,
            "pipeline": self.name,
            "model": model.name,
            "version": model.version,
            "ts": time.time(),
            "latency_ms": round((time.monotonic() - reading.received) * 1000, 3),
            "outputs": values,
        }
        try:
            payload = encode_json(result)
        except ValueError as exc:
            self._fail(reading, f"the result cannot be encoded as JSON ({exc}): the model "
                                "produced NaN or infinity")
            return
        self._publish(topic, payload, self.config.output.qos)
        self.counters.processed += 1

    def _fail(self, reading: Reading, reason: str) -> None:
        self.counters.failed += 1
        self._errors.report(self.name, reading.topic, reason)


def _group_by_shape(batch: list[Reading]) -> list[list[Reading]]:
    """Split a batch into groups that can be stacked (dynamic axes may differ per reading)."""
    groups: dict[tuple[tuple[int, ...], ...], list[Reading]] = {}
    for reading in batch:
        key = tuple(t.shape for t in reading.tensors.values())
        groups.setdefault(key, []).append(reading)
    return list(groups.values())


def _item(value: Any, index: int, size: int, batch_axis: bool) -> Any:
    """The part of one output that belongs to reading ``index`` of a batch of ``size``."""
    if not batch_axis:
        return value
    if isinstance(value, np.ndarray) and value.ndim >= 1 and value.shape[0] == size:
        return value[index]
    if isinstance(value, list) and len(value) == size:
        return value[index]
    return value


def _prepare_constants(model: LoadedModel, constants: Any) -> dict[str, Tensor]:
    prepared = {}
    for name, value in constants.items():
        spec = model.input(name)
        if spec is None:
            raise PayloadError(f"constants: the model has no input {name!r} "
                               f"(it takes: {', '.join(s.name for s in model.inputs)})")
        try:
            prepared[name] = np.asarray(value, dtype=spec.dtype)
        except (ValueError, TypeError) as exc:
            raise PayloadError(f"constants.{name}: cannot convert to {spec.dtype.name}: {exc}"
                               ) from exc
    return prepared
