"""``edge-agent status``: a fleet table from the retained topics on a broker.

Each daemon keeps ``P/status``, ``P/health`` and ``P/models/NAME`` retained, so a fresh
subscription to ``PREFIX/+/...`` returns the last word of every device at once. Retained
documents outlive the device that wrote them, so every device gets a state:

- ``offline``: ``P/status`` is ``offline`` (clean stop, or the broker fired the last will);
- ``stale``: ``P/status`` still says ``online`` but the last health is older than
  ``STALE_INTERVALS`` health intervals (a device that hung or lost its network before its
  keepalive ran out, or a broker restored from persistence);
- ``online``: ``P/status`` is ``online`` and the health is fresh (or none was sent yet);
- ``unknown``: anything else (no status topic, an unreadable health).

Only ``online`` devices show their figures as current; the others show ``-`` and their model
states as ``last``.
"""

from __future__ import annotations

import json
import signal
import sys
import threading
import time
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from types import FrameType
from typing import Any, TextIO

import paho.mqtt.client as paho

from agent.cli.tool_client import connect
from agent.config.schema import MqttConfig

ONLINE, OFFLINE, STALE, UNKNOWN = "online", "offline", "stale", "unknown"
# A health document older than this many of its device's intervals is not current: one
# late report is normal under load, three missed in a row are not.
STALE_INTERVALS = 3
# Older daemons do not put ``interval_s`` in their health: assume the config default.
DEFAULT_INTERVAL_S = 10.0
REFRESH_S = 1.0
# The end-of-retained marker's topic: under fleet/, where an operator's account may publish.
MARKER_PREFIX = "fleet/markers"
RETAINED_MAX_S = 120.0
# How often the watch loop looks at the stop flag between redraws.
_POLL_S = 0.05
_ONLINE_CELL = {ONLINE: "yes", OFFLINE: "NO", STALE: "STALE", UNKNOWN: "?"}
# ANSI: cursor home, then clear the screen (a terminal redraws the table in place).
_CLEAR = "\x1b[H\x1b[2J"


@dataclass
class DeviceView:
    """What the retained topics say about one device."""

    device: str
    status: str = "?"
    health: dict[str, Any] | None = None
    models: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def groups(self) -> tuple[str, ...]:
        """The fleet groups the last health named (none when it did not say)."""
        groups = (self.health or {}).get("groups")
        if not isinstance(groups, list):
            return ()
        return tuple(g for g in groups if isinstance(g, str))

    @property
    def interval_s(self) -> float:
        """The device's health interval: from its health, else the config default."""
        interval = (self.health or {}).get("interval_s")
        if isinstance(interval, int | float) and not isinstance(interval, bool) and interval > 0:
            return float(interval)
        return DEFAULT_INTERVAL_S

    def is_empty(self) -> bool:
        """Whether every retained topic of the device has been cleared."""
        return self.status == "?" and self.health is None and not self.models


@dataclass(frozen=True)
class Judgement:
    """A device's state at one moment, with the age of its last health."""

    state: str
    age_s: float | None
    stale_after_s: float


def judge(view: DeviceView, now: float) -> Judgement:
    """The device's state (``online``, ``offline``, ``stale``, ``unknown``) at ``now``
    (unix seconds), and how old its last health is."""
    limit = STALE_INTERVALS * view.interval_s
    seen = (view.health or {}).get("ts")
    age = (
        now - float(seen) if isinstance(seen, int | float) and not isinstance(seen, bool) else None
    )
    if view.status == "offline":
        state = OFFLINE
    elif view.status != "online":
        state = UNKNOWN
    elif view.health is None:
        state = ONLINE  # just connected: the first health is on its way, no figures to show
    elif age is None:
        state = UNKNOWN
    else:
        state = STALE if age > limit else ONLINE
    return Judgement(state, None if age is None else round(age, 1), limit)


