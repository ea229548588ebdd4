"""The operator's side of an update: build and sign a manifest, send it and its chunks over
MQTT, and follow each device's status until every one has finished."""

from __future__ import annotations

import hashlib
import json
import sys
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, TextIO

import paho.mqtt.client as paho
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.inference.golden import GoldenSet
from agent.updates.manifest import build_payload
from agent.updates.shadow_terms import ShadowOverride
from agent.updates.signing import load_private_key, sign_envelope

TERMINAL = frozenset({"SUCCEEDED", "FAILED", "REJECTED"})
PUBLISH_WINDOW = 16  # chunks awaiting the broker's PUBACK: bounds the sender's memory
ACK_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class SignedUpdate:
    """A signed manifest and the model bytes it covers."""

    update_id: str
    envelope: dict[str, Any]
    data: bytes
    chunk_size: int | None  # None: the devices download from the manifest's URL

    def manifest_bytes(self) -> bytes:
        """The envelope as sent and saved."""
        return json.dumps(self.envelope, indent=1).encode()

    def manifest_sha256(self) -> str:
        """Hex sha256 of ``manifest_bytes``: devices name it in every status about it."""
        return hashlib.sha256(self.manifest_bytes()).hexdigest()


@dataclass(frozen=True)
class Signer:
    """Signs manifests of one model version, all with the same id, times and source: the
    per-device manifests of a rollout differ only in their targets, and signing the same
    targets again gives the same bytes (Ed25519 signatures are deterministic)."""

    data: bytes
    sha256: str  # of data, hashed once for all the manifests
    keys: tuple[Ed25519PrivateKey, ...]
    model: str
    version: int
    update_id: str
    issued_at: datetime
    expires: datetime
    url: str | None
    chunk_size: int
    golden: GoldenSet | None = None
    shadow: ShadowOverride | None = None

    def sign(self, devices: Sequence[str], groups: Sequence[str] = ()) -> SignedUpdate:
        """The signed update for these targets."""
        payload = build_payload(
            update_id=self.update_id,
            model=self.model,
            version=self.version,
            data=self.data,
            sha256=self.sha256,
            devices=devices,
            groups=groups,
            issued_at=self.issued_at,
            expires=self.expires,
            url=self.url,
            chunk_size=self.chunk_size,
            validation=self.golden,
            shadow=self.shadow,
        )
        envelope = sign_envelope(payload, list(self.keys))
        return SignedUpdate(
            self.update_id, envelope, self.data, None if self.url else self.chunk_size
        )


def make_signer(
    model_file: Path,
    key_files: Sequence[Path],
    *,
    model: str,
    version: int,
    expires_in: timedelta,
    url: str | None,
    chunk_size: int,
    update_id: str | None = None,
    golden: GoldenSet | None = None,
    shadow: ShadowOverride | None = None,
    issued_at: datetime | None = None,
) -> Signer:
    """Read the model and the keys once; ``issued_at`` defaults to now, the update id to
    ``MODEL-vN-<random>``."""
    now = issued_at or datetime.now(timezone.utc).replace(microsecond=0)
    data = model_file.read_bytes()
    return Signer(
        data=data,
        sha256=hashlib.sha256(data).hexdigest(),
        keys=tuple(load_private_key(path) for path in key_files),
        model=model,
        version=version,
        update_id=update_id or f"{model}-v{version}-{uuid.uuid4().hex[:8]}",
        issued_at=now,
        expires=now + expires_in,
        url=url,
        chunk_size=chunk_size,
        golden=golden,
        shadow=shadow,
    )


def sign_update(
    model_file: Path,
    key_files: Sequence[Path],
    *,
    model: str,
    version: int,
    devices: Sequence[str],
    groups: Sequence[str],
    expires_in: timedelta,
    url: str | None,
    chunk_size: int,
    update_id: str | None = None,
    golden: GoldenSet | None = None,
    shadow: ShadowOverride | None = None,
) -> SignedUpdate:
    """Read the model, describe it in a payload, and sign it with every key; ``golden``
    travels in the payload (``validation``) and the devices check it during the trial, as
    they run the shadow trial ``shadow`` sets."""
    signer = make_signer(
        model_file,
        key_files,
        model=model,
        version=version,
        expires_in=expires_in,
        url=url,
        chunk_size=chunk_size,
        update_id=update_id,
        golden=golden,
        shadow=shadow,
    )
    return signer.sign(devices, groups)


