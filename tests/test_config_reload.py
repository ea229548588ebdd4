"""SIGHUP reloads the config live; SIGTERM drains what is queued."""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.broker import MosquittoBroker, Recorder, free_port, paced_stream, publisher
from tests.conftest import AgentProcess, base_config
from tests.onnx_builders import build_linear, build_slow

pytestmark = pytest.mark.broker

AgentFactory = Callable[[dict[str, Any]], AgentProcess]


def test_sighup_applies_a_valid_change_without_losing_readings(
    broker: MosquittoBroker,
    tmp_path: Path,
    agent_factory: AgentFactory,
    recorder: Callable[..., Recorder],
) -> None:
    """Adding a pipeline and a model, and changing the log level, while another pipeline
    streams 300 readings/s: the untouched pipeline answers every reading, the new one
    serves."""
    build_linear(tmp_path / "models" / "lin.onnx")
    build_linear(tmp_path / "models" / "other.onnx", seed=4)
    pipeline = {
        "model": "lin",
        "input": {"topic": "in/+", "field": "x"},
        "output": {"topic": "out/{1}"},
    }
    config = base_config(broker, tmp_path, models={"lin": {}}, pipelines={"p": pipeline})
    agent = agent_factory(config)
    agent.wait_for_event("agent_serving")
    rec = recorder("out/#", "added/#")
    sender = paced_stream(
        broker, "in/s", [json.dumps({"id": i, "x": [i, 1, 2, 3]}) for i in range(900)], 300.0
    )
    time.sleep(1.0)
    config["models"]["other"] = {}
    config["pipelines"]["q"] = {
        "model": "other",
        "input": {"topic": "new/+"},
        "output": {"topic": "added/{1}"},
    }
    config["log_level"] = "warning"
    agent.config_file.write_text(yaml.safe_dump(config))
    agent.process.send_signal(signal.SIGHUP)
    agent.wait_for_event("config_reloaded")
    sender.join()
    rec.wait_for(lambda ms: sum(m.topic == "out/s" for m in ms) >= 900, timeout_s=30)
    ids = sorted(json.loads(m.payload)["id"] for m in rec.on("out/s"))
    assert ids == list(range(900))
    client = publisher(broker)
    client.publish("new/a", b"[1, 2, 3, 4]", qos=1)
    rec.wait_for(lambda ms: any(m.topic == "added/a" for m in ms))
    client.loop_stop()
    assert agent.process.poll() is None


def test_sighup_with_an_invalid_config_keeps_the_old_one(
    broker: MosquittoBroker,
    tmp_path: Path,
    agent_factory: AgentFactory,
    recorder: Callable[..., Recorder],
) -> None:
    """An invalid config is refused, reported on P/errors and in the log; serving goes on."""
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
    rec = recorder("out/#", "edge/dev1/errors")
    agent.config_file.write_text(agent.config_file.read_text() + "bogus_key: 1\n")
    agent.process.send_signal(signal.SIGHUP)
    event = agent.wait_for_event("config_reload_refused")
    assert "bogus_key: unknown key" in event["problem"]
    rec.wait_for(lambda ms: any(m.topic == "edge/dev1/errors" for m in ms))
    error = json.loads(rec.on("edge/dev1/errors")[0].payload)
    assert "config reload refused" in error["reason"]
    client = publisher(broker)
    client.publish("in/a", b"[1, 2, 3, 4]", qos=1)
    rec.wait_for(lambda ms: any(m.topic == "out/a" for m in ms))
    client.loop_stop()


