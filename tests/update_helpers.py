"""Building, signing and sending update manifests in tests, and reading the statuses back."""

from __future__ import annotations

import base64
import hashlib
import json
import math
import time
from collections.abc import Iterable, Sequence
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from agent.inference.golden import GoldenSet, Tolerances
from agent.updates.manifest import format_time
from agent.updates.signing import generate_keypair, load_private_key, sign_envelope
from tests.broker import MosquittoBroker, Recorder, publisher

STATUS = "edge/dev1/updates/status"
DEVICE_BASE = "edge/dev1"


def make_key(folder: Path, name: str) -> tuple[Path, Path]:
    """A fresh key pair: (private key file, public key file)."""
    folder.mkdir(parents=True, exist_ok=True)
    private, public, _ = generate_keypair(folder / name)
    return private, public


def payload_for(
    data: bytes,
    *,
    update_id: str,
    version: int,
    model: str = "lin",
    devices: Sequence[str] = ("dev1",),
    groups: Sequence[str] = (),
    chunk_size: int = 4096,
    url: str | None = None,
    length: int | None = None,
    expires_in_s: float = 3600,
    **overrides: Any,
) -> dict[str, Any]:
    """An update payload for ``data``; keyword overrides replace any field."""
    length = len(data) if length is None else length
    now = datetime.now(timezone.utc)
    source: dict[str, Any] = (
        {"url": url}
        if url
        else {"mqtt": {"chunk_size": chunk_size, "chunks": math.ceil(length / chunk_size)}}
    )
    payload = {
        "update_id": update_id,
        "model": model,
        "version": version,
        "sha256": hashlib.sha256(data).hexdigest(),
        "length": length,
        "targets": {"devices": list(devices), "groups": list(groups)},
        "issued_at": format_time(now),
        "expires": format_time(now + timedelta(seconds=expires_in_s)),
        "source": source,
    }
    payload.update(overrides)
    return payload


def envelope(payload: dict[str, Any] | bytes, keys: Iterable[Path]) -> bytes:
    """A DSSE envelope of ``payload`` signed with each private key file."""
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    return json.dumps(sign_envelope(body, [load_private_key(k) for k in keys])).encode()


def chunks_of(data: bytes, chunk_size: int) -> list[bytes]:
    """The chunk messages (4-byte index + bytes) of ``data``."""
    count = max(1, math.ceil(len(data) / chunk_size))
    return [
        i.to_bytes(4, "big") + data[i * chunk_size : (i + 1) * chunk_size] for i in range(count)
    ]


def send(
    broker: MosquittoBroker,
    manifest: bytes,
    chunks: Sequence[bytes] = (),
    *,
    update_id: str = "",
    base: str = DEVICE_BASE,
    retain: bool = False,
) -> None:
    """Publish a manifest and then chunk messages, QoS 1, and wait for the broker's acks."""
    client = publisher(broker)
    try:
        client.publish(f"{base}/updates/manifest", manifest, qos=1, retain=retain).wait_for_publish(
            10
        )
        for chunk in chunks:
            client.publish(f"{base}/updates/chunks/{update_id}", chunk, qos=1).wait_for_publish(10)
    finally:
        client.disconnect()
        client.loop_stop()


def statuses(rec: Recorder, update_id: str | None, topic: str = STATUS) -> list[dict[str, Any]]:
    """Status documents received for ``update_id``."""
    found = [json.loads(m.payload) for m in rec.on(topic)]
    return [s for s in found if s.get("update_id") == update_id]


def manifest_statuses(rec: Recorder, manifest: bytes, topic: str = STATUS) -> list[dict[str, Any]]:
    """Status documents that answer exactly these manifest bytes (``manifest_sha256``)."""
    digest = hashlib.sha256(manifest).hexdigest()
    found = [json.loads(m.payload) for m in rec.on(topic)]
    return [s for s in found if s.get("manifest_sha256") == digest]


def final_manifest_status(
    rec: Recorder, manifest: bytes, timeout_s: float = 20.0
) -> dict[str, Any]:
    """Wait for the final status that answers these manifest bytes."""
    rec.wait_for(
        lambda _: any(
            s["state"] in ("SUCCEEDED", "FAILED", "REJECTED")
            for s in manifest_statuses(rec, manifest)
        ),
        timeout_s,
    )
    return next(
        s
        for s in manifest_statuses(rec, manifest)
        if s["state"] in ("SUCCEEDED", "FAILED", "REJECTED")
    )


def final_status(
    rec: Recorder, update_id: str | None, timeout_s: float = 20.0, topic: str = STATUS
) -> dict[str, Any]:
    """Wait for the SUCCEEDED/FAILED/REJECTED status of ``update_id``."""

    def done(_: Any) -> bool:
        return any(
            s["state"] in ("SUCCEEDED", "FAILED", "REJECTED")
            for s in statuses(rec, update_id, topic)
        )

    rec.wait_for(done, timeout_s)
    return next(
        s
        for s in statuses(rec, update_id, topic)
        if s["state"] in ("SUCCEEDED", "FAILED", "REJECTED")
    )


def wait_for_step(rec: Recorder, update_id: str, step: str, timeout_s: float = 20.0) -> None:
    """Wait for ``IN_PROGRESS`` with ``step``."""
    rec.wait_for(
        lambda _: any(
            s.get("step") == step and s["state"] == "IN_PROGRESS" for s in statuses(rec, update_id)
        ),
        timeout_s,
    )


def tamper(envelope_bytes: bytes, **changes: Any) -> bytes:
    """Edit the payload of a signed envelope, keeping its signatures."""
    document = json.loads(envelope_bytes)
    payload = json.loads(base64.b64decode(document["payload"]))
    payload.update(changes)
    document["payload"] = base64.b64encode(json.dumps(payload).encode()).decode()
    return json.dumps(document).encode()


def wait_until(predicate: Any, timeout_s: float = 10.0, what: str = "condition") -> None:
    """Poll ``predicate()`` until true."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not met within {timeout_s} s")
        time.sleep(0.05)


def golden_for(model_file: Path, inputs: np.ndarray, **tolerances: float) -> GoldenSet:
    """A golden set of ``model_file`` (one input ``x``): ``inputs`` run through it on the CPU,
    its outputs the expected ones; ``tolerances``: rtol, atol, top1_agreement."""
    session = ort.InferenceSession(str(model_file), providers=["CPUExecutionProvider"])
    names = [output.name for output in session.get_outputs()]
    outputs = session.run(None, {"x": inputs})
    expected = {name: np.asarray(value) for name, value in zip(names, outputs, strict=True)}
    return GoldenSet({"x": inputs}, expected, Tolerances(**tolerances))


def validation_for(golden: GoldenSet, **changes: Any) -> dict[str, Any]:
    """The ``validation`` payload field that carries ``golden``, then ``changes``."""
    npz = golden.to_bytes()
    return {
        "npz": base64.b64encode(npz).decode(),
        "sha256": hashlib.sha256(npz).hexdigest(),
        **golden.tolerances.to_dict(),
        **changes,
    }
