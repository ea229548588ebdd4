"""End-to-end check of the daemon running as another process (under QEMU for aarch64).

Used by scripts/aarch64-smoke.sh. ``--python`` is the command that runs the target Python
(for example ``unshare ... qemu-aarch64-static -L SYSROOT SYSROOT/usr/bin/python3.11``):
the daemon runs with it against a native Mosquitto, and its results for one reading per
payload format are compared with this (x86-64) machine's onnxruntime on the same readings.
Then a hot reload, ``edge-agent detect`` on the Raspberry Pi 4 fixture, and a SIGTERM.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.broker import MosquittoBroker, Recorder, publisher  # noqa: E402
from tests.onnx_builders import build_linear  # noqa: E402


def fail(message: str) -> None:
    print(f"aarch64 check FAILED: {message}", flush=True)
    raise SystemExit(1)


def wait_for(condition: Any, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            fail(f"timed out waiting for {what}")
        time.sleep(0.1)


def log_events(path: Path) -> list[dict[str, Any]]:
    events = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            events.append(json.loads(line))
        except ValueError:
            continue
    return events


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--python", required=True, help="command running the target Python")
    parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--timeout", type=float, default=180.0)
    args = parser.parse_args()
    target = shlex.split(args.python)
    env = {**os.environ, **dict(item.split("=", 1) for item in args.env)}

    with tempfile.TemporaryDirectory(prefix="edge-agent-aarch64-") as temp:
        folder = Path(temp)
        (folder / "broker").mkdir()
        broker = MosquittoBroker(folder / "broker")
        broker.start()
        try:
            return run_checks(folder, broker, target, env, args.timeout)
        finally:
            broker.stop()


@dataclass
class Run:
    """One emulated daemon and what the checks share."""

    folder: Path
    broker: MosquittoBroker
    target: list[str]
    env: dict[str, str]
    timeout_s: float
    rec: Recorder
    daemon: subprocess.Popen[bytes]
    log_path: Path


def run_checks(
    folder: Path, broker: MosquittoBroker, target: list[str], env: dict[str, str], timeout_s: float
) -> int:
    started = time.monotonic()
    models = folder / "models"
    first = build_linear(models / "lin.onnx", features=4, outputs=2, seed=0)
    second = build_linear(folder / "second.onnx", features=4, outputs=2, seed=1)
    run = start_daemon(folder, broker, target, env, timeout_s)
    try:
        check_start(run)
        check_formats(run, first)
        check_reload(run, models, second)
        check_stop(run)
    finally:
        run.rec.stop()
        if run.daemon.poll() is None:
            run.daemon.kill()
    check_detect(target, env, timeout_s)
    print(f"aarch64 check passed in {time.monotonic() - started:.0f} s")
    return 0


def start_daemon(
    folder: Path, broker: MosquittoBroker, target: list[str], env: dict[str, str], timeout_s: float
) -> Run:
    config = {
        "device_id": "arm1",
        "log_level": "info",
        "mqtt": {"host": broker.host, "port": broker.port},
        "models_dir": str(folder / "models"),
        "state_dir": str(folder / "state"),
        "models": {"lin": {}},
        "health": {"interval_s": 2},
        "pipelines": {
            "json": {
                "model": "lin",
                "input": {"topic": "in/json/+", "field": "x"},
                "output": {"topic": "out/json/{1}"},
            },
            "raw": {
                "model": "lin",
                "input": {"topic": "in/raw/+", "format": "raw", "dtype": "float32", "shape": [4]},
                "output": {"topic": "out/raw/{1}"},
            },
            "npy": {
                "model": "lin",
                "input": {"topic": "in/npy/+", "format": "npy"},
                "output": {"topic": "out/npy/{1}"},
            },
        },
    }
    config_file = folder / "agent.yaml"
    config_file.write_text(yaml.safe_dump(config))
    log_path = folder / "agent.log"
    rec = Recorder(broker, ["out/#", "edge/arm1/#"]).start()
    with log_path.open("wb") as log_file:
        daemon = subprocess.Popen(
            [*target, "-m", "agent", "run", "--config", str(config_file), "--log-format", "json"],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=folder,
        )
    return Run(folder, broker, target, env, timeout_s, rec, daemon, log_path)


def check_start(run: Run) -> None:
    wait_for(
        lambda: (
            any(e.get("event") == "agent_serving" for e in log_events(run.log_path))
            or run.daemon.poll() is not None
        ),
        run.timeout_s,
        "the emulated daemon to serve",
    )
    if run.daemon.poll() is not None:
        fail(f"the daemon exited with {run.daemon.returncode}:\n{run.log_path.read_text()}")
    events = log_events(run.log_path)
    starting = next(e for e in events if e.get("event") == "agent_starting")
    hardware = next(e for e in events if e.get("event") == "hardware_detected")
    print(
        f"inside the emulated process: machine={starting.get('machine')}, python "
        f"{starting.get('python')}, onnxruntime {starting.get('onnxruntime')}; "
        f"hardware: {hardware.get('summary')}",
        flush=True,
    )
    if starting.get("machine") != "aarch64":
        fail(f"platform.machine() is {starting.get('machine')!r}, not 'aarch64'")


READINGS = np.array(
    [[0.5, -1.0, 2.0, 3.25], [1.5, 0.25, -0.75, 4.0], [-2.0, 1.0, 0.5, 0.0]], dtype=np.float32
)


def check_formats(run: Run, model: Path) -> None:
    """One reading per payload format; results equal x86-64 onnxruntime's."""
    client = publisher(run.broker)
    client.publish("in/json/a", json.dumps({"id": "j", "x": READINGS[0].tolist()}), qos=1)
    client.publish("in/raw/b", READINGS[1].astype("<f4").tobytes(), qos=1)
    buffer = io.BytesIO()
    np.save(buffer, READINGS[2])
    client.publish("in/npy/c", buffer.getvalue(), qos=1)
    wait_for(
        lambda: len([m for m in run.rec.messages if m.topic.startswith("out/")]) >= 3,
        run.timeout_s,
        "results of the three formats",
    )
    client.loop_stop()
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    expected = session.run(None, {"x": READINGS})[0]
    for index, topic in enumerate(("out/json/a", "out/raw/b", "out/npy/c")):
        got = np.array(json.loads(run.rec.on(topic)[0].payload)["outputs"]["y"])
        if not np.allclose(got, expected[index], rtol=1e-5, atol=1e-6):
            fail(f"{topic}: aarch64 gave {got}, x86-64 gives {expected[index]}")
        print(f"{topic}: {got.round(5).tolist()} == x86-64 {expected[index].round(5)}")


