"""Golden sets in signed updates: checked on every device in the trial (real broker, real
models, the daemons as processes)."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent.cli.main import main
from agent.inference.golden import GoldenSet, golden_path_for, parse_golden
from agent.updates.failpoints import ENV_VAR
from tests.broker import MosquittoBroker, Recorder
from tests.conftest import AgentProcess
from tests.model_zoo import perturbed, sample_inputs
from tests.test_update_cli import edge_agent
from tests.test_updates import agent_config, linear, version_of, wait_subscribed
from tests.update_helpers import (
    chunks_of,
    envelope,
    final_manifest_status,
    golden_for,
    make_key,
    payload_for,
    send,
    tamper,
    validation_for,
    wait_until,
)

pytestmark = pytest.mark.broker

AgentFactory = Callable[..., AgentProcess]
SAMPLES = 50


def start_device(
    broker: MosquittoBroker,
    folder: Path,
    device: str,
    model: bytes,
    trusted: list[Path],
    agent_factory: AgentFactory,
) -> AgentProcess:
    """A daemon ``device`` in group line3 serving ``model`` as ``lin``, subscribed to its
    update topics."""
    (folder / "models").mkdir(parents=True, exist_ok=True)
    (folder / "models" / "lin.onnx").write_bytes(model)
    config = agent_config(broker, folder, trusted)
    config["device_id"] = device
    config["mqtt"]["client_id"] = f"edge-agent-{device}"
    agent = agent_factory(config)
    agent.wait_for_event("agent_serving")
    wait_until(
        lambda: any(
            e.get("event") == "mqtt_subscribed"
            and f"edge/{device}/updates/manifest" in e.get("filters", [])
            for e in agent.log_events()
        ),
        15,
        f"{device}'s update subscription",
    )
    return agent


def model_state(
    rec: Recorder, device: str, until: Callable[[dict[str, Any]], bool]
) -> dict[str, Any]:
    """``device``'s ``P/models/lin`` once the latest one received satisfies ``until``."""
    topic = f"edge/{device}/models/lin"

    def latest() -> dict[str, Any] | None:
        found = rec.on(topic)
        return json.loads(found[-1].payload) if found else None

    rec.wait_for(lambda _: (state := latest()) is not None and until(state), 30)
    state = latest()
    assert state is not None
    return state


def serves(version: str) -> Callable[[dict[str, Any]], bool]:
    """A ``model_state`` condition: ``version`` is the one serving."""
    return lambda state: state["version"] == version and state["state"] == "READY"


def publish(model: Path, key: Path, version: int, *extra: str, broker: Any) -> Any:
    """``edge-agent publish-update`` to group line3, waiting for both devices."""
    return edge_agent(
        "publish-update",
        str(model),
        "--key",
        str(key),
        "--model",
        "lin",
        "--version",
        str(version),
        "--group",
        "line3",
        "--host",
        broker.host,
        "--port",
        str(broker.port),
        "--settle",
        "2",
        "--timeout",
        "90",
        *extra,
        timeout_s=120,
    )


