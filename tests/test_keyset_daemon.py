"""Key sets through a running daemon: revocation, replay and expiry over the air."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from agent.config.keys import load_public_key
from agent.updates.keyset import KEYSET_PAYLOAD_TYPE, build_keyset_payload
from agent.updates.signing import load_private_key, sign_envelope
from tests.broker import MosquittoBroker, Recorder, publisher
from tests.conftest import AgentProcess
from tests.test_updates import agent_config, linear, mqtt_update, wait_subscribed
from tests.update_helpers import (
    chunks_of,
    envelope,
    final_manifest_status,
    final_status,
    make_key,
    payload_for,
    send,
    wait_until,
)

pytestmark = pytest.mark.broker


def keyset(
    version: int, roots: list[Path], keys: list[Path], expires_in: timedelta = timedelta(days=30)
) -> bytes:
    """A key set of the public ``keys``, signed by the private ``roots``."""
    payload = build_keyset_payload(
        version=version,
        expires=datetime.now(timezone.utc) + expires_in,
        keys=[load_public_key(k) for k in keys],
        threshold=1,
    )
    signers = [load_private_key(r) for r in roots]
    return json.dumps(sign_envelope(payload, signers, KEYSET_PAYLOAD_TYPE)).encode()


def publish_keys(broker: MosquittoBroker, data: bytes, topic: str = "fleet/keys") -> None:
    """Publish a key set retained, QoS 1."""
    client = publisher(broker)
    try:
        client.publish(topic, data, qos=1, retain=True).wait_for_publish(10)
    finally:
        client.disconnect()
        client.loop_stop()


def events(agent: AgentProcess, name: str) -> list[dict[str, Any]]:
    """The daemon's log events called ``name``."""
    return [e for e in agent.log_events() if e.get("event") == name]


def test_a_key_set_revokes_a_leaked_key_on_the_device(
    broker: MosquittoBroker,
    recorder: Callable[..., Recorder],
    agent_factory: Callable[[dict[str, Any]], AgentProcess],
    tmp_path: Path,
) -> None:
    """A device with root keys takes the retained key set, installs what its keys sign (and
    says the version reached in its health),
    refuses what a key removed from a newer set signs, ignores an older set replayed, and
    stops updates (saying why) once its key set has expired."""
    root_private, root_public = make_key(tmp_path / "keys", "root")
    leaked_private, leaked_public = make_key(tmp_path / "keys", "leaked")
    fresh_private, fresh_public = make_key(tmp_path / "keys", "fresh")
    first = keyset(1, [root_private], [leaked_public])
    publish_keys(broker, first)
    (tmp_path / "models").mkdir(exist_ok=True)
    (tmp_path / "models" / "lin.onnx").write_bytes(linear(tmp_path, 1))
    config = agent_config(broker, tmp_path, [], root_keys=[str(root_public)])
    config["health"] = {"interval_s": 0.5}
    rec = recorder("edge/dev1/updates/status", "edge/dev1/health")
    agent = agent_factory(config)
    wait_subscribed(agent)
    wait_until(lambda: bool(events(agent, "keyset_accepted")), 15, "the first key set")

    mqtt_update(broker, linear(tmp_path, 2), [leaked_private], update_id="by-set-1", version=2)
    assert final_status(rec, "by-set-1")["state"] == "SUCCEEDED"

    publish_keys(broker, keyset(2, [root_private], [fresh_public]))
    wait_until(lambda: len(events(agent, "keyset_accepted")) == 2, 15, "the second key set")
    leaked = linear(tmp_path, 3)
    manifest = envelope(payload_for(leaked, update_id="leaked", version=3), [leaked_private])
    send(broker, manifest, chunks_of(leaked, 4096), update_id="leaked")
    # Not verified, so the status names only the digest of the bytes it answers.
    refused = final_manifest_status(rec, manifest)
    assert refused["state"] == "REJECTED"
    assert "not in key set version 2" in refused["reason"]
    mqtt_update(broker, linear(tmp_path, 4), [fresh_private], update_id="fresh", version=4)
    assert final_status(rec, "fresh")["state"] == "SUCCEEDED"
    wait_until(
        lambda: any(
            json.loads(m.payload).get("update_versions") == {"lin": 4}
            for m in rec.on("edge/dev1/health")
        ),
        15,
        "the version reached, in the health",
    )

    publish_keys(broker, first, topic="edge/dev1/keys")  # the old set, replayed
    wait_until(lambda: bool(events(agent, "keyset_ignored")), 15, "the replay ignored")

    publish_keys(broker, keyset(3, [root_private], [fresh_public], timedelta(seconds=3)))
    wait_until(lambda: len(events(agent, "keyset_accepted")) == 3, 15, "the short-lived set")
    time.sleep(3.5)  # let the third key set expire
    late_model = linear(tmp_path, 5)
    manifest = envelope(payload_for(late_model, update_id="late", version=5), [fresh_private])
    send(broker, manifest, chunks_of(late_model, 4096), update_id="late")
    late = final_manifest_status(rec, manifest)
    assert late["state"] == "REJECTED"
    assert "key set version 3 expired" in late["reason"]

    def expired_in_health() -> bool:
        for message in rec.on("edge/dev1/health"):
            keys = json.loads(message.payload).get("update_keys") or {}
            if keys.get("key_set_version") == 3 and "expired" in (keys.get("problem") or ""):
                return True
        return False

    wait_until(expired_in_health, 15, "the expired key set in the health")
