"""Readings to results end to end: a real broker, real ONNX models, the daemon as a process."""

from __future__ import annotations

import hashlib
import io
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest

from tests.broker import MosquittoBroker, Received, Recorder, publisher
from tests.conftest import AgentProcess, base_config
from tests.onnx_builders import (
    build_batch_probe,
    build_classifier,
    build_linear,
    build_two_inputs,
)

pytestmark = pytest.mark.broker

AgentFactory = Callable[[dict[str, Any]], AgentProcess]
ERRORS = "edge/dev1/errors"


def sha256_version(path: Path) -> str:
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


def direct(model: Path, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    return np.asarray(session.run(None, {"x": x})[0])


def results(rec: Recorder, prefix: str = "results/") -> list[dict[str, Any]]:
    return [json.loads(m.payload) for m in rec.messages if m.topic.startswith(prefix)]


def linear_pipeline(**input_extra: Any) -> dict[str, Any]:
    return {
        "model": "lin",
        "input": {"topic": "sensors/+/x", **input_extra},
        "output": {"topic": "results/{1}/{pipeline}"},
    }


def start_agent(agent_factory: AgentFactory, config: dict[str, Any]) -> AgentProcess:
    agent = agent_factory(config)
    agent.wait_for_event("agent_serving")
    return agent


def test_json_readings_give_results_equal_to_onnxruntime(
    broker: MosquittoBroker,
    tmp_path: Path,
    agent_factory: AgentFactory,
    recorder: Callable[..., Recorder],
) -> None:
    """JSON readings from two sensors: one result each, on the templated topic, with the
    echoed id, the model's sha256 version, outputs equal to a direct session.run, and a
    receive-to-publish latency that is above zero and inside the time the test saw pass
    between sending the readings and receiving the results."""
    model = build_linear(tmp_path / "models" / "lin.onnx", features=4, outputs=2)
    config = base_config(
        broker,
        tmp_path,
        models={"lin": {"file": "lin.onnx"}},
        pipelines={"p": linear_pipeline(field="x")},
    )
    start_agent(agent_factory, config)
    rec = recorder("results/#")
    rng = np.random.default_rng(1)
    inputs = rng.standard_normal((20, 4)).astype(np.float32)
    client = publisher(broker)
    sent_at = time.monotonic()
    for i, row in enumerate(inputs):
        sensor = "s1" if i % 2 else "s2"
        client.publish(f"sensors/{sensor}/x", json.dumps({"id": i, "x": row.tolist()}), qos=1)
    rec.wait_for(lambda ms: len(ms) >= 20)
    window_ms = (time.monotonic() - sent_at) * 1000
    client.loop_stop()
    expected = direct(model, inputs)
    found = results(rec)
    assert sorted(r["id"] for r in found) == list(range(20))  # each once: no duplicates
    for result in found:
        assert result["pipeline"] == "p"
        assert result["model"] == "lin"
        assert result["version"] == sha256_version(model)
        # Received after sent_at and published before the test got it: within the window.
        assert 0 < result["latency_ms"] <= window_ms, (result["latency_ms"], window_ms)
        np.testing.assert_allclose(
            result["outputs"]["y"], expected[result["id"]], rtol=1e-5, atol=1e-6
        )
    topics = {m.topic for m in rec.messages}
    assert topics == {"results/s1/p", "results/s2/p"}


def test_raw_and_npy_formats(
    broker: MosquittoBroker,
    tmp_path: Path,
    agent_factory: AgentFactory,
    recorder: Callable[..., Recorder],
) -> None:
    """raw little-endian float64 and .npy payloads decode to the same results."""
    model = build_linear(tmp_path / "models" / "lin.onnx", features=4, outputs=2)
    raw = {
        "model": "lin",
        "input": {"topic": "raw/+", "format": "raw", "dtype": "float64", "shape": [4]},
        "output": {"topic": "results/raw/{1}"},
    }
    npy = {
        "model": "lin",
        "input": {"topic": "npy/+", "format": "npy"},
        "output": {"topic": "results/npy/{1}"},
    }
    config = base_config(broker, tmp_path, models={"lin": {}}, pipelines={"raw": raw, "npy": npy})
    start_agent(agent_factory, config)
    rec = recorder("results/#")
    x = np.array([0.5, -1.0, 2.0, 3.25])
    client = publisher(broker)
    client.publish("raw/a", x.astype("<f8").tobytes(), qos=1)
    buffer = io.BytesIO()
    np.save(buffer, x.astype(np.float32))
    client.publish("npy/b", buffer.getvalue(), qos=1)
    rec.wait_for(lambda ms: len(ms) >= 2)
    client.loop_stop()
    expected = direct(model, x[None].astype(np.float32))[0]
    got = {m.topic: json.loads(m.payload) for m in rec.messages}
    for topic in ("results/raw/a", "results/npy/b"):
        assert got[topic]["id"] is None
        np.testing.assert_allclose(got[topic]["outputs"]["y"], expected, rtol=1e-5)


def test_multi_input_model_and_constants(
    broker: MosquittoBroker,
    tmp_path: Path,
    agent_factory: AgentFactory,
    recorder: Callable[..., Recorder],
) -> None:
    """Named inputs feed a two-input model; `constants` fixes one input of another pipeline."""
    build_two_inputs(tmp_path / "models" / "two.onnx", features=3)
    named = {"model": "two", "input": {"topic": "named/+"}, "output": {"topic": "res/named"}}
    const = {
        "model": "two",
        "input": {"topic": "const/+", "tensor": "a"},
        "output": {"topic": "res/const"},
        "constants": {"b": [10, 20, 30]},
    }
    config = base_config(
        broker, tmp_path, models={"two": {}}, pipelines={"named": named, "const": const}
    )
    start_agent(agent_factory, config)
    rec = recorder("res/#")
    client = publisher(broker)
    client.publish(
        "named/1", json.dumps({"id": "n", "inputs": {"a": [1, 2, 3], "b": [4, 5, 6]}}), qos=1
    )
    for i in range(5):
        client.publish("const/1", json.dumps([1, 2, i]), qos=1)
    rec.wait_for(lambda ms: len(ms) >= 6)
    client.loop_stop()
    named_result = json.loads(rec.on("res/named")[0].payload)
    assert named_result["id"] == "n"
    assert named_result["outputs"] == {"sum": [5, 7, 9], "product": [4, 10, 18]}
    sums = sorted(json.loads(m.payload)["outputs"]["sum"][2] for m in rec.on("res/const"))
    assert sums == [30, 31, 32, 33, 34]


def test_bad_readings_are_reported_and_do_not_disturb_good_ones(
    broker: MosquittoBroker,
    tmp_path: Path,
    agent_factory: AgentFactory,
    recorder: Callable[..., Recorder],
) -> None:
    """Malformed JSON, a wrong shape and NaN each produce an error naming the pipeline,
    topic and reason; good readings around them still get results."""
    build_linear(tmp_path / "models" / "lin.onnx", features=4)
    config = base_config(broker, tmp_path, models={"lin": {}}, pipelines={"p": linear_pipeline()})
    agent = start_agent(agent_factory, config)
    rec = recorder("results/#", ERRORS)
    client = publisher(broker)
    client.publish("sensors/a/x", b"[1, 2, 3, 4]", qos=1)
    client.publish("sensors/b/x", b"{broken", qos=1)
    client.publish("sensors/c/x", b"[1, 2, 3]", qos=1)
    client.publish("sensors/d/x", b"[1, 2, NaN, 4]", qos=1)
    client.publish("sensors/e/x", b"[4, 3, 2, 1]", qos=1)
    rec.wait_for(lambda ms: len(ms) >= 5)
    client.loop_stop()
    errors = {json.loads(m.payload)["topic"]: json.loads(m.payload) for m in rec.on(ERRORS)}
    assert set(errors) == {"sensors/b/x", "sensors/c/x", "sensors/d/x"}
    assert "not valid JSON" in errors["sensors/b/x"]["reason"]
    assert "expects shape [4] per reading" in errors["sensors/c/x"]["reason"]
    assert "NaN" in errors["sensors/d/x"]["reason"]
    assert all(e["pipeline"] == "p" and e["ts"] > 0 for e in errors.values())
    assert {m.topic for m in rec.messages if m.topic.startswith("results/")} == {
        "results/a/p",
        "results/e/p",
    }
    assert agent.process.poll() is None


def test_failed_model_does_not_stop_the_others(
    broker: MosquittoBroker,
    tmp_path: Path,
    agent_factory: AgentFactory,
    recorder: Callable[..., Recorder],
) -> None:
    """A corrupt and a missing model file end FAILED (retained, with the reason); their
    pipelines report errors; the healthy pipeline keeps serving."""
    build_linear(tmp_path / "models" / "good.onnx", features=4)
    (tmp_path / "models" / "corrupt.onnx").write_bytes(np.random.default_rng(0).bytes(2000))
    config = base_config(
        broker,
        tmp_path,
        models={"good": {}, "corrupt": {}, "missing": {}},
        pipelines={
            "good": {
                "model": "good",
                "input": {"topic": "in/good"},
                "output": {"topic": "results/good"},
            },
            "bad": {
                "model": "corrupt",
                "input": {"topic": "in/bad"},
                "output": {"topic": "results/bad"},
            },
            "gone": {
                "model": "missing",
                "input": {"topic": "in/gone"},
                "output": {"topic": "results/gone"},
            },
        },
    )
    start_agent(agent_factory, config)
    settled = {"READY", "FAILED"}

    def settled_states(ms: list[Received]) -> bool:
        latest = {m.topic: json.loads(m.payload)["state"] for m in ms}
        return len(latest) >= 3 and set(latest.values()) <= settled

    # The states may reach the first recorder live (published after it subscribed) or
    # retained; a second recorder, subscribed once all three settled, proves they are retained.
    recorder("edge/dev1/models/+").wait_for(settled_states)
    states = recorder("edge/dev1/models/+")
    states.wait_for(lambda ms: len({m.topic for m in ms if m.retain}) >= 3 and settled_states(ms))
    latest = {m.topic.rsplit("/", 1)[1]: json.loads(m.payload) for m in states.messages}
    assert latest["good"]["state"] == "READY"
    assert latest["good"]["version"].startswith("sha256:")
    assert latest["good"]["providers"] == ["CPUExecutionProvider"]
    assert latest["corrupt"]["state"] == "FAILED"
    assert "not an ONNX model" in latest["corrupt"]["error"]
    assert latest["missing"]["state"] == "FAILED"
    assert "model file not found" in latest["missing"]["error"]

    rec = recorder("results/#", ERRORS)
    client = publisher(broker)
    for topic in ("in/bad", "in/gone", "in/good"):
        client.publish(topic, b"[1, 2, 3, 4]", qos=1)
    rec.wait_for(lambda ms: len(ms) >= 3)
    client.loop_stop()
    assert [m.topic for m in rec.messages if m.topic.startswith("results/")] == ["results/good"]
    reasons = [json.loads(m.payload)["reason"] for m in rec.on(ERRORS)]
    assert any("model 'corrupt' is not serving (FAILED: not an ONNX model" in r for r in reasons)
    assert any("model 'missing' is not serving (FAILED: model file not found" in r for r in reasons)


def test_burst_is_batched_and_every_reading_answered(
    broker: MosquittoBroker,
    tmp_path: Path,
    agent_factory: AgentFactory,
    recorder: Callable[..., Recorder],
) -> None:
    """2,000 readings sent as fast as possible: exactly one correct result per reading."""
    model = build_linear(tmp_path / "models" / "lin.onnx", features=8, outputs=3)
    config = base_config(
        broker, tmp_path, models={"lin": {}}, pipelines={"p": linear_pipeline(field="x")}
    )
    start_agent(agent_factory, config)
    rec = recorder("results/#")
    inputs = np.random.default_rng(2).standard_normal((2000, 8)).astype(np.float32)
    client = publisher(broker)
    for i, row in enumerate(inputs):
        client.publish("sensors/s/x", json.dumps({"id": i, "x": row.tolist()}), qos=1)
    rec.wait_for(lambda ms: len(ms) >= 2000, timeout_s=60)
    client.loop_stop()
    found = results(rec)
    assert sorted(r["id"] for r in found) == list(range(2000))
    expected = direct(model, inputs)
    got = np.array([r["outputs"]["y"] for r in sorted(found, key=lambda r: r["id"])])
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_fixed_batch_model_runs_one_at_a_time(
    broker: MosquittoBroker,
    tmp_path: Path,
    agent_factory: AgentFactory,
    recorder: Callable[..., Recorder],
) -> None:
    """A burst of 50 readings to a slow model queues up: on a model with a dynamic first
    axis they share runs (batches above 1), while a model whose first axis is fixed at 1 is
    never fed a bigger batch. Both answer every reading exactly once, without errors.

    The model reports the first axis of the run behind each result (``batch_size``)."""
    build_batch_probe(tmp_path / "models" / "fixed.onnx", batch=1, layers=96)
    build_batch_probe(tmp_path / "models" / "dynamic.onnx", layers=96)
    config = base_config(
        broker,
        tmp_path,
        models={"fixed": {}, "dynamic": {}},
        pipelines={
            name: {
                "model": name,
                "input": {"topic": f"{name}/+", "field": "x"},
                "output": {"topic": f"results/{name}/{{1}}"},
            }
            for name in ("fixed", "dynamic")
        },
    )
    start_agent(agent_factory, config)
    rec = recorder("results/#", ERRORS)
    client = publisher(broker)
    for i in range(50):
        for name in ("fixed", "dynamic"):
            client.publish(f"{name}/s", json.dumps({"id": i, "x": [i / 50] * 8}), qos=1)
    rec.wait_for(lambda ms: len(ms) >= 100, timeout_s=60)
    client.loop_stop()
    assert not rec.on(ERRORS), [m.payload for m in rec.on(ERRORS)]
    fixed, dynamic = results(rec, "results/fixed/"), results(rec, "results/dynamic/")
    assert sorted(r["id"] for r in fixed) == list(range(50))
    assert sorted(r["id"] for r in dynamic) == list(range(50))
    assert {r["outputs"]["batch_size"][0] for r in fixed} == {1.0}
    # The control: the same burst on the batchable model formed batches, so readings did
    # queue behind the fixed model's runs too; it took them one at a time.
    assert max(r["outputs"]["batch_size"][0] for r in dynamic) > 1


def test_sklearn_classifier_outputs_are_published_as_json(
    broker: MosquittoBroker,
    tmp_path: Path,
    agent_factory: AgentFactory,
    recorder: Callable[..., Recorder],
) -> None:
    """A skl2onnx classifier's sequence-of-maps probabilities are published, not rejected,
    and match onnxruntime's own answer."""
    from skl2onnx import to_onnx  # noqa: PLC0415
    from sklearn.linear_model import LogisticRegression  # noqa: PLC0415 - heavy import

    rng = np.random.default_rng(0)
    x = rng.standard_normal((200, 4)).astype(np.float32)
    y = (x[:, 0] > 0).astype(int) + (x[:, 1] > 0)
    onnx_model = to_onnx(LogisticRegression(max_iter=300).fit(x, y), x[:1], target_opset=15)
    path = tmp_path / "models" / "clf.onnx"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(onnx_model.SerializeToString())
    config = base_config(
        broker,
        tmp_path,
        models={"clf": {}},
        pipelines={
            "p": {"model": "clf", "input": {"topic": "in/+"}, "output": {"topic": "out/{1}"}}
        },
    )
    start_agent(agent_factory, config)
    rec = recorder("out/#")
    client = publisher(broker)
    for i in range(5):
        client.publish(f"in/{i}", json.dumps(x[i].tolist()), qos=1)
    rec.wait_for(lambda ms: len(ms) >= 5)
    client.loop_stop()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    labels, probabilities = session.run(None, {"X": x[:5]})
    # One result per reading: each index once, none missing, none twice.
    assert sorted(int(m.topic.split("/")[1]) for m in rec.messages) == list(range(5))
    for message in rec.messages:
        index = int(message.topic.split("/")[1])
        outputs = json.loads(message.payload)["outputs"]
        assert outputs["output_label"] == int(labels[index])
        got = {int(k): v for k, v in outputs["output_probability"].items()}
        assert got == pytest.approx(probabilities[index], rel=1e-4, abs=1e-6)


def test_postprocess_softmax_top_k_labels(
    broker: MosquittoBroker,
    tmp_path: Path,
    agent_factory: AgentFactory,
    recorder: Callable[..., Recorder],
) -> None:
    """output.postprocess adds label/score and labels/scores from a labels file."""
    build_classifier(tmp_path / "models" / "clf.onnx", features=4, classes=3)
    (tmp_path / "models" / "labels.txt").write_text("normal\nimbalance\nbearing wear\n")
    config = base_config(
        broker,
        tmp_path,
        models={"clf": {}},
        pipelines={
            "p": {
                "model": "clf",
                "input": {"topic": "in/+"},
                "output": {
                    "topic": "out/{1}",
                    "postprocess": {
                        "softmax": True,
                        "argmax": True,
                        "top_k": 2,
                        "labels": "labels.txt",
                    },
                },
            }
        },
    )
    start_agent(agent_factory, config)
    rec = recorder("out/#")
    client = publisher(broker)
    x = [0.3, -1.2, 2.0, 0.7]
    client.publish("in/a", json.dumps(x), qos=1)
    rec.wait_for(lambda ms: len(ms) >= 1)
    client.loop_stop()
    result = json.loads(rec.messages[0].payload)
    session = ort.InferenceSession(
        str(tmp_path / "models" / "clf.onnx"), providers=["CPUExecutionProvider"]
    )
    logits = session.run(None, {"x": np.array([x], dtype=np.float32)})[0][0]
    probabilities = np.exp(logits - logits.max())
    probabilities /= probabilities.sum()
    names = ["normal", "imbalance", "bearing wear"]
    order = np.argsort(-probabilities)
    assert result["label"] == names[order[0]]
    assert result["score"] == pytest.approx(probabilities[order[0]])
    assert result["labels"] == [names[i] for i in order[:2]]
    assert result["scores"] == pytest.approx(probabilities[order[:2]].tolist())
    np.testing.assert_allclose(result["outputs"]["logits"], logits, rtol=1e-5)
