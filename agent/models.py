"""Model registry: load a model file into a checked, warmed-up ONNX Runtime session.

Loads run on the caller's thread (the daemon's main thread at start-up), never on paho's
thread or an inference worker. Serving code reads the current ``LoadedModel`` through
``ModelRegistry.get``: a single reference, replaced as a whole, so a batch that already
holds a model finishes on it.
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

from agent.codecs import ONNX_TO_NUMPY, TensorSpec, encode_json
from agent.compat import pipeline_problems
from agent.config import AgentConfig, PipelineConfig
from agent.errors import ModelLoadError, PipelineFitError
from agent.hardware import Hardware
from agent.providers import PlanInputs, ProviderPlan, plan_providers
from agent.runplan import ModelView, build_plan, warmup_feeds, zeros

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
        return encode_json({
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
        })


StatePublisher = Callable[[str, bytes], None]
FailureReporter = Callable[[str, str, str], None]  # model name, file, reason
# (model name, version) -> why this file must not load, or None; runs on the loading thread.
Admission = Callable[[str, str], "str | None"]


class ModelRegistry:
    """The named models of the config, their current sessions and published states."""

    def __init__(self, config: AgentConfig, hardware: Hardware, publish_state: StatePublisher,
                 on_failure: FailureReporter | None = None,
                 admission: Admission | None = None) -> None:
        self._config = config
        self._admission = admission
        self._hardware = hardware
        self._publish_state = publish_state
        self._on_failure = on_failure
        self._lock = threading.Lock()        # guards _status
        self._load_lock = threading.Lock()   # one load at a time (start-up or reload thread)
        # name -> serving model. Written only under _load_lock; read without a lock by the
        # pipelines (replacing a dict value is atomic in CPython).
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
        return self._load_lock.locked()

    def reconfigure(self, config: AgentConfig) -> list[str]:
        """Adopt a new config (SIGHUP): removed models stop serving and their retained state
        is cleared; new ones get a status. Returns the removed names. Load models separately.
        """
        with self._load_lock:
            self._config = config
            removed = [name for name in self._status if name not in config.models]
            for name in removed:
                self._models.pop(name, None)
                with self._lock:
                    del self._status[name]
                self._publish_state(name, b"")  # an empty retained message deletes it
            for name in config.models:
                with self._lock:
                    if name not in self._status:
                        self._status[name] = ModelStatus(name=name,
                                                         file=str(config.model_path(name)))
                    else:
                        self._status[name].file = str(config.model_path(name))
        return removed

    def load(self, name: str, force: bool = False,
             max_seconds: float | None = None) -> LoadedModel | None:
        """(Re)load ``name`` from its file: read it once, build, check and warm up a new session
        while the current one keeps serving, then swap the reference.

        Bytes identical to the serving model's are a no-op unless ``force`` (the config that
        shapes the session changed). A model that took longer than ``max_seconds`` to load and
        warm up (an update's trial) is not swapped in. On failure the serving model (if
        any) stays, and the failure is published. Runs on the caller's thread; loads are
        serialized. Returns the serving model afterwards.
        """
        with self._load_lock:
            if name not in self._config.models:
                return None  # removed by a config reload meanwhile
            path = self._config.model_path(name)
            current = self._models.get(name)
            started = time.monotonic()
            try:
                data = _read_model_file(path)
            except ModelLoadError as exc:
                self._failed(name, path, None, exc)
                return current
            version = "sha256:" + hashlib.sha256(data).hexdigest()
            if current is not None and current.version == version and not force:
                log.debug("model_unchanged", model=name, version=version)
                return current
            refusal = self._admission(name, version) if self._admission else None
            if refusal is not None:
                self._failed(name, path, version, ModelLoadError(refusal))
                return current
            now = time.time()
            attempt = {"state": ModelState.LOADING.value, "version": version, "started": now,
                       "ts": now}
            self._set_status(name, last_load=attempt,
                             state=ModelState.READY if current else ModelState.LOADING)
            try:
                model = self._build(name, path, data, version)
                _check_time(started, max_seconds)
            except ModelLoadError as exc:
                self._failed(name, path, version, exc, started=now)
                return current
            del data  # the session holds its own copy; do not keep two
            self._models[name] = model  # the swap: in-flight batches keep the old reference
            self._set_status(name, state=ModelState.READY, version=model.version,
                             providers=model.providers, requested=model.requested,
                             degraded=model.degraded, loaded_at=model.loaded_at, error=None,
                             last_load={**attempt, "state": ModelState.READY.value,
                                        "ts": time.time()})
            log.info("model_ready", model=name, version=model.version,
                     previous=current.version if current else None, providers=model.providers,
                     load_ms=round((time.monotonic() - started) * 1000, 1))
            return model

    def _failed(self, name: str, path: Path, version: str | None, exc: ModelLoadError,
                started: float | None = None) -> None:
        serving = self._models.get(name)
        log.error("model_load_failed", model=name, file=str(path), version=version,
                  error=str(exc), still_serving=serving.version if serving else None)
        self._set_status(name, state=ModelState.READY if serving else ModelState.FAILED,
                         error=str(exc), last_load={"state": ModelState.FAILED.value,
                                                    "version": version, "error": str(exc),
                                                    "started": started or time.time(),
                                                    "ts": time.time()})
        if self._on_failure is not None:
            self._on_failure(name, str(path), str(exc))

    def _set_status(self, name: str, **changes: Any) -> None:
        with self._lock:
            status = self._status[name]
            for key, value in changes.items():
                setattr(status, key, value)
            payload = status.to_json()
        self._publish_state(name, payload)

    def _build(self, name: str, path: Path, data: bytes, version: str) -> LoadedModel:
        plan = self.plan(name, version)
        requested = plan.names
        try:
            with _SESSION_CREATION:
                session = ort.InferenceSession(data, sess_options=session_options(plan),
                                               providers=plan.for_session())
        except Exception as exc:  # ORT raises its own exception types, not importable stably
            raise ModelLoadError(_explain_load_error(exc)) from exc
        loaded = tuple(session.get_providers())
        missing = [p for p in requested if p not in loaded]
        if missing:
            log.warning("providers_not_loaded", model=name, requested=requested,
                        loaded=list(loaded), missing=missing,
                        reason="onnxruntime fell back without an error: the provider is not "
                        "installed or its libraries (CUDA, cuDNN, TensorRT) failed to load; "
                        "run `edge-agent detect`")
            if self._config.require_providers:
                raise ModelLoadError(
                    f"requested providers {missing} did not load (loaded: {list(loaded)}) and "
                    "require_providers is true")
        inputs = _describe_inputs(session)
        outputs = tuple(o.name for o in session.get_outputs())
        users = {p: c for p, c in self._config.pipelines.items() if c.model == name}
        problems = pipeline_problems(ModelView(inputs, outputs), users)
        if problems:
            raise ModelLoadError("; ".join(problems))
        model = LoadedModel(name=name, version=version, path=path, session=session,
                            inputs=inputs, outputs=outputs, providers=loaded,
                            requested=tuple(requested),
                            degraded=bool(missing),
                            loaded_at=time.time())
        _warm_up(model, users)
        return model

    def plan(self, name: str, version: str) -> ProviderPlan:
        """The execution providers for model ``name`` (per-model setting, else global)."""
        setting = self._config.models[name].providers or self._config.providers
        return plan_providers(self._hardware, PlanInputs(
            available=ort.get_available_providers(),
            requested=None if setting in (None, "auto") else list(setting),
            model_sha256=version,
            state_dir=Path(self._config.state_dir),
            gpu_mem_limit_mb=self._config.gpu_mem_limit_mb,
            cpu_threads=self._config.cpu_threads,
            ort_version=ort.__version__,
        ))


def _check_time(started: float, max_seconds: float | None) -> None:
    took = time.monotonic() - started
    if max_seconds is not None and took > max_seconds:
        raise ModelLoadError(f"loading and warming up took {took:.1f} s, more than the "
                             f"{max_seconds:g} s allowed (updates.trial_timeout_s)")


def session_options(plan: ProviderPlan) -> ort.SessionOptions:
    """Session options for ``plan``: CPU threads, spinning, logging."""
    options = ort.SessionOptions()
    options.log_severity_level = 3  # ORT's own warnings duplicate ours; keep its errors only
    options.intra_op_num_threads = plan.intra_op_num_threads
    # Spinning threads burn a core waiting for work: wasteful on small boards that mostly
    # idle between readings, and it heats the SoC.
    options.add_session_config_entry("session.intra_op.allow_spinning",
                                     "1" if plan.allow_spinning else "0")
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
        specs.append(TensorSpec(name=item.name, dtype=np.dtype(ONNX_TO_NUMPY[item.type]),
                                item_shape=shape[1:] if batched else shape, batched=batched,
                                max_batch=None if dynamic_first else 1 if fixed_one else None))
    return tuple(specs)


def _warm_up(model: LoadedModel, pipelines: Mapping[str, PipelineConfig]) -> None:
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
            model.session.run(None, feeds)
        except Exception as exc:
            first_line = str(exc).splitlines()[0] if str(exc) else repr(exc)
            raise ModelLoadError(
                f"warm-up inference failed: {first_line} (set the pipeline's input.shape and "
                "constants so the warm-up uses realistic inputs)") from exc


def _explain_load_error(exc: Exception) -> str:
    text = str(exc)
    if "INVALID_PROTOBUF" in text or "Protobuf parsing failed" in text:
        return "not an ONNX model (the file does not parse as an ONNX protobuf)"
    return f"onnxruntime could not load the model: {text.splitlines()[0] if text else exc!r}"
