"""Overload benchmark: readings far faster than the daemon can serve them.

Starts a private Mosquitto and the daemon (a deliberately slow model, one pipeline with a
bounded queue), feeds QoS 0 readings at ``--rate`` for ``--seconds`` and then one more
reading on another topic, and prints what the test suite only checks for correctness:

- feed rate, service rate and their ratio (how overloaded it was);
- the latency of served readings (median, p95, worst) against the queue's bound, which is
  about ``queue.max`` service times;
- the latency of the reading sent after the load (recovery).

    .venv/bin/python scripts/bench_overload.py [--rate 3000] [--seconds 10] [--queue 200]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import yaml
from paho.mqtt.enums import CallbackAPIVersion

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench_run import describe_run  # noqa: E402

from tests.broker import MosquittoBroker  # noqa: E402
from tests.onnx_builders import build_slow  # noqa: E402


class Results:
    """Collects results from the broker (paho's network thread appends)."""

    def __init__(self) -> None:
        self.by_topic: dict[str, list[dict[str, Any]]] = {}
        self.lock = threading.Lock()

    def on_message(self, client: paho.Client, userdata: Any, message: paho.MQTTMessage) -> None:
        with self.lock:
            self.by_topic.setdefault(message.topic, []).append(json.loads(message.payload))

    def count(self, topic: str) -> int:
        with self.lock:
            return len(self.by_topic.get(topic, []))


def wait(predicate: Any, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def start_daemon(
    root: Path, broker: MosquittoBroker, queue: int, layers: int
) -> subprocess.Popen[bytes]:
    """The daemon on a slow model, one pipeline with a bounded queue; log in root/agent.log."""
    build_slow(root / "models" / "slow.onnx", layers=layers)
    config = {
        "device_id": "bench",
        "models_dir": str(root / "models"),
        "state_dir": str(root / "state"),
        "mqtt": {"host": broker.host, "port": broker.port},
        "models": {"slow": {}},
        "pipelines": {
            "p": {
                "model": "slow",
                "input": {"topic": "in/+", "qos": 0},
                "output": {"topic": "out/{1}", "qos": 1},
                "batching": {"max_batch": 1},
                "queue": {"max": queue},
            }
        },
    }
    (root / "agent.yaml").write_text(yaml.safe_dump(config))
    with (root / "agent.log").open("wb") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "agent", "run", "--config", str(root / "agent.yaml")],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=REPO,
        )


def client(broker: MosquittoBroker, results: Results | None = None) -> paho.Client:
    """A connected client with its network thread running (subscribed to out/# with
    ``results``)."""
    mqtt = paho.Client(CallbackAPIVersion.VERSION2)
    if results is not None:
        mqtt.on_message = results.on_message
    mqtt.connect(broker.host, broker.port)
    if results is not None:
        mqtt.subscribe("out/#", qos=1)
    mqtt.loop_start()
    return mqtt


def overload(
    feeder: paho.Client, results: Results, rate: float, seconds: float
) -> tuple[int, float]:
    """Feed readings at ``rate`` for ``seconds``, then wait until the queue drained (no new
    result for a second) and send one more; returns (readings fed, seconds fed)."""
    payload = json.dumps([0.1] * 8).encode()
    sent, started = 0, time.monotonic()
    while (now := time.monotonic()) - started < seconds:
        while sent < int((now - started) * rate):
            feeder.publish("in/load", payload, qos=0)
            sent += 1
        time.sleep(0.002)
    fed_s = time.monotonic() - started
    last, quiet_since = -1, time.monotonic()
    while time.monotonic() - quiet_since < 1.0:
        if results.count("out/load") != last:
            last, quiet_since = results.count("out/load"), time.monotonic()
        time.sleep(0.1)
    feeder.publish("in/after", payload, qos=0)
    wait(lambda: results.count("out/after") > 0, 30)
    return sent, fed_s


def report(results: Results, sent: int, fed_s: float, queue: int) -> None:
    """Print the figures (see the module's docstring)."""
    with results.lock:
        served = results.by_topic.get("out/load", [])
        after = results.by_topic.get("out/after", [])
    # Served during the feed and the drain after it, over the feed's duration: the drain
    # adds at most one queue's worth.
    latencies = sorted(r["latency_ms"] for r in served)
    service_ms = 1000.0 * fed_s / max(len(served), 1)
    p95 = latencies[int(0.95 * (len(latencies) - 1))]
    bound_ms = queue * service_ms
    print(
        f"fed {sent} readings in {fed_s:.1f} s ({sent / fed_s:.0f}/s); served {len(served)} "
        f"({len(served) / fed_s:.0f}/s): overload x{sent / max(len(served), 1):.1f}"
    )
    print(
        f"latency of served readings: median {statistics.median(latencies):.0f} ms, "
        f"p95 {p95:.0f} ms, worst {latencies[-1]:.0f} ms; queue bound {queue} x "
        f"{service_ms:.1f} ms = {bound_ms:.0f} ms (worst / bound: "
        f"{latencies[-1] / bound_ms:.2f})"
    )
    print(
        f"after the load: {after[0]['latency_ms']:.0f} ms"
        if after
        else "after the load: no answer within 30 s"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=3000.0, help="readings per second fed")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--queue", type=int, default=200, help="the pipeline's queue.max")
    parser.add_argument("--layers", type=int, default=64, help="cost of the slow model")
    args = parser.parse_args()
    print(describe_run(), flush=True)

    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        (root / "broker").mkdir()
        broker = MosquittoBroker(root / "broker")
        broker.start()
        daemon = start_daemon(root, broker, args.queue, args.layers)
        results = Results()
        listener, feeder = client(broker, results), client(broker)
        try:

            def answered() -> bool:
                feeder.publish("in/warm", b"[0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1]")
                return wait(lambda: results.count("out/warm") > 0, 0.5)

            if not wait(answered, 60):
                print("the daemon never answered; its log:", (root / "agent.log").read_text())
                return 1
            sent, fed_s = overload(feeder, results, args.rate, args.seconds)
        finally:
            feeder.loop_stop()
            listener.loop_stop()
            daemon.terminate()
            daemon.wait(timeout=15)
            broker.stop()
    report(results, sent, fed_s, args.queue)
    return 0


if __name__ == "__main__":
    sys.exit(main())
