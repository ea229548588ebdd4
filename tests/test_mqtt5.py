"""MQTT 5 request/response, shared subscriptions across daemons, and MQTT 3.1.1."""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from tests.broker import MosquittoBroker, Received, Recorder, publisher
from tests.conftest import AgentProcess, base_config
from tests.onnx_builders import build_linear

pytestmark = pytest.mark.broker

AgentFactory = Callable[[dict[str, Any]], AgentProcess]


def linear_config(
    broker: MosquittoBroker, tmp_path: Path, device: str = "dev1", **pipeline_input: Any
) -> dict[str, Any]:
    if not (tmp_path / "models" / "lin.onnx").exists():
        build_linear(tmp_path / "models" / "lin.onnx")
    return base_config(
        broker,
        tmp_path,
        device_id=device,
        models={"lin": {}},
        pipelines={
            "p": {
                "model": "lin",
                "input": {"topic": "in/+", **pipeline_input},
                "output": {"topic": "out/{1}"},
            }
        },
        state_dir=str(tmp_path / f"state-{device}"),
    )


def test_request_response_echoes_correlation_data(
    broker: MosquittoBroker, tmp_path: Path, agent_factory: AgentFactory
) -> None:
    """A reading with a response topic and correlation data also gets its result there,
    with the correlation data echoed; the normal result topic still gets it too."""
    agent = agent_factory(linear_config(broker, tmp_path))
    agent.wait_for_event("agent_serving")
    replies: list[paho.MQTTMessage] = []
    got = threading.Event()

    def on_message(client: paho.Client, userdata: Any, message: paho.MQTTMessage) -> None:
        replies.append(message)
        got.set()

    client = paho.Client(CallbackAPIVersion.VERSION2, protocol=MQTTProtocolVersion.MQTTv5)
    client.on_message = on_message
    client.connect(broker.host, broker.port)
    client.subscribe([("replies/me", 1), ("out/#", 1)])
    client.loop_start()
    try:
        properties = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        properties.ResponseTopic = "replies/me"
        properties.CorrelationData = b"req-42"
        client.publish("in/a", b"[1, 2, 3, 4]", qos=1, properties=properties).wait_for_publish()
        deadline = 10.0
        while len(replies) < 2 and got.wait(deadline):
            got.clear()
    finally:
        client.disconnect()
        client.loop_stop()
    by_topic = {m.topic: m for m in replies}
    assert set(by_topic) == {"replies/me", "out/a"}
    reply = by_topic["replies/me"]
    assert reply.properties is not None
    assert getattr(reply.properties, "CorrelationData", None) == b"req-42"
    assert json.loads(reply.payload)["outputs"] == json.loads(by_topic["out/a"].payload)["outputs"]


def latest_health(messages: list[Received], device: str) -> dict[str, Any] | None:
    """The last health report of ``device`` among ``messages``."""
    reports = [m for m in messages if m.topic == f"edge/{device}/health"]
    return json.loads(reports[-1].payload) if reports else None


def test_two_daemons_share_one_stream(
    broker: MosquittoBroker,
    tmp_path: Path,
    agent_factory: AgentFactory,
    recorder: Callable[..., Recorder],
) -> None:
    """With input.shared_group two daemons split 2,000 readings: every reading is answered
    exactly once across the two, and each daemon does part of the work: its own health
    report counts as processed exactly the results it published, more than 0."""
    devices = ("dev1", "dev2")
    agents = []
    for device in devices:
        config = linear_config(broker, tmp_path, device, shared_group="workers", field="x")
        # Each daemon's results go to a topic of its own, to tell who answered what.
        config["pipelines"]["p"]["output"]["topic"] = "out/{device_id}/{1}"
        config["health"] = {"interval_s": 0.5}
        agents.append(agent_factory(config))
    for agent in agents:
        agent.wait_for_event("agent_serving")
        agent.wait_for_event("mqtt_subscribed")
    rec = recorder("out/#", "edge/+/health")
    client = publisher(broker)
    total = 2000
    for i in range(total):
        client.publish("in/s", json.dumps({"id": i, "x": [i, 1, 2, 3]}), qos=1)

    def answered(messages: list[Received]) -> dict[str, list[int]]:
        by_device: dict[str, list[int]] = {device: [] for device in devices}
        for m in messages:
            if m.topic.startswith("out/"):
                by_device[m.topic.split("/")[1]].append(json.loads(m.payload)["id"])
        return by_device

    def settled(messages: list[Received]) -> bool:
        """Every reading answered, and each daemon's health caught up with its results."""
        results = [m.topic.split("/")[1] for m in messages if m.topic.startswith("out/")]
        if len(results) < total:
            return False
        for device in devices:
            health = latest_health(messages, device)
            if health is None:
                return False
            counters = health["pipelines"]["p"]
            if (
                counters["processed"] != results.count(device)
                or counters["received"] != counters["processed"]
            ):
                return False
        return True

    try:
        rec.wait_for(settled, timeout_s=60)
    except TimeoutError:
        pass  # the asserts below say what is missing
    finally:
        client.loop_stop()
    messages = list(rec.messages)
    ids = answered(messages)
    assert sorted(ids["dev1"] + ids["dev2"]) == list(range(total)), (
        f"a reading was lost or answered twice: {len(ids['dev1'])} + {len(ids['dev2'])} "
        f"results for {total} readings"
    )
    for device in devices:
        health = latest_health(messages, device)
        assert health is not None, f"{device} published no health report"
        processed = health["pipelines"]["p"]["processed"]
        assert processed == len(ids[device]), (
            f"{device}'s health counts {processed} processed, it published {len(ids[device])}"
        )
        assert processed > 0, f"{device} did none of the work"


