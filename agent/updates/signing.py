"""Ed25519 keys and DSSE envelopes: sign an update payload, verify a threshold of signatures.

DSSE (the in-toto / Sigstore "Dead Simple Signing Envelope") signs the pre-authentication
encoding PAE(payloadType, payload) of the exact payload bytes, so the verifier never parses
or re-serializes what it checks. The cryptography package does the Ed25519 work.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from agent.config.keys import load_public_key
from agent.errors import SignatureError, UpdateKeyError
from agent.updates import strict_json

PAYLOAD_TYPE = "application/vnd.edge-agent.update+json"
MAX_SIGNATURES = 16  # more than any sane threshold; bounds the work a forged envelope causes
TRUSTED_KEYS_SOURCE = "updates.trusted_keys"


def pae(payload_type: str, payload: bytes) -> bytes:
    """DSSE v1 pre-authentication encoding: what the signature covers."""
    kind = payload_type.encode()
    return b"DSSEv1 %d %s %d %s" % (len(kind), kind, len(payload), payload)


def keyid(public_key: Ed25519PublicKey) -> str:
    """Hex sha256 of the raw 32-byte public key (the envelope's ``keyid``)."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()


def generate_keypair(stem: Path) -> tuple[Path, Path, str]:
    """Write ``STEM.key`` (PKCS#8 PEM, mode 0600) and ``STEM.pub`` (SubjectPublicKeyInfo PEM);
    returns both paths and the key id. Refuses to overwrite an existing key."""
    private_path = stem.with_name(stem.name + ".key")
    public_path = stem.with_name(stem.name + ".pub")
    for path in (private_path, public_path):
        if path.exists():
            raise UpdateKeyError(f"{path} exists; not overwriting a key")
    private = Ed25519PrivateKey.generate()
    pem = private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    # Created 0600 from the start: a chmod after writing leaves a window where it is readable.
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(pem)
    public = private.public_key()
    public_path.write_bytes(
        public.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return private_path, public_path, keyid(public)


def load_private_key(path: Path) -> Ed25519PrivateKey:
    """An Ed25519 private key from a PEM file written by ``edge-agent keygen``."""
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except OSError as exc:
        raise UpdateKeyError(f"cannot read private key {path}: {exc.strerror}") from exc
    except (ValueError, TypeError) as exc:
        raise UpdateKeyError(f"{path} is not an unencrypted PEM private key: {exc}") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise UpdateKeyError(f"{path} is not an Ed25519 private key")
    return key


def sign_envelope(
    payload: bytes, keys: Sequence[Ed25519PrivateKey], payload_type: str = PAYLOAD_TYPE
) -> dict[str, object]:
    """A DSSE envelope over ``payload`` with one signature per key."""
    message = pae(payload_type, payload)
    return {
        "payloadType": payload_type,
        "payload": base64.b64encode(payload).decode(),
        "signatures": [
            {"keyid": keyid(key.public_key()), "sig": base64.b64encode(key.sign(message)).decode()}
            for key in keys
        ],
    }


@dataclass(frozen=True)
class TrustedKeys:
    """The public keys updates must be signed with, by key id, and how many must sign.

    ``source`` names where the keys come from in every message (``updates.trusted_keys``,
    ``key set version 3``, ``updates.root_keys``), so a refusal says which list lacked a key.
    """

    keys: Mapping[str, Ed25519PublicKey]
    threshold: int
    source: str = TRUSTED_KEYS_SOURCE

    @classmethod
    def from_files(
        cls, paths: Sequence[str], threshold: int, source: str = TRUSTED_KEYS_SOURCE
    ) -> TrustedKeys:
        """Load ``updates.trusted_keys`` (or ``updates.root_keys``: pass ``source``); an
        unreadable or non-Ed25519 file is an error."""
        keys: dict[str, Ed25519PublicKey] = {}
        for path in paths:
            key = load_public_key(Path(path))
            keys[keyid(key)] = key
        return cls(keys, threshold, source)

    def verify(
        self, envelope_bytes: bytes, payload_type: str = PAYLOAD_TYPE, what: str = "manifest"
    ) -> bytes:
        """The payload bytes of a DSSE envelope of ``payload_type`` signed by at least
        ``threshold`` distinct trusted keys; ``SignatureError`` says what was wrong otherwise
        (``what`` names the document: ``manifest``, ``key set``)."""
        if not self.keys:
            if self.source == TRUSTED_KEYS_SOURCE:
                raise SignatureError(
                    "signed updates are disabled on this device (updates.trusted_keys is empty)"
                )
            raise SignatureError(f"{self.source} holds no keys")
        payload_type_found, payload, signatures = parse_envelope(envelope_bytes, what)
        if payload_type_found != payload_type:
            raise SignatureError(
                f"payloadType is {payload_type_found!r}, expected {payload_type!r}"
            )
        return self.verify_signatures(payload_type, payload, signatures)

    def verify_signatures(
        self, payload_type: str, payload: bytes, signatures: Sequence[tuple[str, bytes]]
    ) -> bytes:
        """``payload`` when at least ``threshold`` distinct keys of these signed
        PAE(payload_type, payload); ``SignatureError`` otherwise. For a document that must
        carry the signatures of two key lists (a key set rotating its root)."""
        message = pae(payload_type, payload)
        valid: set[str] = set()
        notes: list[str] = []
        for index, (key_id, signature) in enumerate(signatures):
            key = self.keys.get(key_id)
            short = key_id[:16]
            if key is None:
                notes.append(f"signature {index}: key {short} is not in {self.source}")
                continue
            try:
                key.verify(signature, message)
            except InvalidSignature:
                notes.append(
                    f"signature {index}: does not verify with trusted key {short} "
                    "(payload altered after signing, or signed by another key)"
                )
                continue
            if key_id in valid:
                notes.append(f"signature {index}: key {short} already counted")
            valid.add(key_id)
        if len(valid) < self.threshold:
            detail = "; ".join(notes) if notes else "no signatures"
            raise SignatureError(
                f"needs {self.threshold} valid signature(s) from distinct trusted keys, "
                f"got {len(valid)}: {detail}"
            )
        return payload


def parse_envelope(
    data: bytes, what: str = "manifest"
) -> tuple[str, bytes, list[tuple[str, bytes]]]:
    """A DSSE envelope's payloadType, payload bytes and (keyid, signature) pairs, nothing
    verified; ``SignatureError`` names what is malformed (``what``: the document's name)."""
    try:
        envelope = strict_json.loads(data)
    except ValueError as exc:
        raise SignatureError(f"{what} is not valid JSON: {exc}") from exc
    if not isinstance(envelope, dict):
        raise SignatureError(f"{what} is not a DSSE envelope (expected a JSON object)")
    payload_type = envelope.get("payloadType")
    payload_b64 = envelope.get("payload")
    signatures = envelope.get("signatures")
    if not isinstance(payload_type, str) or not isinstance(payload_b64, str):
        raise SignatureError(
            f"{what} is not a DSSE envelope: payloadType and payload must be strings"
        )
    if not isinstance(signatures, list) or not signatures:
        raise SignatureError(f"{what} has no signatures")
    if len(signatures) > MAX_SIGNATURES:
        raise SignatureError(
            f"{what} has {len(signatures)} signatures; at most {MAX_SIGNATURES} are read"
        )
    parsed = []
    for index, item in enumerate(signatures):
        if (
            not isinstance(item, dict)
            or not isinstance(item.get("keyid"), str)
            or not isinstance(item.get("sig"), str)
        ):
            raise SignatureError(f"signature {index} needs string keyid and sig")
        parsed.append((item["keyid"].lower(), _b64(item["sig"], f"signature {index} sig")))
    return payload_type, _b64(payload_b64, "payload"), parsed


def _b64(text: str, what: str) -> bytes:
    """Standard or URL-safe base64, padded or not, as DSSE allows either."""
    padded = text + "=" * (-len(text) % 4)
    try:
        if "-" in text or "_" in text:
            return base64.b64decode(padded, altchars=b"-_", validate=True)
        return base64.b64decode(padded, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise SignatureError(f"{what} is not valid base64") from exc
