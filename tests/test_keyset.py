"""Root-signed key sets: verify_keyset's rules and UpdateTrust's state (pure, real Ed25519)."""

from __future__ import annotations

import base64
import json
import stat
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.config.loader import load_config
from agent.config.schema import AgentConfig
from agent.errors import ConfigError, KeySetError, SignatureError, UpdateRejectedError
from agent.updates.keyset import (
    KEYSET_PAYLOAD_TYPE,
    build_keyset_payload,
    verify_keyset,
)
from agent.updates.manifest import MAX_KEYSET_BYTES, format_time
from agent.updates.signing import (
    TrustedKeys,
    generate_keypair,
    keyid,
    load_private_key,
    sign_envelope,
)
from agent.updates.trust import KEYSET_FILE, NO_KEY_SET, ROOTLESS, UpdateTrust

NOW = datetime.now(timezone.utc).replace(microsecond=0)
MANIFEST_PAYLOAD = b'{"update_id": "u1"}'


@dataclass(frozen=True)
class Key:
    """A key pair on disk (the config names the public file) and its private key."""

    private: Ed25519PrivateKey
    public_file: Path

    @property
    def id(self) -> str:
        return keyid(self.private.public_key())


@pytest.fixture
def key(tmp_path: Path) -> Any:
    """Factory: a fresh named key pair in tmp_path/keys."""

    def make(name: str) -> Key:
        folder = tmp_path / "keys"
        folder.mkdir(exist_ok=True)
        private, public, _ = generate_keypair(folder / name)
        return Key(load_private_key(private), public)

    return make


def keyset(
    version: int,
    keys: Sequence[Key],
    signers: Sequence[Key],
    *,
    threshold: int = 1,
    expires: datetime | None = None,
    new_root: Sequence[Key] = (),
    new_root_threshold: int = 1,
) -> bytes:
    """A key set envelope of ``keys`` signed by each of ``signers``."""
    payload = build_keyset_payload(
        version=version,
        expires=expires or NOW + timedelta(days=90),
        keys=[k.private.public_key() for k in keys],
        threshold=threshold,
        root_keys=[k.private.public_key() for k in new_root],
        root_threshold=new_root_threshold,
    )
    return signed(payload, signers)


def signed(payload: bytes, signers: Sequence[Key], kind: str = KEYSET_PAYLOAD_TYPE) -> bytes:
    return json.dumps(sign_envelope(payload, [k.private for k in signers], kind)).encode()


def payload_document(update: Key) -> dict[str, Any]:
    """A valid key set payload of one update key, as JSON to alter."""
    payload = build_keyset_payload(
        version=1, expires=NOW + timedelta(days=1), keys=[update.private.public_key()], threshold=1
    )
    document: dict[str, Any] = json.loads(payload)
    return document


def manifest(*signers: Key) -> bytes:
    """An update manifest envelope (its payload does not matter to trust)."""
    return json.dumps(sign_envelope(MANIFEST_PAYLOAD, [k.private for k in signers])).encode()


def config(
    tmp_path: Path,
    roots: Sequence[Key] = (),
    trusted: Sequence[Key] = (),
    root_threshold: int = 1,
) -> AgentConfig:
    return AgentConfig.model_validate(
        {
            "device_id": "dev1",
            "state_dir": str(tmp_path / "state"),
            "updates": {
                "root_keys": [str(k.public_file) for k in roots],
                "root_threshold": root_threshold,
                "trusted_keys": [str(k.public_file) for k in trusted],
            },
        }
    )


def root_of(*keys: Key, threshold: int = 1) -> TrustedKeys:
    return TrustedKeys.from_files(
        [str(k.public_file) for k in keys], threshold, "updates.root_keys"
    )


