"""MQTT 5 request/response, shared subscriptions across daemons, and MQTT 3.1.1."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from tests.broker import MosquittoBroker, Recorder, publisher
from tests.conftest import AgentProcess, base_config
from tests.onnx_builders import build_linear

pytestmark = pytest.mark.broker

AgentFactory = Callable[[dict[str, Any]], AgentProcess]


def linear_config(broker: MosquittoBroker, tmp_path: Path, device: str = "dev1",
                  **pipeline_input: Any) -> dict[str, Any]:
    if not (tmp_path / "models" / "lin.onnx").exists():
        build_linear(tmp_path / "models" / "lin.onnx")
    return base_config(broker, tmp_path, device_id=device, models={"lin": {}}, pipelines={
        "p": {"model": "lin", "input": {"topic": "in/+", **pipeline_input},
              "output": {"topic": "out/{1}"}}}, state_dir=str(tmp_path / f"state-{device}"))


def test_request_response_echoes_correlation_data(
        broker: MosquittoBroker, tmp_path: Path, agent_factory: AgentFactory) -> None:
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
    assert json.loads(reply.payload)["outputs"] == json.loads(by_topic["out/a"].payload)[
        "outputs"]


def test_two_daemons_share_one_stream(broker: MosquittoBroker, tmp_path: Path,
                                      agent_factory: AgentFactory,
                                      recorder: Callable[..., Recorder]) -> None:
    """With input.shared_group two daemons split 2,000 readings: none lost, none twice,
    and both do part of the work."""
    first = agent_factory(linear_config(broker, tmp_path, "dev1", shared_group="workers",
                                        field="x"))
    second = agent_factory(linear_config(broker, tmp_path, "dev2", shared_group="workers",
                                         field="x"))
    first.wait_for_event("agent_serving")
    second.wait_for_event("agent_serving")
    first.wait_for_event("mqtt_subscribed")
    second.wait_for_event("mqtt_subscribed")
    rec = recorder("out/#")
    client = publisher(broker)
    for i in range(2000):
        client.publish("in/s", json.dumps({"id": i, "x": [i, 1, 2, 3]}), qos=1)
    rec.wait_for(lambda ms: len(ms) >= 2000, timeout_s=60)
    client.loop_stop()
    results = [json.loads(m.payload) for m in rec.messages]
    ids = sorted(r["id"] for r in results)
    assert ids == list(range(2000)), "a reading was lost or processed twice"
    events = [first.log_events(), second.log_events()]
    assert all(any(e.get("event") == "mqtt_subscribed" and
                   "$share/workers/in/+" in e.get("filters", []) for e in log) for log in events)


def test_mqtt_311(broker: MosquittoBroker, tmp_path: Path, agent_factory: AgentFactory,
                  recorder: Callable[..., Recorder]) -> None:
    """mqtt.protocol 3.1.1 connects, serves, and its last will works the same."""
    config = linear_config(broker, tmp_path)
    config["mqtt"]["protocol"] = "3.1.1"
    agent = agent_factory(config)
    agent.wait_for_event("agent_serving")
    rec = recorder("out/#", "edge/dev1/status")
    client = publisher(broker, protocol=MQTTProtocolVersion.MQTTv311)
    client.publish("in/a", b"[1, 2, 3, 4]", qos=1)
    rec.wait_for(lambda ms: any(m.topic == "out/a" for m in ms))
    client.loop_stop()
    agent.kill()
    rec.wait_for(lambda ms: any(m.payload == b"offline" for m in ms))
