"""Attacks on the update path that the signature alone does not stop: a model whose warm-up
never ends, a mirror that trickles, a flood of manifests, a hand-made rollback, symlinks in
the agent's own folders, and forged rejections. A real broker and the daemon as a process."""

from __future__ import annotations

import json
import os
import shutil
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.broker import MosquittoBroker, Recorder, make_tls_files, publisher
from tests.conftest import AgentProcess
from tests.onnx_builders import build_linear, build_slow_warmup
from tests.test_hostile_mqtt import current_rss_mb, peak_rss_mb, reset_peak_rss
from tests.test_updates import (
    MODEL_STATE,
    agent_config,
    linear,
    mqtt_update,
    serving_version,
    version_of,
    wait_subscribed,
)
from tests.update_helpers import (
    STATUS,
    envelope,
    final_status,
    make_key,
    payload_for,
    send,
    statuses,
    wait_for_step,
    wait_until,
)

pytestmark = pytest.mark.broker

AgentFactory = Callable[..., AgentProcess]
NEVER_ENDS = 2_000_000_000  # Loop iterations: hours of warm-up


def _start(agent_factory: AgentFactory, config: dict[str, Any]) -> AgentProcess:
    agent = agent_factory(config)
    agent.wait_for_event("agent_serving")
    wait_subscribed(agent)
    return agent


def _model_state(rec: Recorder, topic: str) -> dict[str, Any]:
    return json.loads(rec.on(topic)[-1].payload) if rec.on(topic) else {}


# -- 1: a trial whose warm-up never ends ------------------------------------------------------


def test_a_trial_that_never_ends_is_rolled_back_in_time_and_blocks_no_other_model(
    broker: MosquittoBroker,
    tmp_path: Path,
    agent_factory: AgentFactory,
    recorder: Callable[..., Recorder],
) -> None:
    """A signed model whose warm-up loops for hours: FAILED at the trial within
    trial_timeout_s + 2 s, the old model serving; a second model hot-reloads meanwhile; and
    SIGTERM during such a trial exits 0, the next start rolling it back."""
    private, public = make_key(tmp_path / "keys", "ops")
    old = linear(tmp_path, 0)
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "lin.onnx").write_bytes(old)
    build_linear(tmp_path / "models" / "aux.onnx", features=4, outputs=2, seed=1)
    config = agent_config(broker, tmp_path, [public], trial_timeout_s=8.0)
    config["models"]["aux"] = {}
    config["pipelines"]["q"] = {
        "model": "aux",
        "input": {"topic": "aux/+", "field": "x"},
        "output": {"topic": "auxout/{1}"},
    }
    agent = _start(agent_factory, config)
    rec = recorder(STATUS, MODEL_STATE, "edge/dev1/models/aux", "out/#")
    stuck = build_slow_warmup(tmp_path / "stuck.onnx", iterations=NEVER_ENDS).read_bytes()
    mqtt_update(broker, stuck, [private], update_id="stuck1", version=1)
    wait_for_step(rec, "stuck1", "trial")
    trial_ts = next(s["ts"] for s in statuses(rec, "stuck1") if s.get("step") == "trial")

    # Meanwhile a new file for the other model is loaded at once.
    fresh = build_linear(tmp_path / "aux-new.onnx", features=4, outputs=2, seed=9).read_bytes()
    os.replace(tmp_path / "aux-new.onnx", tmp_path / "models" / "aux.onnx")
    rec.wait_for(
        lambda _: _model_state(rec, "edge/dev1/models/aux").get("version") == version_of(fresh), 6
    )
    assert not any(s["state"] == "FAILED" for s in statuses(rec, "stuck1")), (
        "the other model should reload while the trial still runs"
    )

    try:
        status = final_status(rec, "stuck1", timeout_s=20)
    except TimeoutError:
        raise AssertionError(
            f"exit {agent.process.poll()}: {agent.log_file.read_text()[-2000:]}"
        ) from None
    assert (status["state"], status["step"]) == ("FAILED", "trial"), status
    assert "warm-up did not finish within 8 s (updates.trial_timeout_s)" in status["reason"]
    assert "rolled back" in status["reason"]
    print(
        f"\nstuck trial: FAILED {status['ts'] - trial_ts:.2f} s after the trial began "
        "(trial_timeout_s 8)"
    )
    assert status["ts"] - trial_ts <= 8 + 2
    assert serving_version(broker, rec, 1) == version_of(old)

    # SIGTERM in the middle of such a trial: exit 0, and the next start rolls it back.
    mqtt_update(broker, stuck, [private], update_id="stuck2", version=2)
    wait_for_step(rec, "stuck2", "trial")
    code, took = agent.terminate()
    assert code == 0, agent.log_file.read_text()[-3000:]
    assert took < 5
    again = _start(agent_factory, config)
    status = final_status(rec, "stuck2")
    assert (status["state"], status["step"]) == ("FAILED", "trial"), status
    assert "stopped during the trial step" in status["reason"]
    assert serving_version(broker, rec, 2) == version_of(old)
    assert again.process.poll() is None


