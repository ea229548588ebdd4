"""Telling a broker that keeps closing our connection from one that merely went away.

When two devices share a client id (two installs with one device_id), each connect closes
the other's connection. Brokers that speak MQTT 5 fully say so with "Session taken over";
others (Mosquitto before 2.0.12, any MQTT 3.1.1 session) just close the socket, so the only
sign is connections that keep ending within seconds of being accepted.
"""

from __future__ import annotations

SHORT_CONNECTION_S = 10.0
STREAK_TO_REPORT = 3


class ShortConnectionStreak:
    """Counts accepted connections in a row that the broker closed soon after accepting them.

    Pure bookkeeping: the caller passes the clock. One instance per connection, owned by
    the thread that runs the MQTT callbacks.
    """

    def __init__(
        self, short_s: float = SHORT_CONNECTION_S, report_at: int = STREAK_TO_REPORT
    ) -> None:
        self._short_s = short_s
        self._report_at = report_at
        self._connected_at: float | None = None
        self._streak = 0

    def connected(self, now: float) -> None:
        """The broker accepted a connection at ``now``."""
        self._connected_at = now

    def dropped(self, now: float) -> int | None:
        """An accepted connection ended without our asking; the streak length when it has
        just reached the reporting threshold (reported once per streak), else None."""
        if self._connected_at is None:
            return None  # a failed connect attempt, not an accepted connection
        lasted = now - self._connected_at
        self._connected_at = None
        if lasted >= self._short_s:
            self._streak = 0
            return None
        self._streak += 1
        return self._streak if self._streak == self._report_at else None
