"""The sessions a shadow trial runs, and how it times them.

On the CPU the candidate's own session would compete with the serving model for the cores:
its intra-op threads, which spin after each run, took both cores of a busy 2-core device
and doubled the serving latency (docs/performance.md has the runs). So there the shadow
runs single-threaded copies of the candidate and of the serving model on its own thread
at the lowest priority, and times both by that thread's CPU time on the same batches: the
latency ratio is the models' cost, whatever else the device was doing, and the shadow
takes only CPU the serving path leaves idle.

With an accelerator provider the work runs on the device, not the cores: the candidate's
own session runs (a copy would need a second engine and twice the device memory), timed
by the clock against the serving model's own run of the same batch. The same holds when
the serving model's bytes cannot be read back to copy it (a file that changed).
"""

from __future__ import annotations

import hashlib
import os
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnxruntime as ort
import structlog

from agent.errors import EdgeAgentError, ModelLoadError, first_line
from agent.hardware.providers import CPU
from agent.inference.golden import read_bounded
from agent.inference.placement import cpu_only
from agent.inference.session import SESSION_CREATION, LoadedModel, threads_options

log = structlog.get_logger(__name__)

SHADOW_NICE = 19  # the lowest priority a thread can ask for without privileges
# The serving model's copy runs on the first 32 compared batches, then on every 4th: enough
# pairs for the medians at a quarter of the cost.
SERVING_TIMED_FIRST = 32
SERVING_TIMED_EVERY = 4
MAX_ONNX_BYTES = 2**31  # protobuf's own limit on one ONNX file

# Which clock timed both models: in the figures, so an operator reads the ratio right.
CPU_TIME_COPIES = "cpu_time_single_thread_copies"
OWN_RUNS = "wall_time_own_sessions"


@dataclass
class ShadowModels:
    """What one shadow runs (its own thread uses it, nothing else does)."""

    candidate: ort.InferenceSession
    serving: ort.InferenceSession | None  # the copy timed beside it; None: its own runs
    note: str | None = None  # why the copies were not used, when they could have been

    @property
    def timing(self) -> str:
        """Which clock times both models (in the figures, so the ratio is read right)."""
        return CPU_TIME_COPIES if self.serving is not None else OWN_RUNS

    def clock(self) -> float:
        """Seconds by that clock: single-threaded copies run on this thread alone, so its
        CPU time is their work; the models' own sessions are timed by the wall clock."""
        return time.thread_time() if self.serving is not None else time.perf_counter()

    def run_candidate(self, fetch: Sequence[str], feeds: dict[str, Any]) -> tuple[list[Any], float]:
        """The candidate's outputs for ``feeds`` and its run time by this shadow's clock."""
        started = self.clock()
        values = self.candidate.run(list(fetch), feeds)
        return values, self.clock() - started

    def time_serving(self, fetch: Sequence[str], feeds: dict[str, Any]) -> float:
        """The serving model's copy's run time on ``feeds`` (copies only)."""
        if self.serving is None:
            raise ValueError("no copy of the serving model to time")
        started = self.clock()
        self.serving.run(list(fetch), feeds)
        return self.clock() - started


def lower_this_thread() -> None:
    """Give the calling thread the lowest scheduling priority (Linux, per thread: nice 19
    and the SCHED_IDLE policy), so the shadow takes only CPU the serving path leaves; a
    refusal is logged, not fatal."""
    if not sys.platform.startswith("linux"):
        return
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), SHADOW_NICE)
        # Below nice 19: a thread of SCHED_IDLE gives its core up at once to any other
        # that wakes, where a niced one finishes its slice first (measured: the serving
        # p50 rose half as much with it as with nice 19 alone).
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    except OSError as exc:
        log.warning("shadow_priority_not_lowered", error=exc.strerror)


def shadow_models(
    candidate: LoadedModel,
    candidate_bytes: bytes,
    serving: LoadedModel,
    serving_file: Path,
) -> ShadowModels:
    """The sessions for a shadow of ``candidate`` beside ``serving`` (whose bytes should be
    in ``serving_file``), built on the calling thread (the shadow's); ``ModelLoadError``
    when a copy cannot be built."""
    if not (cpu_only(candidate.requested) and cpu_only(serving.requested)):
        return ShadowModels(candidate.session, None)
    serving_bytes, problem = _serving_bytes(serving, serving_file)
    if serving_bytes is None:
        log.warning("shadow_serving_copy_unavailable", model=serving.name, reason=problem)
        return ShadowModels(candidate.session, None, note=problem)
    return ShadowModels(
        _single_threaded(candidate_bytes, "the candidate"),
        _single_threaded(serving_bytes, "the serving model"),
    )


def _serving_bytes(serving: LoadedModel, path: Path) -> tuple[bytes | None, str | None]:
    """The serving model's bytes from ``path`` (not through a symlink), or why not: they
    must be the very bytes it serves."""
    try:
        data = read_bounded(path, "serving model", MAX_ONNX_BYTES)
    except EdgeAgentError as exc:
        return None, f"its file cannot be read back to copy it: {exc}"
    if "sha256:" + hashlib.sha256(data).hexdigest() != serving.version:
        return None, f"{path} no longer holds the serving model's bytes"
    return data, None


def _single_threaded(data: bytes, what: str) -> ort.InferenceSession:
    # One thread: the run stays on the calling (low-priority) thread, no pool to spin.
    options = threads_options(1, spinning=False)
    try:
        with SESSION_CREATION:
            return ort.InferenceSession(data, sess_options=options, providers=[CPU])
    except Exception as exc:  # onnxruntime's own error types
        raise ModelLoadError(
            f"the shadow's copy of {what} could not be built: {first_line(exc)}"
        ) from exc
