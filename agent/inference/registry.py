"""Model registry: load a model file into a checked, warmed-up ONNX Runtime session.

Loads run on the caller's thread (the daemon's main thread at start-up, the watcher's or
the update installer's later), never on paho's thread or an inference worker. Loads of one
model are serialized; loads of different models are not, so a model that is slow (or stuck)
to warm up never holds up another. Every warm-up run ends by a deadline: onnxruntime's
``RunOptions.terminate`` stops it from a timer. Serving code reads the current
``LoadedModel`` through ``ModelRegistry.get``: a single reference, replaced as a whole, so a
batch that already holds a model finishes on it.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import structlog

from agent.config.schema import AgentConfig, PipelineConfig
from agent.errors import ModelLoadError, PipelineFitError, first_line
from agent.hardware.detect import Hardware
from agent.hardware.providers import PlanInputs, ProviderPlan, plan_providers
from agent.inference.codecs import ONNX_TO_NUMPY, TensorSpec, encode_json
from agent.inference.compat import pipeline_problems
from agent.inference.runplan import ModelView, build_plan, warmup_feeds, zeros

log = structlog.get_logger(__name__)

# ONNX Runtime's session constructor is not thread-safe (onnxruntime #27089): one at a time.
_SESSION_CREATION = threading.Lock()


class ModelState(str, Enum):
    """Lifecycle states published on ``P/models/NAME``."""

    LOADING = "LOADING"
    READY = "READY"
    FAILED = "FAILED"


@dataclass(frozen=True)
class LoadedModel:
    """A serving session and what the pipelines need to know about it."""

    name: str
    version: str
    path: Path
    session: ort.InferenceSession
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[str, ...]
    providers: tuple[str, ...]
    requested: tuple[str, ...]
    degraded: bool
    loaded_at: float

    def input(self, name: str) -> TensorSpec | None:
        """The input called ``name``, if the model has one."""
        return next((spec for spec in self.inputs if spec.name == name), None)


@dataclass
class ModelStatus:
    """What is published about a model; owned by the registry, replaced under its lock."""

    name: str
    file: str
    state: ModelState = ModelState.LOADING
    version: str | None = None
    providers: tuple[str, ...] = ()
    requested: tuple[str, ...] = ()
    degraded: bool = False
    loaded_at: float | None = None
    error: str | None = None
    last_load: dict[str, Any] | None = None

    def to_json(self) -> bytes:
        """The retained ``P/models/NAME`` payload."""
        return encode_json(
            {
                "name": self.name,
                "state": self.state.value,
                "version": self.version,
                "file": self.file,
                "providers": list(self.providers),
                "requested_providers": list(self.requested),
                "degraded": self.degraded,
                "loaded_at": self.loaded_at,
                "error": self.error,
                "last_load": self.last_load,
            }
        )


StatePublisher = Callable[[str, bytes], None]
FailureReporter = Callable[[str, str, str], None]  # model name, file, reason
# (model name, version) -> why this file must not load, or None; runs on the loading thread.
Admission = Callable[[str, str], "str | None"]


class ModelRegistry:
    """The named models of the config, their current sessions and published states."""

    def __init__(
        self,
        config: AgentConfig,
        hardware: Hardware,
        publish_state: StatePublisher,
        on_failure: FailureReporter | None = None,
        admission: Admission | None = None,
    ) -> None:
        self._config = config
        self._admission = admission
        self._hardware = hardware
        self._publish_state = publish_state
        self._on_failure = on_failure
        self._lock = threading.Lock()  # guards _status, _load_locks, _active_loads
        # name -> the lock its loads take: one load per model at a time, any thread. Re-entrant:
        # an update holds it across install, trial and rollback (``hold``) and loads inside.
        self._load_locks: dict[str, threading.RLock] = {}
        self._active_loads = 0
        self._warmups = _WarmupRuns()
        # name -> serving model. Written only under that model's load lock; read without a
        # lock by the pipelines (replacing a dict value is atomic in CPython).
        self._models: dict[str, LoadedModel] = {}
        self._status: dict[str, ModelStatus] = {
            name: ModelStatus(name=name, file=str(config.model_path(name)))
            for name in config.models
        }

    def names(self) -> list[str]:
        """Names of the configured models."""
        return list(self._status)

    def get(self, name: str) -> LoadedModel | None:
        """The model currently serving under ``name``, or None when none loaded."""
        return self._models.get(name)

    def status(self, name: str) -> ModelStatus:
        """The last published status of ``name``."""
        with self._lock:
            return self._status[name]

    def load_all(self) -> None:
        """Load every configured model; a failing one does not stop the others."""
        for name in self.names():
            self.load(name)

    @property
    def loading(self) -> bool:
        """Whether a load is in progress right now."""
        with self._lock:
            return self._active_loads > 0

    def cancel_loads(self) -> None:
        """Stop every warm-up run in progress, and any that would start, at once: the agent
        is stopping, and a process that exits while a thread is inside onnxruntime's ``run``
        dies with SIGABRT. Those loads fail and the serving models stay. Any thread."""
        self._warmups.cancel()

    def hold(self, name: str) -> threading.RLock:
        """The lock of ``name``'s loads, to hold across several steps (``with``): an update's
        install, trial and rollback, so no other thread loads the file in between."""
        return self._load_lock(name)

    def _load_lock(self, name: str) -> threading.RLock:
        with self._lock:
            return self._load_locks.setdefault(name, threading.RLock())

    def reconfigure(self, config: AgentConfig) -> list[str]:
        """Adopt a new config (SIGHUP): removed models stop serving and their retained state
        is cleared; new ones get a status. Returns the removed names. Load models separately.
        """
        # Not under the load locks: a model that takes minutes to load must not hold up a
        # reload. A load of a removed model sees it gone when it comes to swap.
        with self._lock:
            self._config = config
            removed = [name for name in self._status if name not in config.models]
            for name in removed:
                self._models.pop(name, None)
                del self._status[name]
            for name in config.models:
                if name not in self._status:
                    self._status[name] = ModelStatus(name=name, file=str(config.model_path(name)))
                else:
                    self._status[name].file = str(config.model_path(name))
        for name in removed:
            self._publish_state(name, b"")  # an empty retained message deletes it
        return removed

    def load(
        self, name: str, force: bool = False, max_seconds: float | None = None
    ) -> LoadedModel | None:
        """(Re)load ``name`` from its file: read it once, build, check and warm up a new session
        while the current one keeps serving, then swap the reference.

        Bytes identical to the serving model's are a no-op unless ``force`` (the config that
        shapes the session changed). A model that took longer than ``max_seconds`` to load and
        warm up (an update's trial) is not swapped in, and its warm-up is stopped at that
        deadline; without one, warm-up is bounded by ``warmup_timeout_s``. On failure the
        serving model (if any) stays, and the failure is published. Runs on the caller's
        thread; loads of one model are serialized. Returns the serving model afterwards.
        """
        with self._load_lock(name):
            return self._counted_load(name, force, max_seconds)

    def reload_if_idle(self, name: str) -> bool:
        """Load ``name`` now unless a load of it is in progress (False: nothing was done, ask
        again later). For the folder watcher, whose one thread must not wait behind a model
        that takes minutes (an update's trial) while another model's file changes."""
        lock = self._load_lock(name)
        if not lock.acquire(blocking=False):
            return False
        try:
            self._counted_load(name, False, None)
        finally:
            lock.release()
        return True

    def _counted_load(
        self, name: str, force: bool, max_seconds: float | None
    ) -> LoadedModel | None:
        with self._lock:
            self._active_loads += 1
        try:
            return self._load_locked(name, force, max_seconds)
        finally:
            with self._lock:
                self._active_loads -= 1

    def _load_locked(self, name: str, force: bool, max_seconds: float | None) -> LoadedModel | None:
        config = self._config
        if name not in config.models:
            return None  # removed by a config reload meanwhile
        path = config.model_path(name)
        current = self._models.get(name)
        started = time.monotonic()
        fresh = self._new_bytes(name, path, current, force)
        if fresh is None:
            return current
        data, version = fresh
        now = time.time()
        attempt = {"state": ModelState.LOADING.value, "version": version, "started": now, "ts": now}
        self._set_status(
            name, last_load=attempt, state=ModelState.READY if current else ModelState.LOADING
        )
        limit = (
            _WarmupLimit(max_seconds, "updates.trial_timeout_s")
            if max_seconds is not None
            else _WarmupLimit(config.warmup_timeout_s, "warmup_timeout_s")
        )
        try:
            model = self._build_within(name, path, data, version, started=started, limit=limit)
            _check_time(started, max_seconds)
        except ModelLoadError as exc:
            self._failed(name, path, version, exc, started=now)
            return current
        del data  # the session holds its own copy; do not keep two
        with self._lock:
            if name not in self._status:
                return None  # removed by a config reload while it loaded
            self._models[name] = model  # the swap: in-flight batches keep the old one
        self._set_status(
            name,
            state=ModelState.READY,
            version=model.version,
            providers=model.providers,
            requested=model.requested,
            degraded=model.degraded,
            loaded_at=model.loaded_at,
            error=None,
            last_load={**attempt, "state": ModelState.READY.value, "ts": time.time()},
        )
        log.info(
            "model_ready",
            model=name,
            version=model.version,
            previous=current.version if current else None,
            providers=model.providers,
            load_ms=round((time.monotonic() - started) * 1000, 1),
        )
        return model

    def _failed(
        self,
        name: str,
        path: Path,
        version: str | None,
        exc: ModelLoadError,
        started: float | None = None,
    ) -> None:
        serving = self._models.get(name)
        log.error(
            "model_load_failed",
            model=name,
            file=str(path),
            version=version,
            error=str(exc),
            still_serving=serving.version if serving else None,
        )
        self._set_status(
            name,
            state=ModelState.READY if serving else ModelState.FAILED,
            error=str(exc),
            last_load={
                "state": ModelState.FAILED.value,
                "version": version,
                "error": str(exc),
                "started": started or time.time(),
                "ts": time.time(),
            },
        )
        if self._on_failure is not None:
            self._on_failure(name, str(path), str(exc))

    def _set_status(self, name: str, **changes: Any) -> None:
        with self._lock:
            status = self._status.get(name)
            if status is None:
                return  # removed by a config reload while it loaded
            for key, value in changes.items():
                setattr(status, key, value)
            payload = status.to_json()
        self._publish_state(name, payload)

    def _new_bytes(
        self, name: str, path: Path, current: LoadedModel | None, force: bool
    ) -> tuple[bytes, str] | None:
        """The file's bytes and version when they are to be loaded; None when they are the
        serving model's (unless ``force``) or cannot or may not load (reported)."""
        try:
            data = _read_model_file(path)
        except ModelLoadError as exc:
            self._failed(name, path, None, exc)
            return None
        version = "sha256:" + hashlib.sha256(data).hexdigest()
        if current is not None and current.version == version and not force:
            log.debug("model_unchanged", model=name, version=version)
            return None
        refusal = self._admission(name, version) if self._admission else None
        if refusal is not None:
            self._failed(name, path, version, ModelLoadError(refusal))
            return None
        return data, version

    def _build_within(
        self,
        name: str,
        path: Path,
        data: bytes,
        version: str,
        *,
        started: float,
        limit: _WarmupLimit,
    ) -> LoadedModel:
        try:
            return self._build(name, path, data, version, limit.deadline(started))
        except _WarmupStopped as stop:
            raise ModelLoadError(
                limit.explain(started)
                if stop.timed_out
                else "warm-up stopped: the agent is stopping"
            ) from None

    def _build(
        self, name: str, path: Path, data: bytes, version: str, deadline: float
    ) -> LoadedModel:
        plan = self.plan(name, version)
        requested = plan.names
        try:
            with _SESSION_CREATION:
                session = ort.InferenceSession(
                    data, sess_options=session_options(plan), providers=plan.for_session()
                )
        except Exception as exc:  # ORT raises its own exception types, not importable stably
            raise ModelLoadError(_explain_load_error(exc)) from exc
        loaded = tuple(session.get_providers())
        missing = [p for p in requested if p not in loaded]
        if missing:
            log.warning(
                "providers_not_loaded",
                model=name,
                requested=requested,
                loaded=list(loaded),
                missing=missing,
                reason="onnxruntime fell back without an error: the provider is not "
                "installed or its libraries (CUDA, cuDNN, TensorRT) failed to load; "
                "run `edge-agent detect`",
            )
            if self._config.require_providers:
                raise ModelLoadError(
                    f"requested providers {missing} did not load (loaded: {list(loaded)}) and "
                    "require_providers is true"
                )
        inputs = _describe_inputs(session)
        outputs = tuple(o.name for o in session.get_outputs())
        users = {p: c for p, c in self._config.pipelines.items() if c.model == name}
        problems = pipeline_problems(ModelView(inputs, outputs), users)
        if problems:
            raise ModelLoadError("; ".join(problems))
        model = LoadedModel(
            name=name,
            version=version,
            path=path,
            session=session,
            inputs=inputs,
            outputs=outputs,
            providers=loaded,
            requested=tuple(requested),
            degraded=bool(missing),
            loaded_at=time.time(),
        )
        _warm_up(model, users, lambda feeds: self._warmups.run(model.session, feeds, deadline))
        return model

    def plan(self, name: str, version: str) -> ProviderPlan:
        """The execution providers for model ``name`` (per-model setting, else global)."""
        setting = self._config.models[name].providers or self._config.providers
        return plan_providers(
            self._hardware,
            PlanInputs(
                available=ort.get_available_providers(),
                requested=None if setting in (None, "auto") else list(setting),
                model_sha256=version,
                state_dir=Path(self._config.state_dir),
                gpu_mem_limit_mb=self._config.gpu_mem_limit_mb,
                cpu_threads=self._config.cpu_threads,
                ort_version=ort.__version__,
            ),
        )


def _check_time(started: float, max_seconds: float | None) -> None:
    took = time.monotonic() - started
    if max_seconds is not None and took > max_seconds:
        raise ModelLoadError(
            f"loading and warming up took {took:.1f} s, more than the "
            f"{max_seconds:g} s allowed (updates.trial_timeout_s)"
        )


def session_options(plan: ProviderPlan) -> ort.SessionOptions:
    """Session options for ``plan``: CPU threads, spinning, logging."""
    options = ort.SessionOptions()
    options.log_severity_level = 3  # ORT's own warnings duplicate ours; keep its errors only
    options.intra_op_num_threads = plan.intra_op_num_threads
    # Spinning threads burn a core waiting for work: wasteful on small boards that mostly
    # idle between readings, and it heats the SoC.
    options.add_session_config_entry(
        "session.intra_op.allow_spinning", "1" if plan.allow_spinning else "0"
    )
    return options


def _read_model_file(path: Path) -> bytes:
    try:
        data = path.read_bytes()
    except FileNotFoundError as exc:
        raise ModelLoadError(f"model file not found: {path}") from exc
    except IsADirectoryError as exc:
        raise ModelLoadError(f"model path is a folder, not a file: {path}") from exc
    except OSError as exc:
        raise ModelLoadError(f"cannot read model file {path}: {exc.strerror}") from exc
    if not data:
        raise ModelLoadError(f"model file is empty: {path}")
    return data


def _describe_inputs(session: ort.InferenceSession) -> tuple[TensorSpec, ...]:
    """Per-reading input specs.

    An input has a batch axis when its first axis is dynamic, or fixed at 1 with more axes
    after it (models exported for batch size 1); how a pipeline batches is its run plan's
    business.
    """
    specs = []
    for item in session.get_inputs():
        if item.type not in ONNX_TO_NUMPY:
            raise ModelLoadError(f"input {item.name!r} has unsupported type {item.type}")
        shape = tuple(d if isinstance(d, int) and d > 0 else None for d in item.shape)
        dynamic_first = len(shape) >= 1 and shape[0] is None
        fixed_one = len(shape) >= 2 and shape[0] == 1
        batched = dynamic_first or fixed_one
        specs.append(
            TensorSpec(
                name=item.name,
                dtype=np.dtype(ONNX_TO_NUMPY[item.type]),
                item_shape=shape[1:] if batched else shape,
                batched=batched,
                max_batch=None if dynamic_first else 1 if fixed_one else None,
            )
        )
    return tuple(specs)


class _WarmupStopped(Exception):  # noqa: N818 - a signal between two methods, not an error
    """A warm-up run was ended by its deadline (``timed_out``) or by ``cancel_loads``."""

    def __init__(self, timed_out: bool) -> None:
        super().__init__("timed out" if timed_out else "cancelled")
        self.timed_out = timed_out


@dataclass(frozen=True)
class _WarmupLimit:
    """How long a load may take, and the setting that says so (for the error)."""

    seconds: float
    setting: str

    def deadline(self, started: float) -> float:
        return started + self.seconds

    def explain(self, started: float) -> str:
        return (
            f"warm-up did not finish within {self.seconds:g} s ({self.setting}): stopped "
            f"after {time.monotonic() - started:.1f} s; a model whose run never ends "
            "(a Loop without a bound, say) cannot serve"
        )


class _WarmupRuns:
    """Warm-up runs in progress, each with onnxruntime ``RunOptions`` whose ``terminate``
    flag a timer (the deadline) or ``cancel`` (the agent stopping) sets. Any thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._running: dict[int, ort.RunOptions] = {}  # by id(): pybind objects, no __eq__
        self._cancelled = False

    def cancel(self) -> None:
        with self._lock:
            self._cancelled = True
            for options in self._running.values():
                options.terminate = True

    def run(self, session: ort.InferenceSession, feeds: dict[str, Any], deadline: float) -> None:
        """``session.run(None, feeds)``, ended at ``deadline`` (``_WarmupStopped``)."""
        options = ort.RunOptions()
        options.log_severity_level = 4  # the terminated run's error is ours to report
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise _WarmupStopped(timed_out=True)
        timer = threading.Timer(remaining, self._expire, args=(options,))
        timer.daemon = True
        with self._lock:
            if self._cancelled:
                raise _WarmupStopped(timed_out=False)
            self._running[id(options)] = options
        timer.start()
        try:
            session.run(None, feeds, options)
        except Exception:
            with self._lock:
                stopped, cancelled = options.terminate, self._cancelled
            if stopped:
                raise _WarmupStopped(timed_out=not cancelled) from None
            raise
        finally:
            timer.cancel()
            with self._lock:
                self._running.pop(id(options), None)

    def _expire(self, options: ort.RunOptions) -> None:  # the timer's thread
        with self._lock:
            options.terminate = True


def _warm_up(
    model: LoadedModel,
    pipelines: Mapping[str, PipelineConfig],
    run: Callable[[dict[str, Any]], None],
) -> None:
    """Run once before serving: the first run allocates and optimizes and is much slower.

    Uses each pipeline's constants, state and ``input.shape``, so the warm-up looks like real
    readings; a model no pipeline uses gets zeros with dynamic axes of length 1.
    """
    runs: list[dict[str, Any]] = []
    try:
        for name, pipeline in pipelines.items():
            plan = build_plan(ModelView(model.inputs, model.outputs), pipeline, name)
            runs.append(warmup_feeds(plan, model.inputs, pipeline))
    except PipelineFitError as exc:
        raise ModelLoadError(str(exc)) from exc
    if not runs:
        runs.append({spec.name: zeros(spec, leading=spec.batched) for spec in model.inputs})
    for feeds in runs:
        try:
            run(feeds)
        except _WarmupStopped:
            raise
        except Exception as exc:
            raise ModelLoadError(
                f"warm-up inference failed: {first_line(exc)} (set the pipeline's input.shape and "
                "constants so the warm-up uses realistic inputs)"
            ) from exc


def _explain_load_error(exc: Exception) -> str:
    text = str(exc)
    if "INVALID_PROTOBUF" in text or "Protobuf parsing failed" in text:
        return "not an ONNX model (the file does not parse as an ONNX protobuf)"
    return f"onnxruntime could not load the model: {first_line(exc)}"
