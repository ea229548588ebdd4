"""Benchmark: the daemon against raw onnxruntime and a hand-written paho + onnxruntime loop.

One command, one run, same models and readings for everyone:

    .venv/bin/python scripts/bench.py [--readings 4000] [--models iforest,mlp,cnn]

It starts a private Mosquitto (set_tcp_nodelay, or Nagle stalls QoS 1 at ~60/s), builds three real
models (an IsolationForest over 64 features via skl2onnx, a small MLP, a 1-D CNN over 1024
samples) and measures for each:

1. raw ``session.run`` throughput, batch 1 and batch 32 (no MQTT at all);
2. the MQTT transport alone (an echo client: no decoding, no inference);
3. the baseline loop (``scripts/baseline_loop.py``: callback -> json -> run -> publish);
4. the daemon (at-least-once, the default) with JSON and with raw payloads;
5. the daemon in plain at-most-once mode with JSON (acknowledged on arrival, like the
   baseline), for the cost of at-least-once;
6. CPU seconds per 1,000 readings at a steady 500/s and 100/s, the daemon (defaults) against
   the baseline loop, medians of 3 alternating windows (``scripts/bench_cpu.py``; skip with
   ``--no-cpu``).

Saturation throughput is readings/s from the first reading sent to the last result
received, all QoS 1. Latency is measured at a fixed 500 readings/s. RSS is each process's
resident memory after its runs. The machine is shared and noisy: compare figures from one
run only.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import paho.mqtt.client as paho
import yaml
from onnx import TensorProto, helper, numpy_helper
from paho.mqtt.enums import CallbackAPIVersion

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench_run import describe_run  # noqa: E402

from agent.procfs import rss_mb  # noqa: E402
from tests.broker import MosquittoBroker, wait_for_port  # noqa: E402
from tests.onnx_builders import IR_VERSION  # noqa: E402

LATENCY_RATE = 500.0
CPU_RATES = [500.0, 100.0]
LATENCY_SECONDS = 4.0


@dataclass
class ModelCase:
    """One benchmark model and its readings."""

    name: str
    path: Path
    inputs: np.ndarray  # [readings, *item shape], float32
    decimals: int = 5  # JSON payloads carry this many decimals

    def json_payload(self, index: int) -> bytes:
        values = np.round(self.inputs[index], self.decimals).tolist()
        return json.dumps({"id": index, "x": values}).encode()

    def raw_payload(self, index: int) -> bytes:
        return bytes(self.inputs[index].astype("<f4").tobytes())


@dataclass
class Row:
    """Figures for one model."""

    model: str
    figures: dict[str, Any] = field(default_factory=dict)


# -- models ----------------------------------------------------------------------------------


def build_models(folder: Path, readings: int, wanted: list[str]) -> list[ModelCase]:
    rng = np.random.default_rng(0)
    cases = []
    if "iforest" in wanted:
        from skl2onnx import to_onnx  # noqa: PLC0415
        from sklearn.ensemble import IsolationForest  # noqa: PLC0415 - heavy, optional

        train = rng.standard_normal((2000, 64)).astype(np.float32)
        forest = IsolationForest(n_estimators=100, random_state=0).fit(train)
        model = to_onnx(forest, train[:1], target_opset={"": 15, "ai.onnx.ml": 3})
        path = folder / "iforest.onnx"
        path.write_bytes(model.SerializeToString())
        cases.append(
            ModelCase("iforest", path, rng.standard_normal((readings, 64)).astype(np.float32))
        )
    if "mlp" in wanted:
        path = folder / "mlp.onnx"
        _save(_mlp(rng), path)
        cases.append(ModelCase("mlp", path, rng.standard_normal((readings, 64)).astype(np.float32)))
    if "cnn" in wanted:
        path = folder / "cnn.onnx"
        _save(_cnn(rng), path)
        cases.append(
            ModelCase(
                "cnn", path, rng.standard_normal((readings, 1, 1024)).astype(np.float32), decimals=4
            )
        )
    return cases


def _save(graph: onnx.GraphProto, path: Path) -> None:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = IR_VERSION
    onnx.save(model, str(path))


def _weights(rng: np.random.Generator, name: str, *shape: int) -> onnx.TensorProto:
    scale = 1.0 / np.sqrt(shape[0] if len(shape) == 2 else np.prod(shape[1:]))
    return numpy_helper.from_array((rng.standard_normal(shape) * scale).astype(np.float32), name)


def _mlp(rng: np.random.Generator) -> onnx.GraphProto:
    """64 -> 128 -> 64 -> 8 with ReLU."""
    return helper.make_graph(
        [
            helper.make_node("Gemm", ["x", "W1", "B1"], ["h1"]),
            helper.make_node("Relu", ["h1"], ["a1"]),
            helper.make_node("Gemm", ["a1", "W2", "B2"], ["h2"]),
            helper.make_node("Relu", ["h2"], ["a2"]),
            helper.make_node("Gemm", ["a2", "W3", "B3"], ["y"]),
        ],
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8])],
        [
            _weights(rng, "W1", 64, 128),
            numpy_helper.from_array(np.zeros(128, np.float32), "B1"),
            _weights(rng, "W2", 128, 64),
            numpy_helper.from_array(np.zeros(64, np.float32), "B2"),
            _weights(rng, "W3", 64, 8),
            numpy_helper.from_array(np.zeros(8, np.float32), "B3"),
        ],
    )


def _cnn(rng: np.random.Generator) -> onnx.GraphProto:
    """1-D CNN over 1024 samples: two strided convolutions, global pooling, 4 scores."""
    return helper.make_graph(
        [
            helper.make_node("Conv", ["x", "K1", "C1"], ["c1"], strides=[4], pads=[4, 4]),
            helper.make_node("Relu", ["c1"], ["r1"]),
            helper.make_node("Conv", ["r1", "K2", "C2"], ["c2"], strides=[4], pads=[4, 4]),
            helper.make_node("Relu", ["c2"], ["r2"]),
            helper.make_node("GlobalAveragePool", ["r2"], ["pooled"]),
            helper.make_node("Flatten", ["pooled"], ["flat"]),
            helper.make_node("Gemm", ["flat", "W", "B"], ["y"]),
        ],
        "cnn1d",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 1024])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
        [
            _weights(rng, "K1", 16, 1, 9),
            numpy_helper.from_array(np.zeros(16, np.float32), "C1"),
            _weights(rng, "K2", 32, 16, 9),
            numpy_helper.from_array(np.zeros(32, np.float32), "C2"),
            _weights(rng, "W", 32, 4),
            numpy_helper.from_array(np.zeros(4, np.float32), "B"),
        ],
    )


# -- raw onnxruntime --------------------------------------------------------------------------


def raw_throughput(case: ModelCase, batch: int, seconds: float = 2.0) -> float:
    """Readings/s of ``session.run`` alone, with batches of ``batch``."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(case.path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    x = case.inputs[:batch]
    session.run(None, {name: x})
    count, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        session.run(None, {name: x})
        count += batch
    return count / (time.perf_counter() - started)


