"""Staged rollouts against a simulated fleet (``scripts/fleet_sim.py``: many devices over a
few connections, speaking the device side of the protocol) on a real broker: the desired
state left retained, the abort rule at scale, and ``status --group`` listing the fleet."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from agent.updates.signing import generate_keypair
from tests.broker import MosquittoBroker, Recorder, publisher
from tests.onnx_builders import build_linear

REPO = Path(__file__).resolve().parent.parent


def fleet_sim() -> ModuleType:
    """``scripts/fleet_sim.py`` as a module (scripts are not a package)."""
    if "fleet_sim" in sys.modules:
        return sys.modules["fleet_sim"]
    spec = importlib.util.spec_from_file_location("fleet_sim", REPO / "scripts" / "fleet_sim.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["fleet_sim"] = module  # its dataclasses look their module up while defined
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def simulated(broker: MosquittoBroker) -> Iterator[Callable[..., Any]]:
    started: list[Any] = []

    def start(devices: int, **options: Any) -> Any:
        fleet = fleet_sim().SimulatedFleet(broker.host, broker.port, devices=devices, **options)
        fleet.start()
        started.append(fleet)
        return fleet

    yield start
    for fleet in started:
        fleet.stop()


def rollout(
    broker: MosquittoBroker, tmp_path: Path, *extra: str
) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    if not (tmp_path / "ops.key").exists():
        generate_keypair(tmp_path / "ops")
        build_linear(tmp_path / "m.onnx", features=4, seed=1)
    report = tmp_path / "report.json"
    command = [
        sys.executable, "-m", "agent", "publish-update", str(tmp_path / "m.onnx"),
        "--key", str(tmp_path / "ops.key"), "--model", "lin", "--version", "2",
        "--group", "sim", "--host", broker.host, "--port", str(broker.port),
        "--url", "https://updates.example.com/lin-v2.onnx", "--discover-wait", "2",
        "--wave-wait", "0", "--timeout", "10", "--report", str(report), *extra,
    ]  # fmt: skip
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=180, check=False, cwd=tmp_path
    )
    return done, json.loads(report.read_text())


def retained(broker: MosquittoBroker, recorder: Callable[..., Recorder], topic: str) -> set[str]:
    """The topics under ``topic`` that hold a retained message. The broker queues them for
    a new subscription before anything published after its SUBACK, so once a QoS 1 marker
    sent afterwards arrives, all of them are in."""
    rec = recorder(topic, "marker/#")
    client = publisher(broker)
    client.publish("marker/done", b"1", qos=1).wait_for_publish(5)
    client.disconnect()
    client.loop_stop()
    messages = rec.wait_for(lambda ms: any(m.topic == "marker/done" for m in ms), 10)
    return {m.topic for m in messages if m.retain and m.payload}


def test_a_completed_https_rollout_leaves_the_desired_state_retained(
    broker: MosquittoBroker,
    tmp_path: Path,
    simulated: Callable[..., Any],
    recorder: Callable[..., Recorder],
) -> None:
    """200 simulated devices, about 3 % of which fail: the rollout completes (below the
    10 % threshold), exits 1 (not all succeeded), keeps the manifests of the devices that
    succeeded retained, clears those of the failed ones, and leaves no group manifest (not
    every device succeeded)."""
    fleet = simulated(200, fail=0.03, install_s=0.2)
    failing = {name for name, device in fleet.devices.items() if device.fate == "fail"}
    assert failing
    done, report = rollout(broker, tmp_path, "--waves", "1,10%,100%", "--retain")
    assert done.returncode == 1, done.stdout + done.stderr
    assert report["phase"] == "completed"
    assert report["counts"] == {"SUCCEEDED": 200 - len(failing), "FAILED": len(failing)}
    manifests = retained(broker, recorder, "edge/+/updates/manifest")
    assert {topic.split("/")[1] for topic in manifests} == set(fleet.devices) - failing
    assert not retained(broker, recorder, "fleet/#")


def test_the_whole_group_succeeded_leaves_a_group_manifest_and_status_lists_the_fleet(
    broker: MosquittoBroker,
    tmp_path: Path,
    simulated: Callable[..., Any],
    recorder: Callable[..., Recorder],
) -> None:
    """Every device succeeds: exit 0, and a group manifest naming group sim is left
    retained for devices that join later; status --group lists all 300."""
    simulated(300, install_s=0.2)
    done, report = rollout(broker, tmp_path, "--waves", "1,50%,100%", "--retain")
    assert done.returncode == 0, done.stdout + done.stderr
    assert report["counts"] == {"SUCCEEDED": 300}
    assert "group manifest left retained for sim" in done.stdout
    rec = recorder("fleet/groups/sim/updates/manifest")
    group = rec.wait_for(bool, 10)[0]
    assert group.retain
    listing = subprocess.run(
        [sys.executable, "-m", "agent", "status", "--group", "sim", "--host", broker.host,
         "--port", str(broker.port), "--wait", "2"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert listing.returncode == 0, listing.stderr
    assert sum(line.startswith("sim") for line in listing.stdout.splitlines()) == 300


def test_many_failures_abort_early_and_nothing_is_left_to_act_later(
    broker: MosquittoBroker,
    tmp_path: Path,
    simulated: Callable[..., Any],
    recorder: Callable[..., Recorder],
) -> None:
    """30 % of 300 devices fail: the abort rule stops the rollout after the second wave;
    the devices of the later waves were never sent a manifest, and after the abort no
    retained manifest is left for a device that did not take the update."""
    fleet = simulated(300, fail=0.3, install_s=0.2)
    sent = recorder("edge/+/updates/manifest")
    done, report = rollout(
        broker, tmp_path, "--waves", "1,10%,50%,100%", "--abort-min", "10", "--retain"
    )
    assert done.returncode == 1
    assert report["phase"] == "aborted", done.stdout
    assert "ABORTED:" in done.stdout
    targeted = set(report["devices"])
    assert len(targeted) <= 30
    assert set(report["not_targeted"]) == set(fleet.devices) - targeted
    reached = {m.topic.split("/")[1] for m in sent.messages if m.payload}
    assert reached == targeted
    succeeded = {d for d, r in report["devices"].items() if r["state"] == "SUCCEEDED"}
    manifests = retained(broker, recorder, "edge/+/updates/manifest")
    assert {topic.split("/")[1] for topic in manifests} == succeeded