def test_a_root_signed_key_set_replaces_trusted_keys(tmp_path: Path, key: Any) -> None:
    """Before a key set, trusted_keys verify; once one is accepted, only its keys do."""
    root, old, new = key("root"), key("old"), key("new")
    trust = UpdateTrust(config(tmp_path, roots=[root], trusted=[old]))
    assert trust.verify_manifest(manifest(old), NOW) == MANIFEST_PAYLOAD
    assert trust.describe()["source"] == "trusted_keys"
    outcome = trust.offer_keyset(keyset(1, [new], [root]), "fleet/keys", NOW)
    assert (outcome.accepted, outcome.ignored, outcome.reason, outcome.version) == (
        True,
        False,
        None,
        1,
    )
    assert trust.verify_manifest(manifest(new), NOW) == MANIFEST_PAYLOAD
    with pytest.raises(SignatureError, match=r"key [0-9a-f]{16} is not in key set version 1"):
        trust.verify_manifest(manifest(old), NOW)
    info = trust.describe(NOW)
    assert info == {
        "source": "key_set",
        "key_set_version": 1,
        "expires": format_time(NOW + timedelta(days=90)),
        "keyids": [new.id[:16]],
        "threshold": 1,
        "root_keyids": [root.id[:16]],
        "problem": None,
    }


def test_root_threshold_counts_distinct_root_keys(tmp_path: Path, key: Any) -> None:
    """With root_threshold 2, one root signature (or the same one twice) is refused."""
    first, second, update = key("r1"), key("r2"), key("u")
    trust = UpdateTrust(config(tmp_path, roots=[first, second], root_threshold=2))
    once = trust.offer_keyset(keyset(1, [update], [first]), "fleet/keys", NOW)
    assert not once.accepted
    assert not once.ignored
    assert "not signed by updates.root_keys: needs 2 valid signature(s)" in str(once.reason)
    twice = trust.offer_keyset(keyset(1, [update], [first, first]), "fleet/keys", NOW)
    assert "already counted" in str(twice.reason)
    assert trust.offer_keyset(keyset(1, [update], [first, second]), "fleet/keys", NOW).accepted


def test_a_key_set_not_signed_by_the_root_is_refused(key: Any) -> None:
    """Signed by any key but the root's: refused, naming the key that is not a root key."""
    root, update = key("root"), key("u")
    with pytest.raises(KeySetError, match=r"key [0-9a-f]{16} is not in updates\.root_keys"):
        verify_keyset(keyset(1, [update], [update]), root_of(root), NOW)


def test_a_manifest_envelope_is_not_a_key_set(key: Any) -> None:
    """The payloadType must be the key set's: a root-signed manifest is not a key set."""
    root = key("root")
    with pytest.raises(KeySetError, match=r"payloadType is 'application/vnd\.edge-agent\.update"):
        verify_keyset(manifest(root), root_of(root), NOW)


def test_a_keyid_that_is_not_the_hash_of_its_key_is_refused(key: Any) -> None:
    """A keys entry whose keyid names another key is refused (no key can hide behind an id)."""
    root, update, other = key("root"), key("u"), key("o")
    document = payload_document(update)
    document["keys"][0]["keyid"] = other.id
    with pytest.raises(KeySetError, match=r"keys\[0\]\.keyid .* is not the sha256 of its"):
        verify_keyset(signed(json.dumps(document).encode(), [root]), root_of(root), NOW)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"threshold": 0}, "threshold must be an integer of 1 or more"),
        ({"threshold": 2}, "threshold 2 is more than its 1 key"),
        ({"version": 0}, "version must be an integer of 1 or more"),
        ({"version": True}, "version must be an integer"),
        ({"expires": "tomorrow"}, "is not an RFC 3339 time"),
        ({"expires": "2030-01-01T00:00:00"}, "has no time zone offset"),
        ({"revoked": []}, "unknown key 'revoked'"),
        ({"keys": []}, "keys must be a non-empty list"),
        ({"keys": [{"keyid": "00", "public_key": "not a pem"}]}, "is not a PEM public key"),
        ({"root": {"threshold": 1, "keys": []}}, "root.keys must be a non-empty list"),
    ],
)
def test_malformed_key_sets_are_refused(key: Any, change: dict[str, Any], message: str) -> None:
    """Each payload rule refuses with a message naming the field."""
    root, update = key("root"), key("u")
    document = payload_document(update)
    document.update(change)
    with pytest.raises(KeySetError, match=message):
        verify_keyset(signed(json.dumps(document).encode(), [root]), root_of(root), NOW)


