"""systemd integration: sd_notify messages, the progress-checked watchdog, the unit file."""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.ops.systemd import SdNotifier, watchdog_interval
from tests.broker import MosquittoBroker, Recorder, publisher
from tests.conftest import AgentProcess, base_config
from tests.onnx_builders import build_linear, build_loop

REPO = Path(__file__).resolve().parent.parent
AgentFactory = Callable[[dict[str, Any]], AgentProcess]


class NotifySocket:
    """A datagram socket standing in for systemd's notify socket."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.messages: list[tuple[float, str]] = []

    def drain(self, seconds: float) -> list[str]:
        """Collect datagrams for ``seconds``; returns every message so far."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            self.messages.append((time.monotonic(), data.decode()))
        return [text for _, text in self.messages]

    def wait_for(self, needle: str, timeout_s: float = 20.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if any(needle in text for _, text in self.messages):
                return
            self.drain(0.2)
        raise AssertionError(f"no {needle!r} in {self.messages}")


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[NotifySocket]:
    sock = NotifySocket(tmp_path / "notify.sock")
    yield sock
    sock.sock.close()


@contextlib.contextmanager
def systemd_agent(
    config: dict[str, Any], tmp_path: Path, sock: NotifySocket, watchdog_usec: int
) -> Iterator[subprocess.Popen[bytes]]:
    """The daemon started as systemd would (``NOTIFY_SOCKET``, ``WATCHDOG_USEC``), its output
    in ``tmp_path/agent.log``. On exit it is killed if still running and always waited for,
    and the log file is closed."""
    import yaml  # noqa: PLC0415

    config_file = tmp_path / "agent.yaml"
    config_file.write_text(yaml.safe_dump(config))
    env = {**os.environ, "NOTIFY_SOCKET": str(sock.path), "WATCHDOG_USEC": str(watchdog_usec)}
    with (tmp_path / "agent.log").open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "agent", "run", "--config", str(config_file)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
        try:
            yield process
        finally:
            if process.poll() is None:
                process.kill()
            process.wait(timeout=10)


def test_abstract_socket_address() -> None:
    """'@name' is an abstract socket: a leading NUL byte on the wire."""
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    name = f"edge-agent-test-{os.getpid()}"
    server.bind(b"\0" + name.encode())
    server.settimeout(2)
    try:
        assert SdNotifier("@" + name).ready("up")
        assert server.recv(100) == b"READY=1\nSTATUS=up"
    finally:
        server.close()


def test_no_socket_means_no_op() -> None:
    """Outside systemd nothing is sent and nothing fails."""
    notifier = SdNotifier(None)
    assert not notifier.enabled
    assert not notifier.ready("x")


def test_watchdog_interval_is_half_of_watchdog_usec() -> None:
    """WATCHDOG=1 every WATCHDOG_USEC/2; not for another process; off when unset."""
    assert watchdog_interval({"WATCHDOG_USEC": "30000000"}) == 15.0
    assert watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}) is None
    assert watchdog_interval({}) is None


