"""Put a running daemon into a shadow trial for ``bench_cpu.py --shadow``: a signed update
of its own model in other bytes (the same results), with a shadow an hour long, so the
windows that follow measure what each reading costs while a candidate runs beside the
serving model."""

from __future__ import annotations

import json
import threading
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import onnx
import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from agent.cli.update_sender import send_update, sign_update
from agent.updates.shadow_terms import ShadowOverride
from agent.updates.signing import generate_keypair
from tests.broker import MosquittoBroker

SHADOW_S = 3600.0


def signing_keys(stem: Path) -> tuple[Path, Path]:
    """A fresh key pair for the daemon to trust: (public key file, private key file)."""
    private, public, _ = generate_keypair(stem)
    return public, private


def begin_shadow(
    broker: MosquittoBroker, device: str, model: Path, key: Path, folder: Path
) -> None:
    """Send ``model`` again (other bytes) as a signed update to ``device`` and return once
    its shadow trial runs."""
    candidate = folder / f"{device}-candidate.onnx"
    proto = onnx.load(str(model))
    proto.doc_string = "the same model, for a shadow trial"
    onnx.save(proto, str(candidate))
    update = sign_update(
        candidate,
        [key],
        model="m",
        version=1,
        devices=[device],
        groups=[],
        expires_in=timedelta(hours=2),
        url=None,
        chunk_size=256 * 1024,
        shadow=ShadowOverride(duration_s=SHADOW_S, min_readings=1),
    )
    shadowing = threading.Event()

    # paho's network thread: the device's statuses.
    def on_message(client: paho.Client, userdata: Any, message: paho.MQTTMessage) -> None:
        status = json.loads(message.payload)
        if status.get("step") == "shadow" and status.get("state") == "IN_PROGRESS":
            shadowing.set()

    client = paho.Client(CallbackAPIVersion.VERSION2)
    client.on_message = on_message
    client.connect(broker.host, broker.port)
    client.subscribe(f"edge/{device}/updates/status", qos=1)
    client.loop_start()
    try:
        time.sleep(0.5)
        send_update(client, [f"edge/{device}"], update, lambda done, total: None)
        if not shadowing.wait(60):
            raise RuntimeError(f"{device} did not begin its shadow trial in 60 s")
    finally:
        client.disconnect()
        client.loop_stop()