def test_more_than_64_keys_are_refused() -> None:
    """A key set lists at most 64 keys (the signing tool refuses it already)."""
    many = [Ed25519PrivateKey.generate().public_key() for _ in range(65)]
    with pytest.raises(KeySetError, match="lists 65 keys; at most 64"):
        build_keyset_payload(version=1, expires=NOW, keys=many, threshold=1)


def test_an_older_or_equal_version_is_ignored(tmp_path: Path, key: Any) -> None:
    """A replay of an older set, another set of the same version, or the set in use again is
    ignored (not refused), and the set in use stays."""
    root, a, b = key("root"), key("a"), key("b")
    trust = UpdateTrust(config(tmp_path, roots=[root]))
    older = keyset(2, [b], [root])
    current = keyset(3, [a], [root])
    assert trust.offer_keyset(current, "fleet/keys", NOW).accepted
    for data, version in ((older, 2), (keyset(3, [b], [root]), 3)):
        outcome = trust.offer_keyset(data, "edge/dev1/keys", NOW)
        assert (outcome.accepted, outcome.ignored, outcome.version) == (False, True, version)
        assert f"key set version {version} is not newer than version 3 in use" in str(
            outcome.reason
        )
    again = trust.offer_keyset(current, "fleet/keys", NOW)
    assert again.ignored
    assert "already in use" in str(again.reason)
    assert trust.verify_manifest(manifest(a), NOW) == MANIFEST_PAYLOAD
    with pytest.raises(SignatureError, match="not in key set version 3"):
        trust.verify_manifest(manifest(b), NOW)


def test_a_key_set_expired_on_arrival_is_refused(tmp_path: Path, key: Any) -> None:
    """A set whose expiry has passed is refused, device clock named."""
    root, update = key("root"), key("u")
    trust = UpdateTrust(config(tmp_path, roots=[root]))
    outcome = trust.offer_keyset(
        keyset(1, [update], [root], expires=NOW - timedelta(seconds=1)), "fleet/keys", NOW
    )
    assert not outcome.accepted
    assert not outcome.ignored
    assert "key set version 1 expired at" in str(outcome.reason)
    assert "device clock" in str(outcome.reason)


def test_an_expired_stored_key_set_stops_updates_until_a_newer_one(
    tmp_path: Path, key: Any
) -> None:
    """Once the set in use expires, manifests are refused with the reason (the freeze
    defence); a newer set signed by the root starts them again."""
    root, update = key("root"), key("u")
    trust = UpdateTrust(config(tmp_path, roots=[root]))
    expires = NOW + timedelta(hours=1)
    assert trust.offer_keyset(keyset(1, [update], [root], expires=expires), "k", NOW).accepted
    later = NOW + timedelta(hours=2)
    reason = (
        f"key set version 1 expired at {format_time(expires)}: updates are stopped until a "
        "newer key set is published on fleet/keys"
    )
    with pytest.raises(UpdateRejectedError) as caught:
        trust.verify_manifest(manifest(update), later)
    assert str(caught.value) == reason
    assert trust.problem(later) == reason
    assert trust.describe(later)["problem"] == reason
    assert trust.offer_keyset(keyset(2, [update], [root]), "fleet/keys", later).accepted
    assert trust.verify_manifest(manifest(update), later) == MANIFEST_PAYLOAD


