"""The lines a subprocess writes to stdout, collected by a reader thread as they come, for
tests that wait for a line (the demo, ``status --watch``)."""

from __future__ import annotations

import subprocess
import threading


class OutputLines:
    """Reads ``process.stdout`` line by line on its own thread; other threads look at the
    lines so far or wait for the next one."""

    def __init__(self, process: subprocess.Popen[str], name: str) -> None:
        self._process = process
        self._cond = threading.Condition()
        self._lines: list[str] = []
        self._reader = threading.Thread(target=self._read, name=name, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        # Runs on the reader thread until the process closes its stdout.
        assert self._process.stdout is not None
        for line in self._process.stdout:
            with self._cond:
                self._lines.append(line.rstrip("\n"))
                self._cond.notify_all()

    def lines(self) -> list[str]:
        """Every line read so far."""
        with self._cond:
            return list(self._lines)

    def wait(self, timeout_s: float) -> None:
        """Return when a new line arrives, or after ``timeout_s``."""
        with self._cond:
            self._cond.wait(timeout_s)

    @property
    def finished(self) -> bool:
        """The process exited and all of its output has been read."""
        return self._process.poll() is not None and not self._reader.is_alive()

    def join(self, timeout_s: float) -> None:
        """Wait for the reader to reach the end of the output."""
        self._reader.join(timeout=timeout_s)