class FleetCollector:
    """The devices seen under a prefix; the only owner of that map.

    ``on_message`` (paho's network thread) writes it under the lock; ``snapshot`` (any
    other thread) copies it out. Health documents are replaced, never changed, so a snapshot
    may share them."""

    def __init__(self, prefix: str, health_keys: frozenset[str] | None = None) -> None:
        """``health_keys``: keep only these keys of each health document (a rollout over
        100,000 devices needs their groups and versions, not every pipeline's figures)."""
        self._levels = len(prefix.split("/"))
        self._health_keys = health_keys
        # A private topic: what is published there after subscribing comes back behind
        # every retained document the subscription returned (see wait_for_retained).
        self.marker_topic = f"{MARKER_PREFIX}/{uuid.uuid4().hex}/retained-done"
        self.marker_seen = threading.Event()
        self._lock = threading.Lock()
        self._devices: dict[str, DeviceView] = {}

    # Runs on paho's network thread: must be short and must never raise.
    def on_message(self, client: paho.Client, userdata: Any, message: paho.MQTTMessage) -> None:
        """Record one status, health or model document (an empty payload clears it)."""
        if message.topic == self.marker_topic:
            self.marker_seen.set()
            return
        parts = message.topic.split("/")
        if len(parts) < self._levels + 2:
            return
        name, kind = parts[self._levels], parts[self._levels + 1]
        payload = bytes(message.payload)
        with self._lock:
            view = self._devices.setdefault(name, DeviceView(name))
            if kind == "status":
                view.status = payload.decode("utf-8", "replace") if payload else "?"
            elif kind == "health":
                view.health = _json(payload) if payload else None
                if view.health is not None and self._health_keys is not None:
                    view.health = {k: v for k, v in view.health.items() if k in self._health_keys}
            elif kind == "models" and len(parts) > self._levels + 2:
                model = "/".join(parts[self._levels + 2 :])
                if payload:
                    view.models[model] = _json(payload) or {}
                else:
                    view.models.pop(model, None)
            if view.is_empty():
                del self._devices[name]  # all its retained topics were cleared

    def snapshot(self, names: Iterable[str] | None = None) -> dict[str, DeviceView]:
        """A copy of the devices seen so far (of those of ``names`` that were seen)."""
        with self._lock:
            views = (
                self._devices.values()
                if names is None
                else [self._devices[n] for n in names if n in self._devices]
            )
            return {
                view.device: DeviceView(view.device, view.status, view.health, dict(view.models))
                for view in views
            }


def subscribe(
    mqtt: MqttConfig,
    prefix: str,
    device: str | None,
    collector: FleetCollector,
    password: str | None = None,
) -> paho.Client:
    """Connect and subscribe to the devices' status, health and model topics under
    ``prefix``, feeding ``collector``; returns the connected client (paho's network thread
    runs; stop it with ``disconnect()`` and ``loop_stop()``)."""
    who = device or "+"
    return connect(
        mqtt,
        password,
        [
            (f"{prefix}/{who}/status", 1),
            (f"{prefix}/{who}/health", 1),
            (f"{prefix}/{who}/models/+", 1),
            (collector.marker_topic, 1),
        ],
        collector.on_message,
    )


def wait_for_retained(
    client: paho.Client, collector: FleetCollector, at_least_s: float, out: TextIO | None = None
) -> None:
    """Wait until the broker has delivered the retained documents of the subscription, and
    at least ``at_least_s``. The broker queues them before anything published after its
    SUBACK, so a QoS 1 marker published now comes back behind the last of them (100,000
    devices' documents take a while). Without the marker after ``RETAINED_MAX_S`` (a broker
    whose per-client queue dropped part of them drops it too) it goes on, and says so."""
    started = time.monotonic()
    client.publish(collector.marker_topic, b"", qos=1)
    if not collector.marker_seen.wait(RETAINED_MAX_S):
        print(
            f"edge-agent: the broker did not return the end-of-retained marker within "
            f"{RETAINED_MAX_S:g} s: the device list may be incomplete (raise the broker's "
            "max_queued_messages)",
            file=out or sys.stderr,
        )
    time.sleep(max(0.0, at_least_s - (time.monotonic() - started)))


def collect(
    mqtt: MqttConfig, prefix: str, device: str | None, wait_s: float, password: str | None = None
) -> dict[str, DeviceView]:
    """Subscribe to the devices' retained topics under ``prefix`` and gather them for
    ``wait_s`` seconds."""
    collector = FleetCollector(prefix)
    client = subscribe(mqtt, prefix, device, collector, password)
    try:
        wait_for_retained(client, collector, wait_s)
    finally:
        client.disconnect()
        client.loop_stop()
    return collector.snapshot()