def connect_protocols(broker: MosquittoBroker, client_id: str) -> list[str]:
    """The protocol of each connect of ``client_id`` that the broker logged: mosquitto writes
    "New client connected from HOST:PORT as ID (p2, c1, k5)", p2 = MQTT 3.1.1, p5 = MQTT 5."""
    pattern = re.compile(rf"New client connected from \S+ as {re.escape(client_id)} \((p\d+),")
    return pattern.findall(broker.log_file.read_text())


def test_mqtt_311(
    broker: MosquittoBroker,
    tmp_path: Path,
    agent_factory: AgentFactory,
    recorder: Callable[..., Recorder],
) -> None:
    """mqtt.protocol 3.1.1 connects with MQTT 3.1.1 on the wire (as the broker logs it),
    serves, and its last will works the same."""
    config = linear_config(broker, tmp_path)
    config["mqtt"]["protocol"] = "3.1.1"
    agent = agent_factory(config)
    agent.wait_for_event("agent_serving")
    deadline = time.monotonic() + 10
    while not connect_protocols(broker, "edge-agent-dev1") and time.monotonic() < deadline:
        time.sleep(0.05)
    protocols = connect_protocols(broker, "edge-agent-dev1")
    assert protocols, f"no connect of edge-agent-dev1 logged:\n{broker.log_file.read_text()}"
    assert set(protocols) == {"p2"}, f"connected as {protocols}, p2 is MQTT 3.1.1"
    rec = recorder("out/#", "edge/dev1/status")
    client = publisher(broker, protocol=MQTTProtocolVersion.MQTTv311)
    client.publish("in/a", b"[1, 2, 3, 4]", qos=1)
    rec.wait_for(lambda ms: any(m.topic == "out/a" for m in ms))
    client.loop_stop()
    agent.kill()
    rec.wait_for(lambda ms: any(m.payload == b"offline" for m in ms))


def test_two_daemons_with_one_device_id_are_told(
    broker: MosquittoBroker, tmp_path: Path, agent_factory: AgentFactory
) -> None:
    """Two devices installed with one device_id kick each other off the broker. Mosquitto
    2.0.11 closes the older connection without a reason, so what the daemon sees is
    connections that end within seconds of being accepted: it says so at error level, naming
    the client id, instead of reconnecting quietly for ever."""
    first = agent_factory(linear_config(broker, tmp_path / "a", device="twin"))
    first.wait_for_event("agent_serving")
    second = agent_factory(linear_config(broker, tmp_path / "b", device="twin"))
    second.wait_for_event("agent_serving")
    deadline = time.monotonic() + 60
    events: list[dict[str, Any]] = []
    while not events and time.monotonic() < deadline:
        events = [
            event
            for agent in (first, second)
            for event in agent.log_events()
            if event.get("event") in ("mqtt_connection_keeps_dropping", "mqtt_session_taken_over")
        ]
        time.sleep(0.2)
    assert events, "neither daemon said its connections keep being closed"
    assert events[0]["level"] == "error"
    assert events[0]["client_id"] == "edge-agent-twin"
    assert "device_id" in events[0]["action"]
