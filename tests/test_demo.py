"""`make demo` (scripts/demo.py) as a user runs it: results from reading 0 on, a clean exit on
Ctrl-C, nothing left on a broker it did not start, and no test tooling imported."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from tests.broker import MosquittoBroker, Recorder, free_port
from tests.output_lines import OutputLines

REPO = Path(__file__).resolve().parent.parent
DEMO = REPO / "scripts" / "demo.py"
PREFIX = "edge/demo"  # config/demo.yaml: device_id demo, the default topic_prefix


class DemoProcess:
    """scripts/demo.py in a subprocess, its output collected line by line."""

    def __init__(self, *args: str, env: dict[str, str] | None = None) -> None:
        self.process = subprocess.Popen(
            [sys.executable, str(DEMO), *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, **(env or {})},
        )
        self.lines = OutputLines(self.process, "demo-output")

    def output(self) -> str:
        """Everything printed so far."""
        return "\n".join(self.lines.lines())

    def wait_for_line(self, predicate: Callable[[str], bool], timeout_s: float = 30.0) -> str:
        """The first line for which ``predicate`` holds; fails with the output on timeout."""
        deadline = time.monotonic() + timeout_s
        while True:
            for line in self.lines.lines():
                if predicate(line):
                    return line
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self.lines.finished:
                raise AssertionError("no such line; demo output:\n" + self.output())
            self.lines.wait(min(remaining, 0.2))

    def interrupt(self, timeout_s: float = 30.0) -> int:
        """SIGINT, as Ctrl-C sends; the exit code."""
        self.process.send_signal(signal.SIGINT)
        code = self.process.wait(timeout=timeout_s)
        self.lines.join(timeout_s=5)
        return code

    def close(self) -> None:
        """Make sure it is gone (SIGINT first: the demo stops its own children then)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.lines.join(timeout_s=5)


@pytest.fixture
def demo_factory() -> Iterator[Callable[..., DemoProcess]]:
    """Start the demo with arguments and extra environment; stopped at teardown."""
    started: list[DemoProcess] = []

    def start(*args: str, env: dict[str, str] | None = None) -> DemoProcess:
        demo = DemoProcess(*args, env=env)
        started.append(demo)
        return demo

    yield start
    for demo in started:
        demo.close()


def result_lines(demo: DemoProcess) -> list[str]:
    """The printed result lines (sensor, reading id, ...)."""
    return [line for line in demo.output().splitlines() if line.startswith(("pump-1", "fan-2"))]


def assert_first_results_are_reading_0(demo: DemoProcess) -> None:
    """The sensors start once the daemon answers: no reading is lost before it subscribed."""
    demo.wait_for_line(lambda line: "fan-2-1 " in line)
    first = [line.split()[1] for line in result_lines(demo)[:2]]
    assert sorted(first) == ["fan-2-0", "pump-1-0"], demo.output()


def test_demo_leaves_nothing_on_a_broker_it_did_not_start(
    broker: MosquittoBroker,
    recorder: Callable[..., Recorder],
    demo_factory: Callable[..., DemoProcess],
    tmp_path: Path,
) -> None:
    """On a broker that was already there (a shared one), Ctrl-C stops the demo with exit
    code 0, and afterwards no retained topic of the demo's daemon is left, nor its persistent
    session."""
    demo = demo_factory(
        "--host", broker.host, "--port", str(broker.port), "--run-dir", str(tmp_path / "run")
    )
    demo.wait_for_line(lambda line: line.startswith("broker: the MQTT broker already answering"))
    assert_first_results_are_reading_0(demo)
    # While it runs, the daemon's retained state is there (so the check below means something).
    during = recorder(f"{PREFIX}/#")
    during.wait_for(
        lambda ms: {m.topic for m in ms if m.retain} >= {f"{PREFIX}/status", f"{PREFIX}/models/vib"}
    )
    during.stop()

    assert demo.interrupt() == 0, demo.output()
    assert "edge-agent stopped with exit code 0" in demo.output()

    # A fresh subscriber gets every retained message right after subscribing.
    after = recorder("#")
    time.sleep(1.0)
    left = [(m.topic, m.payload) for m in after.messages if m.retain and m.payload]
    assert left == [], left
    # The daemon's persistent session (at_least_once) is gone: a client resuming it finds none.
    client = paho.Client(
        CallbackAPIVersion.VERSION2,
        client_id="edge-agent-demo",
        protocol=MQTTProtocolVersion.MQTTv5,
    )
    present: list[bool] = []
    connected = threading.Event()

    def on_connect(
        client: paho.Client,
        userdata: object,
        flags: paho.ConnectFlags,
        reason: object,
        properties: object,
    ) -> None:
        present.append(bool(flags.session_present))
        connected.set()

    client.on_connect = on_connect
    client.connect(broker.host, broker.port, clean_start=False)
    client.loop_start()
    try:
        assert connected.wait(10)
    finally:
        client.disconnect()
        client.loop_stop()
    assert present == [False]
    assert "removed from" in demo.output()  # and the screen says what it removed


def test_demo_starts_a_private_mosquitto_when_none_answers(
    demo_factory: Callable[..., DemoProcess], tmp_path: Path
) -> None:
    """With Mosquitto installed and no broker on the port, the demo runs its own Mosquitto,
    and stops it on Ctrl-C (exit code 0)."""
    port = free_port()
    demo = demo_factory("--port", str(port), "--run-dir", str(tmp_path / "run"))
    demo.wait_for_line(lambda line: line.startswith("broker: a private Mosquitto"))
    assert_first_results_are_reading_0(demo)
    assert demo.interrupt() == 0, demo.output()
    assert "stopped the mosquitto broker" in demo.output()


def test_demo_falls_back_to_the_embedded_broker_without_mosquitto(
    demo_factory: Callable[..., DemoProcess], tmp_path: Path
) -> None:
    """No broker answering and no Mosquitto ($MOSQUITTO names a missing binary): the demo
    runs the embedded amqtt broker (MQTT 3.1.1), says so with the install command, and
    works the same."""
    pytest.importorskip("amqtt", reason="amqtt comes with the demo extra (make demo)")
    port = free_port()
    demo = demo_factory(
        "--port",
        str(port),
        "--run-dir",
        str(tmp_path / "run"),
        env={"MOSQUITTO": str(tmp_path / "no-mosquitto")},
    )
    demo.wait_for_line(lambda line: "embedded amqtt broker" in line)
    demo.wait_for_line(lambda line: "sudo apt-get install mosquitto" in line)
    assert_first_results_are_reading_0(demo)
    assert demo.interrupt() == 0, demo.output()
    assert "stopped the embedded broker" in demo.output()


def test_demo_imports_no_test_tooling(tmp_path: Path) -> None:
    """The demo's venv has no pytest, sklearn or mypy: the demo (and the model builder it
    shares with the tests) must not import them."""
    model = tmp_path / "vibration.onnx"
    check = (
        "import sys; from pathlib import Path; sys.path.insert(0, 'scripts'); "
        "import demo, embedded_broker; "
        f"demo.build_vibration_scorer(Path({str(model)!r})); "
        "heavy = {'pytest', 'sklearn', 'skl2onnx', 'scipy', 'mypy', 'silero_vad'}; "
        "print(sorted(heavy & {name.split('.')[0] for name in sys.modules}))"
    )
    done = subprocess.run(
        [sys.executable, "-c", check],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
    assert model.stat().st_size > 0
