"""Update benchmark: transfer rate, time to SUCCEEDED, and the daemon's memory while it
receives a model over MQTT chunks (it must stay flat whatever the model size).

Starts a private Mosquitto and the daemon as a process, then sends signed updates of
growing size (linear models padded to SIZE MB) and samples the daemon's RSS every 20 ms
while the chunks arrive.

    .venv/bin/python scripts/bench_update.py [--sizes 8,64] [--chunk-kib 128]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench_run import describe_run  # noqa: E402

from agent.cli.tool_client import connect  # noqa: E402
from agent.cli.update_sender import send_update, sign_update  # noqa: E402
from agent.config.loader import default_config  # noqa: E402
from agent.procfs import rss_mb  # noqa: E402
from agent.updates.signing import generate_keypair  # noqa: E402
from tests.broker import MosquittoBroker  # noqa: E402
from tests.onnx_builders import build_linear  # noqa: E402


class Steps:
    """Status messages of the update under test, with arrival times (paho's thread)."""

    def __init__(self) -> None:
        self.seen: list[tuple[float, dict[str, Any]]] = []
        self.cond = threading.Condition()

    def on_message(self, client: paho.Client, userdata: Any, message: paho.MQTTMessage) -> None:
        with self.cond:
            self.seen.append((time.monotonic(), json.loads(message.payload)))
            self.cond.notify_all()

    def wait(self, update_id: str, predicate: Any, timeout_s: float = 300) -> float:
        deadline = time.monotonic() + timeout_s
        with self.cond:
            while True:
                for moment, status in self.seen:
                    if status.get("update_id") == update_id and predicate(status):
                        return moment
                if time.monotonic() > deadline:
                    raise TimeoutError(f"no such status for {update_id}: {self.seen[-3:]}")
                self.cond.wait(0.2)


def sample_rss(pid: int, stop: threading.Event, out: list[float]) -> None:
    while not stop.is_set():
        value = rss_mb(pid)
        if value is not None:
            out.append(value)
        time.sleep(0.02)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="8,64", help="model sizes in MB, comma separated")
    parser.add_argument("--chunk-kib", type=int, default=128)
    args = parser.parse_args()
    print(describe_run(), flush=True)
    sizes = [float(s) for s in args.sizes.split(",")]

    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        (root / "broker").mkdir()
        broker = MosquittoBroker(root / "broker")
        broker.start()
        private, public, _ = generate_keypair(root / "ops")
        (root / "models").mkdir()
        build_linear(root / "models" / "lin.onnx", features=4, outputs=2, seed=0)
        config = {
            "device_id": "bench",
            "log_level": "warning",
            "mqtt": {"host": broker.host, "port": broker.port},
            "models_dir": str(root / "models"),
            "state_dir": str(root / "state"),
            "models": {"lin": {}},
            "pipelines": {
                "p": {"model": "lin", "input": {"topic": "in/+"}, "output": {"topic": "out/{1}"}}
            },
            "updates": {"trusted_keys": [str(public)]},
        }
        (root / "agent.yaml").write_text(yaml.safe_dump(config))
        daemon = subprocess.Popen(
            [sys.executable, "-m", "agent", "run", "--config", str(root / "agent.yaml")],
            cwd=REPO,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        steps = Steps()
        mqtt = default_config().mqtt.model_copy(update={"host": broker.host, "port": broker.port})
        client = connect(mqtt, None, [("edge/bench/updates/status", 1)], steps.on_message)
        try:
            time.sleep(3)  # start-up: load, connect, subscribe
            print(
                f"{'model MB':>9} {'chunks':>7} {'send s':>7} {'MB/s':>6} "
                f"{'to SUCCEEDED s':>15} {'RSS before':>11} {'RSS peak in transfer':>21}"
            )
            for version, size in enumerate(sizes, start=2):
                model = build_linear(
                    root / "build" / f"m{version}.onnx",
                    features=4,
                    outputs=2,
                    seed=version,
                    pad_bytes=int(size * 1024 * 1024),
                )
                update = sign_update(
                    model,
                    [private],
                    model="lin",
                    version=version,
                    devices=["bench"],
                    groups=[],
                    expires_in=timedelta(hours=1),
                    url=None,
                    chunk_size=args.chunk_kib * 1024,
                )
                before = rss_mb(daemon.pid) or 0.0
                samples: list[float] = []
                stop = threading.Event()
                sampler = threading.Thread(target=sample_rss, args=(daemon.pid, stop, samples))
                sampler.start()
                started = time.monotonic()
                send_update(client, ["edge/bench"], update, lambda done, total: None)
                sent = time.monotonic()
                steps.wait(update.update_id, lambda s: s.get("step") == "verifying")
                stop.set()
                sampler.join()
                done = steps.wait(
                    update.update_id, lambda s: s["state"] in ("SUCCEEDED", "FAILED", "REJECTED")
                )
                final = next(
                    s for _, s in reversed(steps.seen) if s.get("update_id") == update.update_id
                )
                megabytes = len(update.data) / 1e6
                chunks = -(-len(update.data) // (args.chunk_kib * 1024))
                print(
                    f"{megabytes:9.1f} {chunks:7d} {sent - started:7.2f} "
                    f"{megabytes / (sent - started):6.1f} {done - started:15.2f} "
                    f"{before:11.1f} {max(samples, default=before):21.1f}  {final['state']}"
                )
        finally:
            client.disconnect()
            client.loop_stop()
            daemon.terminate()
            daemon.wait(timeout=10)
            broker.stop()
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
