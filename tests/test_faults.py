"""Faults a device meets over months, with the daemon as a process: a frozen process and a
flapping broker, and a state folder that cannot be written or fills up."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.procfs import rss_mb
from tests.broker import MosquittoBroker, Recorder, paced_stream, publisher
from tests.conftest import AgentProcess, base_config
from tests.test_delivery import (
    config_for,
    durable_broker,  # noqa: F401 - a fixture
    readings,
    upstream,  # noqa: F401 - a fixture
    upstream_config,
    wait_for_ids,
)
from tests.test_updates import agent_config as update_config
from tests.test_updates import linear, serving_version, version_of, wait_subscribed
from tests.update_helpers import (
    DEVICE_BASE,
    chunks_of,
    envelope,
    final_status,
    make_key,
    payload_for,
    send,
    wait_for_step,
)
from tests.update_helpers import STATUS as UPDATE_STATUS

pytestmark = pytest.mark.broker

AgentFactory = Callable[..., AgentProcess]
STATUS = "edge/dev1/status"


def threads_of(pid: int) -> int:
    """Threads of process ``pid`` now."""
    return len(os.listdir(f"/proc/{pid}/task"))


def test_frozen_longer_than_keepalive_fires_the_will_then_recovers(
    durable_broker: MosquittoBroker,  # noqa: F811
    tmp_path: Path,
    agent_factory: AgentFactory,
) -> None:
    """SIGSTOP for longer than 1.5x keepalive_s (5 s in tests): the broker publishes the
    last will (``offline``); after SIGCONT the daemon reconnects, says ``online`` again,
    republishes its retained model status, and every QoS 1 reading sent before, during and
    after the freeze gets a result."""
    config = config_for(durable_broker, tmp_path)
    status = Recorder(durable_broker, [STATUS, "edge/dev1/models/+"]).start()
    rec = Recorder(durable_broker, ["out/#"], session="rec-frozen").start()
    agent = agent_factory(config)
    agent.wait_for_event("agent_serving")
    status.wait_for_payload(STATUS, b"online")
    client = publisher(durable_broker)
    try:
        for index in range(100):
            client.publish("in/s1", readings(300)[index], qos=1)
        wait_for_ids(rec, 100, timeout_s=30)
        os.kill(agent.process.pid, signal.SIGSTOP)
        try:
            status.wait_for_payload(STATUS, b"offline", timeout_s=30)
            models_before = sum(1 for m in status.messages if "/models/" in m.topic)
            for index in range(100, 200):  # sent while the daemon is frozen
                client.publish("in/s1", readings(300)[index], qos=1)
        finally:
            os.kill(agent.process.pid, signal.SIGCONT)
        status.wait_for(
            lambda ms: [m.payload for m in ms if m.topic == STATUS][-1] == b"online",
            timeout_s=30,
        )
        for index in range(200, 300):
            client.publish("in/s1", readings(300)[index], qos=1)
        wait_for_ids(rec, 300, timeout_s=60, agent=agent)
    finally:
        client.disconnect()
        client.loop_stop()
    status.wait_for(
        lambda ms: sum(1 for m in ms if "/models/" in m.topic) > models_before, timeout_s=30
    )
    status.stop()
    rec.stop()
    assert agent.process.poll() is None
    events = [e.get("event") for e in agent.log_events()]
    assert events.count("mqtt_connected") >= 2, "no reconnect after the freeze"


def test_a_flapping_broker_under_load_loses_nothing_and_leaks_no_thread(
    durable_broker: MosquittoBroker,  # noqa: F811
    tmp_path: Path,
    agent_factory: AgentFactory,
) -> None:
    """The broker restarts ten times, every two seconds, under 300 readings/s: the daemon
    does not crash, its thread count after the storm is what it was before, its memory stays
    bounded, and every reading gets a result."""
    config: dict[str, Any] = config_for(durable_broker, tmp_path)
    rec = Recorder(durable_broker, ["out/#"], session="rec-flap").start()
    agent = agent_factory(config)
    agent.wait_for_event("agent_serving")
    agent.wait_for_event("mqtt_subscribed")
    pid = agent.process.pid
    time.sleep(1.0)  # every thread of a serving daemon is up
    threads_before = threads_of(pid)
    rss_before = rss_mb(pid) or 0.0
    total = 6000
    stream = paced_stream(durable_broker, "in/s1", readings(total), rate=300)
    for _ in range(10):
        time.sleep(1.5)
        durable_broker.restart(down_s=0.5)
    stream.join()
    wait_for_ids(rec, total, timeout_s=120, agent=agent)
    rec.stop()
    time.sleep(2.0)  # reconnect threads and timers of the last restart have finished
    assert agent.process.poll() is None
    assert threads_of(pid) == threads_before, "threads leaked across reconnects"
    rss_after = rss_mb(pid) or 0.0
    assert rss_after < rss_before + 50, (rss_before, rss_after)


@contextlib.contextmanager
def tmpfs(folder: Path, options: str) -> Iterator[Path]:
    """``folder`` with a tmpfs mounted on it (root only; the test is skipped otherwise),
    unmounted afterwards."""
    folder.mkdir()
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a tmpfs")
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)],
        capture_output=True,
        check=False,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode(errors='replace')}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


@pytest.fixture
def read_only_folder(tmp_path: Path) -> Iterator[Path]:
    """A folder on a read-only tmpfs."""
    with tmpfs(tmp_path / "read-only", "ro,size=1m") as folder:
        yield folder


def test_a_read_only_state_dir_at_start_is_a_clear_error(
    broker: MosquittoBroker,
    tmp_path: Path,
    agent_factory: AgentFactory,
    read_only_folder: Path,
) -> None:
    """state_dir on a read-only file system: the daemon exits non-zero at once with one
    error line that names the folder and the cause (no traceback), so systemd's journal
    says what to fix."""
    config = base_config(broker, tmp_path, state_dir=str(read_only_folder))
    agent = agent_factory(config)
    assert agent.process.wait(timeout=30) != 0
    events = agent.log_events()
    failed = [e for e in events if e.get("event") == "agent_failed"]
    assert len(failed) == 1, events
    assert str(read_only_folder) in failed[0]["error"]
    assert "Read-only file system" in failed[0]["error"]
    assert "Traceback" not in agent.log_file.read_text()


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A folder on a 4 MB tmpfs, to fill up."""
    with tmpfs(tmp_path / "small-disk", "size=4m") as folder:
        yield folder