def in_group(devices: dict[str, DeviceView], group: str | None) -> dict[str, DeviceView]:
    """The devices whose last health lists ``group`` (all of them when ``group`` is None).
    A device that never said its groups is in none."""
    if group is None:
        return devices
    return {name: view for name, view in devices.items() if group in view.groups}


def report(devices: dict[str, DeviceView], now: float | None = None) -> dict[str, Any]:
    """The ``--json`` document: per device its state, the age of its health, and the
    retained documents as they are."""
    now = time.time() if now is None else now
    out: dict[str, Any] = {}
    for name in sorted(devices):
        view = devices[name]
        verdict = judge(view, now)
        out[name] = {
            "state": verdict.state,
            "age_s": verdict.age_s,
            "stale_after_s": verdict.stale_after_s,
            "status": view.status,
            "groups": list(view.groups),
            "health": view.health,
            "models": view.models,
        }
    return out


def _json(payload: bytes) -> dict[str, Any] | None:
    try:
        value = json.loads(payload)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def table(devices: dict[str, DeviceView], now: float | None = None) -> str:
    """A text table: device, online (``yes``, ``NO``, ``STALE``, ``?``), models and
    versions, throughput, latency, temperature, warnings, outbox, last seen. Devices that are not
    online show ``-`` for their figures and their model states as ``last``."""
    now = time.time() if now is None else now
    rows = [
        (
            "DEVICE",
            "ONLINE",
            "MODELS",
            "READINGS/S",
            "P50 MS",
            "P99 MS",
            "TEMP C",
            "WARN",
            "OUTBOX",
            "LAST SEEN",
        )
    ]
    for name in sorted(devices):
        view = devices[name]
        verdict = judge(view, now)
        current = verdict.state == ONLINE
        health = (view.health or {}) if current else {}
        pipelines = health.get("pipelines") or {}
        throughput = sum(float(p.get("throughput") or 0) for p in pipelines.values())
        p50 = [
            p["latency_ms"]["p50"]
            for p in pipelines.values()
            if (p.get("latency_ms") or {}).get("p50") is not None
        ]
        p99 = [
            p["latency_ms"]["p99"]
            for p in pipelines.values()
            if (p.get("latency_ms") or {}).get("p99") is not None
        ]
        temperatures = list((health.get("temperatures_c") or {}).values())
        last = "" if current else "last "
        models = (
            ", ".join(
                f"{model}:{last}{info.get('state') or '?'}:{_short_version(info.get('version'))}"
                for model, info in sorted(view.models.items())
            )
            or "-"
        )
        outbox = (health.get("delivery") or {}).get("outbox") or {}
        rows.append(
            (
                name,
                _ONLINE_CELL[verdict.state],
                models,
                f"{throughput:.1f}" if health else "-",
                f"{max(p50):.2f}" if p50 else "-",
                f"{max(p99):.2f}" if p99 else "-",
                f"{max(temperatures):.1f}" if temperatures else "-",
                _warnings_cell(health.get("warnings")),
                _outbox_cell(outbox),
                _ago(verdict.age_s) if verdict.age_s is not None else "never",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in rows
    )


def _warnings_cell(warnings: object) -> str:
    """The codes of a device's active warnings (``under_voltage_now,storage_worn``), or -."""
    if not isinstance(warnings, list) or not warnings:
        return "-"
    codes = [str(w.get("code")) for w in warnings if isinstance(w, dict)]
    return ",".join(codes) or "-"


def _short_version(version: object) -> str:
    """The first 8 hex digits of ``sha256:<hex>``, or "-" for a model with no version yet."""
    if not isinstance(version, str) or not version.startswith("sha256:"):
        return "-"
    return version[7:15]


def _outbox_cell(outbox: dict[str, Any]) -> str:
    """Stored results waiting for the broker, and how many were dropped ("-": none)."""
    depth, dropped = (
        outbox.get("depth") or 0,
        (outbox.get("dropped") or 0) + (outbox.get("expired") or 0),
    )
    if not depth and not dropped:
        return "-"
    return f"{depth}" + (f" ({dropped} dropped)" if dropped else "")


def _ago(seconds: float) -> str:
    if seconds < 90:
        return f"{max(seconds, 0):.0f}s ago"
    if seconds < 5400:
        return f"{seconds / 60:.0f}m ago"
    return f"{seconds / 3600:.1f}h ago"


class _StopFlag:
    """Set by the SIGINT/SIGTERM handler, read by the watch loop (both on the main thread).

    A plain attribute, not a ``threading.Event``: a handler runs between any two bytecodes
    of the main thread, possibly while that thread holds the Event's lock, and would
    deadlock on it."""

    def __init__(self) -> None:
        self.signal: str | None = None


@contextmanager
def _stop_on_signals() -> Iterator[_StopFlag]:
    """SIGINT and SIGTERM set the flag instead of raising or killing; the previous handlers
    come back afterwards. Off the main thread (embedded use) no handler is installed."""
    flag = _StopFlag()
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    # Runs on the main thread, between bytecodes of the watch loop: it only assigns.
    def on_signal(signum: int, frame: FrameType | None) -> None:
        flag.signal = signal.Signals(signum).name

    previous = {
        signum: signal.signal(signum, on_signal) for signum in (signal.SIGINT, signal.SIGTERM)
    }
    try:
        yield flag
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _sleep_until(deadline: float, flag: _StopFlag) -> None:
    """Sleep until ``deadline`` (monotonic) or until a stop signal, whichever comes first."""
    while flag.signal is None:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return
        time.sleep(min(remaining, _POLL_S))


def watch(
    mqtt: MqttConfig,
    prefix: str,
    device: str | None,
    group: str | None,
    wait_s: float,
    *,
    password: str | None = None,
    out: TextIO | None = None,
    as_json: bool = False,
    refresh_s: float = REFRESH_S,
) -> int:
    """Redraw the fleet table every ``refresh_s`` seconds from one subscription until
    SIGINT or SIGTERM; returns the exit code (0).

    The first table comes ``wait_s`` seconds after subscribing (the retained documents
    arrive first). On a terminal each table replaces the previous one; otherwise (a pipe, a
    file) each is printed after a timestamp line and a blank line. With ``as_json`` each
    refresh is one line of the ``--json`` document. Every table is judged against the clock
    at drawing time, so a device that stops reporting turns stale without a new message."""
    out = sys.stdout if out is None else out
    terminal = out.isatty()
    collector = FleetCollector(prefix)
    where = f"{prefix}/{device or '+'} on {mqtt.host}:{mqtt.port}" + (
        f", group {group}" if group else ""
    )
    with _stop_on_signals() as flag:
        client = subscribe(mqtt, prefix, device, collector, password)
        try:
            next_draw = time.monotonic() + wait_s
            _sleep_until(next_draw, flag)
            while flag.signal is None:
                now = time.time()
                devices = in_group(collector.snapshot(), group)
                if as_json:
                    out.write(json.dumps(report(devices, now), separators=(",", ":")) + "\n")
                else:
                    out.write(
                        _frame(devices, now, where, terminal, connected=client.is_connected())
                    )
                out.flush()
                # Ticks from the previous deadline, not from now: drawing time does not add
                # up into drift, and a late tick (a suspended terminal) does not cause a burst.
                next_draw = max(next_draw + refresh_s, time.monotonic())
                _sleep_until(next_draw, flag)
        finally:
            client.disconnect()
            client.loop_stop()
    return 0


def _frame(
    devices: dict[str, DeviceView], now: float, where: str, terminal: bool, connected: bool
) -> str:
    """One refresh of ``--watch``: a heading line, a blank line, the table (and, in a
    pipe or file, a blank line that separates it from the next)."""
    stamp = datetime.fromtimestamp(now, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    heading = f"{stamp}  {where}" + ("" if connected else "  (broker lost, reconnecting)")
    body = table(devices, now) if devices else "no devices"
    if terminal:
        return f"{_CLEAR}{heading}  (Ctrl-C quits)\n\n{body}\n"
    return f"{heading}\n\n{body}\n\n"
