"""Every kind of bad reading: an error on P/errors naming what is wrong, and the next valid
reading is served."""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.broker import MosquittoBroker, Recorder, publisher
from tests.conftest import AgentProcess, base_config
from tests.onnx_builders import build_linear

pytestmark = pytest.mark.broker

AgentFactory = Callable[[dict[str, Any]], AgentProcess]
ERRORS = "edge/dev1/errors"


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


GOOD_JSON = json.dumps({"id": "good", "x": [1, 2, 3, 4]}).encode()
CASES: dict[str, tuple[dict[str, Any], bytes, str, bytes]] = {
    # name: (pipeline input settings, bad payload, expected reason, a good payload)
    "invalid json": ({"field": "x"}, b'{"x": [1, 2,', "payload is not valid JSON", GOOD_JSON),
    "wrong field": ({"field": "x"}, b'{"y": [1, 2, 3, 4]}', "payload has no field 'x'", GOOD_JSON),
    "wrong element count": (
        {"field": "x"},
        b'{"id": "r-3", "x": [1, 2, 3]}',
        "expects shape [4] per reading (4 elements), got shape [3]",
        GOOD_JSON,
    ),
    "wrong dtype for raw": (
        {"format": "raw", "dtype": "float64", "shape": [4]},
        np.arange(4, dtype="<f4").tobytes(),
        "payload has 2 elements but input.shape [4] needs 4",
        np.arange(4, dtype="<f8").tobytes(),
    ),
    "truncated npy": (
        {"format": "npy"},
        npy_bytes(np.ones(4, np.float32))[:-7],
        "not a valid .npy payload",
        npy_bytes(np.ones(4, np.float32)),
    ),
    # Over input.max_payload_bytes, under mqtt.max_packet_bytes (larger ones never reach the
    # pipeline: test_hostile_mqtt.py).
    "1.5 MB payload": (
        {"field": "x"},
        b"[" + b"1," * 750_000 + b"1]",
        "exceeds input.max_payload_bytes (1048576)",
        GOOD_JSON,
    ),
    "NaN": ({"field": "x"}, b'{"x": [1, NaN, 3, 4]}', "contains NaN or infinity", GOOD_JSON),
    "two readings in one message": (
        {"field": "x"},
        b'{"id": 17, "x": [[1, 2], [3, 4]]}',
        "expects shape [4] per reading (4 elements), got shape [2, 2] (4 elements): nested "
        "lists must have the reading's shape",
        GOOD_JSON,
    ),
    "empty payload": ({"field": "x"}, b"", "payload is not valid JSON", GOOD_JSON),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_reading_is_reported_and_the_next_one_served(
    broker: MosquittoBroker,
    tmp_path: Path,
    agent_factory: AgentFactory,
    recorder: Callable[..., Recorder],
    case: str,
) -> None:
    """One bad reading: one error naming pipeline, topic and reason; then a good one works."""
    settings, bad, reason, good = CASES[case]
    build_linear(tmp_path / "models" / "lin.onnx")
    config = base_config(
        broker,
        tmp_path,
        models={"lin": {}},
        pipelines={
            "p": {
                "model": "lin",
                "input": {"topic": "in/+", **settings},
                "output": {"topic": "out/{1}"},
            }
        },
    )
    agent = agent_factory(config)
    agent.wait_for_event("agent_serving")
    rec = recorder("out/#", ERRORS)
    client = publisher(broker)
    client.publish("in/bad", bad, qos=1)
    client.publish("in/good", good, qos=1)
    rec.wait_for(
        lambda ms: any(m.topic == "out/good" for m in ms) and any(m.topic == ERRORS for m in ms)
    )
    client.loop_stop()
    errors = [json.loads(m.payload) for m in rec.on(ERRORS)]
    assert len(errors) == 1
    assert errors[0]["pipeline"] == "p"
    assert errors[0]["topic"] == "in/bad"
    assert reason in errors[0]["reason"]
    # The reading's id, when it could be read, so the sender knows which reading it was.
    expected_id = {"wrong element count": "r-3", "two readings in one message": 17}.get(case)
    assert errors[0].get("id") == expected_id
    assert not rec.on("out/bad")
    assert agent.process.poll() is None


def test_topic_with_unexpected_levels(
    broker: MosquittoBroker,
    tmp_path: Path,
    agent_factory: AgentFactory,
    recorder: Callable[..., Recorder],
) -> None:
    """A topic that leaves a placeholder of the result topic empty is refused, not published
    to a malformed topic."""
    build_linear(tmp_path / "models" / "lin.onnx")
    config = base_config(
        broker,
        tmp_path,
        models={"lin": {}},
        pipelines={
            "p": {"model": "lin", "input": {"topic": "in/#"}, "output": {"topic": "out/{1}/r"}}
        },
    )
    agent = agent_factory(config)
    agent.wait_for_event("agent_serving")
    rec = recorder("out/#", ERRORS)
    client = publisher(broker)
    client.publish("in", b"[1, 2, 3, 4]", qos=1)
    client.publish("in/line3/a", b"[1, 2, 3, 4]", qos=1)
    rec.wait_for(
        lambda ms: (
            any(m.topic.startswith("out/") for m in ms) and any(m.topic == ERRORS for m in ms)
        )
    )
    client.loop_stop()
    error = json.loads(rec.on(ERRORS)[0].payload)
    assert error["topic"] == "in"
    assert "has no level for {1} of output.topic 'out/{1}/r'" in error["reason"]
    assert [m.topic for m in rec.messages if m.topic.startswith("out/")] == ["out/line3/a/r"]
