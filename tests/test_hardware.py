"""Hardware detection on fixture trees, and the provider order chosen for each."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from agent.hardware.detect import detect, read_temperatures
from agent.hardware.providers import PlanInputs, plan_providers

FIXTURES = Path(__file__).parent / "fixtures" / "hw"

ALL_GPU = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
PYPI_CPU = ["AzureExecutionProvider", "CPUExecutionProvider"]
OPENVINO = ["OpenVINOExecutionProvider", "CPUExecutionProvider"]
EVERYTHING = [
    "TensorrtExecutionProvider",
    "CUDAExecutionProvider",
    "OpenVINOExecutionProvider",
    "CPUExecutionProvider",
]


def order(tree: str, machine: str, available: list[str]) -> list[str]:
    hardware = detect(FIXTURES / tree, machine)
    return plan_providers(hardware, PlanInputs(available=available)).names


def test_jetson_orin_nano_jetpack6() -> None:
    """Orin Nano: module name, L4T 36.3.0 -> JetPack 6.0, tegra234, 6 cores, thermal zones."""
    hw = detect(FIXTURES / "jetson-orin-nano-jp6", "aarch64")
    assert hw.board == "jetson"
    assert hw.jetson is not None
    assert hw.jetson.module == "NVIDIA Jetson Orin Nano Developer Kit"
    assert hw.jetson.l4t == "36.3.0"
    assert hw.jetson.jetpack == "6.0"
    assert hw.jetson.soc == "tegra234"
    assert hw.cpu_model == "Cortex-A78AE"
    assert hw.physical_cores == 6
    assert hw.memory_mb == 7619
    assert hw.tensorrt_version == "8.6.2"
    assert [z.kind for z in hw.thermal_zones] == ["cpu-thermal", "gpu-thermal", "tj-thermal"]
    assert hw.small_board
    assert order("jetson-orin-nano-jp6", "aarch64", ALL_GPU) == ALL_GPU
    assert order("jetson-orin-nano-jp6", "aarch64", PYPI_CPU) == ["CPUExecutionProvider"]


def test_jetson_xavier_nx_jetpack5() -> None:
    """Xavier NX: L4T 35.4.1 -> JetPack 5.1.2, Carmel cores; JetPack 5 gets the Python hint."""
    hw = detect(FIXTURES / "jetson-xavier-nx-jp5", "aarch64")
    assert hw.jetson is not None
    assert hw.jetson.l4t == "35.4.1"
    assert hw.jetson.jetpack == "5.1.2"
    assert hw.jetson.jetpack_major == 5
    assert hw.jetson.soc == "tegra194"
    assert hw.cpu_model == "NVIDIA Carmel"
    assert hw.physical_cores == 6
    plan = plan_providers(hw, PlanInputs(available=PYPI_CPU))
    assert plan.names == ["CPUExecutionProvider"]
    assert any("JetPack 5.1.2 ships Python 3.8" in hint for hint in plan.hints)


def test_raspberry_pi_4() -> None:
    """Pi 4: model, revision, 4 Cortex-A72 cores, CPU only with 4 threads and no spinning."""
    hw = detect(FIXTURES / "raspberry-pi-4", "aarch64")
    assert hw.board == "raspberry-pi"
    assert hw.raspberry_pi is not None
    assert hw.raspberry_pi.model == "Raspberry Pi 4 Model B Rev 1.4"
    assert hw.raspberry_pi.revision == "c03114"
    assert hw.raspberry_pi.generation == 4
    assert hw.cpu_model == "Cortex-A72"
    assert hw.physical_cores == 4
    plan = plan_providers(hw, PlanInputs(available=EVERYTHING))
    assert plan.names == ["CPUExecutionProvider"]
    assert plan.intra_op_num_threads == 4
    assert not plan.allow_spinning
    assert read_temperatures(hw, FIXTURES / "raspberry-pi-4") == {
        "thermal_zone0:cpu-thermal": 48.686
    }


def test_raspberry_pi_5() -> None:
    """Pi 5: generation 5, revision d04170, Cortex-A76 with dot-product instructions."""
    hw = detect(FIXTURES / "raspberry-pi-5", "aarch64")
    assert hw.raspberry_pi is not None
    assert hw.raspberry_pi.generation == 5
    assert hw.raspberry_pi.revision == "d04170"
    assert hw.cpu_model == "Cortex-A76"
    assert "asimddp" in hw.cpu_flags
    assert order("raspberry-pi-5", "aarch64", PYPI_CPU) == ["CPUExecutionProvider"]


def test_raspberry_pi_32bit_gets_a_hint() -> None:
    """A 32-bit userland on a Pi is told that onnxruntime needs a 64-bit OS."""
    hw = detect(FIXTURES / "raspberry-pi-4", "armv7l")
    assert not hw.is_64bit
    plan = plan_providers(hw, PlanInputs(available=PYPI_CPU))
    assert any("64-bit OS" in hint for hint in plan.hints)


def test_intel_x86_with_igpu() -> None:
    """Intel NUC: vendor, AVX-512 VNNI, 4 cores of 8 threads, iGPU -> OpenVINO on GPU."""
    hw = detect(FIXTURES / "intel-x86-igpu", "x86_64")
    assert hw.board == "x86"
    assert hw.model == "NUC11TNHi5"
    assert hw.cpu_vendor == "GenuineIntel"
    assert {"avx2", "avx512f", "avx512_vnni"} <= hw.cpu_flags
    assert (hw.physical_cores, hw.logical_cpus) == (4, 8)
    assert hw.intel_gpu
    assert not hw.intel_npu
    assert hw.nvidia_gpu is None
    plan = plan_providers(hw, PlanInputs(available=EVERYTHING))
    assert plan.names == OPENVINO
    assert plan.chosen[0].options == {"device_type": "GPU"}
    assert ("TensorrtExecutionProvider", "no NVIDIA GPU detected") in plan.skipped
    cpu_only = plan_providers(hw, PlanInputs(available=PYPI_CPU))
    assert any("onnxruntime-openvino" in hint for hint in cpu_only.hints)


def test_x86_with_nvidia_card() -> None:
    """x86 + NVIDIA: driver version, GPU name, nodes; TensorRT, CUDA, then CPU."""
    hw = detect(FIXTURES / "x86-nvidia", "x86_64")
    assert hw.nvidia_gpu is not None
    assert hw.nvidia_gpu.driver_version == "535.104.05"
    assert hw.nvidia_gpu.names == ("NVIDIA RTX A2000 12GB",)
    assert hw.nvidia_gpu.device_nodes == ("/dev/nvidia0",)
    assert (hw.physical_cores, hw.logical_cpus) == (8, 16)
    assert not hw.small_board
    plan = plan_providers(hw, PlanInputs(available=ALL_GPU))
    assert plan.names == ALL_GPU
    assert plan.allow_spinning
    assert "gpu_mem_limit" not in plan.chosen[1].options  # a discrete card has its own memory
    assert order("x86-nvidia", "x86_64", EVERYTHING) == [
        "TensorrtExecutionProvider",
        "CUDAExecutionProvider",
        "OpenVINOExecutionProvider",
        "CPUExecutionProvider",
    ]
    cpu_only = plan_providers(hw, PlanInputs(available=PYPI_CPU))
    # Into this Python's environment, replacing the CPU package (both in one folder break).
    replace = (
        f"{sys.executable} -m pip uninstall -y onnxruntime && "
        f"{sys.executable} -m pip install onnxruntime-gpu"
    )
    assert any(replace in hint for hint in cpu_only.hints), cpu_only.hints


def test_bare_container() -> None:
    """A container with only cpuinfo and meminfo: no board, no accelerator, no exception."""
    hw = detect(FIXTURES / "bare-container", "x86_64")
    assert hw.board == "x86"
    assert hw.model is None
    assert hw.cpu_vendor == "AuthenticAMD"
    assert hw.physical_cores == 2
    assert hw.memory_mb == 2000
    assert hw.thermal_zones == ()
    assert (hw.jetson, hw.raspberry_pi, hw.nvidia_gpu) == (None, None, None)
    assert order("bare-container", "x86_64", EVERYTHING) == ["CPUExecutionProvider"]


def test_empty_root_is_not_an_error(tmp_path: Path) -> None:
    """Nothing readable at all still gives a Hardware with safe values."""
    hw = detect(tmp_path, "riscv64")
    assert hw.board == "unknown"
    assert hw.physical_cores >= 1
    assert hw.memory_mb is None


@pytest.mark.parametrize("tree", sorted(p.name for p in FIXTURES.iterdir()))
def test_every_plan_ends_with_cpu(tree: str) -> None:
    """Whatever the hardware and providers, CPU is last."""
    machine = "aarch64" if "jetson" in tree or "raspberry" in tree else "x86_64"
    assert order(tree, machine, EVERYTHING)[-1] == "CPUExecutionProvider"


def test_unreadable_files_are_skipped(tmp_path: Path) -> None:
    """A file that cannot be read (here: a folder where a file should be) is ignored."""
    (tmp_path / "proc" / "cpuinfo").mkdir(parents=True)
    (tmp_path / "proc" / "device-tree" / "model").mkdir(parents=True)
    hw = detect(tmp_path, "aarch64")
    assert hw.board == "unknown"


def test_this_machine() -> None:
    """Detection on the real machine works and respects this process's CPU budget."""
    hw = detect()
    assert hw.logical_cpus >= 1
    assert hw.usable_cpus is not None
    assert hw.usable_cpus >= 1
