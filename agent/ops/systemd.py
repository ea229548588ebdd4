"""systemd ``Type=notify`` support without libsystemd: datagrams to ``$NOTIFY_SOCKET``.

The protocol is a few ``KEY=value`` lines per datagram (sd_notify(3)). Outside systemd
(no ``NOTIFY_SOCKET``) every call is a no-op, so the daemon runs the same anywhere.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Callable

import structlog

log = structlog.get_logger(__name__)

# While starting (model loads, waiting for the broker) ask systemd for this much more time,
# this often, so a slow TensorRT build or a broker down at boot is not a failed start.
EXTEND_TIMEOUT_S = 30.0
EXTEND_EVERY_S = 10.0


class SdNotifier:
    """Sends sd_notify messages; thread-safe (one datagram per call)."""

    def __init__(self, address: str | None) -> None:
        self._address: str | bytes | None = None
        if address:
            # "@name" is an abstract socket: its name starts with a NUL byte.
            self._address = b"\0" + address[1:].encode() if address.startswith("@") else address
        self._lock = threading.Lock()
        self._socket: socket.socket | None = None

    @classmethod
    def from_environment(cls) -> SdNotifier:
        """The notifier systemd asked for (``$NOTIFY_SOCKET``), or a silent one."""
        return cls(os.environ.get("NOTIFY_SOCKET"))

    @property
    def enabled(self) -> bool:
        """Whether systemd is listening."""
        return self._address is not None

    def send(self, *lines: str) -> bool:
        """Send one datagram; failures are logged, never raised (systemd may be gone)."""
        if self._address is None:
            return False
        message = "\n".join(lines).encode()
        try:
            with self._lock:
                if self._socket is None:
                    self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                    self._socket.setblocking(False)
                self._socket.sendto(message, self._address)
        except OSError as exc:
            log.warning("sd_notify_failed", error=str(exc), message=message.decode())
            return False
        return True

    def ready(self, status: str) -> bool:
        """READY=1 with a status line."""
        return self.send("READY=1", f"STATUS={status}")

    def status(self, text: str) -> bool:
        """A one-line status shown by ``systemctl status``."""
        return self.send(f"STATUS={text}")

    def reloading(self) -> bool:
        """RELOADING=1 (with the monotonic timestamp systemd 253+ asks for)."""
        return self.send("RELOADING=1", f"MONOTONIC_USEC={time.monotonic_ns() // 1000}")

    def stopping(self) -> bool:
        """STOPPING=1."""
        return self.send("STOPPING=1", "STATUS=stopping")

    def extend_timeout(self, seconds: float) -> bool:
        """Ask for ``seconds`` more before systemd's start/stop timeout fires."""
        return self.send(f"EXTEND_TIMEOUT_USEC={int(seconds * 1_000_000)}")

    def watchdog(self) -> bool:
        """WATCHDOG=1: the daemon is alive and making progress."""
        return self.send("WATCHDOG=1")


def watchdog_interval(environ: dict[str, str] | None = None) -> float | None:
    """Seconds between WATCHDOG=1 pings (half of ``WATCHDOG_USEC``), or None when off."""
    env = os.environ if environ is None else environ
    usec = env.get("WATCHDOG_USEC")
    pid = env.get("WATCHDOG_PID")
    if not usec or not usec.isdigit() or int(usec) == 0:
        return None
    if pid and pid.isdigit() and int(pid) != os.getpid():
        return None  # meant for another process
    return int(usec) / 1_000_000 / 2


class Watchdog:
    """Pings systemd's watchdog only while ``check()`` says the daemon makes progress.

    ``check`` returns None when healthy, or why not. A hung inference worker or a dead MQTT
    loop then stops the pings and systemd restarts the service (``WatchdogSec=``).
    """

    def __init__(
        self, notifier: SdNotifier, interval_s: float, check: Callable[[], str | None]
    ) -> None:
        self._notifier = notifier
        self._interval = interval_s
        self._check = check
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sd-watchdog", daemon=True)
        self._withheld: str | None = None

    def start(self) -> None:
        """Start pinging."""
        self._thread.start()

    def stop(self) -> None:
        """Stop pinging."""
        self._stop.set()
        self._thread.join(timeout=2)

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                problem = self._check()
            except Exception as exc:  # a broken check must not look like health
                problem = f"health check failed: {exc}"
            if problem is None:
                if self._withheld is not None:
                    log.info("watchdog_resumed")
                    self._withheld = None
                self._notifier.watchdog()
            elif problem != self._withheld:
                log.error(
                    "watchdog_withheld",
                    reason=problem,
                    effect="systemd will restart the service when WatchdogSec passes",
                )
                self._withheld = problem


class StartupExtender:
    """Sends EXTEND_TIMEOUT_USEC while the daemon starts, so systemd's start timeout does not
    kill a device that is building TensorRT engines or waiting for its broker."""

    def __init__(self, notifier: SdNotifier) -> None:
        self._notifier = notifier
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sd-extend", daemon=True)

    def start(self) -> None:
        """Start asking for more time (nothing outside systemd)."""
        if self._notifier.enabled:
            self._thread.start()

    def stop(self) -> None:
        """Stop asking: the daemon is serving, or stopping."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=2)

    def _run(self) -> None:
        while True:
            self._notifier.extend_timeout(EXTEND_TIMEOUT_S)
            if self._stop.wait(EXTEND_EVERY_S):
                return
