"""Telling a broker that keeps closing our connection from one that merely went away.

When two devices share a client id (two installs with one device_id), each connect closes
the other's connection. Brokers that speak MQTT 5 fully say so with "Session taken over";
others (Mosquitto before 2.0.12, any MQTT 3.1.1 session) just close the socket, so the only
sign is connections that keep ending within seconds of being accepted.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

import paho.mqtt.client as paho
import structlog
from paho.mqtt.reasoncodes import ReasonCode

SHORT_CONNECTION_S = 10.0
STREAK_TO_REPORT = 3
# MQTT 5 DISCONNECT reason "Session taken over": a newer connection with our client id.
SESSION_TAKEN_OVER = 0x8E


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


class ConnectionLog:
    """Logs the end of each connection and each failed connect attempt, and says so when
    the drops look like a client id clash.

    Called only by the thread that runs the MQTT callbacks (paho's network thread).
    """

    def __init__(
        self, log: structlog.stdlib.BoundLogger, client_id: str, reconnect_max_s: float
    ) -> None:
        self._log = log
        self._client_id = client_id
        self._reconnect_max_s = reconnect_max_s
        self._short_connections = ShortConnectionStreak()

    def connected(self) -> None:
        """The broker accepted a connection."""
        self._short_connections.connected(time.monotonic())

    def dropped(self, reason_code: ReasonCode, *, was_connected: bool, ours: bool) -> None:
        """A connection (``was_connected``) or a connect attempt ended; ``ours``: we asked."""
        if ours:
            self._log.info("mqtt_disconnected", reason=str(reason_code))
            return
        if was_connected:
            self._log.warning("mqtt_disconnected", reason=str(reason_code))
        else:
            self._log.warning("mqtt_connect_failed", reason=str(reason_code))
        streak = self._short_connections.dropped(time.monotonic())
        if getattr(reason_code, "value", None) == SESSION_TAKEN_OVER:
            # Another client connected with our client id: with the default ids that is
            # two devices sharing one device_id, which an operator has to fix.
            self._log.error(
                "mqtt_session_taken_over",
                client_id=self._client_id,
                action="another client uses this client id: give each device "
                "its own device_id (or host name)",
            )
        elif streak is not None:
            self._log.error(
                "mqtt_connection_keeps_dropping",
                client_id=self._client_id,
                connections=streak,
                within_s=SHORT_CONNECTION_S,
                action="the broker closes each connection soon after accepting "
                "it: most often another client uses this client id (two "
                "devices with one device_id or host name); else check "
                "the broker's log",
            )

    def on_connect_fail(self, client: paho.Client, userdata: Any) -> None:
        """paho's callback: the broker could not be reached (paho retries with backoff)."""
        with contextlib.suppress(Exception):
            self._log.warning(
                "mqtt_connect_failed",
                reason="broker unreachable",
                retry_max_s=self._reconnect_max_s,
            )
