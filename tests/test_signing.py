"""DSSE envelopes and Ed25519 threshold verification (pure logic)."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from agent.config.keys import load_public_key
from agent.errors import SignatureError, UpdateKeyError
from agent.updates.signing import (
    PAYLOAD_TYPE,
    TrustedKeys,
    generate_keypair,
    load_private_key,
    pae,
    sign_envelope,
)


@pytest.fixture
def keys(tmp_path: Path) -> dict[str, tuple[Path, Path]]:
    return {name: generate_keypair(tmp_path / name)[:2] for name in ("a", "b", "c")}


def envelope(payload: bytes, keys: dict[str, tuple[Path, Path]], *names: str) -> bytes:
    return json.dumps(
        sign_envelope(payload, [load_private_key(keys[n][0]) for n in names])
    ).encode()


def trusted(keys: dict[str, tuple[Path, Path]], threshold: int, *names: str) -> TrustedKeys:
    return TrustedKeys.from_files([str(keys[n][1]) for n in names], threshold)


def test_pae_is_the_dsse_v1_encoding() -> None:
    """PAE matches the DSSE spec's example layout: lengths in ASCII decimal."""
    assert pae("http://example.com/HelloWorld", b"hello world") == (
        b"DSSEv1 29 http://example.com/HelloWorld 11 hello world"
    )


def test_threshold_counts_distinct_trusted_keys(keys: dict[str, tuple[Path, Path]]) -> None:
    """Two of two trusted keys verify; one key twice is one signature."""
    payload = b'{"x": 1}'
    assert trusted(keys, 2, "a", "b").verify(envelope(payload, keys, "a", "b")) == payload
    with pytest.raises(SignatureError, match=r"got 1: signature 1: key .* already counted"):
        trusted(keys, 2, "a", "b").verify(envelope(payload, keys, "a", "a"))


def test_untrusted_and_altered_signatures_are_refused(keys: dict[str, tuple[Path, Path]]) -> None:
    """A key not in the list, and a payload changed after signing, both fail with reasons."""
    verifier = trusted(keys, 1, "a")
    with pytest.raises(SignatureError, match=r"not in updates\.trusted_keys"):
        verifier.verify(envelope(b"{}", keys, "c"))
    document = json.loads(envelope(b'{"version": 1}', keys, "a"))
    document["payload"] = base64.b64encode(b'{"version": 9}').decode()
    with pytest.raises(SignatureError, match="does not verify"):
        verifier.verify(json.dumps(document).encode())


def test_the_exact_payload_bytes_are_verified_and_returned(
    keys: dict[str, tuple[Path, Path]],
) -> None:
    """No re-serialization: odd spacing and key order survive, url-safe base64 is read."""
    payload = b'{ "b":1,   "a" :2 }'
    document = json.loads(envelope(payload, keys, "a"))
    document["payload"] = base64.urlsafe_b64encode(payload).decode().rstrip("=")
    assert trusted(keys, 1, "a").verify(json.dumps(document).encode()) == payload


@pytest.mark.parametrize(
    ("data", "words"),
    [
        (b"not json", "not valid JSON"),
        (b"[]", "not a DSSE envelope"),
        (
            json.dumps({"payloadType": PAYLOAD_TYPE, "payload": "e30=", "signatures": []}).encode(),
            "no signatures",
        ),
        (
            json.dumps(
                {
                    "payloadType": "text/plain",
                    "payload": "e30=",
                    "signatures": [{"keyid": "00", "sig": "AA=="}],
                }
            ).encode(),
            "payloadType",
        ),
        (
            json.dumps(
                {
                    "payloadType": PAYLOAD_TYPE,
                    "payload": "!!!",
                    "signatures": [{"keyid": "00", "sig": "AA=="}],
                }
            ).encode(),
            "not valid base64",
        ),
    ],
)
def test_malformed_envelopes_are_refused(
    keys: dict[str, tuple[Path, Path]], data: bytes, words: str
) -> None:
    """Each malformed envelope is refused with a reason naming what is wrong."""
    with pytest.raises(SignatureError, match=words):
        trusted(keys, 1, "a").verify(data)


def test_key_files_of_the_wrong_kind_are_refused(
    tmp_path: Path, keys: dict[str, tuple[Path, Path]]
) -> None:
    """A private key where a public one belongs, and garbage, give clear errors."""
    with pytest.raises(UpdateKeyError, match="not a PEM public key"):
        load_public_key(keys["a"][0])
    (tmp_path / "junk.pub").write_text("hello")
    with pytest.raises(UpdateKeyError, match="not a PEM public key"):
        load_public_key(tmp_path / "junk.pub")
    with pytest.raises(UpdateKeyError, match="exists; not overwriting"):
        generate_keypair(tmp_path / "a")