def test_a_root_rotation_needs_the_old_and_the_new_root(tmp_path: Path, key: Any) -> None:
    """A set with a new root is accepted only when signed by the old root and the new one;
    after it, the new root is the one that signs."""
    old, new, update = key("old"), key("new"), key("u")
    trust = UpdateTrust(config(tmp_path, roots=[old]))
    only_old = trust.offer_keyset(keyset(2, [update], [old], new_root=[new]), "k", NOW)
    assert "rotates the root, but is not signed by the new root as well" in str(only_old.reason)
    only_new = trust.offer_keyset(keyset(2, [update], [new], new_root=[new]), "k", NOW)
    assert "not signed by updates.root_keys" in str(only_new.reason)
    assert trust.offer_keyset(keyset(2, [update], [old, new], new_root=[new]), "k", NOW).accepted
    assert trust.describe()["root_keyids"] == [new.id[:16]]


def test_after_a_rotation_the_old_root_alone_cannot_sign(tmp_path: Path, key: Any) -> None:
    """A newer set signed only by the retired root is refused; the new root's is accepted."""
    old, new, update = key("old"), key("new"), key("u")
    trust = UpdateTrust(config(tmp_path, roots=[old]))
    assert trust.offer_keyset(keyset(2, [update], [old, new], new_root=[new]), "k", NOW).accepted
    refused = trust.offer_keyset(keyset(3, [update], [old]), "k", NOW)
    assert not refused.accepted
    assert not refused.ignored
    assert "not signed by the root of key set version 2" in str(refused.reason)
    assert trust.offer_keyset(keyset(3, [update], [new]), "k", NOW).accepted


def test_a_key_removed_from_the_set_no_longer_verifies_manifests(tmp_path: Path, key: Any) -> None:
    """Revocation: version 2 without key b, and b's manifests are refused."""
    root, a, b = key("root"), key("a"), key("b")
    trust = UpdateTrust(config(tmp_path, roots=[root]))
    assert trust.offer_keyset(keyset(1, [a, b], [root]), "k", NOW).accepted
    assert trust.verify_manifest(manifest(b), NOW) == MANIFEST_PAYLOAD
    assert trust.offer_keyset(keyset(2, [a], [root]), "k", NOW).accepted
    with pytest.raises(SignatureError, match="not in key set version 2"):
        trust.verify_manifest(manifest(b), NOW)
    assert trust.verify_manifest(manifest(a), NOW) == MANIFEST_PAYLOAD


def test_the_key_set_threshold_applies_to_manifests(tmp_path: Path, key: Any) -> None:
    """A set with threshold 2 needs two of its keys on each manifest."""
    root, a, b = key("root"), key("a"), key("b")
    trust = UpdateTrust(config(tmp_path, roots=[root]))
    assert trust.offer_keyset(keyset(1, [a, b], [root], threshold=2), "k", NOW).accepted
    with pytest.raises(SignatureError, match="needs 2 valid signature"):
        trust.verify_manifest(manifest(a), NOW)
    assert trust.verify_manifest(manifest(a, b), NOW) == MANIFEST_PAYLOAD


def test_an_oversize_key_set_is_refused_unread(tmp_path: Path, key: Any) -> None:
    """Over 256 KiB: refused for its size, before any parsing (it is not even JSON)."""
    root = key("root")
    data = b"x" * (MAX_KEYSET_BYTES + 1)
    with pytest.raises(KeySetError, match=r"more than 262144 \(256 KiB\): refused unread"):
        verify_keyset(data, root_of(root), NOW)
    outcome = UpdateTrust(config(tmp_path, roots=[root])).offer_keyset(data, "k", NOW)
    assert not outcome.accepted
    assert "refused unread" in str(outcome.reason)


