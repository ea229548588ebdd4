"""Key sets: the update signing keys, signed by offline root keys, delivered over MQTT.

A key set is a DSSE envelope (the format of update manifests, ``agent.updates.signing``)
of payloadType ``application/vnd.edge-agent.keys+json`` whose payload names the keys that
sign update manifests, how many must sign, a version that only rises and an expiry::

    {"version": 3, "expires": "2027-03-01T00:00:00Z", "threshold": 1,
     "keys": [{"keyid": "<hex sha256 of the raw key>", "public_key": "<PEM>"}],
     "root": {"threshold": 1, "keys": [...]}}          # optional: a root rotation

It must carry valid signatures from a threshold of the *current root* (``updates.root_keys``
or the root a previous key set rotated to). One with ``root`` rotates the root, TUF-style:
it must also be signed by a threshold of the new root's keys, so neither the old root alone
nor the new one alone can move the trust anchor.

Everything here is pure (no clocks, no files): ``agent.updates.trust`` keeps the state.
Unknown payload keys are refused rather than skipped: a later version's rule (a revocation
list, say) that this device ignored silently would leave it trusting what it should not.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from agent.errors import KeySetError, SignatureError, UpdateRejectedError
from agent.updates import strict_json
from agent.updates.manifest import MAX_KEYSET_BYTES, format_time, parse_time
from agent.updates.signing import MAX_SIGNATURES, TrustedKeys, keyid, parse_envelope

KEYSET_PAYLOAD_TYPE = "application/vnd.edge-agent.keys+json"
# 64 keys of ~200 bytes each, twice (keys and root), base64 in the envelope: under 64 KiB.
# Larger envelopes are refused before they are read.
MAX_KEYS = 64
MAX_PEM_CHARS = 1024  # an Ed25519 SubjectPublicKeyInfo PEM is 113 characters
PAYLOAD_KEYS = ("version", "expires", "threshold", "keys", "root")
ROOT_KEYS = ("threshold", "keys")
KEY_KEYS = ("keyid", "public_key")


@dataclass(frozen=True)
class KeySet:
    """A verified key set: the keys update manifests are verified against from now on."""

    version: int
    expires: datetime
    keys: TrustedKeys  # the update signing keys and their threshold
    root: TrustedKeys | None  # the root this set rotates to, or None
    envelope: bytes  # the exact bytes that were verified (stored as they came)

    def keyids(self) -> list[str]:
        """The update keys' ids, sorted."""
        return sorted(self.keys.keys)

    def expired_reason(self, now: datetime) -> str | None:
        """Why manifests are refused because this set has expired, or None while it holds."""
        if now < self.expires:
            return None
        return (
            f"key set version {self.version} expired at {format_time(self.expires)}: updates "
            "are stopped until a newer key set is published on fleet/keys"
        )


def build_keyset_payload(
    *,
    version: int,
    expires: datetime,
    keys: Sequence[Ed25519PublicKey],
    threshold: int,
    root_keys: Sequence[Ed25519PublicKey] = (),
    root_threshold: int = 1,
) -> bytes:
    """The payload JSON ``edge-agent keys sign`` signs; ``root_keys`` (non-empty): the new
    root of a rotation. ``KeySetError`` for what the devices would refuse (a threshold above
    the number of keys, too many keys, a version below 1)."""
    document: dict[str, Any] = {
        "version": version,
        "expires": format_time(expires),
        "threshold": threshold,
        "keys": _key_entries(keys),
    }
    if root_keys:
        document["root"] = {"threshold": root_threshold, "keys": _key_entries(root_keys)}
    payload = json.dumps(document, separators=(",", ":"), sort_keys=True).encode()
    _parse_payload(payload)  # the devices' own checks, here where the signer can fix it
    return payload


def verify_keyset(envelope_bytes: bytes, root: TrustedKeys, now: datetime | None) -> KeySet:
    """The key set in ``envelope_bytes`` when a threshold of ``root`` signed it (and, for a
    root rotation, a threshold of the new root too) and it has not expired at ``now``;
    ``KeySetError`` says exactly what was wrong otherwise. ``now=None``: re-verify a stored
    set, whose expiry stops updates but not its place in the chain of roots."""
    payload_type, payload, signatures = _open_envelope(envelope_bytes)
    try:
        root.verify_signatures(payload_type, payload, signatures)
    except SignatureError as exc:
        raise KeySetError(f"key set is not signed by {root.source}: {exc}") from exc
    version, expires, keys, new_root = _parse_payload(payload)
    if new_root is not None:
        try:
            new_root.verify_signatures(payload_type, payload, signatures)
        except SignatureError as exc:
            raise KeySetError(
                f"key set version {version} rotates the root, but is not signed by the new "
                f"root as well: {exc}"
            ) from exc
    if now is not None and now >= expires:
        raise KeySetError(
            f"key set version {version} expired at {format_time(expires)} (device clock "
            f"{format_time(now)}): refused"
        )
    return KeySet(version, expires, keys, new_root, bytes(envelope_bytes))


