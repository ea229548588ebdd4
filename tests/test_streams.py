"""Stateful streams: each stream's state outputs feed its next reading, streams kept apart."""

from __future__ import annotations

import importlib.util
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest

from tests.broker import MosquittoBroker, Recorder, publisher
from tests.conftest import AgentProcess, base_config
from tests.onnx_builders import build_recurrent, recurrent_weights

pytestmark = pytest.mark.broker

AgentFactory = Callable[[dict[str, Any]], AgentProcess]


def interleaved_run(
    broker: MosquittoBroker, rec: Recorder, chunks: dict[str, np.ndarray], topic: str
) -> dict[str, list[dict[str, Any]]]:
    """Publish chunk i of every stream in turn; return each stream's results in order."""
    client = publisher(broker)
    count = len(next(iter(chunks.values())))
    for index in range(count):
        for stream, data in chunks.items():
            client.publish(
                topic.format(stream),
                json.dumps({"id": f"{stream}-{index}", "x": data[index].tolist()}),
                qos=1,
            )
    total = count * len(chunks)
    rec.wait_for(lambda ms: len(ms) >= total, timeout_s=60)
    client.loop_stop()
    results: dict[str, list[dict[str, Any]]] = {stream: [] for stream in chunks}
    for message in rec.messages:
        body = json.loads(message.payload)
        results[body["id"].split("-")[0]].append(body)
    for stream_results in results.values():
        stream_results.sort(key=lambda r: int(r["id"].split("-")[1]))
    return results


def test_recurrent_model_carries_state_per_stream(
    broker: MosquittoBroker,
    tmp_path: Path,
    agent_factory: AgentFactory,
    recorder: Callable[..., Recorder],
) -> None:
    """Two interleaved streams through a recurrent cell give exactly the outputs of a direct
    loop that carries each stream's state, and the state output is not published."""
    build_recurrent(tmp_path / "models" / "rnn.onnx", features=4, hidden=3)
    config = base_config(
        broker,
        tmp_path,
        models={"rnn": {}},
        pipelines={
            "p": {
                "model": "rnn",
                "input": {"topic": "sig/+", "field": "x"},
                "output": {"topic": "res/{1}"},
                "state": {"key": "{1}", "inputs": {"h": "h_out"}, "reset_after_s": 60},
            }
        },
    )
    agent = agent_factory(config)
    agent.wait_for_event("agent_serving")
    rec = recorder("res/#")
    rng = np.random.default_rng(0)
    chunks = {
        "a": rng.standard_normal((30, 4)).astype(np.float32),
        "b": rng.standard_normal((30, 4)).astype(np.float32),
    }
    results = interleaved_run(broker, rec, chunks, "sig/{}")
    w, u = recurrent_weights(4, 3)
    for stream, data in chunks.items():
        state = np.zeros(3, dtype=np.float32)
        for index, x in enumerate(data):
            state = np.tanh(x @ w + state @ u)
            got = results[stream][index]
            assert set(got["outputs"]) == {"y"}
            np.testing.assert_allclose(got["outputs"]["y"], state, rtol=1e-5, atol=1e-6)