def test_the_key_set_survives_a_restart(tmp_path: Path, key: Any) -> None:
    """The accepted sets are stored (0600, their exact bytes) and verified again by a new
    UpdateTrust on the same state_dir: a rotation, then a set signed by the new root only."""
    old, new, update = key("old"), key("new"), key("u")
    settings = config(tmp_path, roots=[old])
    trust = UpdateTrust(settings)
    rotation = keyset(2, [update], [old, new], new_root=[new])
    latest = keyset(3, [update], [new])
    assert trust.offer_keyset(rotation, "k", NOW).accepted
    assert trust.offer_keyset(latest, "k", NOW).accepted
    stored = trust.path
    assert stored == tmp_path / "state" / "updates" / KEYSET_FILE
    assert stat.S_IMODE(stored.stat().st_mode) == 0o600
    envelopes = [base64.b64decode(e) for e in json.loads(stored.read_bytes())["envelopes"]]
    assert envelopes == [rotation, latest]
    again = UpdateTrust(settings)
    assert again.describe()["key_set_version"] == 3
    assert again.describe()["root_keyids"] == [new.id[:16]]
    assert again.verify_manifest(manifest(update), NOW) == MANIFEST_PAYLOAD
    assert again.offer_keyset(keyset(2, [old], [old]), "k", NOW).ignored
    assert not again.offer_keyset(keyset(4, [old], [old]), "k", NOW).accepted


def test_the_chain_verifies_after_root_keys_move_to_the_new_root(tmp_path: Path, key: Any) -> None:
    """An operator who puts the rotated-to root in updates.root_keys keeps the stored set."""
    old, new, update = key("old"), key("new"), key("u")
    trust = UpdateTrust(config(tmp_path, roots=[old]))
    assert trust.offer_keyset(keyset(2, [update], [old, new], new_root=[new]), "k", NOW).accepted
    assert trust.offer_keyset(keyset(3, [update], [new]), "k", NOW).accepted
    moved = UpdateTrust(config(tmp_path, roots=[new]))
    assert moved.problem(NOW) is None
    assert moved.describe()["key_set_version"] == 3


def test_a_stored_key_set_the_root_did_not_sign_fails_closed(tmp_path: Path, key: Any) -> None:
    """root_keys changed to an unrelated key: the stored set (the version floor) cannot be
    verified, so manifests and key sets are refused, naming the file."""
    root, stranger, update = key("root"), key("stranger"), key("u")
    assert (
        UpdateTrust(config(tmp_path, roots=[root]))
        .offer_keyset(keyset(1, [update], [root]), "k", NOW)
        .accepted
    )
    trust = UpdateTrust(config(tmp_path, roots=[stranger], trusted=[update]))
    problem = str(trust.problem(NOW))
    assert f"stored key set {trust.path} cannot be used" in problem
    assert "not in updates.root_keys" in problem
    with pytest.raises(UpdateRejectedError, match="stored key set"):
        trust.verify_manifest(manifest(update), NOW)
    assert trust.offer_keyset(keyset(2, [update], [stranger]), "k", NOW).reason == problem
    assert trust.describe()["source"] == "disabled"


@pytest.mark.parametrize(
    "content",
    [b"{not json", b'{"format": 1, "envelopes": ["!!"]}', b'{"format": 9, "envelopes": []}'],
)
def test_a_corrupt_stored_key_set_fails_closed(tmp_path: Path, key: Any, content: bytes) -> None:
    """An unreadable store refuses manifests (even with trusted_keys) with the file named."""
    root, update = key("root"), key("u")
    trust = UpdateTrust(config(tmp_path, roots=[root]))
    trust.path.parent.mkdir(parents=True, exist_ok=True)
    trust.path.write_bytes(content)
    trust.reconfigure(config(tmp_path, roots=[root], trusted=[update]))
    with pytest.raises(UpdateRejectedError, match=f"stored key set {trust.path}.*corrupt"):
        trust.verify_manifest(manifest(update), NOW)
    assert not trust.offer_keyset(keyset(1, [update], [root]), "k", NOW).accepted
    assert trust.path.read_bytes() == content  # not overwritten: it may hold the floor