def test_sighup_reconnects_when_the_broker_changes(
    broker: MosquittoBroker, tmp_path: Path, agent_factory: AgentFactory
) -> None:
    """A new broker address: offline on the old broker, online and serving on the new one."""
    (tmp_path / "second-broker").mkdir()
    second = MosquittoBroker(tmp_path / "second-broker")
    second.start()
    try:
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
        old_status = Recorder(broker, ["edge/dev1/status"]).start()
        new_side = Recorder(second, ["edge/dev1/status", "out/#", "edge/dev1/models/+"]).start()
        config["mqtt"]["port"] = second.port
        agent.config_file.write_text(yaml.safe_dump(config))
        agent.process.send_signal(signal.SIGHUP)
        agent.wait_for_event("config_reloaded")
        old_status.wait_for_payload("edge/dev1/status", b"offline")
        new_side.wait_for_payload("edge/dev1/status", b"online")
        new_side.wait_for(lambda ms: any(m.topic == "edge/dev1/models/lin" for m in ms))
        client = publisher(second)
        client.publish("in/a", b"[1, 2, 3, 4]", qos=1)
        new_side.wait_for(lambda ms: any(m.topic == "out/a" for m in ms))
        client.loop_stop()
        old_status.stop()
        new_side.stop()
    finally:
        second.stop()


def test_sigterm_drains_queued_readings(
    broker: MosquittoBroker,
    tmp_path: Path,
    agent_factory: AgentFactory,
    recorder: Callable[..., Recorder],
) -> None:
    """at_most_once: readings already queued when SIGTERM arrives are answered, or counted
    as abandoned when the drain deadline comes first; none vanishes; exit 0 within 5 s."""
    build_slow(tmp_path / "models" / "slow.onnx", layers=24)
    config = base_config(
        broker,
        tmp_path,
        models={"slow": {}},
        pipelines={
            "p": {
                "model": "slow",
                "input": {"topic": "in/+", "field": "x"},
                "output": {"topic": "out/{1}"},
                "batching": {"max_batch": 1},
                "queue": {"max": 1000},
            }
        },
        delivery="at_most_once",
    )
    agent = agent_factory(config)
    agent.wait_for_event("agent_serving")
    rec = recorder("out/#")
    client = publisher(broker)
    for i in range(300):
        client.publish("in/s", json.dumps({"id": i, "x": [0.1] * 8}), qos=1)
    client.loop_stop()
    rec.wait_for(lambda ms: len(ms) >= 5)
    code, took = agent.terminate()
    assert code == 0
    assert took < 5.0
    stopped = agent.wait_for_event("pipeline_stopped")
    # Counted on the broker's side: the results that reached a subscriber. One stream at
    # QoS 1 is answered in order, so they are exactly the first ``processed`` readings.
    answered = sorted(json.loads(m.payload)["id"] for m in rec.messages)
    assert answered == list(range(stopped["processed"])), (answered[-5:], stopped)
    assert stopped["processed"] >= 5
    # What the 2 s drain did not reach (a loaded machine) is counted, never silently lost:
    # every reading the daemon took from the broker was answered or abandoned.
    assert stopped["received"] == stopped["processed"] + stopped["abandoned"], stopped
    assert (stopped["dropped"], stopped["rejected"], stopped["failed"]) == (0, 0, 0), stopped


def test_sigterm_at_least_once_leaves_the_rest_to_the_next_start(
    broker: MosquittoBroker,
    tmp_path: Path,
    agent_factory: AgentFactory,
    recorder: Callable[..., Recorder],
) -> None:
    """at_least_once: SIGTERM in the middle of 1,000 queued readings exits 0 within 5 s;
    what was not answered stays with the broker's session and is answered after the
    restart."""
    build_slow(tmp_path / "models" / "slow.onnx", layers=64)
    config = base_config(
        broker,
        tmp_path,
        models={"slow": {}},
        pipelines={
            "p": {
                "model": "slow",
                "input": {"topic": "in/+", "field": "x"},
                "output": {"topic": "out/{1}"},
                "batching": {"max_batch": 1},
            }
        },
    )
    agent = agent_factory(config)
    agent.wait_for_event("agent_serving")
    agent.wait_for_event("mqtt_subscribed")
    rec = recorder("out/#")
    client = publisher(broker)
    sent = [
        client.publish("in/s", json.dumps({"id": i, "x": [0.1] * 8}), qos=1) for i in range(1000)
    ]
    sent[-1].wait_for_publish(10)
    client.disconnect()
    client.loop_stop()
    rec.wait_for(lambda ms: len(ms) >= 5)
    code, took = agent.terminate()
    assert code == 0
    assert took < 5.0
    before = len({json.loads(m.payload)["id"] for m in rec.messages})
    assert before < 1000
    agent_factory(config).wait_for_event("agent_serving")
    rec.wait_for(lambda ms: len({json.loads(m.payload)["id"] for m in ms}) == 1000, 60)


