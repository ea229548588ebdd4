"""publish-update and a device that cannot verify what it was sent: the device's REJECTED
names no update id (it read none it could believe), only the digest of the exact manifest
bytes; the command knows its own bytes, so it reports that answer at once and exits 1."""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from tests.broker import MosquittoBroker
from tests.conftest import AgentProcess
from tests.test_keyset_daemon import events, keyset, publish_keys
from tests.test_update_cli import edge_agent
from tests.test_updates import agent_config, linear, wait_subscribed
from tests.update_helpers import make_key, wait_until

pytestmark = pytest.mark.broker

AgentFactory = Callable[[dict[str, Any]], AgentProcess]
TIMEOUT_S = 300  # what the command would wait for devices that say nothing


def publish(broker: MosquittoBroker, model: Path, key: Path, version: int) -> tuple[str, float]:
    """Run publish-update to dev1; (its output, seconds it took). It must fail."""
    started = time.monotonic()
    done = edge_agent(
        "publish-update",
        str(model),
        "--key",
        str(key),
        "--model",
        "lin",
        "--version",
        str(version),
        "--device",
        "dev1",
        "--host",
        broker.host,
        "--port",
        str(broker.port),
        "--timeout",
        str(TIMEOUT_S),
        timeout_s=TIMEOUT_S + 30,
    )
    took = time.monotonic() - started
    assert done.returncode == 1, done.stdout + done.stderr
    return done.stdout + done.stderr, took


def test_an_untrusted_key_is_reported_at_once(
    broker: MosquittoBroker, tmp_path: Path, agent_factory: AgentFactory
) -> None:
    """A key the device does not trust: REJECTED with the device's reason, exit 1, long
    before --timeout (it used to wait the whole timeout and blame the network)."""
    _, trusted = make_key(tmp_path / "keys", "trusted")
    stranger, _ = make_key(tmp_path / "keys", "stranger")
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "lin.onnx").write_bytes(linear(tmp_path, 0))
    agent = agent_factory(agent_config(broker, tmp_path, [trusted]))
    wait_subscribed(agent)
    model = tmp_path / "new.onnx"
    model.write_bytes(linear(tmp_path, 1))

    output, took = publish(broker, model, stranger, 2)

    assert "dev1: REJECTED" in output
    assert "is not in updates.trusted_keys" in output
    assert "0 succeeded, 1 failed or rejected (dev1)" in output
    assert "no device reported" not in output
    assert took < TIMEOUT_S / 5


def test_a_revoked_key_and_an_expired_key_set_are_reported_at_once(
    broker: MosquittoBroker, tmp_path: Path, agent_factory: AgentFactory
) -> None:
    """With key sets: a key a newer set revoked, then any key once the device's key set
    has expired: each REJECTED with the device's reason, exit 1, at once."""
    root, root_public = make_key(tmp_path / "keys", "root")
    leaked, leaked_public = make_key(tmp_path / "keys", "leaked")
    fresh, fresh_public = make_key(tmp_path / "keys", "fresh")
    publish_keys(broker, keyset(1, [root], [leaked_public, fresh_public]))
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "lin.onnx").write_bytes(linear(tmp_path, 0))
    agent = agent_factory(agent_config(broker, tmp_path, [], root_keys=[str(root_public)]))
    wait_subscribed(agent)
    wait_until(lambda: bool(events(agent, "keyset_accepted")), 15, "the first key set")
    publish_keys(broker, keyset(2, [root], [fresh_public]))
    wait_until(lambda: len(events(agent, "keyset_accepted")) == 2, 15, "the revoking set")
    model = tmp_path / "new.onnx"
    model.write_bytes(linear(tmp_path, 1))

    output, took = publish(broker, model, leaked, 2)
    assert "dev1: REJECTED" in output
    assert "not in key set version 2" in output
    assert took < TIMEOUT_S / 5

    publish_keys(broker, keyset(3, [root], [fresh_public], timedelta(seconds=2)))
    wait_until(lambda: len(events(agent, "keyset_accepted")) == 3, 15, "the short-lived set")
    time.sleep(2.5)  # let it expire
    output, took = publish(broker, model, fresh, 3)
    assert "dev1: REJECTED" in output
    assert "key set version 3 expired" in output
    assert took < TIMEOUT_S / 5
