"""Simulated devices for rollout tests at fleet scale: many devices over a few MQTT
connections, speaking the device side of the update protocol.

Each simulated device keeps ``P/status`` (``online``) and ``P/health`` (its groups, the
update versions it accepted) retained, subscribes to its own ``P/updates/manifest`` and
answers every manifest that names it (by device or group) with QUEUED, IN_PROGRESS and a
final status carrying the manifest's sha256, as a daemon does. A configurable share of
the devices fails each update, another share never answers; which ones is fixed by the
device's name, so a rerun sees the same fleet. Manifests are parsed, not verified: the
simulator stands in for the fleet, not for the daemon's checks (``tests/`` cover those).

    .venv/bin/python scripts/fleet_sim.py --host 127.0.0.1 --port 1883 --devices 10000 \\
        --group sim --fail 0.01 --silent 0.005

runs until Ctrl-C; ``scripts/bench_rollout.py`` starts it in-process.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import heapq
import itertools
import json
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

SUBSCRIBE_BATCH = 200  # topic filters per SUBSCRIBE packet
HEALTH_INTERVAL_S = 600  # the retained health stays fresh (not stale) this long


@dataclass
class SimulatedDevice:
    """One device's update state; written by its connection's network thread and by the
    scheduler thread, under the fleet's lock."""

    name: str
    fate: str  # "succeed", "fail" or "silent"
    versions: dict[str, int] = field(default_factory=dict)
    answered: set[str] = field(default_factory=set)  # manifest digests answered


