"""Signs of trouble before it becomes an outage: power, throttling, storage wear, free space.

Read for each health report from the files Linux exposes, under the same root path as
hardware detection (``/`` on a device, a fixture tree in tests):

- Raspberry Pi firmware's ``get_throttled`` bits (what ``vcgencmd get_throttled`` prints),
  now and since boot: under-voltage, ARM frequency capped, throttled, soft temperature limit;
- CPU frequency against its maximum (cpufreq);
- Jetson power mode (nvpmodel's status and configuration) and GPU frequency (devfreq);
- eMMC wear where the kernel reports it (``life_time``, ``pre_eol_info``; SD cards do not);
- the free space of ``state_dir`` and ``models_dir``;
- NVIDIA discrete GPU utilization and memory through NVML (``nvidia-ml-py``, optional, only
  imported when detection found such a GPU).

A *warning* is a condition an operator should act on (a weak power supply, a worn card, a
filling disk); the other figures explain performance (a capped clock, a low power mode).
"""

from __future__ import annotations

import re
import shutil
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.hardware.detect import Hardware

MOUNTS = "/proc/self/mounts"
# get_throttled bits: (bit, name); the same condition since boot is the bit + 16.
THROTTLE_FLAGS = (
    (0, "under_voltage"),
    (1, "frequency_capped"),
    (2, "throttled"),
    (3, "soft_temperature_limit"),
)
SINCE_BOOT_SHIFT = 16
THROTTLED_FILES = (
    "/sys/devices/platform/soc/soc:firmware/get_throttled",  # Pi 4 and earlier
    "/sys/devices/platform/axi/axi:firmware/get_throttled",  # Pi 5
    "/sys/devices/platform/firmware/get_throttled",
)
CPUFREQ = "/sys/devices/system/cpu/cpu0/cpufreq"
NVPMODEL_STATUS = "/var/lib/nvpmodel/status"  # "pmode:0002"
NVPMODEL_CONF = "/etc/nvpmodel.conf"  # "< POWER_MODEL ID=2 NAME=7W ... >"
JETSON_GPU_DEVFREQ = ("17000000.ga10b", "17000000.gv11b", "57000000.gpu", "gpu.0")
EMMC_LIFE_TIME_STEP = 10  # life_time 0x01: 0-10 % of the rated erase cycles used, ...
EMMC_PRE_EOL = {1: "normal", 2: "warning", 3: "urgent"}  # reserved blocks consumed: 80 %, 90 %
WORN_PERCENT = 90
LOW_FREE_MB = 100.0


@dataclass(frozen=True)
class StorageWear:
    """What an eMMC device reports about its own wear."""

    device: str  # mmcblk0
    life_used_percent: int | None  # the higher of the two life_time estimates, upper bound
    pre_eol: str | None  # normal, warning, urgent

    def to_dict(self) -> dict[str, Any]:
        """As ``P/health`` shows it."""
        return {"life_used_percent": self.life_used_percent, "pre_eol": self.pre_eol}


@dataclass(frozen=True)
class GpuFigures:
    """An NVIDIA discrete GPU's load, from NVML."""

    utilization_percent: float
    memory_used_mb: float
    memory_total_mb: float

    def to_dict(self) -> dict[str, Any]:
        """As ``P/health`` shows it."""
        return {
            "utilization_percent": self.utilization_percent,
            "memory_used_mb": self.memory_used_mb,
            "memory_total_mb": self.memory_total_mb,
        }


@dataclass(frozen=True)
class DeviceWarning:
    """A condition an operator should act on: a code for dashboards, words for people."""

    code: str
    message: str


