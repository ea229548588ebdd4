"""Execution-provider options, overrides and the TensorRT cache location."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.hardware import providers
from agent.hardware.detect import detect
from agent.hardware.providers import PlanInputs, plan_providers, tensorrt_cache_dir

FIXTURES = Path(__file__).parent / "fixtures" / "hw"
GPU = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]


def test_tensorrt_cache_is_keyed_by_model_ort_trt_and_device(tmp_path: Path) -> None:
    """Engine and timing caches live under state_dir/trt-cache/<sha>-<ort>-<trt>-<device>."""
    hw = detect(FIXTURES / "jetson-orin-nano-jp6", "aarch64")
    inputs = PlanInputs(
        available=GPU,
        model_sha256="sha256:" + "ab" * 32,
        state_dir=tmp_path,
        ort_version="1.20.1",
        trt_version="10.3.0",
    )
    plan = plan_providers(hw, inputs)
    trt = plan.chosen[0]
    expected = (
        tmp_path
        / "trt-cache"
        / ("ab" * 32 + "-ort1.20.1-trt10.3.0-nvidia-jetson-orin-nano-developer-kit")
    )
    assert trt.options["trt_engine_cache_path"] == str(expected)
    assert trt.options["trt_timing_cache_path"] == str(expected)
    assert trt.options["trt_engine_cache_enable"] is True
    assert trt.options["trt_fp16_enable"] is True
    other_model = tensorrt_cache_dir(
        hw,
        PlanInputs(
            available=GPU,
            model_sha256="cd" * 32,
            state_dir=tmp_path,
            ort_version="1.20.1",
            trt_version="10.3.0",
        ),
    )
    newer_ort = tensorrt_cache_dir(
        hw,
        PlanInputs(
            available=GPU,
            model_sha256="ab" * 32,
            state_dir=tmp_path,
            ort_version="1.21.0",
            trt_version="10.3.0",
        ),
    )
    assert len({expected, other_model, newer_ort}) == 3


def test_tensorrt_version_from_the_installed_library(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without a tensorrt Python package, the libnvinfer.so version names the cache."""
    monkeypatch.setattr(providers, "tensorrt_version", lambda: None)
    hw = detect(FIXTURES / "jetson-orin-nano-jp6", "aarch64")
    path = tensorrt_cache_dir(
        hw, PlanInputs(available=GPU, model_sha256="ab", state_dir=tmp_path, ort_version="1")
    )
    assert path.name == "ab-ort1-trt8.6.2-nvidia-jetson-orin-nano-developer-kit"


def test_jetson_cuda_memory_limit_default_and_config(tmp_path: Path) -> None:
    """On Jetson CUDA's arena is capped at half the shared memory unless configured."""
    hw = detect(FIXTURES / "jetson-orin-nano-jp6", "aarch64")
    default = plan_providers(hw, PlanInputs(available=GPU, state_dir=tmp_path))
    assert default.chosen[1].name == "CUDAExecutionProvider"
    assert default.chosen[1].options["gpu_mem_limit"] == (7619 // 2) * 1024 * 1024
    configured = plan_providers(
        hw, PlanInputs(available=GPU, state_dir=tmp_path, gpu_mem_limit_mb=1024)
    )
    assert configured.chosen[1].options["gpu_mem_limit"] == 1024 * 1024 * 1024


def test_explicit_list_overrides_and_cpu_is_appended(tmp_path: Path) -> None:
    """providers: [...] is taken as given (options still derived), CPU added last."""
    hw = detect(FIXTURES / "x86-nvidia", "x86_64")
    plan = plan_providers(hw, PlanInputs(available=GPU, requested=["CUDAExecutionProvider"]))
    assert plan.names == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert plan.chosen[0].options["device_id"] == 0
    assert plan.chosen[0].reason == "requested in the config"


def test_explicit_provider_the_runtime_lacks_is_flagged() -> None:
    """A requested provider the installed onnxruntime does not offer says so in its reason."""
    hw = detect(FIXTURES / "bare-container", "x86_64")
    plan = plan_providers(
        hw,
        PlanInputs(
            available=["CPUExecutionProvider"],
            requested=["CUDAExecutionProvider", "CPUExecutionProvider"],
        ),
    )
    assert plan.names == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert "NOT offered by the installed onnxruntime" in plan.chosen[0].reason


def test_cpu_threads_config_wins() -> None:
    """cpu_threads overrides the physical core count."""
    hw = detect(FIXTURES / "x86-nvidia", "x86_64")
    assert plan_providers(hw, PlanInputs(available=GPU)).intra_op_num_threads == 8
    assert plan_providers(hw, PlanInputs(available=GPU, cpu_threads=3)).intra_op_num_threads == 3


def test_cgroup_quota_limits_threads(tmp_path: Path) -> None:
    """A container CPU quota (cgroup v2 cpu.max) caps the thread count."""
    root = tmp_path / "root"
    source = FIXTURES / "x86-nvidia"
    for path in source.rglob("*"):
        target = root / path.relative_to(source)
        if path.is_dir():
            target.mkdir(parents=True, exist_ok=True)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(path.read_bytes())
    (root / "sys" / "fs" / "cgroup").mkdir(parents=True)
    (root / "sys" / "fs" / "cgroup" / "cpu.max").write_text("300000 100000\n")
    hw = detect(root, "x86_64")
    assert hw.usable_cpus == 3
    assert plan_providers(hw, PlanInputs(available=GPU)).intra_op_num_threads == 3
