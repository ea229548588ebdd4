"""Staged rollouts (``publish-update --waves``): the plan and abort rule as pure logic, then
against real daemons on a real broker: an abort before the last wave with a rollback, a
whole fleet that succeeds, and a rollout resumed after the command was SIGKILLed."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest

from agent.cli.main import main
from agent.cli.rollout_plan import (
    AbortRule,
    DeviceRecord,
    RolloutState,
    WaveSize,
    parse_seconds,
    parse_share,
    parse_waves,
    plan_waves,
)
from agent.cli.status import collect
from agent.config.loader import default_config
from tests.broker import MosquittoBroker, Recorder
from tests.conftest import AgentProcess
from tests.onnx_builders import build_linear
from tests.test_updates import agent_config, linear, version_of

AgentFactory = Callable[..., AgentProcess]


# -- the plan, pure -------------------------------------------------------------------------


def test_waves_are_cumulative_counts_then_shares() -> None:
    """1,10%,50%,100% of 30 devices: waves of 1, 2, 12 and 15 devices, in order."""
    sizes = parse_waves("1,10%,50%,100%")
    assert sizes == [
        WaveSize(count=1),
        WaveSize(fraction=0.1),
        WaveSize(fraction=0.5),
        WaveSize(fraction=1.0),
    ]
    devices = [f"d{i:02d}" for i in range(30)]
    waves = plan_waves(devices, sizes)
    assert [len(w) for w in waves] == [1, 2, 12, 15]
    assert [d for wave in waves for d in wave] == devices


def test_a_wave_that_adds_nobody_is_left_out_and_shares_stop_short() -> None:
    """With 3 devices 1,5%,100% is two waves (5 % of 3 is 1: nobody new); a plan that
    ends at 50 % leaves the rest untouched."""
    assert plan_waves(["a", "b", "c"], parse_waves("1,5%,100%")) == [["a"], ["b", "c"]]
    assert plan_waves(["a", "b", "c", "d"], parse_waves("1,50%")) == [["a"], ["b"]]
    assert plan_waves(["a"], parse_waves("5,100%")) == [["a"]]


@pytest.mark.parametrize("bad", ["0", "x", "1.5", "150%", "0%", "", "1,,2"])
def test_bad_wave_specs_say_what_is_wrong(bad: str) -> None:
    with pytest.raises(ValueError, match="--waves"):
        parse_waves(bad)


def test_shares_and_durations() -> None:
    assert parse_share("10%") == pytest.approx(0.1)
    assert parse_share("0.05") == pytest.approx(0.05)
    with pytest.raises(ValueError, match="share"):
        parse_share("120%")
    assert parse_seconds("60s") == 60
    assert parse_seconds("2m") == 120
    assert parse_seconds("1.5") == 1.5


def test_the_abort_rule_counts_bad_outcomes_of_all_targeted_after_the_minimum() -> None:
    """The share is of every device targeted so far (silent ones included); nothing stops
    before ``minimum`` devices finished; at exactly the threshold it goes on."""
    rule = AbortRule(share=0.1, minimum=3)
    assert rule.verdict(["FAILED", "SENT"]) is None  # 1 finished < 3
    assert rule.verdict(["FAILED", "SUCCEEDED", "SUCCEEDED"]) is not None
    ten = ["SUCCEEDED"] * 9 + ["TIMED_OUT"]
    assert rule.verdict(ten) is None  # 10 % is not more than 10 %
    verdict = rule.verdict([*ten, "REJECTED"])
    assert verdict is not None
    assert "2 of 11 targeted" in verdict
    assert rule.verdict(["UNHEALTHY", "SUCCEEDED", "SUCCEEDED", "PENDING"]) is not None


def test_the_state_file_survives_a_round_trip(tmp_path: Path) -> None:
    state = RolloutState(
        update_id="u1",
        model="lin",
        version=2,
        model_sha256="ab" * 32,
        issued_at="2026-12-03T10:00:00Z",
        expires="2026-12-10T10:00:00Z",
        prefix="edge",
        population=["a", "b"],
        waves=[["a"], ["b"]],
        settings={"groups": ["g"]},
    )
    state.devices["a"] = DeviceRecord(wave=0, state="SUCCEEDED", manifest_sha256="cd" * 32)
    path = tmp_path / "state.json"
    state.save(path)
    assert RolloutState.load(path) == state
    path.write_text('{"kind": "something else"}')
    with pytest.raises(ValueError, match="not a rollout state"):
        RolloutState.load(path)


# -- against real daemons -------------------------------------------------------------------


class Fleet:
    """A few daemons in group line3 on one broker, each its own folder and config."""

    def __init__(
        self,
        broker: MosquittoBroker,
        tmp_path: Path,
        agent_factory: AgentFactory,
        names: list[str],
        bad: set[str] = frozenset(),  # type: ignore[assignment]
    ) -> None:
        self.broker, self.tmp_path = broker, tmp_path
        keys = tmp_path / "keys"
        keys.mkdir(exist_ok=True)
        assert main(["keygen", str(keys / "ops")]) == 0
        self.key = keys / "ops.key"
        self.old = linear(tmp_path, 0)
        (tmp_path / "old.onnx").write_bytes(self.old)
        # The new model's input is "features": a pipeline that names "x" cannot use it.
        new = build_linear(tmp_path / "new.onnx", features=4, seed=1, input_name="features")
        self.new = new.read_bytes()
        self.agents: dict[str, AgentProcess] = {}
        self.configs: dict[str, dict[str, object]] = {}
        self._start = agent_factory
        for name in names:
            folder = tmp_path / name
            (folder / "models").mkdir(parents=True)
            (folder / "models" / "lin.onnx").write_bytes(self.old)
            config = agent_config(broker, folder, [keys / "ops.pub"])
            config["device_id"] = name
            config["mqtt"]["client_id"] = f"edge-agent-{name}"
            config["health"] = {"interval_s": 1}
            if name in bad:  # names the old model's input: the new one lacks it
                config["pipelines"]["p"]["input"]["tensor"] = "x"
            self.configs[name] = config
            self.agents[name] = agent_factory(config)
        for agent in self.agents.values():
            agent.wait_for_event("agent_serving", 30)

    def start(self, name: str) -> AgentProcess:
        """Start ``name`` again (same folders, so the same state) after it was stopped."""
        self.agents[name] = self._start(self.configs[name])
        return self.agents[name]

    def command(self, *extra: str) -> list[str]:
        return [
            sys.executable,
            "-m",
            "agent",
            "publish-update",
            str(self.tmp_path / "new.onnx"),
            "--key",
            str(self.key),
            "--model",
            "lin",
            "--version",
            "2",
            "--group",
            "line3",
            "--chunk-size",
            "256",
            "--host",
            self.broker.host,
            "--port",
            str(self.broker.port),
            "--timeout",
            "60",
            "--discover-wait",
            "2",
            *extra,
        ]

    def run(self, *extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            self.command(*extra),
            capture_output=True,
            text=True,
            timeout=240,
            check=False,
            cwd=self.tmp_path,
        )

    def versions(self) -> dict[str, str | None]:
        """Each device's retained model version, read from the broker."""
        mqtt = default_config().mqtt.model_copy(
            update={"host": self.broker.host, "port": self.broker.port}
        )
        views = collect(mqtt, "edge", None, 1.5)
        return {
            name: (views[name].models.get("lin") or {}).get("version") if name in views else None
            for name in self.agents
        }