def verify_chain(
    envelopes: Sequence[bytes], root: TrustedKeys
) -> tuple[tuple[KeySet, ...], TrustedKeys]:
    """Re-verify stored key sets: root rotations in order, then the set in use, each signed
    by the root the one before it left (the first by ``root``). Returns the sets that
    verify and the root in force after them. When the configured root has moved on to one a
    stored rotation introduced, the chain is followed from there (its older part is
    dropped). ``KeySetError`` when no part of the chain verifies; expiry is not checked."""
    if not envelopes:
        return (), root
    first_error: KeySetError | None = None
    for start in range(len(envelopes)):
        try:
            return _follow(envelopes[start:], root)
        except KeySetError as exc:
            first_error = first_error or exc
    assert first_error is not None
    raise first_error


def extend_chain(chain: Sequence[KeySet], base: TrustedKeys, new: KeySet) -> tuple[KeySet, ...]:
    """What to store once ``new`` is accepted: the sets of ``chain`` that moved the root on
    from ``base`` (the configured root), then ``new``. A set that rotates to the root already
    in force is not kept: an operator signs every set of a transition with ``--new-root`` so
    that devices that missed the rotation can still take it, and those repeats move nothing."""
    kept: list[KeySet] = []
    root = base
    for key_set in chain:
        if key_set.root is not None and not _same_root(key_set.root, root):
            kept.append(key_set)
            root = key_set.root
    return (*kept, new)


def _same_root(first: TrustedKeys, second: TrustedKeys) -> bool:
    return set(first.keys) == set(second.keys) and first.threshold == second.threshold


def inspect_keyset(envelope_bytes: bytes) -> KeySet:
    """The key set in ``envelope_bytes`` with nothing verified but its form (for operator
    tools that do not hold the devices' root): ``KeySetError`` when it is not one. Its
    ``root`` is the rotation's new root, as in a verified set."""
    _, payload, _ = _open_envelope(envelope_bytes)
    version, expires, keys, new_root = _parse_payload(payload)
    return KeySet(version, expires, keys, new_root, bytes(envelope_bytes))


def claimed_version(envelope_bytes: bytes) -> int | None:
    """The version an envelope's payload claims, unverified, or None when it has none that
    can be read: enough to ignore a replay of an older set without checking signatures
    (ignoring changes nothing, so a forged claim gains nothing)."""
    if len(envelope_bytes) > MAX_KEYSET_BYTES:
        return None
    try:
        _, payload, _ = parse_envelope(envelope_bytes, "key set")
        data = strict_json.loads(payload)
    except (SignatureError, ValueError):
        return None
    version = data.get("version") if isinstance(data, dict) else None
    if isinstance(version, bool) or not isinstance(version, int):
        return None
    return version


def _follow(
    envelopes: Sequence[bytes], root: TrustedKeys
) -> tuple[tuple[KeySet, ...], TrustedKeys]:
    sets: list[KeySet] = []
    for index, data in enumerate(envelopes):
        key_set = verify_keyset(data, root, None)
        if sets and key_set.version <= sets[-1].version:
            raise KeySetError(
                f"stored key set version {key_set.version} follows version "
                f"{sets[-1].version}: versions must rise"
            )
        if key_set.root is None and index < len(envelopes) - 1:
            raise KeySetError(
                f"stored key set version {key_set.version} is followed by another but "
                "rotates no root"
            )
        sets.append(key_set)
        root = key_set.root or root
    return tuple(sets), root


def _open_envelope(envelope_bytes: bytes) -> tuple[str, bytes, list[tuple[str, bytes]]]:
    """The payload type, payload and signatures of a key set envelope of at most
    ``MAX_KEYSET_BYTES`` (larger ones are refused before parsing) whose payloadType is a
    key set's."""
    if len(envelope_bytes) > MAX_KEYSET_BYTES:
        raise KeySetError(
            f"key set is {len(envelope_bytes)} bytes, more than {MAX_KEYSET_BYTES} "
            "(256 KiB): refused unread"
        )
    try:
        payload_type, payload, signatures = parse_envelope(envelope_bytes, "key set")
    except SignatureError as exc:
        raise KeySetError(str(exc)) from exc
    if payload_type != KEYSET_PAYLOAD_TYPE:
        raise KeySetError(f"payloadType is {payload_type!r}, expected {KEYSET_PAYLOAD_TYPE!r}")
    return payload_type, payload, signatures