def fill(folder: Path) -> Path:
    """Write a file into ``folder`` until its file system is full; returns the file."""
    filler = folder / "filler"
    with filler.open("wb") as handle:
        try:
            while True:
                handle.write(b"\0" * 65536)
                handle.flush()
        except OSError:
            pass
    return filler


def test_a_full_state_dir_during_an_outage_loses_nothing(
    broker: MosquittoBroker,
    upstream: MosquittoBroker,  # noqa: F811
    tmp_path: Path,
    agent_factory: AgentFactory,
    small_disk: Path,
) -> None:
    """The results' broker is down and the disk holding state_dir is full, so the outbox
    cannot store results: the daemon says so (log, health), keeps the results in memory
    with their readings unacknowledged, delivers every one when the broker returns, and
    stores results again once space is back."""
    config = upstream_config(broker, upstream, tmp_path, state_dir=str(small_disk / "state"))
    config["health"] = {"interval_s": 0.5}
    agent = agent_factory(config)
    agent.wait_for_event("agent_serving")
    rec = Recorder(upstream, ["out/#", "edge/dev1/health"], session="rec-full").start()
    paced_stream(broker, "in/s1", readings(50), rate=100).join()
    wait_for_ids(rec, 50, timeout_s=30)  # seq block reserved, outbox open: then fill the disk
    upstream.stop()
    filler = fill(small_disk)
    paced_stream(broker, "in/s1", readings(150)[50:], rate=100).join()
    agent.wait_for_event("outbox_write_failed", timeout_s=30)
    upstream.start()
    results = wait_for_ids(rec, 150, timeout_s=60, agent=agent)
    assert {r["id"] for r in results} == set(range(150))

    def counted(ms: list[Any]) -> bool:
        health = [json.loads(m.payload) for m in ms if m.topic == "edge/dev1/health"]
        return bool(health) and health[-1]["delivery"]["outbox"]["write_errors"] > 0

    rec.wait_for(counted, timeout_s=30)
    filler.unlink()  # space is back: the next outage is stored again
    upstream.stop()
    paced_stream(broker, "in/s1", readings(200)[150:], rate=100).join()
    agent.wait_for_event("outbox_write_recovered", timeout_s=30)
    upstream.start()
    wait_for_ids(rec, 200, timeout_s=60, agent=agent)
    rec.stop()
    assert agent.process.poll() is None


