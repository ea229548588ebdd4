"""TensorRT's first engine build: foreseen, announced, and given its own deadline.

TensorRT compiles an engine for each model the first time a session runs it, which takes
minutes on a Jetson (9.5 in roboflow/inference#2703) and logs nothing meanwhile. The engine
is cached under ``state_dir/trt-cache/<model sha256>-...`` (``agent.hardware.providers``), so
an empty cache folder means the next load builds. Such a load says so (a status step
``building_engine``, a log line every ``HEARTBEAT_S``) and is bounded by
``updates.engine_build_timeout_s`` rather than the shorter warm-up or trial limits.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

import structlog

from agent.hardware.providers import TENSORRT, ProviderPlan

HEARTBEAT_S = 30.0

log = structlog.get_logger(__name__)


def first_engine_build(plan: ProviderPlan, available: Sequence[str] | None = None) -> Path | None:
    """The TensorRT cache folder when loading with ``plan`` will build an engine (TensorRT
    is requested and its cache holds no engine yet), else None. With ``available`` (the
    installed onnxruntime's providers) a TensorRT it does not offer builds nothing."""
    if available is not None and TENSORRT not in available:
        return None
    for choice in plan.chosen:
        if choice.name != TENSORRT:
            continue
        folder = choice.options.get("trt_engine_cache_path")
        if not folder:
            return None
        cache = Path(str(folder))
        try:
            built = any(entry.name.endswith(".engine") for entry in cache.iterdir())
        except OSError:  # no folder yet: nothing was ever built there
            built = False
        return None if built else cache
    return None


class BuildHeartbeat:
    """While a session that builds a TensorRT engine loads, log that it still does every
    ``interval_s`` (a timer thread), so an operator watching the journal sees progress."""

    def __init__(self, model: str, cache: Path, interval_s: float = HEARTBEAT_S) -> None:
        self._model = model
        self._cache = cache
        self._interval_s = interval_s
        self._done = threading.Event()
        self._started = time.monotonic()
        self._thread = threading.Thread(
            target=self._beat, name=f"engine-build-{model}", daemon=True
        )

    def __enter__(self) -> BuildHeartbeat:
        log.warning(
            "tensorrt_engine_build",
            model=self._model,
            cache=str(self._cache),
            note="the first load on this device builds the TensorRT engine: this can take "
            "minutes; later loads reuse the cached engine",
        )
        self._thread.start()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._done.set()
        self._thread.join(timeout=1.0)
        log.info(
            "tensorrt_engine_build_ended",
            model=self._model,
            seconds=round(time.monotonic() - self._started, 1),
            ok=kind is None,
        )

    def _beat(self) -> None:  # the heartbeat's own thread
        while not self._done.wait(self._interval_s):
            log.info(
                "tensorrt_engine_building",
                model=self._model,
                elapsed_s=round(time.monotonic() - self._started),
                cache=str(self._cache),
            )