def test_state_resets_after_silence(
    broker: MosquittoBroker,
    tmp_path: Path,
    agent_factory: AgentFactory,
    recorder: Callable[..., Recorder],
) -> None:
    """A stream silent for longer than reset_after_s starts again from zeros.

    The same reading three times: the second, sent right after the first, continues from the
    first one's state (so its output differs); the third, after a silence several times
    reset_after_s, gives the first one's output again, not the continued state's."""
    model = build_recurrent(tmp_path / "models" / "rnn.onnx")
    reset_after_s = 1.0
    config = base_config(
        broker,
        tmp_path,
        models={"rnn": {}},
        pipelines={
            "p": {
                "model": "rnn",
                "input": {"topic": "sig/+"},
                "output": {"topic": "res/{1}"},
                "state": {"inputs": {"h": "h_out"}, "reset_after_s": reset_after_s},
            }
        },
    )
    agent = agent_factory(config)
    agent.wait_for_event("agent_serving")
    rec = recorder("res/#")
    client = publisher(broker)
    x = [0.5, -0.2, 0.1, 0.3]
    # Back to back: milliseconds apart, far inside reset_after_s.
    client.publish("sig/a", json.dumps(x), qos=1)
    client.publish("sig/a", json.dumps(x), qos=1)
    rec.wait_for(lambda ms: len(ms) >= 2)
    time.sleep(4 * reset_after_s)
    client.publish("sig/a", json.dumps(x), qos=1)
    rec.wait_for(lambda ms: len(ms) >= 3)
    client.loop_stop()
    first, second, third = (np.array(json.loads(m.payload)["outputs"]["y"]) for m in rec.messages)

    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])

    def step(state: np.ndarray) -> np.ndarray:
        return np.asarray(
            session.run(["h_out"], {"x": np.array([x], dtype=np.float32), "h": state[None]})[0][0]
        )

    fresh = step(np.zeros(3, dtype=np.float32))
    carried = step(fresh)
    assert not np.allclose(fresh, carried, atol=1e-3)  # the check below can tell them apart
    np.testing.assert_allclose(first, fresh, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(second, carried, rtol=1e-5, atol=1e-6)  # state carried
    np.testing.assert_allclose(third, fresh, rtol=1e-5, atol=1e-6)  # reset to zeros
    assert not np.allclose(third, step(carried), atol=1e-3)  # not the third continued step


@pytest.mark.skipif(
    importlib.util.find_spec("silero_vad") is None,
    reason="silero-vad is not installed (pip install --no-deps silero-vad)",
)
def test_silero_vad_matches_a_direct_loop(
    broker: MosquittoBroker,
    tmp_path: Path,
    agent_factory: AgentFactory,
    recorder: Callable[..., Recorder],
) -> None:
    """The silero-vad model (recurrent state [2, batch, 128], sample rate as a constant):
    two interleaved 16 kHz streams give the per-chunk speech probabilities of a direct loop."""
    spec = importlib.util.find_spec("silero_vad")
    assert spec is not None
    assert spec.submodule_search_locations is not None
    source = Path(next(iter(spec.submodule_search_locations))) / "data" / "silero_vad.onnx"
    (tmp_path / "models").mkdir(exist_ok=True)
    (tmp_path / "models" / "vad.onnx").write_bytes(source.read_bytes())
    config = base_config(
        broker,
        tmp_path,
        models={"vad": {}},
        pipelines={
            "vad": {
                "model": "vad",
                "input": {"topic": "audio/+", "field": "x", "shape": [512]},
                "output": {"topic": "vad/{1}"},
                "state": {"key": "{1}", "inputs": {"state": "stateN"}},
                "constants": {"sr": 16000},
            }
        },
    )
    agent = agent_factory(config)
    agent.wait_for_event("agent_serving", timeout_s=30)
    rec = recorder("vad/#")
    rng = np.random.default_rng(1)
    t = np.arange(512 * 12) / 16000
    speechy = (0.5 * np.sin(2 * np.pi * 220 * t) * np.sin(2 * np.pi * 3 * t)).astype(np.float32)
    chunks = {
        "mic1": speechy.reshape(12, 512),
        "mic2": (0.01 * rng.standard_normal(512 * 12)).astype(np.float32).reshape(12, 512),
    }
    results = interleaved_run(broker, rec, chunks, "audio/{}")
    session = ort.InferenceSession(str(source), providers=["CPUExecutionProvider"])
    for stream, data in chunks.items():
        state = np.zeros((2, 1, 128), dtype=np.float32)
        for index, chunk in enumerate(data):
            prob, state = session.run(
                None, {"input": chunk[None], "state": state, "sr": np.array(16000, dtype=np.int64)}
            )
            got = results[stream][index]["outputs"]["output"]
            np.testing.assert_allclose(got, prob[0], rtol=1e-4, atol=1e-5)