@pytest.fixture
def ext4_disk(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """A folder on a 16 MB ext4 file system in a loop device, mounted
    ``errors=remount-ro`` as an SD card's root usually is; yields the folder and the
    file system's ``trigger_fs_error`` switch (root and a loop device only; the test is
    skipped otherwise)."""
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a loop device")
    image, folder = tmp_path / "sd.img", tmp_path / "sd"
    folder.mkdir()
    with image.open("wb") as handle:
        handle.truncate(16 * 1024 * 1024)
    steps = [
        ["mkfs.ext4", "-q", "-F", str(image)],
        ["mount", "-o", "loop,errors=remount-ro", str(image), str(folder)],
    ]
    for step in steps:
        try:
            done = subprocess.run(step, capture_output=True, check=False)
        except FileNotFoundError:
            pytest.skip(f"{step[0]} is not installed")
        if done.returncode != 0:
            pytest.skip(f"{' '.join(step[:2])} failed: {done.stderr.decode(errors='replace')}")
    try:
        device = next(
            line.split()[0]
            for line in Path("/proc/mounts").read_text().splitlines()
            if line.split()[1] == str(folder)
        )
        yield folder, Path("/sys/fs/ext4") / Path(device).name / "trigger_fs_error"
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def test_a_state_dir_that_turns_read_only_while_running_loses_nothing(
    broker: MosquittoBroker,
    upstream: MosquittoBroker,  # noqa: F811
    tmp_path: Path,
    agent_factory: AgentFactory,
    ext4_disk: tuple[Path, Path],
) -> None:
    """The ext4 file system holding state_dir hits an error and the kernel remounts it
    read-only under the running daemon (what a worn SD card does): readings keep getting
    results, an outage of the results' broker is bridged in memory and delivered when it
    returns, the failure shows in the log and health, and a SIGTERM still exits cleanly."""
    folder, trigger = ext4_disk
    config = upstream_config(broker, upstream, tmp_path, state_dir=str(folder / "state"))
    config["health"] = {"interval_s": 0.5}
    agent = agent_factory(config)
    agent.wait_for_event("agent_serving")
    rec = Recorder(upstream, ["out/#", "edge/dev1/health"], session="rec-ro").start()
    paced_stream(broker, "in/s1", readings(50), rate=100).join()
    wait_for_ids(rec, 50, timeout_s=30)
    trigger.write_text("test: the SD card fails\n")
    assert (
        " ro," in Path("/proc/mounts").read_text()
        or "emergency_ro" in Path("/proc/mounts").read_text()
    )
    paced_stream(broker, "in/s1", readings(100)[50:], rate=100).join()
    wait_for_ids(rec, 100, timeout_s=30, agent=agent)
    upstream.stop()
    paced_stream(broker, "in/s1", readings(150)[100:], rate=100).join()
    failed = agent.wait_for_event("outbox_write_failed", timeout_s=30)
    assert failed["error"].endswith(f"the file system of {folder / 'state'} is read-only")
    upstream.start()
    results = wait_for_ids(rec, 150, timeout_s=60, agent=agent)
    assert {r["id"] for r in results} == set(range(150))

    def reported(ms: list[Any]) -> bool:
        health = [json.loads(m.payload) for m in ms if m.topic == "edge/dev1/health"]
        return (
            bool(health)
            and health[-1]["delivery"]["outbox"]["write_errors"] > 0
            and "state_dir_read_only" in {w["code"] for w in health[-1]["warnings"]}
        )

    rec.wait_for(reported, timeout_s=30)
    rec.stop()
    warned = agent.wait_for_event("device_warning")
    assert any(
        e.get("code") == "state_dir_read_only"
        for e in agent.log_events()
        if e.get("event") == "device_warning"
    ), warned
    assert agent.process.poll() is None
    code, _ = agent.terminate()
    assert code == 0
    assert "Traceback" not in agent.log_file.read_text()


@contextlib.contextmanager
def disk_full(folder: Path) -> Iterator[None]:
    """``folder``'s file system filled up for the block, the space given back afterwards.
    (A plain ``mount -o remount,ro`` under the running daemon is refused while files are
    open for writing; ``ext4_disk`` stages the read-only case the way the kernel does it.)"""
    filler = fill(folder)
    try:
        yield
    finally:
        filler.unlink()


def test_a_full_state_dir_when_a_seq_block_runs_out_fails_no_reading(
    broker: MosquittoBroker,
    tmp_path: Path,
    agent_factory: AgentFactory,
    small_disk: Path,
) -> None:
    """seq numbers are persisted a block of 1,000 at a time. When the block runs out while
    state_dir is full, every reading still gets its result with a rising
    seq (in memory, logged once); once space is back the next block is persisted
    above every number handed out, so a restart continues above them."""
    config = config_for(broker, tmp_path, state_dir=str(small_disk / "state"))
    agent = agent_factory(config)
    agent.wait_for_event("agent_serving")
    agent.wait_for_event("mqtt_subscribed")
    rec = Recorder(broker, ["out/#", "edge/dev1/errors"]).start()
    paced_stream(broker, "in/s1", readings(10), rate=200).join()
    wait_for_ids(rec, 10, timeout_s=30)  # the first block is reserved: then fill the disk
    with disk_full(small_disk):
        paced_stream(broker, "in/s1", readings(1100)[10:], rate=500).join()
        results = wait_for_ids(rec, 1100, timeout_s=60, agent=agent)
        assert not rec.on("edge/dev1/errors"), rec.payloads("edge/dev1/errors")
        assert agent.wait_for_event("seq_reserve_failed")["pipeline"] == "p"
    paced_stream(broker, "in/s1", readings(1300)[1100:], rate=500).join()
    results = wait_for_ids(rec, 1300, timeout_s=60, agent=agent)
    assert agent.wait_for_event("seq_reserve_recovered")["unpersisted"] > 0
    first_seq: dict[int, int] = {}
    for r in results:
        first_seq.setdefault(r["id"], r["seq"])
    seqs = [first_seq[i] for i in range(1300)]
    assert seqs == sorted(seqs), "seq must only rise"
    assert len(set(seqs)) == 1300, "no seq twice"
    code, _ = agent.terminate()
    assert code == 0
    again = agent_factory(config)
    again.wait_for_event("mqtt_subscribed")
    paced_stream(
        broker, "in/s1", [json.dumps({"id": 5000, "x": [1.0, 1.0, 2.0, 3.0]})], rate=10
    ).join()
    after = rec.wait_for(lambda ms: any(b'"id":5000' in m.payload for m in ms), timeout_s=30)
    last = next(json.loads(m.payload) for m in after if b'"id":5000' in m.payload)
    assert last["seq"] > max(seqs), (last["seq"], max(seqs))
    rec.stop()


def test_a_full_disk_rejects_or_fails_an_update_cleanly_and_the_next_one_succeeds(
    broker: MosquittoBroker,
    tmp_path: Path,
    agent_factory: AgentFactory,
) -> None:
    """models_dir (where updates are staged) and state_dir (the update journal) on a disk
    that fills up. Full when the manifest comes: REJECTED before anything is written (the
    free-space check). Filled while the chunks arrive: FAILED naming the cause, nothing
    half-written left in staging. Either way the old model keeps serving, and once space is
    back the same model under a new update id installs."""
    private, public = make_key(tmp_path / "keys", "ops")
    old, new = linear(tmp_path, 0), linear(tmp_path, 1)
    # Bigger than the 16 MB margin the free-space check keeps, so a transfer can start.
    with tmpfs(tmp_path / "disk", "size=24m") as disk:
        models = disk / "models"
        models.mkdir()
        (models / "lin.onnx").write_bytes(old)
        config = update_config(broker, tmp_path, [public], chunk_timeout_s=30.0)
        config["models_dir"] = str(models)
        config["state_dir"] = str(disk / "state")
        agent = agent_factory(config)
        rec = Recorder(broker, [UPDATE_STATUS, "out/#"]).start()
        agent.wait_for_event("agent_serving")
        wait_subscribed(agent)
        assert serving_version(broker, rec, 1) == version_of(old)
        with disk_full(disk):
            manifest = envelope(payload_for(new, update_id="full-1", version=2), [private])
            send(broker, manifest, chunks_of(new, 4096), update_id="full-1")
            status = final_status(rec, "full-1")
            assert status["state"] == "REJECTED", status["reason"]
            assert "not enough disk space" in status["reason"], status["reason"]
            assert serving_version(broker, rec, 2) == version_of(old)

        manifest = envelope(payload_for(new, update_id="full-2", version=2), [private])
        send(broker, manifest, update_id="full-2")  # the chunks come once the disk is full
        wait_for_step(rec, "full-2", "downloading")
        with disk_full(disk):
            client = publisher(broker)
            for chunk in chunks_of(new, 4096):
                client.publish(f"{DEVICE_BASE}/updates/chunks/full-2", chunk, qos=1)
            client.disconnect()
            client.loop_stop()
            status = final_status(rec, "full-2")
            assert status["state"] == "FAILED", status["reason"]
            assert "No space left on device" in status["reason"], status["reason"]
            assert serving_version(broker, rec, 3) == version_of(old)
        staging = models / ".edge-agent-staging"
        assert not staging.exists() or not list(staging.iterdir())

        manifest = envelope(payload_for(new, update_id="full-3", version=2), [private])
        send(broker, manifest, chunks_of(new, 4096), update_id="full-3")
        assert final_status(rec, "full-3")["state"] == "SUCCEEDED"
        assert serving_version(broker, rec, 4) == version_of(new)
        rec.stop()
        assert agent.process.poll() is None
        agent.terminate()
