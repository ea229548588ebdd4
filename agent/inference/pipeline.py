"""One inference pipeline: MQTT readings -> bounded queue -> batched ``session.run`` -> results.

Threads: ``on_message`` runs on paho's network thread and only decodes, checks and enqueues.
The worker thread forms batches, runs the model and publishes. Inference never runs on
paho's thread.
"""

from __future__ import annotations

import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import paho.mqtt.client as paho
import structlog

from agent import topics
from agent.config.schema import PipelineConfig
from agent.errors import PayloadError, PipelineFitError, first_line
from agent.inference import postprocess
from agent.inference.batching import DropOldestQueue
from agent.inference.codecs import Tensor, TensorSpec, all_finite, decode_payload, encode_json
from agent.inference.latency import LatencyHistogram
from agent.inference.registry import LoadedModel, ModelRegistry
from agent.inference.reporting import ErrorReporter
from agent.inference.runplan import ModelView, RunPlan, build_plan, feeds_for, split_output
from agent.transport.mqtt import Subscription
from agent.transport.outbox import PendingResult, SeqCounter

log = structlog.get_logger(__name__)

MAX_STREAMS = 10_000  # stateful streams kept; the least recently seen is forgotten first
DROP_REPORT_INTERVAL_S = 1.0
TOPIC_CACHE_SIZE = 4096
# After the drain deadline, for the batch in progress (the SIGTERM budget of 5 s has room).
FINAL_BATCH_GRACE_S = 0.5


# Hands a result on; calls the second argument once it is safely handed off. Thread-safe.
DeliverFn = Callable[[PendingResult, "Ack | None"], None]
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


@dataclass
class _Stream:
    version: str
    state: dict[str, Tensor]
    last_seen: float


