"""The network loop that owns the connection: cheap models run in it, a model that turns slow
moves to its worker while the loop goes on on its standby thread, and the rules for that."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import structlog.testing

from agent.inference.inline import INLINE_RUN_LIMIT_S, STRIKES, InlineGate
from agent.transport.network_loop import RESCUE_AFTER_S
from tests.broker import MosquittoBroker, Recorder, publisher
from tests.conftest import AgentProcess, base_config
from tests.onnx_builders import build_linear, build_loop
from tests.test_systemd import loop_trips_for

AgentFactory = Callable[..., AgentProcess]


def test_a_slow_batch_moves_the_pipeline_to_its_worker() -> None:
    """Batches over the inline limit are strikes (one can be a pause of the machine); the
    third moves the pipeline; one so long that the loop was handed over moves it at once."""
    with structlog.testing.capture_logs() as logs:
        gate = InlineGate(structlog.get_logger())
        for _ in range(STRIKES - 1):
            gate.judge(INLINE_RUN_LIMIT_S * 2, 4)
        gate.judge(INLINE_RUN_LIMIT_S / 2, 4)
        assert gate.inline
        gate.judge(INLINE_RUN_LIMIT_S * 2, 4)
        assert not gate.inline
        rescued = InlineGate(structlog.get_logger())
        rescued.judge(RESCUE_AFTER_S + 1, 1)
        assert not rescued.inline
    moves = [e["reason"] for e in logs if e["event"] == "pipeline_moved_to_worker"]
    assert len(moves) == 2
    assert "ran 1.2 s in the network loop, which went on on its standby thread" in moves[1]


@pytest.mark.broker
def test_a_model_that_turns_slow_moves_to_its_worker_while_the_keepalive_holds(
    broker: MosquittoBroker, tmp_path: Path, agent_factory: AgentFactory
) -> None:
    """A cheap model runs in the network loop until one reading makes it run for seconds,
    longer than the broker waits for a keepalive (1.5 x 5 s): the loop goes on on its standby
    thread (pings, another pipeline's readings answered at once), the will never fires,
    the pipeline moves to its worker, and its next readings are answered from there."""
    build_loop(tmp_path / "models" / "loop.onnx")
    build_linear(tmp_path / "models" / "lin.onnx")
    # Calibrated on a session of its own, the daemon's runs take about half as long: 24 s
    # here is about 12 s there, over 7.5 s, the keepalive window the run must outlast.
    trips = loop_trips_for(24.0, tmp_path)
    config = base_config(
        broker,
        tmp_path,
        models={"loop": {}, "lin": {}},
        pipelines={
            "slow": {"model": "loop", "input": {"topic": "slow/+"}, "output": {"topic": "o/s"}},
            "fast": {
                "model": "lin",
                "input": {"topic": "fast/+", "field": "x"},
                "output": {"topic": "o/f"},
            },
        },
    )
    config["mqtt"]["keepalive_s"] = 5
    status = Recorder(broker, ["edge/dev1/status"]).start()
    rec = Recorder(broker, ["o/#"]).start()
    agent = agent_factory(config)
    agent.wait_for_event("agent_serving")
    client = publisher(broker)

    def reading(reading_id: Any, n: int) -> str:
        return json.dumps({"id": reading_id, "inputs": {"x": [0.1] * 8, "n": n}})

    for index in range(20):
        client.publish("slow/a", reading(index, 1), qos=1)
    rec.wait_for(lambda ms: len(ms) == 20, timeout_s=30)
    # On a loaded machine the cheap runs may already have taken over 5 ms in the loop and
    # moved the pipeline to its worker: then the slow run never holds the loop to hand over.
    moved_early = "pipeline_moved_to_worker" in [e.get("event") for e in agent.log_events()]
    started = time.monotonic()
    client.publish("slow/a", reading("slow", trips), qos=1)
    time.sleep(1.0)  # the slow run holds the loop's first thread by now
    for index in range(10):
        client.publish("fast/a", json.dumps({"id": index, "x": [1.0] * 4}), qos=1)
    rec.wait_for(lambda ms: sum(m.topic == "o/f" for m in ms) == 10, timeout_s=30)
    fast_done = time.monotonic()
    rec.wait_for(lambda ms: any(b'"id":"slow"' in m.payload for m in ms), timeout_s=90)
    slow_done = time.monotonic()
    client.publish("slow/a", reading("after", 1), qos=1)
    rec.wait_for(lambda ms: any(b'"id":"after"' in m.payload for m in ms), timeout_s=30)
    client.disconnect()
    client.loop_stop()
    rec.stop()
    status.stop()
    assert fast_done < slow_done  # answered while the slow reading still ran
    assert slow_done - started > 7.5  # it held its thread past the keepalive's 1.5 x 5 s...
    assert [m.payload for m in status.messages] == [b"online"]  # ...and no will fired
    events = [e.get("event") for e in agent.log_events()]
    assert moved_early or "mqtt_loop_handed_over" in events
    assert "pipeline_moved_to_worker" in events
    assert "mqtt_connection_lost" not in events
    assert agent.process.poll() is None