@dataclass(frozen=True)
class DeviceCondition:
    """One reading of the figures above; None where the device does not report one."""

    throttled_now: tuple[str, ...] | None = None  # None: no get_throttled on this device
    throttled_since_boot: tuple[str, ...] = ()
    cpu_mhz: float | None = None
    cpu_max_mhz: float | None = None
    power_mode: str | None = None  # Jetson nvpmodel mode name
    power_mode_id: int | None = None
    gpu_mhz: float | None = None
    gpu_max_mhz: float | None = None
    nvidia_gpu: GpuFigures | None = None
    storage: tuple[StorageWear, ...] = ()
    free_mb: Mapping[str, float | None] = field(default_factory=dict)
    read_only: tuple[str, ...] = ()  # of the folders in free_mb: on a read-only mount

    def warnings(self) -> list[DeviceWarning]:
        """What needs an operator, worst first."""
        found: list[DeviceWarning] = [
            DeviceWarning(
                f"{folder}_read_only",
                f"{folder} is on a file system that refuses writes (mounted read-only, or "
                "remounted read-only by the kernel after disk errors)",
            )
            for folder in self.read_only
        ]
        for name in self.throttled_now or ():
            found.append(
                DeviceWarning(f"{name}_now", f"{_words(name)} now (firmware get_throttled)")
            )
        for name in self.throttled_since_boot:
            if name not in (self.throttled_now or ()):
                found.append(
                    DeviceWarning(f"{name}_since_boot", f"{_words(name)} has occurred since boot")
                )
        for wear in self.storage:
            if wear.pre_eol in ("warning", "urgent"):
                found.append(
                    DeviceWarning(
                        "storage_pre_eol",
                        f"{wear.device}: reserved blocks nearly used up (pre-EOL {wear.pre_eol})",
                    )
                )
            if wear.life_used_percent is not None and wear.life_used_percent >= WORN_PERCENT:
                found.append(
                    DeviceWarning(
                        "storage_worn",
                        f"{wear.device}: up to {wear.life_used_percent} % of its rated "
                        "erase cycles used",
                    )
                )
        for folder, free in self.free_mb.items():
            if free is not None and free < LOW_FREE_MB:
                found.append(
                    DeviceWarning(f"{folder}_low_space", f"{folder} has {free:.0f} MB free")
                )
        return found

    def to_dict(self) -> dict[str, Any]:
        """The ``device`` section of ``P/health``."""
        document: dict[str, Any] = {
            "cpu_mhz": self.cpu_mhz,
            "cpu_max_mhz": self.cpu_max_mhz,
            "free_mb": dict(self.free_mb),
            "read_only": list(self.read_only),
        }
        if self.throttled_now is not None:
            document["throttled"] = {
                "now": list(self.throttled_now),
                "since_boot": list(self.throttled_since_boot),
            }
        if self.power_mode is not None or self.power_mode_id is not None:
            document["power_mode"] = {"name": self.power_mode, "id": self.power_mode_id}
        if self.gpu_mhz is not None:
            document["gpu_mhz"] = self.gpu_mhz
            document["gpu_max_mhz"] = self.gpu_max_mhz
        if self.nvidia_gpu is not None:
            document["nvidia_gpu"] = self.nvidia_gpu.to_dict()
        if self.storage:
            document["storage"] = {wear.device: wear.to_dict() for wear in self.storage}
        return document


class WarningTracker:
    """Which warnings turned on and which cleared since the previous reading, so that a log
    line marks each change instead of repeating every report. Used by one thread."""

    def __init__(self) -> None:
        self._active: dict[str, DeviceWarning] = {}

    def update(self, warnings: list[DeviceWarning]) -> tuple[list[DeviceWarning], list[str]]:
        """The warnings new in ``warnings``, and the codes that are gone from it."""
        current = {w.code: w for w in warnings}
        new = [w for code, w in current.items() if code not in self._active]
        cleared = sorted(self._active.keys() - current.keys())
        self._active = current
        return new, cleared


def _words(flag: str) -> str:
    return flag.replace("_", " ").capitalize()


def _read(root: Path, relative: str) -> str | None:
    try:
        return (root / relative.lstrip("/")).read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None


def _khz_to_mhz(text: str | None) -> float | None:
    if text is None or not text.isdigit():
        return None
    return int(text) / 1000.0


def _hz_to_mhz(text: str | None) -> float | None:
    if text is None or not text.isdigit():
        return None
    return round(int(text) / 1_000_000, 1)


def read_throttled(root: Path) -> tuple[tuple[str, ...] | None, tuple[str, ...]]:
    """The get_throttled flags set now and since boot; (None, ()) where there is no file."""
    for relative in THROTTLED_FILES:
        text = _read(root, relative)
        if text is None:
            continue
        try:
            bits = int(text.removeprefix("0x"), 16)
        except ValueError:
            return None, ()
        now = tuple(name for bit, name in THROTTLE_FLAGS if bits >> bit & 1)
        since = tuple(name for bit, name in THROTTLE_FLAGS if bits >> (bit + SINCE_BOOT_SHIFT) & 1)
        return now, since
    return None, ()


def read_power_mode(root: Path) -> tuple[str | None, int | None]:
    """The Jetson's nvpmodel mode: its name from the configuration, and its id."""
    status = _read(root, NVPMODEL_STATUS)
    if status is None:
        return None, None
    match = re.search(r"pmode:\s*(\d+)", status)
    if match is None:
        return None, None
    mode = int(match.group(1))
    for line in (_read(root, NVPMODEL_CONF) or "").splitlines():
        found = re.match(r"\s*<\s*POWER_MODEL\s+ID=(\d+)\s+NAME=(\S+?)\s*>", line)
        if found is not None and int(found.group(1)) == mode:
            return found.group(2), mode
    return None, mode


def read_jetson_gpu_mhz(root: Path) -> tuple[float | None, float | None]:
    """The Jetson GPU's current and maximum frequency from devfreq."""
    for name in JETSON_GPU_DEVFREQ:
        current = _hz_to_mhz(_read(root, f"/sys/class/devfreq/{name}/cur_freq"))
        if current is not None:
            return current, _hz_to_mhz(_read(root, f"/sys/class/devfreq/{name}/max_freq"))
    return None, None