def test_root_keys_without_a_key_set_or_trusted_keys(tmp_path: Path, key: Any) -> None:
    """Manifests are refused with the reason that says to publish a key set."""
    trust = UpdateTrust(config(tmp_path, roots=[key("root")]))
    with pytest.raises(UpdateRejectedError) as caught:
        trust.verify_manifest(manifest(key("u")), NOW)
    assert str(caught.value) == NO_KEY_SET
    assert trust.problem() == NO_KEY_SET
    assert trust.describe()["source"] == "disabled"


def test_without_root_keys_key_sets_are_refused(tmp_path: Path, key: Any) -> None:
    """A device without updates.root_keys keeps trusted_keys and refuses key sets."""
    root, update = key("root"), key("u")
    trust = UpdateTrust(config(tmp_path, trusted=[update]))
    outcome = trust.offer_keyset(keyset(1, [root], [root]), "fleet/keys", NOW)
    assert (outcome.accepted, outcome.reason) == (False, ROOTLESS)
    assert trust.verify_manifest(manifest(update), NOW) == MANIFEST_PAYLOAD
    assert not trust.path.exists()


def test_an_empty_message_is_ignored(tmp_path: Path, key: Any) -> None:
    """A cleared retained key set (empty message) changes nothing."""
    root, update = key("root"), key("u")
    trust = UpdateTrust(config(tmp_path, roots=[root]))
    assert trust.offer_keyset(keyset(1, [update], [root]), "k", NOW).accepted
    outcome = trust.offer_keyset(b"", "fleet/keys", NOW)
    assert outcome.ignored
    assert "version 1" in str(outcome.reason)
    assert trust.describe()["key_set_version"] == 1


def test_no_keys_configured_does_not_import_cryptography(tmp_path: Path) -> None:
    """Without trusted_keys or root_keys, UpdateTrust never loads cryptography (~8 MB RSS)."""
    code = (
        "import sys\n"
        "from agent.config.schema import AgentConfig\n"
        "from agent.updates.trust import UpdateTrust\n"
        f"t = UpdateTrust(AgentConfig.model_validate({{'device_id': 'd', 'state_dir': "
        f"{str(tmp_path)!r}}}))\n"
        "print('cryptography' in sys.modules, t.describe()['source'])\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert done.stdout.split() == ["False", "disabled"]


def test_a_rotation_repeated_during_a_transition_is_stored_once(tmp_path: Path, key: Any) -> None:
    """Sets that keep rotating to the same new root (so that devices that missed the first
    can still take it) are accepted, and only the first is kept in the chain."""
    old, new, update = key("old"), key("new"), key("u")
    sets = [keyset(v, [update], [old, new], new_root=[new]) for v in (3, 4, 5)]
    trust = UpdateTrust(config(tmp_path / "a", roots=[old]))
    assert all(trust.offer_keyset(data, "k", NOW).accepted for data in sets)
    stored = [base64.b64decode(e) for e in json.loads(trust.path.read_bytes())["envelopes"]]
    assert stored == [sets[0], sets[2]]
    assert UpdateTrust(config(tmp_path / "a", roots=[old])).describe()["key_set_version"] == 5
    missed = UpdateTrust(config(tmp_path / "b", roots=[old]))
    assert missed.offer_keyset(sets[2], "k", NOW).accepted
    assert missed.describe()["root_keyids"] == [new.id[:16]]


def test_root_threshold_above_the_root_keys_is_a_config_error(tmp_path: Path, key: Any) -> None:
    """check-config: root_threshold 2 of one root key could never accept a key set; relative
    root_keys are resolved from the config's folder."""
    key("root")
    path = tmp_path / "agent.yaml"
    path.write_text("updates:\n  root_keys: [keys/root.pub]\n  root_threshold: 2\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert [str(p) for p in caught.value.problems] == [
        f"{path}:3: updates.root_threshold: root_threshold 2 is more than the 1 root key(s): "
        "no key set could ever be accepted"
    ]
    path.write_text("updates:\n  root_keys: [keys/root.pub]\n")
    assert load_config(path).updates.root_keys == (str(tmp_path / "keys" / "root.pub"),)
