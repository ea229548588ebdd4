"""The daemon as a Sparkplug B edge node, seen by a host application on a real broker: every
message decoded and checked against the specification's rules (``tests/sparkplug_host.py``)."""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from agent.integrations.sparkplug.payloads import DataType, MetricValue, encode, value_of
from tests.broker import MosquittoBroker, publisher
from tests.conftest import AgentProcess, base_config
from tests.onnx_builders import build_linear
from tests.sparkplug_host import SparkplugHost, SpbMessage
from tests.test_delivery import upstream  # noqa: F401 (a fixture)

pytestmark = pytest.mark.broker

AgentFactory = Callable[..., AgentProcess]
NODE = "plant/dev1"


def sparkplug_config(local: MosquittoBroker, tmp_path: Path, **sparkplug: Any) -> dict[str, Any]:
    build_linear(tmp_path / "models" / "lin.onnx", features=4, outputs=2)
    return base_config(
        local,
        tmp_path,
        models={"lin": {"file": "lin.onnx"}},
        pipelines={
            "p": {
                "model": "lin",
                "input": {"topic": "sensors/+/x", "field": "x"},
                "output": {"topic": "results/{1}"},
            }
        },
        health={"interval_s": 0.5},
        sparkplug={"enabled": True, "group_id": "plant", **sparkplug},
    )


def send(broker: MosquittoBroker, sensor: str, ids: range) -> None:
    client = publisher(broker)
    for i in ids:
        reading = {"id": i, "x": [float(i), 1.0, 2.0, 3.0]}
        client.publish(f"sensors/{sensor}/x", json.dumps(reading), qos=1).wait_for_publish(5)
    client.disconnect()
    client.loop_stop()


def _rebirth_false() -> bytes:
    return encode(
        [MetricValue(DataType.BOOLEAN, False, name="Node Control/Rebirth")],
        timestamp_ms=1,
        seq=None,
    )


def metrics_by_name(birth: SpbMessage) -> dict[str, Any]:
    return {m.name: value_of(m) for m in birth.payload.metrics}


def test_a_session_from_nbirth_to_ndeath_follows_the_specification(
    broker: MosquittoBroker, tmp_path: Path, agent_factory: AgentFactory
) -> None:
    """NBIRTH with bdSeq, Node Control/Rebirth and the node metrics; a device per sensor
    stream born in a new birth sequence with the result metrics; DDATA per result by alias;
    NDATA as health changes; a rebirth on NCMD (same bdSeq); a pipeline added on SIGHUP is
    declared and its stream gets a DBIRTH; SIGKILL brings the will, NDEATH, with the NBIRTH's
    bdSeq. Every message passes the host's checks."""
    host = SparkplugHost(broker).start()
    config = sparkplug_config(broker, tmp_path)
    agent = agent_factory(config)
    agent.wait_for_event("agent_serving")
    host.wait_for(lambda ms: any(m.verb == "NBIRTH" for m in ms))
    birth = host.of("NBIRTH")[0]
    names = metrics_by_name(birth)
    assert names["bdSeq"] == 0
    assert names["Node Control/Rebirth"] is False
    assert {"Models/lin/State", "Pipelines/p/Throughput", "Health/CPU Percent"} <= set(names)
    # Health turns up as NDATA.
    host.wait_for(lambda ms: any(m.verb == "NDATA" for m in ms))

    send(broker, "s1", range(3))
    send(broker, "s2", range(3, 6))
    host.wait_for(lambda ms: {m.device for m in ms if m.verb == "DBIRTH"} >= {"p:s1", "p:s2"})
    device_birth = host.of("DBIRTH", "p:s1")[-1]
    declared = metrics_by_name(device_birth)
    assert {"Id", "Seq", "Model Version", "Latency ms", "Outputs/y/0", "Outputs/y/1"} <= set(
        declared
    )
    host.wait_for(lambda ms: len([m for m in ms if m.verb == "DDATA" and m.device == "p:s1"]) >= 2)

    # 300 more results: the one seq counter of the node wraps from 255 to 0.
    send(broker, "s1", range(100, 400))
    host.wait_for(lambda ms: len([m for m in ms if m.verb == "DDATA"]) >= 300, timeout_s=30)
    assert any(m.payload.seq == 0 for m in host.of("DDATA"))

    # Hostile commands: garbage, a rebirth set false, one too large to read. None rebirths.
    births_before = len(host.of("NBIRTH"))
    client = publisher(broker)
    for junk in (b"\xff\xfe\xfd", _rebirth_false(), b"\x00" * 100_000):
        client.publish(f"spBv1.0/{NODE.replace('/', '/NCMD/')}", junk, qos=1).wait_for_publish(5)
    agent.wait_for_event("sparkplug_ncmd_rejected")
    agent.wait_for_event("sparkplug_ncmd_ignored")
    send(broker, "s2", range(500, 502))
    host.wait_for(lambda ms: any(m.verb == "DDATA" and m.device == "p:s2" for m in ms[-5:]))
    assert len(host.of("NBIRTH")) == births_before

    births_before = len(host.of("NBIRTH"))
    host.rebirth(NODE)
    host.wait_for(lambda ms: sum(m.verb == "NBIRTH" for m in ms) > births_before)
    host.wait_for(lambda ms: len([m for m in ms if m.verb == "DBIRTH"]) >= 4)
    assert host.of("NBIRTH")[-1].bdseq == 0

    config["pipelines"]["q"] = {
        "model": "lin",
        "input": {"topic": "other/+/x", "field": "x"},
        "output": {"topic": "results-q/{1}"},
    }
    agent.config_file.write_text(yaml.safe_dump(config, sort_keys=False))
    agent.process.send_signal(signal.SIGHUP)
    host.wait_for(
        lambda ms: any(m.verb == "NBIRTH" and m.metric("Pipelines/q/Throughput") for m in ms)
    )
    # The new subscription may not be in place yet when the NBIRTH is out (the births go
    # out on the Sparkplug connection, the SUBSCRIBE on the readings' one): until the
    # device is born, send the reading again.
    deadline = time.monotonic() + 15
    while not host.of("DBIRTH", "q:m7"):
        assert time.monotonic() < deadline, "no DBIRTH for q:m7"
        client.publish("other/m7/x", json.dumps({"id": 1, "x": [1, 2, 3, 4]}), qos=1)
        time.sleep(1.0)

    agent.kill()
    host.wait_for(lambda ms: any(m.verb == "NDEATH" for m in ms))
    assert host.of("NDEATH")[-1].bdseq == 0
    assert host.violations() == []
    assert {
        "tck-id-topics-nbirth-seq-num",
        "tck-id-topics-nbirth-bdseq-included",
        "tck-id-payloads-ndeath-bdseq",
        "tck-id-payloads-sequence-num-incrementing",
        "tck-id-payloads-alias-data-cmd-requirement",
        "tck-id-payloads-dbirth-order",
        "tck-id-operational-behavior-data-commands-rebirth-action-3",
    } <= host.exercised
    host.stop()


