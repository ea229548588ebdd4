"""`edge-agent status`: the fleet table (pure formatting, fake clock), and the command against
a real broker holding a stopped daemon's, a stale device's and a live device's retained
topics, once and with --watch."""

from __future__ import annotations

import itertools
import json
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from agent.cli.status import DeviceView, FleetCollector, in_group, judge, report, table
from tests.broker import MosquittoBroker, Recorder, paced_stream, publisher
from tests.conftest import AgentProcess, base_config
from tests.onnx_builders import build_linear
from tests.output_lines import OutputLines

AgentFactory = Callable[..., AgentProcess]
COLUMNS = (
    "DEVICE",
    "ONLINE",
    "MODELS",
    "READINGS/S",
    "P50 MS",
    "P99 MS",
    "TEMP C",
    "WARN",
    "OUTBOX",
    "LAST SEEN",
)
HEADING = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC  ")
DEADLINE_S = 30.0  # generous: the conditions below are waited for, never timed


def rows(text: str) -> dict[str, dict[str, str]]:
    """The table's cells by device and column, cut at the header's column starts (cells
    such as ``lin:last READY:...`` hold spaces)."""
    lines = [line for line in text.splitlines() if line.strip()]
    header = next(i for i, line in enumerate(lines) if line.startswith("DEVICE "))
    starts = [lines[header].index(name) for name in COLUMNS]
    cells = {}
    for line in lines[header + 1 :]:
        cut = [
            line[start:end].strip()
            for start, end in zip(starts, [*starts[1:], len(line) + 1], strict=True)
        ]
        cells[cut[0]] = dict(zip(COLUMNS, cut, strict=True))
    return cells


def health(ts: float, throughput: float = 123.4, **extra: Any) -> dict[str, Any]:
    """A health document with one busy pipeline: figures that must not pass for current."""
    return {
        "ts": ts,
        "pipelines": {"p": {"throughput": throughput, "latency_ms": {"p50": 1.5, "p99": 9.5}}},
        "temperatures_c": {"cpu": 55.0},
        **extra,
    }


# -- the table, with a fake clock -----------------------------------------------------------


def test_table_shows_the_outbox_backlog_and_drops() -> None:
    """A device with stored results shows how many, and drops when there were any."""
    now = 1_000.0
    devices = {
        "gw-a": DeviceView(
            "gw-a",
            "online",
            {
                "ts": now - 5,
                "pipelines": {},
                "delivery": {"outbox": {"depth": 120, "dropped": 3, "expired": 0}},
            },
        ),
        "gw-b": DeviceView(
            "gw-b",
            "offline",
            {
                "ts": now - 400,
                "pipelines": {},
                "delivery": {"outbox": {"depth": 0, "dropped": 0, "expired": 0}},
            },
        ),
    }
    lines = table(devices, now=now).splitlines()
    assert "OUTBOX" in lines[0]
    assert "120 (3 dropped)" in lines[1]
    assert lines[1].startswith("gw-a")
    assert lines[2].split()[:2] == ["gw-b", "NO"]
    assert "7m ago" in lines[2]


def test_offline_and_stale_devices_show_no_current_figures() -> None:
    """An offline device, and one that says online but whose health is older than three of
    its intervals, show '-' for throughput, latency and temperature, their models as 'last',
    and the age of the health; a fresh one shows its figures."""
    now = 10_000.0
    model = {"vib": {"state": "READY", "version": "sha256:0123456789abcdef"}}
    devices = {
        "gw-live": DeviceView("gw-live", "online", health(now - 2, interval_s=1), dict(model)),
        "gw-off": DeviceView("gw-off", "offline", health(now - 2), dict(model)),
        "gw-stale": DeviceView("gw-stale", "online", health(now - 3.5, interval_s=1), dict(model)),
    }
    cells = rows(table(devices, now=now))
    assert cells["gw-live"]["ONLINE"] == "yes"
    assert cells["gw-live"]["MODELS"] == "vib:READY:01234567"
    assert (cells["gw-live"]["READINGS/S"], cells["gw-live"]["P99 MS"]) == ("123.4", "9.50")
    assert cells["gw-off"]["ONLINE"] == "NO"
    assert cells["gw-stale"]["ONLINE"] == "STALE"
    for name in ("gw-off", "gw-stale"):
        assert cells[name]["MODELS"] == "vib:last READY:01234567"
        assert [cells[name][c] for c in ("READINGS/S", "P50 MS", "P99 MS", "TEMP C")] == ["-"] * 4
    assert cells["gw-stale"]["LAST SEEN"] == "4s ago"


