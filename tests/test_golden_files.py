"""A golden set beside a hand-dropped model: the daemon as a process, a real broker.

The operator copies ``NAME.golden.npz`` into ``models_dir`` first, then the model file: the
new model serves only if its outputs on the golden inputs are within the set's tolerances.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import onnxruntime as ort
import pytest

from agent.inference.golden import GoldenSet
from tests import model_zoo
from tests.broker import MosquittoBroker, Recorder, publisher
from tests.conftest import AgentProcess, base_config

AgentFactory = Callable[[dict[str, Any]], AgentProcess]
STATE = "edge/dev1/models/mlp"
ERRORS = "edge/dev1/errors"


def version_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def replace_atomically(target: Path, data: bytes) -> None:
    """What a careful copy does: a temp file renamed over the target."""
    temp = target.with_name(target.name + ".tmp")
    temp.write_bytes(data)
    os.replace(temp, target)


class Models:
    """The original MLP, copies nudged a little (within tolerance) and a lot (not), and a
    golden set made from the original's outputs."""

    def __init__(self, folder: Path) -> None:
        self.original = model_zoo.build_mlp(folder / "original.onnx")
        self.far = model_zoo.perturbed(self.original, folder / "far.onnx", scale=0.01)
        self.near = model_zoo.perturbed(self.original, folder / "near.onnx", scale=1e-7)
        self.near2 = model_zoo.perturbed(self.original, folder / "near2.onnx", scale=2e-7)
        x = model_zoo.sample_inputs(20, (model_zoo.FEATURES,))
        session = ort.InferenceSession(str(self.original), providers=["CPUExecutionProvider"])
        (y,) = session.run(None, {"x": x})
        self.golden = GoldenSet({"x": x}, {"y": y}).to_bytes()
        self.x = x


def start(
    agent_factory: AgentFactory, broker: MosquittoBroker, tmp_path: Path, first: Path
) -> AgentProcess:
    models_dir = tmp_path / "models"
    models_dir.mkdir(exist_ok=True)
    (models_dir / "mlp.onnx").write_bytes(first.read_bytes())
    config = base_config(
        broker,
        tmp_path,
        models={"mlp": {}},
        pipelines={
            "p": {
                "model": "mlp",
                "input": {"topic": "in/+", "field": "x"},
                "output": {"topic": "out/{1}"},
            }
        },
    )
    agent = agent_factory(config)
    agent.wait_for_event("agent_serving")
    return agent


def states(rec: Recorder) -> list[dict[str, Any]]:
    return [json.loads(m.payload) for m in rec.on(STATE)]


def wait_for_attempt(rec: Recorder, version: str, outcome: str) -> dict[str, Any]:
    """The first P/models/mlp whose last load of ``version`` ended ``outcome``."""

    def found(_: Any) -> bool:
        return any(
            (s.get("last_load") or {}).get("version") == version
            and s["last_load"]["state"] == outcome
            for s in states(rec)
        )

    rec.wait_for(found, timeout_s=30)
    return next(
        s
        for s in states(rec)
        if (s.get("last_load") or {}).get("version") == version
        and s["last_load"]["state"] == outcome
    )


def served_version(broker: MosquittoBroker, rec: Recorder, reading: str) -> str:
    """Send one reading; the version of the model that answered it."""
    client = publisher(broker)
    client.publish(f"in/{reading}", json.dumps({"x": [0.5] * model_zoo.FEATURES}), qos=1)
    rec.wait_for(lambda ms: any(m.topic == f"out/{reading}" for m in ms), timeout_s=30)
    client.loop_stop()
    version: str = json.loads(rec.on(f"out/{reading}")[0].payload)["version"]
    return version


@pytest.mark.broker
def test_a_failing_golden_set_keeps_the_serving_model_and_a_passing_one_swaps(
    broker: MosquittoBroker,
    tmp_path: Path,
    agent_factory: AgentFactory,
    recorder: Callable[..., Recorder],
) -> None:
    """Golden set first, then a model whose outputs are 1 % off: the serving model stays,
    P/models/mlp's last load failed at step validating with the error and the figures, and
    P/errors says so. Then a model within tolerance replaces it, its status carrying the
    validation figures."""
    models = Models(tmp_path / "build")
    start(agent_factory, broker, tmp_path, models.original)
    rec = recorder(STATE, ERRORS, "out/#")
    original = version_of(models.original.read_bytes())
    rec.wait_for(lambda _: any(s["state"] == "READY" for s in states(rec)))
    first = states(rec)[-1]
    assert first["version"] == original
    assert first["validation"] is None  # no golden set beside it at start
    assert first["placement"] is None  # only the CPU requested: nothing to measure

    models_dir = tmp_path / "models"
    replace_atomically(models_dir / "mlp.golden.npz", models.golden)
    far = models.far.read_bytes()
    replace_atomically(models_dir / "mlp.onnx", far)
    state = wait_for_attempt(rec, version_of(far), "FAILED")
    assert state["state"] == "READY"
    assert state["version"] == original
    attempt = state["last_load"]
    assert attempt["step"] == "validating"
    assert attempt["error"].startswith(
        "golden set check failed: output 'y' is out of tolerance in "
    )
    assert "worst: sample " in attempt["error"]
    assert state["error"] == attempt["error"]
    figures = attempt["validation"]
    assert figures["passed"] is False
    assert figures["samples"] == 20
    assert figures["max_abs_err"] > 1e-5
    assert figures["providers"] == ["CPUExecutionProvider"]
    rec.wait_for(lambda ms: any(m.topic == ERRORS for m in ms))
    error = json.loads(rec.on(ERRORS)[0].payload)
    assert error["model"] == "mlp"
    assert "golden set check failed" in error["reason"]
    assert served_version(broker, rec, "a") == original

    near = models.near.read_bytes()
    assert near != models.original.read_bytes()
    replace_atomically(models_dir / "mlp.onnx", near)
    state = wait_for_attempt(rec, version_of(near), "READY")
    assert state["version"] == version_of(near)
    assert state["error"] is None
    validation = state["validation"]
    assert validation["passed"] is True
    assert validation["samples"] == 20
    assert 0 <= validation["max_abs_err"] <= 1e-3
    assert set(validation["latency_ms"]) == {"p50", "p99"}
    assert validation["providers"] == ["CPUExecutionProvider"]
    assert (validation["rtol"], validation["atol"]) == (1e-3, 1e-5)
    assert state["placement"] is None
    assert served_version(broker, rec, "b") == version_of(near)


