"""`make demo`: a generated model, the daemon, a simulated vibration sensor, results printed.

The broker: the one scripts/local_broker.py chooses (one already answering on the host and
port, else a private Mosquitto, else the embedded amqtt broker), named on the first line.

The sensors start once the daemon answers a ready-check reading, so reading 0 is the first
result printed. Ctrl-C stops the sensors, then the daemon (SIGTERM, as systemd would), then
removes what the daemon left on a broker it did not start (its retained P/status, P/health
and P/models/* topics and its persistent session; also done before the daemon starts, for
what a killed run left), then stops the broker it started; the exit code is 0 when all of
that went cleanly.

Settings (option, else environment variable): --host / EDGE_DEMO_HOST, --port /
EDGE_DEMO_PORT, --run-dir / EDGE_DEMO_RUN_DIR (default demo-run/), --broker / EDGE_DEMO_BROKER
(auto, mosquitto or embedded), and MOSQUITTO: the mosquitto binary (default: the one on
PATH, else /usr/sbin/mosquitto).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import numpy as np
import paho.mqtt.client as paho
import yaml
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

# tests/onnx_builders.py needs only numpy and onnx, both in the demo's venv, which has no test
# tooling (tests/test_demo.py checks that the demo imports none).
from local_broker import Broker, say, shown, start_broker  # noqa: E402

from agent.config.loader import load_config  # noqa: E402
from agent.config.schema import AgentConfig  # noqa: E402
from tests.onnx_builders import build_vibration_scorer  # noqa: E402

TEMPLATE = REPO / "config" / "demo.yaml"
SENSORS = ("pump-1", "fan-2")
RATE_HZ = 4.0
SAMPLES = 64
# A reading on its own topic that the demo publishes until the daemon answers it: only then
# has the daemon subscribed, so no reading of the sensors is lost to an absent subscription.
READY_CHECK_TOPIC = "demo/sensors/ready-check/vib"
READY_CHECK_EVERY_S = 0.25
READY_HINT_AFTER_S = 20.0
AGENT_STOP_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class Settings:
    """Where the demo's broker is, and where its files go."""

    host: str
    port: int
    run_dir: Path
    broker: str  # auto, mosquitto or embedded


def parse_args(argv: Sequence[str] | None) -> Settings:
    """Options, with the environment variables of the module docstring as defaults."""
    env = os.environ
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--host",
        default=env.get("EDGE_DEMO_HOST", "127.0.0.1"),
        help="MQTT broker host (default 127.0.0.1)",
    )
    parser.add_argument(
        "--port",
        type=int,
        default=int(env.get("EDGE_DEMO_PORT", "1883")),
        help="MQTT broker port (default 1883)",
    )
    parser.add_argument(
        "--run-dir",
        type=Path,
        default=Path(env.get("EDGE_DEMO_RUN_DIR", str(REPO / "demo-run"))),
        help="model, config, state and logs of the run (default demo-run/)",
    )
    parser.add_argument(
        "--broker",
        choices=("auto", "mosquitto", "embedded"),
        default=env.get("EDGE_DEMO_BROKER", "auto"),
        help="auto: the broker answering on host:port, else a private "
        "Mosquitto, else the embedded amqtt broker",
    )
    args = parser.parse_args(argv)
    return Settings(args.host, args.port, Path(args.run_dir).resolve(), args.broker)


# ---------------------------------------------------------------------------------------------
# Ctrl-C