def manifests_per_device(rec: Recorder) -> Counter[str]:
    return Counter(
        m.topic.split("/")[1]
        for m in rec.messages
        if m.topic.endswith("/updates/manifest") and m.payload
    )


def test_a_rollout_stops_before_the_last_wave_and_rolls_back(
    broker: MosquittoBroker,
    tmp_path: Path,
    agent_factory: AgentFactory,
    recorder: Callable[..., Recorder],
) -> None:
    """Five devices, dev2 cannot serve the new model: waves 1,40%,100% with --abort-failures
    20% --abort-min 2 stop after wave 2 (1 of 2 failed). dev3..dev5 were never sent a
    manifest and serve the old version; with --rollback-on-abort dev1 serves the old bytes
    again (as version 3); the report and the exit code say it failed."""
    fleet = Fleet(
        broker, tmp_path, agent_factory, ["dev1", "dev2", "dev3", "dev4", "dev5"], {"dev2"}
    )
    sent = recorder("edge/+/updates/manifest")
    report = tmp_path / "report.json"
    done = fleet.run(
        "--waves",
        "1,40%,100%",
        "--wave-wait",
        "1s",
        "--abort-failures",
        "20%",
        "--abort-min",
        "2",
        "--rollback-on-abort",
        "--previous",
        str(tmp_path / "old.onnx"),
        "--report",
        str(report),
    )
    output = done.stdout + done.stderr
    assert done.returncode == 1, output
    assert "wave 1/3: 1 device(s), 1 of 5 targeted" in done.stdout
    assert "wave 2/3" in done.stdout
    assert "wave 3/3" not in done.stdout
    assert "ABORTED: 1 of 2 targeted devices" in done.stdout
    assert "rollback: 1 of 1 devices serve the previous model again" in done.stdout
    assert "dev2: FAILED" in done.stdout
    counts = manifests_per_device(sent)
    assert set(counts) == {"dev1", "dev2"}, counts
    assert counts["dev2"] == 1
    assert counts["dev1"] == 2  # the update, then the rollback
    versions = fleet.versions()
    old = version_of(fleet.old)
    assert versions == dict.fromkeys(fleet.agents, old), versions
    document = json.loads(report.read_text())
    assert document["phase"] == "aborted"
    assert document["devices"]["dev1"]["state"] == "SUCCEEDED"
    assert document["devices"]["dev1"]["rollback"] == "SUCCEEDED"
    assert document["devices"]["dev2"]["state"] == "FAILED"
    assert document["not_targeted"] == ["dev3", "dev4", "dev5"]