def test_a_perturbed_model_fails_validating_on_every_device_and_passes_when_looser(
    broker: MosquittoBroker,
    tmp_path: Path,
    agent_factory: AgentFactory,
    recorder: Callable[..., Recorder],
) -> None:
    """Two devices of group line3 get a slightly perturbed copy of their model with a golden
    set of the serving one: FAILED at validating on both, the reason naming the output and
    the worst sample, both still serving the old version. The same model with a looser
    tolerance SUCCEEDS on both, each status carrying its validation figures, which
    publish-update prints per device; the NAME.golden.npz beside dev1's old model is moved
    aside when the update commits."""
    private, public = make_key(tmp_path / "keys", "ops")
    old_file = tmp_path / "old.onnx"
    old_file.write_bytes(linear(tmp_path, 0))
    old = old_file.read_bytes()
    new_file = perturbed(old_file, tmp_path / "new.onnx", scale=0.02)
    golden = golden_for(old_file, sample_inputs(SAMPLES, (4,)))
    golden_file = tmp_path / "golden.npz"
    golden_file.write_bytes(golden.to_bytes())
    beside = golden_path_for(tmp_path / "dev1" / "models" / "lin.onnx")
    beside.parent.mkdir(parents=True)
    beside.write_bytes(golden.to_bytes())  # the operator's own check of the old model
    agents = [
        start_device(broker, tmp_path / device, device, old, [public], agent_factory)
        for device in ("dev1", "dev2")
    ]
    rec = recorder("edge/+/models/lin", "edge/+/updates/status")

    refused = publish(new_file, private, 2, "--golden", str(golden_file), broker=broker)
    assert refused.returncode == 1, refused.stdout + refused.stderr
    print(refused.stdout)  # the README's sample output
    assert f"with a golden set of {SAMPLES} samples" in refused.stdout
    for device in ("dev1", "dev2"):
        line = next(ln for ln in refused.stdout.splitlines() if ln.startswith(f"{device}: FAILED"))
        assert line.startswith(f"{device}: FAILED (validating): golden set check failed: ")
        assert "output 'y' is out of tolerance in" in line
        assert "worst: sample " in line
        assert "rolled back" in line
        # still serving the old version, the new one's load failed at validating
        state = model_state(
            rec, device, lambda s: (s.get("last_load") or {}).get("step") == "validating"
        )
        assert serves(version_of(old))(state)
        assert state["last_load"]["version"] == version_of(new_file.read_bytes())
    assert "0 succeeded, 2 failed or rejected (dev1, dev2)" in refused.stdout
    assert "validation:" not in refused.stdout
    assert beside.exists()  # a failed update leaves the operator's golden set alone
    in_progress = [
        json.loads(m.payload)
        for m in rec.messages
        if m.topic.endswith("/updates/status") and json.loads(m.payload)["version"] == 2
    ]
    assert {s["step"] for s in in_progress if s["state"] == "IN_PROGRESS"} >= {"validating"}

    looser = publish(
        new_file,
        private,
        3,
        "--golden",
        str(golden_file),
        "--atol",
        "1",
        "--rtol",
        "0.5",
        broker=broker,
    )
    assert looser.returncode == 0, looser.stdout + looser.stderr
    print(looser.stdout)  # the README's sample output
    lines = looser.stdout.splitlines()
    for device in ("dev1", "dev2"):
        index = lines.index(f"{device}: SUCCEEDED")
        assert lines[index + 1].startswith(f"  validation: {SAMPLES} samples, max abs err ")
        assert "max rel err " in lines[index + 1]
        assert "latency p50 " in lines[index + 1]
        assert lines[index + 1].endswith(" ms, CPUExecutionProvider")
        assert "top-1" not in lines[index + 1]
        model_state(rec, device, serves(version_of(new_file.read_bytes())))
    finals = [
        json.loads(m.payload)
        for m in rec.messages
        if m.topic.endswith("/updates/status")
        and json.loads(m.payload)["state"] == "SUCCEEDED"
        and json.loads(m.payload)["version"] == 3
    ]
    assert len(finals) == 2
    for status in finals:
        validation = status["validation"]
        assert validation["samples"] == SAMPLES
        assert validation["max_abs_err"] > 0
        assert validation["max_rel_err"] > 0
        assert set(validation["latency_ms"]) == {"p50", "p99"}
        assert validation["latency_ms"]["p50"] <= validation["latency_ms"]["p99"]
        assert validation["providers"] == ["CPUExecutionProvider"]
        assert (validation["rtol"], validation["atol"], validation["passed"]) == (0.5, 1.0, True)
    assert "2 succeeded, 0 failed or rejected" in looser.stdout

    # dev1's golden set described the old model: moved aside, not left to refuse the new one
    assert not beside.exists()
    superseded = beside.with_name(beside.name + ".superseded")
    assert superseded.read_bytes() == golden.to_bytes()
    moved = agents[0].wait_for_event("golden_set_superseded")
    assert moved["moved_to"] == str(superseded)
    assert not any(e.get("event") == "golden_set_superseded" for e in agents[1].log_events())


def test_golden_sets_edited_or_mismatched_are_rejected_and_none_is_not_the_file_beside(
    broker: MosquittoBroker,
    tmp_path: Path,
    agent_factory: AgentFactory,
    recorder: Callable[..., Recorder],
) -> None:
    """A golden set edited after signing is REJECTED (the signature no longer verifies); a
    signed one whose sha256 does not match its npz is REJECTED naming sha256. An update
    without a golden set is not judged by the NAME.golden.npz beside the old model (which
    its outputs would fail): it SUCCEEDS without validation figures, and that file is
    renamed .superseded on commit."""
    private, public = make_key(tmp_path / "keys", "ops")
    old_file = tmp_path / "old.onnx"
    old_file.write_bytes(linear(tmp_path, 0))
    golden = golden_for(old_file, sample_inputs(SAMPLES, (4,)))
    beside = golden_path_for(tmp_path / "dev1" / "models" / "lin.onnx")
    beside.parent.mkdir(parents=True)
    beside.write_bytes(golden.to_bytes())
    agent = start_device(
        broker, tmp_path / "dev1", "dev1", old_file.read_bytes(), [public], agent_factory
    )
    rec = recorder("edge/dev1/updates/status", "edge/dev1/models/lin")
    new = linear(tmp_path, 1)  # another model: far outside the old one's golden set

    signed = envelope(
        payload_for(new, update_id="edited", version=2, validation=validation_for(golden)),
        [private],
    )
    edited_golden = GoldenSet(golden.inputs, {"y": golden.expected["y"] + 1}, golden.tolerances)
    edited = tamper(signed, validation=validation_for(edited_golden))
    send(broker, edited, chunks_of(new, 4096), update_id="edited")
    rejected = final_manifest_status(rec, edited)
    assert rejected["state"] == "REJECTED"
    assert "does not verify" in rejected["reason"]

    wrong_sha = envelope(
        payload_for(
            new,
            update_id="wrong-sha",
            version=2,
            validation=validation_for(golden, sha256="0" * 64),
        ),
        [private],
    )
    send(broker, wrong_sha, chunks_of(new, 4096), update_id="wrong-sha")
    mismatch = final_manifest_status(rec, wrong_sha)
    assert mismatch["state"] == "REJECTED"
    assert mismatch["authenticated"] is True
    assert "validation.sha256" in mismatch["reason"]
    assert "does not match validation.npz" in mismatch["reason"]
    model_state(rec, "dev1", serves(version_of(old_file.read_bytes())))

    plain = envelope(payload_for(new, update_id="plain", version=2), [private])
    send(broker, plain, chunks_of(new, 4096), update_id="plain")
    done = final_manifest_status(rec, plain, timeout_s=30)
    assert done["state"] == "SUCCEEDED", done
    assert "validation" not in done
    model_state(rec, "dev1", serves(version_of(new)))
    assert not beside.exists()
    assert beside.with_name("lin.golden.npz.superseded").read_bytes() == golden.to_bytes()
    agent.wait_for_event("golden_set_superseded")


