"""What ends the main thread's wait between health reports: a signal, or a request from
another thread. Waiting on a file descriptor instead of waking five times a second to look
at flags: an idle daemon then costs nothing between reports.

Signals reach it through ``signal.set_wakeup_fd`` (the interpreter writes a byte there when
a signal arrives, whatever the main thread is doing); other threads write a byte themselves.
"""

from __future__ import annotations

import contextlib
import select
import signal
import socket
import threading


class Wakeup:
    """A socket pair the main thread waits on; used by the main thread, poked from any."""

    def __init__(self) -> None:
        self._read, self._write = socket.socketpair()
        self._read.setblocking(False)
        self._write.setblocking(False)
        self._signals = False

    def install(self) -> None:
        """Have signals end the wait too (main thread only; elsewhere nothing is done)."""
        if threading.current_thread() is threading.main_thread():
            signal.set_wakeup_fd(self._write.fileno(), warn_on_full_buffer=False)
            self._signals = True

    def poke(self) -> None:
        """End the current or next wait (any thread)."""
        with contextlib.suppress(OSError):  # full: a wake-up is already waiting
            self._write.send(b"\0")

    def wait(self, timeout_s: float) -> None:
        """Return after ``timeout_s``, or sooner on a signal or a poke."""
        with contextlib.suppress(InterruptedError, ValueError, OSError):
            select.select([self._read], [], [], max(0.0, timeout_s))
        with contextlib.suppress(OSError):  # BlockingIOError: drained
            while self._read.recv(4096):
                pass

    def close(self) -> None:
        """Stop taking signals' bytes and close the pair (main thread)."""
        if self._signals:
            signal.set_wakeup_fd(-1)
            self._signals = False
        self._read.close()
        self._write.close()
