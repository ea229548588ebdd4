"""Update payload parsing and applicability (pure logic)."""

from __future__ import annotations

import base64
import hashlib
import json
import re
from datetime import datetime, timedelta, timezone
from typing import Any

import numpy as np
import pytest

from agent.errors import GoldenSetError, UpdateRejectedError
from agent.inference.golden import GoldenSet, Tolerances
from agent.updates.manifest import (
    MAX_GOLDEN_BASE64_CHARS,
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


# -- the optional golden set (``validation``) ---------------------------------------------------


def golden_set(rows: int = 5) -> GoldenSet:
    """A small golden set: x [rows, 4] -> y [rows, 2], tolerances of its own."""
    inputs = np.arange(rows * 4, dtype=np.float32).reshape(rows, 4)
    return GoldenSet({"x": inputs}, {"y": inputs[:, :2] * 2}, Tolerances(rtol=1e-2, atol=1e-4))


def validation_of(golden: GoldenSet | None = None) -> dict[str, Any]:
    """The ``validation`` field build_payload writes for ``golden``."""
    document = json.loads(
        build_payload(
            update_id="u1",
            model="vib",
            version=3,
            data=b"x" * 1000,
            sha256="a" * 64,
            devices=["gw1"],
            groups=[],
            issued_at=NOW,
            expires=NOW + timedelta(days=1),
            url=None,
            chunk_size=300,
            validation=golden or golden_set(),
        )
    )
    validation: dict[str, Any] = document["validation"]
    return validation


def with_npz(npz: bytes, **changes: Any) -> dict[str, Any]:
    """A ``validation`` carrying ``npz`` with its right sha256, then ``changes``."""
    return {
        **validation_of(),
        "npz": base64.b64encode(npz).decode(),
        "sha256": hashlib.sha256(npz).hexdigest(),
        **changes,
    }


def test_a_golden_set_round_trips_with_the_manifest_tolerances() -> None:
    """What sign writes (npz, sha256, the set's tolerances), the device reads back; the
    manifest's tolerances win over those stored in the npz, and no field means no set."""
    golden = golden_set()
    validation = validation_of(golden)
    assert set(validation) == {"npz", "sha256", "rtol", "atol"}
    manifest = parse_payload(payload(validation=validation))
    assert manifest.validation is not None
    assert manifest.validation.samples == 5
    np.testing.assert_array_equal(manifest.validation.inputs["x"], golden.inputs["x"])
    np.testing.assert_array_equal(manifest.validation.expected["y"], golden.expected["y"])
    assert manifest.validation.tolerances == Tolerances(rtol=1e-2, atol=1e-4)

    looser = {**validation, "rtol": 0.5, "atol": 2, "top1_agreement": 0.9}
    loose = parse_payload(payload(validation=looser)).validation
    assert loose is not None
    assert loose.tolerances == Tolerances(rtol=0.5, atol=2.0, top1_agreement=0.9)
    assert parse_payload(payload()).validation is None
    classifier = golden.with_tolerances(Tolerances(top1_agreement=0.99))
    assert validation_of(classifier)["top1_agreement"] == 0.99


def test_a_golden_set_too_large_for_a_manifest_is_not_signed() -> None:
    """build_payload refuses an npz the devices would refuse, before anything is signed."""
    noise = np.random.default_rng(0).standard_normal((2600, 128)).astype(np.float32)
    big = GoldenSet({"x": noise}, {"y": noise[:, :1]})
    with pytest.raises(GoldenSetError, match=r"more than 1048576 \(1 MiB\)"):
        validation_of(big)


@pytest.mark.parametrize(
    ("validation", "words"),
    [
        (None, "validation must be an object"),
        ([], "validation must be an object"),
        ({**validation_of(), "labels": "x"}, "validation has unknown key 'labels'"),
        ({**validation_of(), "npz": 5}, "validation.npz must be a base64 string"),
        (
            {**validation_of(), "npz": "A" * (MAX_GOLDEN_BASE64_CHARS + 4)},
            f"more than the {MAX_GOLDEN_BASE64_CHARS} that a 1048576-byte",
        ),
        (
            {**validation_of(), "npz": "A" * MAX_GOLDEN_BASE64_CHARS},
            "validation.npz decodes to 1048578 bytes, more than 1048576",
        ),
        ({**validation_of(), "npz": "not base64!"}, "validation.npz is not valid base64"),
        ({**validation_of(), "npz": "QUJD\nRA=="}, "validation.npz is not valid base64"),
        ({**validation_of(), "npz": "QUJDRA"}, "validation.npz is not valid base64"),
        ({**validation_of(), "npz": "QUJD\u00e9"}, "validation.npz is not valid base64"),
        ({**validation_of(), "sha256": "abc"}, "validation.sha256 must be 64 hex digits"),
        ({**validation_of(), "sha256": "0" * 64}, "validation.sha256 0000000000000000"),
        ({**validation_of(), "rtol": "0.1"}, "validation.rtol must be a number"),
        ({**validation_of(), "atol": True}, "validation.atol must be a number"),
        ({**validation_of(), "atol": -1}, "validation.atol must be a finite number >= 0"),
        ({**validation_of(), "rtol": float("nan")}, "validation.rtol must be a finite number"),
        ({**validation_of(), "top1_agreement": 1.5}, "validation.top1_agreement must be in"),
        ({**validation_of(), "top1_agreement": 0}, "validation.top1_agreement must be in"),
        ({k: v for k, v in validation_of().items() if k != "atol"}, "validation.atol is missing"),
        (with_npz(b"PK not a zip"), "validation.npz: not an .npz file"),
        (
            with_npz(golden_set().to_bytes().replace(b"input:x", b"inputXx")),
            "validation.npz: unexpected array 'inputXx'",
        ),
    ],
)
def test_bad_golden_sets_are_refused_naming_the_field(validation: Any, words: str) -> None:
    """Each problem of ``validation`` gets one reason naming the field at fault."""
    with pytest.raises(UpdateRejectedError, match=re.escape(words)):
        parse_payload(payload(validation=validation))


def test_a_golden_set_whose_arrays_do_not_line_up_is_refused() -> None:
    """A well-formed npz that is not a usable golden set: parse_golden's reason, by name."""
    bad = GoldenSet(
        {"x": np.zeros((3, 4), np.float32)}, {"y": np.zeros((2, 2), np.float32)}
    ).to_bytes()
    with pytest.raises(UpdateRejectedError, match=r"validation\.npz: the arrays hold different"):
        parse_payload(payload(validation=with_npz(bad)))
