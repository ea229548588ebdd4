"""Signed updates end to end: a real broker, real models, the daemon as a process."""

from __future__ import annotations

import hashlib
import json
import random
import signal
import ssl
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml

from agent.config.keys import load_public_key
from agent.updates.signing import keyid
from tests.broker import MosquittoBroker, Recorder, make_tls_files, publisher
from tests.conftest import AgentProcess, base_config
from tests.onnx_builders import build_linear, build_slow_warmup
from tests.update_helpers import (
    STATUS,
    chunks_of,
    envelope,
    final_manifest_status,
    final_status,
    make_key,
    manifest_statuses,
    payload_for,
    send,
    statuses,
    tamper,
    wait_for_step,
    wait_until,
)

pytestmark = pytest.mark.broker

AgentFactory = Callable[[dict[str, Any]], AgentProcess]
MODEL_STATE = "edge/dev1/models/lin"


def version_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def linear(folder: Path, seed: int) -> bytes:
    return build_linear(folder / f"lin-{seed}.onnx", features=4, outputs=2, seed=seed).read_bytes()


def agent_config(
    broker: MosquittoBroker, folder: Path, trusted: list[Path], **updates: Any
) -> dict[str, Any]:
    return base_config(
        broker,
        folder,
        groups=["line3"],
        models={"lin": {}},
        pipelines={
            "p": {
                "model": "lin",
                "input": {"topic": "in/+", "field": "x", "id_field": "id"},
                "output": {"topic": "out/{1}"},
            }
        },
        updates={"trusted_keys": [str(p) for p in trusted], "chunk_timeout_s": 2.0, **updates},
    )


def wait_subscribed(agent: AgentProcess) -> None:
    """Until the daemon has asked for its update topics (and the broker had a moment)."""
    wait_until(
        lambda: any(
            e.get("event") == "mqtt_subscribed"
            and "edge/dev1/updates/manifest" in e.get("filters", [])
            for e in agent.log_events()
        ),
        15,
        "update subscription",
    )
    threading.Event().wait(0.3)


def serving_version(broker: MosquittoBroker, rec: Recorder, reading_id: int) -> str:
    """Send one reading and return the model version its result names (only results that
    arrive after it was sent count: an earlier reading may have had the same id)."""
    after = len(rec.messages)
    client = publisher(broker)
    client.publish(
        "in/s1", json.dumps({"id": reading_id, "x": [1, 2, 3, 4]}), qos=1
    ).wait_for_publish(5)
    client.disconnect()
    client.loop_stop()

    def answers(messages: list[Any]) -> list[dict[str, Any]]:
        return [
            json.loads(m.payload)
            for m in messages[after:]
            if m.topic == "out/s1" and json.loads(m.payload)["id"] == reading_id
        ]

    return str(answers(rec.wait_for(lambda ms: bool(answers(ms))))[0]["version"])


def reading_id_of(name: str) -> int:
    """A reading id of its own for each test case, the same in every run and order."""
    return 10**6 + int(hashlib.sha256(name.encode()).hexdigest()[:8], 16) % 10**6


def mqtt_update(
    broker: MosquittoBroker,
    data: bytes,
    keys: list[Path],
    *,
    update_id: str,
    version: int,
    chunk_size: int = 4096,
    **fields: Any,
) -> None:
    manifest = envelope(
        payload_for(data, update_id=update_id, version=version, chunk_size=chunk_size, **fields),
        keys,
    )
    send(broker, manifest, chunks_of(data, chunk_size), update_id=update_id)


# -- one daemon for the refusals: threshold 2, model at version 5 -----------------------------


