"""Hot reload end to end: a real broker, real models, the daemon as a process."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.broker import MosquittoBroker, Recorder, publisher
from tests.conftest import AgentProcess, base_config
from tests.onnx_builders import build_linear, linear_weights

pytestmark = pytest.mark.broker

AgentFactory = Callable[..., AgentProcess]
STATE = "edge/dev1/models/lin"
ERRORS = "edge/dev1/errors"


def version_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def replace_atomically(target: Path, data: bytes) -> None:
    """What an OTA install or `rsync` does: a temp file renamed over the model."""
    temp = target.with_name(target.name + ".tmp")
    temp.write_bytes(data)
    os.replace(temp, target)


def make_models(tmp_path: Path) -> tuple[bytes, bytes]:
    a = build_linear(tmp_path / "build" / "a.onnx", features=4, outputs=2, seed=0).read_bytes()
    b = build_linear(tmp_path / "build" / "b.onnx", features=4, outputs=2, seed=1).read_bytes()
    return a, b


def start(
    agent_factory: AgentFactory,
    broker: MosquittoBroker,
    tmp_path: Path,
    first: bytes,
    log_level: str = "debug",
    **pipeline_input: Any,
) -> AgentProcess:
    (tmp_path / "models").mkdir(exist_ok=True)
    (tmp_path / "models" / "lin.onnx").write_bytes(first)
    config = base_config(
        broker,
        tmp_path,
        models={"lin": {}},
        pipelines={
            "p": {
                "model": "lin",
                "input": {"topic": "in/+", "field": "x", **pipeline_input},
                "output": {"topic": "out/{1}"},
            }
        },
    )
    agent = agent_factory(config, log_level=log_level)
    agent.wait_for_event("agent_serving")
    return agent


def states(rec: Recorder) -> list[dict[str, Any]]:
    return [json.loads(m.payload) for m in rec.on(STATE)]


class SteadyStream:
    """Readings ``{"id": i, "x": inputs[i]}`` on ``topic`` at ``rate`` per second, from a
    background thread, until stopped (or until the inputs run out)."""

    def __init__(
        self, broker: MosquittoBroker, topic: str, inputs: np.ndarray[Any, Any], rate: float
    ) -> None:
        self._broker, self._topic, self._inputs, self._rate = broker, topic, inputs, rate
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="steady-stream")
        self.sent = 0

    def start(self) -> SteadyStream:
        self._thread.start()
        return self

    def stop(self) -> int:
        """Stop sending; returns how many readings were sent (ids 0 to that, exclusive)."""
        self._stop.set()
        self._thread.join()
        return self.sent

    def _run(self) -> None:
        client = publisher(self._broker)
        started = time.monotonic()
        last = None
        for index in range(len(self._inputs)):
            if self._stop.is_set():
                break
            delay = started + index / self._rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            last = client.publish(
                self._topic, json.dumps({"id": index, "x": self._inputs[index].tolist()}), qos=1
            )
            self.sent = index + 1
        # QoS 1 leaves in order: once the last is out, all are.
        deadline = time.monotonic() + 30
        while last is not None and not last.is_published() and time.monotonic() < deadline:
            time.sleep(0.05)
        client.disconnect()
        client.loop_stop()


def wait_until_served(rec: Recorder, version: str, after: int) -> None:
    """Wait (generously) for a result of ``version`` among the messages from ``after`` on."""
    needle = version.encode()
    rec.wait_for(lambda ms: any(needle in m.payload for m in ms[after:]), timeout_s=30)


def test_results_follow_each_replacement_with_no_lost_reading(
    broker: MosquittoBroker,
    tmp_path: Path,
    agent_factory: AgentFactory,
    recorder: Callable[..., Recorder],
) -> None:
    """1,000 readings/s while the model file is replaced 20 times (alternating two models,
    by rename and by rewriting in place): every reading gets exactly one result, each
    result's version is the sha256 of the model that computed it, and in the order results
    were made the versions are exactly the start-up model then each replacement in turn:
    every replacement is served, and once it is, the model it replaced never answers again.
    (How fast a switch is, is measured by scripts/bench_reload.py, not tested here.)"""
    model_a, model_b = make_models(tmp_path)
    # At 1,000 readings/s, paho's per-packet debug lines would be most of the daemon's
    # work: on a loaded test machine it fell behind the stream by tens of seconds.
    agent = start(agent_factory, broker, tmp_path, model_a, log_level="info")
    rec = recorder("out/#")
    rng = np.random.default_rng(5)
    # Room for 120 s of readings; the stream stops once the last replacement serves.
    inputs = rng.standard_normal((120_000, 4)).astype(np.float32)
    expected = {}
    for data, seed in ((model_a, 0), (model_b, 1)):
        weight, bias = linear_weights(4, 2, seed)
        expected[version_of(data)] = inputs @ weight + bias

    stream = SteadyStream(broker, "in/s1", inputs, rate=1000.0).start()
    served = [version_of(model_a)]
    try:
        wait_until_served(rec, served[0], after=0)
        target = tmp_path / "models" / "lin.onnx"
        for k in range(20):
            data = model_b if k % 2 == 0 else model_a
            seen = len(rec.messages)
            if k % 4 < 2:
                replace_atomically(target, data)
            else:
                target.write_bytes(data)  # rewritten in place: acted on at close
            served.append(version_of(data))
            wait_until_served(rec, served[-1], after=seen)
            time.sleep(0.5)  # let the new version answer a share of the stream
    finally:
        total = stream.stop()
    rec.wait_for(lambda ms: len(ms) >= total, timeout_s=90)
    time.sleep(0.5)  # room for a duplicate to show up
    results = sorted((json.loads(m.payload) for m in rec.messages), key=lambda r: r["seq"])
    ids = [r["id"] for r in results]
    assert len(ids) == total
    assert sorted(ids) == list(range(total)), "a reading was lost or answered twice"
    for result in results:
        np.testing.assert_allclose(
            result["outputs"]["y"], expected[result["version"]][result["id"]], rtol=1e-5, atol=1e-5
        )
    versions = [r["version"] for r in results]
    runs = [v for i, v in enumerate(versions) if i == 0 or v != versions[i - 1]]
    short = [v[len("sha256:") :][:8] for v in runs]
    assert runs == served, (
        f"versions answered in turn: {short[:40]} ({len(runs)} runs); expected "
        f"{[v[len('sha256:') :][:8] for v in served]}"
    )
    assert agent.process.poll() is None


def test_same_bytes_again_is_a_no_op(
    broker: MosquittoBroker,
    tmp_path: Path,
    agent_factory: AgentFactory,
    recorder: Callable[..., Recorder],
) -> None:
    """Rewriting the file with identical bytes publishes no LOADING and loads nothing."""
    model_a, _ = make_models(tmp_path)
    agent = start(agent_factory, broker, tmp_path, model_a)
    rec = recorder(STATE)
    rec.wait_for(lambda ms: len(ms) >= 1)
    replace_atomically(tmp_path / "models" / "lin.onnx", model_a)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        if any(e.get("event") == "model_unchanged" for e in agent.log_events()):
            break
        time.sleep(0.05)
    assert any(e.get("event") == "model_unchanged" for e in agent.log_events())
    assert len(rec.on(STATE)) == 1


@pytest.mark.parametrize("kind", ["truncated", "random", "incompatible", "empty"])
def test_bad_file_keeps_the_old_model_serving(
    broker: MosquittoBroker,
    tmp_path: Path,
    agent_factory: AgentFactory,
    recorder: Callable[..., Recorder],
    kind: str,
) -> None:
    """A truncated file, random bytes, an ONNX model with incompatible inputs or an empty
    file: the load fails and says why, the old model keeps serving, the next good file loads."""
    model_a, model_b = make_models(tmp_path)
    agent = start(agent_factory, broker, tmp_path, model_a, shape=[4])
    rec = recorder(STATE, ERRORS, "out/#")
    rec.wait_for(lambda ms: any(m.topic == STATE for m in ms))
    bad = {
        "truncated": model_b[: len(model_b) // 2],
        "random": np.random.default_rng(3).bytes(5000),
        "incompatible": build_linear(tmp_path / "build" / "wide.onnx", features=5).read_bytes(),
        "empty": b"",
    }[kind]
    replace_atomically(tmp_path / "models" / "lin.onnx", bad)
    rec.wait_for(
        lambda ms: (
            any(m.topic == ERRORS for m in ms)
            and any(
                (json.loads(m.payload).get("last_load") or {}).get("state") == "FAILED"
                for m in ms
                if m.topic == STATE
            )
        )
    )
    state = states(rec)[-1]
    assert state["state"] == "READY"
    assert state["version"] == version_of(model_a)
    assert state["last_load"]["state"] == "FAILED"
    reason = {
        "truncated": "not an ONNX model (the file does not parse as an ONNX protobuf)",
        "random": "not an ONNX model",
        "incompatible": "input 'x' expects [5] per reading, pipeline 'p' sends [4]",
        "empty": "model file is empty",
    }[kind]
    assert reason in state["error"]
    error = json.loads(rec.on(ERRORS)[0].payload)
    assert error["model"] == "lin"
    assert reason in error["reason"]
    client = publisher(broker)
    client.publish("in/a", json.dumps({"id": 1, "x": [1, 2, 3, 4]}), qos=1)
    rec.wait_for(lambda ms: any(m.topic == "out/a" for m in ms))
    assert json.loads(rec.on("out/a")[0].payload)["version"] == version_of(model_a)
    replace_atomically(tmp_path / "models" / "lin.onnx", model_b)
    rec.wait_for(
        lambda ms: any(
            json.loads(m.payload).get("version") == version_of(model_b) and m.topic == STATE
            for m in ms
        )
    )
    client.publish("in/b", json.dumps({"id": 2, "x": [1, 2, 3, 4]}), qos=1)
    rec.wait_for(lambda ms: any(m.topic == "out/b" for m in ms))
    client.loop_stop()
    assert json.loads(rec.on("out/b")[0].payload)["version"] == version_of(model_b)
    assert states(rec)[-1]["error"] is None
    assert agent.process.poll() is None


def test_slow_write_gives_a_single_reload_after_completion(
    broker: MosquittoBroker,
    tmp_path: Path,
    agent_factory: AgentFactory,
    recorder: Callable[..., Recorder],
) -> None:
    """A model copied slowly over 3 s (scp over a weak link) is loaded once, complete."""
    model_a, _ = make_models(tmp_path)
    big = build_linear(tmp_path / "build" / "big.onnx", seed=1, pad_bytes=300_000).read_bytes()
    agent = start(agent_factory, broker, tmp_path, model_a)
    rec = recorder(STATE, ERRORS)
    rec.wait_for(lambda ms: len(ms) >= 1)
    chunks = [big[i : i + len(big) // 15 + 1] for i in range(0, len(big), len(big) // 15 + 1)]
    with (tmp_path / "models" / "lin.onnx").open("wb") as handle:
        for chunk in chunks:
            handle.write(chunk)
            handle.flush()
            time.sleep(3.0 / len(chunks))
        done = time.time()
    rec.wait_for(
        lambda ms: any(
            json.loads(m.payload).get("version") == version_of(big) for m in ms if m.topic == STATE
        ),
        timeout_s=10,
    )
    time.sleep(1.0)
    # The first state is the retained one from start-up; LOADING may be folded into READY
    # (retained topics publish the latest value).
    attempts = [s["last_load"] for s in states(rec)[1:]]
    assert {a["version"] for a in attempts} == {version_of(big)}, "a partial file was loaded"
    assert [a["state"] for a in attempts if a["state"] != "LOADING"] == ["READY"]
    assert attempts[-1]["started"] >= done - 0.05
    assert not rec.on(ERRORS)
    assert agent.process.poll() is None


def test_model_missing_at_start_loads_when_the_file_appears(
    broker: MosquittoBroker,
    tmp_path: Path,
    agent_factory: AgentFactory,
    recorder: Callable[..., Recorder],
) -> None:
    """FAILED at start-up (no file), then serving as soon as a good file is copied in."""
    make_models(tmp_path)
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
    rec = recorder(STATE, "out/#")
    rec.wait_for(lambda ms: any(json.loads(m.payload)["state"] == "FAILED" for m in ms))
    shutil.copyfile(tmp_path / "build" / "a.onnx", tmp_path / "models" / "lin.onnx")
    rec.wait_for(
        lambda ms: any(
            json.loads(m.payload).get("state") == "READY" for m in ms if m.topic == STATE
        )
    )
    client = publisher(broker)
    client.publish("in/a", b"[1, 2, 3, 4]", qos=1)
    rec.wait_for(lambda ms: any(m.topic == "out/a" for m in ms))
    client.loop_stop()
    assert agent.process.poll() is None


def test_models_dir_deleted_and_recreated_while_running(
    broker: MosquittoBroker,
    tmp_path: Path,
    agent_factory: AgentFactory,
    recorder: Callable[..., Recorder],
) -> None:
    """The models folder is removed (a botched provisioning script) and made again with a new
    model: the serving model keeps answering meanwhile (it is in memory), and the file put
    into the new folder is loaded and served, without a restart."""
    model_a, model_b = make_models(tmp_path)
    agent = start(agent_factory, broker, tmp_path, model_a)
    rec = recorder(STATE, "out/#")
    client = publisher(broker)
    try:
        shutil.rmtree(tmp_path / "models")
        time.sleep(1.0)  # the watcher sees its folder go
        client.publish("in/a", b'{"x": [1, 2, 3, 4]}', qos=1)
        rec.wait_for(lambda ms: any(m.topic == "out/a" for m in ms), timeout_s=15)
        (tmp_path / "models").mkdir()
        time.sleep(0.5)
        replace_atomically(tmp_path / "models" / "lin.onnx", model_b)

        def serving_b(ms: list[Any]) -> bool:
            return any(
                json.loads(m.payload).get("version") == version_of(model_b)
                and json.loads(m.payload).get("state") == "READY"
                for m in ms
                if m.topic == STATE
            )

        rec.wait_for(serving_b, timeout_s=60)
        seen = len(rec.messages)
        client.publish("in/a", b'{"x": [1, 2, 3, 4]}', qos=1)
        rec.wait_for(
            lambda ms: any(
                m.topic == "out/a" and json.loads(m.payload)["version"] == version_of(model_b)
                for m in ms[seen:]
            ),
            timeout_s=15,
        )
    finally:
        client.disconnect()
        client.loop_stop()
    assert agent.process.poll() is None
