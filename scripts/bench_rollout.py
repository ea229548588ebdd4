"""Rollout benchmark at fleet scale: ``publish-update --waves`` against simulated devices.

Starts a private Mosquitto and ``scripts/fleet_sim.py``'s devices (default 10,000 over 4
connections), then runs the real command as a process, twice: a fleet where few devices
fail (the rollout completes; the failed and silent ones are reported) and one where many
fail (the abort rule stops it in an early wave). Prints for each: wall time, the command's
peak RSS, the broker's peak RSS, and the PUBLISH messages the broker received and sent.
Then ``status --group`` lists the fleet, timed.

    .venv/bin/python scripts/bench_rollout.py [--devices 10000] [--source https|mqtt]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

from bench_run import describe_run  # noqa: E402
from fleet_sim import SimulatedFleet  # noqa: E402

from agent.cli.tool_client import connect  # noqa: E402
from agent.config.loader import default_config  # noqa: E402
from agent.updates.signing import generate_keypair  # noqa: E402
from tests.broker import MosquittoBroker  # noqa: E402
from tests.onnx_builders import build_linear  # noqa: E402

PUBLISH_COUNTERS = (
    "$SYS/broker/publish/messages/received",
    "$SYS/broker/publish/messages/sent",
)


class BrokerCounters:
    """The broker's $SYS publish counters (paho's network thread writes, main reads)."""

    def __init__(self) -> None:
        self.values: dict[str, int] = {}
        self._lock = threading.Lock()

    def on_message(self, client: paho.Client, userdata: Any, message: paho.MQTTMessage) -> None:
        try:
            value = int(message.payload)
        except ValueError:
            return
        with self._lock:
            self.values[message.topic] = value

    def read(self, wait_s: float = 1.5) -> tuple[int, int]:
        """(received, sent) after the broker's next $SYS refresh (``sys_interval 1``)."""
        time.sleep(wait_s)
        with self._lock:
            return tuple(self.values.get(t, 0) for t in PUBLISH_COUNTERS)  # type: ignore[return-value]


def peak_rss_mb(pid: int) -> float:
    """VmHWM (the peak resident set) of a running process, in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def run_command(command: list[str], cwd: Path) -> tuple[int, float, float, str]:
    """Run ``command``; returns (exit code, wall seconds, peak RSS MB, stdout).

    The peak is the child's own VmHWM, read every 0.1 s while it runs: ``ru_maxrss`` from
    ``wait4`` would include this (large) process, which the child was forked from."""
    started = time.monotonic()
    process = subprocess.Popen(command, cwd=cwd, stdout=subprocess.PIPE, text=True)
    peak = [0.0]

    def sample() -> None:
        while process.poll() is None:
            try:
                peak[0] = max(peak[0], peak_rss_mb(process.pid))
            except OSError:
                return
            time.sleep(0.1)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    output, _ = process.communicate()
    sampler.join()
    return process.returncode, time.monotonic() - started, peak[0], output


def rollout(
    root: Path,
    broker: MosquittoBroker,
    counters: BrokerCounters,
    args: argparse.Namespace,
    *,
    fail: float,
    silent: float,
    version: int,
    label: str,
) -> None:
    fleet = SimulatedFleet(
        broker.host,
        broker.port,
        devices=args.devices,
        connections=args.connections,
        fail=fail,
        silent=silent,
        install_s=args.install_s,
    )
    started = time.monotonic()
    fleet.start()
    print(
        f"\n{label}: {args.devices} simulated devices up in {time.monotonic() - started:.1f} s, "
        f"fates {fleet.counts()}",
        flush=True,
    )
    try:
        before = counters.read()
        source = (
            ["--url", f"https://updates.example.com/lin-v{version}.onnx"]
            if args.source == "https"
            else []
        )
        report = root / f"report-{version}.json"
        command = [
            sys.executable, "-m", "agent", "publish-update", str(root / "m.onnx"),
            "--key", str(root / "ops.key"), "--model", "lin", "--version", str(version),
            "--group", "sim", "--host", broker.host, "--port", str(broker.port),
            "--waves", args.waves, "--wave-wait", args.wave_wait,
            "--abort-failures", args.abort_failures, "--abort-min", str(args.abort_min),
            "--timeout", str(args.timeout), "--discover-wait", "1",
            "--report", str(report), "--state", str(root / f"state-{version}.json"),
            *source,
        ]  # fmt: skip
        code, wall, rss, output = run_command(command, root)
        after = counters.read()
        lines = output.splitlines()
        for line in lines:
            wave_done = line.startswith("wave ") and " done: " in line
            if wave_done or line.startswith(("rollout ", "ABORTED", "waiting")):
                print(f"  | {line}")
        document = json.loads(report.read_text())
        print(
            f"  exit {code}, phase {document['phase']}, counts {document['counts']}, "
            f"not targeted {len(document['not_targeted'])}\n"
            f"  command: wall {wall:.1f} s, peak RSS {rss:.0f} MB; broker peak RSS "
            f"{peak_rss_mb(broker._process.pid):.0f} MB; PUBLISH received "  # type: ignore[union-attr]
            f"{after[0] - before[0]}, sent {after[1] - before[1]}; "
            f"simulator saw {fleet.manifests_received} manifests, sent "
            f"{fleet.statuses_sent} statuses",
            flush=True,
        )
    finally:
        fleet.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=10_000)
    parser.add_argument("--connections", type=int, default=4)
    parser.add_argument("--source", choices=["https", "mqtt"], default="https")
    parser.add_argument("--waves", default="1,1%,10%,50%,100%")
    parser.add_argument("--wave-wait", default="5s")
    parser.add_argument("--abort-failures", default="5%")
    parser.add_argument("--abort-min", type=int, default=20)
    parser.add_argument("--timeout", type=float, default=20.0, help="per wave")
    parser.add_argument("--install-s", type=float, default=2.0)
    args = parser.parse_args()
    print(describe_run(), flush=True)
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        (root / "broker").mkdir()
        # A fresh subscription gets 2 retained messages per device at once: the queue for
        # one client must hold them (the README's "At scale" says the same for users).
        queue = f"max_queued_messages {max(100_000, 4 * args.devices)}"
        broker = MosquittoBroker(root / "broker", extra_lines=("sys_interval 1", queue))
        broker.start()
        generate_keypair(root / "ops")
        build_linear(root / "m.onnx", features=4, outputs=2, seed=1)
        counters = BrokerCounters()
        mqtt = default_config().mqtt.model_copy(update={"host": broker.host, "port": broker.port})
        watcher = connect(mqtt, None, [(t, 0) for t in PUBLISH_COUNTERS], counters.on_message)
        try:
            rollout(root, broker, counters, args, fail=0.01, silent=0.005, version=2,
                    label="few failures (1% fail, 0.5% silent)")  # fmt: skip
            rollout(root, broker, counters, args, fail=0.2, silent=0.0, version=3,
                    label="many failures (20% fail)")  # fmt: skip
            code, wall, rss, output = run_command(
                [sys.executable, "-m", "agent", "status", "--group", "sim",
                 "--host", broker.host, "--port", str(broker.port), "--wait", "5"],
                root,
            )  # fmt: skip
            rows = sum(1 for line in output.splitlines() if line.startswith("sim"))
            print(
                f"\nstatus --group sim: exit {code}, {rows} devices listed, wall {wall:.1f} s "
                f"(of which 5 s collecting), peak RSS {rss:.0f} MB"
            )
        finally:
            watcher.disconnect()
            watcher.loop_stop()
            broker.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
