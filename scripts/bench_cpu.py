"""CPU seconds per 1,000 readings at a steady rate: the daemon against the hand-written loop.

An edge device spends its life at moderate load on a power budget, so what matters there is
not saturation but what each reading costs. The processes run side by side on one private
Mosquitto; each measurement window sends readings at a fixed rate to one of them, waits
until every result arrived, and reads that process's CPU time (user + system, all its
threads) from ``/proc/PID/stat`` before and after. Two pairs, like against like:

- ``qos1``: the daemon's defaults (at-least-once, QoS 1 in and out) against the loop at
  QoS 1 (paho acknowledges each reading on arrival);
- ``qos0``: the daemon in at-most-once mode with QoS 0 in and out against the loop at QoS 0;
- ``shadow``: the daemon with its defaults in the shadow trial of an update of its own model
  against the same daemon with no trial (its "loop" column): what a shadow costs the
  serving path, CPU and latency, measured in alternating windows of one run.

Windows alternate between the processes so that a noisy neighbour hurts all alike; medians
of ``--runs`` windows. Beside the CPU, one more window per process and rate runs under
``perf stat`` (not counted in the CPU figures) and gives the loop turns per reading: the
calls that wait for the network (select, poll, epoll_wait and their variants) of all the
process's threads, per reading, counted by the kernel's syscall tracepoints.

    .venv/bin/python scripts/bench_cpu.py [--models iforest,mlp] [--rates 500,100] [--runs 3]
        [--pairs qos1,qos0,shadow] [--no-turns] [--threads] [--profile DIR] [--set KEY=VALUE ...]
        [--shadow] [--drift]

``scripts/bench.py`` runs the same measurement as part of its table.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

from bench import (  # noqa: E402
    Messages,
    ModelCase,
    ResultCounter,
    _printed_ready,
    _sender,
    build_models,
    start_daemon_process,
    start_process,
    stop_process,
    warm,
)
from bench_run import describe_run  # noqa: E402
from bench_shadow import begin_shadow, signing_keys  # noqa: E402

from agent.procfs import rss_mb  # noqa: E402
from tests.broker import MosquittoBroker, wait_for_port  # noqa: E402

WINDOW_S = 5.0  # seconds of readings per window (at least 500 readings)
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
# --threads: print each window's CPU per thread (set once by main, before any window).
PER_THREAD = False


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of every thread of ``pid`` so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    # After the command name: state is field 3, utime 14 and stime 15 (1-based, man proc).
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def thread_cpu(pid: int) -> dict[int, tuple[float, float]]:
    """User and system CPU seconds so far per thread id of ``pid``."""
    totals: dict[int, tuple[float, float]] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # the thread ended meanwhile
            continue
        totals[int(task.name)] = (int(fields[11]) / CLOCK_TICKS, int(fields[12]) / CLOCK_TICKS)
    return totals


def thread_names(pid: int) -> dict[int, str]:
    """Python thread names by native thread id, from ``py-spy dump`` (threads it does not
    list are native: onnxruntime's pool)."""
    spy = Path(sys.executable).parent / "py-spy"
    try:
        dump = subprocess.run(
            [str(spy), "dump", "--pid", str(pid)],
            check=False,
            capture_output=True,
            text=True,
            timeout=30,
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return {}
    return {int(m[1]): m[2] for m in re.finditer(r'^Thread (\d+) \([^)]*\): "([^"]*)"', dump, re.M)}


def thread_table(
    before: dict[int, tuple[float, float]],
    after: dict[int, tuple[float, float]],
    pid: int,
    count: int,
) -> str:
    """Per thread name: user and system CPU milliseconds per reading between two samples."""
    names = thread_names(pid)
    totals: dict[str, list[float]] = {}
    for tid, (user, system) in after.items():
        user0, system0 = before.get(tid, (0.0, 0.0))
        name = re.sub(r"\d+$", "N", names.get(tid, "native (onnxruntime pool, ...)"))
        entry = totals.setdefault(name, [0.0, 0.0])
        entry[0] += (user - user0) / count * 1000
        entry[1] += (system - system0) / count * 1000
    return "\n".join(
        f"    {name:<32} user {user:6.3f} ms  system {system:6.3f} ms"
        for name, (user, system) in sorted(totals.items(), key=lambda kv: -sum(kv[1]))
        if user + system > 0
    )


def steady_window(  # noqa: PLR0917
    broker: MosquittoBroker,
    results: ResultCounter,
    messages: Messages,
    rate: float,
    pid: int,
    qos: int = 1,
) -> tuple[float, int]:
    """Send readings at ``rate`` (at ``qos``) for WINDOW_S; CPU seconds per 1,000 and
    readings unanswered."""
    count = max(500, int(rate * WINDOW_S))
    results.reset()
    sender = _sender(broker)
    before = cpu_seconds(pid)
    threads_before = thread_cpu(pid)
    started = time.perf_counter()
    for index in range(count):
        delay = started + index / rate - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        sender.publish(*messages[index % len(messages)], qos=qos)
    complete = results.wait_for(count, timeout_s=60)
    used = cpu_seconds(pid) - before
    if PER_THREAD:
        print(f"  pid {pid} at {rate:g}/s, per thread:", flush=True)
        print(thread_table(threads_before, thread_cpu(pid), pid, count), flush=True)
    sender.disconnect()
    sender.loop_stop()
    missing = 0 if complete else count - len(results.received)
    return used / count * 1000, missing


@dataclass
class Target:
    """One process under measurement and how to reach it."""

    label: str
    process: subprocess.Popen[bytes]
    results: ResultCounter
    messages: Messages
    qos: int = 1
    windows: dict[float, list[float]] = field(default_factory=dict)
    missing: int = 0
    # Per rate, the latency_ms of every result in the CPU windows (the daemon's results).
    latencies: dict[float, list[float]] = field(default_factory=dict)


def measure(
    targets: list[Target], broker: MosquittoBroker, rates: list[float], runs: int
) -> dict[str, dict[float, float]]:
    """Median CPU seconds per 1,000 readings per target and rate, windows alternating."""
    for target in targets:
        warm(broker, target.results, target.messages)
    for _ in range(runs):
        for rate in rates:
            for target in targets:
                per_thousand, missing = steady_window(
                    broker, target.results, target.messages, rate, target.process.pid, target.qos
                )
                target.windows.setdefault(rate, []).append(per_thousand)
                target.latencies.setdefault(rate, []).extend(target.results.latencies_ms)
                target.missing += missing
    return {
        t.label: {rate: statistics.median(values) for rate, values in t.windows.items()}
        for t in targets
    }


def profile(target: Target, broker: MosquittoBroker, rate: float, output: Path) -> None:
    """One more window at ``rate`` under py-spy (not counted in the figures): collapsed
    stacks, per thread, of the samples that held the GIL (the Python work; what a thread
    spends in syscalls, waiting or in onnxruntime's own threads shows in /proc instead),
    in ``output``."""
    spy = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "py-spy"),
            "record",
            "--pid",
            str(target.process.pid),
            "--rate",
            "250",
            "--format",
            "raw",
            "--threads",
            "--gil",
            "--duration",
            str(int(WINDOW_S) + 1),
            "--output",
            str(output),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    time.sleep(0.5)
    steady_window(broker, target.results, target.messages, rate, target.process.pid, target.qos)
    spy.wait(timeout=60)


PAIRS = (
    ("qos1", "defaults vs QoS 1 loop"),
    ("qos0", "at-most-once vs QoS 0 loop"),
    ("shadow", "in a shadow trial vs no trial"),
)
# The calls that wait for the network: one per turn of a network loop.
WAIT_CALLS = ("select", "pselect6", "poll", "ppoll", "epoll_wait", "epoll_pwait")


def turns_window(target: Target, broker: MosquittoBroker, rate: float) -> float | None:
    """One more window at ``rate`` under ``perf stat`` counting the syscall tracepoints of the
    waiting calls (not counted in the CPU figures; a tracepoint count costs next to nothing,
    where strace would slow the process until readings pile up): per reading, all threads;
    None without perf or without access to the tracepoints."""
    perf = shutil.which("perf")
    if perf is None:
        return None
    events = [arg for call in WAIT_CALLS for arg in ("-e", f"syscalls:sys_enter_{call}")]
    tracer = subprocess.Popen(
        [perf, "stat", "-x", ",", *events, "-p", str(target.process.pid)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    time.sleep(0.5)
    count = max(500, int(rate * WINDOW_S))
    steady_window(broker, target.results, target.messages, rate, target.process.pid, target.qos)
    tracer.send_signal(signal.SIGINT)
    _, report = tracer.communicate(timeout=30)
    calls = 0
    for line in report.splitlines():
        fields = line.split(",")
        if len(fields) > 2 and fields[2].startswith("syscalls:") and fields[0].isdigit():
            calls += int(fields[0])
    return calls / count if calls else None


def start_loop(case: ModelCase, broker: MosquittoBroker, folder: Path, qos: int = 1) -> Target:
    """The hand-written loop (scripts/baseline_loop.py) on ``case``'s model, at ``qos``."""
    name = f"loop{qos}-{case.name}"
    log = folder / f"cpu-{name}.log"
    process = start_process(
        [
            sys.executable,
            str(REPO / "scripts" / "baseline_loop.py"),
            "--port",
            str(broker.port),
            "--model",
            str(case.path),
            "--input-topic",
            f"cpu/{name}/in",
            "--output-topic",
            f"cpu/{name}/out",
            "--qos",
            str(qos),
            "--client-id",
            name,
        ],
        _printed_ready(log),
        log,
    )
    time.sleep(0.5)
    results = ResultCounter(broker, f"cpu/{name}/out")
    messages = [(f"cpu/{name}/in", case.json_payload(i)) for i in range(len(case.inputs))]
    return Target(f"loop QoS {qos}", process, results, messages, qos)


def start_daemon(
    case: ModelCase,
    broker: MosquittoBroker,
    folder: Path,
    settings: dict[str, Any] | None = None,
    qos: int = 1,
    *,
    shadow: bool = False,
    drift: bool = False,
    tag: str = "",
) -> Target:
    """The daemon with one JSON pipeline: its defaults (at-least-once, QoS 1) for ``qos``
    1, at-most-once with QoS 0 in and out for ``qos`` 0; plus the ``settings`` given (dotted
    keys, ``--set``: to measure candidates one by one); with ``shadow``, in the shadow
    trial of an update of its own model (``bench_shadow.py``); with ``drift``, measuring
    the drift of its readings against a reference of the same distribution. ``tag``
    tells apart two daemons of one case."""
    device = f"cpu-{case.name}-qos{qos}{tag}"
    models_dir = folder / f"models-{device}"
    models_dir.mkdir(exist_ok=True)
    (models_dir / "m.onnx").write_bytes(case.path.read_bytes())
    config: dict[str, Any] = {
        "device_id": device,
        "log_level": "warning",
        "mqtt": {"host": broker.host, "port": broker.port},
        "models_dir": str(models_dir),
        "state_dir": str(folder / f"state-{device}"),
        "models": {"m": {}},
        "pipelines": {
            "p": {
                "model": "m",
                "input": {"topic": f"cpu/{device}/+", "field": "x", "qos": qos},
                "output": {"topic": f"cpu/{device}/out/{{1}}", "qos": qos},
            }
        },
    }
    if qos == 0:
        config["delivery"] = "at_most_once"
    for key, value in (settings or {}).items():
        *path, leaf = key.split(".")
        section = config
        for part in path:
            section = section.setdefault(part, {})
        section[leaf] = value
    if drift:
        # The readings' own distribution: drift is measured, never flagged.
        name = onnx.load(str(case.path)).graph.input[0].name
        np.savez(models_dir / "reference.npz", **{f"input:{name}": case.inputs[:2000]})  # type: ignore[arg-type]
        config["pipelines"]["p"]["drift"] = {"reference": "reference.npz", "window_s": 60}
    signing_key: Path | None = None
    if shadow:
        public, signing_key = signing_keys(folder / f"key-{device}")
        config.setdefault("updates", {})["trusted_keys"] = [str(public)]
    process = start_daemon_process(
        broker, config, folder / f"cpu-{device}.yaml", folder / f"{device}.log"
    )
    if signing_key is not None:
        begin_shadow(broker, device, models_dir / "m.onnx", signing_key, folder)
    time.sleep(0.5)
    results = ResultCounter(broker, f"cpu/{device}/out/#")
    messages = [(f"cpu/{device}/s", case.json_payload(i)) for i in range(len(case.inputs))]
    label = "daemon at-least-once" if qos else "daemon at-most-once"
    return Target(label, process, results, messages, qos)


def start_pair(  # noqa: PLR0917
    pair: str,
    case: ModelCase,
    broker: MosquittoBroker,
    folder: Path,
    settings: dict[str, Any] | None,
    shadow: bool,
    drift: bool,
) -> list[tuple[str, Target]]:
    """The two processes of ``pair``, as (role, target): the ``loop`` one first."""
    if pair == "shadow":  # the "loop" of this pair is the daemon with no trial
        plain = start_daemon(case, broker, folder, settings, drift=drift, tag="-plain")
        plain.label = "daemon, no trial"
        trial = start_daemon(
            case, broker, folder, settings, shadow=True, drift=drift, tag="-shadow"
        )
        trial.label = "daemon in a shadow trial"
        return [("loop", plain), ("daemon", trial)]
    qos = int(pair.removeprefix("qos"))
    loop = start_loop(case, broker, folder, qos)
    daemon = start_daemon(case, broker, folder, settings, qos, shadow=shadow, drift=drift)
    return [("loop", loop), ("daemon", daemon)]


def bench_case(  # noqa: PLR0917
    case: ModelCase,
    broker: MosquittoBroker,
    folder: Path,
    rates: list[float],
    runs: int,
    profile_dir: Path | None = None,
    settings: dict[str, Any] | None = None,
    pairs: tuple[str, ...] = ("qos1", "qos0"),
    turns: bool = True,
    shadow: bool = False,
    drift: bool = False,
) -> dict[str, float]:
    """Figures for one model, per pair (``qos1``, ``qos0``) and rate:
    ``cpu_<pair>_<loop|daemon>_<rate>`` medians, ``ratio_<pair>_<rate>``,
    ``turns_<pair>_<loop|daemon>_<rate>``, RSS and readings unanswered; with ``profile_dir``,
    a py-spy profile of each process at each rate after the measurements."""
    targets: list[tuple[str, str, Target]] = []
    try:
        for pair in pairs:
            started = start_pair(pair, case, broker, folder, settings, shadow, drift)
            targets.extend((pair, role, target) for role, target in started)
        medians = measure([t for _, _, t in targets], broker, rates, runs)
        figures: dict[str, float] = {}
        for pair, role, target in targets:
            figures[f"rss_{pair}_{role}"] = rss_mb(target.process.pid) or float("nan")
            figures[f"missing_{pair}_{role}"] = target.missing
            for rate, value in medians[target.label].items():
                figures[f"cpu_{pair}_{role}_{rate:g}"] = value
                latencies = sorted(target.latencies.get(rate, []))
                if latencies:
                    figures[f"p50_{pair}_{role}_{rate:g}"] = statistics.median(latencies)
                    figures[f"p99_{pair}_{role}_{rate:g}"] = latencies[int(len(latencies) * 0.99)]
                if turns:
                    per_reading = turns_window(target, broker, rate)
                    if per_reading is not None:
                        figures[f"turns_{pair}_{role}_{rate:g}"] = per_reading
            if profile_dir is not None:
                profile_dir.mkdir(parents=True, exist_ok=True)
                for rate in rates:
                    name = f"{case.name}-{pair}-{role}-{rate:g}.txt"
                    profile(target, broker, rate, profile_dir / name)
        for pair in pairs:
            for rate in rates:
                key = f"{pair}_{{}}_{rate:g}"
                figures[f"ratio_{pair}_{rate:g}"] = (
                    figures["cpu_" + key.format("daemon")] / figures["cpu_" + key.format("loop")]
                )
        return figures
    finally:
        for _, _, target in targets:
            target.results.close()
            stop_process(target.process)


def table(rows: list[tuple[str, dict[str, float]]], rates: list[float]) -> str:
    """Markdown table of the figures of ``bench_case`` per model."""
    lines = [
        "| model | pair | rate /s | loop CPU s / 1,000 | daemon CPU s / 1,000 | ratio "
        "| loop turns / reading | daemon turns / reading |",
        "|---|---|---|---|---|---|---|---|",
    ]
    missing = 0.0
    for model, f in rows:
        for pair, described in PAIRS:
            if f"ratio_{pair}_{rates[0]:g}" not in f:
                continue
            for rate in rates:
                key = f"{pair}_{{}}_{rate:g}"
                turns = [f.get("turns_" + key.format(role)) for role in ("loop", "daemon")]
                shown = [f"{t:.2f}" if t is not None else "-" for t in turns]
                loop, daemon = f["cpu_" + key.format("loop")], f["cpu_" + key.format("daemon")]
                lines.append(
                    f"| {model} | {described} | {rate:g} | {loop:.3f} | {daemon:.3f} "
                    f"| {f[f'ratio_{pair}_{rate:g}']:.2f}x | {shown[0]} | {shown[1]} |"
                )
        missing += sum(v for k, v in f.items() if k.startswith("missing_"))
    rss = "; ".join(
        f"{model}: "
        + ", ".join(f"{k[4:]} {v:.0f} MB" for k, v in f.items() if k.startswith("rss_"))
        for model, f in rows
    )
    latency = "; ".join(
        f"{model} {_who(k)}/s {v:.2f}/{f['p99' + k[3:]]:.2f} ms"
        for model, f in rows
        for k, v in f.items()
        if k.startswith("p50_") and ("_daemon_" in k or k.startswith("p50_shadow_"))
    )
    return (
        "\n".join(lines)
        + f"\n\nRSS after: {rss}; unanswered: {missing:.0f}"
        + f"\ndaemon latency p50/p99, receive to publish, from its results: {latency}"
    )


def _who(key: str) -> str:
    """The daemon and rate a ``p50_PAIR_ROLE_RATE`` key names, as the latency line says it."""
    pair, role, rate = key.split("_")[1:]
    if pair == "shadow":
        return f"{'no trial' if role == 'loop' else 'in a shadow trial'} {rate}"
    return f"{pair} {rate}"


def start_broker(folder: Path) -> MosquittoBroker:
    """The private broker of a benchmark run."""
    (folder / "broker").mkdir()
    broker = MosquittoBroker(
        folder / "broker",
        extra_lines=("max_inflight_messages 1000", "max_queued_messages 1000000"),
    )
    broker.start()
    wait_for_port(broker.port)
    return broker


def main() -> int:
    parser = argparse.ArgumentParser(description="CPU per reading at a steady rate")
    parser.add_argument("--models", default="iforest,mlp")
    parser.add_argument("--rates", default="500,100", help="readings/s, comma-separated")
    parser.add_argument("--runs", type=int, default=3, help="windows per target and rate")
    parser.add_argument(
        "--profile",
        metavar="DIR",
        type=Path,
        help="also write py-spy profiles (collapsed stacks) of each target and rate to DIR",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=YAML",
        help="a daemon setting, e.g. --set cpu_threads=1 --set mqtt.protocol=3.1.1",
    )
    parser.add_argument(
        "--pairs",
        default="qos1,qos0",
        help="qos1 (defaults vs QoS 1 loop), qos0 (at-most-once), shadow (a daemon in a "
        "shadow trial vs one with none)",
    )
    parser.add_argument(
        "--no-turns", action="store_true", help="skip the perf windows that count turns"
    )
    parser.add_argument(
        "--shadow",
        action="store_true",
        help="measure each daemon during the shadow trial of an update of its own model",
    )
    parser.add_argument(
        "--drift",
        action="store_true",
        help="measure each daemon with drift on (a reference of the readings' distribution)",
    )
    parser.add_argument(
        "--threads",
        action="store_true",
        help="print each window's CPU per reading per thread (names from py-spy dump)",
    )
    args = parser.parse_args()
    global PER_THREAD  # noqa: PLW0603 - a print switch, set before any window
    PER_THREAD = args.threads
    settings = {k: yaml.safe_load(v) for k, v in (item.split("=", 1) for item in args.set)}
    rates = [float(r) for r in args.rates.split(",")]
    print(describe_run(), flush=True)
    with tempfile.TemporaryDirectory(prefix="edge-agent-bench-cpu-") as temp:
        folder = Path(temp)
        broker = start_broker(folder)
        rows = []
        try:
            for case in build_models(folder, 4000, args.models.split(",")):
                print(f"measuring {case.name} ...", flush=True)
                rows.append(
                    (
                        case.name,
                        bench_case(
                            case,
                            broker,
                            folder,
                            rates,
                            args.runs,
                            args.profile,
                            settings,
                            pairs=tuple(args.pairs.split(",")),
                            turns=not args.no_turns,
                            shadow=args.shadow,
                            drift=args.drift,
                        ),
                    )
                )
        finally:
            broker.stop()
    print(f"\nmedians of {args.runs} alternating windows of {WINDOW_S:.0f} s\n")
    print(table(rows, rates))
    return 0


if __name__ == "__main__":
    sys.exit(main())
