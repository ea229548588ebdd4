"""The daemon's life against a real broker: status, last will, restarts, signals."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.broker import MosquittoBroker, Recorder, publisher
from tests.conftest import AgentProcess, base_config
from tests.onnx_builders import build_linear

pytestmark = pytest.mark.broker

STATUS = "edge/dev1/status"


def test_publishes_retained_online(
    broker: MosquittoBroker,
    tmp_path: Path,
    agent_factory: Callable[[dict[str, Any]], AgentProcess],
    recorder: Callable[..., Recorder],
) -> None:
    """After start-up P/status holds a retained 'online' that a late subscriber still gets."""
    agent = agent_factory(base_config(broker, tmp_path))
    agent.wait_for_event("mqtt_connected")
    first = recorder(STATUS)
    first.wait_for_payload(STATUS, b"online")
    late = recorder(STATUS)
    late.wait_for(lambda ms: any(m.payload == b"online" and m.retain for m in ms))


def test_sigkill_delivers_offline_last_will(
    broker: MosquittoBroker,
    tmp_path: Path,
    agent_factory: Callable[[dict[str, Any]], AgentProcess],
    recorder: Callable[..., Recorder],
) -> None:
    """SIGKILL: the broker publishes the retained last will, 'offline'."""
    agent = agent_factory(base_config(broker, tmp_path))
    watcher = recorder(STATUS)
    watcher.wait_for_payload(STATUS, b"online")
    agent.kill()
    watcher.wait_for_payload(STATUS, b"offline", after=1)
    late = recorder(STATUS)
    late.wait_for(lambda ms: any(m.payload == b"offline" and m.retain for m in ms))


def test_sigterm_exits_zero_within_5s_and_says_offline(
    broker: MosquittoBroker,
    tmp_path: Path,
    agent_factory: Callable[[dict[str, Any]], AgentProcess],
    recorder: Callable[..., Recorder],
) -> None:
    """SIGTERM: 'offline' is published, the process exits 0, in under 5 seconds."""
    agent = agent_factory(base_config(broker, tmp_path))
    watcher = recorder(STATUS)
    watcher.wait_for_payload(STATUS, b"online")
    code, took = agent.terminate()
    assert code == 0
    assert took < 5.0
    watcher.wait_for_payload(STATUS, b"offline", after=1)
    assert agent.wait_for_event("agent_stopped")


def test_online_republished_after_broker_restart(
    broker: MosquittoBroker, tmp_path: Path, agent_factory: Callable[[dict[str, Any]], AgentProcess]
) -> None:
    """When the broker restarts (losing its retained messages) the daemon reconnects and
    publishes 'online' again."""
    agent = agent_factory(base_config(broker, tmp_path))
    agent.wait_for_event("mqtt_connected")
    broker.restart(down_s=1.0)
    watcher = Recorder(broker, [STATUS]).start()
    try:
        watcher.wait_for(lambda ms: any(m.payload == b"online" for m in ms), timeout_s=15)
    finally:
        watcher.stop()
    assert agent.process.poll() is None


def test_starts_while_broker_is_down_and_connects_later(
    broker: MosquittoBroker, tmp_path: Path, agent_factory: Callable[[dict[str, Any]], AgentProcess]
) -> None:
    """No broker at start-up is not fatal: the daemon retries with backoff and connects."""
    broker.stop()
    agent = agent_factory(base_config(broker, tmp_path))
    agent.wait_for_event("mqtt_connect_failed")
    assert agent.process.poll() is None
    broker.start()
    agent.wait_for_event("mqtt_connected", timeout_s=15)
    code, took = agent.terminate()
    assert code == 0
    assert took < 5.0


def test_sigterm_while_broker_down_still_exits_quickly(
    broker: MosquittoBroker, tmp_path: Path, agent_factory: Callable[[dict[str, Any]], AgentProcess]
) -> None:
    """Stopping never waits on a broker that is not there."""
    agent = agent_factory(base_config(broker, tmp_path))
    agent.wait_for_event("mqtt_connected")
    broker.stop()
    agent.wait_for_event("mqtt_disconnected")
    code, took = agent.terminate()
    assert code == 0
    assert took < 5.0


def test_log_is_json_lines_with_paho_routed(
    broker: MosquittoBroker, tmp_path: Path, agent_factory: Callable[[dict[str, Any]], AgentProcess]
) -> None:
    """Not on a terminal, every log line is a JSON object; paho's own log lines included."""
    agent = agent_factory(base_config(broker, tmp_path))
    agent.wait_for_event("mqtt_connected")
    agent.terminate()
    events = agent.log_events()
    assert events
    assert all(e.get("event") != "<not json>" for e in events), events
    assert any(e.get("logger", "").startswith("paho") for e in events)
    assert all("timestamp" in e and "level" in e for e in events)


