"""`make demo`: a generated model, the daemon, a simulated vibration sensor, results printed.

Uses the Mosquitto already answering on 127.0.0.1:1883, or starts a private one there.
Ctrl-C stops the sensor, then the daemon (SIGTERM, as systemd would), then that broker.
"""

from __future__ import annotations

import json
import math
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.onnx_builders import build_vibration_scorer  # noqa: E402

RUN_DIR = REPO / "demo-run"
CONFIG = REPO / "config" / "demo.yaml"
HOST, PORT = "127.0.0.1", 1883
SENSORS = ("pump-1", "fan-2")
RATE_HZ = 4.0
SAMPLES = 64


def broker_answers() -> bool:
    try:
        with socket.create_connection((HOST, PORT), timeout=0.5):
            return True
    except OSError:
        return False


def start_broker() -> subprocess.Popen[bytes] | None:
    if broker_answers():
        print(f"using the MQTT broker already on {HOST}:{PORT}")
        return None
    binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    if not Path(binary).exists():
        sys.exit("no MQTT broker on 127.0.0.1:1883 and mosquitto is not installed: "
                 "sudo apt-get install -y mosquitto")
    conf = RUN_DIR / "mosquitto.conf"
    conf.write_text(f"listener {PORT} {HOST}\nallow_anonymous true\nset_tcp_nodelay true\n")
    process = subprocess.Popen([binary, "-c", str(conf)], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    for _ in range(100):
        if broker_answers():
            print(f"started a private mosquitto on {HOST}:{PORT}")
            return process
        time.sleep(0.05)
    process.kill()
    sys.exit("mosquitto did not start")


def window(rng: np.random.Generator, t: float, anomalous: bool) -> list[float]:
    """64 samples of a 50 Hz vibration with noise; an anomaly triples the amplitude."""
    phase = np.linspace(0, 2 * math.pi * 4, SAMPLES) + t
    amplitude = 3.5 if anomalous else 1.0
    samples = amplitude * np.sin(phase) + 0.1 * rng.standard_normal(SAMPLES)
    return [round(float(v), 4) for v in samples]


def run_sensor(stop: threading.Event) -> None:
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id="demo-sensor")
    client.connect(HOST, PORT)
    client.loop_start()
    rng = np.random.default_rng(7)
    reading = 0
    while not stop.wait(1.0 / RATE_HZ):
        for sensor in SENSORS:
            anomalous = sensor == "fan-2" and reading % 20 >= 17
            payload = {"id": f"{sensor}-{reading}", "x": window(rng, reading / 3, anomalous)}
            client.publish(f"demo/sensors/{sensor}/vib", json.dumps(payload), qos=1)
        reading += 1
    client.disconnect()
    client.loop_stop()


def print_results() -> paho.Client:
    def on_connect(client: paho.Client, userdata: Any, flags: Any, reason: Any,
                   properties: Any) -> None:
        client.subscribe([("demo/results/+/vib", 1), ("edge/demo/errors", 0),
                          ("edge/demo/models/+", 0)])

    def on_message(client: paho.Client, userdata: Any, message: paho.MQTTMessage) -> None:
        data = json.loads(message.payload)
        if "/models/" in message.topic:
            print(f"model {data['name']}: {data['state']} {data.get('version') or ''} "
                  f"{data.get('error') or ''}")
        elif message.topic.endswith("/errors"):
            print(f"error {data['pipeline']} {data['topic']}: {data['reason']}")
        else:
            sensor = message.topic.split("/")[2]
            rms = data["outputs"]["rms"][0]
            anomaly = data["outputs"]["anomaly"][0]
            flag = "  <-- ANOMALY" if anomaly > 0.5 else ""
            print(f"{sensor:7} {data['id']:>11}  rms={rms:5.2f}  anomaly={anomaly:4.2f}  "
                  f"latency={data['latency_ms']:5.2f} ms  {data['version'][:15]}{flag}")

    client = paho.Client(CallbackAPIVersion.VERSION2, client_id="demo-results")
    client.on_connect = on_connect
    client.on_message = on_message
    client.connect(HOST, PORT)
    client.loop_start()
    return client


def main() -> int:
    RUN_DIR.mkdir(exist_ok=True)
    model = RUN_DIR / "models" / "vibration.onnx"
    if not model.exists():
        build_vibration_scorer(model, samples=SAMPLES)
        print(f"generated the demo model {model.relative_to(REPO)}")
    broker = start_broker()
    log_path = RUN_DIR / "agent.log"
    with log_path.open("wb") as log_file:
        agent = subprocess.Popen(
            [sys.executable, "-m", "agent", "run", "--config", str(CONFIG),
             "--log-format", "console"], stdout=log_file, stderr=subprocess.STDOUT)
    print(f"edge-agent started (pid {agent.pid}); its log: {log_path.relative_to(REPO)}")
    results = print_results()
    stop = threading.Event()
    sensor = threading.Thread(target=run_sensor, args=(stop,), daemon=True)
    sensor.start()
    print("simulated sensors publishing; Ctrl-C to stop\n")
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        while not stop.is_set() and agent.poll() is None:
            time.sleep(0.2)
    except KeyboardInterrupt:
        pass
    stop.set()
    sensor.join(timeout=2)
    code = agent.poll()
    if code is None:
        agent.send_signal(signal.SIGTERM)
        started = time.monotonic()
        code = agent.wait(timeout=10)
        print(f"\nedge-agent stopped with exit code {code} in "
              f"{time.monotonic() - started:.2f} s")
    else:
        print(f"\nedge-agent exited early with code {code}; see {log_path}")
    results.disconnect()
    results.loop_stop()
    if broker is not None:
        broker.terminate()
        broker.wait(timeout=5)
    return 0 if code == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
