"""One inference pipeline: MQTT readings -> bounded queue -> batched ``session.run`` -> results.

Threads: ``Intake`` (``agent.inference.intake``) runs on the network loop and only decodes,
checks and enqueues. The ``Worker`` here forms batches, runs the model and publishes: in the
network loop right after a read for a model measured cheap, else on the pipeline's thread.
``Pipeline`` builds both and is driven from the daemon's thread: start, stop, the drain."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import orjson
import structlog

from agent.config.schema import PipelineConfig
from agent.errors import PayloadError, PipelineFitError, first_line
from agent.inference import postprocess
from agent.inference.batching import DropOldestQueue
from agent.inference.codecs import all_finite, encode_json
from agent.inference.drift import DriftState
from agent.inference.drift_setup import PipelineDrift, ReferencePlaces, pipeline_drift
from agent.inference.inline import InlineGate
from agent.inference.intake import (
    Ack,
    AckerFn,
    DropReporter,
    Intake,
    PipelineCounters,
    Reading,
    group_by_shape,
    not_serving_reason,
)
from agent.inference.latency import LatencyHistogram
from agent.inference.registry import ModelRegistry
from agent.inference.reporting import ErrorReporter
from agent.inference.runplan import ModelView, RunPlan, build_plan, feeds_for, split_output
from agent.inference.session import LoadedModel
from agent.inference.shadow import Offered
from agent.inference.streams import StreamTable
from agent.transport.results import PendingResult, SeqCounter
from agent.transport.subscriptions import Subscription

log = structlog.get_logger(__name__)

# After the drain deadline, for the batch in progress (the SIGTERM budget of 5 s has room).
FINAL_BATCH_GRACE_S = 0.5


# Hands a result on; calls the second argument once it is safely handed off. Thread-safe.
DeliverFn = Callable[[PendingResult, "Ack | None"], None]
# Told of each result once it is handed off: (pipeline, the reading's topic, the result as
# published). Runs on the worker thread, so it must only queue; it must not change the result.
ResultObserver = Callable[[str, str, Mapping[str, Any]], None]


class Pipeline:
    """Subscribes to one input filter and publishes one result per reading.

    Built, started and stopped on the main thread; ``stuck_for`` is read on the watchdog
    thread and ``queue_depth`` on the main (health) and metrics threads. Its intake runs on paho's
    network thread and its worker on its own.
    """

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
        observe: ResultObserver | None = None,
        state_dir: Path | None = None,
    ) -> None:
        self.name = name
        self.config = config
        self.counters = PipelineCounters()
        self.latency = LatencyHistogram()
        labels: list[str] | None = None
        post = config.output.postprocess
        if post is not None and post.labels is not None:
            labels = postprocess.load_labels(models_dir / post.labels)
        self._queue: DropOldestQueue[Reading] = DropOldestQueue(
            config.queue.max, arrival=lambda reading: reading.received
        )
        self._log = log.bind(pipeline=name, model=config.model)
        places = ReferencePlaces(
            registry.model_path(config.model), models_dir, state_dir or models_dir
        )
        self._drift = pipeline_drift(name, config, places, errors)
        # The plan for the serving model, rebuilt when the model changes. Read and written by
        # paho's thread and the worker; both compute the same value, so a race is harmless.
        self._plan: tuple[LoadedModel, RunPlan] | None = None
        drops = DropReporter(name, config, self.counters, errors)
        self._intake = Intake(
            name,
            config,
            registry,
            queue=self._queue,
            counters=self.counters,
            drops=drops,
            errors=errors,
            acker=acker,
            plan_for=self.plan_for,
        )
        self._worker = Worker(
            name,
            config,
            registry,
            queue=self._queue,
            counters=self.counters,
            latency=self.latency,
            drops=drops,
            deliver=deliver,
            errors=errors,
            seq=seq,
            labels=labels,
            plan_for=self.plan_for,
            observe=observe,
            drift=self._drift,
        )
        self._thread = threading.Thread(
            target=self._worker.serve, name=f"pipeline-{name}", daemon=True
        )

    @property
    def drift(self) -> DriftState | None:
        """The latest drift figures; None without ``drift`` settings (any thread)."""
        return self._drift.state if self._drift is not None else None

    @property
    def busy_since(self) -> float | None:
        """When the worker started the batch it is processing (None: between batches)."""
        return self._worker.busy_since

    def run_inline(self) -> None:
        """The network loop's ``after_read`` hook: run the queued readings there when the
        model is cheap (``agent.inference.inline``)."""
        self._worker.run_inline()

    @property
    def inline(self) -> bool:
        """Whether the readings run in the network loop's thread (else in the worker)."""
        return self._worker.gate.inline

    @property
    def queue_depth(self) -> int:
        """Readings waiting for inference."""
        return len(self._queue)

    def subscription(self) -> Subscription:
        """The MQTT subscription feeding this pipeline."""
        return Subscription(
            self.config.input.topic,
            self.config.input.qos,
            self._intake.on_message,
            self.config.input.shared_group,
            acknowledges=True,
            on_too_large=self._intake.on_too_large,
        )

    def start(self) -> None:
        """Start the inference worker."""
        self._thread.start()

    def close_intake(self) -> None:
        """Ignore readings from now on without acknowledging them: with a persistent
        session the broker delivers them again after the restart."""
        self._intake.close()

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
        self._worker.gate.release()  # the worker drains what is left
        self._thread.join(timeout=deadline_s)
        abandoned = 0
        if self._thread.is_alive():
            abandoned = self._queue.abandon() if final else len(self._queue)
            self._log.warning("pipeline_stop_timeout", abandoned=abandoned)
            if not final:
                return
            self._thread.join(timeout=FINAL_BATCH_GRACE_S)
            if self._thread.is_alive():
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
            not self._thread.is_alive()
            and self._thread.ident is not None
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


