"""The signed update payload: parse it strictly, and decide whether it applies to this device.

Everything here is pure: the payload bytes have already passed signature verification
(``agent.signing``), the decisions that need state (versions, disk space) are the update
manager's. The optional ``validation`` (a golden set the trial checks the new model
against) is signed with the rest, but a signer's mistake must still be refused cleanly, so
it is bounded before it is decoded and checked against its own sha256.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

from agent.errors import GoldenSetError, UpdateRejectedError
from agent.inference.golden import MAX_GOLDEN_BYTES, GoldenSet, Tolerances, parse_golden
from agent.updates import strict_json
from agent.updates.shadow_terms import ShadowOverride, parse_shadow

NAME_PATTERN = re.compile(r"[A-Za-z0-9._-]{1,64}")
SHA256_PATTERN = re.compile(r"[0-9a-f]{64}")
MAX_CHUNK_SIZE = 16 * 1024 * 1024  # well under Mosquitto's default message size limit
# A manifest is a few KB; the optional golden set adds at most 1 MiB of npz, base64 in the
# payload and base64 again in the envelope (1.78 MiB). Larger ones are refused unread.
MAX_MANIFEST_BYTES = 2 * 1024 * 1024
DEFAULT_CHUNK_SIZE = 128 * 1024
# A root-signed key set (``agent.updates.keyset``; here, free of cryptography's import, for
# the check on paho's thread): 64 keys in PEM are ~15 KB, so larger is refused unread.
MAX_KEYSET_BYTES = 256 * 1024
# Where a manifest for a group goes: GROUP_PREFIX/<group>/updates/manifest (and its chunks).
GROUP_PREFIX = "fleet/groups"
_DURATION = re.compile(r"(\d+)([smhdw])")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86_400, "w": 604_800}
# ``validation``: the golden set's npz in base64 (at most what MAX_GOLDEN_BYTES encodes to,
# checked before decoding), its sha256 and the tolerances it is judged by.
VALIDATION_KEYS = ("npz", "sha256", "rtol", "atol", "top1_agreement")
MAX_GOLDEN_BASE64_CHARS = 4 * math.ceil(MAX_GOLDEN_BYTES / 3)


@dataclass(frozen=True)
class ChunkSource:
    """Model bytes come as MQTT chunks of ``chunk_size`` bytes (the last may be shorter)."""

    chunk_size: int
    chunks: int

    def expected_size(self, index: int, length: int) -> int:
        """How many bytes chunk ``index`` must carry."""
        if index < self.chunks - 1:
            return self.chunk_size
        return length - self.chunk_size * (self.chunks - 1)


@dataclass(frozen=True)
class UrlSource:
    """Model bytes are downloaded from an https URL."""

    url: str


@dataclass(frozen=True)
class UpdateManifest:
    """A verified update payload."""

    update_id: str
    model: str
    version: int
    sha256: str
    length: int
    devices: tuple[str, ...]
    groups: tuple[str, ...]
    issued_at: datetime
    expires: datetime
    source: ChunkSource | UrlSource
    # The golden set the trial must pass (its tolerances are the manifest's), or None.
    validation: GoldenSet | None = None
    # The shadow trial's terms the manifest sets over the device's ``updates.shadow``.
    shadow: ShadowOverride | None = None

    def summary(self) -> dict[str, Any]:
        """The fields every status message names."""
        return {"update_id": self.update_id, "model": self.model, "version": self.version}


def parse_payload(payload: bytes) -> UpdateManifest:
    """Parse and check the payload JSON; ``UpdateRejectedError`` names the first bad field."""
    try:
        data = strict_json.loads(payload)
    except ValueError as exc:
        raise UpdateRejectedError(f"payload is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise UpdateRejectedError("payload is not a JSON object")
    update_id = _name(data, "update_id")
    length = _positive_int(data, "length")
    targets = data.get("targets")
    if not isinstance(targets, dict):
        raise UpdateRejectedError("targets must be an object with devices and/or groups")
    devices = _names(targets, "devices")
    groups = _names(targets, "groups")
    if not devices and not groups:
        raise UpdateRejectedError("empty target list: targets names no device and no group")
    sha = data.get("sha256")
    if not isinstance(sha, str) or not SHA256_PATTERN.fullmatch(sha.lower()):
        raise UpdateRejectedError("sha256 must be 64 hex digits")
    return UpdateManifest(
        update_id=update_id,
        model=_name(data, "model"),
        version=_positive_int(data, "version"),
        sha256=sha.lower(),
        length=length,
        devices=devices,
        groups=groups,
        issued_at=parse_time(data.get("issued_at"), "issued_at"),
        expires=parse_time(data.get("expires"), "expires"),
        source=_source(data, length),
        validation=_validation(data),
        shadow=parse_shadow(data["shadow"]) if "shadow" in data else None,
    )


def applicability_problem(
    manifest: UpdateManifest, device_id: str, groups: Sequence[str], now: datetime
) -> str | None:
    """Why the manifest does not apply to this device now, or None when it does."""
    if now >= manifest.expires:
        return (
            f"expired at {manifest.expires.isoformat()} (device clock "
            f"{now.isoformat(timespec='seconds')})"
        )
    if device_id in manifest.devices or set(groups) & set(manifest.groups):
        return None
    return (
        f"not for this device: targets devices {list(manifest.devices)} and groups "
        f"{list(manifest.groups)}; this is {device_id!r} in groups {list(groups)}"
    )


def build_payload(
    *,
    update_id: str,
    model: str,
    version: int,
    data: bytes,
    sha256: str,
    devices: Sequence[str],
    groups: Sequence[str],
    issued_at: datetime,
    expires: datetime,
    url: str | None,
    chunk_size: int,
    validation: GoldenSet | None = None,
    shadow: ShadowOverride | None = None,
) -> bytes:
    """The payload JSON the ``sign`` command signs (the inverse of ``parse_payload``);
    ``validation``: a golden set to travel with it, judged by its own tolerances
    (``GoldenSetError`` when its npz is larger than a manifest may carry); ``shadow``: the
    shadow trial's terms."""
    source: dict[str, Any]
    if url is not None:
        source = {"url": url}
    else:
        source = {
            "mqtt": {"chunk_size": chunk_size, "chunks": max(1, math.ceil(len(data) / chunk_size))}
        }
    document = {
        "update_id": update_id,
        "model": model,
        "version": version,
        "sha256": sha256,
        "length": len(data),
        "targets": {"devices": list(devices), "groups": list(groups)},
        "issued_at": format_time(issued_at),
        "expires": format_time(expires),
        "source": source,
    }
    if validation is not None:
        npz = validation.to_bytes()
        if len(npz) > MAX_GOLDEN_BYTES:  # the devices would refuse it: say so here
            raise GoldenSetError(
                f"the golden set is {len(npz)} bytes as npz, more than {MAX_GOLDEN_BYTES} "
                "(1 MiB) a manifest may carry: use fewer samples"
            )
        document["validation"] = {
            "npz": base64.b64encode(npz).decode("ascii"),
            "sha256": hashlib.sha256(npz).hexdigest(),
            **validation.tolerances.to_dict(),
        }
    if shadow is not None:
        document["shadow"] = shadow.to_payload()
    return json.dumps(document, separators=(",", ":"), sort_keys=True).encode()