# -- MQTT measurements ------------------------------------------------------------------------


class ResultCounter:
    """Subscribes to results and records when each reading id was answered."""

    def __init__(
        self, broker: MosquittoBroker, topic_filter: str, id_from_order: bool = False
    ) -> None:
        # Raw payloads carry no id. One sender, one topic, QoS 1 and one pipeline worker keep
        # readings in order end to end, so the n-th result answers the n-th reading.
        self.id_from_order = id_from_order
        self.received: dict[int, float] = {}
        # The daemon's own receive-to-publish latency of each result (``latency_ms``).
        self.latencies_ms: list[float] = []
        self._cond = threading.Condition()
        self._subscribed = threading.Event()
        self.client = paho.Client(CallbackAPIVersion.VERSION2)
        self.client.on_connect = lambda c, *a: c.subscribe(topic_filter, qos=1)
        self.client.on_subscribe = lambda *a: self._subscribed.set()
        self.client.on_message = self._on_message
        self.client.on_socket_open = _nodelay
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()
        self._subscribed.wait(10)

    def _on_message(self, client: paho.Client, userdata: Any, message: paho.MQTTMessage) -> None:
        now = time.perf_counter()
        with self._cond:
            if self.id_from_order:
                reading_id = len(self.received)
            else:
                document = json.loads(message.payload)
                reading_id = document.get("id")
                latency = document.get("latency_ms")
                if isinstance(latency, int | float):
                    self.latencies_ms.append(float(latency))
            self.received.setdefault(int(reading_id), now)
            self._cond.notify_all()

    def wait_for(self, count: int, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while len(self.received) < count:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._cond.wait(remaining)
            return True

    def reset(self) -> None:
        with self._cond:
            self.received.clear()
            self.latencies_ms.clear()

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def _nodelay(client: paho.Client, userdata: Any, sock: Any) -> None:
    import socket  # noqa: PLC0415

    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _sender(broker: MosquittoBroker) -> paho.Client:
    client = paho.Client(CallbackAPIVersion.VERSION2)
    client.max_inflight_messages_set(1000)
    client.max_queued_messages_set(0)
    client.on_socket_open = _nodelay
    client.connect(broker.host, broker.port)
    client.loop_start()
    return client


Messages = list[tuple[str, bytes]]  # (topic, payload) per reading, reading id = index


def saturation(broker: MosquittoBroker, results: ResultCounter, messages: Messages) -> float:
    """Send every reading as fast as possible; readings/s until the last result arrived."""
    results.reset()
    sender = _sender(broker)
    started = time.perf_counter()
    for topic, payload in messages:
        sender.publish(topic, payload, qos=1)
    complete = results.wait_for(len(messages), timeout_s=120)
    sender.disconnect()
    sender.loop_stop()
    if not complete:
        return float("nan")
    return len(messages) / (max(results.received.values()) - started)


def latency(
    broker: MosquittoBroker, results: ResultCounter, messages: Messages
) -> tuple[float, float]:
    """p50 and p99 in ms at a fixed LATENCY_RATE."""
    results.reset()
    sender = _sender(broker)
    count = min(len(messages), int(LATENCY_RATE * LATENCY_SECONDS))
    sent: dict[int, float] = {}
    started = time.perf_counter()
    for index in range(count):
        delay = started + index / LATENCY_RATE - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        sent[index] = time.perf_counter()
        sender.publish(*messages[index], qos=1)
    results.wait_for(count, timeout_s=60)
    sender.disconnect()
    sender.loop_stop()
    values = sorted((results.received[i] - sent[i]) * 1000 for i in sent if i in results.received)
    if not values:
        return float("nan"), float("nan")
    return statistics.median(values), values[max(0, int(len(values) * 0.99) - 1)]


def start_process(
    command: list[str], ready: Callable[[], bool], log: Path
) -> subprocess.Popen[bytes]:
    handle = log.open("wb")
    process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while not ready():
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{command[:3]} did not start; see {log}")
        time.sleep(0.05)
    return process


def start_daemon_process(
    broker: MosquittoBroker, config: dict[str, Any], config_file: Path, log: Path
) -> subprocess.Popen[bytes]:
    """Write ``config`` to ``config_file`` and start ``edge-agent run`` with it; returns
    once every model it names is READY (its retained status says so)."""
    config_file.write_text(yaml.safe_dump(config))
    device = config["device_id"]
    watches = [StatusWatch(broker, f"edge/{device}/models/{name}") for name in config["models"]]
    try:
        return start_process(
            [sys.executable, "-m", "agent", "run", "--config", str(config_file)],
            lambda: all(watch.ready() for watch in watches),
            log,
        )
    finally:
        for watch in watches:
            watch.close()


def _printed_ready(log: Path) -> Callable[[], bool]:
    return lambda: log.exists() and "ready" in log.read_text()


def stop_process(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()


def warm(broker: MosquittoBroker, results: ResultCounter, messages: Messages) -> None:
    """200 readings first: the first runs of a session are slow."""
    results.reset()
    sender = _sender(broker)
    for topic, payload in messages[:200]:
        sender.publish(topic, payload, qos=1)
    results.wait_for(200, timeout_s=60)
    sender.disconnect()
    sender.loop_stop()


def measure_target(
    broker: MosquittoBroker, out_filter: str, messages: Messages, id_from_order: bool = False
) -> dict[str, float]:
    """Saturation throughput and latency at LATENCY_RATE of whatever answers on out_filter."""
    results = ResultCounter(broker, out_filter, id_from_order)
    try:
        warm(broker, results, messages)
        throughput = saturation(broker, results, messages)
        p50, p99 = latency(broker, results, messages)
    finally:
        results.close()
    return {"throughput": throughput, "p50": p50, "p99": p99}


def bench_model(case: ModelCase, broker: MosquittoBroker, folder: Path) -> Row:
    row = Row(case.name)
    row.figures["raw_b1"] = raw_throughput(case, 1)
    row.figures["raw_b32"] = raw_throughput(case, 32)
    count = len(case.inputs)
    baseline_messages = [(f"b/{case.name}/in", case.json_payload(i)) for i in range(count)]
    json_messages = [("d/json/s", case.json_payload(i)) for i in range(count)]
    raw_messages = [("d/raw/s", case.raw_payload(i)) for i in range(count)]
    python = sys.executable

    for label, extra in (("transport", ["--echo"]), ("baseline", [])):
        log = folder / f"{case.name}-{label}.log"
        process = start_process(
            [
                python,
                str(REPO / "scripts" / "baseline_loop.py"),
                "--port",
                str(broker.port),
                "--model",
                str(case.path),
                "--input-topic",
                f"b/{case.name}/in",
                "--output-topic",
                f"b/{case.name}/out",
                *extra,
            ],
            _printed_ready(log),
            log,
        )
        try:
            time.sleep(0.5)
            figures = measure_target(broker, f"b/{case.name}/out", baseline_messages)
            row.figures[f"{label}_sat"] = figures["throughput"]
            if label == "baseline":
                row.figures["baseline_p50"] = figures["p50"]
                row.figures["baseline_p99"] = figures["p99"]
                row.figures["baseline_rss"] = rss_mb(process.pid) or float("nan")
        finally:
            stop_process(process)

    models_dir = folder / f"models-{case.name}"
    models_dir.mkdir()
    (models_dir / "m.onnx").write_bytes(case.path.read_bytes())
    # Plain (at-most-once: acknowledged on arrival, as the baseline loop does) first, then
    # the default at-least-once, in the same run so their ratio means something.
    plain = run_daemon(case, broker, folder, models_dir, "at_most_once", {"json": json_messages})
    row.figures["plain_json_sat"] = plain["json_sat"]
    row.figures["plain_rss"] = plain["json_rss"]
    durable = run_daemon(
        case,
        broker,
        folder,
        models_dir,
        "at_least_once",
        {"json": json_messages, "raw": raw_messages},
    )
    row.figures["daemon_json_sat"] = durable["json_sat"]
    row.figures["daemon_p50"] = durable["json_p50"]
    row.figures["daemon_p99"] = durable["json_p99"]
    row.figures["daemon_rss"] = durable["json_rss"]
    row.figures["daemon_raw_sat"] = durable["raw_sat"]
    row.figures["daemon_raw_p50"] = durable["raw_p50"]
    row.figures["daemon_rss_after_raw"] = durable["raw_rss"]
    return row


def run_daemon(  # noqa: PLR0917
    case: ModelCase,
    broker: MosquittoBroker,
    folder: Path,
    models_dir: Path,
    delivery: str,
    runs: dict[str, Messages],
) -> dict[str, float]:
    """Start the daemon in ``delivery`` mode and measure each payload format in ``runs``."""
    item_shape = list(case.inputs.shape[1:])
    device = f"bench-{case.name}-{delivery}"
    config = {
        "device_id": device,
        "log_level": "warning",
        "delivery": delivery,
        "mqtt": {"host": broker.host, "port": broker.port},
        "models_dir": str(models_dir),
        "state_dir": str(folder / f"state-{device}"),
        "models": {"m": {}},
        "pipelines": {
            "json": {
                "model": "m",
                "input": {"topic": "d/json/+", "field": "x"},
                "output": {"topic": "d/out/json/{1}"},
                "batching": {"max_batch": 64, "max_delay_ms": 2},
                "queue": {"max": 100_000},
            },
            "raw": {
                "model": "m",
                "input": {"topic": "d/raw/+", "format": "raw", "shape": item_shape},
                "output": {"topic": "d/out/raw/{1}"},
                "batching": {"max_batch": 64, "max_delay_ms": 2},
                "queue": {"max": 100_000},
            },
        },
    }
    process = start_daemon_process(
        broker, config, folder / f"daemon-{device}.yaml", folder / f"{device}.log"
    )
    figures: dict[str, float] = {}
    try:
        time.sleep(0.5)
        for name, messages in runs.items():
            measured = measure_target(
                broker, f"d/out/{name}/#", messages, id_from_order=name == "raw"
            )
            figures[f"{name}_sat"] = measured["throughput"]
            figures[f"{name}_p50"] = measured["p50"]
            figures[f"{name}_p99"] = measured["p99"]
            # After the same work as the baseline's figure (JSON), then after raw too.
            figures[f"{name}_rss"] = rss_mb(process.pid) or float("nan")
    finally:
        stop_process(process)
    return figures


class StatusWatch:
    """Knows when the daemon's model is READY."""

    def __init__(self, broker: MosquittoBroker, topic: str) -> None:
        self._ready = threading.Event()
        self.client = paho.Client(CallbackAPIVersion.VERSION2)
        self.client.on_connect = lambda c, *a: c.subscribe(topic, qos=1)
        self.client.on_message = self._on_message
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()

    def _on_message(self, client: paho.Client, userdata: Any, message: paho.MQTTMessage) -> None:
        if json.loads(message.payload).get("state") == "READY":
            self._ready.set()

    def ready(self) -> bool:
        return self._ready.is_set()

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


# -- report -----------------------------------------------------------------------------------


def report(rows: list[Row]) -> str:
    header = (
        "| model | raw b1 /s | raw b32 /s | transport /s | baseline /s | daemon json /s "
        "| daemon raw /s | json/baseline | raw/baseline | p50/p99 ms baseline "
        "| p50/p99 ms daemon json | p50 ms daemon raw | RSS MB baseline | RSS MB daemon "
        "(json / +raw) | plain json /s | at-least-once/plain | RSS MB plain |"
    )
    lines = [header, "|---" * (header.count("|") - 1) + "|"]
    for row in rows:
        f = row.figures
        base = f["baseline_sat"]
        lines.append(
            f"| {row.model} | {f['raw_b1']:,.0f} | {f['raw_b32']:,.0f} | "
            f"{f['transport_sat']:,.0f} | {base:,.0f} | {f['daemon_json_sat']:,.0f} | "
            f"{f['daemon_raw_sat']:,.0f} | {f['daemon_json_sat'] / base:.2f}x | "
            f"{f['daemon_raw_sat'] / base:.2f}x | {f['baseline_p50']:.2f} / "
            f"{f['baseline_p99']:.2f} | {f['daemon_p50']:.2f} / {f['daemon_p99']:.2f} | "
            f"{f['daemon_raw_p50']:.2f} | {f['baseline_rss']:.0f} | {f['daemon_rss']:.0f} / "
            f"{f['daemon_rss_after_raw']:.0f} | {f['plain_json_sat']:,.0f} | "
            f"{f['daemon_json_sat'] / f['plain_json_sat']:.2f}x | {f['plain_rss']:.0f} |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description="edge-agent benchmark")
    parser.add_argument("--readings", type=int, default=4000)
    parser.add_argument("--models", default="iforest,mlp,cnn")
    parser.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    parser.add_argument("--no-cpu", action="store_true", help="skip the CPU-per-reading runs")
    args = parser.parse_args()
    cpu_rows: list[tuple[str, dict[str, float]]] = []
    print(describe_run(), flush=True)
    with tempfile.TemporaryDirectory(prefix="edge-agent-bench-") as temp:
        folder = Path(temp)
        (folder / "broker").mkdir()
        broker = MosquittoBroker(
            folder / "broker",
            extra_lines=("max_inflight_messages 1000", "max_queued_messages 1000000"),
        )
        broker.start()
        wait_for_port(broker.port)
        rows = []
        try:
            for case in build_models(folder, args.readings, args.models.split(",")):
                print(f"benchmarking {case.name} ...", flush=True)
                rows.append(bench_model(case, broker, folder))
                if not args.no_cpu:
                    from bench_cpu import bench_case  # noqa: PLC0415 - it imports this module

                    cpu = bench_case(case, broker, folder, CPU_RATES, runs=3)
                    cpu_rows.append((case.name, cpu))
                    rows[-1].figures.update(cpu)
        finally:
            broker.stop()
    print(
        f"\n{os.cpu_count()} CPUs, {args.readings} readings per run, QoS 1, "
        f"latency at {LATENCY_RATE:.0f} readings/s\n"
    )
    print(report(rows))
    if cpu_rows:
        from bench_cpu import table  # noqa: PLC0415

        print("\nCPU per reading at a steady rate (medians of 3 alternating windows):\n")
        print(table(cpu_rows, CPU_RATES))
    if args.json:
        Path(args.json).write_text(
            json.dumps([{"model": r.model, **r.figures} for r in rows], indent=2)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
