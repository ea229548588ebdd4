"""Hardware detection from the files Linux exposes, read under a root path.

Every read goes through ``root`` (``/`` on a device, a fixture tree in tests), and a file
that is missing or unreadable is the normal case on some board, never an exception.
"""

from __future__ import annotations

import os
import platform
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

INTEL_PCI_VENDOR = "0x8086"
AMD_PCI_VENDOR = "0x1002"

# L4T (Linux for Tegra) release -> JetPack release, from NVIDIA's JetPack archive.
_JETPACK_BY_L4T = {
    "36.4": "6.1/6.2",
    "36.3": "6.0",
    "36.2": "6.0 DP",
    "35.6": "5.1.4",
    "35.5": "5.1.3",
    "35.4": "5.1.2",
    "35.3": "5.1.1",
    "35.2": "5.1",
    "35.1": "5.0.2",
    "32.7": "4.6.x",
    "32.6": "4.6",
    "32.5": "4.5",
}


@dataclass(frozen=True)
class JetsonInfo:
    """An NVIDIA Jetson module and its software release."""

    module: str  # e.g. "NVIDIA Jetson Orin Nano Developer Kit"
    l4t: str | None  # e.g. "36.3.0"
    jetpack: str | None  # e.g. "6.0"; None when the L4T release is not in our table
    soc: str | None  # e.g. "tegra234"

    @property
    def jetpack_major(self) -> int | None:
        """4, 5 or 6 (None when unknown)."""
        if self.jetpack is None:
            return None
        return int(self.jetpack.split(".")[0])


@dataclass(frozen=True)
class RaspberryPiInfo:
    """A Raspberry Pi board."""

    model: str  # e.g. "Raspberry Pi 5 Model B Rev 1.0"
    revision: str | None  # the revision code from /proc/cpuinfo, e.g. "d04170"
    generation: int | None  # 3, 4, 5 ...


@dataclass(frozen=True)
class NvidiaGpu:
    """A discrete NVIDIA GPU driven by the proprietary driver."""

    driver_version: str | None
    names: tuple[str, ...]  # e.g. ("NVIDIA H100 80GB HBM3",)
    device_nodes: tuple[str, ...]


@dataclass(frozen=True)
class ThermalZone:
    """One /sys/class/thermal zone."""

    name: str  # thermal_zone0
    kind: str  # its "type": cpu-thermal, CPU-therm, x86_pkg_temp ...
    temp_path: str  # path relative to root, read for each health report


@dataclass(frozen=True)
class Hardware:
    """What the agent knows about the machine it runs on."""

    machine: str  # platform.machine(): x86_64, aarch64, armv7l ...
    board: str  # jetson | raspberry-pi | arm-board | x86 | unknown
    model: str | None  # device-tree model or DMI product name
    cpu_vendor: str | None  # GenuineIntel, AuthenticAMD, ARM ...
    cpu_model: str | None
    cpu_flags: frozenset[str]  # the interesting ones: avx2, avx512f, vnni ...
    logical_cpus: int
    physical_cores: int
    memory_mb: int | None
    usable_cpus: int | None = None  # CPUs this process may use (affinity, cgroup quota)
    jetson: JetsonInfo | None = None
    raspberry_pi: RaspberryPiInfo | None = None
    nvidia_gpu: NvidiaGpu | None = None
    intel_gpu: bool = False
    intel_npu: bool = False
    amd_gpu: bool = False
    tensorrt_version: str | None = None  # from libnvinfer.so.X.Y.Z, where installed
    thermal_zones: tuple[ThermalZone, ...] = field(default=())

    @property
    def is_64bit(self) -> bool:
        """Whether the userland is 64-bit (onnxruntime ships no 32-bit ARM wheels)."""
        return self.machine in ("x86_64", "aarch64", "arm64", "ppc64le", "s390x", "riscv64")

    @property
    def small_board(self) -> bool:
        """Few cores and shared power budget: busy-wait spinning costs more than it saves."""
        return self.board in ("jetson", "raspberry-pi", "arm-board") or self.physical_cores <= 4

    def summary(self) -> str:
        """One line for logs and health: board, model, cores, memory."""
        parts = [self.model or self.board, self.machine, f"{self.physical_cores} cores"]
        if self.memory_mb:
            parts.append(f"{self.memory_mb} MB")
        if self.jetson and self.jetson.jetpack:
            parts.append(f"JetPack {self.jetson.jetpack}")
        if self.nvidia_gpu:
            parts.append(", ".join(self.nvidia_gpu.names) or "NVIDIA GPU")
        return ", ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-friendly view (for ``edge-agent detect --json`` and health)."""
        data = asdict(self)
        data["cpu_flags"] = sorted(self.cpu_flags)
        data["is_64bit"] = self.is_64bit
        return data


