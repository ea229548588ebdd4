"""Model registry: which session serves each model, and what is published about it.

Loads run on the caller's thread (the daemon's main thread at start-up, the watcher's or
the update installer's later), never on paho's thread or an inference worker. Loads of one
model are serialized; loads of different models are not, so a model that is slow (or stuck)
to warm up never holds up another. Building, checking and warming up a session is
``agent.inference.session``'s job; every warm-up run ends by a deadline. Serving code reads
the current ``LoadedModel`` through ``ModelRegistry.get``: a single reference, replaced as a
whole, so a batch that already holds a model finishes on it.
"""

from __future__ import annotations

import enum
import hashlib
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import structlog

from agent.config.schema import AgentConfig
from agent.errors import GoldenMismatchError, GoldenSetError, ModelLoadError
from agent.hardware.detect import Hardware
from agent.hardware.providers import ProviderPlan
from agent.inference.golden import GoldenSet, golden_path_for, read_golden_file
from agent.inference.model_status import (
    ModelStatus,
    StatePublisher,
    StatusBoard,
)
from agent.inference.session import LoadedModel, Progress, SessionFactory, WarmupLimit
from agent.inference.shadow import ShadowTaps

log = structlog.get_logger(__name__)


class GoldenFrom(enum.Enum):
    """Where a load takes its golden set when not handed one."""

    BESIDE_FILE = "beside"  # NAME.golden.npz beside the model file, if there is one


FailureReporter = Callable[[str, str, str], None]  # model name, file, reason
# (model name, version) -> why this file must not load, or None; runs on the loading thread.
Admission = Callable[[str, str], "str | None"]
# (candidate, serving model or None, the candidate's bytes) -> None, or ModelLoadError:
# refused (an update's shadow trial; runs on the loading thread, before the swap).
Gate = Callable[[LoadedModel, "LoadedModel | None", bytes], None]


