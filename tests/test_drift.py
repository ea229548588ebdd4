"""Drift of live readings from a reference: the features, the PSI, the windows and the flag
as logic on real numbers, and the reference files a pipeline may be given."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import numpy as np
import pytest

from agent.config.schema import DriftConfig, PipelineConfig
from agent.errors import GoldenSetError
from agent.inference.drift import (
    MIN_WINDOW_READINGS,
    SEGMENTS,
    DriftMonitor,
    feature_names,
    features,
)
from agent.inference.drift_setup import (
    PipelineDrift,
    ReferencePlaces,
    build_monitor,
    load_reference,
)
from agent.inference.golden import GoldenSet, reference_path_for
from agent.inference.reporting import ErrorReporter
from agent.inference.session import LoadedModel
from tests.broker import MosquittoBroker, Recorder, paced_stream
from tests.conftest import AgentProcess, base_config
from tests.onnx_builders import build_linear

FEATURES = 8
AgentFactory = Callable[..., AgentProcess]


class Clock:
    """A monotonic clock the test moves."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def monitor_of(
    config: DriftConfig, folder: Path, model: str = "m", clock: Callable[[], float] = time.monotonic
) -> DriftMonitor:
    """A pipeline's monitor for model ``model`` (``folder/MODEL.onnx``), nothing serving."""
    places = ReferencePlaces(folder / f"{model}.onnx", folder, folder / "state")
    arrays, source = load_reference(config, model, places, None)
    return build_monitor(config, arrays, source, clock=clock)


def save(path: Path, arrays: dict[str, np.ndarray]) -> None:
    np.savez(path, **arrays)  # type: ignore[arg-type]


def write_reference(path: Path, readings: np.ndarray, **outputs: np.ndarray) -> Path:
    arrays = {"input:x": readings, **{f"expected:{k}": v for k, v in outputs.items()}}
    np.savez(path, **arrays)  # type: ignore[arg-type]
    return path


def monitor_for(
    tmp_path: Path, clock: Clock, windows: int = 3, threshold: float = 0.2
) -> DriftMonitor:
    rng = np.random.default_rng(7)
    write_reference(tmp_path / "ref.npz", rng.normal(0, 1, (2000, FEATURES)).astype(np.float32))
    config = DriftConfig(reference="ref.npz", window_s=60, threshold=threshold, windows=windows)
    return monitor_of(config, tmp_path, clock=clock)


def feed_window(
    monitor: DriftMonitor,
    clock: Clock,
    rng: np.random.Generator,
    shift: float = 0.0,
    scale: float = 1.0,
) -> None:
    """One 60 s window of 300 readings in batches of 1 to 4; the last two features shifted."""
    sent = 0
    while sent < 300:
        size = int(rng.integers(1, 5))
        batch = rng.normal(0, 1, (size, FEATURES)).astype(np.float32)
        batch[:, -2:] = batch[:, -2:] * scale + shift
        monitor.observe({"x": batch}, {}, stacked=True)
        sent += size
    clock.now += 60


def test_a_stream_like_its_reference_never_raises_the_flag(tmp_path: Path) -> None:
    """200 windows (more than 16 hours at window_s 300) from the reference's distribution:
    no window over the threshold, no flag."""
    clock = Clock()
    monitor = monitor_for(tmp_path, clock)
    rng = np.random.default_rng(11)
    scores = []
    for _ in range(200):
        feed_window(monitor, clock, rng)
        state = monitor.state
        assert not state.flagged
        if state.score is not None:
            scores.append(state.score)
    assert len(scores) >= 198
    assert max(scores) < 0.2


def test_a_shift_raises_the_flag_after_the_windows_and_clears_it_after_as_many(
    tmp_path: Path,
) -> None:
    """Mean +1.5 and spread x2 on two features: over the threshold from the first shifted
    window, flagged at the third (windows: 3), the worst features named; back to normal,
    cleared after three windows under it."""
    clock = Clock()
    monitor = monitor_for(tmp_path, clock, windows=3)
    rng = np.random.default_rng(12)
    for _ in range(3):
        feed_window(monitor, clock, rng)
    history = []
    for _ in range(4):
        feed_window(monitor, clock, rng, shift=1.5, scale=2.0)
        history.append(monitor.state)
    # A window is scored by the first reading after its end: the state seen after each
    # shifted window is that of the window before it.
    assert [s.flagged for s in history] == [False, False, False, True]
    state = history[-1]
    assert state.windows_over == 3
    assert state.score is not None
    assert state.score > 0.5
    assert set(state.worst[:2]) == {f"x[{FEATURES - 2}]", f"x[{FEATURES - 1}]"}
    cleared = []
    for _ in range(5):
        feed_window(monitor, clock, rng)
        cleared.append(monitor.state.flagged)
    assert cleared == [True, True, True, False, False]


