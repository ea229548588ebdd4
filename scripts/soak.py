"""Soak: the daemon under a load that varies for a long time; does its memory stay flat?

    .venv/bin/python scripts/soak.py --duration 3600 [--sample-s 20] [--warmup-s 600]

A private Mosquitto, the daemon with its defaults (at-least-once, QoS 1) and two pipelines:
an MLP (cheap: one reading per run while quiet, batched in bursts) and an IsolationForest
(expensive per call: batches form). The load repeats a one-minute cycle: quiet (5/s),
normal (200/s), a burst (2,000/s), normal, a bigger burst (3,000/s), quiet, so batch sizes
vary from 1 to ``max_batch``; ``--bursts 800,1200`` sets the two bursts' rates (per
pipeline) to what a smaller device absorbs: a backlog that outlasts the cycle grows the
queue, and RSS with it, which is load, not a leak (the highest queue depth seen after
warm-up is printed to tell them apart). Every reading is sent with QoS 1 and must be
answered exactly once. The daemon's RSS is sampled every ``--sample-s``; after
``--warmup-s`` a least-squares line through the samples gives the growth in MB/hour.

Prints readings sent, results, lost, errors reported, RSS first/last/max after warm-up, the
slope, and the thread count first/last. Exit status 0 when nothing was lost and no error
reported.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

from bench import _nodelay, _sender, build_models, start_daemon_process, stop_process  # noqa: E402
from bench_cpu import start_broker  # noqa: E402
from bench_run import describe_run  # noqa: E402

from agent.procfs import rss_mb  # noqa: E402
from tests.broker import MosquittoBroker  # noqa: E402


def queue_depth(health: dict[str, Any]) -> int:
    """Readings waiting in every pipeline's queue, from a P/health document."""
    return sum(int(p.get("queue_depth") or 0) for p in health.get("pipelines", {}).values())


def cycle(bursts: tuple[float, float]) -> tuple[tuple[float, float], ...]:
    """(seconds, readings/s per pipeline): one minute of the load."""
    return ((10, 5.0), (15, 200.0), (5, bursts[0]), (10, 200.0), (5, bursts[1]), (15, 5.0))


class Answers:
    """Counts results per reading id and errors, from the daemon's topics."""

    def __init__(self, port: int, device: str) -> None:
        self.results: dict[str, dict[int, int]] = {"mlp": {}, "iforest": {}}
        self.errors: list[str] = []
        self.health: dict[str, Any] = {}  # the daemon's latest P/health
        # (seconds into the run, readings waiting in all queues), at each RSS sample
        self.queue_depths: list[tuple[float, int]] = []
        self._lock = threading.Lock()
        self._client = paho.Client(CallbackAPIVersion.VERSION2)
        self._device = device
        self._client.on_connect = self._on_connect
        self._client.on_message = self._on_message
        self._client.on_socket_open = _nodelay
        self._client.connect("127.0.0.1", port)
        self._client.loop_start()

    def _on_connect(self, client: paho.Client, *args: Any) -> None:
        client.subscribe(
            [
                ("soak/out/#", 1),
                (f"edge/{self._device}/errors", 1),
                (f"edge/{self._device}/health", 0),
            ]
        )

    def _on_message(self, client: paho.Client, userdata: Any, message: paho.MQTTMessage) -> None:
        if message.topic.endswith("/health"):
            self.health = json.loads(message.payload)
            return
        if "/errors" in message.topic:
            with self._lock:
                self.errors.append(message.payload.decode(errors="replace")[:300])
            return
        pipeline = message.topic.split("/")[2]
        reading = int(json.loads(message.payload)["id"])
        with self._lock:
            counts = self.results[pipeline]
            counts[reading] = counts.get(reading, 0) + 1

    def answered(self) -> int:
        """Results received so far (duplicates included)."""
        with self._lock:
            return sum(sum(c.values()) for c in self.results.values())

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()


def daemon_config(folder: Path, port: int, device: str) -> dict[str, Any]:
    """Default settings apart from the broker, the folders and the two pipelines."""
    return {
        "device_id": device,
        "log_level": "warning",
        "mqtt": {"host": "127.0.0.1", "port": port},
        "models_dir": str(folder / "models"),
        "state_dir": str(folder / "state"),
        "models": {"mlp": {}, "iforest": {}},
        "pipelines": {
            name: {
                "model": name,
                "input": {"topic": f"soak/in/{name}/+", "field": "x"},
                "output": {"topic": f"soak/out/{name}/{{1}}"},
                "queue": {"max": 100_000},
            }
            for name in ("mlp", "iforest")
        },
    }


def fit_mb_per_hour(samples: list[tuple[float, float]]) -> float:
    """Least-squares slope of (seconds, MB) samples, in MB/hour."""
    if len(samples) < 2:
        return float("nan")
    t = np.array([s[0] for s in samples])
    m = np.array([s[1] for s in samples])
    slope = np.polyfit(t, m, 1)[0]
    return float(slope * 3600)


def thread_count(pid: int) -> int:
    """Threads of ``pid`` now."""
    return len(list(Path(f"/proc/{pid}/task").iterdir()))