def test_a_killed_rollout_resumes_without_sending_twice_to_a_finished_device(
    broker: MosquittoBroker,
    tmp_path: Path,
    agent_factory: AgentFactory,
    recorder: Callable[..., Recorder],
) -> None:
    """The command is SIGKILLed while it holds after wave 1; --resume with the state file
    (and a shorter --wave-wait) finishes waves 2 and 3 and never sends dev1 a second
    manifest; the table lists every device with its wave, the exit code is 0 and the whole
    fleet serves the new bytes."""
    fleet = Fleet(broker, tmp_path, agent_factory, ["dev1", "dev2", "dev3"])
    sent = recorder("edge/+/updates/manifest")
    state = tmp_path / "rollout.json"
    command = fleet.command(
        "--waves", "1,2,100%", "--wave-wait", "30s", "--abort-min", "1", "--state", str(state)
    )
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path
    )
    assert process.stdout is not None
    lines = []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        lines.append(line)
        if "wave 1: watching for 30 s" in line:
            break
    else:
        pytest.fail("".join(lines))
    process.send_signal(signal.SIGKILL)  # the state is saved at the end of every wave
    process.wait(10)
    saved = RolloutState.load(state)
    assert saved.devices["dev1"].state == "SUCCEEDED"
    assert manifests_per_device(sent) == Counter({"dev1": 1})

    resumed = fleet.run("--resume", str(state), "--wave-wait", "1s")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "resuming rollout" in resumed.stdout
    assert "wave 3/3 done: 1 succeeded" in resumed.stdout
    assert "completed: 3 succeeded" in resumed.stdout
    table = [line.split() for line in resumed.stdout.splitlines() if line.startswith("dev")]
    assert [(row[0], row[1], row[2]) for row in table] == [
        ("dev1", "1", "SUCCEEDED"),
        ("dev2", "2", "SUCCEEDED"),
        ("dev3", "3", "SUCCEEDED"),
    ]
    assert manifests_per_device(sent) == Counter({"dev1": 1, "dev2": 1, "dev3": 1})
    assert set(fleet.versions().values()) == {version_of(fleet.new)}


def test_devices_offline_when_their_wave_comes_install_the_retained_update_when_back(
    broker: MosquittoBroker,
    tmp_path: Path,
    agent_factory: AgentFactory,
    recorder: Callable[..., Recorder],
) -> None:
    """dev3 is stopped before the rollout, dev2 while wave 1 holds: their wave finds both
    offline, so with --retain they are PENDING (a manifest retained, no chunks sent to
    nobody). Started again while the command waits, each reports waiting_for_transfer,
    the command sends its chunks again and it SUCCEEDED. Started once more, dev3 ignores
    the retained manifest of the version it runs: no status at all."""
    fleet = Fleet(broker, tmp_path, agent_factory, ["dev1", "dev2", "dev3"])
    fleet.agents["dev3"].terminate()
    statuses = recorder("edge/dev3/updates/status")
    command = fleet.command(
        "--waves", "1,100%", "--wave-wait", "4s", "--abort-min", "1", "--retain"
    )
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path
    )
    assert process.stdout is not None
    lines = []
    for line in process.stdout:
        lines.append(line)
        if "wave 1: watching" in line:
            fleet.agents["dev2"].terminate()  # says offline (retained) as it stops
        if "offline device(s) to come back" in line:
            break
    else:
        pytest.fail("".join(lines))
    fleet.start("dev2")
    back = fleet.start("dev3")
    rest, _ = process.communicate(timeout=120)
    output = "".join(lines) + rest
    assert process.returncode == 0, output
    assert "1 offline, their manifests retained" in output
    assert "wave 2/2 done: 2 pending" in output
    assert "dev2: waiting for its chunks, sending them again" in output
    assert "dev3: waiting for its chunks, sending them again" in output
    assert "completed: 3 succeeded" in output
    steps = [json.loads(m.payload).get("step") for m in statuses.messages]
    assert "waiting_for_transfer" in steps
    assert set(fleet.versions().values()) == {version_of(fleet.new)}

    back.terminate()
    seen = len(statuses.messages)
    again = fleet.start("dev3")
    again.wait_for_event("update_manifest_retained_ignored", 30)
    time.sleep(1)
    assert len(statuses.messages) == seen