def read_storage_wear(root: Path) -> tuple[StorageWear, ...]:
    """eMMC wear of each mmcblk device that reports it."""
    block = root / "sys" / "block"
    try:
        devices = sorted(p for p in block.iterdir() if p.name.startswith("mmcblk"))
    except OSError:
        return ()
    found = []
    for device in devices:
        life = _read(root, f"/sys/block/{device.name}/device/life_time")
        eol = _read(root, f"/sys/block/{device.name}/device/pre_eol_info")
        if life is None and eol is None:
            continue
        used = None
        if life is not None:
            try:
                used = max(int(value, 16) for value in life.split()) * EMMC_LIFE_TIME_STEP
            except ValueError:
                used = None
        pre_eol = None
        if eol is not None:
            try:
                pre_eol = EMMC_PRE_EOL.get(int(eol, 16))
            except ValueError:
                pre_eol = None
        found.append(StorageWear(device.name, used, pre_eol))
    return tuple(found)


def free_space_mb(path: str) -> float | None:
    """Free space where ``path`` lives (its nearest existing ancestor)."""
    folder = Path(path)
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        return round(shutil.disk_usage(folder).free / 1024 / 1024, 1)
    except OSError:
        return None


def read_only_folders(folders: Mapping[str, str], mounts: str = MOUNTS) -> tuple[str, ...]:
    """The names in ``folders`` whose file system is mounted read-only. From the mount
    table, because ext4 after an error (``errors=remount-ro``) refuses writes while statvfs
    and access() still say writable: only its ``emergency_ro`` option tells."""
    try:
        table = [line.split() for line in Path(mounts).read_text().splitlines()]
    except OSError:
        return ()
    points = [
        (_unescape(fields[1]), set(fields[3].split(","))) for fields in table if len(fields) >= 4
    ]
    found = []
    for name, path in folders.items():
        folder = Path(path)
        while not folder.exists() and folder != folder.parent:
            folder = folder.parent
        real = str(folder.resolve())
        mounted: set[str] | None = None  # the options of the mount the folder is on
        longest = -1
        for point, options in points:
            # The longest mount point above the folder; a later mount over the same point
            # hides the earlier one.
            if (real == point or real.startswith(point.rstrip("/") + "/")) and len(
                point
            ) >= longest:
                mounted, longest = options, len(point)
        if mounted is not None and {"ro", "emergency_ro"} & mounted:
            found.append(name)
    return tuple(found)


def _unescape(field_text: str) -> str:
    """A mount table field: the kernel writes space, tab, newline and backslash as octal."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field_text)


class NvmlReader:
    """NVIDIA GPU figures through NVML, opened on first use. Read by the health report (the
    main thread) and by Prometheus scrapes (the metrics thread): the lock keeps them apart."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._handle: Any = None
        self._nvml: Any = None
        self._unavailable = False

    def read(self) -> GpuFigures | None:
        """Utilization and memory of GPU 0; None when NVML is not installed or fails."""
        with self._lock:
            return self._read()

    def _read(self) -> GpuFigures | None:
        if self._unavailable:
            return None
        try:
            if self._handle is None:
                import pynvml  # noqa: PLC0415 - optional (nvidia-ml-py), GPU machines only

                pynvml.nvmlInit()
                self._nvml = pynvml
                self._handle = pynvml.nvmlDeviceGetHandleByIndex(0)
            memory = self._nvml.nvmlDeviceGetMemoryInfo(self._handle)
            rates = self._nvml.nvmlDeviceGetUtilizationRates(self._handle)
        except Exception:  # ImportError, or NVMLError from a driver that is not there
            self._unavailable = True
            return None
        return GpuFigures(
            utilization_percent=float(rates.gpu),
            memory_used_mb=round(memory.used / 2**20, 1),
            memory_total_mb=round(memory.total / 2**20, 1),
        )


def read_condition(
    hardware: Hardware,
    folders: Mapping[str, str],
    root: str | Path = "/",
    nvml: NvmlReader | None = None,
) -> DeviceCondition:
    """Read every figure once; ``folders`` names the folders whose free space counts
    (``{"state_dir": ..., "models_dir": ...}``, real paths, not under ``root``)."""
    base = Path(root)
    now, since = read_throttled(base)
    mode, mode_id = read_power_mode(base) if hardware.jetson is not None else (None, None)
    gpu_mhz, gpu_max = read_jetson_gpu_mhz(base) if hardware.jetson is not None else (None, None)
    return DeviceCondition(
        throttled_now=now,
        throttled_since_boot=since,
        cpu_mhz=_khz_to_mhz(_read(base, f"{CPUFREQ}/scaling_cur_freq")),
        cpu_max_mhz=_khz_to_mhz(_read(base, f"{CPUFREQ}/cpuinfo_max_freq")),
        power_mode=mode,
        power_mode_id=mode_id,
        gpu_mhz=gpu_mhz,
        gpu_max_mhz=gpu_max,
        nvidia_gpu=nvml.read() if nvml is not None and hardware.nvidia_gpu else None,
        storage=read_storage_wear(base),
        free_mb={name: free_space_mb(path) for name, path in folders.items()},
        read_only=read_only_folders(folders),
    )