class Pipeline:
    """Subscribes to one input filter and publishes one result per reading."""

    def __init__(
        self,
        name: str,
        config: PipelineConfig,
        registry: ModelRegistry,
        *,
        deliver: DeliverFn,
        errors: ErrorReporter,
        models_dir: Path,
        acker: AckerFn,
        seq: SeqCounter,
    ) -> None:
        self.name = name
        self.config = config
        self.counters = PipelineCounters()
        self.latency = LatencyHistogram()
        # Set by the worker while it processes a batch; read by the systemd watchdog.
        self.busy_since: float | None = None
        self._registry = registry
        self._deliver = deliver
        self._acker = acker
        self._seq = seq
        self._intake_closed = False  # set on shutdown in at-least-once mode
        self._errors = errors
        self._labels: list[str] | None = None
        post = config.output.postprocess
        if post is not None and post.labels is not None:
            self._labels = postprocess.load_labels(models_dir / post.labels)
        self._queue: DropOldestQueue[Reading] = DropOldestQueue(
            config.queue.max, arrival=lambda reading: reading.received
        )
        self._worker = threading.Thread(target=self._serve, name=f"pipeline-{name}", daemon=True)
        self._log = log.bind(pipeline=name, model=config.model)
        # The plan for the serving model, rebuilt when the model changes. Read and written by
        # paho's thread and the worker; both compute the same value, so a race is harmless.
        self._plan: tuple[LoadedModel, RunPlan] | None = None
        self._streams: OrderedDict[str, _Stream] = OrderedDict()  # worker-owned
        self._topic_cache: dict[str, tuple[str, str | None]] = {}  # paho-thread-owned
        # Drop reports: paho's thread reports while dropping, the worker reports the rest once
        # the queue is empty again; the lock makes each drop reported exactly once.
        self._drop_lock = threading.Lock()
        self._drops_reported = 0
        self._drops_reported_at = 0.0

    @property
    def queue_depth(self) -> int:
        """Readings waiting for inference."""
        return len(self._queue)

    def subscription(self) -> Subscription:
        """The MQTT subscription feeding this pipeline."""
        return Subscription(
            self.config.input.topic,
            self.config.input.qos,
            self.on_message,
            self.config.input.shared_group,
            acknowledges=True,
            on_too_large=self.on_too_large,
        )

    def start(self) -> None:
        """Start the inference worker."""
        self._worker.start()

    def close_intake(self) -> None:
        """Ignore readings from now on without acknowledging them: with a persistent
        session the broker delivers them again after the restart."""
        self._intake_closed = True

    def stop(self, deadline_s: float, final: bool = False) -> None:
        """Stop taking readings, finish the queued ones within ``deadline_s``, stop the worker.

        ``final`` (the process is exiting): readings still queued at the deadline are
        abandoned (at-least-once: left unacknowledged, so they come again after the restart)
        and the batch in progress gets up to ``FINAL_BATCH_GRACE_S`` more. A process that
        exits while a worker is inside onnxruntime's ``run`` dies in C++ (std::terminate,
        SIGABRT). Otherwise (a config reload) the old worker drains the rest in the
        background.
        """
        self._queue.close()
        self._worker.join(timeout=deadline_s)
        abandoned = 0
        if self._worker.is_alive():
            abandoned = self._queue.abandon() if final else len(self._queue)
            self._log.warning("pipeline_stop_timeout", abandoned=abandoned)
            if not final:
                return
            self._worker.join(timeout=FINAL_BATCH_GRACE_S)
            if self._worker.is_alive():
                self._log.error(
                    "pipeline_batch_still_running",
                    running_s=round(time.monotonic() - (self.busy_since or time.monotonic()), 1),
                )
                return
        # What this run of the pipeline did, for the operator reading the journal after a
        # restart (the last health message may be up to an interval old).
        counters = self.counters
        self._log.info(
            "pipeline_stopped",
            received=counters.received,
            processed=counters.processed,
            dropped=counters.dropped,
            rejected=counters.rejected,
            failed=counters.failed,
            abandoned=abandoned,
        )

    def stuck_for(self, now: float) -> float | None:
        """Seconds the worker has been inside one batch, or has been dead (None: fine)."""
        if (
            not self._worker.is_alive()
            and self._worker.ident is not None
            and not self._queue.closed
        ):
            return float("inf")
        busy = self.busy_since
        return None if busy is None else now - busy

    def plan_for(self, model: LoadedModel) -> RunPlan:
        """The run plan of this pipeline on ``model`` (cached per model)."""
        cached = self._plan
        if cached is not None and cached[0] is model:
            return cached[1]
        plan = build_plan(ModelView(model.inputs, model.outputs), self.config, self.name)
        self._plan = (model, plan)
        return plan

    # -- paho's network thread ---------------------------------------------------------------

    def on_message(self, message: paho.MQTTMessage) -> None:
        """Decode, check and enqueue one reading; report a bad one on the errors topic."""
        if self._intake_closed:
            return
        received = time.monotonic()
        ack = self._acker(message)
        self.counters.received += 1
        model = self._registry.get(self.config.model)
        if model is None:
            self._reject(message.topic, self._not_serving_reason(), ack)
            return
        try:
            output_topic, stream_key = self._topics_for(message.topic)
            specs: list[TensorSpec] = list(self.plan_for(model).payload)
            tensors, reading_id = decode_payload(message.payload, self.config.input, specs)
        except (PayloadError, PipelineFitError) as exc:
            self._reject(message.topic, str(exc), ack)
            return
        response_topic, correlation = _response_properties(message)
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
            self._count_drop(dropped.topic)
            if dropped.ack is not None:
                dropped.ack()  # dropped on purpose and counted: do not have it sent again

    def on_too_large(self, topic: str, size: int) -> None:
        """A reading over ``mqtt.max_packet_bytes`` arrived; its payload was never kept. The
        connection acknowledges it; this counts and reports it (paho's thread)."""
        if self._intake_closed:
            return
        self.counters.received += 1
        self._reject(
            topic,
            f"message of {size} bytes is larger than mqtt.max_packet_bytes; "
            "dropped unread (input.max_payload_bytes "
            f"{self.config.input.max_payload_bytes})",
            None,
        )

    def _topics_for(self, topic: str) -> tuple[str, str | None]:
        """The result topic and stream key of a reading on ``topic`` (cached: sensors publish
        on a small set of topics)."""
        cached = self._topic_cache.get(topic)
        if cached is None:
            cached = self._render_topics(topic)
            if len(self._topic_cache) >= TOPIC_CACHE_SIZE:
                self._topic_cache.clear()
            self._topic_cache[topic] = cached
        return cached

    def _render_topics(self, topic: str) -> tuple[str, str | None]:
        """Every placeholder the result topic and stream key use must get a non-empty level
        from ``topic``."""
        if not topics.matches(self.config.input.topic, topic):
            raise PayloadError(
                f"topic {topic!r} does not match the pipeline's filter {self.config.input.topic!r}"
            )
        matches = topics.wildcard_values(self.config.input.topic, topic)
        templates = [("output.topic", self.config.output.topic)]
        if self.config.state is not None:
            templates.append(("state.key", self.config.state.key))
        for where, template in templates:
            for number in re.findall(r"\{(\d+)\}", template):
                index = int(number) - 1
                if index >= len(matches) or not matches[index]:
                    raise PayloadError(
                        f"topic {topic!r} has no level for {{{number}}} of {where} {template!r}"
                    )
        output = topics.render(
            self.config.output.topic, matches, pipeline=self.name, model=self.config.model
        )
        key = None
        if self.config.state is not None:
            key = topics.render(
                self.config.state.key, matches, pipeline=self.name, model=self.config.model
            )
        return output, key

    def _count_drop(self, topic: str) -> None:
        """Count a drop; report drops at most once a second so overload is not made worse."""
        self.counters.dropped += 1
        if time.monotonic() - self._drops_reported_at >= DROP_REPORT_INTERVAL_S:
            self._report_drops(topic)

    def _report_drops(self, topic: str | None) -> None:
        """Report the drops not reported yet, if any (paho's thread or the worker)."""
        with self._drop_lock:
            total = self.counters.dropped
            count = total - self._drops_reported
            if count <= 0:
                return
            self._drops_reported = total
            self._drops_reported_at = time.monotonic()
        self._errors.report(
            self.name,
            topic or self.config.input.topic,
            f"queue full ({self.config.queue.max} readings): dropped the "
            f"{count} oldest since the last report ({total} in all)",
        )

    def _reject(self, topic: str, reason: str, ack: Ack | None) -> None:
        self.counters.rejected += 1
        self._errors.report(self.name, topic, reason)
        if ack is not None:
            ack()  # the error is the answer: sending the reading again would not change it

    def _not_serving_reason(self) -> str:
        status = self._registry.status(self.config.model)
        detail = f": {status.error}" if status.error else ""
        return f"model {self.config.model!r} is not serving ({status.state.value}{detail})"

    # -- the worker thread -------------------------------------------------------------------

    def _serve(self) -> None:
        delay_s = self.config.batching.max_delay_ms / 1000
        while True:
            model = self._registry.get(self.config.model)
            limit = self._limit(model)
            batch = self._queue.take_batch(limit, delay_s)
            if not batch:
                return  # closed and drained
            self.busy_since = time.monotonic()
            try:
                self._process(batch)
            except Exception:  # a bug must not stop the pipeline; every reading gets an answer
                self._log.exception("batch_failed", size=len(batch))
                for reading in batch:
                    self._fail(reading, "internal error while processing the reading")
            finally:
                self.busy_since = None
            if not len(self._queue) and self.counters.dropped != self._drops_reported:
                self._report_drops(None)  # the overload is over: give the final count

    def _limit(self, model: LoadedModel | None) -> int:
        if model is None:
            return 1
        try:
            return self.plan_for(model).limit
        except PipelineFitError:
            return 1

    def _process(self, batch: list[Reading]) -> None:
        model = self._registry.get(self.config.model)
        if model is None:
            reason = self._not_serving_reason()
            for reading in batch:
                self._fail(reading, reason)
            return
        try:
            plan = self.plan_for(model)
        except PipelineFitError as exc:
            for reading in batch:
                self._fail(reading, str(exc))
            return
        if plan.state:
            for reading in batch:
                self._run_stateful(model, plan, reading)
        elif plan.limit == 1:
            for reading in batch:
                self._run(model, plan, [reading])
        else:
            for group in _group_by_shape(batch):
                self._run(model, plan, group)

    def _run(self, model: LoadedModel, plan: RunPlan, group: list[Reading]) -> None:
        outputs = self._session_run(model, plan, feeds_for(plan, [r.tensors for r in group]), group)
        if outputs is None:
            return
        problem = _non_finite(plan, outputs)
        if problem is not None:
            for reading in group:
                self._fail(reading, problem)
            return
        size = len(group)
        for index, reading in enumerate(group):
            values = {
                name: split_output(outputs[name], index, size, plan.stacked)
                for name in plan.published
            }
            self._publish_result(model, plan, reading, values)

    def _run_stateful(self, model: LoadedModel, plan: RunPlan, reading: Reading) -> None:
        """One reading of a stream: feed the stream's last state outputs back as inputs."""
        assert reading.stream_key is not None
        stream = self._stream(reading.stream_key, model, plan, reading.received)
        feeds = feeds_for(plan, [reading.tensors])
        feeds.update(stream.state)
        outputs = self._session_run(model, plan, feeds, [reading])
        if outputs is None:
            return
        problem = _non_finite(plan, outputs)
        if problem is not None:
            self._fail(reading, problem)
            return
        by_name = {spec.name: spec for spec in model.inputs}
        stream.state = {
            name: np.asarray(outputs[source], dtype=by_name[name].dtype)
            for name, source in plan.state.items()
        }
        values = {name: split_output(outputs[name], 0, 1, plan.stacked) for name in plan.published}
        self._publish_result(model, plan, reading, values)

    def _stream(self, key: str, model: LoadedModel, plan: RunPlan, now: float) -> _Stream:
        assert self.config.state is not None
        stream = self._streams.get(key)
        stale = stream is not None and (
            now - stream.last_seen > self.config.state.reset_after_s
            or stream.version != model.version
        )
        if stream is None or stale:
            stream = _Stream(model.version, plan.zero_state(model.inputs), now)
            self._streams[key] = stream
            while len(self._streams) > MAX_STREAMS:
                self._streams.popitem(last=False)
        stream.last_seen = now
        self._streams.move_to_end(key)
        return stream

    def _session_run(
        self, model: LoadedModel, plan: RunPlan, feeds: dict[str, Any], group: list[Reading]
    ) -> dict[str, Any] | None:
        try:
            values = model.session.run(list(plan.fetch), feeds)
        except Exception as exc:  # onnxruntime's own error types
            for reading in group:
                self._fail(reading, f"inference failed: {first_line(exc)}")
            return None
        return dict(zip(plan.fetch, values, strict=True))

    def _publish_result(
        self, model: LoadedModel, plan: RunPlan, reading: Reading, values: dict[str, Any]
    ) -> None:
        result: dict[str, Any] = {
            "id": reading.reading_id,
            "seq": self._seq.take(),
            "pipeline": self.name,
            "model": model.name,
            "version": model.version,
            "ts": time.time(),
            "latency_ms": 0.0,
            "outputs": values,
        }
        post = self.config.output.postprocess
        try:
            if post is not None:
                source = post.output or plan.published[0]
                result.update(postprocess.apply(post, values[source], self._labels))
            latency_ms = (time.monotonic() - reading.received) * 1000
            result["latency_ms"] = round(latency_ms, 3)
            payload = encode_json(result)
        except (PayloadError, TypeError, orjson.JSONEncodeError) as exc:
            self._fail(reading, f"the result cannot be published: {exc}")
            return
        qos = self.config.output.qos
        done = reading.ack
        if reading.response_topic is not None and done is not None:
            done = _after_both(done)
        self._deliver(PendingResult(self.name, reading.output_topic, payload, qos), done)
        if reading.response_topic is not None:
            self._deliver(
                PendingResult(self.name, reading.response_topic, payload, qos, reading.correlation),
                done,
            )
        self.counters.processed += 1
        self.latency.record(latency_ms)

    def _fail(self, reading: Reading, reason: str) -> None:
        self.counters.failed += 1
        self._errors.report(self.name, reading.topic, reason)
        if reading.ack is not None:
            reading.ack()