def test_sigterm_with_more_queued_than_the_deadline_allows(
    broker: MosquittoBroker,
    tmp_path: Path,
    agent_factory: AgentFactory,
    recorder: Callable[..., Recorder],
) -> None:
    """Seconds of queued work at SIGTERM: the rest is abandoned (and said so), the batch in
    progress finishes, and the process exits 0 within 5 s instead of dying in onnxruntime
    (std::terminate) with a worker still inside run."""
    build_slow(tmp_path / "models" / "slow.onnx", layers=256)
    config = base_config(
        broker,
        tmp_path,
        models={"slow": {}},
        pipelines={
            "p": {
                "model": "slow",
                "input": {"topic": "in/+", "field": "x"},
                "output": {"topic": "out/{1}"},
                "batching": {"max_batch": 1},
                "queue": {"max": 5000},
            }
        },
        delivery="at_most_once",
    )
    agent = agent_factory(config)
    agent.wait_for_event("agent_serving")
    rec = recorder("out/#")
    client = publisher(broker)
    sent = [
        client.publish("in/s", json.dumps({"id": i, "x": [0.1] * 8}), qos=1) for i in range(2000)
    ]
    sent[-1].wait_for_publish(10)
    client.disconnect()
    client.loop_stop()
    rec.wait_for(lambda ms: len(ms) >= 5)
    code, took = agent.terminate()
    assert code == 0
    assert took < 5.0
    timeout = next(e for e in agent.log_events() if e.get("event") == "pipeline_stop_timeout")
    assert timeout["abandoned"] > 0


def test_a_refused_reload_names_where_not_what(
    broker: MosquittoBroker,
    tmp_path: Path,
    agent_factory: AgentFactory,
    recorder: Callable[..., Recorder],
) -> None:
    """P/errors gets the file, line and key of each problem, never the offending value (it
    may be a secret pasted into the wrong key); the log has the whole text."""
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
    rec = recorder("edge/dev1/errors")
    config["mqtt"]["client_id"] = 12345
    config["health"] = {"interval_s": "hunter2-secret"}
    agent.config_file.write_text(yaml.safe_dump(config, sort_keys=False))
    agent.process.send_signal(signal.SIGHUP)
    event = agent.wait_for_event("config_reload_refused")
    assert "hunter2-secret" in str(agent.log_events())
    assert event
    rec.wait_for(bool)
    reason = json.loads(rec.on("edge/dev1/errors")[0].payload)["reason"]
    assert "hunter2-secret" not in reason, reason
    assert "12345" not in reason, reason
    assert reason.startswith(
        "config reload refused, still running the previous config: 2 problem(s) at "
    ), reason
    assert f"{agent.config_file}:" in reason, reason
    assert " health.interval_s" in reason, reason
    assert " mqtt.client_id" in reason, reason


def test_a_metrics_endpoint_beyond_loopback_is_warned_about(
    broker: MosquittoBroker, tmp_path: Path, agent_factory: AgentFactory
) -> None:
    """The endpoint has no authentication: listening on every address is logged as such."""
    build_linear(tmp_path / "models" / "lin.onnx")
    config = base_config(
        broker, tmp_path, models={"lin": {}}, metrics={"listen": f"0.0.0.0:{free_port()}"}
    )
    agent = agent_factory(config)
    agent.wait_for_event("agent_serving")
    event = agent.wait_for_event("metrics_exposed")
    assert event["level"] == "warning"
    assert "no authentication" in event["reason"]