def parse_duration(text: str) -> timedelta:
    """``30d``, ``12h``, ``90m``, ``3600s``, ``2w`` or combinations like ``1d12h``."""
    parts = _DURATION.findall(text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise ValueError(f"invalid duration {text!r}: use e.g. 30d, 12h, 90m, 3600s")
    return timedelta(seconds=sum(int(n) * _UNIT_SECONDS[u] for n, u in parts))


def format_time(moment: datetime) -> str:
    """RFC 3339 in UTC with a ``Z``."""
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(value: Any, key: str) -> datetime:
    """An RFC 3339 time with an explicit offset (``Z`` or ``+hh:mm``)."""
    if not isinstance(value, str):
        raise UpdateRejectedError(f"{key} must be an RFC 3339 time string")
    text = value[:-1] + "+00:00" if value.endswith(("Z", "z")) else value
    try:
        moment = datetime.fromisoformat(text)
    except ValueError as exc:
        raise UpdateRejectedError(f"{key} {value!r} is not an RFC 3339 time") from exc
    if moment.tzinfo is None:
        raise UpdateRejectedError(f"{key} {value!r} has no time zone offset")
    return moment


def _name(data: dict[str, Any], key: str) -> str:
    value = data.get(key)
    if not isinstance(value, str) or not NAME_PATTERN.fullmatch(value) or value in (".", ".."):
        raise UpdateRejectedError(
            f"{key} {value!r} is not a valid name: use 1-64 of A-Z a-z 0-9 . _ - (no paths)"
        )
    return value


def _names(data: dict[str, Any], key: str) -> tuple[str, ...]:
    value = data.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise UpdateRejectedError(f"targets.{key} must be a list of strings")
    return tuple(value)


def _positive_int(data: dict[str, Any], key: str) -> int:
    value = data.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UpdateRejectedError(f"{key} must be a positive integer, got {value!r}")
    return value


def _source(data: dict[str, Any], length: int) -> ChunkSource | UrlSource:
    source = data.get("source")
    if not isinstance(source, dict):
        raise UpdateRejectedError(
            'source must be {"mqtt": {"chunk_size", "chunks"}} or {"url": "https://..."}'
        )
    if "url" in source:
        url = source["url"]
        if not isinstance(url, str) or not url.lower().startswith("https://"):
            raise UpdateRejectedError(f"source url {url!r} is not https://")
        return UrlSource(url)
    mqtt = source.get("mqtt")
    if not isinstance(mqtt, dict):
        raise UpdateRejectedError("source names neither mqtt nor url")
    chunk_size = _positive_int(mqtt, "chunk_size")
    chunks = _positive_int(mqtt, "chunks")
    if chunk_size > MAX_CHUNK_SIZE:
        raise UpdateRejectedError(f"chunk_size {chunk_size} exceeds {MAX_CHUNK_SIZE}")
    if chunks != math.ceil(length / chunk_size):
        raise UpdateRejectedError(
            f"{chunks} chunks of {chunk_size} bytes cannot carry length "
            f"{length} (needs {math.ceil(length / chunk_size)})"
        )
    return ChunkSource(chunk_size, chunks)


def _validation(data: dict[str, Any]) -> GoldenSet | None:
    """The payload's golden set, or None without one; every check names its field."""
    if "validation" not in data:
        return None
    value = data["validation"]
    if not isinstance(value, dict):
        raise UpdateRejectedError(
            "validation must be an object with npz, sha256, rtol, atol (and top1_agreement)"
        )
    unknown = sorted(key for key in value if key not in VALIDATION_KEYS)
    if unknown:
        raise UpdateRejectedError(
            f"validation has unknown key {unknown[0][:64]!r}: it holds {', '.join(VALIDATION_KEYS)}"
        )
    npz = value.get("npz")
    if not isinstance(npz, str):
        raise UpdateRejectedError("validation.npz must be a base64 string (the golden .npz)")
    # Bounded before decoding: the payload may be up to MAX_MANIFEST_BYTES of base64.
    if len(npz) > MAX_GOLDEN_BASE64_CHARS:
        raise UpdateRejectedError(
            f"validation.npz is {len(npz)} characters of base64, more than the "
            f"{MAX_GOLDEN_BASE64_CHARS} that a {MAX_GOLDEN_BYTES}-byte (1 MiB) golden set "
            "encodes to"
        )
    try:
        golden_bytes = base64.b64decode(npz, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise UpdateRejectedError(f"validation.npz is not valid base64: {exc}") from exc
    if len(golden_bytes) > MAX_GOLDEN_BYTES:
        raise UpdateRejectedError(
            f"validation.npz decodes to {len(golden_bytes)} bytes, more than "
            f"{MAX_GOLDEN_BYTES} (1 MiB)"
        )
    sha = value.get("sha256")
    if not isinstance(sha, str) or not SHA256_PATTERN.fullmatch(sha.lower()):
        raise UpdateRejectedError("validation.sha256 must be 64 hex digits")
    actual = hashlib.sha256(golden_bytes).hexdigest()
    if actual != sha.lower():
        raise UpdateRejectedError(
            f"validation.sha256 {sha.lower()[:16]}... does not match validation.npz, whose "
            f"bytes hash to {actual[:16]}..."
        )
    tolerances = Tolerances(
        rtol=_number(value, "rtol"),
        atol=_number(value, "atol"),
        top1_agreement=_number(value, "top1_agreement") if "top1_agreement" in value else None,
    )
    problem = tolerances.problem()
    if problem is not None:
        raise UpdateRejectedError(f"validation.{problem}")
    try:
        golden = parse_golden(golden_bytes, "validation.npz")
    except GoldenSetError as exc:
        raise UpdateRejectedError(str(exc)) from exc
    return golden.with_tolerances(tolerances)


def _number(data: dict[str, Any], key: str) -> float:
    if key not in data:
        raise UpdateRejectedError(f"validation.{key} is missing (a number)")
    value = data[key]
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise UpdateRejectedError(f"validation.{key} must be a number, got {repr(value)[:64]}")
    return float(value)