# (implementer, part) from /proc/cpuinfo -> core name, for the ARM cores edge devices use.
_ARM_CORES = {
    ("0x41", "0xd03"): "Cortex-A53",
    ("0x41", "0xd04"): "Cortex-A35",
    ("0x41", "0xd05"): "Cortex-A55",
    ("0x41", "0xd07"): "Cortex-A57",
    ("0x41", "0xd08"): "Cortex-A72",
    ("0x41", "0xd09"): "Cortex-A73",
    ("0x41", "0xd0b"): "Cortex-A76",
    ("0x41", "0xd0c"): "Neoverse-N1",
    ("0x41", "0xd40"): "Neoverse-V1",
    ("0x41", "0xd41"): "Cortex-A78",
    ("0x41", "0xd42"): "Cortex-A78AE",
    ("0x41", "0xd44"): "Cortex-X1",
    ("0x41", "0xd49"): "Neoverse-N2",
    ("0x41", "0xd4f"): "Neoverse-V2",
    ("0x4e", "0x004"): "NVIDIA Carmel",
}

_FLAGS_OF_INTEREST = frozenset(
    {
        "avx",
        "avx2",
        "fma",
        "f16c",
        "avx512f",
        "avx512bw",
        "avx512vl",
        "avx512_vnni",
        "avx_vnni",
        "avx512_bf16",
        "amx_tile",
        "amx_int8",
        "amx_bf16",  # x86
        "asimd",
        "asimdhp",
        "asimddp",
        "fphp",
        "sve",
        "sve2",
        "i8mm",
        "bf16",
        "neon",  # ARM
    }
)