class Worker:
    """The worker half of a pipeline: takes batches off the queue, runs the model and hands
    each result on. ``serve`` is the body of the pipeline's worker thread, and everything
    else here runs on that thread."""

    def __init__(
        self,
        name: str,
        config: PipelineConfig,
        registry: ModelRegistry,
        *,
        queue: DropOldestQueue[Reading],
        counters: PipelineCounters,
        latency: LatencyHistogram,
        drops: DropReporter,
        deliver: DeliverFn,
        errors: ErrorReporter,
        seq: SeqCounter,
        labels: list[str] | None,
        plan_for: Callable[[LoadedModel], RunPlan],
        observe: ResultObserver | None = None,
        drift: PipelineDrift | None = None,
    ) -> None:
        self._name = name
        self._drift = drift
        self._config = config
        self._registry = registry
        self._queue = queue
        self._counters = counters
        self._latency = latency
        self._drops = drops
        self._deliver = deliver
        self._errors = errors
        self._seq = seq
        self._labels = labels
        self._plan_for = plan_for
        self._observe = observe
        self._log = log.bind(pipeline=name, model=config.model)
        # Set while a batch is processed (by the worker, or inline by the network loop);
        # read by the systemd watchdog.
        self.busy_since: float | None = None
        self.gate = InlineGate(self._log)
        self._streams: StreamTable | None = None  # stateful pipelines only
        if config.state is not None:
            self._streams = StreamTable(config.state.reset_after_s)

    def serve(self) -> None:
        """Process batches until the queue is closed and drained (the worker's thread),
        once the readings no longer run inline."""
        self.gate.wait_for_worker()
        delay_s = self._config.batching.max_delay_ms / 1000
        while True:
            model = self._registry.get(self._config.model)
            limit = self._limit(model)
            batch = self._queue.take_batch(limit, delay_s)
            if not batch:
                return  # closed and drained
            with self.gate.lock:
                # Again: a new version may have been swapped in while the worker waited.
                self._process_safely(batch, self._registry.get(self._config.model))

    def run_inline(self) -> None:
        """Run the readings queued so far, in batches of the model's limit, on the network
        loop's thread (its ``after_read`` hook); nothing when they run in the worker. All
        of them: the broker sends no more than its in-flight window until they are
        answered, and the loop may not read again before its next wake-up."""
        gate = self.gate
        queue = self._queue
        while gate.inline and len(queue):
            with gate.lock:
                if not gate.inline:
                    return
                model = self._registry.get(self._config.model)
                batch = queue.take_now(self._limit(model))
                if not batch:
                    return
                started = time.perf_counter()
                self._process_safely(batch, model)
                gate.judge(time.perf_counter() - started, len(batch))

    def _process_safely(self, batch: list[Reading], model: LoadedModel | None) -> None:
        self.busy_since = time.monotonic()
        try:
            self._process(batch, model)
        except Exception:  # a bug must not stop the pipeline; every reading gets an answer
            self._log.exception("batch_failed", size=len(batch))
            for reading in batch:
                self._fail(reading, "internal error while processing the reading")
        finally:
            self.busy_since = None
        # ``dropped`` first: nothing else to look at until a reading was ever dropped.
        if self._counters.dropped and not len(self._queue) and self._drops.pending:
            self._drops.report(None)  # the overload is over: give the final count

    def _limit(self, model: LoadedModel | None) -> int:
        if model is None:
            return 1
        try:
            return self._plan_for(model).limit
        except PipelineFitError:
            return 1

    def _process(self, batch: list[Reading], model: LoadedModel | None) -> None:
        if model is None:
            reason = not_serving_reason(self._registry, self._config.model)
            for reading in batch:
                self._fail(reading, reason)
            return
        try:
            plan = self._plan_for(model)
        except PipelineFitError as exc:
            for reading in batch:
                self._fail(reading, str(exc))
            return
        if plan.state:
            for reading in batch:
                self._run_stateful(model, plan, reading)
        elif plan.limit == 1 or len(batch) == 1:
            for reading in batch:
                self._run(model, plan, [reading])
        else:
            for group in group_by_shape(batch):
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
        assert self._streams is not None  # a plan with state comes from a config with state
        stream = self._streams.get(
            reading.stream_key, model.version, model.inputs, plan, reading.received
        )
        feeds = feeds_for(plan, [reading.tensors])
        feeds.update(stream.state)
        outputs = self._session_run(model, plan, feeds, [reading])
        if outputs is None:
            return
        problem = _non_finite(plan, outputs)
        if problem is not None:
            self._fail(reading, problem)
            return
        stream.advance(plan, model.inputs, outputs)
        values = {name: split_output(outputs[name], 0, 1, plan.stacked) for name in plan.published}
        self._publish_result(model, plan, reading, values)

    def _session_run(
        self, model: LoadedModel, plan: RunPlan, feeds: dict[str, Any], group: list[Reading]
    ) -> dict[str, Any] | None:
        tap = self._registry.taps.get(model.name)  # an update's shadow trial in progress
        started = time.perf_counter() if tap is not None else 0.0
        try:
            values = model.session.run(list(plan.fetch), feeds)
        except Exception as exc:  # onnxruntime's own error types
            for reading in group:
                self._fail(reading, f"inference failed: {first_line(exc)}")
            return None
        outputs = dict(zip(plan.fetch, values, strict=True))
        if self._drift is not None:
            self._drift.observe(feeds, outputs, plan.stacked, model)
        if tap is not None:
            seconds = time.perf_counter() - started
            post = self._config.output.postprocess
            tap.offer(
                Offered(self._name, plan, post, self._labels, feeds, outputs, len(group), seconds)
            )
        return outputs

    def _publish_result(
        self, model: LoadedModel, plan: RunPlan, reading: Reading, values: dict[str, Any]
    ) -> None:
        result: dict[str, Any] = {
            "id": reading.reading_id,
            "seq": self._seq.take(),
            "pipeline": self._name,
            "model": model.name,
            "version": model.version,
            "ts": time.time(),
            "latency_ms": 0.0,
            "outputs": values,
        }
        post = self._config.output.postprocess
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
        qos = self._config.output.qos
        done = reading.ack
        if reading.response_topic is not None and done is not None:
            done = ack_after_both(done)
        self._deliver(PendingResult(self._name, reading.output_topic, payload, qos), done)
        if reading.response_topic is not None:
            self._deliver(
                PendingResult(
                    self._name, reading.response_topic, payload, qos, reading.correlation
                ),
                done,
            )
        self._counters.processed += 1
        self._latency.record(latency_ms)
        if self._observe is not None:
            self._observe(self._name, reading.topic, result)

    def _fail(self, reading: Reading, reason: str) -> None:
        self._counters.failed += 1
        self._errors.report(self._name, reading.topic, reason, reading.reading_id)
        if reading.ack is not None:
            reading.ack()


def ack_after_both(ack: Ack) -> Ack:
    """An acknowledgement that fires on its second call (a result sent to two topics).

    Each delivery calls it once, from whichever thread handed its result off; the lock makes
    exactly one of the two calls the second."""
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
