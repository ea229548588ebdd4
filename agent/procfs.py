"""What ``/proc`` says about a process: read by the health telemetry and the model tools."""

from __future__ import annotations

from pathlib import Path


def rss_mb(pid: int | str = "self") -> float | None:
    """Resident memory of process ``pid`` (default: this one) in MB; None when unreadable."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        return None
    return None