@pytest.mark.broker
def test_notify_sequence_and_watchdog(
    broker: MosquittoBroker, tmp_path: Path, notify_socket: NotifySocket
) -> None:
    """READY=1 after start-up (EXTEND_TIMEOUT_USEC and STATUS before it), WATCHDOG=1 at half
    the watchdog interval, RELOADING=1 then READY=1 on SIGHUP, STOPPING=1 on SIGTERM."""
    build_linear(tmp_path / "models" / "lin.onnx")
    config = base_config(
        broker,
        tmp_path,
        models={"lin": {}},
        health={"interval_s": 0.5},
        pipelines={
            "p": {"model": "lin", "input": {"topic": "in/+"}, "output": {"topic": "out/{1}"}}
        },
    )
    with systemd_agent(config, tmp_path, notify_socket, watchdog_usec=1_000_000) as process:
        notify_socket.wait_for("READY=1")
        notify_socket.drain(2.0)
        process.send_signal(signal.SIGHUP)
        notify_socket.drain(1.5)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=10) == 0
        messages = notify_socket.drain(0.5)
    ready = next(i for i, m in enumerate(messages) if m.startswith("READY=1"))
    assert any("EXTEND_TIMEOUT_USEC=" in m for m in messages[:ready])
    assert any(m.startswith("STATUS=starting") for m in messages[:ready])
    assert "STATUS=serving 1 pipeline, 1/1 model ready, connected" in messages[ready]
    pings = [t for t, m in notify_socket.messages if m == "WATCHDOG=1"]
    # ~3.5 s between READY=1 and SIGTERM at one ping per 0.5 s: about 7.
    assert len(pings) >= 3, pings
    # About every 0.5 s (half of WATCHDOG_USEC): neither a flood nor the whole WATCHDOG_USEC.
    # The median, with a wide margin: a loaded machine delays single pings (or the test's
    # reading of them), which shifts a few gaps but not the middle one.
    gaps = [b - a for a, b in itertools.pairwise(pings)]
    assert 0.25 <= statistics.median(gaps) <= 0.75, sorted(gaps)
    reloading = next(i for i, m in enumerate(messages) if m.startswith("RELOADING=1"))
    assert "MONOTONIC_USEC=" in messages[reloading]
    assert any(m.startswith("READY=1") for m in messages[reloading:])
    assert messages[-1].startswith("STOPPING=1") or any(
        m.startswith("STOPPING=1") for m in messages[-3:]
    )
    assert any(m.startswith("STATUS=serving") and "readings/s" in m for m in messages)


@pytest.mark.broker
def test_watchdog_withheld_while_a_worker_is_stuck(
    broker: MosquittoBroker, tmp_path: Path, notify_socket: NotifySocket
) -> None:
    """A worker stuck in one batch longer than health.stuck_after_s: no more WATCHDOG=1, and
    the log says why (systemd then restarts the service)."""
    build_loop(tmp_path / "models" / "loop.onnx")
    config = base_config(
        broker,
        tmp_path,
        models={"loop": {}},
        health={"interval_s": 0.5, "stuck_after_s": 1.0},
        pipelines={
            "p": {"model": "loop", "input": {"topic": "in/+"}, "output": {"topic": "out/{1}"}}
        },
    )
    with systemd_agent(config, tmp_path, notify_socket, watchdog_usec=600_000):
        notify_socket.wait_for("WATCHDOG=1")
        client = publisher(broker)
        try:
            client.publish("in/a", json.dumps({"inputs": {"x": [0.1] * 8, "n": 3}}), qos=1)
            notify_socket.drain(1.0)
            hung_at = time.monotonic()
            client.publish(
                "in/a", json.dumps({"inputs": {"x": [0.1] * 8, "n": 10**10}}), qos=1
            ).wait_for_publish(timeout=10)
        finally:
            client.disconnect()
            client.loop_stop()
        notify_socket.drain(5.0)
    pings = [t for t, m in notify_socket.messages if m == "WATCHDOG=1"]
    assert [t for t in pings if t < hung_at], "the watchdog never pinged"
    # Pings stop once the batch has run stuck_after_s (1 s) and the next 0.3 s ping is due:
    # from 2.5 s after the hung reading on, the last 2.5 s of the wait (where a healthy daemon
    # pings ~8 times) hold none.
    assert not [t for t in pings if t > hung_at + 2.5], f"pinged while stuck: {pings}"
    log = (tmp_path / "agent.log").read_text()
    assert "watchdog_withheld" in log
    assert "pipeline 'p' worker has been inside one batch" in log


def loop_trips_for(seconds: float, tmp_path: Path) -> int:
    """The trip count that makes ``build_loop``'s model run at least about ``seconds`` here:
    the fastest of three runs of 100,000 trips (about 80 ms each), because one run slowed by
    the other tests of a parallel session gives too few trips (seen in CI: 16 s asked, 6.7 s
    run), while a loaded machine only makes the real run longer."""
    import numpy as np  # noqa: PLC0415
    import onnxruntime as ort  # noqa: PLC0415

    path = build_loop(tmp_path / "calibrate.onnx")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {"x": np.full((1, 8), 0.1, np.float32), "n": np.array(100_000, np.int64)}
    session.run(None, feeds)
    fastest = float("inf")
    for _ in range(3):
        started = time.perf_counter()
        session.run(None, feeds)
        fastest = min(fastest, time.perf_counter() - started)
    return int(100_000 * seconds / max(fastest, 1e-6))