# -- 2: slow retrieval ------------------------------------------------------------------------


class TrickleServer:
    """An https server that answers every request one byte every half second: in the body
    (``body``) or already in the headers (``headers``)."""

    def __init__(self, folder: Path) -> None:
        self.tls = make_tls_files(folder)
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(self.tls.server_cert, self.tls.server_key)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"https://127.0.0.1:{self.listener.getsockname()[1]}"
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        self.listener.settimeout(0.2)
        while not self.stopped.is_set():
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return  # closed
            threading.Thread(target=self._answer, args=(conn,), daemon=True).start()

    def _answer(self, conn: socket.socket) -> None:
        try:
            with self.context.wrap_socket(conn, server_side=True) as tls:
                request = b""
                while b"\r\n\r\n" not in request:
                    request += tls.recv(4096)
                if b"GET /headers" in request:
                    tls.sendall(b"HTTP/1.1 200 OK\r\nX-Slow: ")
                else:
                    tls.sendall(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n")
                while not self.stopped.wait(0.5):
                    tls.sendall(b"a")
        except OSError:
            pass  # the client gave up: that is the point

    def close(self) -> None:
        self.stopped.set()
        self.listener.close()


@pytest.fixture
def trickle(tmp_path: Path) -> Iterator[TrickleServer]:
    server = TrickleServer(tmp_path / "trickle-tls")
    yield server
    server.close()


@pytest.mark.parametrize("where", ["body", "headers"])
def test_a_trickling_mirror_fails_at_the_download_deadline(
    broker: MosquittoBroker,
    tmp_path: Path,
    agent_factory: AgentFactory,
    recorder: Callable[..., Recorder],
    trickle: TrickleServer,
    where: str,
) -> None:
    """A byte every 0.5 s resets every socket timeout; the download still FAILS at
    download_timeout_s (3 s) to the second, saying so, and the old model serves."""
    private, public = make_key(tmp_path / "keys", "ops")
    old = linear(tmp_path, 0)
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "lin.onnx").write_bytes(old)
    _start(
        agent_factory,
        agent_config(
            broker, tmp_path, [public], download_timeout_s=3.0, ca_file=str(trickle.tls.ca_cert)
        ),
    )
    rec = recorder(STATUS, "out/#")
    data = linear(tmp_path, 3)
    send(
        broker,
        envelope(
            payload_for(data, update_id="slow", version=1, url=f"{trickle.url}/{where}"), [private]
        ),
    )
    status = final_status(rec, "slow")
    started = next(s["ts"] for s in statuses(rec, "slow") if s["state"] == "IN_PROGRESS")
    assert (status["state"], status["step"]) == ("FAILED", "downloading"), status
    assert "download took longer than 3 s (updates.download_timeout_s)" in status["reason"]
    print(
        f"\ntrickled {where}: FAILED {status['ts'] - started:.2f} s after it began "
        "(download_timeout_s 3)"
    )
    assert status["ts"] - started < 3 + 1.5
    assert serving_version(broker, rec, 1) == version_of(old)


# -- 4: a flood of manifests ------------------------------------------------------------------


