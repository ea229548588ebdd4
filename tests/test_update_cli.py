"""The operator commands: keygen, sign and publish-update (against real daemons)."""

from __future__ import annotations

import io
import json
import stat
import subprocess
import sys
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import paho.mqtt.client as paho
import pytest

from agent.cli.main import main
from agent.cli.update_sender import (
    ProgressBar,
    StatusFollower,
    answers,
    human_bytes,
    send_update,
    sign_update,
    validation_line,
)
from agent.updates.manifest import UrlSource, parse_payload
from agent.updates.signing import TrustedKeys
from tests.broker import MosquittoBroker, Recorder, publisher
from tests.conftest import AgentProcess
from tests.test_updates import agent_config, linear, serving_version, version_of, wait_subscribed

AgentFactory = Callable[..., AgentProcess]


def edge_agent(*args: str, timeout_s: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agent", *args],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )


def test_keygen_writes_a_private_key_only_its_owner_can_read(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """keygen: NAME.key mode 0600, NAME.pub, the key id printed; never overwrites."""
    assert main(["keygen", str(tmp_path / "ops")]) == 0
    assert stat.S_IMODE((tmp_path / "ops.key").stat().st_mode) == 0o600
    assert (tmp_path / "ops.pub").read_text().startswith("-----BEGIN PUBLIC KEY-----")
    assert "keyid " in capsys.readouterr().out
    before = (tmp_path / "ops.key").read_bytes()
    assert main(["keygen", str(tmp_path / "ops")]) == 1
    assert "not overwriting" in capsys.readouterr().err
    assert (tmp_path / "ops.key").read_bytes() == before


def test_sign_writes_a_manifest_the_devices_verify(tmp_path: Path) -> None:
    """sign: an envelope with one signature per --key, its payload naming targets, length,
    sha256, expiry and the https source."""
    assert main(["keygen", str(tmp_path / "a")]) == 0
    assert main(["keygen", str(tmp_path / "b")]) == 0
    model = tmp_path / "m.onnx"
    model.write_bytes(linear(tmp_path, 0))
    out = tmp_path / "manifest.json"
    assert (
        main(
            [
                "sign",
                str(model),
                "--key",
                str(tmp_path / "a.key"),
                "--key",
                str(tmp_path / "b.key"),
                "--model",
                "lin",
                "--version",
                "3",
                "--device",
                "gw1",
                "--group",
                "line3",
                "--expires",
                "12h",
                "--url",
                "https://models.example/m.onnx",
                "-o",
                str(out),
            ]
        )
        == 0
    )
    trusted = TrustedKeys.from_files([str(tmp_path / "a.pub"), str(tmp_path / "b.pub")], 2)
    manifest = parse_payload(trusted.verify(out.read_bytes()))
    assert (manifest.model, manifest.version, manifest.length) == ("lin", 3, model.stat().st_size)
    assert manifest.devices == ("gw1",)
    assert manifest.groups == ("line3",)
    assert manifest.source == UrlSource("https://models.example/m.onnx")
    assert 11.9 * 3600 < (manifest.expires - manifest.issued_at).total_seconds() <= 12 * 3600


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--model", "lin", "--version", "1"], "at least one --device or --group"),
        (["--model", "../lin", "--version", "1", "--device", "d"], "not a valid name"),
        (["--model", "lin", "--version", "0", "--device", "d"], "positive integer"),
        (
            ["--model", "lin", "--version", "1", "--device", "d", "--expires", "soon"],
            "invalid duration",
        ),
        (
            ["--model", "lin", "--version", "1", "--device", "d", "--url", "http://x/m"],
            "must be https",
        ),
    ],
)
def test_sign_refuses_bad_arguments(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], words: str
) -> None:
    """Usage mistakes exit 2 with the reason, and write nothing."""
    assert main(["keygen", str(tmp_path / "a")]) == 0
    (tmp_path / "m.onnx").write_bytes(b"x")
    out = tmp_path / "manifest.json"
    code = main(
        ["sign", str(tmp_path / "m.onnx"), "--key", str(tmp_path / "a.key"), *args, "-o", str(out)]
    )
    assert code == 2
    assert words in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.broker