def _parse_payload(
    payload: bytes,
) -> tuple[int, datetime, TrustedKeys, TrustedKeys | None]:
    """Version, expiry, update keys and optional new root of a key set payload."""
    try:
        data = strict_json.loads(payload)
    except ValueError as exc:
        raise KeySetError(f"key set payload is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise KeySetError("key set payload is not a JSON object")
    _known_keys(data, PAYLOAD_KEYS, "key set payload")
    version = data.get("version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise KeySetError(f"key set version must be an integer of 1 or more, got {version!r}")
    try:
        expires = parse_time(data.get("expires"), "key set expires")
    except UpdateRejectedError as exc:
        raise KeySetError(str(exc)) from exc
    keys = _key_list(data, "", f"key set version {version}")
    new_root = None
    if "root" in data:
        root = data["root"]
        if not isinstance(root, dict):
            raise KeySetError('key set root must be an object {"threshold": N, "keys": [...]}')
        _known_keys(root, ROOT_KEYS, "key set root")
        new_root = _key_list(root, "root.", f"the root of key set version {version}")
    return version, expires, keys, new_root


def _key_list(data: dict[str, Any], where: str, source: str) -> TrustedKeys:
    """``keys`` and ``threshold`` of ``data`` (``where``: its path in the payload)."""
    entries = data.get("keys")
    if not isinstance(entries, list) or not entries:
        raise KeySetError(f"key set {where}keys must be a non-empty list")
    if len(entries) > MAX_KEYS:
        raise KeySetError(f"key set {where}keys lists {len(entries)} keys; at most {MAX_KEYS}")
    keys: dict[str, Ed25519PublicKey] = {}
    for index, entry in enumerate(entries):
        key_id, key = _key_entry(entry, f"{where}keys[{index}]")
        if key_id in keys:
            raise KeySetError(f"key set {where}keys[{index}] repeats key {key_id[:16]}")
        keys[key_id] = key
    threshold = data.get("threshold")
    if isinstance(threshold, bool) or not isinstance(threshold, int) or threshold < 1:
        raise KeySetError(
            f"key set {where}threshold must be an integer of 1 or more, got {threshold!r}"
        )
    if threshold > len(keys):
        raise KeySetError(
            f"key set {where}threshold {threshold} is more than its {len(keys)} key(s): "
            "nothing could ever be signed by it"
        )
    if threshold > MAX_SIGNATURES:
        raise KeySetError(
            f"key set {where}threshold {threshold} is more than the {MAX_SIGNATURES} "
            "signatures an envelope may carry"
        )
    return TrustedKeys(keys, threshold, source)


def _key_entry(entry: Any, where: str) -> tuple[str, Ed25519PublicKey]:
    if not isinstance(entry, dict):
        raise KeySetError(f'key set {where} must be an object {{"keyid", "public_key"}}')
    _known_keys(entry, KEY_KEYS, f"key set {where}")
    claimed = entry.get("keyid")
    pem = entry.get("public_key")
    if not isinstance(claimed, str) or not isinstance(pem, str):
        raise KeySetError(f"key set {where} needs string keyid and public_key")
    if len(pem) > MAX_PEM_CHARS:
        raise KeySetError(
            f"key set {where}.public_key is {len(pem)} characters; an Ed25519 PEM is 113"
        )
    try:
        key = serialization.load_pem_public_key(pem.encode("utf-8"))
    except (ValueError, UnicodeEncodeError) as exc:
        raise KeySetError(f"key set {where}.public_key is not a PEM public key: {exc}") from exc
    if not isinstance(key, Ed25519PublicKey):
        raise KeySetError(f"key set {where}.public_key is not an Ed25519 public key")
    actual = keyid(key)
    if claimed.lower() != actual:
        raise KeySetError(
            f"key set {where}.keyid {claimed[:64]!r} is not the sha256 of its public key ({actual})"
        )
    return actual, key


def _known_keys(data: dict[str, Any], allowed: Sequence[str], where: str) -> None:
    unknown = sorted(key for key in data if key not in allowed)
    if unknown:
        raise KeySetError(
            f"{where} has unknown key {unknown[0][:64]!r}: it holds {', '.join(allowed)}"
        )


def _key_entries(keys: Sequence[Ed25519PublicKey]) -> list[dict[str, str]]:
    return [
        {
            "keyid": keyid(key),
            "public_key": key.public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            ).decode("ascii"),
        }
        for key in keys
    ]
