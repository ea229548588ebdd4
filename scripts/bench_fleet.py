"""Rollout benchmark with real daemons: a fleet of ``--devices`` edge-agent processes on one
private Mosquitto, each with a small config of its own (group ``line3``).

1. ``--bad`` of them name the old model's input in their pipeline (``input.tensor: x``),
   which the new model lacks: a staged rollout with ``--waves 1,10%,50%,100%
   --abort-failures 5% --abort-min 2 --rollback-on-abort`` stops before the last wave; the
   script checks that the devices never targeted still serve the old version and that
   the targeted ones serve the old bytes again.
2. The bad devices are restarted with a fixed config, one device is stopped, and the next
   version rolls out over the whole fleet with ``--retain``; the stopped device is started
   ``--late-s`` seconds later and installs the retained update (the command sends it the
   chunks again when it asks). Prints the time from the start to the last SUCCEEDED and
   the peak memory of the broker and of the daemons.

    .venv/bin/python scripts/bench_fleet.py [--devices 30] [--bad 3] [--late-s 120]
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

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

from bench_rollout import peak_rss_mb  # noqa: E402
from bench_run import describe_run  # noqa: E402

from agent.cli.status import collect  # noqa: E402
from agent.config.loader import default_config  # noqa: E402
from agent.updates.signing import generate_keypair  # noqa: E402
from tests.broker import MosquittoBroker  # noqa: E402
from tests.onnx_builders import build_linear  # noqa: E402


class Daemons:
    """The fleet's processes, one folder and config each."""

    def __init__(self, root: Path, broker: MosquittoBroker, public_key: Path, old: Path) -> None:
        self.root, self.broker, self.public_key, self.old = root, broker, public_key, old
        self.processes: dict[str, subprocess.Popen[bytes]] = {}

    def config(self, name: str, bad: bool) -> Path:
        folder = self.root / name
        (folder / "models").mkdir(parents=True, exist_ok=True)
        model = folder / "models" / "lin.onnx"
        if not model.exists():
            model.write_bytes(self.old.read_bytes())
        pipeline: dict[str, Any] = {
            "model": "lin",
            "input": {"topic": f"in/{name}", "field": "x"},
            "output": {"topic": f"out/{name}"},
        }
        if bad:
            pipeline["input"]["tensor"] = "x"  # the new model's input is "features"
        config = {
            "device_id": name,
            "groups": ["line3"],
            "log_level": "warning",
            "mqtt": {"host": self.broker.host, "port": self.broker.port},
            "models_dir": str(folder / "models"),
            "state_dir": str(folder / "state"),
            "models": {"lin": {}},
            "pipelines": {"p": pipeline},
            "health": {"interval_s": 5},
            "updates": {"trusted_keys": [str(self.public_key)], "chunk_timeout_s": 10},
        }
        path = folder / "agent.yaml"
        path.write_text(yaml.safe_dump(config))
        return path

    def start(self, name: str, bad: bool = False) -> None:
        log = (self.root / f"{name}.log").open("ab")
        self.processes[name] = subprocess.Popen(
            [sys.executable, "-m", "agent", "run", "--config", str(self.config(name, bad))],
            cwd=REPO,
            stdout=log,
            stderr=subprocess.STDOUT,
        )

    def stop(self, name: str) -> None:
        process = self.processes.pop(name)
        process.terminate()
        process.wait(20)

    def stop_all(self) -> None:
        for name in list(self.processes):
            self.stop(name)

    def peaks_mb(self) -> list[float]:
        return [peak_rss_mb(p.pid) for p in self.processes.values()]


def versions(broker: MosquittoBroker) -> dict[str, str]:
    """Each device's retained model version (first 12 hex digits)."""
    mqtt = default_config().mqtt.model_copy(update={"host": broker.host, "port": broker.port})
    return {
        name: str((view.models.get("lin") or {}).get("version", "?"))[7:19]
        for name, view in collect(mqtt, "edge", None, 2.0).items()
    }


def wait_online(broker: MosquittoBroker, names: list[str], timeout_s: float = 300) -> float:
    """Seconds until every named device's retained model is READY."""
    started = time.monotonic()
    mqtt = default_config().mqtt.model_copy(update={"host": broker.host, "port": broker.port})
    while time.monotonic() - started < timeout_s:
        views = collect(mqtt, "edge", None, 1.0)
        ready = [
            n
            for n in names
            if n in views
            and views[n].status == "online"
            and (views[n].models.get("lin") or {}).get("state") == "READY"
            and views[n].health is not None
        ]
        if len(ready) == len(names):
            return time.monotonic() - started
    raise TimeoutError("the fleet did not come up")