def _after_both(ack: Ack) -> Ack:
    """An acknowledgement that fires on its second call (a result sent to two topics)."""
    calls = [0]
    lock = threading.Lock()

    def half() -> None:
        with lock:
            calls[0] += 1
            last = calls[0] == 2
        if last:
            ack()

    return half


def _non_finite(plan: RunPlan, outputs: dict[str, Any]) -> str | None:
    """Why the run's outputs cannot be published (NaN or infinity), or None."""
    for name in plan.published:
        if not all_finite(outputs[name]):
            return f"the model produced NaN or infinity in output {name!r}; no result published"
    return None


def _response_properties(message: paho.MQTTMessage) -> tuple[str | None, bytes | None]:
    """MQTT 5 response topic and correlation data of a request, if it carries them."""
    properties = getattr(message, "properties", None)
    if properties is None:
        return None, None
    topic = getattr(properties, "ResponseTopic", None)
    correlation = getattr(properties, "CorrelationData", None)
    if not topic or "+" in topic or "#" in topic:
        return None, None
    return str(topic), bytes(correlation) if correlation is not None else None


def _group_by_shape(batch: list[Reading]) -> list[list[Reading]]:
    """Split a batch into groups that can be stacked (dynamic axes may differ per reading)."""
    groups: dict[tuple[tuple[int, ...], ...], list[Reading]] = {}
    for reading in batch:
        key = tuple(t.shape for t in reading.tensors.values())
        groups.setdefault(key, []).append(reading)
    return list(groups.values())