def test_model_states_are_shown_whole() -> None:
    """LOADING and FAILED read as they are (not cut to five letters), and a model with no
    version yet shows '-' for it."""
    now = 10_000.0
    models: dict[str, dict[str, Any]] = {
        "a": {"state": "LOADING", "version": None},
        "b": {"state": "FAILED", "version": "sha256:fedcba9876543210"},
    }
    cells = rows(table({"gw": DeviceView("gw", "online", health(now - 1), models)}, now=now))
    assert cells["gw"]["MODELS"] == "a:LOADING:-, b:FAILED:fedcba98"


def test_states_and_the_default_interval() -> None:
    """Without interval_s in the health the limit is 3 x 10 s; no status topic is unknown;
    online without any health yet is online; the JSON report carries state and age."""
    now = 50_000.0
    assert judge(DeviceView("a", "online", {"ts": now - 29}), now).state == "online"
    assert judge(DeviceView("a", "online", {"ts": now - 31}), now).state == "stale"
    assert (
        judge(DeviceView("a", "online", {"ts": now - 31, "interval_s": 20}), now).state == "online"
    )
    assert judge(DeviceView("a", "online"), now).state == "online"
    assert judge(DeviceView("a", "?", {"ts": now}), now).state == "unknown"
    assert judge(DeviceView("a", "online", {"ts": "yesterday"}), now).state == "unknown"
    document = report(
        {
            "gw": DeviceView("gw", "online", {"ts": now - 40.04}),
            "gw-off": DeviceView("gw-off", "offline"),
        },
        now=now,
    )
    assert document["gw"]["state"] == "stale"
    assert document["gw"]["age_s"] == 40.0
    assert document["gw"]["stale_after_s"] == 30.0
    assert document["gw-off"] == {
        "state": "offline",
        "age_s": None,
        "stale_after_s": 30.0,
        "status": "offline",
        "groups": [],
        "health": None,
        "models": {},
    }


def test_group_filter_needs_the_group_in_the_health() -> None:
    """--group keeps the devices whose health lists the group; one without groups (or
    without health) is in none."""
    devices = {
        "a": DeviceView("a", "online", {"ts": 1, "groups": ["line3", "vib"]}),
        "b": DeviceView("b", "online", {"ts": 1, "groups": ["line4"]}),
        "c": DeviceView("c", "online", {"ts": 1}),
        "d": DeviceView("d", "offline"),
    }
    assert set(in_group(devices, "line3")) == {"a"}
    assert set(in_group(devices, "vib")) == {"a"}
    assert set(in_group(devices, None)) == {"a", "b", "c", "d"}


def test_a_device_whose_topics_are_cleared_disappears() -> None:
    """Emptied retained topics clear what they held; once all are empty the device is gone."""
    collector = FleetCollector("edge")
    client = paho.Client(CallbackAPIVersion.VERSION2)

    def deliver(topic: str, payload: bytes) -> None:
        message = paho.MQTTMessage(topic=topic.encode())
        message.payload = payload
        collector.on_message(client, None, message)

    deliver("edge/gw/status", b"online")
    deliver("edge/gw/health", json.dumps({"ts": 1}).encode())
    deliver("edge/gw/models/vib", json.dumps({"state": "READY"}).encode())
    deliver("edge/gw", b"ignored: too short")
    assert set(collector.snapshot()["gw"].models) == {"vib"}
    deliver("edge/gw/models/vib", b"")
    deliver("edge/gw/health", b"")
    assert collector.snapshot()["gw"].health is None
    deliver("edge/gw/status", b"")
    assert collector.snapshot() == {}


# -- against a broker ----------------------------------------------------------------------


