"""Home Assistant discovery: what the daemon publishes, checked by Home Assistant's own code
(``tests/home_assistant``), and its life on a real broker: retained, re-sent when Home
Assistant comes online, entities removed when their model or pipeline goes."""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from agent.config.loader import load_config
from agent.integrations.home_assistant.discovery import build
from tests.broker import MosquittoBroker, Recorder, publisher
from tests.conftest import AgentProcess, base_config
from tests.home_assistant import check_with_home_assistant
from tests.onnx_builders import build_linear

AgentFactory = Callable[..., AgentProcess]


@dataclass(frozen=True)
class BrokerAddress:
    """Where the config points, for tests that build a config without starting a broker."""

    port: int
    host: str = "127.0.0.1"


TOPIC = "homeassistant/device/edge-agent_dev1/config"

RESULTS = [
    {
        "pipeline": "p",
        "topic": "results/pump1",
        "name": "Pump 1 output",
        "value_template": "{{ value_json.outputs.y[0] }}",
        "state_class": "measurement",
        "expire_after": 600,
    },
    {
        "pipeline": "p",
        "topic": "results/pump1",
        "name": "Pump 1 anomaly",
        "platform": "binary_sensor",
        "value_template": "{{ value_json.outputs.y[1] }}",
        "threshold": 0.5,
        "device_class": "problem",
    },
]


def agent_config(tmp_path: Path, port: int = 1883, **home_assistant: Any) -> dict[str, Any]:
    (tmp_path / "models").mkdir(exist_ok=True)
    build_linear(tmp_path / "models" / "lin.onnx", features=4, outputs=2)
    return base_config(
        BrokerAddress(port),
        tmp_path,
        models={"lin": {"file": "lin.onnx"}},
        pipelines={
            "p": {
                "model": "lin",
                "input": {"topic": "sensors/+/x", "field": "x"},
                "output": {"topic": "results/{1}"},
                "drift": {"reference": "reference.npz"},
            },
            "q": {
                "model": "lin",
                "input": {"topic": "other/+/x", "field": "x"},
                "output": {"topic": "other-results/{1}"},
            },
        },
        health={"interval_s": 0.5},
        home_assistant={"discovery": True, "results": RESULTS, **home_assistant},
    )


HEALTH_SAMPLE = {
    "models": {"lin": {"state": "READY", "degraded": True}},
    "pipelines": {
        "p": {
            "throughput": 12.5,
            "latency_ms": {"p95": 1.25},
            "dropped": 3,
            "errors": 0,
            "drift": {"score": 0.31, "flagged": True, "windows_over": 3, "worst": ["x[2]"]},
        },
        "q": {"throughput": 0.0, "latency_ms": {"p95": None}, "dropped": 0, "errors": 1},
    },
    "cpu_percent": 7.5,
    "rss_mb": 120.5,
    "temperatures_c": {"cpu-thermal": 48.0, "gpu": 51.5},
    "disk_free_mb": 2048.0,
    "uptime_s": 60.0,
    "delivery": {"outbox": {"depth": 4}},
    "warnings": [{"code": "throttled_now", "message": "..."}],
}


def test_home_assistant_accepts_every_entity_and_renders_them(tmp_path: Path) -> None:
    """Every component of a config with models, pipelines and both kinds of result entity
    passes Home Assistant's device schema and its platform's discovery schema, and its
    templates render the values the health and result payloads hold."""
    config_file = tmp_path / "agent.yaml"
    config = agent_config(tmp_path)
    config_file.write_text(yaml.safe_dump(config))
    discovery = build(
        load_config(config_file),
        agent_version="1.2.3",
        hardware="x86_64, 2 cores",
        removed={"pipeline_gone_errors": "sensor"},
    )
    answer = check_with_home_assistant(
        "homeassistant",
        {discovery.topic: json.dumps(discovery.payload).encode()},
        {
            "edge/dev1/health": json.dumps(HEALTH_SAMPLE).encode(),
            "edge/dev1/models/lin": json.dumps(
                {"state": "READY", "version": "sha256:" + "ab" * 32}
            ).encode(),
            "results/pump1": json.dumps({"outputs": {"y": [0.25, 0.75]}}).encode(),
        },
    )
    assert answer["problems"] == []
    states = {cid: rendered.get("value_template") for cid, rendered in answer["states"].items()}
    assert states["model_lin_state"] == "READY"
    assert states["model_lin_version"] == "abababababab"
    assert states["model_lin_degraded"] == "ON"
    assert states["pipeline_p_throughput"] == "12.5"
    assert states["pipeline_p_latency_p95"] == "1.25"
    assert states["pipeline_q_latency_p95"] == "None"  # Home Assistant shows "unknown"
    assert states["pipeline_p_dropped"] == "3"
    assert states["pipeline_p_drift"] == "ON"
    assert "pipeline_q_drift" not in states  # no drift settings, no entity
    assert states["agent_temperature"] == "51.5"
    assert states["agent_outbox_depth"] == "4"
    assert states["agent_warnings"] == "ON"
    assert states["result_pump_1_output"] == "0.25"
    assert states["result_pump_1_anomaly"] == "ON"
    assert "pipeline_gone_errors" not in answer["states"]  # a removal, not an entity


