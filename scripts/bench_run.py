"""The line every benchmark prints first: when, on what machine, with which versions.

Figures from a shared, noisy machine only compare within one run, so each run says which
run it was.
"""

from __future__ import annotations

import datetime
import platform
from importlib import metadata

# The benchmark scripts put the repository on sys.path before importing this module.
from agent.hardware.detect import detect


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def describe_run() -> str:
    """'run 2026-12-02 06:10 UTC, x86_64 <cpu>, 2 CPUs, 7.8 GiB, Linux 6.1, Python 3.11.9,
    onnxruntime 1.23.2, paho-mqtt 2.2.0' (the CPU and memory as the daemon detects them)."""
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    hardware = detect()
    parts = [
        f"run {now}",
        f"{hardware.machine} {hardware.cpu_model or hardware.machine}",
        f"{hardware.logical_cpus} CPUs",
    ]
    if hardware.memory_mb is not None:
        parts.append(f"{hardware.memory_mb / 1024:.1f} GiB")
    parts += [
        f"{platform.system()} {platform.release().split('-')[0]}",
        f"Python {platform.python_version()}",
        f"onnxruntime {_version('onnxruntime')}",
        f"paho-mqtt {_version('paho-mqtt')}",
    ]
    return ", ".join(parts)
