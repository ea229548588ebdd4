"""The sessions a shadow trial runs (agent/inference/shadow_models.py), with real models:
single-threaded copies of both models on the CPU, the models' own sessions otherwise, and
why, in the figures."""

from __future__ import annotations

import hashlib
import os
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from agent.inference.session import LoadedModel
from agent.inference.shadow import Offered, ShadowTally, ShadowTap, run_beside
from agent.inference.shadow_models import (
    CPU_TIME_COPIES,
    OWN_RUNS,
    SHADOW_NICE,
    lower_this_thread,
    shadow_models,
)
from tests.onnx_builders import build_linear
from tests.shadow_models import build_slower
from tests.test_shadow_logic import plan

CPU = ("CPUExecutionProvider",)

pytestmark = pytest.mark.skipif(not hasattr(os, "SCHED_IDLE"), reason="Linux scheduling")


def loaded(path: Path, name: str = "m") -> LoadedModel:
    """``path`` as the registry would hold it: a session and its version."""
    data = path.read_bytes()
    return LoadedModel(
        name=name,
        version="sha256:" + hashlib.sha256(data).hexdigest(),
        path=path,
        session=ort.InferenceSession(data, providers=list(CPU)),
        inputs=(),
        outputs=("y",),
        providers=CPU,
        requested=CPU,
        degraded=False,
        loaded_at=time.time(),
    )


def test_on_the_cpu_both_models_run_as_single_threaded_copies_timed_by_cpu_time(
    tmp_path: Path,
) -> None:
    """The copies give the candidate's outputs, and the slower candidate's CPU time per
    run is the larger, as the verdict needs."""
    serving = loaded(build_linear(tmp_path / "m.onnx.prev", seed=3))
    candidate_file = build_slower(tmp_path / "m.onnx", seed=3, layers=6, width=256)
    candidate = loaded(candidate_file)
    models = shadow_models(candidate, candidate_file.read_bytes(), serving, serving.path)
    assert models.timing == CPU_TIME_COPIES
    assert models.note is None
    assert models.serving is not None
    feeds = {"x": np.ones((8, 4), np.float32)}
    values, candidate_s = models.run_candidate(["y"], feeds)
    expected = serving.session.run(["y"], feeds)[0]
    np.testing.assert_allclose(values[0], expected, rtol=1e-5, atol=1e-5)
    serving_s = min(models.time_serving(["y"], feeds) for _ in range(5))
    assert min(models.run_candidate(["y"], feeds)[1] for _ in range(5)) > serving_s
    assert candidate_s >= 0


def test_a_serving_file_that_is_not_the_serving_model_leaves_the_own_sessions(
    tmp_path: Path,
) -> None:
    """Other bytes, a symlink or no file where the serving model's should be: no copy of
    it, the models' own sessions timed by the clock, and a note that says why."""
    serving = loaded(build_linear(tmp_path / "m.onnx.prev", seed=3))
    candidate_file = build_linear(tmp_path / "m.onnx", seed=4)
    candidate = loaded(candidate_file)
    data = candidate_file.read_bytes()
    other = build_linear(tmp_path / "other.onnx", seed=5)
    link = tmp_path / "link.onnx.prev"
    link.symlink_to(serving.path)
    for place, words in (
        (other, "no longer holds the serving model's bytes"),
        (link, "symlink"),
        (tmp_path / "gone.onnx.prev", "not found"),
    ):
        models = shadow_models(candidate, data, serving, place)
        assert models.timing == OWN_RUNS
        assert models.serving is None
        assert models.candidate is candidate.session
        assert models.note is not None
        assert words in models.note


def test_with_an_accelerator_the_candidate_runs_its_own_session(tmp_path: Path) -> None:
    """A candidate placed on CUDA is not copied to the CPU (another engine, other
    numerics): its own session runs, and no note is needed."""
    serving = loaded(build_linear(tmp_path / "m.onnx.prev", seed=3))
    candidate_file = build_linear(tmp_path / "m.onnx", seed=3)
    candidate = replace(loaded(candidate_file), requested=("CUDAExecutionProvider", *CPU))
    models = shadow_models(candidate, candidate_file.read_bytes(), serving, serving.path)
    assert (models.timing, models.serving, models.note) == (OWN_RUNS, None, None)


def test_the_shadow_thread_runs_at_the_lowest_priority_and_compares_joined_runs(
    tmp_path: Path,
) -> None:
    """On its own thread: nice 19 and SCHED_IDLE; 40 batches of one offered together
    are compared in runs of up to the plan's limit, every reading counted, all agreeing."""
    serving = loaded(build_linear(tmp_path / "m.onnx.prev", seed=3))
    candidate_file = build_linear(tmp_path / "m.onnx", seed=3)
    candidate = loaded(candidate_file)
    tap = ShadowTap()
    shared = plan(limit=16)
    rng = np.random.default_rng(0)
    for _ in range(40):
        x = rng.uniform(0, 1, (1, 4)).astype(np.float32)
        served = {"y": serving.session.run(["y"], {"x": x})[0]}
        tap.offer(Offered("p", shared, None, None, {"x": x}, served, 1, 0.001))
    seen: dict[str, int] = {}
    tallies: list[ShadowTally] = []

    def shadow() -> None:
        lower_this_thread()
        seen["nice"] = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
        seen["policy"] = os.sched_getscheduler(0)
        models = shadow_models(candidate, candidate_file.read_bytes(), serving, serving.path)
        tally = run_beside(
            models,
            tap,
            until=time.monotonic() + 0.5,
            stopped=threading.Event(),
            progress=lambda _: None,
            progress_every_s=10,
        )
        tallies.append(tally)

    thread = threading.Thread(target=shadow)
    thread.start()
    thread.join(10)
    assert seen["nice"] == SHADOW_NICE
    assert seen["policy"] == os.SCHED_IDLE
    (tally,) = tallies
    assert tally.readings == 40
    assert tally.disagreeing == 0
    assert tally.batches == 3  # 16 + 16 + 8
    assert len(tally.serving_ms) == 3  # the serving copy timed on each