def publish_update(
    root: Path, broker: MosquittoBroker, model: Path, version: int, *extra: str
) -> tuple[int, str, dict[str, Any]]:
    """Run a staged rollout of ``model`` as ``version``: exit code, output, JSON report."""
    report = root / f"report-{version}.json"
    command = [
        sys.executable, "-m", "agent", "publish-update", str(model), "--key", str(root / "ops.key"),
        "--model", "lin", "--version", str(version), "--group", "line3",
        "--host", broker.host, "--port", str(broker.port), "--chunk-size", "65536",
        "--waves", "1,10%,50%,100%", "--wave-wait", "5s", "--discover-wait", "3",
        "--report", str(report), "--state", str(root / f"state-{version}.json"), *extra,
    ]  # fmt: skip
    done = subprocess.run(command, cwd=root, capture_output=True, text=True, check=False)
    return done.returncode, done.stdout + done.stderr, json.loads(report.read_text())


def abort_phase(root: Path, broker: MosquittoBroker, names: list[str], bad: set[str]) -> bool:
    """Roll out with bad devices: the rollout must abort and roll back; True when it did."""
    before = versions(broker)
    code, output, report = publish_update(
        root, broker, root / "new.onnx", 2, "--abort-failures", "5%", "--abort-min", "2",
        "--rollback-on-abort", "--previous", str(root / "old.onnx"),
    )  # fmt: skip
    after = versions(broker)
    targeted = set(report["devices"])
    untouched_old = all(after[n] == before[n] for n in names if n not in targeted)
    restored = all(after[n] == before[n] for n in targeted)
    print(
        f"\n1. with {len(bad)} bad devices: exit {code}, {report['phase']}, "
        f"{len(targeted)} targeted of {len(names)} in "
        f"{report['wave'] + 1} of {len(report['waves'])} waves; "
        f"{report['abort_reason']}\n   untargeted serve the old version: "
        f"{untouched_old}; targeted serve the old bytes again: {restored}"
    )
    print("   the command printed:\n" + "\n".join(f"   | {line}" for line in output.splitlines()))
    return code != 0 and report["phase"] == "aborted" and untouched_old and restored


def fleet_phase(
    root: Path, broker: MosquittoBroker, daemons: Daemons, late: str, late_s: float
) -> bool:
    """The whole fleet, ``late`` started ``late_s`` after the command: True when every
    device SUCCEEDED; prints the times and the peak memory."""
    started = time.monotonic()

    def start_late() -> None:
        time.sleep(late_s)
        daemons.start(late)

    threading.Thread(target=start_late, daemon=True).start()
    code, output, report = publish_update(
        root, broker, root / "new.onnx", 4, "--abort-failures", "5%", "--abort-min", "2",
        "--retain", "--timeout", str(late_s + 120),
    )  # fmt: skip
    wall = time.monotonic() - started
    records = report["devices"]
    finals = [r["finished_s"] for r in records.values() if r["state"] == "SUCCEEDED"]
    on_time = [
        r["finished_s"] for n, r in records.items() if r["state"] == "SUCCEEDED" and n != late
    ]
    peaks = daemons.peaks_mb()
    print(
        f"\n2. whole fleet, {late} stopped and started {late_s:g} s later: exit "
        f"{code}, {report['phase']}, {report['counts']}\n"
        f"   last SUCCEEDED of the online devices {max(on_time, default=0):.1f} s after the "
        f"start, of all (the late one included) {max(finals, default=0):.1f} s; command wall "
        f"{wall:.1f} s\n   peak RSS: broker "
        f"{peak_rss_mb(broker._process.pid):.1f} MB, daemons median "  # type: ignore[union-attr]
        f"{statistics.median(peaks):.0f} MB, max {max(peaks):.0f} MB"
    )
    lines = [line for line in output.splitlines() if not line.startswith("fleet")]
    print("   the command printed (the table left out):")
    print("\n".join(f"   | {line}" for line in lines))
    return code == 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=30)
    parser.add_argument("--bad", type=int, default=3)
    parser.add_argument("--late-s", type=float, default=120.0)
    args = parser.parse_args()
    print(describe_run(), flush=True)
    names = [f"fleet{i:02d}" for i in range(args.devices)]
    # Spread over the early waves (1, 3, 15, 30 devices for 30): index 2 lands in wave 2.
    bad = {names[i] for i in (2, 7, 11, 19, 23)[: args.bad]}
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        (root / "broker").mkdir()
        broker = MosquittoBroker(root / "broker")
        broker.start()
        generate_keypair(root / "ops")
        old = build_linear(root / "old.onnx", features=4, seed=0)
        build_linear(root / "new.onnx", features=4, seed=1, input_name="features")
        daemons = Daemons(root, broker, root / "ops.pub", old)
        try:
            for name in names:
                daemons.start(name, bad=name in bad)
            up = wait_online(broker, names)
            print(f"{args.devices} daemons serving after {up:.0f} s; bad: {sorted(bad)}")
            if not abort_phase(root, broker, names, bad):
                return 1
            for name in sorted(bad):  # fixed config: they can serve the new model now
                daemons.stop(name)
                daemons.start(name)
            late = names[-1]
            daemons.stop(late)
            wait_online(broker, [n for n in names if n != late])
            if not fleet_phase(root, broker, daemons, late, args.late_s):
                return 1
        finally:
            daemons.stop_all()
            broker.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