def send_load(  # noqa: PLR0917
    sender: paho.Client,
    payloads: dict[str, list[bytes]],
    duration_s: float,
    started: float,
    samples: list[tuple[float, float]],
    pid: int,
    sample_s: float,
    phases: tuple[tuple[float, float], ...],
    answers: Answers,
) -> int:
    """Send the cycle until ``duration_s``; sample RSS on the way; readings sent per pipeline.
    ``payloads``: per pipeline, the JSON arrays of the readings' values."""
    sent = 0
    next_sample = started
    while time.monotonic() - started < duration_s:
        for seconds, rate in phases:
            phase_start = time.monotonic()
            index = 0
            while True:
                now = time.monotonic()
                if now >= next_sample:
                    samples.append((now - started, rss_mb(pid) or float("nan")))
                    answers.queue_depths.append((now - started, queue_depth(answers.health)))
                    next_sample += sample_s
                elapsed = now - phase_start
                if elapsed >= seconds or now - started >= duration_s:
                    break
                due = int(elapsed * rate) + 1
                while index < due:
                    for name, items in payloads.items():
                        reading = sent + index
                        values = items[reading % len(items)]
                        payload = b'{"id": %d, "x": %s}' % (reading, values)
                        sender.publish(f"soak/in/{name}/s{reading % 8}", payload, qos=1)
                    index += 1
                time.sleep(0.002)
            sent += index
            if time.monotonic() - started >= duration_s:
                break
    return sent


def main() -> int:
    parser = argparse.ArgumentParser(description="edge-agent soak")
    parser.add_argument("--duration", type=float, default=3600.0, help="seconds of load")
    parser.add_argument("--sample-s", type=float, default=20.0)
    parser.add_argument("--warmup-s", type=float, help="default: a sixth of the duration")
    parser.add_argument(
        "--bursts", default="2000,3000", help="the two bursts' readings/s per pipeline"
    )
    args = parser.parse_args()
    warmup = args.warmup_s if args.warmup_s is not None else args.duration / 6
    print(describe_run(), flush=True)
    device = "soak"
    with tempfile.TemporaryDirectory(prefix="edge-agent-soak-") as temp:
        folder = Path(temp)
        broker = start_broker(folder)
        try:
            (folder / "models").mkdir()
            payloads: dict[str, list[bytes]] = {}
            for case in build_models(folder, 256, ["mlp", "iforest"]):
                (folder / "models" / f"{case.name}.onnx").write_bytes(case.path.read_bytes())
                payloads[case.name] = [
                    json.dumps(np.round(row, 5).tolist()).encode() for row in case.inputs
                ]
            answers = Answers(broker.port, device)
            process = start_daemon_process(
                broker,
                daemon_config(folder, broker.port, device),
                folder / "soak.yaml",
                folder / "daemon.log",
            )
            try:
                return soak(process.pid, broker, payloads, answers, args, warmup)
            finally:
                stop_process(process)
                answers.close()
        finally:
            broker.stop()


def soak(  # noqa: PLR0917
    pid: int,
    broker: MosquittoBroker,
    payloads: dict[str, list[bytes]],
    answers: Answers,
    args: argparse.Namespace,
    warmup: float,
) -> int:
    """Run the load, then report; 0 when every reading was answered once and none failed."""
    threads_first = thread_count(pid)
    sender = _sender(broker)
    samples: list[tuple[float, float]] = []
    started = time.monotonic()
    bursts = tuple(float(rate) for rate in args.bursts.split(","))
    if len(bursts) != 2:
        raise SystemExit("--bursts takes two rates, e.g. 2000,3000")
    sent = send_load(
        sender,
        payloads,
        args.duration,
        started,
        samples,
        pid,
        args.sample_s,
        cycle((bursts[0], bursts[1])),
        answers,
    )
    expected = sent * len(payloads)
    deadline = time.monotonic() + 120
    while answers.answered() < expected and time.monotonic() < deadline:
        time.sleep(0.5)
    time.sleep(1.0)  # room for a duplicate to show up
    samples.append((time.monotonic() - started, rss_mb(pid) or float("nan")))
    sender.disconnect()
    sender.loop_stop()
    lost = sum(
        1 for counts in answers.results.values() for i in range(sent) if counts.get(i, 0) == 0
    )
    duplicates = sum(n - 1 for counts in answers.results.values() for n in counts.values() if n > 1)
    after = [s for s in samples if s[0] >= warmup] or samples
    rss = [m for _, m in after]
    print(
        f"\n{args.duration:.0f} s, {expected:,} readings sent ({sent:,} per pipeline), "
        f"{answers.answered():,} results, lost {lost}, duplicates {duplicates}, "
        f"errors {len(answers.errors)}"
    )
    print(
        f"RSS after {warmup:.0f} s warm-up: first {rss[0]:.1f} MB, last {rss[-1]:.1f} MB, "
        f"max {max(rss):.1f} MB; slope {fit_mb_per_hour(after):+.2f} MB/hour "
        f"({len(after)} samples every {args.sample_s:.0f} s); whole run: first "
        f"{samples[0][1]:.1f} MB, max {max(m for _, m in samples):.1f} MB"
    )
    depths = [depth for at, depth in answers.queue_depths if at >= warmup]
    print(f"highest queue depth in health after warm-up: {max(depths, default=0)}")
    print(f"threads: {threads_first} at start, {thread_count(pid)} at the end")
    for name, figures in answers.health.get("pipelines", {}).items():
        counted = {k: figures.get(k) for k in ("received", "processed", "dropped", "errors")}
        print(f"pipeline {name}: {counted}, queue {figures.get('queue_depth')}")
    for error in answers.errors[:5]:
        print(f"error: {error}")
    return 0 if lost == 0 and not answers.errors else 1


if __name__ == "__main__":
    sys.exit(main())