@dataclass(frozen=True)
class _LoadOptions:
    """How one load goes (``ModelRegistry.load``'s arguments)."""

    force: bool = False
    max_seconds: float | None = None
    golden: GoldenSet | GoldenFrom | None = GoldenFrom.BESIDE_FILE
    progress: Progress | None = None
    gate: Gate | None = None


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
        self._on_failure = on_failure
        self._sessions = SessionFactory(hardware)
        self._statuses = StatusBoard(config, publish_state)
        # Guards _load_locks and _active_loads, and makes a config reload (new _config, models
        # removed) atomic against a load's swap. Taken before the status board's lock, never
        # inside it.
        self._lock = threading.Lock()
        # name -> the lock its loads take: one load per model at a time, any thread. Re-entrant:
        # an update holds it across install, trial and rollback (``hold``) and loads inside.
        self._load_locks: dict[str, threading.RLock] = {}
        self._active_loads = 0
        # name -> serving model. Written only under that model's load lock; read without a
        # lock by the pipelines (replacing a dict value is atomic in CPython).
        self._models: dict[str, LoadedModel] = {}
        # The shadow trials in progress: the pipelines offer them what the serving model ran.
        self.taps = ShadowTaps()

    def names(self) -> list[str]:
        """Names of the configured models."""
        return self._statuses.names()

    def get(self, name: str) -> LoadedModel | None:
        """The model currently serving under ``name``, or None when none loaded."""
        return self._models.get(name)

    def model_path(self, name: str) -> Path:
        """Where the file of model ``name`` is, as configured."""
        return self._config.model_path(name)

    def status(self, name: str) -> ModelStatus:
        """The last published status of ``name``."""
        return self._statuses.get(name)

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
        self._sessions.cancel()

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
            removed = self._statuses.adopt(config)
            for name in removed:
                self._models.pop(name, None)
        for name in removed:
            self._statuses.unpublish(name)
        return removed

    def load(
        self,
        name: str,
        force: bool = False,
        max_seconds: float | None = None,
        *,
        golden: GoldenSet | GoldenFrom | None = GoldenFrom.BESIDE_FILE,
        progress: Progress | None = None,
        gate: Gate | None = None,
    ) -> LoadedModel | None:
        """(Re)load ``name`` from its file: read it once, build, check and warm up a new session
        while the current one keeps serving, then swap the reference.

        Bytes identical to the serving model's are a no-op unless ``force`` (the config that
        shapes the session changed). A model that took longer than ``max_seconds`` to load and
        warm up (an update's trial) is not swapped in, and its warm-up is stopped at that
        deadline; without one, warm-up is bounded by ``warmup_timeout_s``. On failure the
        serving model (if any) stays, and the failure is published. Runs on the caller's
        thread; loads of one model are serialized. Returns the serving model afterwards.

        ``golden``: the set the new session must pass before it swaps in (an update's), None
        for none, or by default the ``NAME.golden.npz`` beside the model file if present.
        ``progress`` hears the long steps (``building_engine``, ``validating``). ``gate``
        has the last word before the swap (an update's shadow trial, on this thread, with
        the candidate, the serving model and the candidate's bytes): a ``ModelLoadError``
        it raises refuses it.
        """
        with self._load_lock(name):
            options = _LoadOptions(force, max_seconds, golden, progress, gate)
            return self._counted_load(name, options)

    def reload_if_idle(self, name: str) -> bool:
        """Load ``name`` now unless a load of it is in progress (False: nothing was done, ask
        again later). For the folder watcher, whose one thread must not wait behind a model
        that takes minutes (an update's trial) while another model's file changes."""
        lock = self._load_lock(name)
        if not lock.acquire(blocking=False):
            return False
        try:
            self._counted_load(name, _LoadOptions())
        finally:
            lock.release()
        return True

    def _counted_load(self, name: str, options: _LoadOptions) -> LoadedModel | None:
        with self._lock:
            self._active_loads += 1
        try:
            return self._load_locked(name, options)
        finally:
            with self._lock:
                self._active_loads -= 1

    def _load_locked(self, name: str, options: _LoadOptions) -> LoadedModel | None:
        force, max_seconds, golden = options.force, options.max_seconds, options.golden
        progress, gate = options.progress, options.gate
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
        attempt = self._statuses.loading(name, version, serving=current is not None)
        limit = (
            WarmupLimit(max_seconds, "updates.trial_timeout_s", whole_load=True)
            if max_seconds is not None
            else WarmupLimit(config.warmup_timeout_s, "warmup_timeout_s")
        )
        try:
            golden_set = _golden_for(path, golden)
            model = self._sessions.build(
                self._config,
                name,
                path,
                data,
                version,
                started=started,
                limit=limit,
                golden=golden_set,
                progress=progress,
            )
            if gate is not None:
                gate(model, current, data)
            del data  # the session holds its own copy; do not keep two
        except GoldenSetError as exc:  # the check cannot run: the model must not serve
            refusal = GoldenMismatchError(str(exc), None)
            self._failed(name, path, version, refusal, started=attempt["started"])
            return current
        except ModelLoadError as exc:
            self._failed(name, path, version, exc, started=attempt["started"])
            return current
        with self._lock:
            if not self._statuses.has(name):
                return None  # removed by a config reload while it loaded
            self._models[name] = model  # the swap: in-flight batches keep the old one
        self._statuses.ready(name, model, attempt)
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
        self._statuses.failed(name, version, exc, serving is not None, started)
        if self._on_failure is not None:
            self._on_failure(name, str(path), str(exc))

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

    def plan(self, name: str, version: str) -> ProviderPlan:
        """The execution providers for model ``name`` (per-model setting, else global)."""
        return self._sessions.plan(self._config, name, version)


def _golden_for(path: Path, golden: GoldenSet | GoldenFrom | None) -> GoldenSet | None:
    """The golden set a load of ``path`` must pass; ``GoldenSetError`` when the file beside
    the model exists but cannot be used (the model must not serve unchecked)."""
    if not isinstance(golden, GoldenFrom):
        return golden
    beside = golden_path_for(path)
    if not beside.exists() and not beside.is_symlink():
        return None
    try:
        return read_golden_file(beside)
    except GoldenSetError as exc:
        raise GoldenSetError(f"the golden set beside the model cannot be used: {exc}") from exc


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
