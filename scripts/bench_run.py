"""The line every benchmark prints first: when, on what machine, with which versions.

Figures from a shared, noisy machine only compare within one run, so each run says which
run it was.
"""

from __future__ import annotations

import datetime
import os
import platform
from importlib import metadata
from pathlib import Path


def cpu_model() -> str:
    """The CPU's marketing name from /proc/cpuinfo (x86 'model name', ARM 'Model'), or the
    architecture when it gives none."""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return platform.machine()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("model name", "Model") and value.strip():
            return value.strip()
    return platform.machine()


def memory_gib() -> float | None:
    """Total memory in GiB from /proc/meminfo."""
    try:
        for line in Path("/proc/meminfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 1024 / 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def describe_run() -> str:
    """'run 2026-12-02 06:10 UTC, x86_64 <cpu>, 2 CPUs, 7.8 GiB, Linux 6.1, Python 3.11.9,
    onnxruntime 1.23.2, paho-mqtt 2.2.0'."""
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    memory = memory_gib()
    parts = [f"run {now}", f"{platform.machine()} {cpu_model()}", f"{os.cpu_count()} CPUs"]
    if memory is not None:
        parts.append(f"{memory:.1f} GiB")
    parts += [f"{platform.system()} {platform.release().split('-')[0]}",
              f"Python {platform.python_version()}",
              f"onnxruntime {_version('onnxruntime')}", f"paho-mqtt {_version('paho-mqtt')}"]
    return ", ".join(parts)
