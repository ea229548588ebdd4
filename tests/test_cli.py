"""The command line: help, version, exit codes, and check-config output."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

import agent.daemon.lifecycle
from agent import __version__
from agent.cli import main as cli

REPO = Path(__file__).resolve().parent.parent


def edge_agent(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agent", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=env,
    )


def test_version() -> None:
    """--version prints the package version and exits 0."""
    done = edge_agent("--version")
    assert done.returncode == 0
    assert done.stdout.strip() == f"edge-agent {__version__}"


@pytest.mark.parametrize("command", [[], ["run"], ["check-config"], ["detect"], ["status"]])
def test_help_for_every_command(command: list[str]) -> None:
    """--help works for the program and each command."""
    done = edge_agent(*command, "--help")
    assert done.returncode == 0
    assert "usage: edge-agent" in done.stdout


@pytest.mark.parametrize("args", [[], ["bogus"], ["check-config"], ["run", "--log-level", "x"]])
def test_usage_errors_exit_2(args: list[str]) -> None:
    """Wrong usage exits 2 with a usage message."""
    done = edge_agent(*args)
    assert done.returncode == 2
    assert "usage:" in done.stderr


def test_check_config_valid_example() -> None:
    """The shipped example config passes check-config with exit 0."""
    done = edge_agent("check-config", str(REPO / "config" / "agent.example.yaml"))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "ok" in done.stdout


def test_check_config_reports_one_line_per_problem(tmp_path: Path) -> None:
    """A misspelt key, a wrong type and a missing model: three FILE:LINE lines, exit 1."""
    path = tmp_path / "bad.yaml"
    path.write_text(
        textwrap.dedent("""
        device_id: gw1
        mqtt:
          hostt: broker
          keepalive_s: soon
        models:
          vib: {}
        pipelines:
          p:
            model: vibe
            input: {topic: a/+}
        """).lstrip()
    )
    done = edge_agent("check-config", str(path))
    assert done.returncode == 1
    lines = done.stdout.splitlines()
    assert lines == [
        f"{path}:3: mqtt.hostt: unknown key 'hostt', did you mean 'host'?",
        f"{path}:4: mqtt.keepalive_s: Input should be a valid integer (got 'soon')",
        f"{path}:9: pipelines.p.model: model 'vibe' is not defined under models (vib), "
        "did you mean 'vib'?",
    ]
    assert "3 problems" in done.stderr


def test_run_with_invalid_config_exits_1(tmp_path: Path) -> None:
    """run refuses an invalid config with exit 1 and logs each problem."""
    path = tmp_path / "bad.yaml"
    path.write_text("device_id: a\nmqtt: {port: zero}\n")
    done = edge_agent("run", "--config", str(path))
    assert done.returncode == 1
    events = [json.loads(line) for line in done.stdout.splitlines()]
    assert [e["event"] for e in events] == ["config_invalid"]
    assert "mqtt.port" in events[0]["problem"]


def test_run_with_explicit_missing_config_exits_1(tmp_path: Path) -> None:
    """A config named on the command line must exist."""
    done = edge_agent("run", "--config", str(tmp_path / "nope.yaml"))
    assert done.returncode == 1
    assert "cannot read file" in done.stdout


def test_run_without_any_config_uses_defaults(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """No --config, no $EDGE_AGENT_CONFIG, no default file: built-in defaults, said in the log."""
    monkeypatch.delenv("EDGE_AGENT_CONFIG", raising=False)
    monkeypatch.setattr(cli, "DEFAULT_CONFIG_PATH", tmp_path / "absent.yaml")
    monkeypatch.setattr("agent.config.loader.DEFAULT_CONFIG_PATH", tmp_path / "absent.yaml")
    started: list[object] = []

    def fake_run(self: agent.daemon.lifecycle.Daemon) -> int:
        started.append(self.config)
        return 0

    monkeypatch.setattr(agent.daemon.lifecycle.Daemon, "run", fake_run)
    out = io.StringIO()
    monkeypatch.setattr(sys, "stdout", out)
    assert cli.main(["run", "--log-format", "json"]) == 0
    events = [json.loads(line) for line in out.getvalue().splitlines()]
    assert events[0]["event"] == "config_not_found"
    assert events[0]["action"] == "running with the built-in defaults"
    assert len(started) == 1


def test_detect_json_on_this_machine() -> None:
    """detect --json prints valid JSON with hardware, available_providers and chosen."""
    done = edge_agent("detect", "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["hardware"]["logical_cpus"] >= 1
    assert "CPUExecutionProvider" in report["available_providers"]
    assert report["chosen"][-1]["name"] == "CPUExecutionProvider"
    assert report["session"]["intra_op_num_threads"] >= 1


def test_detect_text_on_a_fixture_tree() -> None:
    """detect --root reads a fixture tree: a Jetson with CPU-only onnxruntime gets a hint."""
    done = edge_agent(
        "detect",
        "--root",
        str(REPO / "tests/fixtures/hw/jetson-orin-nano-jp6"),
        "--machine",
        "aarch64",
    )
    assert done.returncode == 0, done.stderr
    assert "JetPack 6.0" in done.stdout
    assert "hint: install NVIDIA's onnxruntime-gpu wheel for JetPack 6.0" in done.stdout


@pytest.mark.broker
def test_status_shows_two_running_daemons(broker: Any, tmp_path: Path, agent_factory: Any) -> None:
    """`edge-agent status` against a broker with two daemons lists both, online, with their
    models and health."""
    from tests.conftest import base_config  # noqa: PLC0415
    from tests.onnx_builders import build_linear  # noqa: PLC0415

    build_linear(tmp_path / "models" / "lin.onnx")
    agents = []
    for device in ("gw-a", "gw-b"):
        config = base_config(
            broker,
            tmp_path,
            device_id=device,
            models={"lin": {}},
            health={"interval_s": 0.5},
            pipelines={
                "p": {
                    "model": "lin",
                    "input": {"topic": f"{device}/in/+"},
                    "output": {"topic": f"{device}/out/{{1}}"},
                }
            },
            state_dir=str(tmp_path / f"state-{device}"),
        )
        agents.append(agent_factory(config))
    for process in agents:
        process.wait_for_event("agent_serving")
    import time  # noqa: PLC0415

    time.sleep(1.0)
    done = edge_agent("status", "--port", str(broker.port), "--wait", "1")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].split()[:2] == ["DEVICE", "ONLINE"]
    rows = {line.split()[0]: line for line in lines[1:]}
    assert set(rows) == {"gw-a", "gw-b"}
    assert all(" yes " in row and "lin:READY:" in row and "s ago" in row for row in rows.values())
    agents[1].kill()
    time.sleep(0.5)
    done = edge_agent("status", "--port", str(broker.port), "--wait", "1", "--json")
    report = json.loads(done.stdout)
    assert report["gw-b"]["status"] == "offline"
    assert report["gw-a"]["status"] == "online"
