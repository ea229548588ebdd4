"""Update payload parsing and applicability (pure logic)."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest

from agent.errors import UpdateRejectedError
from agent.updates.manifest import (
    ChunkSource,
    applicability_problem,
    build_payload,
    parse_duration,
    parse_payload,
)

NOW = datetime(2026, 11, 24, 12, 0, tzinfo=timezone.utc)


def payload(**changes: Any) -> bytes:
    document = json.loads(
        build_payload(
            update_id="u1",
            model="vib",
            version=3,
            data=b"x" * 1000,
            sha256="a" * 64,
            devices=["gw1"],
            groups=["line3"],
            issued_at=NOW,
            expires=NOW + timedelta(days=1),
            url=None,
            chunk_size=300,
        )
    )
    document.update(changes)
    return json.dumps(document).encode()


def test_build_and_parse_round_trip() -> None:
    """What sign writes, the device reads back field for field."""
    manifest = parse_payload(payload())
    assert manifest.update_id == "u1"
    assert manifest.version == 3
    assert manifest.length == 1000
    assert manifest.source == ChunkSource(chunk_size=300, chunks=4)
    assert manifest.source.expected_size(3, 1000) == 100
    assert manifest.expires == NOW + timedelta(days=1)


@pytest.mark.parametrize(
    ("changes", "words"),
    [
        ({"model": "../x"}, "model '../x' is not a valid name"),
        ({"model": ".."}, "not a valid name"),
        ({"model": "a" * 65}, "not a valid name"),
        ({"update_id": "a/b"}, "update_id 'a/b' is not a valid name"),
        ({"version": "3"}, "version must be a positive integer"),
        ({"version": True}, "version must be a positive integer"),
        ({"length": 0}, "length must be a positive integer"),
        ({"sha256": "xyz"}, "sha256 must be 64 hex digits"),
        ({"targets": {"devices": [], "groups": []}}, "empty target list"),
        ({"targets": []}, "targets must be an object"),
        ({"expires": "tomorrow"}, "not an RFC 3339 time"),
        ({"expires": "2026-12-01T00:00:00"}, "no time zone offset"),
        ({"source": {"mqtt": {"chunk_size": 300, "chunks": 9}}}, "cannot carry length 1000"),
        ({"source": {"url": "ftp://x/m.onnx"}}, "is not https"),
        ({"source": None}, "source must be"),
    ],
)
def test_bad_fields_are_named(changes: dict[str, Any], words: str) -> None:
    """Each bad field is rejected with its name in the reason."""
    with pytest.raises(UpdateRejectedError, match=words.replace("(", r"\(").replace(")", r"\)")):
        parse_payload(payload(**changes))


def test_applicability_checks_expiry_device_and_group() -> None:
    """Targeted by device or by group applies; other devices and expired manifests do not."""
    manifest = parse_payload(payload())
    assert applicability_problem(manifest, "gw1", [], NOW) is None
    assert applicability_problem(manifest, "gw9", ["line3"], NOW) is None
    other = applicability_problem(manifest, "gw9", ["line4"], NOW)
    assert other is not None
    assert "not for this device" in other
    late = applicability_problem(manifest, "gw1", [], NOW + timedelta(days=2))
    assert late is not None
    assert late.startswith("expired at")


def test_durations() -> None:
    """Durations combine units; anything else is refused."""
    assert parse_duration("1d12h") == timedelta(hours=36)
    assert parse_duration("90m") == timedelta(minutes=90)
    with pytest.raises(ValueError, match="invalid duration"):
        parse_duration("7 days")