def test_publish_update_to_a_group_follows_every_device(
    broker: MosquittoBroker,
    tmp_path: Path,
    agent_factory: AgentFactory,
    recorder: Callable[..., Recorder],
) -> None:
    """Two devices in group line3 trust the old and the new key (rotation): publish-update
    signed with the new key sends the chunks with a progress bar, prints each device's
    statuses and exits 0 once both SUCCEEDED; the same version again exits 1 (REJECTED)."""
    keys = tmp_path / "keys"
    keys.mkdir()
    for name in ("old", "new"):
        assert main(["keygen", str(keys / name)]) == 0
    trusted = [keys / "old.pub", keys / "new.pub"]
    new = linear(tmp_path, 1)
    (tmp_path / "new.onnx").write_bytes(new)
    agents = []
    for device in ("dev1", "dev2"):
        folder = tmp_path / device
        (folder / "models").mkdir(parents=True)
        (folder / "models" / "lin.onnx").write_bytes(linear(tmp_path, 0))
        config = agent_config(broker, folder, trusted)
        config["device_id"] = device
        config["mqtt"]["client_id"] = f"edge-agent-{device}"
        agents.append(agent_factory(config))
    for agent in agents:
        agent.wait_for_event("agent_serving")
    wait_subscribed(agents[0])
    rec = recorder("out/#")
    command = [
        "publish-update",
        str(tmp_path / "new.onnx"),
        "--key",
        str(keys / "new.key"),
        "--model",
        "lin",
        "--version",
        "2",
        "--group",
        "line3",
        "--chunk-size",
        "100",
        "--host",
        broker.host,
        "--port",
        str(broker.port),
        "--settle",
        "2",
        "--timeout",
        "60",
    ]
    done = edge_agent(*command)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "dev1: SUCCEEDED" in done.stdout
    assert "dev2: SUCCEEDED" in done.stdout
    assert "2 succeeded, 0 failed or rejected" in done.stdout
    assert "100.0%" in done.stderr  # the progress bar reached the end
    assert " B/" in done.stderr
    assert "0.0/0.0 MB" not in done.stderr
    assert serving_version(broker, rec, 1) == version_of(new)

    again = edge_agent(*command)
    assert again.returncode == 1
    assert "dev1: REJECTED: version 2 is not newer" in again.stdout
    assert json.dumps("0 succeeded")[1:-1] in again.stdout


def test_chunks_stop_once_the_device_has_answered(
    broker: MosquittoBroker, tmp_path: Path, recorder: Callable[..., Recorder]
) -> None:
    """A device that already gave its final word (say REJECTED at the manifest) gets no
    more chunks, and the progress still ends at 100 %."""
    keys = tmp_path / "keys"
    keys.mkdir()
    assert main(["keygen", str(keys / "k")]) == 0
    (tmp_path / "m.onnx").write_bytes(linear(tmp_path, 0))
    update = sign_update(
        tmp_path / "m.onnx",
        [keys / "k.key"],
        model="lin",
        version=2,
        devices=["devX"],
        groups=[],
        expires_in=timedelta(hours=1),
        url=None,
        chunk_size=16,
        update_id="u-answered",
    )
    seen = recorder("edge/devX/updates/#")
    client = publisher(broker)
    progress: list[tuple[int, int]] = []
    try:
        asked = []

        def answered(base: str) -> bool:
            asked.append(base)
            return len(asked) > 3  # the device answered after three chunks went out

        send_update(
            client,
            ["edge/devX"],
            update,
            lambda done, total: progress.append((done, total)),
            answered=answered,
        )
        # the broker keeps one publisher's messages in order: once this marker is in, every
        # chunk that was sent is in too
        client.publish("edge/devX/updates/marker", b"end", qos=1).wait_for_publish()
    finally:
        client.disconnect()
        client.loop_stop()
    messages = seen.wait_for(lambda ms: any(m.topic.endswith("/marker") for m in ms))
    assert sum("/chunks/" in m.topic for m in messages) == 3
    assert progress[-1] == (len(update.data), len(update.data))