@dataclass
class Fleet:
    broker: MosquittoBroker
    agent: AgentProcess
    rec: Recorder
    folder: Path
    keys: dict[str, Path]  # name -> private key file
    model: bytes  # what serves after the set-up update
    installed: int  # its version: no test of the module commits another
    next_version: list[int]  # the last version a test of the module sent
    # The device's version floor: the highest version it installed (its trial may have
    # failed since), which the tests that install raise, in whatever order they run.
    floor: int


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    """A daemon requiring 2 of its 2 trusted keys, already updated to version 5."""
    folder = tmp_path_factory.mktemp("fleet")
    broker = MosquittoBroker(_mkdir(folder / "broker"))
    broker.start()
    keys = {}
    publics = []
    for name in ("ops", "ops2", "other"):
        private, public = make_key(folder / "keys", name)
        keys[name] = private
        if name != "other":
            publics.append(public)
    (folder / "models").mkdir()
    (folder / "models" / "lin.onnx").write_bytes(linear(folder, 0))
    config = agent_config(broker, folder, publics, threshold=2, trial_timeout_s=1.5)
    config_file = folder / "agent.yaml"
    config_file.write_text(yaml.safe_dump(config))
    agent = AgentProcess(config_file, folder / "agent.log")
    rec = Recorder(broker, [STATUS, MODEL_STATE, "out/#", "edge/dev1/errors"]).start()
    try:
        agent.wait_for_event("agent_serving")
        wait_subscribed(agent)
        model = linear(folder, 5)
        mqtt_update(broker, model, [keys["ops"], keys["ops2"]], update_id="setup", version=5)
        assert final_status(rec, "setup")["state"] == "SUCCEEDED"
        yield Fleet(broker, agent, rec, folder, keys, model, 5, [5], 5)
    finally:
        rec.stop()
        agent.close()
        broker.stop()


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True)
    return path


def _both(fleet: Fleet) -> list[Path]:
    return [fleet.keys["ops"], fleet.keys["ops2"]]


def _foreign_signature_under_trusted_keyid(fleet: Fleet, payload: dict[str, Any]) -> bytes:
    document = json.loads(envelope(payload, [fleet.keys["other"]]))
    trusted = load_public_key(fleet.keys["ops"].with_suffix(".pub"))
    document["signatures"][0]["keyid"] = keyid(trusted)
    document["signatures"].append(
        json.loads(envelope(payload, [fleet.keys["ops2"]]))["signatures"][0]
    )
    return json.dumps(document).encode()


def installed(offset: int = 0) -> Callable[[Fleet], int]:
    """A payload value: the fleet's installed version plus ``offset``."""
    return lambda fleet: fleet.installed + offset


