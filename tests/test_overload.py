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

from agent.procfs import rss_mb
from tests.broker import MosquittoBroker, Recorder, publisher
from tests.conftest import AgentProcess, base_config
from tests.onnx_builders import build_slow

pytestmark = pytest.mark.broker

AgentFactory = Callable[[dict[str, Any]], AgentProcess]
ERRORS = "edge/dev1/errors"
HEALTH = "edge/dev1/health"
QUEUE_MAX = 200


def test_overload_is_bounded_counted_and_recovers(
    broker: MosquittoBroker,
    tmp_path: Path,
    agent_factory: AgentFactory,
    recorder: Callable[..., Recorder],
) -> None:
    """Readings far faster than the daemon can process for 10 s: the queue stays within its
    bound, drops are counted and reported (not one message per drop), every reading the
    daemon took is answered or counted, memory stays flat, and a reading sent after the load
    is answered. (How fast, and how long readings wait: scripts/bench_overload.py.)"""
    build_slow(tmp_path / "models" / "slow.onnx", layers=64)
    config = base_config(
        broker,
        tmp_path,
        models={"slow": {}},
        pipelines={
            "p": {
                "model": "slow",
                "input": {"topic": "in/+", "qos": 0},
                # QoS 1 results: the count below compares what the daemon processed with what
                # arrived, so the broker must not drop results for a slow subscriber.
                "output": {"topic": "out/{1}", "qos": 1},
                "batching": {"max_batch": 1},
                "queue": {"max": QUEUE_MAX},
            }
        },
        health={"interval_s": 0.5},
    )
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
    try:
        while (now := time.monotonic()) - started < seconds:
            target = int((now - started) * rate)
            while sent < target:
                client.publish("in/load", payload, qos=0)
                sent += 1
            time.sleep(0.002)
    finally:
        stop.set()
        sampler.join()

    # Drained: the newest health shows an empty queue, every reading it received answered
    # or dropped (one may still be in the worker's hands when the queue is empty), and the
    # drops it counted reported. A reading lost on the way never lets this hold.
    def drained(_: Any) -> bool:
        health = rec.on(HEALTH)
        if not health:
            return False
        counters = json.loads(health[-1].payload)["pipelines"]["p"]
        return (
            counters["queue_depth"] == 0
            and counters["received"] == counters["processed"] + counters["dropped"]
            and counters["dropped"] in _totals(rec)
        )

    rec.wait_for(drained, timeout_s=120)
    reporting_seconds = time.monotonic() - started
    counters = json.loads(rec.on(HEALTH)[-1].payload)["pipelines"]["p"]
    # The results travel beside the health report: wait until they all arrived.
    rec.wait_for(
        lambda ms: sum(m.topic == "out/load" for m in ms) >= counters["processed"], timeout_s=60
    )
    served = [json.loads(m.payload) for m in rec.messages if m.topic == "out/load"]

    # Overloaded for real, and the queue never grew past its bound.
    assert counters["dropped"] > 0, counters
    depths = [json.loads(m.payload)["pipelines"]["p"]["queue_depth"] for m in rec.on(HEALTH)]
    assert max(depths) <= QUEUE_MAX, max(depths)

    # Drops are counted, reported at most about once a second, and add up.
    reports = [json.loads(m.payload)["reason"] for m in rec.on(ERRORS)]
    assert reports
    assert len(reports) <= reporting_seconds + 3
    # Every reading the daemon received was answered or dropped and counted (QoS 0
    # readings: the broker may drop some for a slow subscriber before they reach it).
    assert max(_totals(rec)) == counters["dropped"]
    assert counters["received"] == counters["processed"] + counters["dropped"], counters
    assert sorted(r["seq"] for r in served) == list(range(1, counters["processed"] + 1))
    assert counters["received"] <= sent

    # Memory is flat: the second half of the overload adds (almost) nothing.
    half = len(rss) // 2
    assert max(rss[half:]) - rss[half] < 8.0, rss

    # Recovery: a reading sent now is answered.
    client.publish("in/after", payload, qos=0)
    rec.wait_for(lambda ms: any(m.topic == "out/after" for m in ms), timeout_s=30)
    client.loop_stop()
    print(
        f"fed {sent} readings, served {len(served)}, dropped {counters['dropped']}, "
        f"drop reports {len(reports)}, RSS {rss[0]:.0f}->{rss[-1]:.0f} MB"
    )


def _totals(rec: Recorder) -> list[int]:
    """The running drop totals the error reports have given so far."""
    reports = [json.loads(m.payload)["reason"] for m in rec.on(ERRORS)]
    return [int(t) for r in reports for t in re.findall(r"\((\d+) in all\)", r)]