def test_progress_bar_lines_and_units() -> None:
    """Small models are counted in bytes, not as 0.0/0.0 MB; a status line printed while
    the bar is drawn starts on its own line, and the finished bar draws nothing more."""
    out = io.StringIO()
    bar = ProgressBar(out)
    bar(100, 400)
    bar.interrupt()
    out.write("dev1: REJECTED\n")
    bar(400, 400)
    bar(400, 400)
    lines = out.getvalue().split("\n")
    assert lines[0].startswith("\rsending [")
    assert "100 B/400 B" in lines[0]
    assert lines[1] == "dev1: REJECTED"
    assert "400 B/400 B" in lines[2]
    assert "100.0%" in lines[2]
    assert lines[3:] == [""]
    assert [human_bytes(n) for n in (812, 3_400, 12_000_000, 2_500_000_000)] == [
        "812 B",
        "3.4 KB",
        "12.0 MB",
        "2.5 GB",
    ]


def test_a_succeeded_status_with_validation_prints_its_figures() -> None:
    """publish-update prints a device's golden set figures under its SUCCEEDED line (top-1
    only for a classifier's set); fields a device sent oddly show as ``?``, never a crash."""
    out = io.StringIO()
    follower = StatusFollower("u1", levels=1, out=out)
    figures = {
        "samples": 50,
        "max_abs_err": 1.2e-06,
        "max_rel_err": 3.1e-05,
        "top1_agreement": 1.0,
        "latency_ms": {"p50": 0.21, "p99": 0.4},
        "providers": ["CPUExecutionProvider"],
    }
    for device, validation in (("dev1", figures), ("dev2", {"samples": "many"})):
        status = {"update_id": "u1", "device_id": device, "state": "SUCCEEDED"}
        message = paho.MQTTMessage(topic=f"edge/{device}/updates/status".encode())
        message.payload = json.dumps({**status, "validation": validation}).encode()
        follower.on_message(None, None, message)  # type: ignore[arg-type]
    assert out.getvalue().splitlines() == [
        "dev1: SUCCEEDED",
        "  validation: 50 samples, max abs err 1.2e-06, max rel err 3.1e-05, top-1 1.000, "
        "latency p50 0.21 ms p99 0.40 ms, CPUExecutionProvider",
        "dev2: SUCCEEDED",
        "  validation: ? samples, max abs err ?, max rel err ?, latency p50 ? ms p99 ? ms",
    ]
    assert validation_line({**figures, "top1_agreement": None}).count("top-1") == 0
    assert "p50 0.0041 ms" in validation_line({"latency_ms": {"p50": 0.0041}})


def test_which_statuses_answer_the_manifest_sent() -> None:
    """A status counts when it names this update and these bytes; one that could not be
    verified (authenticated false, no update id) counts by the digest of these bytes alone,
    so rollouts and publish-update see a device that refuses the signing key at once."""
    ours = "ab" * 32
    assert answers({"update_id": "u1", "manifest_sha256": ours}, "u1", ours)
    assert not answers({"update_id": "u1", "manifest_sha256": "cd" * 32}, "u1", ours)
    assert not answers({"update_id": "u2", "manifest_sha256": ours}, "u1", ours)
    refused = {"update_id": None, "authenticated": False, "state": "REJECTED"}
    assert answers({**refused, "manifest_sha256": ours}, "u1", ours)
    assert not answers({**refused, "manifest_sha256": "cd" * 32}, "u1", ours)
    # Someone else's manifest claiming our update id, unverified: not our answer.
    forged = {"update_id": "u1", "authenticated": False, "manifest_sha256": "cd" * 32}
    assert not answers(forged, "u1", ours)
    assert not answers({**refused, "manifest_sha256": ours}, "u1", None)