def check_reload(run: Run, models: Path, second: Path) -> None:
    """A new file renamed into place is served."""
    new_version = "sha256:" + hashlib.sha256(second.read_bytes()).hexdigest()
    temp = models / "lin.onnx.tmp"
    temp.write_bytes(second.read_bytes())
    os.replace(temp, models / "lin.onnx")
    wait_for(
        lambda: any(
            json.loads(m.payload).get("version") == new_version
            for m in run.rec.on("edge/arm1/models/lin")
        ),
        run.timeout_s,
        "the hot reload",
    )
    client = publisher(run.broker)
    client.publish("in/json/d", json.dumps({"id": "k", "x": READINGS[0].tolist()}), qos=1)
    wait_for(lambda: bool(run.rec.on("out/json/d")), run.timeout_s, "a result after reload")
    client.loop_stop()
    after = json.loads(run.rec.on("out/json/d")[0].payload)
    reloaded = ort.InferenceSession(str(second), providers=["CPUExecutionProvider"])
    if after["version"] != new_version or not np.allclose(
        after["outputs"]["y"], reloaded.run(None, {"x": READINGS[:1]})[0][0], rtol=1e-5
    ):
        fail(f"after the reload: {after}")
    print(f"hot reload: results now from {new_version[:19]}")


def check_stop(run: Run) -> None:
    """SIGTERM: exit 0 and 'offline'."""
    run.daemon.send_signal(signal.SIGTERM)
    code = run.daemon.wait(timeout=60)
    if code != 0:
        fail(f"SIGTERM: exit code {code}")
    wait_for(
        lambda: any(m.payload == b"offline" for m in run.rec.on("edge/arm1/status")),
        30,
        "'offline' after SIGTERM",
    )
    print("SIGTERM: exit 0, offline published")


def check_detect(target: list[str], env: dict[str, str], timeout_s: float) -> None:
    """`edge-agent detect` on the Raspberry Pi 4 fixture: a Pi, CPU only, 4 threads."""
    fixture = REPO / "tests" / "fixtures" / "hw" / "raspberry-pi-4"
    done = subprocess.run(
        [*target, "-m", "agent", "detect", "--json", "--root", str(fixture)],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout_s,
        check=False,
    )
    if done.returncode != 0:
        fail(f"detect: {done.stderr}")
    report = json.loads(done.stdout)
    if (
        report["hardware"]["board"] != "raspberry-pi"
        or report["hardware"]["machine"] != "aarch64"
        or [c["name"] for c in report["chosen"]] != ["CPUExecutionProvider"]
        or report["session"]["intra_op_num_threads"] != 4
    ):
        fail(f"detect on the Raspberry Pi 4 fixture: {json.dumps(report)[:800]}")
    print(
        f"detect: {report['hardware']['summary']}, CPU with "
        f"{report['session']['intra_op_num_threads']} threads"
    )


if __name__ == "__main__":
    sys.exit(main())