@pytest.mark.broker
def test_a_reading_that_takes_seconds_stops_neither_the_watchdog_nor_other_pipelines(
    broker: MosquittoBroker, tmp_path: Path, notify_socket: NotifySocket
) -> None:
    """A model slow for some inputs (a Loop whose trip count is in the reading), after 100
    cheap readings (enough for a cheap model to run on paho's thread): while one reading
    runs for seconds, another pipeline answers every reading sent meanwhile and the watchdog
    keeps pinging, because the batch is younger than health.stuck_after_s."""
    build_loop(tmp_path / "models" / "loop.onnx")
    build_linear(tmp_path / "models" / "lin.onnx")
    trips = loop_trips_for(8.0, tmp_path)
    config = base_config(
        broker,
        tmp_path,
        models={"loop": {}, "lin": {}},
        health={"interval_s": 0.5, "stuck_after_s": 60.0},
        pipelines={
            "slow": {
                "model": "loop",
                "input": {"topic": "slow/+"},
                "output": {"topic": "out/slow/{1}"},
            },
            "fast": {
                "model": "lin",
                "input": {"topic": "fast/+", "field": "x"},
                "output": {"topic": "out/fast/{1}"},
            },
        },
    )
    rec = Recorder(broker, ["out/#"]).start()
    try:
        with systemd_agent(config, tmp_path, notify_socket, watchdog_usec=1_000_000):
            notify_socket.wait_for("WATCHDOG=1")
            client = publisher(broker)
            try:
                for index in range(100):
                    reading = {"id": index, "inputs": {"x": [0.1] * 8, "n": 1}}
                    client.publish("slow/a", json.dumps(reading), qos=1)
                    notify_socket.drain(0.01)  # one at a time: each its own run
                deadline = time.monotonic() + 30
                while len(rec.messages) < 100:
                    assert time.monotonic() < deadline, "the cheap readings were not answered"
                    notify_socket.drain(0.2)
                slow_at = time.monotonic()
                slow = {"id": "slow", "inputs": {"x": [0.1] * 8, "n": trips}}
                client.publish("slow/a", json.dumps(slow), qos=1)
                for index in range(20):  # at once: answered in milliseconds, not seconds
                    client.publish("fast/a", json.dumps({"id": index, "x": [1.0] * 4}), qos=1)
                deadline = time.monotonic() + 90
                while not any(b'"id":"slow"' in m.payload for m in rec.messages):
                    assert time.monotonic() < deadline, "the slow reading was never answered"
                    notify_socket.drain(0.2)  # read as it comes: the socket's buffer is small
                slow_done = time.monotonic()
            finally:
                client.disconnect()
                client.loop_stop()
            notify_socket.drain(0.5)
    finally:
        rec.stop()
    topics = [m.topic for m in rec.messages]
    answered_slow = next(i for i, m in enumerate(rec.messages) if b'"id":"slow"' in m.payload)
    fast = [i for i, topic in enumerate(topics) if topic == "out/fast/a"]
    assert len(fast) == 20, topics[-30:]
    assert max(fast) < answered_slow, "the fast pipeline waited for the slow reading"
    pings = [t for t, m in notify_socket.messages if m == "WATCHDOG=1"]
    during = [t for t in pings if slow_at + 1.0 < t < slow_done]
    assert len(during) >= 2, f"no watchdog ping during the {slow_done - slow_at:.1f} s run"
    assert "watchdog_withheld" not in (tmp_path / "agent.log").read_text()


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="needs systemd-analyze")
def test_unit_file_verifies(tmp_path: Path) -> None:
    """systemd-analyze verify accepts the unit (with ExecStart pointed at this venv)."""
    unit = (REPO / "systemd" / "edge-agent.service").read_text()
    executable = Path(sys.executable).parent / "edge-agent"
    unit = unit.replace("/opt/edge-agent/bin/edge-agent", str(executable))
    path = tmp_path / "edge-agent.service"
    path.write_text(unit)
    done = subprocess.run(
        ["systemd-analyze", "verify", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    problems = [
        line for line in (done.stdout + done.stderr).splitlines() if "edge-agent.service" in line
    ]
    assert done.returncode == 0, done.stderr
    assert problems == [], problems
