"""Overload: far more readings than the daemon can process, for 10 s."""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from agent.telemetry import rss_mb
from tests.broker import MosquittoBroker, Recorder, publisher
from tests.conftest import AgentProcess, base_config
from tests.onnx_builders import build_slow

pytestmark = pytest.mark.broker

AgentFactory = Callable[[dict[str, Any]], AgentProcess]
ERRORS = "edge/dev1/errors"
HEALTH = "edge/dev1/health"
QUEUE_MAX = 200


def test_overload_is_bounded_counted_and_recovers(
        broker: MosquittoBroker, tmp_path: Path, agent_factory: AgentFactory,
        recorder: Callable[..., Recorder]) -> None:
    """Readings at 3x+ what the daemon can process for 10 s: served readings wait at most
    about one queue's worth, drops are counted and reported (not one message per drop),
    memory stays flat, and right after the load stops a new reading is answered at once."""
    build_slow(tmp_path / "models" / "slow.onnx", layers=64)
    config = base_config(broker, tmp_path, models={"slow": {}}, pipelines={"p": {
        "model": "slow", "input": {"topic": "in/+", "qos": 0},
        "output": {"topic": "out/{1}", "qos": 0},
        "batching": {"max_batch": 1}, "queue": {"max": QUEUE_MAX}}},
        health={"interval_s": 0.5})
    agent = agent_factory(config)
    agent.wait_for_event("agent_serving")
    rec = recorder("out/#", ERRORS, HEALTH)
    rss: list[float] = []
    stop = threading.Event()

    def sample_memory() -> None:
        while not stop.wait(0.5):
            rss.append(rss_mb(agent.process.pid) or float("nan"))

    sampler = threading.Thread(target=sample_memory)
    sampler.start()
    client = publisher(broker)
    payload = json.dumps([0.1] * 8).encode()
    rate, seconds = 3000.0, 10.0
    sent, started = 0, time.monotonic()
    while (now := time.monotonic()) - started < seconds:
        target = int((now - started) * rate)
        while sent < target:
            client.publish("in/load", payload, qos=0)
            sent += 1
        time.sleep(0.002)
    feed_seconds = time.monotonic() - started
    stop.set()
    sampler.join()
    # Drained: the newest health shows an empty queue and the drops it counted reported.
    def drained(_: Any) -> bool:
        health = rec.on(HEALTH)
        if not health:
            return False
        counters = json.loads(health[-1].payload)["pipelines"]["p"]
        return counters["queue_depth"] == 0 and counters["dropped"] in _totals(rec)

    rec.wait_for(drained, timeout_s=60)
    reporting_seconds = time.monotonic() - started
    counters = json.loads(rec.on(HEALTH)[-1].payload)["pipelines"]["p"]
    served_during = [json.loads(m.payload) for m in rec.messages if m.topic == "out/load"]
    processed_rate = len(served_during) / feed_seconds
    feed_rate = sent / feed_seconds
    assert feed_rate >= 3 * processed_rate, (feed_rate, processed_rate)

    # Latency of served readings is bounded by the queue: about QUEUE_MAX service times.
    service_s = 1 / processed_rate
    worst = max(r["latency_ms"] for r in served_during) / 1000
    assert worst < QUEUE_MAX * service_s * 3 + 1.0, (worst, service_s)

    # Drops are counted, reported at most about once a second, and add up.
    reports = [json.loads(m.payload)["reason"] for m in rec.on(ERRORS)]
    assert reports
    assert len(reports) <= reporting_seconds + 3
    # Every reading the daemon received was answered or dropped and counted (QoS 0: the
    # broker may drop some for a slow subscriber before they reach it).
    assert max(_totals(rec)) == counters["dropped"] > 0
    assert counters["received"] == counters["processed"] + counters["dropped"], counters
    assert counters["processed"] == len(served_during)
    assert counters["received"] <= sent

    # Memory is flat: the second half of the overload adds (almost) nothing.
    half = len(rss) // 2
    assert max(rss[half:]) - rss[half] < 8.0, rss

    # Recovery: a reading sent now is served at once.
    before = len(rec.on("out/after"))
    client.publish("in/after", payload, qos=0)
    rec.wait_for(lambda ms: len([m for m in ms if m.topic == "out/after"]) > before,
                 timeout_s=5)
    client.loop_stop()
    after = json.loads(rec.on("out/after")[-1].payload)
    assert after["latency_ms"] < 250
    print(f"fed {feed_rate:.0f}/s, served {processed_rate:.0f}/s, worst latency "
          f"{worst * 1000:.0f} ms, drop reports {len(reports)}, RSS {rss[0]:.0f}->{rss[-1]:.0f}"
          " MB")


def _totals(rec: Recorder) -> list[int]:
    """The running drop totals the error reports have given so far."""
    reports = [json.loads(m.payload)["reason"] for m in rec.on(ERRORS)]
    return [int(t) for r in reports for t in re.findall(r"\((\d+) in all\)", r)]
