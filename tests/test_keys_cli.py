"""``edge-agent keys sign`` and ``keys publish`` (publish against a real Mosquitto)."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from agent.cli.main import main
from agent.updates.keyset import build_keyset_payload, verify_keyset
from agent.updates.signing import TrustedKeys, load_private_key, sign_envelope
from tests.broker import MosquittoBroker, Recorder

NOW = datetime.now(timezone.utc)


@pytest.fixture
def keys(tmp_path: Path) -> Path:
    """tmp_path with key pairs root1, root2, new, a and b (NAME.key, NAME.pub)."""
    for name in ("root1", "root2", "new", "a", "b"):
        assert main(["keygen", str(tmp_path / name)]) == 0
    return tmp_path


def root(folder: Path, *names: str, threshold: int = 1) -> TrustedKeys:
    """The devices' view of these root public keys (updates.root_keys)."""
    return TrustedKeys.from_files(
        [str(folder / f"{n}.pub") for n in names], threshold, "updates.root_keys"
    )


def sign(folder: Path, *extra: str, version: str = "3") -> list[str]:
    """``keys sign`` arguments: root1 and root2 sign a set of a and b, threshold 2."""
    return [
        "keys",
        "sign",
        "--root",
        str(folder / "root1.key"),
        str(folder / "root2.key"),
        "--key",
        str(folder / "a.pub"),
        "--key",
        str(folder / "b.pub"),
        "--threshold",
        "2",
        "--version",
        version,
        "--expires",
        "30d",
        "-o",
        str(folder / "keyset.json"),
        *extra,
    ]


def test_keys_sign_writes_a_set_the_devices_accept(
    keys: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """sign: the envelope verifies against the root (threshold 2), lists the keys and the
    threshold, expires after --expires, and the line printed says so."""
    before = datetime.now(timezone.utc).replace(microsecond=0)
    assert main(sign(keys)) == 0
    after = datetime.now(timezone.utc)
    out = capsys.readouterr().out
    key_set = verify_keyset(
        (keys / "keyset.json").read_bytes(), root(keys, "root1", "root2", threshold=2), NOW
    )
    assert key_set.version == 3
    assert key_set.keys.threshold == 2
    assert key_set.root is None
    assert before + timedelta(days=30) <= key_set.expires <= after + timedelta(days=30)
    assert out.startswith(f"wrote {keys / 'keyset.json'}: key set version 3, 2 update key(s) (")
    assert all(k[:16] in out for k in key_set.keyids())
    assert "threshold 2, expires " in out
    assert "2 root signature(s)" in out


def test_keys_sign_rotation_needs_the_new_root_to_sign(
    keys: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--new-root without the new root's private key among --root fails (exit 1); with it,
    the set verifies against the old root and carries the new one."""
    rotate = ["--new-root", str(keys / "new.pub")]
    assert main(sign(keys, *rotate)) == 1
    assert "must also be signed by 1 of the new root's keys" in capsys.readouterr().err
    assert main(sign(keys, *rotate, "--root", str(keys / "new.key"))) == 0
    assert "rotates the root to 1 key(s)" in capsys.readouterr().out
    key_set = verify_keyset((keys / "keyset.json").read_bytes(), root(keys, "root1"), NOW)
    assert key_set.root is not None
    assert set(key_set.root.keys) == set(root(keys, "new").keys)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--expires", "soon"], "invalid duration"),
        (["--new-root-threshold", "2"], "--new-root-threshold needs --new-root"),
    ],
)
def test_keys_sign_usage_errors(
    keys: Path, capsys: pytest.CaptureFixture[str], extra: list[str], message: str
) -> None:
    """Bad options exit 2 with the problem named, and write nothing."""
    assert main(sign(keys, *extra)) == 2
    assert message in capsys.readouterr().err
    assert not (keys / "keyset.json").exists()
    assert main(sign(keys, version="0")) == 2


def test_keys_sign_refuses_a_threshold_above_the_keys(
    keys: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--threshold 3 of 2 keys: the devices would refuse it, so sign does (exit 1)."""
    assert main([*sign(keys), "--threshold", "3"]) == 1
    assert "threshold 3 is more than its 2 key(s)" in capsys.readouterr().err


def test_keys_publish_retains_the_set_on_fleet_keys(
    keys: Path, broker: MosquittoBroker, capsys: pytest.CaptureFixture[str]
) -> None:
    """publish: the file's exact bytes, retained on fleet/keys, for devices that connect
    later; the line printed names the version, the topic and the broker."""
    assert main(sign(keys)) == 0
    capsys.readouterr()
    where = ["--host", broker.host, "--port", str(broker.port)]
    assert main(["keys", "publish", str(keys / "keyset.json"), *where]) == 0
    out = capsys.readouterr().out
    assert out.startswith("published key set version 3, 2 update key(s)")
    assert f"retained on fleet/keys at {broker.host}:{broker.port}" in out
    late = Recorder(broker, ["fleet/keys"]).start()
    try:
        late.wait_for(lambda ms: any(m.topic == "fleet/keys" for m in ms))
        (message,) = late.on("fleet/keys")
        assert message.retain
        assert message.payload == (keys / "keyset.json").read_bytes()
    finally:
        late.stop()


def test_keys_publish_to_one_device_and_clear(keys: Path, broker: MosquittoBroker) -> None:
    """--device publishes on PREFIX/ID/keys; --clear sends the empty retained message that
    removes it."""
    assert main(sign(keys)) == 0
    where = ["--host", broker.host, "--port", str(broker.port), "--prefix", "site"]
    rec = Recorder(broker, ["site/dev1/keys"]).start()
    try:
        assert main(["keys", "publish", str(keys / "keyset.json"), "--device", "dev1", *where]) == 0
        rec.wait_for_payload("site/dev1/keys", (keys / "keyset.json").read_bytes())
        assert main(["keys", "publish", "--clear", "--device", "dev1", *where]) == 0
        rec.wait_for_payload("site/dev1/keys", b"")
    finally:
        rec.stop()


def test_keys_publish_refuses_what_devices_would_refuse(
    keys: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An expired set or a file that is not a key set fails (exit 1) before connecting;
    neither a file nor --clear is a usage error (exit 2)."""
    payload = build_keyset_payload(
        version=1,
        expires=NOW - timedelta(days=1),
        keys=[load_private_key(keys / "a.key").public_key()],
        threshold=1,
    )
    expired = keys / "expired.json"
    signer = load_private_key(keys / "root1.key")
    expired.write_text(
        json.dumps(sign_envelope(payload, [signer], "application/vnd.edge-agent.keys+json"))
    )
    unreachable = ["--host", "127.0.0.1", "--port", "1"]
    assert main(["keys", "publish", str(expired), *unreachable]) == 1
    assert "expired at" in capsys.readouterr().err
    manifest = keys / "manifest.json"
    manifest.write_text(json.dumps(sign_envelope(b"{}", [signer])))
    assert main(["keys", "publish", str(manifest), *unreachable]) == 1
    assert "payloadType is 'application/vnd.edge-agent.update+json'" in capsys.readouterr().err
    assert main(["keys", "publish", *unreachable]) == 2