def test_a_quiet_window_is_not_scored(tmp_path: Path) -> None:
    clock = Clock()
    monitor = monitor_for(tmp_path, clock)
    rng = np.random.default_rng(3)
    for _ in range(MIN_WINDOW_READINGS - 1):
        monitor.observe({"x": rng.normal(0, 1, (1, FEATURES))}, {}, stacked=True)
    clock.now += 61
    monitor.observe({"x": rng.normal(0, 1, (1, FEATURES))}, {}, stacked=True)
    assert monitor.state.score is None


def test_readings_that_do_not_fit_the_reference_stop_the_measure_with_a_reason(
    tmp_path: Path,
) -> None:
    clock = Clock()
    monitor = monitor_for(tmp_path, clock)
    monitor.observe({"x": np.zeros((1, 3))}, {}, stacked=True)
    clock.now += 61  # checked when the window's readings are binned
    monitor.observe({"x": np.zeros((1, 3))}, {}, stacked=True)
    state = monitor.state
    assert state.problem == (
        "the readings give 3 features, the reference 8: its arrays do not have the shapes of "
        "the model's inputs and outputs"
    )
    monitor = monitor_for(tmp_path, clock)
    monitor.observe({"other": np.zeros((1, FEATURES))}, {}, stacked=True)
    assert "the reference has 'x'" in str(monitor.state.problem)


def test_wide_items_are_summarised_per_channel_or_per_segment() -> None:
    """Up to 64 elements: each a feature; (channels, ...) items: channel means; a long
    flat signal: 16 segment means."""
    narrow = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4)
    assert features(narrow, stacked=True).shape == (2, 12)
    image = np.ones((2, 3, 32, 32), np.float32) * np.array([1, 2, 3])[None, :, None, None]
    assert features(image, stacked=True).tolist() == [[1, 2, 3], [1, 2, 3]]
    assert feature_names("img", (3, 32, 32)) == ["img:channel 0", "img:channel 1", "img:channel 2"]
    signal = np.arange(1024, dtype=np.float32)[None]
    summary = features(signal, stacked=True)
    assert summary.shape == (1, SEGMENTS)
    assert summary[0, 0] == pytest.approx(31.5)
    assert feature_names("vib", (1024,))[-1] == f"vib:segment {SEGMENTS - 1}"
    assert features(np.zeros(5), stacked=False).shape == (1, 5)