def test_home_assistant_finds_what_it_would_refuse(tmp_path: Path) -> None:
    """The check is Home Assistant's, not ours: a device class it does not know, or a
    template that does not parse, is reported against its component."""
    config_file = tmp_path / "agent.yaml"
    bad_results = [
        {**RESULTS[0], "device_class": "vibrationness"},
        {**RESULTS[0], "name": "Broken", "value_template": "{{ value_json.outputs.y[0 }}"},
    ]
    config = agent_config(tmp_path, results=bad_results)
    config_file.write_text(yaml.safe_dump(config))
    discovery = build(load_config(config_file), agent_version="1", hardware="x")
    answer = check_with_home_assistant(
        "homeassistant", {discovery.topic: json.dumps(discovery.payload).encode()}, {}
    )
    problems = " ".join(answer["problems"])
    assert "result_pump_1_output (sensor)" in problems
    assert "result_broken (sensor)" in problems


def retained_config(broker: MosquittoBroker) -> dict[str, Any] | None:
    """What a subscriber arriving now gets on the discovery topic (None: nothing retained).
    The daemon logs its publish when it hands it over: on a loaded machine the message may
    reach the broker just after this subscriber did, as a live (not retained) one; then a
    new subscriber asks again."""
    for _ in range(5):
        rec = Recorder(broker, [TOPIC]).start()
        try:
            rec.wait_for(bool, timeout_s=1.5)
        except TimeoutError:
            return None
        finally:
            rec.stop()
        message = rec.on(TOPIC)[0]
        if message.retain:
            return json.loads(message.payload) if message.payload else None
    raise AssertionError("the discovery config came only as live messages, never retained")


@pytest.mark.broker
def test_discovery_on_a_real_broker(
    broker: MosquittoBroker, tmp_path: Path, agent_factory: AgentFactory
) -> None:
    """The config is retained; Home Assistant's ``online`` brings it again; a pipeline
    removed on SIGHUP leaves its entities as removals (platform only); turning discovery off
    clears the retained config. What the broker holds passes Home Assistant's check with
    the daemon's own health and model messages as the samples."""
    config = agent_config(tmp_path, broker.port)
    agent = agent_factory(config)
    agent.wait_for_event("home_assistant_discovery_published")
    published = retained_config(broker)
    assert published is not None
    assert published["dev"]["ids"] == ["edge-agent_dev1"]
    assert "pipeline_q_throughput" in published["cmps"]
    assert published["cmps"]["pipeline_q_throughput"]["unique_id"] == (
        "edge-agent_dev1_pipeline_q_throughput"
    )

    samples = Recorder(broker, ["edge/dev1/#"]).start()
    samples.wait_for(
        lambda ms: (
            any(m.topic == "edge/dev1/health" for m in ms)
            and any(m.topic == "edge/dev1/models/lin" for m in ms)
        )
    )
    answer = check_with_home_assistant(
        "homeassistant",
        {TOPIC: json.dumps(published).encode()},
        {m.topic: m.payload for m in samples.messages},
    )
    samples.stop()
    assert answer["problems"] == []
    assert answer["states"]["model_lin_state"]["value_template"] == "READY"
    assert answer["states"]["agent_online"] == {}
    assert float(answer["states"]["agent_cpu"]["value_template"]) >= 0

    live = Recorder(broker, [TOPIC]).start()
    live.wait_for(lambda ms: len(ms) == 1)  # the retained copy
    client = publisher(broker)
    client.publish("homeassistant/status", b"online", qos=1).wait_for_publish(5)
    live.wait_for(lambda ms: len(ms) == 2)
    assert not live.messages[1].retain  # sent again, live
    assert json.loads(live.messages[1].payload) == published

    del config["pipelines"]["q"]
    agent.config_file.write_text(yaml.safe_dump(config, sort_keys=False))
    agent.process.send_signal(signal.SIGHUP)
    live.wait_for(lambda ms: len(ms) == 3)
    after = json.loads(live.messages[2].payload)
    assert after["cmps"]["pipeline_q_throughput"] == {"p": "sensor"}
    assert after["cmps"]["pipeline_p_throughput"]["p"] == "sensor"

    # A restart with the smaller config still removes them: the record is in state_dir.
    agent.terminate()
    agent = agent_factory(config)
    agent.wait_for_event("home_assistant_discovery_published")
    time.sleep(0.3)
    restarted = retained_config(broker)
    assert restarted is not None
    assert restarted["cmps"]["pipeline_q_errors"] == {"p": "sensor"}
    for cid in ("agent_cpu", "model_lin_state", "pipeline_p_throughput", "result_pump_1_anomaly"):
        assert restarted["cmps"][cid]["unique_id"] == published["cmps"][cid]["unique_id"]

    config["home_assistant"]["discovery"] = False
    agent.config_file.write_text(yaml.safe_dump(config, sort_keys=False))
    agent.process.send_signal(signal.SIGHUP)
    agent.wait_for_event("home_assistant_discovery_removed")
    deadline = time.monotonic() + 5
    while retained_config(broker) is not None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert retained_config(broker) is None
    live.stop()
    client.disconnect()
    client.loop_stop()