def test_a_flood_of_manifests_is_bounded_and_every_one_is_answered(
    broker: MosquittoBroker,
    tmp_path: Path,
    agent_factory: AgentFactory,
    recorder: Callable[..., Recorder],
) -> None:
    """60 unsigned manifests of 1.5 MB as fast as the broker takes them: peak RSS grows by
    less than 32 MB, and each is answered by a REJECTED status of its own or counted in
    one that reports drops (the counts add up to 60)."""
    _, public = make_key(tmp_path / "keys", "ops")
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "lin.onnx").write_bytes(linear(tmp_path, 0))
    agent = _start(agent_factory, agent_config(broker, tmp_path, [public]))
    rec = recorder(STATUS)
    forged = json.dumps(
        {
            "payloadType": "application/vnd.edge-agent.update+json",
            "payload": "A" * 1_500_000,
            "signatures": [{"keyid": "00", "sig": "AA=="}],
        }
    ).encode()
    pid = agent.process.pid
    time.sleep(0.5)
    before = current_rss_mb(pid)
    reset_peak_rss(pid)
    client = publisher(broker)
    try:
        infos = [client.publish("edge/dev1/updates/manifest", forged, qos=1) for _ in range(60)]
        for info in infos:
            info.wait_for_publish(30)
    finally:
        client.disconnect()
        client.loop_stop()

    def answered() -> int:
        return sum(int(s.get("dropped", 1)) for s in statuses(rec, None))

    wait_until(lambda: answered() >= 60, 60, "60 manifests answered")
    time.sleep(1.0)
    growth = peak_rss_mb(pid) - before
    found = statuses(rec, None)
    dropped = sum(int(s.get("dropped", 0)) for s in found)
    print(
        f"\nflood of 60 x 1.5 MB manifests: peak RSS {growth:+.1f} MB, "
        f"{len(found) - sum(1 for s in found if 'dropped' in s)} verified and rejected, "
        f"{dropped} dropped unread"
    )
    assert answered() == 60
    assert all(s["state"] == "REJECTED" and s["authenticated"] is False for s in found)
    assert growth < 32


def test_the_intake_drops_what_does_not_fit_and_reports_it_once(tmp_path: Path) -> None:
    """Without its thread running, the intake takes 16 manifests (or 8 MiB) and drops the
    rest; once running, each taken one gets its REJECTED status and one more reports the
    44 drops."""
    from paho.mqtt.client import MQTTMessage  # noqa: PLC0415

    from agent.config.schema import AgentConfig  # noqa: PLC0415
    from agent.hardware.detect import detect  # noqa: PLC0415
    from agent.inference.registry import ModelRegistry  # noqa: PLC0415
    from agent.updates.manager import UpdateManager  # noqa: PLC0415

    config = AgentConfig(
        device_id="d", models_dir=str(tmp_path / "m"), state_dir=str(tmp_path / "s")
    )
    sent: list[dict[str, Any]] = []
    manager = UpdateManager(
        config,
        ModelRegistry(config, detect(), lambda *_: None),
        lambda topic, payload: sent.append(json.loads(payload)),
    )
    for _ in range(60):
        message = MQTTMessage(topic=b"edge/d/updates/manifest")
        message.payload = b'{"not": "signed"}'
        manager.on_manifest(message)
    manager.start()
    try:
        wait_until(lambda: sum(s.get("dropped", 1) for s in sent) >= 60, 10, "statuses")
    finally:
        manager.stop()
    assert [s.get("dropped") for s in sent].count(None) == 16
    assert [s["dropped"] for s in sent if "dropped" in s] == [44]
    assert all(s["state"] == "REJECTED" and s["update_id"] is None for s in sent)


# -- 5: a hand-made rollback ------------------------------------------------------------------


def test_require_signed_files_refuses_an_older_signed_version_copied_back(
    broker: MosquittoBroker,
    tmp_path: Path,
    agent_factory: AgentFactory,
    recorder: Callable[..., Recorder],
) -> None:
    """After versions 1 and 2 were installed by signed updates, copying NAME.onnx.prev (version
    1) over the model is refused as a rollback, and version 2 keeps serving; the committed
    bytes themselves still load (after a restart too)."""
    private, public = make_key(tmp_path / "keys", "ops")
    (tmp_path / "models").mkdir()
    config = agent_config(broker, tmp_path, [public], require_signed_files=True)
    agent = _start(agent_factory, config)
    rec = recorder(STATUS, MODEL_STATE, "out/#")
    v1, v2 = linear(tmp_path, 1), linear(tmp_path, 2)
    mqtt_update(broker, v1, [private], update_id="v1", version=1)
    assert final_status(rec, "v1")["state"] == "SUCCEEDED"
    mqtt_update(broker, v2, [private], update_id="v2", version=2)
    assert final_status(rec, "v2")["state"] == "SUCCEEDED"
    models = tmp_path / "models"
    assert (models / "lin.onnx.prev").read_bytes() == v1
    shutil.copyfile(models / "lin.onnx.prev", tmp_path / "rollback.tmp")
    os.replace(tmp_path / "rollback.tmp", models / "lin.onnx")
    rec.wait_for(
        lambda _: "would be a rollback" in (_model_state(rec, MODEL_STATE).get("error") or ""), 10
    )
    state = _model_state(rec, MODEL_STATE)
    assert (state["state"], state["version"]) == ("READY", version_of(v2)), state
    assert serving_version(broker, rec, 1) == version_of(v2)
    agent.terminate()
    (models / "lin.onnx").write_bytes(v2)
    _start(agent_factory, config)
    assert serving_version(broker, rec, 2) == version_of(v2)


