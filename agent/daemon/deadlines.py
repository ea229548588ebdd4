"""How long stopping may take: shared by the shutdown and by a reload that stops parts."""

from __future__ import annotations

# SIGTERM must end the process within 5 s (systemd's and the tests' expectation): most of it
# goes to finishing queued readings, the rest to saying "offline" and disconnecting.
DRAIN_DEADLINE_S = 2.0
FLUSH_DEADLINE_S = 1.0
OFFLINE_DEADLINE_S = 1.0