class StopRequest:
    """Set by SIGINT, SIGTERM or SIGHUP; everything that waits checks it."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self.signal_name: str | None = None

    def install(self) -> None:
        """Handle the stop signals (a plain Ctrl-C would raise KeyboardInterrupt wherever the
        main thread is, and the exit code would be 130 instead of a clean 0)."""
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(signum, self._handle)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.event.is_set():
            say(f"\n(still stopping: the daemon is given {AGENT_STOP_TIMEOUT_S:.0f} s to finish)")
        self.signal_name = signal.Signals(signum).name
        self.event.set()

    def is_set(self) -> bool:
        """Whether a stop was asked for."""
        return self.event.is_set()

    def wait(self, timeout_s: float) -> bool:
        """Wait up to ``timeout_s``; True once a stop was asked for."""
        return self.event.wait(timeout_s)


def take_terminal() -> Callable[[], None]:
    """Make this process the only one that receives the terminal's Ctrl-C; returns the
    function that gives the terminal back.

    The terminal sends SIGINT to its whole foreground process group. Under `make demo` that
    group holds make too, and make, however cleanly the demo then exits, kills itself with
    SIGINT: the shell sees 130. In a group of its own, made the foreground one (as a shell
    does for a job), the demo alone is interrupted and make exits with the demo's code. The
    daemon and the brokers run in sessions of their own for the same reason: the demo stops
    them in order. Run from a shell directly, the demo already leads its own group."""
    try:
        fd = sys.stdin.fileno()
        if not os.isatty(fd) or os.getpgrp() == os.getpid() or os.tcgetpgrp(fd) != os.getpgrp():
            return lambda: None  # no terminal, own group already, or a background job
    except (OSError, ValueError):
        return lambda: None
    previous_group = os.getpgrp()
    # tcsetpgrp from a group that is not (or no longer) the foreground one raises SIGTTOU.
    signal.signal(signal.SIGTTOU, signal.SIG_IGN)
    try:
        os.setpgid(0, 0)
        os.tcsetpgrp(fd, os.getpgrp())
    except OSError:
        return lambda: None

    def give_back() -> None:
        with contextlib.suppress(OSError):
            os.tcsetpgrp(fd, previous_group)

    return give_back


# ---------------------------------------------------------------------------------------------
# The broker


# ---------------------------------------------------------------------------------------------
# The daemon


def write_config(args: Settings, protocol: str) -> Path:
    """config/demo.yaml with this run's broker, protocol and folders."""
    config = yaml.safe_load(TEMPLATE.read_text())
    config["mqtt"] = {
        **config.get("mqtt", {}),
        "host": args.host,
        "port": args.port,
        "protocol": protocol,
    }
    config["models_dir"] = str(args.run_dir / "models")
    config["state_dir"] = str(args.run_dir / "state")
    path = args.run_dir / "agent.yaml"
    path.write_text(
        "# Written by scripts/demo.py from config/demo.yaml; rewritten each run.\n"
        + yaml.safe_dump(config, sort_keys=False)
    )
    return path


def start_agent(config_file: Path, log_path: Path) -> subprocess.Popen[bytes]:
    """``python -m agent run`` with its log in ``log_path``, in a session of its own (see
    ``take_terminal``: the demo, not the terminal, tells it when to stop)."""
    with log_path.open("wb") as log_file:
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "agent",
                "run",
                "--config",
                str(config_file),
                "--log-format",
                "console",
            ],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            cwd=REPO,
        )