def test_outputs_with_expected_arrays_are_features_too(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    write_reference(
        tmp_path / "ref.npz",
        rng.normal(0, 1, (500, 4)).astype(np.float32),
        y=rng.normal(0, 1, (500, 2)).astype(np.float32),
    )
    monitor = monitor_of(DriftConfig(reference="ref.npz"), tmp_path)
    assert monitor.feature_names == ["x[0]", "x[1]", "x[2]", "x[3]", "out:y[0]", "out:y[1]"]


@pytest.mark.parametrize(
    ("make", "words"),
    [
        (lambda p: None, "drift reference {path} not found"),
        (lambda p: os.symlink("/etc/hostname", p), "is a symlink: refused"),
        (lambda p: p.write_bytes(b"not a zip"), "not an .npz file"),
        (lambda p: save(p, {"other": np.zeros((200, 2))}), "no input:<name> arrays"),
        (
            lambda p: save(p, {"input:x": np.zeros((20, 2))}),
            "20 readings, fewer than the 100 a reference needs",
        ),
    ],
)
def test_an_unusable_reference_is_refused_with_the_reason(
    tmp_path: Path, make: object, words: str
) -> None:
    path = tmp_path / "ref.npz"
    make(path)  # type: ignore[operator]
    with pytest.raises(GoldenSetError) as caught:
        monitor_of(DriftConfig(reference="ref.npz"), tmp_path)
    assert words.format(path=path) in str(caught.value)


def test_golden_means_the_golden_set_beside_the_model(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    write_reference(
        tmp_path / "vib.golden.npz",
        rng.normal(0, 1, (150, 4)).astype(np.float32),
        y=rng.normal(0, 1, (150, 1)).astype(np.float32),
    )
    monitor = monitor_of(DriftConfig(reference="golden"), tmp_path, "vib")
    assert monitor.feature_names[-1] == "out:y[0]"


@pytest.mark.broker
def test_the_daemon_flags_a_stream_that_shifts_in_health_and_warnings(
    broker: MosquittoBroker, tmp_path: Path, agent_factory: AgentFactory
) -> None:
    """A pipeline with drift (window_s 1, windows 2): readings like the reference score low
    and never flag; readings shifted by +3 on one feature flag it within three windows, in
    P/health (drift per pipeline, a drift_p warning) and in the log."""
    build_linear(tmp_path / "models" / "lin.onnx", features=4, outputs=2)
    rng = np.random.default_rng(5)
    write_reference(tmp_path / "models" / "ref.npz", rng.normal(0, 1, (1000, 4)).astype(np.float32))
    config = base_config(
        broker,
        tmp_path,
        models={"lin": {}},
        health={"interval_s": 0.5},
        pipelines={
            "p": {
                "model": "lin",
                "input": {"topic": "in/+", "field": "x"},
                "output": {"topic": "out/{1}"},
                "drift": {"reference": "ref.npz", "window_s": 1, "windows": 2},
            }
        },
    )
    agent = agent_factory(config)
    agent.wait_for_event("agent_serving")
    rec = Recorder(broker, ["edge/dev1/health"]).start()

    def readings(shift: float, count: int) -> list[str]:
        rows = rng.normal(0, 1, (count, 4))
        rows[:, 2] += shift
        return [json.dumps({"x": [round(v, 4) for v in row]}) for row in rows]

    paced_stream(broker, "in/s1", readings(0.0, 600), 200).join(30)
    calm = json.loads(rec.on("edge/dev1/health")[-1].payload)["pipelines"]["p"]["drift"]
    assert calm["score"] is not None, calm
    assert calm["score"] < 0.2, calm
    assert calm["flagged"] is False
    paced_stream(broker, "in/s1", readings(3.0, 1000), 200).join(30)

    def flagged(messages: list[Any]) -> bool:
        document = json.loads(messages[-1].payload) if messages else {}
        return bool(document.get("pipelines", {}).get("p", {}).get("drift", {}).get("flagged"))

    rec.wait_for(lambda ms: flagged([m for m in ms if m.topic.endswith("health")]), 10)
    health = json.loads(rec.on("edge/dev1/health")[-1].payload)
    drift = health["pipelines"]["p"]["drift"]
    assert drift["worst"][0] == "x[2]"
    assert drift["windows_over"] >= 2
    assert any(w["code"] == "drift_p" for w in health["warnings"])
    event = agent.wait_for_event("drift_flagged")
    assert event["pipeline"] == "p"
    rec.stop()


class Serving:
    """What PipelineDrift reads of a serving model: its version and its golden set."""

    def __init__(self, version: str, golden: GoldenSet | None) -> None:
        self.version = version
        self.golden = golden


def serving(version: str, golden: GoldenSet | None) -> LoadedModel:
    """A stand-in for the serving model (pure logic: nothing runs it)."""
    return cast("LoadedModel", Serving(version, golden))


def observe_built(
    drift: PipelineDrift, feeds: dict[str, Any], outputs: dict[str, Any], model: LoadedModel
) -> None:
    """``drift.observe`` a batch of ``model`` until its reference, built on a thread of its
    own, has been taken over (a monitor or a problem)."""
    deadline = time.monotonic() + 10
    drift.observe(feeds, outputs, True, model)
    while drift.state is None and time.monotonic() < deadline:
        time.sleep(0.01)
        drift.observe(feeds, outputs, True, model)


def test_golden_follows_the_serving_model_and_its_last_update(tmp_path: Path) -> None:
    """reference: golden is the golden set the serving model passed; a new version brings
    its own; with none in memory, the last update's kept set in state_dir, else none."""
    rng = np.random.default_rng(4)
    errors: list[str] = []
    reporter = ErrorReporter(lambda topic, payload: errors.append(payload.decode()), "e")
    config = PipelineConfig.model_validate(
        {
            "model": "m",
            "input": {"topic": "in/+"},
            "output": {"topic": "out"},
            "drift": {"reference": "golden"},
        }
    )
    places = ReferencePlaces(tmp_path / "m.onnx", tmp_path, tmp_path / "state")
    drift = PipelineDrift("p", config, places, reporter)
    assert drift.state is None  # nothing built before the first batch
    first = GoldenSet({"x": rng.normal(0, 1, (200, 3))}, {"y": rng.normal(0, 1, (200, 1))})
    batch = {"x": rng.normal(0, 1, (1, 3))}
    observe_built(drift, batch, {"y": np.zeros((1, 1))}, serving("sha256:a", first))
    assert drift.monitor is not None
    assert drift.monitor.feature_names == ["x[0]", "x[1]", "x[2]", "out:y[0]"]
    second = GoldenSet({"x": rng.normal(0, 1, (200, 2))}, {"y": rng.normal(0, 1, (200, 1))})
    drift.observe(
        {"x": np.zeros((1, 2))}, {"y": np.zeros((1, 1))}, True, serving("sha256:b", second)
    )
    observe_built(
        drift, {"x": np.zeros((1, 2))}, {"y": np.zeros((1, 1))}, serving("sha256:b", second)
    )
    assert drift.monitor is not None
    assert drift.monitor.feature_names == ["x[0]", "x[1]", "out:y[0]"]
    observe_built(drift, batch, {}, serving("sha256:c", None))
    assert drift.state is not None
    assert "m.golden.npz not found" in str(drift.state.problem)
    assert "drift: drift reference" in errors[-1]
    kept = reference_path_for(tmp_path / "state", "m")
    kept.parent.mkdir(parents=True)
    kept.write_bytes(first.to_bytes())
    observe_built(drift, batch, {"y": np.zeros((1, 1))}, serving("sha256:d", None))
    assert drift.state is not None
    assert drift.state.problem is None