def fate_of(name: str, fail: float, silent: float) -> str:
    """Whether ``name`` succeeds, fails or never answers: fixed by a hash of the name."""
    draw = int(hashlib.sha256(name.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    if draw < fail:
        return "fail"
    if draw < fail + silent:
        return "silent"
    return "succeed"


class SimulatedFleet:
    """``devices`` simulated devices named ``sim00000``... over ``connections`` MQTT
    clients."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        devices: int,
        connections: int = 4,
        group: str = "sim",
        prefix: str = "edge",
        fail: float = 0.0,
        silent: float = 0.0,
        install_s: float = 1.0,
        model: str = "lin",
    ) -> None:
        self.host, self.port, self.group, self.prefix = host, port, group, prefix
        self.install_s, self.model = install_s, model
        width = max(5, len(str(devices - 1)))
        names = [f"sim{i:0{width}d}" for i in range(devices)]
        self.devices = {name: SimulatedDevice(name, fate_of(name, fail, silent)) for name in names}
        self._lock = threading.Lock()
        self._clients: list[paho.Client] = []
        self._owner: dict[str, paho.Client] = {}
        self._heap: list[tuple[float, int, str, dict[str, Any]]] = []
        self._order = itertools.count()
        self._wake = threading.Condition(self._lock)
        self._stopped = False
        self._ready = threading.Semaphore(0)
        self._pending: dict[int, int] = {}  # SUBACKs each client still waits for
        self.manifests_received = 0
        self.statuses_sent = 0
        for index in range(connections):
            mine = names[index::connections]
            client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"fleet-sim-{index}")
            client.user_data_set(mine)
            client.on_connect = self._on_connect
            client.on_subscribe = self._on_subscribe
            client.on_message = self._on_message
            client.max_queued_messages_set(0)
            self._clients.append(client)
            for name in mine:
                self._owner[name] = client
        self._scheduler = threading.Thread(target=self._run_scheduler, name="sim-scheduler")

    def start(self, timeout_s: float = 120.0) -> None:
        """Connect every client, subscribe, publish every device's retained documents."""
        self._scheduler.start()
        for client in self._clients:
            client.connect(self.host, self.port, keepalive=60)
            client.loop_start()
        for _ in self._clients:
            if not self._ready.acquire(timeout=timeout_s):
                raise TimeoutError("the simulated fleet did not come up")
        for name in self.devices:
            self._publish_retained(name)
        for client in self._clients:  # a QoS 1 marker: the broker holds everything before it
            client.publish(f"{self.prefix}/_sim/ready", b"1", qos=1).wait_for_publish(timeout_s)

    def stop(self) -> None:
        """Disconnect; the retained documents stay on the broker."""
        with self._wake:
            self._stopped = True
            self._wake.notify_all()
        self._scheduler.join(5)
        for client in self._clients:
            client.disconnect()
            client.loop_stop()

    def counts(self) -> dict[str, int]:
        """How many devices will succeed, fail, stay silent."""
        result: dict[str, int] = {}
        for device in self.devices.values():
            result[device.fate] = result.get(device.fate, 0) + 1
        return result

    # -- paho's network threads -----------------------------------------------------------

    def _on_connect(
        self, client: paho.Client, userdata: list[str], flags: Any, reason: Any, props: Any
    ) -> None:
        topics = [(f"{self.prefix}/{name}/updates/manifest", 1) for name in userdata]
        batches = [topics[i : i + SUBSCRIBE_BATCH] for i in range(0, len(topics), SUBSCRIBE_BATCH)]
        with self._lock:
            self._pending[id(client)] = len(batches)
        for batch in batches:
            client.subscribe(batch)

    def _on_subscribe(
        self, client: paho.Client, userdata: Any, mid: int, codes: Any, props: Any
    ) -> None:
        with self._lock:
            self._pending[id(client)] -= 1
            done = self._pending[id(client)] == 0
        if done:
            self._ready.release()

    def _on_message(self, client: paho.Client, userdata: Any, message: paho.MQTTMessage) -> None:
        payload = _manifest_payload(bytes(message.payload))
        if payload is None:
            return  # a cleared retained manifest, or not a manifest at all
        self.manifests_received += 1
        name = message.topic.split("/")[-3]
        targets = payload.get("targets") or {}
        named = name in (targets.get("devices") or [])
        if named or self.group in (targets.get("groups") or []):
            digest = hashlib.sha256(message.payload).hexdigest()
            self._answer(name, payload, digest, retained=bool(message.retain))

    def _answer(self, name: str, payload: dict[str, Any], digest: str, retained: bool) -> None:
        """Schedule the statuses a daemon would send about this manifest."""
        with self._lock:
            device = self.devices.get(name)
            if device is None or digest in device.answered:
                return  # a repeat: the first copy was answered
            version = int(payload.get("version", 0))
            model = str(payload.get("model"))
            floor = device.versions.get(model, 1)
            if retained and version <= floor:
                return  # desired state this device is past: no status, as a daemon does
            device.answered.add(digest)
            if device.fate == "silent":
                return
            status = {
                "device_id": name,
                "update_id": payload.get("update_id"),
                "model": model,
                "version": version,
                "manifest_sha256": digest,
                "authenticated": True,
            }
            now = time.monotonic()
            if version <= floor:
                self._schedule(now, name, {**status, "state": "REJECTED", "reason": "not newer"})
                return
            self._schedule(now, name, {**status, "state": "QUEUED"})
            self._schedule(
                now + 0.2 * self.install_s,
                name,
                {**status, "state": "IN_PROGRESS", "step": "downloading"},
            )
            final = (
                {**status, "state": "FAILED", "step": "validating", "reason": "simulated failure"}
                if device.fate == "fail"
                else {**status, "state": "SUCCEEDED"}
            )
            self._schedule(now + self.install_s, name, final)

    # -- the scheduler thread -------------------------------------------------------------

    def _schedule(self, at: float, name: str, status: dict[str, Any]) -> None:
        """Queue a status for ``at`` (caller holds the lock)."""
        heapq.heappush(self._heap, (at, next(self._order), name, status))
        self._wake.notify()

    def _run_scheduler(self) -> None:
        while True:
            with self._wake:
                while not self._stopped and (not self._heap or self._heap[0][0] > time.monotonic()):
                    delay = self._heap[0][0] - time.monotonic() if self._heap else 1.0
                    self._wake.wait(max(0.001, delay))
                if self._stopped:
                    return
                _, _, name, status = heapq.heappop(self._heap)
                if status["state"] == "SUCCEEDED":
                    self.devices[name].versions[status["model"]] = status["version"]
            status["ts"] = time.time()
            client = self._owner[name]
            client.publish(f"{self.prefix}/{name}/updates/status", json.dumps(status), qos=1)
            self.statuses_sent += 1
            if status["state"] == "SUCCEEDED":
                self._publish_retained(name)

    def _publish_retained(self, name: str) -> None:
        with self._lock:
            versions = dict(self.devices[name].versions)
        client = self._owner[name]
        health = {
            "device_id": name,
            "ts": time.time(),
            "interval_s": HEALTH_INTERVAL_S,
            "agent_version": "simulated",
            "groups": [self.group],
            "update_versions": versions,
        }
        client.publish(f"{self.prefix}/{name}/status", b"online", qos=1, retain=True)
        client.publish(f"{self.prefix}/{name}/health", json.dumps(health), qos=1, retain=True)


def _manifest_payload(data: bytes) -> dict[str, Any] | None:
    """The payload JSON of a manifest envelope, unverified; None when it is not one."""
    try:
        payload = json.loads(base64.b64decode(json.loads(data)["payload"]))
    except (ValueError, KeyError, TypeError):
        return None
    return payload if isinstance(payload, dict) else None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=1883)
    parser.add_argument("--devices", type=int, default=10_000)
    parser.add_argument("--connections", type=int, default=4)
    parser.add_argument("--group", default="sim")
    parser.add_argument("--prefix", default="edge")
    parser.add_argument("--fail", type=float, default=0.0, help="share that fails updates")
    parser.add_argument("--silent", type=float, default=0.0, help="share that never answers")
    parser.add_argument("--install-s", type=float, default=1.0, help="seconds per update")
    args = parser.parse_args()
    fleet = SimulatedFleet(
        args.host,
        args.port,
        devices=args.devices,
        connections=args.connections,
        group=args.group,
        prefix=args.prefix,
        fail=args.fail,
        silent=args.silent,
        install_s=args.install_s,
    )
    fleet.start()
    print(f"{args.devices} simulated devices in group {args.group}: {fleet.counts()}", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    stop.wait()
    fleet.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
