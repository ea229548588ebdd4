"""TensorRT's first engine build: foreseen from the cache folder, announced, and bounded."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from structlog.testing import capture_logs

from agent.config.schema import AgentConfig
from agent.hardware.detect import detect
from agent.hardware.providers import CPU, CUDA, TENSORRT, ProviderChoice, ProviderPlan
from agent.inference.engine_build import BuildHeartbeat, first_engine_build
from agent.inference.golden import GoldenSet
from agent.inference.session import SessionFactory, WarmupLimit
from tests.onnx_builders import build_linear, linear_weights


def plan_of(*choices: ProviderChoice) -> ProviderPlan:
    return ProviderPlan(
        chosen=(*choices, ProviderChoice(CPU, {}, "always last")),
        skipped=(),
        intra_op_num_threads=1,
        allow_spinning=False,
    )


def tensorrt(cache: Path | None) -> ProviderChoice:
    options = {"trt_engine_cache_enable": True}
    if cache is not None:
        options["trt_engine_cache_path"] = str(cache)  # type: ignore[assignment]
    return ProviderChoice(TENSORRT, options, "test")


def test_an_empty_or_missing_cache_means_a_first_build(tmp_path: Path) -> None:
    """TensorRT with a cache folder that does not exist yet, or holds no *.engine (a timing
    cache or a profile alone builds nothing): the load will build; once an engine is
    there, it will not."""
    cache = tmp_path / "trt-cache" / "sha256-abc"
    plan = plan_of(tensorrt(cache), ProviderChoice(CUDA, {}, "test"))
    assert first_engine_build(plan) == cache
    cache.mkdir(parents=True)
    (cache / "TensorrtExecutionProvider_cache_sm87.timing").write_bytes(b"t")
    (cache / "TensorrtExecutionProvider_TRTKernel_graph_0_0.profile").write_bytes(b"p")
    assert first_engine_build(plan) == cache
    (cache / "TensorrtExecutionProvider_TRTKernel_graph_0_0_sm87.engine").write_bytes(b"e")
    assert first_engine_build(plan) is None


def test_no_tensorrt_means_no_build(tmp_path: Path) -> None:
    """A plan without TensorRT, TensorRT without a cache path, and a TensorRT the installed
    onnxruntime does not offer (it will not load, so it builds nothing) all give None."""
    assert first_engine_build(plan_of(ProviderChoice(CUDA, {}, "test"))) is None
    assert first_engine_build(plan_of()) is None
    assert first_engine_build(plan_of(tensorrt(None))) is None
    plan = plan_of(tensorrt(tmp_path / "cache"))
    assert first_engine_build(plan, available=[CUDA, CPU]) is None
    assert first_engine_build(plan, available=[TENSORRT, CUDA, CPU]) == tmp_path / "cache"


def test_heartbeat_announces_beats_and_ends(tmp_path: Path) -> None:
    """tensorrt_engine_build (a warning) on entry, tensorrt_engine_building every interval
    while the build runs, tensorrt_engine_build_ended with ok on exit."""
    beats = threading.Event()
    with capture_logs() as logs:
        with BuildHeartbeat("vib", tmp_path, interval_s=0.01):
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and not beats.is_set():
                if sum(e["event"] == "tensorrt_engine_building" for e in logs) >= 2:
                    beats.set()
                time.sleep(0.01)
        after = len(logs)
    assert beats.is_set(), logs
    events = [e["event"] for e in logs]
    assert events[0] == "tensorrt_engine_build"
    assert logs[0]["log_level"] == "warning"
    assert logs[0]["model"] == "vib"
    assert logs[0]["cache"] == str(tmp_path)
    assert "can take minutes" in logs[0]["note"]
    building = [e for e in logs if e["event"] == "tensorrt_engine_building"]
    assert all(e["model"] == "vib" and e["cache"] == str(tmp_path) for e in building)
    assert all(isinstance(e["elapsed_s"], int) for e in building)
    assert events[-1] == "tensorrt_engine_build_ended"
    assert logs[-1]["ok"] is True
    assert isinstance(logs[-1]["seconds"], float)
    assert len(logs) == after  # no beat after the end
    assert not any(t.name == "engine-build-vib" for t in threading.enumerate())


def test_heartbeat_reports_a_failed_build(tmp_path: Path) -> None:
    """A build that raises ends with ok false, and the exception goes on."""
    with (
        capture_logs() as logs,
        pytest.raises(RuntimeError, match="engine build failed"),
        BuildHeartbeat("vib", tmp_path, interval_s=60),
    ):
        raise RuntimeError("engine build failed")
    assert [e["event"] for e in logs] == ["tensorrt_engine_build", "tensorrt_engine_build_ended"]
    assert logs[-1]["ok"] is False


def test_warmup_limit_for_engine_build() -> None:
    """A first build takes the longer engine_build_timeout_s, keeping whole_load; a shorter
    one changes nothing."""
    trial = WarmupLimit(600, "updates.trial_timeout_s", whole_load=True)
    longer = trial.for_engine_build(3600)
    assert longer.seconds == 3600
    assert longer.whole_load is True
    assert longer.setting == "updates.engine_build_timeout_s: a first engine build"
    assert trial.for_engine_build(60) is trial
    assert trial.for_engine_build(600) is trial
    assert WarmupLimit(30, "warmup_timeout_s").for_engine_build(3600).whole_load is False


def test_warmup_limit_overrun_counts_only_whole_loads() -> None:
    """overrun: None within the limit or for a warm-up-only limit; else the time taken, the
    limit and the setting."""
    started = time.monotonic() - 5
    assert WarmupLimit(60, "updates.trial_timeout_s", whole_load=True).overrun(started) is None
    assert WarmupLimit(1, "warmup_timeout_s").overrun(started) is None
    late = WarmupLimit(1, "updates.trial_timeout_s", whole_load=True).overrun(started)
    assert late is not None
    assert late.startswith("loading, warming up and checking took 5.")
    assert late.endswith("more than the 1 s allowed (updates.trial_timeout_s)")
    built = WarmupLimit(1, "x", whole_load=True).for_engine_build(2).overrun(started)
    assert built is not None
    assert "(updates.engine_build_timeout_s: a first engine build)" in built


@pytest.mark.filterwarnings("ignore:Specified provider")
@pytest.mark.skipif(TENSORRT in ort.get_available_providers(), reason="needs no TensorRT")
def test_a_tensorrt_that_cannot_load_announces_no_build(tmp_path: Path) -> None:
    """TensorRT asked for where onnxruntime does not offer it: no building_engine step, no
    engine log lines, and the warm-up limit stays; a golden set is announced as validating."""
    model = build_linear(tmp_path / "models" / "lin.onnx")
    config = AgentConfig(
        device_id="d",
        models_dir=str(model.parent),
        state_dir=str(tmp_path / "state"),
        models={"lin": {"file": model.name}},
        providers=[TENSORRT, CPU],
    )
    x = np.zeros((2, 4), np.float32)
    weight, bias = linear_weights(4, 2, 0)
    golden = GoldenSet({"x": x}, {"y": x @ weight + bias})
    steps: list[str] = []
    with capture_logs() as logs:
        loaded = SessionFactory(detect()).build(
            config,
            "lin",
            model,
            model.read_bytes(),
            "sha256:test",
            started=time.monotonic(),
            limit=WarmupLimit(60, "warmup_timeout_s"),
            golden=golden,
            progress=steps.append,
        )
    assert loaded.degraded
    assert steps == ["validating"]
    assert not [e for e in logs if str(e["event"]).startswith("tensorrt_engine")]