def stop_agent(agent: subprocess.Popen[bytes], log_path: Path) -> int:
    """SIGTERM and wait; the daemon's exit code (-9 when it had to be killed)."""
    code = agent.poll()
    if code is not None:
        say(f"\nedge-agent exited early with code {code}; see {shown(log_path)}")
        return code if code != 0 else 1
    agent.send_signal(signal.SIGTERM)
    started = time.monotonic()
    try:
        code = agent.wait(timeout=AGENT_STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        agent.kill()
        agent.wait()
        say(
            f"\nedge-agent did not stop within {AGENT_STOP_TIMEOUT_S:.0f} s of SIGTERM and "
            f"was killed; see {shown(log_path)}"
        )
        return -9
    say(f"\nedge-agent stopped with exit code {code} in {time.monotonic() - started:.2f} s")
    return code


# ---------------------------------------------------------------------------------------------
# MQTT clients: results, sensors, clean-up


def mqtt_client(protocol: str, client_id: str, *, clean: bool = True) -> paho.Client:
    """A paho client speaking the daemon's protocol (amqtt knows only 3.1.1)."""
    if protocol == "5":
        return paho.Client(
            CallbackAPIVersion.VERSION2, client_id=client_id, protocol=MQTTProtocolVersion.MQTTv5
        )
    return paho.Client(
        CallbackAPIVersion.VERSION2,
        client_id=client_id,
        protocol=MQTTProtocolVersion.MQTTv311,
        clean_session=clean,
    )


class ResultsPrinter:
    """Prints results, model states and rejected readings; notices the ready-check answer."""

    def __init__(self, args: Settings, protocol: str, prefix: str) -> None:
        self.prefix = prefix
        self.answered = threading.Event()
        self.client = mqtt_client(protocol, f"edge-demo-results-{os.getpid()}")
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.connect(args.host, args.port)
        self.client.loop_start()

    def close(self) -> None:
        """Disconnect and stop paho's thread."""
        self.client.disconnect()
        self.client.loop_stop()

    def _on_connect(
        self, client: paho.Client, userdata: Any, flags: Any, reason: Any, properties: Any
    ) -> None:
        client.subscribe(
            [
                ("demo/results/+/vib", 1),
                (f"{self.prefix}/errors", 0),
                (f"{self.prefix}/models/+", 0),
            ]
        )

    def _on_message(self, client: paho.Client, userdata: Any, message: paho.MQTTMessage) -> None:
        if not message.payload:
            return  # a retained topic being cleared
        data = json.loads(message.payload)
        if "/models/" in message.topic:
            say(
                f"model {data['name']}: {data['state']} {data.get('version') or ''} "
                f"{data.get('error') or ''}"
            )
        elif message.topic.endswith("/errors"):
            say(f"error {data['pipeline']} {data['topic']}: {data['reason']}")
        elif message.topic.split("/")[2] == "ready-check":
            self.answered.set()
        else:
            sensor = message.topic.split("/")[2]
            rms = data["outputs"]["rms"][0]
            anomaly = data["outputs"]["anomaly"][0]
            flag = "  <-- ANOMALY" if anomaly > 0.5 else ""
            say(
                f"{sensor:7} {data['id']:>11}  rms={rms:5.2f}  anomaly={anomaly:4.2f}  "
                f"latency={data['latency_ms']:5.2f} ms  {data['version'][:15]}{flag}"
            )


def window(rng: np.random.Generator, t: float, anomalous: bool) -> list[float]:
    """64 samples of a 50 Hz vibration with noise; an anomaly triples the amplitude."""
    phase = np.linspace(0, 2 * math.pi * 4, SAMPLES) + t
    amplitude = 3.5 if anomalous else 1.0
    samples = amplitude * np.sin(phase) + 0.1 * rng.standard_normal(SAMPLES)
    return [round(float(v), 4) for v in samples]


class Sensors:
    """The simulated sensors' MQTT client: ready-check readings, then the sensors' stream."""

    def __init__(self, args: Settings, protocol: str) -> None:
        self.client = mqtt_client(protocol, f"edge-demo-sensor-{os.getpid()}")
        self.client.connect(args.host, args.port)
        self.client.loop_start()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    def wait_until_served(
        self,
        printer: ResultsPrinter,
        agent: subprocess.Popen[bytes],
        stop: StopRequest,
        log_path: Path,
    ) -> bool:
        """Publish ready-check readings until the daemon answers one; False when stopped or
        the daemon exited first. (Its model loads and it subscribes in that time.)"""
        started = time.monotonic()
        hinted = False
        count = 0
        zeros = [0.0] * SAMPLES
        while not stop.is_set() and agent.poll() is None:
            self.client.publish(
                READY_CHECK_TOPIC, json.dumps({"id": f"ready-check-{count}", "x": zeros}), qos=0
            )
            count += 1
            if printer.answered.wait(READY_CHECK_EVERY_S):
                return True
            if not hinted and time.monotonic() - started > READY_HINT_AFTER_S:
                hinted = True
                say(
                    f"(the daemon has not answered after {READY_HINT_AFTER_S:.0f} s; its log: "
                    f"{shown(log_path)})"
                )
        return False

    def start(self) -> None:
        """Start publishing both sensors' windows at RATE_HZ, reading 0 first."""
        self._thread = threading.Thread(target=self._run, name="demo-sensors", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop publishing, let paho send what it queued, disconnect."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)
        self.client.disconnect()
        self.client.loop_stop()

    def _run(self) -> None:
        rng = np.random.default_rng(7)
        started = time.monotonic()
        reading = 0
        while not self._stop.is_set():
            for sensor in SENSORS:
                anomalous = sensor == "fan-2" and reading % 20 >= 17
                payload = {"id": f"{sensor}-{reading}", "x": window(rng, reading / 3, anomalous)}
                self.client.publish(f"demo/sensors/{sensor}/vib", json.dumps(payload), qos=1)
            reading += 1
            self._stop.wait(max(0.0, started + reading / RATE_HZ - time.monotonic()))


def clean_up_broker(args: Settings, protocol: str, config: AgentConfig) -> list[str]:
    """Remove what the stopped daemon leaves on a broker: its retained topics and its
    persistent session. Returns the retained topics cleared.

    The daemon keeps ``P/status``, ``P/health`` and ``P/models/NAME`` retained, and in
    at_least_once delivery a persistent session under its client id (the broker keeps
    queueing readings for it). Connecting under that client id with a clean start (MQTT 5
    session expiry 0; MQTT 3.1.1 clean session) ends that session when this connection
    closes. Must run after the daemon stopped: two clients with one id take over each other.
    """
    prefix = config.topic_prefix
    topics = {
        f"{prefix}/status",
        f"{prefix}/health",
        *(f"{prefix}/models/{name}" for name in config.models),
    }
    subscribed = threading.Event()
    last_message = [time.monotonic()]
    lock = threading.Lock()

    def on_message(client: paho.Client, userdata: Any, message: paho.MQTTMessage) -> None:
        with lock:
            last_message[0] = time.monotonic()
            if message.retain and message.payload:
                topics.add(message.topic)  # any other retained topic under P

    client = mqtt_client(protocol, config.mqtt.client_id, clean=True)
    client.on_message = on_message
    client.on_subscribe = lambda *_: subscribed.set()
    if protocol == "5":
        # clean_start and no Session Expiry Interval (that is 0): the old session is
        # discarded now and this one ends with the connection.
        client.connect(args.host, args.port, clean_start=True)
    else:
        client.connect(args.host, args.port)
    client.loop_start()
    try:
        client.subscribe(f"{prefix}/#", qos=1)
        subscribed.wait(5)
        # The broker sends the retained messages right after the SUBACK: wait until they
        # stop coming (a short quiet spell), at most 2 s.
        deadline = time.monotonic() + 2
        while time.monotonic() < deadline:
            with lock:
                quiet = time.monotonic() - last_message[0] > 0.3
            if quiet:
                break
            time.sleep(0.05)
        with lock:
            cleared = sorted(topics)
        infos = [client.publish(topic, b"", qos=1, retain=True) for topic in cleared]
        for info in infos:
            info.wait_for_publish(timeout=5)
    finally:
        client.disconnect()
        client.loop_stop()
    return cleared


# ---------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """Run the demo until Ctrl-C (or SIGTERM); 0 when everything stopped cleanly."""
    stop = StopRequest()
    stop.install()
    give_back_terminal = take_terminal()
    try:
        return run(parse_args(argv), stop)
    finally:
        give_back_terminal()


def run(args: Settings, stop: StopRequest) -> int:
    """The demo, from the model to the clean-up."""
    args.run_dir.mkdir(parents=True, exist_ok=True)
    model = args.run_dir / "models" / "vibration.onnx"
    if not model.exists():
        build_vibration_scorer(model, samples=SAMPLES)
        say(f"generated the demo model {shown(model)}")
    broker = start_broker(
        args.host,
        args.port,
        args.run_dir,
        args.broker,
        who="the demo",
        existing_note="; the demo removes its retained topics and session from it when it stops",
    )
    try:
        config_file = write_config(args, broker.protocol)
        config = load_config(config_file)
        log_path = args.run_dir / "agent.log"
        if not broker.started_here:
            # What a run that was killed left (its retained model state would be printed as
            # if current, its session would replay old readings before reading 0). Failing
            # here is not fatal: the clean-up at the end reports it.
            with contextlib.suppress(OSError, RuntimeError, ValueError):
                clean_up_broker(args, broker.protocol, config)
        agent = start_agent(config_file, log_path)
        say(f"edge-agent started (pid {agent.pid}); its log: {shown(log_path)}")
        agent_code = 1
        try:
            serve(
                args, broker, prefix=config.topic_prefix, agent=agent, stop=stop, log_path=log_path
            )
        finally:
            # Whatever went wrong above (even the terminal gone), the daemon is stopped and
            # the broker is left as it was found.
            agent_code = stop_agent(agent, log_path)
            cleaned = broker.started_here or clean_up(args, broker.protocol, config)
        return 0 if agent_code == 0 and cleaned else 1
    finally:
        broker.stop()
        if broker.started_here:
            say(f"stopped the {broker.kind} broker (it kept nothing)")


def serve(
    args: Settings,
    broker: Broker,
    *,
    prefix: str,
    agent: subprocess.Popen[bytes],
    stop: StopRequest,
    log_path: Path,
) -> None:
    """Print results until a stop is asked for or the daemon exits; the sensors start once
    the daemon answers."""
    printer = ResultsPrinter(args, broker.protocol, prefix)
    try:
        sensors = Sensors(args, broker.protocol)
        try:
            say("waiting for edge-agent to load its model and subscribe...")
            if sensors.wait_until_served(printer, agent, stop, log_path):
                sensors.start()
                say("edge-agent is serving; simulated sensors publishing. Ctrl-C to stop\n")
                while not stop.wait(0.2) and agent.poll() is None:
                    pass
            if stop.is_set():
                say(f"\n{stop.signal_name}: stopping the sensors, then edge-agent")
        finally:
            sensors.stop()
    finally:
        printer.close()


def clean_up(args: Settings, protocol: str, config: AgentConfig) -> bool:
    """``clean_up_broker``, saying what it removed; False when it could not."""
    try:
        cleared = clean_up_broker(args, protocol, config)
    except (OSError, RuntimeError, ValueError) as exc:  # paho: refused, not connected
        say(
            f"could not remove the demo's retained topics and session from "
            f"{args.host}:{args.port}: {exc}"
        )
        return False
    say(
        f"removed from {args.host}:{args.port}: the retained {', '.join(cleared)} and the "
        f"MQTT session of client id {config.mqtt.client_id}"
    )
    return True


if __name__ == "__main__":
    sys.exit(main())
