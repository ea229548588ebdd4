"""The filters a persistent MQTT session holds, remembered across restarts.

A persistent session keeps its subscriptions while the agent is stopped. A filter removed
from the config in the meantime would keep delivering messages nobody routes, for as long as
the session lives; remembering what was subscribed lets the next start unsubscribe it.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import structlog

from agent.durable import write_atomically

log = structlog.get_logger(__name__)


class SessionMemory:
    """The subscribed filters of one connection, in a small JSON file. Written by the main
    thread (subscribe, unsubscribe) and read once on paho's thread after a connect."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._lock = threading.Lock()
        self._previous: set[str] = set()  # what the last run held; consumed on connect
        self._saved: set[str] | None = None
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            self._previous = {str(f) for f in data.get("filters", [])}
        except FileNotFoundError:
            pass
        except (OSError, ValueError, AttributeError) as exc:
            log.warning("session_memory_unreadable", path=str(path), error=str(exc))

    def stale(self, current: set[str]) -> list[str]:
        """Filters the session may still hold that are no longer wanted (once per run)."""
        with self._lock:
            stale, self._previous = self._previous - current, set()
        return sorted(stale)

    def save(self, current: set[str]) -> None:
        """Remember ``current`` (written only when it changed)."""
        with self._lock:
            if current == self._saved:
                return
            self._saved = set(current)
        try:
            self._path.parent.mkdir(parents=True, exist_ok=True)
            write_atomically(self._path, json.dumps({"filters": sorted(current)}).encode())
        except OSError as exc:
            log.warning("session_memory_not_saved", path=str(self._path), error=str(exc))