REFUSALS: dict[str, tuple[Callable[[Fleet, dict[str, Any]], bytes], dict[str, Any], str]] = {
    # case: (how to sign the payload, payload changes (a callable is given the fleet), the
    # expected words in the reason ("{floor}": the fleet's version floor))
    "signed by an unknown key": (
        lambda f, p: envelope(p, [f.keys["other"], f.keys["ops"]]),
        {},
        "is not in updates.trusted_keys",
    ),
    "a foreign signature claiming a trusted key id": (
        _foreign_signature_under_trusted_keyid,
        {},
        "does not verify with trusted key",
    ),
    "payload edited after signing": (
        lambda f, p: tamper(envelope(p, _both(f)), version=99),
        {},
        "does not verify",
    ),
    "the same key twice for threshold 2": (
        lambda f, p: envelope(p, [f.keys["ops"], f.keys["ops"]]),
        {},
        "already counted",
    ),
    "an older version": (
        lambda f, p: envelope(p, _both(f)),
        {"version": installed(-1)},
        "not newer than version {floor}",
    ),
    "the installed version again": (
        lambda f, p: envelope(p, _both(f)),
        {"version": installed()},
        "not newer than version {floor}",
    ),
    "an expired manifest": (
        lambda f, p: envelope(p, _both(f)),
        {"expires_in_s": -60},
        "expired at",
    ),
    "another device": (
        lambda f, p: envelope(p, _both(f)),
        {"devices": ["dev2"], "groups": ["line9"]},
        "not for this device",
    ),
    "an empty target list": (
        lambda f, p: envelope(p, _both(f)),
        {"devices": [], "groups": []},
        "empty target list",
    ),
    "../x as model name": (
        lambda f, p: envelope(p, _both(f)),
        {"model": "../x"},
        "not a valid name",
    ),
    "/abs as model name": (
        lambda f, p: envelope(p, _both(f)),
        {"model": "/abs"},
        "not a valid name",
    ),
    "a model this device does not have": (
        lambda f, p: envelope(p, _both(f)),
        {"model": "cam"},
        "not configured",
    ),
    "a plain http url": (
        lambda f, p: envelope(p, _both(f)),
        {"url": "http://127.0.0.1/m.onnx"},
        "not https",
    ),
    "not an envelope": (lambda f, p: b"{not json", {}, "not valid JSON"),
    "a deeply nested envelope": (
        lambda f, p: b"[" * 200_000 + b"]" * 200_000,
        {},
        "nested deeper than 32 levels",
    ),
    "a version over 64 bits": (
        lambda f, p: envelope(p, _both(f)),
        {"version": 2**70},
        "integer of 22 digits",
    ),
    "a lone surrogate in a key id": (
        lambda f, p: envelope(p, _both(f)).replace(b'"keyid": "', b'"keyid": "\\ud800', 1),
        {},
        "lone UTF-16 surrogate",
    ),
    "a duplicate key in the signed payload": (
        lambda f, p: envelope(json.dumps(p).encode()[:-1] + b', "model": "cam"}', _both(f)),
        {},
        "key 'model' appears twice in one object",
    ),
    "a duplicate key deep in the signed payload": (
        lambda f, p: envelope(
            json.dumps(p)
            .encode()
            .replace(b'"devices": ["dev1"]', b'"devices": ["dev2"], "devices": ["dev1"]'),
            _both(f),
        ),
        {},
        "key 'devices' appears twice in one object",
    ),
    "a duplicate key in the envelope": (
        lambda f, p: envelope(p, _both(f))[:-1] + b', "payloadType": "x"}',
        {},
        "key 'payloadType' appears twice",
    ),
}
# Refusals of properly signed manifests: their statuses may name the update.
# Signed, but not well-formed enough to name the update they claim to be.
SIGNED_UNREADABLE = {
    "a version over 64 bits",
    "a duplicate key in the signed payload",
    "a duplicate key deep in the signed payload",
}
AUTHENTICATED_REFUSALS = {
    "an older version",
    "the installed version again",
    "an expired manifest",
    "another device",
    "an empty target list",
    "../x as model name",
    "/abs as model name",
    "a model this device does not have",
    "a plain http url",
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_refused_updates_are_rejected_and_change_nothing(fleet: Fleet, case: str) -> None:
    """Each refusal is REJECTED with a reason naming the problem; nothing is transferred or
    installed, and results still come from version 5's model."""
    sign, changes, words = REFUSALS[case]
    update_id = "r-" + hashlib.sha256(case.encode()).hexdigest()[:10]
    data = linear(fleet.folder, 77)
    changes = {
        "version": 50,
        **{key: value(fleet) if callable(value) else value for key, value in changes.items()},
    }
    words = words.format(floor=fleet.floor)
    payload = payload_for(data, update_id=update_id, **changes)
    manifest = sign(fleet, payload)
    send(fleet.broker, manifest, chunks_of(data, 4096), update_id=update_id)
    status = final_manifest_status(fleet.rec, manifest)
    assert status["state"] == "REJECTED", status
    assert words in status["reason"], status["reason"]
    assert [s["state"] for s in manifest_statuses(fleet.rec, manifest)] == ["REJECTED"]
    # A status about bytes that did not verify never names the update they claim to be.
    expected = (
        (update_id, True)
        if case in AUTHENTICATED_REFUSALS
        else (None, True)
        if case in SIGNED_UNREADABLE
        else (None, False)
    )
    assert (status["update_id"], status["authenticated"]) == expected, status
    assert serving_version(fleet.broker, fleet.rec, reading_id_of(case)) == version_of(fleet.model)
    staging = fleet.folder / "models" / ".edge-agent-staging"
    assert not list(staging.glob("*")), list(staging.glob("*"))


def _next_version(fleet: Fleet) -> int:
    fleet.next_version[0] += 1
    return fleet.next_version[0]


def test_tampered_model_bytes_fail_verification(fleet: Fleet) -> None:
    """Chunks whose bytes differ from the signed sha256 (same length): FAILED at verifying,
    nothing installed."""
    good = linear(fleet.folder, 11)
    evil = bytearray(good)
    evil[-5] ^= 0xFF
    manifest = envelope(
        payload_for(good, update_id="tampered", version=_next_version(fleet)), _both(fleet)
    )
    send(fleet.broker, manifest, chunks_of(bytes(evil), 4096), update_id="tampered")
    status = final_status(fleet.rec, "tampered")
    assert (status["state"], status["step"]) == ("FAILED", "verifying")
    assert "sha256 of the received bytes" in status["reason"]
    assert serving_version(fleet.broker, fleet.rec, 901) == version_of(fleet.model)


def test_length_larger_than_the_bytes_fails(fleet: Fleet) -> None:
    """A manifest whose length exceeds the real bytes: the short last chunk is refused."""
    data = linear(fleet.folder, 12)
    manifest = envelope(
        payload_for(
            data,
            update_id="toolong",
            version=_next_version(fleet),
            length=len(data) + 100,
            chunk_size=1 << 20,
        ),
        _both(fleet),
    )
    send(fleet.broker, manifest, chunks_of(data, 1 << 20), update_id="toolong")
    status = final_status(fleet.rec, "toolong")
    assert status["state"] == "FAILED"
    assert f"carries {len(data)} bytes, expected {len(data) + 100}" in status["reason"]


def test_a_transfer_that_stops_half_way_times_out(fleet: Fleet) -> None:
    """Half the chunks, then silence: FAILED after updates.chunk_timeout_s, saying how much
    arrived; the staging file is removed."""
    data = linear(fleet.folder, 13)
    chunks = chunks_of(data, 16)
    manifest = envelope(
        payload_for(data, update_id="stalled", version=_next_version(fleet), chunk_size=16),
        _both(fleet),
    )
    send(fleet.broker, manifest, chunks[: len(chunks) // 2], update_id="stalled")
    status = final_status(fleet.rec, "stalled")
    assert status["state"] == "FAILED"
    assert "transfer stalled" in status["reason"]
    assert f"received {len(chunks) // 2} of {len(chunks)} chunks" in status["reason"]
    assert not list((fleet.folder / "models" / ".edge-agent-staging").glob("*"))
    waiting = [s for s in statuses(fleet.rec, "stalled") if s["step"] == "waiting_for_transfer"]
    assert [(s["state"], s["received"], s["chunks"]) for s in waiting] == [
        ("IN_PROGRESS", len(chunks) // 2, len(chunks))
    ]


def test_chunks_sent_again_for_a_waiting_transfer_complete_it(
    broker: MosquittoBroker,
    tmp_path: Path,
    agent_factory: AgentFactory,
    recorder: Callable[..., Recorder],
) -> None:
    """A manifest whose chunks do not follow reports waiting_for_transfer with nothing
    received; the chunks sent then (by the operator's tool, on that status) complete the
    update."""
    private, public = make_key(tmp_path / "keys", "ops")
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "lin.onnx").write_bytes(linear(tmp_path, 0))
    agent = agent_factory(agent_config(broker, tmp_path, [public], chunk_timeout_s=6.0))
    rec = recorder(STATUS, "out/#")
    wait_subscribed(agent)
    data = linear(tmp_path, 1)
    manifest = envelope(payload_for(data, update_id="late", version=2, chunk_size=64), [private])
    send(broker, manifest)
    wait_for_step(rec, "late", "waiting_for_transfer")
    waiting = [s for s in statuses(rec, "late") if s["step"] == "waiting_for_transfer"]
    assert (waiting[0]["received"], waiting[0]["chunks"]) == (0, len(chunks_of(data, 64)))
    client = publisher(broker)
    for chunk in chunks_of(data, 64):
        client.publish("edge/dev1/updates/chunks/late", chunk, qos=1).wait_for_publish(10)
    client.disconnect()
    client.loop_stop()
    assert final_status(rec, "late")["state"] == "SUCCEEDED"
    assert serving_version(broker, rec, 4) == version_of(data)


def test_out_of_range_chunk_fails_the_transfer(fleet: Fleet) -> None:
    """A chunk index beyond the announced count ends the transfer with that reason."""
    data = linear(fleet.folder, 14)
    manifest = envelope(
        payload_for(data, update_id="range", version=_next_version(fleet)), _both(fleet)
    )
    send(fleet.broker, manifest, [(999).to_bytes(4, "big") + data[:4096]], update_id="range")
    status = final_status(fleet.rec, "range")
    assert status["state"] == "FAILED"
    assert "chunk index 999 is out of range" in status["reason"]


def test_a_model_that_fails_to_load_is_rolled_back(fleet: Fleet) -> None:
    """Signed, intact bytes that are not a model: installed, the trial fails, the previous
    file is restored and keeps serving; FAILED says why."""
    junk = b"this is not an onnx model" * 40
    version = _next_version(fleet)
    mqtt_update(fleet.broker, junk, _both(fleet), update_id="junk", version=version)
    status = final_status(fleet.rec, "junk")
    fleet.floor = version
    assert (status["state"], status["step"]) == ("FAILED", "trial")
    assert "the new model did not load" in status["reason"]
    assert "restored the previous file" in status["reason"]
    target = fleet.folder / "models" / "lin.onnx"
    assert target.read_bytes() == fleet.model
    assert serving_version(fleet.broker, fleet.rec, 902) == version_of(fleet.model)


def test_a_trial_longer_than_the_timeout_is_rolled_back(fleet: Fleet) -> None:
    """A model whose warm-up takes longer than updates.trial_timeout_s (1.5 s here) is
    never swapped in, and rolled back."""
    slow = build_slow_warmup(fleet.folder / "slow.onnx", iterations=5_000_000).read_bytes()
    version = _next_version(fleet)
    mqtt_update(fleet.broker, slow, _both(fleet), update_id="slow", version=version)
    status = final_status(fleet.rec, "slow", timeout_s=40)
    fleet.floor = version
    assert status["state"] == "FAILED"
    assert "within 1.5 s (updates.trial_timeout_s)" in status["reason"]
    assert serving_version(fleet.broker, fleet.rec, 903) == version_of(fleet.model)


# -- the good paths, each on a fresh daemon ----------------------------------------------------


def test_update_by_device_over_mqtt_succeeds_and_is_never_downgraded(
    broker: MosquittoBroker,
    tmp_path: Path,
    agent_factory: AgentFactory,
    recorder: Callable[..., Recorder],
) -> None:
    """A good update: QUEUED, IN_PROGRESS through each step, SUCCEEDED; results carry the
    new version; the old file is kept as .prev. Sent again it is ignored; the same version
    under a new id is REJECTED; a retained older manifest is ignored at every start."""
    private, public = make_key(tmp_path / "keys", "ops")
    old, new = linear(tmp_path, 0), linear(tmp_path, 1)
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "lin.onnx").write_bytes(old)
    config = agent_config(broker, tmp_path, [public])
    agent = agent_factory(config)
    rec = recorder(STATUS, "out/#")
    agent.wait_for_event("agent_serving")
    wait_subscribed(agent)
    assert serving_version(broker, rec, 1) == version_of(old)

    manifest = envelope(payload_for(new, update_id="u1", version=2, chunk_size=300), [private])
    send(broker, manifest, chunks_of(new, 300), update_id="u1")
    status = final_status(rec, "u1")
    assert status["state"] == "SUCCEEDED", status
    steps = [(s["state"], s["step"]) for s in statuses(rec, "u1")]
    assert steps == [
        ("QUEUED", None),
        ("IN_PROGRESS", "downloading"),
        ("IN_PROGRESS", "verifying"),
        ("IN_PROGRESS", "installing"),
        ("IN_PROGRESS", "trial"),
        ("SUCCEEDED", None),
    ]
    assert status["device_id"] == "dev1"
    assert status["version"] == 2
    assert serving_version(broker, rec, 2) == version_of(new)
    models = tmp_path / "models"
    assert (models / "lin.onnx").read_bytes() == new
    assert (models / "lin.onnx.prev").read_bytes() == old
    assert not list((models / ".edge-agent-staging").iterdir())

    send(broker, manifest, chunks_of(new, 300), update_id="u1")  # a replay of the same one
    again = envelope(payload_for(old, update_id="u2", version=2), [private])
    send(broker, again, chunks_of(old, 4096), update_id="u2")
    assert "not newer than version 2" in final_status(rec, "u2")["reason"]
    assert len(statuses(rec, "u1")) == 6  # the replay was ignored, not reported

    code, _ = agent.terminate()
    assert code == 0
    older = envelope(payload_for(old, update_id="u0", version=1), [private])
    send(broker, older, retain=True)  # a captured manifest, retained for the next start
    agent = agent_factory(config)
    # The persistent session also queued it while the device was away: that live copy is
    # answered (REJECTED); the retained copy, desired state the device is already past, is
    # ignored, at this start and at every later one.
    ignored = agent.wait_for_event("update_manifest_retained_ignored")
    assert (ignored["update_id"], ignored["device_version"]) == ("u0", 2)
    agent.wait_for_event("agent_serving")
    assert serving_version(broker, rec, 3) == version_of(new)
    answered = [(s["state"], s["reason"]) for s in statuses(rec, "u0")]
    assert all(state == "REJECTED" and "not newer" in reason for state, reason in answered)
    code, _ = agent.terminate()
    assert code == 0
    agent = agent_factory(config)
    agent.wait_for_event("update_manifest_retained_ignored")
    agent.wait_for_event("agent_serving")
    assert len(statuses(rec, "u0")) == len(answered)
    send(broker, b"", retain=True)  # clear the retained manifest


def test_update_by_group_with_chunks_shuffled_and_repeated(
    broker: MosquittoBroker,
    tmp_path: Path,
    agent_factory: AgentFactory,
    recorder: Callable[..., Recorder],
) -> None:
    """A group-targeted update whose small chunks arrive out of order and some twice."""
    private, public = make_key(tmp_path / "keys", "ops")
    old, new = linear(tmp_path, 0), linear(tmp_path, 2)
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "lin.onnx").write_bytes(old)
    agent = agent_factory(agent_config(broker, tmp_path, [public]))
    rec = recorder(STATUS, "out/#")
    agent.wait_for_event("agent_serving")
    wait_subscribed(agent)
    chunks = chunks_of(new, 64)
    shuffled = chunks + chunks[: len(chunks) // 3]
    random.Random(1).shuffle(shuffled)
    manifest = envelope(
        payload_for(new, update_id="g1", version=7, devices=[], groups=["line3"], chunk_size=64),
        [private],
    )
    send(broker, manifest, shuffled, update_id="g1", base="fleet/groups/line3")
    assert final_status(rec, "g1")["state"] == "SUCCEEDED"
    assert serving_version(broker, rec, 1) == version_of(new)


# -- https -------------------------------------------------------------------------------------


@dataclass
class HttpsServer:
    url: str
    ca_file: Path
    routes: dict[str, tuple[int, dict[str, str], bytes]]


@pytest.fixture
def https_server(tmp_path: Path) -> Iterator[HttpsServer]:
    """A local https server (certificate from a throw-away CA) serving ``routes``."""
    tls = make_tls_files(tmp_path / "https-tls")
    routes: dict[str, tuple[int, dict[str, str], bytes]] = {}

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            status, headers, body = routes.get(self.path, (404, {}, b"not found"))
            self.send_response(status)
            for name, value in headers.items():
                if name != "X-Unannounced":
                    self.send_header(name, value)
            if "Content-Length" not in headers and "X-Unannounced" not in headers:
                self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(tls.server_cert, tls.server_key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield HttpsServer(f"https://127.0.0.1:{server.server_address[1]}", tls.ca_cert, routes)
    server.shutdown()
    server.server_close()


def test_update_over_https(
    broker: MosquittoBroker,
    tmp_path: Path,
    agent_factory: AgentFactory,
    recorder: Callable[..., Recorder],
    https_server: HttpsServer,
) -> None:
    """An https source: a good download SUCCEEDS; a body bigger than the signed length
    (announced, or found while streaming), a
    redirect to plain http and a body cut short each FAIL with that reason."""
    private, public = make_key(tmp_path / "keys", "ops")
    old, new = linear(tmp_path, 0), linear(tmp_path, 3)
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "lin.onnx").write_bytes(old)
    agent = agent_factory(
        agent_config(broker, tmp_path, [public], ca_file=str(https_server.ca_file))
    )
    rec = recorder(STATUS, "out/#")
    agent.wait_for_event("agent_serving")
    wait_subscribed(agent)
    routes = https_server.routes
    routes["/big"] = (200, {}, new + b"extra bytes")
    routes["/big-stream"] = (200, {"X-Unannounced": "1"}, new + b"extra bytes")
    routes["/downgrade"] = (302, {"Location": "http://127.0.0.1:9/model.onnx"}, b"")
    routes["/short"] = (200, {}, new[: len(new) // 2])
    routes["/model.onnx"] = (200, {}, new)
    expected = {
        "big": "server announces",
        "big-stream": "larger than the signed length",
        "downgrade": "non-https",
        "short": f"ended after {len(new) // 2} of",
    }
    for version, (name, words) in enumerate(expected.items(), start=2):
        manifest = envelope(
            payload_for(new, update_id=name, version=version, url=f"{https_server.url}/{name}"),
            [private],
        )
        send(broker, manifest)
        status = final_status(rec, name)
        assert (status["state"], status["step"]) == ("FAILED", "downloading"), status
        assert words in status["reason"], status["reason"]
    manifest = envelope(
        payload_for(new, update_id="good", version=20, url=f"{https_server.url}/model.onnx"),
        [private],
    )
    send(broker, manifest)
    assert final_status(rec, "good")["state"] == "SUCCEEDED"
    assert serving_version(broker, rec, 1) == version_of(new)


def test_require_signed_files_refuses_hand_dropped_models(
    broker: MosquittoBroker,
    tmp_path: Path,
    agent_factory: AgentFactory,
    recorder: Callable[..., Recorder],
) -> None:
    """With updates.require_signed_files a file copied into models_dir does not load, and a
    signed update of the same bytes does."""
    private, public = make_key(tmp_path / "keys", "ops")
    model = linear(tmp_path, 4)
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "lin.onnx").write_bytes(model)
    agent = agent_factory(agent_config(broker, tmp_path, [public], require_signed_files=True))
    rec = recorder(STATUS, MODEL_STATE, "out/#")
    agent.wait_for_event("agent_serving")
    state = json.loads(rec.wait_for(lambda ms: any(m.topic == MODEL_STATE for m in ms))[-1].payload)
    assert state["state"] == "FAILED"
    assert "not installed by a signed update" in state["error"]
    wait_subscribed(agent)
    mqtt_update(broker, model, [private], update_id="s1", version=1)
    assert final_status(rec, "s1")["state"] == "SUCCEEDED"
    assert serving_version(broker, rec, 1) == version_of(model)


def test_keys_and_groups_take_effect_on_sighup(
    broker: MosquittoBroker,
    tmp_path: Path,
    agent_factory: AgentFactory,
    recorder: Callable[..., Recorder],
) -> None:
    """Without trusted keys updates are REJECTED as disabled; after adding a key and a group
    to the config and SIGHUP, a group update SUCCEEDS."""
    private, public = make_key(tmp_path / "keys", "ops")
    old, new = linear(tmp_path, 0), linear(tmp_path, 5)
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "lin.onnx").write_bytes(old)
    config = agent_config(broker, tmp_path, [])
    config["groups"] = []
    agent = agent_factory(config)
    rec = recorder(STATUS, "out/#")
    agent.wait_for_event("agent_serving")
    wait_subscribed(agent)
    disabled = envelope(payload_for(new, update_id="h1", version=1), [private])
    send(broker, disabled, chunks_of(new, 4096), update_id="h1")
    assert "signed updates are disabled" in final_manifest_status(rec, disabled)["reason"]

    config["groups"] = ["line7"]
    config["updates"]["trusted_keys"] = [str(public)]
    agent.config_file.write_text(yaml.safe_dump(config))
    agent.process.send_signal(signal.SIGHUP)
    agent.wait_for_event("config_reloaded")
    threading.Event().wait(0.3)
    manifest = envelope(
        payload_for(new, update_id="h2", version=1, devices=[], groups=["line7"]), [private]
    )
    send(broker, manifest, chunks_of(new, 4096), update_id="h2", base="fleet/groups/line7")
    assert final_status(rec, "h2")["state"] == "SUCCEEDED"
    assert serving_version(broker, rec, 1) == version_of(new)
