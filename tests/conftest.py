"""Shared fixtures: a private Mosquitto per test and the agent as a real subprocess."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

import pytest
import yaml

from tests.broker import MosquittoBroker, Recorder, started_so_far, stop_started_since

INSTALL_MOSQUITTO = "sudo apt-get install mosquitto"


def pytest_sessionstart(session: pytest.Session) -> None:
    """Stop before running anything when mosquitto is missing: the tests start private
    Mosquitto brokers, and without it every broker fixture would fail one by one with the
    same error. (``make test`` installs it first where it can: scripts/ensure-mosquitto.sh.)"""
    if shutil.which("mosquitto") is None and not Path("/usr/sbin/mosquitto").exists():
        pytest.exit(
            "mosquitto is not installed, and the tests start private Mosquitto "
            f"brokers. Install it:  {INSTALL_MOSQUITTO}",
            returncode=4,
        )


PROGRESS_EVERY_S = 60.0


class Progress:
    """A line every minute between the dots: tests done of those collected, and the time
    so far, so that a long run shows where it is (with pytest-xdist, on the controller)."""

    def __init__(self, config: pytest.Config) -> None:
        self._config = config
        self._started = time.monotonic()
        self._next = PROGRESS_EVERY_S
        self._done = 0
        self.total = 0

    @pytest.hookimpl(trylast=True)
    def pytest_collection_finish(self, session: pytest.Session) -> None:
        """The tests collected here (without xdist)."""
        self.total = len(session.items)

    @pytest.hookimpl(optionalhook=True)  # pytest-xdist's hook; absent without it
    def pytest_xdist_node_collection_finished(self, node: Any, ids: list[str]) -> None:
        """The tests a worker collected (each worker collects them all)."""
        self.total = len(ids)

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        """Count a test at its teardown; print the line when a minute has passed."""
        if report.when != "teardown":
            return
        self._done += 1
        elapsed = time.monotonic() - self._started
        if elapsed < self._next:
            return
        self._next = elapsed + PROGRESS_EVERY_S
        reporter = self._config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            minutes, seconds = divmod(int(elapsed), 60)
            reporter.write_line(
                f"  {self._done}/{self.total or '?'} tests, {minutes} min {seconds:02d} s"
            )


def pytest_configure(config: pytest.Config) -> None:
    """Progress lines on the process that prints (not on xdist's workers)."""
    if not hasattr(config, "workerinput") and not config.option.collectonly:
        config.pluginmanager.register(Progress(config), "edge-agent-progress")


def child_processes() -> list[str]:
    """This process's children (zombies included: a child nobody waited for), as
    "pid command" strings."""
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            command = (stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue  # it exited while we looked
        if int(fields[1]) == os.getpid():  # fields: state, ppid, ...
            children.append(f"{stat.parent.name} [{fields[0]}] {command.strip()}")
    return children


def mqtt_threads() -> list[str]:
    """Threads of MQTT clients and reading streams still running in the test process."""
    return [
        t.name
        for t in threading.enumerate()
        if t.name.startswith(("paho-mqtt-client", "paced-stream"))
    ]


@pytest.fixture(scope="session", autouse=True)
def nothing_left_running() -> Iterator[None]:
    """After the whole session: no broker, daemon or other child process, and no MQTT client
    thread is left behind (a leak makes later tests slow or flaky, and hides in CI)."""
    yield
    deadline = time.monotonic() + 5  # loop_stop and process exits settle quickly
    while (child_processes() or mqtt_threads()) and time.monotonic() < deadline:
        time.sleep(0.1)
    leftovers = child_processes() + mqtt_threads()
    assert not leftovers, f"left running after the test session: {leftovers}"


@pytest.fixture(autouse=True)
def stop_clients_after_each_test() -> Iterator[None]:
    """Disconnect the clients and stop the streams a test started, also when it failed
    before its own ``stop``."""
    mark = started_so_far()
    yield
    stuck = stop_started_since(mark)
    assert not stuck, f"reading streams that would not stop: {stuck}"


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[MosquittoBroker]:
    """A running private Mosquitto on a free port of 127.0.0.1."""
    workdir = tmp_path / "broker"
    workdir.mkdir()
    instance = MosquittoBroker(workdir)
    instance.start()
    yield instance
    instance.stop()


@pytest.fixture
def recorder(broker: MosquittoBroker) -> Iterator[Callable[..., Recorder]]:
    """Factory of started ``Recorder`` clients on the test broker; stopped at teardown."""
    started: list[Recorder] = []

    def make(*filters: str) -> Recorder:
        rec = Recorder(broker, list(filters)).start()
        started.append(rec)
        return rec

    yield make
    for rec in started:
        rec.stop()


class AgentProcess:
    """``python -m agent run`` in a subprocess, with its log captured to a file."""

    def __init__(
        self,
        config_file: Path,
        log_file: Path,
        env: dict[str, str] | None = None,
        log_level: str = "debug",
    ) -> None:
        self.config_file = config_file
        self.log_file = log_file
        self._log_handle = log_file.open("wb")
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "agent",
                "run",
                "--config",
                str(config_file),
                "--log-level",
                log_level,
            ],
            stdout=self._log_handle,
            stderr=subprocess.STDOUT,
            env=env,
        )

    def log_events(self) -> list[dict[str, Any]]:
        """The JSON log lines written so far."""
        events = []
        for line in self.log_file.read_text().splitlines():
            try:
                events.append(json.loads(line))
            except ValueError:
                events.append({"event": "<not json>", "line": line})
        return events

    def wait_for_event(self, name: str, timeout_s: float = 15.0) -> dict[str, Any]:
        """Wait for a log event called ``name``; fail with the log if it never comes."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for event in self.log_events():
                if event.get("event") == name:
                    return event
            if self.process.poll() is not None:
                break
            time.sleep(0.05)
        raise AssertionError(f"no {name!r} event; log:\n{self.log_file.read_text()}")

    def terminate(self, timeout_s: float = 10.0) -> tuple[int, float]:
        """SIGTERM; returns (exit code, seconds until exit)."""
        started = time.monotonic()
        self.process.send_signal(signal.SIGTERM)
        code = self.process.wait(timeout=timeout_s)
        return code, time.monotonic() - started

    def kill(self) -> None:
        """SIGKILL, as a power cut or the OOM killer would."""
        self.process.kill()
        self.process.wait(timeout=10)

    def close(self) -> None:
        """Make sure the process is gone."""
        if self.process.poll() is None:
            self.kill()
        self._log_handle.close()


@pytest.fixture
def agent_factory(tmp_path: Path) -> Iterator[Callable[..., AgentProcess]]:
    """Start the agent with a config given as a dict (written to a YAML file), optional
    extra environment variables, and a log level (debug unless a test at a high reading
    rate asks for less: paho logs every packet at debug)."""
    processes: list[AgentProcess] = []

    def start(
        config: dict[str, Any], env: dict[str, str] | None = None, log_level: str = "debug"
    ) -> AgentProcess:
        index = len(processes)
        config_file = tmp_path / f"agent-{index}.yaml"
        config_file.write_text(yaml.safe_dump(config, sort_keys=False))
        process = AgentProcess(config_file, tmp_path / f"agent-{index}.log", env, log_level)
        processes.append(process)
        return process

    yield start
    for process in processes:
        process.close()


class BrokerAddress(Protocol):
    """Where a config points: a running ``MosquittoBroker``, or just an address."""

    @property
    def host(self) -> str: ...

    @property
    def port(self) -> int: ...


def base_config(
    broker: BrokerAddress, tmp_path: Path, device_id: str = "dev1", **extra: Any
) -> dict[str, Any]:
    """A minimal agent config talking to the test broker, with folders under ``tmp_path``."""
    models_dir = tmp_path / "models"
    models_dir.mkdir(exist_ok=True)
    config: dict[str, Any] = {
        "device_id": device_id,
        "mqtt": {"host": broker.host, "port": broker.port, "keepalive_s": 5, "reconnect_max_s": 1},
        "models_dir": str(models_dir),
        "state_dir": str(tmp_path / "state"),
    }
    config.update(extra)
    return config
