"""Shadow trials: an update's candidate runs beside the serving model on the device's live
readings before it may serve (the daemon as a process, a real broker, real models).

The serving model is ``build_linear`` (seed 3); the live readings are drawn from 6..10 while
the golden set holds readings under 1, so a candidate that only agrees on small inputs
passes its golden set and meets the live stream in its shadow."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent.cli.main import main
from agent.inference.golden import read_golden_file
from agent.inference.shadow_models import CPU_TIME_COPIES, SHADOW_NICE
from tests.broker import MosquittoBroker, Recorder, paced_stream
from tests.conftest import AgentProcess
from tests.onnx_builders import build_linear
from tests.shadow_models import build_diverging, build_reexport, build_slower
from tests.test_updates import agent_config, mqtt_update, version_of, wait_subscribed
from tests.update_helpers import (
    STATUS,
    final_status,
    golden_for,
    make_key,
    statuses,
    validation_for,
)

pytestmark = pytest.mark.broker

SCHED_IDLE = getattr(os, "SCHED_IDLE", 5)

AgentFactory = Callable[..., AgentProcess]
SEED = 3
MODEL_STATE = "edge/dev1/models/lin"


class Device:
    """One daemon serving ``lin`` (build_linear, seed 3) with a key it trusts."""

    def __init__(
        self,
        broker: MosquittoBroker,
        folder: Path,
        agent_factory: AgentFactory,
        shadow: dict[str, Any] | None = None,
    ) -> None:
        self.broker = broker
        self.folder = folder
        self.key, public = make_key(folder / "keys", "ops")
        serving = build_linear(folder / "models" / "lin.onnx", features=4, outputs=2, seed=SEED)
        self.old = version_of(serving.read_bytes())
        self.golden = golden_for(
            serving, np.random.default_rng(0).uniform(0, 1, (20, 4)).astype(np.float32)
        )
        updates = {"shadow": shadow} if shadow else {}
        self.config = agent_config(broker, folder, [public], **updates)
        self._factory = agent_factory
        self.agent = self.start()

    def start(self) -> AgentProcess:
        """Start the daemon (again: same folders, same state)."""
        self.agent = self._factory(self.config)
        self.agent.wait_for_event("agent_serving")
        wait_subscribed(self.agent)
        return self.agent

    def update(self, candidate: Path, update_id: str, version: int, **fields: Any) -> str:
        """Send ``candidate`` as a signed update with its golden set; returns its version."""
        data = candidate.read_bytes()
        mqtt_update(
            self.broker,
            data,
            [self.key],
            update_id=update_id,
            version=version,
            validation=validation_for(self.golden),
            **fields,
        )
        return version_of(data)


def live_readings(broker: MosquittoBroker, count: int, rate: float = 50.0) -> None:
    """``count`` readings of 6..10 on in/s1, ids 0.., at ``rate`` per second (background)."""
    rng = np.random.default_rng(1)
    payloads = [
        json.dumps({"id": i, "x": [round(v, 3) for v in rng.uniform(6, 10, 4)]})
        for i in range(count)
    ]
    paced_stream(broker, "in/s1", payloads, rate)


def thread_priorities(pid: int) -> set[tuple[int, int]]:
    """(nice, scheduling policy) of each thread of process ``pid``: fields 19 and 41 of
    /proc/PID/task/TID/stat, counted after the command's closing parenthesis."""
    found = set()
    for stat in Path(f"/proc/{pid}/task").glob("*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()
        except OSError:  # the thread ended meanwhile
            continue
        found.add((int(fields[19 - 3]), int(fields[41 - 3])))
    return found


def results(rec: Recorder) -> list[dict[str, Any]]:
    return [json.loads(m.payload) for m in rec.on("out/s1")]


def test_a_candidate_that_disagrees_on_live_readings_fails_its_shadow_and_never_serves(
    broker: MosquittoBroker, tmp_path: Path, agent_factory: AgentFactory
) -> None:
    """It passes the golden set, then disagrees on every live reading: FAILED at step
    shadow with the figures; every reading of the stream got its result, all from the old
    model, before, during and after the shadow."""
    device = Device(broker, tmp_path, agent_factory)
    rec = Recorder(broker, ["out/#", STATUS, MODEL_STATE]).start()
    live_readings(broker, 300)
    candidate = build_diverging(tmp_path / "diverging.onnx", seed=SEED)
    device.update(candidate, "div-1", 2, shadow={"duration_s": 3, "min_readings": 50})
    final = final_status(rec, "div-1", timeout_s=40)
    assert final["state"] == "FAILED", final
    assert final["step"] == "shadow"
    assert "disagreed with the serving model on 100.00%" in final["reason"]
    shadow = final["shadow"]
    assert shadow["readings"] >= 50
    assert shadow["disagreement"] == 1.0
    assert shadow["max_abs_err"] > 1
    assert 0 < shadow["mean_abs_err"] <= shadow["max_abs_err"]
    assert 0 < shadow["mean_rel_err"] <= shadow["max_rel_err"]
    assert shadow["pipelines"]["p"]["readings"] == shadow["readings"]
    in_progress = [s for s in statuses(rec, "div-1") if s.get("step") == "shadow"]
    assert in_progress[0]["state"] == "IN_PROGRESS"
    rec.wait_for(lambda _: len(results(rec)) >= 300, timeout_s=30)
    got = results(rec)
    assert sorted(r["id"] for r in got) == list(range(300))
    assert {r["version"] for r in got} == {device.old}
    model = json.loads(rec.on(MODEL_STATE)[-1].payload)
    assert (model["state"], model["version"]) == ("READY", device.old)
    assert model["last_load"]["step"] == "shadow"
    rec.stop()


def test_an_identical_reexport_passes_its_shadow_with_figures_and_then_serves(
    broker: MosquittoBroker, tmp_path: Path, agent_factory: AgentFactory
) -> None:
    """The device's own updates.shadow (no shadow block in the manifest): the same model in
    other bytes agrees on every reading; SUCCEEDED carries the figures, with running ones
    on the way, and the new version serves."""
    device = Device(
        broker,
        tmp_path,
        agent_factory,
        shadow={"duration_s": 6, "min_readings": 50, "max_latency_ratio": 3.0},
    )
    rec = Recorder(broker, ["out/#", STATUS]).start()
    live_readings(broker, 600)
    new = device.update(build_reexport(tmp_path / "again.onnx", seed=SEED), "same-1", 2)
    rec.wait_for(
        lambda _: any(s.get("step") == "shadow" for s in statuses(rec, "same-1")), timeout_s=30
    )
    # The shadow runs on a thread at the lowest priority: it takes only what serving leaves.
    assert (SHADOW_NICE, SCHED_IDLE) in thread_priorities(device.agent.process.pid)
    final = final_status(rec, "same-1", timeout_s=40)
    assert final["state"] == "SUCCEEDED", final
    shadow = final["shadow"]
    assert shadow["readings"] >= 50
    assert shadow["disagreement"] == 0.0
    assert shadow["max_abs_err"] == 0.0
    assert (shadow["mean_abs_err"], shadow["max_rel_err"]) == (0.0, 0.0)
    assert shadow["latency_ratio"] is not None
    assert shadow["timing"] == CPU_TIME_COPIES  # both models timed alike, on the CPU
    assert "validation" in final
    running = [
        s["shadow"]
        for s in statuses(rec, "same-1")
        if s["state"] == "IN_PROGRESS" and s["step"] == "shadow"
    ]
    assert running[0]["readings"] == 0  # as it begins
    assert any(r["readings"] > 0 for r in running[1:])  # then every 5 s
    rec.wait_for(lambda _: any(r["version"] == new for r in results(rec)), timeout_s=30)
    # Its golden set, signed with it, is kept as the drift reference `golden` names.
    kept = Path(device.config["state_dir"]) / "references" / "lin.npz"
    np.testing.assert_array_equal(read_golden_file(kept).inputs["x"], device.golden.inputs["x"])
    rec.stop()


def test_a_slower_candidate_fails_its_shadow_on_latency(
    broker: MosquittoBroker, tmp_path: Path, agent_factory: AgentFactory
) -> None:
    """The same results at many times the run time: FAILED at shadow on the latency ratio."""
    device = Device(broker, tmp_path, agent_factory)
    rec = Recorder(broker, ["out/#", STATUS]).start()
    live_readings(broker, 300)
    candidate = build_slower(tmp_path / "slower.onnx", seed=SEED)
    device.update(
        candidate,
        "slow-1",
        2,
        shadow={"duration_s": 3, "min_readings": 30, "max_latency_ratio": 3.0},
    )
    final = final_status(rec, "slow-1", timeout_s=40)
    assert final["state"] == "FAILED", final
    assert final["step"] == "shadow"
    assert "max_latency_ratio 3" in final["reason"]
    assert final["shadow"]["disagreement"] == 0.0
    assert final["shadow"]["latency_ratio"] > 3.0
    rec.stop()


def test_a_quiet_sensor_fails_the_shadow_by_the_documented_rule(
    broker: MosquittoBroker, tmp_path: Path, agent_factory: AgentFactory
) -> None:
    """No reading in the shadow's duration: fewer than min_readings, FAILED, old model."""
    device = Device(broker, tmp_path, agent_factory)
    rec = Recorder(broker, [STATUS, MODEL_STATE]).start()
    device.update(
        build_reexport(tmp_path / "again.onnx", seed=SEED),
        "quiet-1",
        2,
        shadow={"duration_s": 1.5, "min_readings": 10},
    )
    final = final_status(rec, "quiet-1", timeout_s=30)
    assert final["state"] == "FAILED", final
    assert final["step"] == "shadow"
    assert "compared 0 live readings in 1.5 s, fewer than min_readings 10" in final["reason"]
    model = json.loads(rec.on(MODEL_STATE)[-1].payload)
    assert model["version"] == device.old
    rec.stop()


@pytest.mark.skipif(sys.platform != "linux", reason="SIGKILL semantics")
def test_killed_mid_shadow_the_next_start_serves_the_old_model_and_reports_failed(
    broker: MosquittoBroker, tmp_path: Path, agent_factory: AgentFactory
) -> None:
    """SIGKILL while the candidate runs beside the serving model: the restart rolls the
    file back before any model loads and reports the update FAILED."""
    device = Device(broker, tmp_path, agent_factory)
    rec = Recorder(broker, ["out/#", STATUS, MODEL_STATE]).start()
    device.update(
        build_reexport(tmp_path / "again.onnx", seed=SEED),
        "kill-1",
        2,
        shadow={"duration_s": 120, "min_readings": 10},
    )
    rec.wait_for(
        lambda _: any(s.get("step") == "shadow" for s in statuses(rec, "kill-1")), timeout_s=30
    )
    device.agent.kill()
    device.start()
    final = final_status(rec, "kill-1", timeout_s=30)
    assert final["state"] == "FAILED", final
    rec.wait_for(
        lambda _: any(
            json.loads(m.payload).get("version") == device.old
            and json.loads(m.payload).get("state") == "READY"
            for m in rec.on(MODEL_STATE)[-1:]
        ),
        timeout_s=30,
    )
    assert (tmp_path / "models" / "lin.onnx").read_bytes() == (
        build_linear(tmp_path / "old.onnx", features=4, outputs=2, seed=SEED).read_bytes()
    )
    rec.stop()


def test_a_rollout_whose_canary_fails_its_shadow_stops_and_reports_why(
    broker: MosquittoBroker, tmp_path: Path, agent_factory: AgentFactory
) -> None:
    """publish-update --waves 1,100% --shadow 3s: the canary's shadow fails on the live
    stream, the abort rule stops the rollout, the second device is never sent the update,
    and the report carries the canary's shadow figures."""
    keys = tmp_path / "keys"
    keys.mkdir()
    assert main(["keygen", str(keys / "ops")]) == 0
    serving = build_linear(tmp_path / "old.onnx", features=4, outputs=2, seed=SEED)
    golden = golden_for(serving, np.random.default_rng(0).uniform(0, 1, (20, 4)).astype(np.float32))
    (tmp_path / "golden.npz").write_bytes(golden.to_bytes())
    agents = {}
    for name in ("dev1", "dev2"):
        folder = tmp_path / name
        (folder / "models").mkdir(parents=True)
        (folder / "models" / "lin.onnx").write_bytes(serving.read_bytes())
        config = agent_config(broker, folder, [keys / "ops.pub"])
        config["device_id"] = name
        config["mqtt"]["client_id"] = f"edge-agent-{name}"
        config["health"] = {"interval_s": 1}
        agents[name] = agent_factory(config)
    for agent in agents.values():
        agent.wait_for_event("agent_serving", 30)
    live_readings(broker, 1500)
    report = tmp_path / "report.json"
    done = subprocess.run(
        [
            sys.executable, "-m", "agent", "publish-update",
            str(build_diverging(tmp_path / "diverging.onnx", seed=SEED)),
            "--key", str(keys / "ops.key"), "--model", "lin", "--version", "2",
            "--group", "line3", "--host", broker.host, "--port", str(broker.port),
            "--golden", str(tmp_path / "golden.npz"), "--shadow", "3s",
            "--shadow-min-readings", "30", "--waves", "1,100%", "--abort-failures", "20%",
            "--abort-min", "1", "--timeout", "60", "--discover-wait", "2",
            "--report", str(report),
        ],
        capture_output=True, text=True, timeout=180, check=False, cwd=tmp_path,
    )  # fmt: skip
    output = done.stdout + done.stderr
    assert done.returncode == 1, output
    assert "ABORTED" in done.stdout, output
    assert "disagreed with the serving model on 100.00%" in done.stdout  # the reason, at once
    document = json.loads(report.read_text())
    ((canary, record),) = document["devices"].items()
    assert (record["state"], record["step"]) == ("FAILED", "shadow")
    assert record["shadow"]["disagreement"] == 1.0
    assert record["shadow"]["readings"] >= 30
    assert document["not_targeted"] == [name for name in agents if name != canary]