@pytest.mark.broker
def test_an_unusable_golden_set_refuses_the_model(
    broker: MosquittoBroker,
    tmp_path: Path,
    agent_factory: AgentFactory,
    recorder: Callable[..., Recorder],
) -> None:
    """A symlinked mlp.golden.npz, then a corrupt one: the new model never serves unchecked;
    each refusal names the golden set file and what is wrong with it."""
    models = Models(tmp_path / "build")
    start(agent_factory, broker, tmp_path, models.original)
    rec = recorder(STATE, ERRORS)
    original = version_of(models.original.read_bytes())
    rec.wait_for(lambda _: any(s["state"] == "READY" for s in states(rec)))
    models_dir = tmp_path / "models"
    golden_path = models_dir / "mlp.golden.npz"
    real = tmp_path / "elsewhere.golden.npz"
    real.write_bytes(models.golden)
    golden_path.symlink_to(real)

    near = models.near.read_bytes()
    replace_atomically(models_dir / "mlp.onnx", near)
    state = wait_for_attempt(rec, version_of(near), "FAILED")
    assert state["version"] == original
    assert state["last_load"]["step"] == "validating"
    assert state["last_load"]["error"] == (
        f"the golden set beside the model cannot be used: golden set {golden_path} is a "
        "symlink: refused"
    )
    assert "validation" not in state["last_load"]  # the check never ran

    golden_path.unlink()
    golden_path.write_bytes(b"this is not an npz")
    near2 = models.near2.read_bytes()
    replace_atomically(models_dir / "mlp.onnx", near2)
    state = wait_for_attempt(rec, version_of(near2), "FAILED")
    assert state["version"] == original
    assert state["last_load"]["step"] == "validating"
    assert state["last_load"]["error"] == (
        f"the golden set beside the model cannot be used: {golden_path}: not an .npz file "
        "(it is not a zip archive)"
    )
    rec.wait_for(lambda ms: len([m for m in ms if m.topic == ERRORS]) >= 2)
    reasons = [json.loads(m.payload)["reason"] for m in rec.on(ERRORS)]
    assert all(str(golden_path) in reason for reason in reasons)


@pytest.mark.broker
def test_a_model_failing_its_golden_set_at_start_never_serves(
    broker: MosquittoBroker,
    tmp_path: Path,
    agent_factory: AgentFactory,
    recorder: Callable[..., Recorder],
) -> None:
    """The daemon starting with a model and a golden set it fails: FAILED at validating,
    and readings get errors, not results."""
    models = Models(tmp_path / "build")
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "mlp.golden.npz").write_bytes(models.golden)
    start(agent_factory, broker, tmp_path, models.far)
    rec = recorder(STATE, ERRORS, "out/#")
    rec.wait_for(lambda _: any(s["state"] == "FAILED" for s in states(rec)))
    state = states(rec)[-1]
    assert state["version"] is None
    assert state["last_load"]["step"] == "validating"
    assert "golden set check failed" in state["error"]
    client = publisher(broker)
    client.publish("in/a", json.dumps({"x": [0.5] * model_zoo.FEATURES}), qos=1)
    rec.wait_for(lambda ms: any("not serving" in m.payload.decode() for m in rec.on(ERRORS)))
    client.loop_stop()
    assert not rec.on("out/a")


def check_config(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agent", "check-config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_check_config_takes_all_nodes_and_explains_a_bad_value(tmp_path: Path) -> None:
    """require_providers: all_nodes is valid; "some" is one FILE:LINE error naming the
    values allowed; updates.engine_build_timeout_s must be positive."""
    good = tmp_path / "good.yaml"
    good.write_text(
        "device_id: gw1\nrequire_providers: all_nodes\nupdates:\n  engine_build_timeout_s: 600\n"
    )
    done = check_config(good)
    assert done.returncode == 0, done.stdout + done.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "device_id: gw1\nrequire_providers: some\nupdates:\n  engine_build_timeout_s: 0\n"
    )
    done = check_config(bad)
    assert done.returncode == 1
    assert done.stdout.splitlines() == [
        f"{bad}:2: require_providers: expected true, false or all_nodes, got 'some'",
        f"{bad}:4: updates.engine_build_timeout_s: Input should be greater than 0 (got 0)",
    ]
