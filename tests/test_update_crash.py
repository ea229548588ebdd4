"""kill -9 at every step of an update: after a restart the device serves exactly the old or
the new verified model, no temp file is left, and the status says which."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import pytest

from agent.updates.failpoints import ENV_VAR
from tests.broker import MosquittoBroker, Recorder
from tests.conftest import AgentProcess
from tests.onnx_builders import build_slow_warmup
from tests.test_updates import agent_config, linear, serving_version, version_of, wait_subscribed
from tests.update_helpers import (
    STATUS,
    chunks_of,
    envelope,
    final_status,
    make_key,
    payload_for,
    send,
    wait_for_step,
    wait_until,
)

pytestmark = pytest.mark.broker

AgentFactory = Callable[..., AgentProcess]


class Device:
    """One device's folders, config and daemon, restartable."""

    def __init__(self, broker: MosquittoBroker, tmp_path: Path, factory: AgentFactory) -> None:
        self.private, public = make_key(tmp_path / "keys", "ops")
        self.old = linear(tmp_path, 0)
        self.models = tmp_path / "models"
        self.models.mkdir()
        (self.models / "lin.onnx").write_bytes(self.old)
        self.config = agent_config(broker, tmp_path, [public], chunk_timeout_s=60.0)
        self.state_file = tmp_path / "state" / "updates" / "state.json"
        self.factory = factory
        self.agent = self.start()

    def start(self, env: dict[str, str] | None = None) -> AgentProcess:
        self.agent = self.factory(self.config, env)
        self.agent.wait_for_event("agent_serving")
        wait_subscribed(self.agent)
        return self.agent

    def assert_clean(self, serving: bytes, broker: MosquittoBroker, rec: Recorder) -> None:
        """Serves exactly ``serving``; no staging leftovers; no update in the journal."""
        assert (self.models / "lin.onnx").read_bytes() == serving
        assert not list((self.models / ".edge-agent-staging").iterdir())
        assert json.loads(self.state_file.read_text())["journal"] == []
        assert serving_version(broker, rec, 7) == version_of(serving)


def test_kill_during_download(
    broker: MosquittoBroker,
    tmp_path: Path,
    agent_factory: AgentFactory,
    recorder: Callable[..., Recorder],
) -> None:
    """Killed with half the chunks written: after the restart FAILED (downloading), the
    partial file is gone, the old model serves."""
    device = Device(broker, tmp_path, agent_factory)
    rec = recorder(STATUS, "out/#")
    new = linear(tmp_path, 1)
    chunks = chunks_of(new, 32)
    manifest = envelope(
        payload_for(new, update_id="d1", version=2, chunk_size=32), [device.private]
    )
    send(broker, manifest, chunks[: len(chunks) // 2], update_id="d1")
    wait_for_step(rec, "d1", "downloading")
    staging = device.models / ".edge-agent-staging"
    wait_until((staging / "d1.part").exists, 5, "staging file")
    device.agent.kill()
    device.start()
    status = final_status(rec, "d1")
    assert (status["state"], status["step"]) == ("FAILED", "downloading")
    assert "stopped during the download" in status["reason"]
    device.assert_clean(device.old, broker, rec)


@pytest.mark.parametrize(
    ("point", "outcome"),
    [
        ("verified", "FAILED"),  # bytes checked, nothing installed yet
        ("accepted", "FAILED"),  # version floor raised, old file still in place
        ("installed", "FAILED"),  # new file renamed into place, trial not started
        ("committed", "SUCCEEDED"),  # committed, the status not sent yet
    ],
)
def test_kill_between_durable_steps(
    broker: MosquittoBroker,
    tmp_path: Path,
    agent_factory: AgentFactory,
    recorder: Callable[..., Recorder],
    point: str,
    outcome: str,
) -> None:
    """SIGKILL at each point between two durable steps (EDGE_AGENT_FAILPOINTS): after the
    restart an uncommitted update is rolled back and FAILED, a committed one SUCCEEDED."""
    device = Device(broker, tmp_path, agent_factory)
    device.agent.kill()
    device.start(env={ENV_VAR: point})
    rec = recorder(STATUS, "out/#")
    new = linear(tmp_path, 1)
    manifest = envelope(payload_for(new, update_id="k1", version=2), [device.private])
    send(broker, manifest, chunks_of(new, 4096), update_id="k1")
    device.agent.process.wait(timeout=20)
    assert device.agent.process.returncode == -9
    device.start()
    status = final_status(rec, "k1")
    assert status["state"] == outcome, status
    device.assert_clean(new if outcome == "SUCCEEDED" else device.old, broker, rec)


def test_kill_during_trial(
    broker: MosquittoBroker,
    tmp_path: Path,
    agent_factory: AgentFactory,
    recorder: Callable[..., Recorder],
) -> None:
    """Killed while the new model warms up: the restart rolls back before any model loads,
    FAILED (trial), and the old model serves; the burnt version is refused afterwards."""
    device = Device(broker, tmp_path, agent_factory)
    rec = recorder(STATUS, "out/#")
    slow = build_slow_warmup(tmp_path / "slow.onnx", iterations=15_000_000).read_bytes()
    manifest = envelope(payload_for(slow, update_id="t1", version=2), [device.private])
    send(broker, manifest, chunks_of(slow, 4096), update_id="t1")
    wait_for_step(rec, "t1", "trial")
    assert (
        hashlib.sha256((device.models / "lin.onnx").read_bytes()).hexdigest()
        == hashlib.sha256(slow).hexdigest()
    )
    device.agent.kill()
    device.start()
    status = final_status(rec, "t1")
    assert (status["state"], status["step"]) == ("FAILED", "trial")
    assert "restored the previous file" in status["reason"]
    device.assert_clean(device.old, broker, rec)
    again = envelope(payload_for(slow, update_id="t2", version=2), [device.private])
    send(broker, again)
    assert "not newer" in final_status(rec, "t2")["reason"]