def edge_agent(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agent", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def retain(client: paho.Client, topic: str, payload: bytes | str | dict[str, Any]) -> None:
    """Publish retained and wait for the broker's acknowledgement."""
    data = json.dumps(payload) if isinstance(payload, dict) else payload
    client.publish(topic, data, qos=1, retain=True).wait_for_publish(timeout=10)


@pytest.mark.broker
def test_status_shows_a_stopped_daemon_offline_and_a_silent_one_stale(
    broker: MosquittoBroker,
    tmp_path: Path,
    agent_factory: AgentFactory,
    recorder: Callable[..., Recorder],
) -> None:
    """A daemon stopped cleanly (it publishes offline) and a device whose retained status
    says online but whose health is two hours old: both without current figures, in the table
    and in --json; --group picks devices by the groups in their health."""
    build_linear(tmp_path / "models" / "lin.onnx")
    agent = agent_factory(
        base_config(
            broker,
            tmp_path,
            device_id="gw-stop",
            groups=["line3"],
            health={"interval_s": 0.5},
            models={"lin": {}},
            pipelines={
                "p": {"model": "lin", "input": {"topic": "in/+"}, "output": {"topic": "out/{1}"}}
            },
        )
    )
    agent.wait_for_event("agent_serving")
    rec = recorder("edge/gw-stop/health", "edge/gw-stop/status")
    # The stream runs until the daemon has gone (the autouse fixture stops it at the end):
    # the daemon's last health reports a throughput.
    paced_stream(broker, "in/a", [b"[1, 2, 3, 4]"] * 100_000, rate=50)
    rec.wait_for(
        lambda ms: any(
            json.loads(m.payload)["pipelines"]["p"]["throughput"] > 0
            for m in ms
            if m.topic.endswith("/health")
        ),
        DEADLINE_S,
    )
    assert agent.terminate()[0] == 0
    rec.wait_for_payload("edge/gw-stop/status", b"offline", DEADLINE_S)
    now = time.time()
    client = publisher(broker)
    retain(client, "edge/gw-old/status", "online")
    retain(client, "edge/gw-old/health", health(now - 7200, interval_s=10, groups=["line4"]))
    retain(client, "edge/gw-old/models/vib", {"state": "READY", "version": "sha256:" + "ab" * 32})
    retain(client, "edge/gw-nogroup/status", "online")
    # A clock ahead of ours: never stale, shown as just seen.
    retain(client, "edge/gw-nogroup/health", health(now + 3600, throughput=7.0))

    done = edge_agent("status", "--port", str(broker.port), "--wait", "1")
    assert done.returncode == 0, done.stderr
    cells = rows(done.stdout)
    assert set(cells) == {"gw-stop", "gw-old", "gw-nogroup"}
    assert cells["gw-stop"]["ONLINE"] == "NO"
    assert cells["gw-stop"]["MODELS"].startswith("lin:last READY:")
    assert cells["gw-old"]["ONLINE"] == "STALE"
    assert cells["gw-old"]["LAST SEEN"] == "2.0h ago"
    assert cells["gw-nogroup"]["ONLINE"] == "yes"
    for name in ("gw-stop", "gw-old"):
        assert [cells[name][c] for c in ("READINGS/S", "P50 MS", "P99 MS", "TEMP C")] == [
            "-"
        ] * 4, done.stdout
    assert cells["gw-nogroup"]["READINGS/S"] == "7.0"
    assert "123.4" not in done.stdout

    done = edge_agent("status", "--port", str(broker.port), "--wait", "1", "--json")
    assert done.returncode == 0, done.stderr
    document = json.loads(done.stdout)
    assert document["gw-stop"]["state"] == "offline"
    assert document["gw-stop"]["status"] == "offline"
    # The daemon's health names its groups and interval; its last one had a throughput.
    assert document["gw-stop"]["health"]["groups"] == ["line3"]
    assert document["gw-stop"]["health"]["interval_s"] == 0.5
    assert document["gw-stop"]["health"]["pipelines"]["p"]["throughput"] > 0
    assert document["gw-stop"]["age_s"] >= 0
    assert document["gw-old"]["state"] == "stale"
    assert document["gw-old"]["age_s"] >= 7200
    assert document["gw-nogroup"]["state"] == "online"

    done = edge_agent("status", "--port", str(broker.port), "--wait", "1", "--group", "line3")
    assert set(rows(done.stdout)) == {"gw-stop"}
    done = edge_agent(
        "status", "--port", str(broker.port), "--wait", "1", "--group", "line4", "--json"
    )
    assert set(json.loads(done.stdout)) == {"gw-old"}
    done = edge_agent("status", "--port", str(broker.port), "--wait", "1", "--group", "none")
    assert done.returncode == 0
    assert done.stdout.startswith("no devices in group none under edge/")


class Watcher:
    """``edge-agent status --watch`` with stdout a pipe, its tables collected as they come."""

    def __init__(self, broker: MosquittoBroker, *args: str) -> None:
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "agent",
                "status",
                "--watch",
                "--port",
                str(broker.port),
                "--wait",
                "0.2",
                *args,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines = OutputLines(self.process, "watch-reader")

    def frames(self) -> list[str]:
        """The complete tables so far (the last one may still be arriving: left out)."""
        lines = self.lines.lines()
        starts = [i for i, line in enumerate(lines) if HEADING.match(line)]
        return ["\n".join(lines[a:b]) for a, b in itertools.pairwise(starts)]

    def wait_for(self, predicate: Callable[[str], bool], after: int = 0) -> int:
        """Wait for a table (from the ``after``-th on) that satisfies ``predicate``; return
        how many tables had come by then."""
        deadline = time.monotonic() + DEADLINE_S
        while time.monotonic() < deadline:
            frames = self.frames()
            if any(predicate(frame) for frame in frames[after:]):
                return len(frames)
            if self.process.poll() is not None:
                break
            self.lines.wait(0.2)
        raise AssertionError(f"no such table; output:\n{chr(10).join(self.lines.lines()[-40:])}")

    def stop(self, signum: signal.Signals) -> tuple[int, str]:
        """Send ``signum``; return the exit code and stderr."""
        self.process.send_signal(signum)
        _, err = self.process.communicate(timeout=DEADLINE_S)
        self.lines.join(timeout_s=DEADLINE_S)
        return self.process.returncode, err

    def close(self) -> None:
        """Make sure the process is gone."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.communicate()


@pytest.fixture
def watcher(broker: MosquittoBroker) -> Iterator[Callable[..., Watcher]]:
    """Start ``status --watch`` processes on the test broker; killed at teardown if needed."""
    started: list[Watcher] = []

    def start(*args: str) -> Watcher:
        started.append(Watcher(broker, *args))
        return started[-1]

    yield start
    for instance in started:
        instance.close()


def row(frame: str, device: str) -> dict[str, str] | None:
    """The device's cells in one ``--watch`` table, None when it is not listed."""
    if "DEVICE " not in frame:
        return None
    return rows(frame).get(device)


@pytest.mark.broker
def test_watch_marks_a_silent_device_stale_and_drops_a_cleared_one(
    broker: MosquittoBroker, watcher: Callable[..., Watcher]
) -> None:
    """With stdout a pipe, --watch prints a timestamped table every second from one
    subscription: a device that stops sending health (interval 1 s) turns STALE with no
    new message, a device whose retained topics are cleared disappears, and SIGINT ends it
    with exit 0 and no traceback."""
    client = publisher(broker)
    retain(client, "edge/gw-keep/status", "offline")
    watch = watcher()
    watch.wait_for(lambda frame: (row(frame, "gw-keep") or {}).get("ONLINE") == "NO")
    # Live health (every 0.3 s, interval_s 1) until the watch shows the device online and
    # fresh, then silence.
    silence = threading.Event()

    def beat() -> None:
        while not silence.is_set():
            retain(client, "edge/gw-w/health", health(time.time(), interval_s=1))
            silence.wait(0.3)

    heart = threading.Thread(target=beat, name="heartbeat")
    heart.start()
    try:
        retain(client, "edge/gw-w/status", "online")
        seen = watch.wait_for(lambda frame: (row(frame, "gw-w") or {}).get("READINGS/S") == "123.4")
    finally:
        silence.set()
        heart.join(timeout=DEADLINE_S)
    stale_at = watch.wait_for(
        lambda frame: (row(frame, "gw-w") or {}).get("ONLINE") == "STALE", after=seen
    )
    stale = next(
        frame
        for frame in watch.frames()[seen:]
        if (row(frame, "gw-w") or {}).get("ONLINE") == "STALE"
    )
    assert (row(stale, "gw-w") or {}).get("READINGS/S") == "-"
    assert stale_at >= 3  # several tables came, one after another
    for topic in ("edge/gw-w/status", "edge/gw-w/health"):
        retain(client, topic, b"")
    watch.wait_for(lambda frame: "gw-w" not in frame and "gw-keep" in frame, after=stale_at)
    code, err = watch.stop(signal.SIGINT)
    assert code == 0, err
    assert "Traceback" not in err


@pytest.mark.broker
def test_watch_follows_a_daemon_and_ends_on_sigterm(
    broker: MosquittoBroker,
    tmp_path: Path,
    agent_factory: AgentFactory,
    watcher: Callable[..., Watcher],
) -> None:
    """--watch --group shows a running daemon of the group online, then offline once it
    stops; SIGTERM ends the watch with exit 0. A device outside the group is not shown."""
    client = publisher(broker)
    retain(client, "edge/gw-other/status", "online")
    retain(client, "edge/gw-other/health", health(time.time(), groups=["elsewhere"]))
    watch = watcher("--group", "line3")
    agent = agent_factory(
        base_config(
            broker, tmp_path, device_id="gw-d", groups=["line3"], health={"interval_s": 0.5}
        )
    )
    online = watch.wait_for(lambda frame: (row(frame, "gw-d") or {}).get("ONLINE") == "yes")
    assert agent.terminate()[0] == 0
    watch.wait_for(lambda frame: (row(frame, "gw-d") or {}).get("ONLINE") == "NO", after=online)
    assert not any("gw-other" in frame for frame in watch.frames())
    code, err = watch.stop(signal.SIGTERM)
    assert code == 0, err
    assert "Traceback" not in err