# -- 6: symlinks in the agent's own folders ---------------------------------------------------


def test_a_symlinked_staging_folder_is_refused_not_followed(
    broker: MosquittoBroker,
    tmp_path: Path,
    agent_factory: AgentFactory,
    recorder: Callable[..., Recorder],
) -> None:
    """The staging folder replaced by a link to state_dir/updates: start-up cleanup refuses
    it (the version floor survives), an update FAILS saying why without the device's paths,
    and the old model serves."""
    private, public = make_key(tmp_path / "keys", "ops")
    (tmp_path / "models").mkdir()
    old = linear(tmp_path, 0)
    (tmp_path / "models" / "lin.onnx").write_bytes(old)
    config = agent_config(broker, tmp_path, [public])
    agent = _start(agent_factory, config)
    rec = recorder(STATUS, "out/#")
    v1 = linear(tmp_path, 1)
    mqtt_update(broker, v1, [private], update_id="v1", version=1)
    assert final_status(rec, "v1")["state"] == "SUCCEEDED"
    agent.terminate()
    state_files = tmp_path / "state" / "updates"
    floor = (state_files / "state.json").read_bytes()
    staging = tmp_path / "models" / ".edge-agent-staging"
    shutil.rmtree(staging)
    staging.symlink_to(state_files)

    again = _start(agent_factory, config)
    assert again.wait_for_event("update_staging_unsafe")["folder"] == str(staging)
    assert (state_files / "state.json").read_bytes() == floor
    mqtt_update(broker, linear(tmp_path, 2), [private], update_id="v2", version=2)
    status = final_status(rec, "v2")
    assert (status["state"], status["step"]) == ("FAILED", "downloading"), status
    assert status["reason"] == (
        "cannot start the transfer: <models_dir>/.edge-agent-staging "
        "is a symbolic link; the agent keeps its own files there and "
        "does not follow links: remove the link (the agent creates the "
        "folder again)"
    )
    assert json.loads((state_files / "state.json").read_bytes())["models"]["lin"]["version"] == 1
    assert serving_version(broker, rec, 1) == version_of(v1)


# -- 9: forged rejections ---------------------------------------------------------------------


def test_forged_rejections_do_not_change_what_publish_update_reports(
    broker: MosquittoBroker,
    tmp_path: Path,
    agent_factory: AgentFactory,
    recorder: Callable[..., Recorder],
) -> None:
    """While publish-update sends a real update, someone floods the device with unsigned
    manifests claiming its update_id: the device rejects those without naming the update,
    publish-update reports SUCCEEDED and exits 0."""
    private, public = make_key(tmp_path / "keys", "ops")
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "lin.onnx").write_bytes(linear(tmp_path, 0))
    _start(agent_factory, agent_config(broker, tmp_path, [public]))
    rec = recorder(STATUS, "out/#")
    new = tmp_path / "new.onnx"
    new.write_bytes(linear(tmp_path, 6))
    forged = envelope(
        payload_for(new.read_bytes(), update_id="real-1", version=9),
        [make_key(tmp_path / "keys", "attacker")[0]],
    )
    stop = threading.Event()

    def attack() -> None:
        client = publisher(broker)
        while not stop.wait(0.05):
            client.publish("edge/dev1/updates/manifest", forged, qos=1)
        client.disconnect()
        client.loop_stop()

    attacker = threading.Thread(target=attack)
    attacker.start()
    try:
        time.sleep(0.5)  # forged rejections are already coming when the operator starts
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "agent",
                "publish-update",
                str(new),
                "--key",
                str(private),
                "--model",
                "lin",
                "--version",
                "1",
                "--device",
                "dev1",
                "--update-id",
                "real-1",
                "--host",
                broker.host,
                "--port",
                str(broker.port),
                "--timeout",
                "60",
            ],
            capture_output=True,
            text=True,
            timeout=90,
            check=False,
        )
    finally:
        stop.set()
        attacker.join()
    assert done.returncode == 0, done.stdout + done.stderr
    assert "dev1: SUCCEEDED" in done.stdout
    assert "REJECTED" not in done.stdout
    forged_answers = [s for s in statuses(rec, None) if s["state"] == "REJECTED"]
    assert forged_answers, "the device should have rejected the forged manifests"
    assert all(s["authenticated"] is False for s in forged_answers)
    assert [s["state"] for s in statuses(rec, "real-1")][-1] == "SUCCEEDED"