def test_a_primary_host_gates_the_births(
    broker: MosquittoBroker, tmp_path: Path, agent_factory: AgentFactory
) -> None:
    """With primary_host_id no birth goes out until the host's STATE says online; when it
    goes offline the node sends NDEATH and disconnects; when it is back the node connects
    anew (bdSeq + 1) and is born again."""
    agent = agent_factory(sparkplug_config(broker, tmp_path, primary_host_id="scada"))
    agent.wait_for_event("sparkplug_connected")
    watcher = SparkplugHost(broker).start()
    time.sleep(1.5)
    assert watcher.of("NBIRTH") == []
    host = SparkplugHost(broker, host_id="scada").start()
    host.wait_for(lambda ms: any(m.verb == "NBIRTH" for m in ms))
    assert host.of("NBIRTH")[0].bdseq == 0
    host.set_online(False)
    host.wait_for(lambda ms: any(m.verb == "NDEATH" for m in ms))
    host.set_online(True)
    host.wait_for(lambda ms: sum(m.verb == "NBIRTH" for m in ms) == 2, timeout_s=20)
    assert host.of("NBIRTH")[1].bdseq == 1
    code, _ = agent.terminate()
    assert code == 0
    host.wait_for(lambda ms: sum(m.verb == "NDEATH" for m in ms) == 2)
    assert host.violations() == []
    assert "tck-id-topics-nbirth-bdseq-increment" in host.exercised
    host.stop()
    watcher.stop()


def test_results_made_while_the_host_is_unreachable_arrive_as_history(
    broker: MosquittoBroker,
    upstream: MosquittoBroker,  # noqa: F811
    tmp_path: Path,
    agent_factory: AgentFactory,
) -> None:
    """Sparkplug on the upstream broker (broker: upstream): while it is down the readings
    still get results; once it is back the node is born again (bdSeq + 1) and the results of
    the outage follow as DDATA whose metrics are marked is_historical, in order."""
    config = sparkplug_config(broker, tmp_path, broker="upstream")
    config["upstream"] = {
        "host": upstream.host,
        "port": upstream.port,
        "keepalive_s": 5,
        "reconnect_max_s": 1,
    }
    host = SparkplugHost(upstream).start()
    agent = agent_factory(config)
    agent.wait_for_event("agent_serving")
    host.wait_for(lambda ms: any(m.verb == "NBIRTH" for m in ms))
    send(broker, "s1", range(2))
    host.wait_for(lambda ms: any(m.verb == "DDATA" and m.device == "p:s1" for m in ms))
    host.stop()
    upstream.stop()
    send(broker, "s1", range(10, 20))
    time.sleep(0.5)
    upstream.start()
    host = SparkplugHost(upstream).start()
    host.wait_for(
        lambda ms: (
            sum(
                1
                for m in ms
                if m.verb == "DDATA" and any(x.is_historical for x in m.payload.metrics)
            )
            == 10
        ),
        timeout_s=30,
    )
    births = host.of("NBIRTH")
    assert births[0].bdseq is not None
    assert births[0].bdseq >= 1
    late = [m for m in host.of("DDATA") if any(x.is_historical for x in m.payload.metrics)]
    ids = [value_of(x) for m in late for x in m.payload.metrics if x.string_value]
    assert [i for i in ids if i in {str(n) for n in range(10, 20)}] == [
        str(n) for n in range(10, 20)
    ]
    assert host.violations() == []
    host.stop()
    agent.terminate()
