"""Choose ONNX Runtime execution providers, with options, for the detected hardware.

The choice is explicit and explained: every provider chosen or skipped carries a reason,
and the list always ends with the CPU provider. After a session is created the registry
compares what loaded with what was asked for, because ONNX Runtime falls back to CPU
silently when a GPU provider fails to load (onnxruntime #17801, #23372, #17394).
"""

from __future__ import annotations

import importlib.metadata
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.hardware.detect import Hardware
from agent.pip_hint import pip_replace

CPU = "CPUExecutionProvider"
TENSORRT = "TensorrtExecutionProvider"
CUDA = "CUDAExecutionProvider"
OPENVINO = "OpenVINOExecutionProvider"
ROCM = "ROCMExecutionProvider"
MIGRAPHX = "MIGraphXExecutionProvider"

# On Jetson the GPU shares the board's memory with the CPU: by default let CUDA's arena
# take at most this fraction of it, leaving the rest to the OS, MQTT and the other models.
JETSON_GPU_MEMORY_FRACTION = 0.5


@dataclass(frozen=True)
class ProviderChoice:
    """One execution provider to request, its options, and why it was chosen."""

    name: str
    options: dict[str, Any]
    reason: str


@dataclass(frozen=True)
class ProviderPlan:
    """The ordered providers for one model, plus CPU threading settings."""

    chosen: tuple[ProviderChoice, ...]
    skipped: tuple[tuple[str, str], ...]  # (provider, why not)
    intra_op_num_threads: int
    allow_spinning: bool
    hints: tuple[str, ...] = field(default=())

    @property
    def names(self) -> list[str]:
        """Provider names in order of preference."""
        return [choice.name for choice in self.chosen]

    def for_session(self) -> list[tuple[str, dict[str, Any]]]:
        """The ``providers`` argument of ``onnxruntime.InferenceSession``."""
        return [(choice.name, dict(choice.options)) for choice in self.chosen]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-friendly view."""
        return {
            "chosen": [
                {"name": c.name, "options": c.options, "reason": c.reason} for c in self.chosen
            ],
            "skipped": [{"name": name, "reason": why} for name, why in self.skipped],
            "session": {
                "intra_op_num_threads": self.intra_op_num_threads,
                "allow_spinning": self.allow_spinning,
            },
        }


@dataclass(frozen=True)
class PlanInputs:
    """What the plan depends on besides the hardware."""

    available: Sequence[str]
    requested: Sequence[str] | None = None  # None: choose automatically
    model_sha256: str = "<model sha256>"
    state_dir: Path = Path("/var/lib/edge-agent/state")
    gpu_mem_limit_mb: int | None = None
    cpu_threads: int | None = None
    ort_version: str = "unknown"
    trt_version: str | None = None  # None: detect


def plan_providers(hardware: Hardware, inputs: PlanInputs) -> ProviderPlan:
    """The providers to request for one model, best first, always ending with CPU."""
    available = list(inputs.available)
    candidates, skipped = (
        _automatic(hardware, available)
        if inputs.requested is None
        else (_explicit(inputs.requested, available))
    )
    chosen = [
        ProviderChoice(name, _options(name, hardware, inputs), reason)
        for name, reason in candidates
        if name != CPU
    ]
    cpu_reason = next(
        (r for n, r in candidates if n == CPU),
        "always last: runs every model when nothing faster loads",
    )
    chosen.append(ProviderChoice(CPU, {}, cpu_reason))
    threads = inputs.cpu_threads or max(
        1, min(hardware.physical_cores, hardware.usable_cpus or hardware.physical_cores)
    )
    return ProviderPlan(
        chosen=tuple(chosen),
        skipped=tuple(skipped),
        intra_op_num_threads=threads,
        allow_spinning=not hardware.small_board,
        hints=tuple(hints(hardware, available)),
    )


def _explicit(
    requested: Sequence[str], available: list[str]
) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    candidates = []
    for name in requested:
        why = "requested in the config"
        if name not in available:
            why += "; NOT offered by the installed onnxruntime, so it will not load"
        candidates.append((name, why))
    return candidates, []


def _automatic(
    hardware: Hardware, available: list[str]
) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    nvidia = hardware.jetson is not None or hardware.nvidia_gpu is not None
    gpu_name = (
        hardware.jetson.module
        if hardware.jetson
        else ", ".join(hardware.nvidia_gpu.names)
        if hardware.nvidia_gpu and hardware.nvidia_gpu.names
        else "an NVIDIA GPU"
    )
    intel = hardware.intel_gpu or hardware.intel_npu or hardware.cpu_vendor == "GenuineIntel"
    rules: list[tuple[str, bool, str, str]] = [
        (TENSORRT, nvidia, f"{gpu_name}: TensorRT is the fastest path", "no NVIDIA GPU detected"),
        (
            CUDA,
            nvidia,
            f"{gpu_name}: CUDA, for what TensorRT cannot take",
            "no NVIDIA GPU detected",
        ),
        (MIGRAPHX, hardware.amd_gpu, "AMD GPU (ROCm) detected", "no AMD GPU with /dev/kfd"),
        (ROCM, hardware.amd_gpu, "AMD GPU (ROCm) detected", "no AMD GPU with /dev/kfd"),
        (
            OPENVINO,
            intel,
            f"Intel hardware: OpenVINO on {_openvino_device(hardware)}",
            "no Intel CPU, GPU or NPU detected",
        ),
    ]
    candidates, skipped = [], []
    for name, applies, reason, not_applicable in rules:
        if not applies:
            if name in available:
                skipped.append((name, not_applicable))
        elif name in available:
            candidates.append((name, reason))
        else:
            skipped.append((name, "not offered by the installed onnxruntime"))
    return candidates, skipped


def _options(name: str, hardware: Hardware, inputs: PlanInputs) -> dict[str, Any]:
    if name == TENSORRT:
        cache = str(tensorrt_cache_dir(hardware, inputs))
        return {
            # TensorRT ignores fp16 where the GPU has no fast fp16 (its builder checks).
            "trt_fp16_enable": True,
            "trt_engine_cache_enable": True,
            "trt_engine_cache_path": cache,
            "trt_timing_cache_enable": True,
            "trt_timing_cache_path": cache,
        }
    if name == CUDA:
        options: dict[str, Any] = {"device_id": 0, "arena_extend_strategy": "kSameAsRequested"}
        limit_mb = inputs.gpu_mem_limit_mb
        if limit_mb is None and hardware.jetson is not None and hardware.memory_mb:
            limit_mb = int(hardware.memory_mb * JETSON_GPU_MEMORY_FRACTION)
        if limit_mb is not None:
            options["gpu_mem_limit"] = limit_mb * 1024 * 1024
        return options
    if name == OPENVINO:
        return {"device_type": _openvino_device(hardware)}
    return {}


def _openvino_device(hardware: Hardware) -> str:
    if hardware.intel_gpu:
        return "GPU"
    if hardware.intel_npu:
        return "NPU"
    return "CPU"


def tensorrt_cache_dir(hardware: Hardware, inputs: PlanInputs) -> Path:
    """``state_dir/trt-cache/<model sha256>-<ort>-<trt>-<device>``: a new model, ONNX Runtime,
    TensorRT or device never reuses a stale engine (onnxruntime #6455, #22244)."""
    trt = inputs.trt_version or tensorrt_version() or hardware.tensorrt_version or "unknown"
    sha = inputs.model_sha256.removeprefix("sha256:")
    return (
        inputs.state_dir
        / "trt-cache"
        / f"{sha}-ort{inputs.ort_version}-trt{trt}-{device_slug(hardware)}"
    )


def device_slug(hardware: Hardware) -> str:
    """A short file-name-safe name of the accelerator (or the board)."""
    if hardware.jetson is not None:
        name = hardware.jetson.module
    elif hardware.nvidia_gpu is not None and hardware.nvidia_gpu.names:
        name = hardware.nvidia_gpu.names[0]
    else:
        name = hardware.model or hardware.board
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:48] or "device"


