"""``edge-agent status``: a fleet table from the retained topics on a broker.

Each daemon keeps ``P/status``, ``P/health`` and ``P/models/NAME`` retained, so a fresh
subscription to ``PREFIX/+/...`` returns the last word of every device at once.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import paho.mqtt.client as paho

from agent.config import MqttConfig
from agent.tool_client import connect


@dataclass
class DeviceView:
    """What the retained topics say about one device."""

    device: str
    status: str = "?"
    health: dict[str, Any] | None = None
    models: dict[str, dict[str, Any]] = field(default_factory=dict)


def collect(mqtt: MqttConfig, prefix: str, device: str | None, wait_s: float,
            password: str | None = None) -> dict[str, DeviceView]:
    """Subscribe to the devices' retained topics under ``prefix`` and gather them."""
    who = device or "+"
    devices: dict[str, DeviceView] = {}
    lock = threading.Lock()
    levels = len(prefix.split("/"))

    # Runs on paho's network thread.
    def on_message(client: paho.Client, userdata: Any, message: paho.MQTTMessage) -> None:
        parts = message.topic.split("/")
        name, kind = parts[levels], parts[levels + 1]
        with lock:
            view = devices.setdefault(name, DeviceView(name))
            if kind == "status":
                view.status = message.payload.decode("utf-8", "replace")
            elif not message.payload:
                return  # an emptied retained topic
            elif kind == "health":
                view.health = _json(message.payload)
            elif kind == "models" and len(parts) > levels + 2:
                view.models[parts[levels + 2]] = _json(message.payload) or {}

    client = connect(mqtt, password, [(f"{prefix}/{who}/status", 1),
                                      (f"{prefix}/{who}/health", 1),
                                      (f"{prefix}/{who}/models/+", 1)], on_message)
    try:
        time.sleep(wait_s)  # retained messages arrive right after the subscription
    finally:
        client.disconnect()
        client.loop_stop()
    with lock:
        return dict(devices)


def _json(payload: bytes | bytearray) -> dict[str, Any] | None:
    try:
        value = json.loads(payload)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def table(devices: dict[str, DeviceView], now: float | None = None) -> str:
    """A text table: device, online, models and versions, throughput, latency, temperature,
    last seen."""
    now = time.time() if now is None else now
    rows = [("DEVICE", "ONLINE", "MODELS", "READINGS/S", "P50 MS", "P99 MS", "TEMP C",
             "OUTBOX", "LAST SEEN")]
    for name in sorted(devices):
        view = devices[name]
        health = view.health or {}
        pipelines = health.get("pipelines") or {}
        throughput = sum(float(p.get("throughput") or 0) for p in pipelines.values())
        p50 = [p["latency_ms"]["p50"] for p in pipelines.values()
               if (p.get("latency_ms") or {}).get("p50") is not None]
        p99 = [p["latency_ms"]["p99"] for p in pipelines.values()
               if (p.get("latency_ms") or {}).get("p99") is not None]
        temperatures = list((health.get("temperatures_c") or {}).values())
        models = ", ".join(
            f"{model}:{(info.get('state') or '?')[:5]}:{(info.get('version') or '-')[7:15]}"
            for model, info in sorted(view.models.items())) or "-"
        seen = health.get("ts")
        outbox = (health.get("delivery") or {}).get("outbox") or {}
        rows.append((
            name,
            "yes" if view.status == "online" else "NO" if view.status == "offline" else "?",
            models,
            f"{throughput:.1f}" if health else "-",
            f"{max(p50):.2f}" if p50 else "-",
            f"{max(p99):.2f}" if p99 else "-",
            f"{max(temperatures):.1f}" if temperatures else "-",
            _outbox_cell(outbox),
            _ago(now - float(seen)) if isinstance(seen, int | float) else "never",
        ))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths,
                                                                          strict=True)).rstrip()
                     for row in rows)


def _outbox_cell(outbox: dict[str, Any]) -> str:
    """Stored results waiting for the broker, and how many were dropped ("-": none)."""
    depth, dropped = outbox.get("depth") or 0, (outbox.get("dropped") or 0) + (
        outbox.get("expired") or 0)
    if not depth and not dropped:
        return "-"
    return f"{depth}" + (f" ({dropped} dropped)" if dropped else "")


def _ago(seconds: float) -> str:
    if seconds < 90:
        return f"{max(seconds, 0):.0f}s ago"
    if seconds < 5400:
        return f"{seconds / 60:.0f}m ago"
    return f"{seconds / 3600:.1f}h ago"