class _Reader:
    """Reads text files under a root path; anything missing or unreadable is None."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def path(self, relative: str) -> Path:
        return self.root / relative.lstrip("/")

    def text(self, relative: str) -> str | None:
        try:
            data = self.path(relative).read_bytes()
        except OSError:
            return None
        return data.replace(b"\x00", b"\n").decode("utf-8", "replace").strip() or None

    def exists(self, relative: str) -> bool:
        try:
            return self.path(relative).exists()
        except OSError:
            return False

    def glob(self, relative_dir: str, pattern: str) -> list[Path]:
        try:
            return sorted(self.path(relative_dir).glob(pattern))
        except OSError:
            return []


def detect(root: str | Path = "/", machine: str | None = None) -> Hardware:
    """Detect the hardware under ``root``; ``machine`` defaults to ``platform.machine()``."""
    reader = _Reader(Path(root))
    arch = machine or platform.machine()
    cpuinfo = _parse_cpuinfo(reader.text("/proc/cpuinfo") or "")
    dt_model = _first_line(reader.text("/proc/device-tree/model")) or _first_line(
        reader.text("/sys/firmware/devicetree/base/model")
    )
    jetson = _detect_jetson(reader, dt_model)
    pi = _detect_raspberry_pi(dt_model, cpuinfo)
    if jetson:
        board = "jetson"
    elif pi:
        board = "raspberry-pi"
    elif dt_model:
        board = "arm-board"
    elif arch in ("x86_64", "i686", "i386", "AMD64"):
        board = "x86"
    else:
        board = "unknown"
    model = dt_model or _first_line(reader.text("/sys/class/dmi/id/product_name"))
    logical = max(1, len(cpuinfo["processors"]) or os.cpu_count() or 1)
    return Hardware(
        machine=arch,
        board=board,
        model=model,
        cpu_vendor=cpuinfo["vendor"] or ("ARM" if cpuinfo["implementer"] else None),
        cpu_model=cpuinfo["model"] or _ARM_CORES.get((cpuinfo["implementer"], cpuinfo["part"])),
        cpu_flags=frozenset(cpuinfo["flags"]) & _FLAGS_OF_INTEREST,
        logical_cpus=logical,
        physical_cores=_physical_cores(reader, cpuinfo) or logical,
        memory_mb=_memory_mb(reader),
        usable_cpus=_usable_cpus(reader, Path(root) == Path("/")),
        jetson=jetson,
        raspberry_pi=pi,
        nvidia_gpu=_detect_nvidia(reader),
        intel_gpu=_has_pci_device(reader, "/sys/class/drm", "renderD*", INTEL_PCI_VENDOR),
        intel_npu=_has_pci_device(reader, "/sys/class/accel", "accel*", INTEL_PCI_VENDOR)
        or (bool(reader.glob("/dev/accel", "accel*")) and cpuinfo["vendor"] == "GenuineIntel"),
        amd_gpu=reader.exists("/dev/kfd")
        and _has_pci_device(reader, "/sys/class/drm", "renderD*", AMD_PCI_VENDOR),
        tensorrt_version=_tensorrt_library_version(reader),
        thermal_zones=_thermal_zones(reader),
    )


def _first_line(text: str | None) -> str | None:
    return text.splitlines()[0].strip() if text else None


def _parse_cpuinfo(text: str) -> dict[str, Any]:
    info: dict[str, Any] = {
        "processors": [],
        "vendor": None,
        "model": None,
        "flags": set(),
        "implementer": None,
        "part": None,
        "revision": None,
        "cores": set(),
        "hardware": None,
    }
    physical_id = "0"
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if not sep:
            continue
        key, value = key.strip().lower(), value.strip()
        if key == "processor" and value.isdigit():
            info["processors"].append(int(value))
        elif key == "vendor_id":
            info["vendor"] = value
        elif key in ("model name", "cpu model") and not info["model"]:
            info["model"] = value
        elif key in ("flags", "features"):
            info["flags"].update(value.split())
        elif key == "cpu implementer":
            info["implementer"] = value
        elif key == "cpu part":
            info["part"] = value
        elif key == "revision":
            info["revision"] = value
        elif key == "hardware":
            info["hardware"] = value
        elif key == "physical id":
            physical_id = value
        elif key == "core id":
            info["cores"].add((physical_id, value))
    return info


def _physical_cores(reader: _Reader, cpuinfo: dict[str, Any]) -> int:
    """Distinct (package, core) pairs from sysfs topology, else from /proc/cpuinfo."""
    cores = set()
    for cpu in reader.glob("/sys/devices/system/cpu", "cpu[0-9]*"):
        topology = cpu / "topology"
        try:
            core = (topology / "core_id").read_text().strip()
            package = (topology / "physical_package_id").read_text().strip()
        except OSError:
            continue
        cores.add((package, core))
    return len(cores) or len(cpuinfo["cores"])


def _usable_cpus(reader: _Reader, is_this_machine: bool) -> int | None:
    """The CPU budget of this process: its affinity mask and a cgroup v2 quota, if any."""
    limits = []
    if is_this_machine and hasattr(os, "sched_getaffinity"):
        limits.append(len(os.sched_getaffinity(0)))
    quota = (reader.text("/sys/fs/cgroup/cpu.max") or "").split()
    if len(quota) == 2 and quota[0].isdigit() and quota[1].isdigit() and int(quota[1]):
        limits.append(max(1, int(quota[0]) // int(quota[1])))
    return min(limits) if limits else None


def _memory_mb(reader: _Reader) -> int | None:
    text = reader.text("/proc/meminfo") or ""
    found = re.search(r"^MemTotal:\s+(\d+)\s+kB", text, re.MULTILINE)
    return int(found.group(1)) // 1024 if found else None


def _detect_jetson(reader: _Reader, dt_model: str | None) -> JetsonInfo | None:
    release = reader.text("/etc/nv_tegra_release")
    compatible = reader.text("/proc/device-tree/compatible") or ""
    is_tegra = "tegra" in compatible or (dt_model is not None and "Jetson" in dt_model)
    if release is None and not is_tegra:
        return None
    l4t = None
    if release:
        found = re.search(r"R(\d+)\s*\(release\),\s*REVISION:\s*([\d.]+)", release)
        if found:
            l4t = f"{found.group(1)}.{found.group(2)}"
    jetpack = _JETPACK_BY_L4T.get(".".join(l4t.split(".")[:2])) if l4t else None
    soc = next(
        (c.split(",", 1)[1] for c in compatible.split() if c.startswith("nvidia,tegra")), None
    )
    return JetsonInfo(module=dt_model or "NVIDIA Jetson", l4t=l4t, jetpack=jetpack, soc=soc)


def _detect_raspberry_pi(dt_model: str | None, cpuinfo: dict[str, Any]) -> RaspberryPiInfo | None:
    model = dt_model if dt_model and dt_model.startswith("Raspberry Pi") else None
    if model is None and (cpuinfo.get("hardware") or "").startswith("BCM"):
        model = "Raspberry Pi"
    if model is None:
        return None
    found = re.match(r"Raspberry Pi (\d+)", model)
    generation = int(found.group(1)) if found else None
    return RaspberryPiInfo(model=model, revision=cpuinfo["revision"], generation=generation)


def _detect_nvidia(reader: _Reader) -> NvidiaGpu | None:
    version_text = reader.text("/proc/driver/nvidia/version")
    nodes = tuple(f"/dev/{p.name}" for p in reader.glob("/dev", "nvidia[0-9]*"))
    if version_text is None and not nodes:
        return None
    driver = None
    if version_text:
        found = re.search(r"Kernel Module(?: for \w+)?\s+([\d.]+)", version_text)
        driver = found.group(1) if found else None
    names = []
    for info in reader.glob("/proc/driver/nvidia/gpus", "*/information"):
        try:
            text = info.read_text()
        except OSError:
            continue
        found = re.search(r"^Model:\s*(.+)$", text, re.MULTILINE)
        if found:
            names.append(found.group(1).strip())
    return NvidiaGpu(driver_version=driver, names=tuple(names), device_nodes=nodes)


def _has_pci_device(reader: _Reader, class_dir: str, pattern: str, vendor: str) -> bool:
    for node in reader.glob(class_dir, pattern):
        try:
            if (node / "device" / "vendor").read_text().strip().lower() == vendor:
                return True
        except OSError:
            continue
    return False


def _tensorrt_library_version(reader: _Reader) -> str | None:
    versions = []
    for folder in (
        "/usr/lib/aarch64-linux-gnu",
        "/usr/lib/x86_64-linux-gnu",
        "/usr/lib",
        "/usr/local/cuda/lib64",
    ):
        for library in reader.glob(folder, "libnvinfer.so.*.*.*"):
            versions.append(library.name.removeprefix("libnvinfer.so."))
    return max(versions, key=_version_key) if versions else None


def _version_key(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split(".") if part.isdigit())


def _thermal_zones(reader: _Reader) -> tuple[ThermalZone, ...]:
    zones = []
    for zone in reader.glob("/sys/class/thermal", "thermal_zone*"):
        try:
            kind = (zone / "type").read_text().strip()
        except OSError:
            continue
        relative = "/" + str((zone / "temp").relative_to(reader.root))
        zones.append(ThermalZone(name=zone.name, kind=kind, temp_path=relative))
    return tuple(zones)


def read_temperatures(hardware: Hardware, root: str | Path = "/") -> dict[str, float]:
    """Current temperature of each thermal zone in degrees Celsius (unreadable ones left out)."""
    reader = _Reader(Path(root))
    temperatures = {}
    for zone in hardware.thermal_zones:
        text = reader.text(zone.temp_path)
        if text and text.lstrip("-").isdigit():
            temperatures[f"{zone.name}:{zone.kind}"] = int(text) / 1000.0
    return temperatures
