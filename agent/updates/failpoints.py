"""Crash points for the kill -9 tests of the update path.

``EDGE_AGENT_FAILPOINTS=installed,committed`` makes the process SIGKILL itself when it
reaches one of the named points: the exact moments between two durable steps that timing
from outside cannot hit reliably. Unset (always, outside tests) it costs one set lookup.
"""

from __future__ import annotations

import os
import signal

ENV_VAR = "EDGE_AGENT_FAILPOINTS"
_ACTIVE = frozenset(filter(None, os.environ.get(ENV_VAR, "").split(",")))


def failpoint(name: str) -> None:
    """Die here, as a power cut would, when ``name`` is listed in ``EDGE_AGENT_FAILPOINTS``."""
    if name in _ACTIVE:
        os.kill(os.getpid(), signal.SIGKILL)