def send_update(
    client: paho.Client,
    bases: Sequence[str],
    update: SignedUpdate,
    progress: Callable[[int, int], None],
    answered: Callable[[str], bool] = lambda base: False,
    *,
    retain: bool = False,
    manifest: bool = True,
) -> None:
    """Publish the manifest, then the chunks, to each ``BASE/updates/...`` (QoS 1).

    ``retain``: the manifest stays on the broker as the device's desired state (chunks are
    never retained). ``manifest=False`` sends the chunks alone, again, to a device that
    reported ``waiting_for_transfer``.

    At most ``PUBLISH_WINDOW`` chunks wait for the broker at a time, so a large model is
    not queued in memory twice. ``progress(sent_bytes, total_bytes)`` follows the acks.
    ``answered(base)`` is asked between chunks: once it is true (the device behind ``base``
    already gave its final word, e.g. REJECTED the manifest) the rest of its chunks are
    not sent, and count as done for the progress.
    """
    chunk_size = update.chunk_size
    chunks = 0 if chunk_size is None else max(1, -(-len(update.data) // chunk_size))
    total = len(update.data) * len(bases) if chunk_size else 0
    sent = 0
    for number, base in enumerate(bases, start=1):
        if manifest:
            wait_acked(
                client.publish(
                    f"{base}/updates/manifest", update.manifest_bytes(), qos=1, retain=retain
                )
            )
        if chunk_size is None:
            continue
        window: deque[tuple[paho.MQTTMessageInfo, int]] = deque()
        topic = f"{base}/updates/chunks/{update.update_id}"
        for index in range(chunks):
            if answered(base):
                break
            body = update.data[index * chunk_size : (index + 1) * chunk_size]
            window.append(
                (client.publish(topic, index.to_bytes(4, "big") + body, qos=1), len(body))
            )
            if len(window) >= PUBLISH_WINDOW:
                info, size = window.popleft()
                wait_acked(info)
                sent += size
                progress(sent, total)
        while window:
            info, size = window.popleft()
            wait_acked(info)
            sent += size
            progress(sent, total)
        if sent < len(update.data) * number:  # chunks skipped for an answered device
            sent = len(update.data) * number
            progress(sent, total)


def wait_acked(info: paho.MQTTMessageInfo) -> None:
    """Wait for the broker's PUBACK of one QoS 1 message; ``TimeoutError`` after
    ``ACK_TIMEOUT_S``."""
    info.wait_for_publish(timeout=ACK_TIMEOUT_S)
    if not info.is_published():
        raise TimeoutError(f"the broker did not acknowledge a message within {ACK_TIMEOUT_S} s")


def answers(status: dict[str, Any], update_id: str, manifest_sha256: str | None) -> bool:
    """Whether a device's status document speaks of this update: its id, and the exact
    manifest bytes sent (``manifest_sha256``; None: the id alone). Anyone who can publish a
    manifest can get a device to say REJECTED about it, and that must not be read as the
    device's word on this update.

    A device that could not verify the manifest (``authenticated: false``: a key it does not
    trust, a revoked one, a key set it refuses) names no update id, since it read none it
    could believe; the digest of the exact bytes this command sent is then the proof that
    the rejection is of this manifest."""
    answered = status.get("manifest_sha256")  # absent from devices before 0.2
    if status.get("authenticated") is False:
        return manifest_sha256 is not None and answered == manifest_sha256
    if status.get("update_id") != update_id:
        return False
    return None in (manifest_sha256, answered) or answered == manifest_sha256


@dataclass
class StatusFollower:
    """Collects ``P/updates/status`` messages of one update from every device.

    Only statuses that answer the exact manifest sent count (``manifest_sha256``): anyone who
    can publish a manifest can get a device to say REJECTED about it, and that must not be
    read as the device's word on this update."""

    update_id: str
    levels: int  # topic levels of the prefix: the device is the next
    manifest_sha256: str | None = None  # of the bytes sent; None: match update_id alone
    out: TextIO = sys.stdout
    before_line: Callable[[], None] = lambda: None  # e.g. ProgressBar.interrupt
    finals: dict[str, dict[str, Any]] = field(default_factory=dict)
    seen: set[str] = field(default_factory=set)
    last_new_device: float = field(default_factory=time.monotonic)
    _cond: threading.Condition = field(default_factory=threading.Condition)

    def on_message(self, client: paho.Client, userdata: Any, message: paho.MQTTMessage) -> None:
        """paho's network thread: record one status message."""
        try:
            status = json.loads(message.payload)
        except ValueError:
            return
        if not isinstance(status, dict) or not answers(
            status, self.update_id, self.manifest_sha256
        ):
            return
        device = str(status.get("device_id") or message.topic.split("/")[self.levels])
        state = str(status.get("state"))
        with self._cond:
            if device in self.finals:
                return  # the first final word counts; later repeats are echoes
            if device not in self.seen:
                self.seen.add(device)
                self.last_new_device = time.monotonic()
            line = f"{device}: {state}"
            if status.get("step"):
                line += f" ({status['step']})"
            if status.get("reason"):
                line += f": {status['reason']}"
            self.before_line()
            print(line, file=self.out, flush=True)
            validation = status.get("validation")
            if state == "SUCCEEDED" and isinstance(validation, dict):
                print(f"  validation: {validation_line(validation)}", file=self.out, flush=True)
            shadow = status.get("shadow")
            if isinstance(shadow, dict):  # running figures, or the final ones
                print(f"  shadow: {shadow_line(shadow)}", file=self.out, flush=True)
            if state in TERMINAL:
                self.finals[device] = status
            self._cond.notify_all()

    def has_final(self, device: str | None) -> bool:
        """Whether ``device`` has given its final word on this update (any thread)."""
        with self._cond:
            return device in self.finals

    def wait(self, devices: Sequence[str], groups: bool, timeout_s: float, settle_s: float) -> bool:
        """Wait until every named device (and, for group targets, every device heard from,
        with no new one for ``settle_s``) has a final status; False on timeout."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while True:
                now = time.monotonic()
                named_done = all(d in self.finals for d in devices)
                heard_done = all(d in self.finals for d in self.seen)
                settled = not groups or (self.seen and now - self.last_new_device >= settle_s)
                if named_done and heard_done and settled:
                    return True
                if now >= deadline:
                    return False
                self._cond.wait(timeout=min(0.2, deadline - now))


def validation_line(validation: dict[str, Any]) -> str:
    """A device's golden set figures on one line: samples, errors, top-1 (a classifier's),
    latency and providers. Written by the device, so any field may be missing or odd."""
    latency = validation.get("latency_ms")
    latency = latency if isinstance(latency, dict) else {}
    providers = validation.get("providers")
    parts = [
        f"{_figure(validation.get('samples'), 'd')} samples",
        f"max abs err {_figure(validation.get('max_abs_err'), '.2g')}",
        f"max rel err {_figure(validation.get('max_rel_err'), '.2g')}",
    ]
    if validation.get("top1_agreement") is not None:
        parts.append(f"top-1 {_figure(validation.get('top1_agreement'), '.3f')}")
    parts.append(
        f"latency p50 {_milliseconds(latency.get('p50'))} ms "
        f"p99 {_milliseconds(latency.get('p99'))} ms"
    )
    if isinstance(providers, list) and providers:
        parts.append(", ".join(str(p)[:64] for p in providers[:8]))
    return ", ".join(parts)


def shadow_line(shadow: dict[str, Any]) -> str:
    """A device's shadow trial figures on one line: readings compared, disagreement, the
    largest and mean absolute difference, the largest relative one and the latency ratio.
    Written by the device: any field may be odd."""
    if shadow.get("skipped"):
        return f"skipped: {str(shadow['skipped'])[:200]}"
    return ", ".join(
        [
            f"{_figure(shadow.get('readings'), 'd')} readings",
            f"disagreement {_figure(shadow.get('disagreement'), '.2%')}",
            f"max abs err {_figure(shadow.get('max_abs_err'), '.2g')}",
            f"mean abs err {_figure(shadow.get('mean_abs_err'), '.2g')}",
            f"max rel err {_figure(shadow.get('max_rel_err'), '.2g')}",
            f"latency ratio {_figure(shadow.get('latency_ratio'), '.2f')}",
        ]
    )


def _milliseconds(value: Any) -> str:
    """0.21, 12.50; a small model's 0.0041 keeps its digits instead of showing 0.00."""
    if isinstance(value, int | float) and not isinstance(value, bool) and 0 < value < 0.1:
        return _figure(value, ".2g")
    return _figure(value, ".2f")


def _figure(value: Any, spec: str) -> str:
    """``value`` formatted by ``spec`` when it is a number, else ``?``."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return "?"
    if spec == "d":
        return str(int(value))
    return format(value, spec)


class ProgressBar:
    """A one-line progress bar on ``out`` that other output can interrupt cleanly.

    Called from the sending thread (``__call__``) and paho's network thread
    (``interrupt``, before a status line is printed); the lock keeps their lines whole.
    """

    WIDTH = 30

    def __init__(self, out: TextIO) -> None:
        self._out = out
        self._started = time.monotonic()
        self._lock = threading.Lock()
        self._open = False  # a bar is drawn and its line not yet ended
        self._finished = False

    def __call__(self, done: int, total: int) -> None:
        """Draw the bar for ``done`` of ``total`` bytes; ends its line when complete."""
        with self._lock:
            if self._finished:
                return
            fraction = done / total if total else 1.0
            filled = int(self.WIDTH * fraction)
            rate = done / max(time.monotonic() - self._started, 1e-6)
            self._out.write(
                f"\rsending [{'#' * filled}{'.' * (self.WIDTH - filled)}] "
                f"{fraction:6.1%} {human_bytes(done)}/{human_bytes(total)} "
                f"{human_bytes(rate)}/s"
            )
            self._open = True
            if done >= total:
                self._out.write("\n")
                self._open = False
                self._finished = True
            self._out.flush()

    def interrupt(self) -> None:
        """End a half-drawn bar line, so the next line printed starts on its own."""
        with self._lock:
            if self._open:
                self._out.write("\n")
                self._out.flush()
                self._open = False


def human_bytes(count: float) -> str:
    """``count`` bytes in the largest unit that keeps it >= 1: 812 B, 3.4 KB, 12.0 MB."""
    for unit in ("B", "KB", "MB"):
        if count < 1000:
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1000
    return f"{count:.1f} GB"