def test_model_states_survive_a_broker_restart(
    broker: MosquittoBroker, tmp_path: Path, agent_factory: Callable[[dict[str, Any]], AgentProcess]
) -> None:
    """A broker restarted without persistence forgets retained messages; the daemon re-sends
    the retained model state on reconnect, and its pipeline serves again."""
    build_linear(tmp_path / "models" / "lin.onnx")
    config = base_config(
        broker,
        tmp_path,
        models={"lin": {}},
        pipelines={
            "p": {"model": "lin", "input": {"topic": "in/+"}, "output": {"topic": "out/{1}"}}
        },
    )
    agent = agent_factory(config)
    agent.wait_for_event("agent_serving")
    broker.restart(down_s=0.5)
    watcher = Recorder(broker, ["edge/dev1/models/lin", "out/#"]).start()
    try:
        watcher.wait_for(
            lambda ms: any(json.loads(m.payload)["state"] == "READY" for m in ms), timeout_s=15
        )
        late = Recorder(broker, ["edge/dev1/models/lin"]).start()
        late.wait_for(lambda ms: any(m.retain for m in ms))
        late.stop()
        client = publisher(broker)
        # The daemon may still be re-subscribing: publish until a result comes back.
        deadline = time.monotonic() + 10
        while not watcher.on("out/a") and time.monotonic() < deadline:
            client.publish("in/a", b"[1, 2, 3, 4]", qos=1)
            time.sleep(0.2)
        client.loop_stop()
        assert watcher.on("out/a")
    finally:
        watcher.stop()
    assert agent.process.poll() is None


def test_two_daemons_cannot_share_a_state_dir(
    broker: MosquittoBroker, tmp_path: Path, agent_factory: Callable[..., AgentProcess]
) -> None:
    """The second daemon on one state_dir exits 1 naming the folder and the first's pid."""
    first = agent_factory(base_config(broker, tmp_path, "dev1"))
    first.wait_for_event("agent_serving")
    second = agent_factory(base_config(broker, tmp_path, "dev2"))
    assert second.process.wait(timeout=20) == 1
    failed = second.wait_for_event("agent_failed")
    assert f"is in use by another edge-agent (pid {first.process.pid})" in failed["error"]


def test_a_normal_day_logs_no_warning_or_error(
    broker: MosquittoBroker,
    tmp_path: Path,
    agent_factory: Callable[[dict[str, Any]], AgentProcess],
    recorder: Callable[..., Recorder],
) -> None:
    """Error means an operator must act, warning that something is off: a default start
    (updates not configured), serving readings, a health report and a clean stop are
    none of those, so they log at info and below only."""
    build_linear(tmp_path / "models" / "lin.onnx")
    agent = agent_factory(
        base_config(
            broker,
            tmp_path,
            models={"lin": {}},
            health={"interval_s": 1},
            pipelines={
                "p": {"model": "lin", "input": {"topic": "in/+"}, "output": {"topic": "out/{1}"}}
            },
        )
    )
    agent.wait_for_event("agent_serving")
    seen = recorder("out/#", "edge/dev1/health")
    client = publisher(broker)
    try:
        client.publish("in/a", b"[1, 2, 3, 4]", qos=1).wait_for_publish()
    finally:
        client.disconnect()
        client.loop_stop()
    seen.wait_for(lambda ms: {m.topic for m in ms} >= {"out/a", "edge/dev1/health"})
    code, _ = agent.terminate()
    assert code == 0
    loud = [
        event
        for event in agent.log_events()
        if event.get("level") in ("warning", "error", "critical")
    ]
    assert loud == [], loud
    assert any(
        event.get("event") == "updates_disabled" and event["level"] == "info"
        for event in agent.log_events()
    )