def test_sign_carries_the_golden_set_and_refuses_a_bad_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """sign --golden: the payload's validation holds the npz, its sha256 and the tolerances
    (--atol overriding the file's, the file's rtol kept); a file that is no golden set exits
    1 naming it, and --rtol without --golden is a usage error."""
    assert main(["keygen", str(tmp_path / "a")]) == 0
    model = tmp_path / "m.onnx"
    model.write_bytes(linear(tmp_path, 0))
    golden = golden_for(model, sample_inputs(8, (4,)), rtol=0.01)
    (tmp_path / "g.npz").write_bytes(golden.to_bytes())
    common = ["sign", str(model), "--key", str(tmp_path / "a.key"), "--model", "lin"]
    common += ["--version", "2", "--device", "d"]
    out = tmp_path / "manifest.json"
    code = main([*common, "--golden", str(tmp_path / "g.npz"), "--atol", "0.5", "-o", str(out)])
    assert code == 0
    assert "golden set of 8 samples" in capsys.readouterr().out
    payload = json.loads(base64.b64decode(json.loads(out.read_bytes())["payload"]))
    validation = payload["validation"]
    assert (validation["rtol"], validation["atol"]) == (0.01, 0.5)
    assert "top1_agreement" not in validation
    carried = parse_golden(base64.b64decode(validation["npz"]), "carried")
    np.testing.assert_array_equal(carried.inputs["x"], golden.inputs["x"])

    (tmp_path / "bad.npz").write_bytes(b"not an npz")
    bad_out = tmp_path / "bad.json"
    code = main([*common, "--golden", str(tmp_path / "bad.npz"), "-o", str(bad_out)])
    assert code == 1
    err = capsys.readouterr().err
    assert err.startswith("edge-agent sign: ")
    assert "bad.npz: not an .npz file" in err
    assert not bad_out.exists()

    code = main([*common, "--rtol", "0.1", "-o", str(out)])
    assert code == 2
    assert "add --golden" in capsys.readouterr().err


def test_a_crash_between_superseding_the_golden_set_and_the_commit_serves_the_old_model(
    broker: MosquittoBroker,
    tmp_path: Path,
    agent_factory: AgentFactory,
    recorder: Callable[..., Recorder],
) -> None:
    """SIGKILL right after NAME.golden.npz was moved aside, before the commit: the restart
    rolls back (FAILED at trial) and the old model serves, unchecked, since its golden set
    is already .superseded -- never the new model refused by a stale set."""
    private, public = make_key(tmp_path / "keys", "ops")
    old_file = tmp_path / "old.onnx"
    old_file.write_bytes(linear(tmp_path, 0))
    beside = golden_path_for(tmp_path / "dev1" / "models" / "lin.onnx")
    beside.parent.mkdir(parents=True)
    beside.write_bytes(golden_for(old_file, sample_inputs(SAMPLES, (4,))).to_bytes())
    old = old_file.read_bytes()
    folder = tmp_path / "dev1"
    (folder / "models" / "lin.onnx").write_bytes(old)
    config = agent_config(broker, folder, [public])
    agent = agent_factory(config, {ENV_VAR: "golden_superseded"})
    agent.wait_for_event("agent_serving")
    wait_subscribed(agent)
    rec = recorder("edge/dev1/updates/status", "edge/dev1/models/lin")
    new = linear(tmp_path, 1)
    manifest = envelope(payload_for(new, update_id="crash", version=2), [private])
    send(broker, manifest, chunks_of(new, 4096), update_id="crash")
    agent.process.wait(timeout=30)
    assert agent.process.returncode == -9

    restarted = agent_factory(config)
    restarted.wait_for_event("agent_serving")
    status = final_manifest_status(rec, manifest, timeout_s=30)
    assert (status["state"], status["step"]) == ("FAILED", "trial")
    assert "before the new model was committed" in status["reason"]
    assert (folder / "models" / "lin.onnx").read_bytes() == old
    model_state(rec, "dev1", serves(version_of(old)))
    assert not beside.exists()
    assert beside.with_name("lin.golden.npz.superseded").exists()