def tensorrt_version() -> str | None:
    """The TensorRT version the Python side can see, if any."""
    for package in ("tensorrt", "tensorrt-libs", "tensorrt-cu12-libs", "tensorrt_libs"):
        try:
            return importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def hints(hardware: Hardware, available: Sequence[str]) -> list[str]:
    """Advice for the operator when the installed onnxruntime does not fit the hardware."""
    advice = []
    gpu_providers = {TENSORRT, CUDA}
    if not hardware.is_64bit and hardware.machine.startswith("arm"):
        advice.append(
            f"this is a 32-bit ARM userland ({hardware.machine}): onnxruntime "
            "publishes no 32-bit ARM wheels; install a 64-bit OS (e.g. Raspberry Pi "
            "OS 64-bit)"
        )
    if hardware.jetson is not None and not gpu_providers & set(available):
        jetpack = hardware.jetson.jetpack_major
        if jetpack is not None and jetpack < 6:
            advice.append(
                f"JetPack {hardware.jetson.jetpack} ships Python 3.8, which "
                "edge-agent does not support: upgrade to JetPack 6 to use the GPU"
            )
        else:
            advice.append(
                f"install NVIDIA's onnxruntime-gpu wheel for JetPack "
                f"{hardware.jetson.jetpack or '6'} (not the PyPI one) to use "
                "TensorRT/CUDA on this Jetson"
            )
    if hardware.nvidia_gpu is not None and not gpu_providers & set(available):
        advice.append(
            "install onnxruntime-gpu instead of onnxruntime to use the NVIDIA GPU with "
            f"CUDA/TensorRT: {pip_replace('onnxruntime', 'onnxruntime-gpu')} (a device "
            "installed with scripts/install.sh: --ort-wheel keeps it across upgrades)"
        )
    if (hardware.intel_gpu or hardware.intel_npu) and OPENVINO not in available:
        device = "iGPU" if hardware.intel_gpu else "NPU"
        advice.append(
            f"install onnxruntime-openvino instead of onnxruntime to use the Intel {device}: "
            f"{pip_replace('onnxruntime', 'onnxruntime-openvino')}"
        )
    if hardware.nvidia_gpu is not None and CUDA in available and not hardware.nvidia_gpu.names:
        advice.append(
            "the NVIDIA driver's GPU list is unreadable: check that the driver is "
            "loaded (nvidia-smi)"
        )
    return advice
