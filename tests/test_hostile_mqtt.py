"""Messages far larger than anything the daemon takes, on every topic it listens to: a real
broker, the daemon as a process, its peak RSS read from the kernel."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from paho.mqtt.enums import MQTTProtocolVersion

from tests.broker import MosquittoBroker, Recorder, publisher
from tests.conftest import AgentProcess, base_config
from tests.onnx_builders import build_linear
from tests.test_updates import serving_version
from tests.update_helpers import STATUS, make_key, statuses, wait_until

pytestmark = pytest.mark.broker

AgentFactory = Callable[..., AgentProcess]
BIG = 64 * 1024 * 1024
TOPICS = ("in/s1", "edge/dev1/updates/manifest", "edge/dev1/updates/chunks/u1")


def packet_size(topic: str) -> int:
    """Remaining length of an MQTT 3.1.1 QoS 1 PUBLISH of ``BIG`` bytes on ``topic``."""
    return 2 + len(topic) + 2 + BIG


def peak_rss_mb(pid: int) -> float:
    """The kernel's high-water mark of the process's resident memory (VmHWM)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


def reset_peak_rss(pid: int) -> None:
    """Start the high-water mark again from the current RSS (Linux clear_refs, value 5)."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


def current_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def _config(broker: MosquittoBroker, tmp_path: Path, protocol: str) -> dict[str, Any]:
    _, public = make_key(tmp_path / "keys", "ops")
    build_linear(tmp_path / "models" / "lin.onnx", features=4, outputs=2)
    return base_config(
        broker,
        tmp_path,
        mqtt={
            "host": broker.host,
            "port": broker.port,
            "keepalive_s": 5,
            "reconnect_max_s": 1,
            "protocol": protocol,
        },
        models={"lin": {}},
        pipelines={
            "p": {
                "model": "lin",
                "input": {"topic": "in/+", "field": "x", "id_field": "id"},
                "output": {"topic": "out/{1}"},
            }
        },
        updates={"trusted_keys": [str(public)]},
    )


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_a_64_mb_message_on_any_topic_costs_less_than_32_mb(
    broker: MosquittoBroker,
    tmp_path: Path,
    agent_factory: AgentFactory,
    recorder: Callable[..., Recorder],
    protocol: str,
) -> None:
    """MQTT 5: the broker drops what is over the Maximum Packet Size sent in CONNECT. MQTT
    3.1.1 (no such field): the daemon reads the packet in slices and keeps only its head. Either
    way peak RSS grows by less than 32 MB per 64 MB message, the reading gets one error, the
    manifest one REJECTED status naming no update, and the daemon keeps serving."""
    agent = agent_factory(_config(broker, tmp_path, protocol))
    rec = recorder("out/#", "edge/dev1/errors", STATUS)
    agent.wait_for_event("agent_serving")
    serving_version(broker, rec, 1)
    pid = agent.process.pid
    sender = publisher(broker, MQTTProtocolVersion.MQTTv311)
    big = b"\x00" * BIG
    growth = {}
    try:
        for topic in TOPICS:
            time.sleep(0.5)  # let the allocator settle after the previous one
            before = current_rss_mb(pid)
            reset_peak_rss(pid)
            sender.publish(topic, big, qos=1).wait_for_publish(60)
            if protocol == "3.1.1":  # the daemon sees it: wait until it has skipped it
                wait_until(
                    lambda t=topic: any(
                        e.get("event") == "mqtt_message_too_large" and e.get("topic") == t
                        for e in agent.log_events()
                    ),
                    30,
                    f"too large on {topic}",
                )
            else:
                time.sleep(2.0)  # the broker drops it; nothing to wait for but time
            growth[topic] = peak_rss_mb(pid) - before
    finally:
        sender.disconnect()
        sender.loop_stop()
    print(
        f"\npeak RSS growth per 64 MB message, MQTT {protocol}: "
        + ", ".join(f"{t}: {g:+.1f} MB" for t, g in growth.items())
    )
    assert all(g < 32 for g in growth.values()), growth
    serving_version(broker, rec, 2)
    if protocol == "3.1.1":
        errors = [json.loads(m.payload) for m in rec.on("edge/dev1/errors")]
        assert [e["reason"] for e in errors if e["topic"] == "in/s1"] == [
            f"message of {packet_size('in/s1')} bytes is larger than mqtt.max_packet_bytes; "
            "dropped unread (input.max_payload_bytes 1048576)"
        ], errors
        rejected = statuses(rec, None)
        assert [(s["state"], s["authenticated"], s["reason"]) for s in rejected] == [
            (
                "REJECTED",
                False,
                f"manifest message of {packet_size(TOPICS[1])} bytes is larger "
                "than mqtt.max_packet_bytes; not read",
            )
        ], rejected
    else:
        assert rec.on("edge/dev1/errors") == []
        assert statuses(rec, None) == []
    # Acknowledged: nothing comes back after a reconnect (the persistent session is clean).
    assert agent.process.poll() is None
