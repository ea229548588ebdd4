"""Authenticated and TLS broker connections, with a real Mosquitto configured for each."""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.broker import MosquittoBroker, TlsFiles, make_password_file, make_tls_files
from tests.conftest import AgentProcess, base_config

pytestmark = pytest.mark.broker

AgentFactory = Callable[[dict[str, Any]], AgentProcess]


@pytest.fixture
def auth_broker(tmp_path: Path) -> Iterator[MosquittoBroker]:
    """A broker that only accepts user 'sensor' with password 's3cret'."""
    workdir = tmp_path / "auth-broker"
    workdir.mkdir()
    passwords = make_password_file(workdir / "passwd", "sensor", "s3cret")
    broker = MosquittoBroker(workdir, password_file=passwords)
    broker.start()
    yield broker
    broker.stop()


def test_connects_with_username_and_password_file(
    auth_broker: MosquittoBroker, tmp_path: Path, agent_factory: AgentFactory
) -> None:
    """The password is read from password_file (trailing newline stripped)."""
    secret = tmp_path / "mqtt-password"
    secret.write_text("s3cret\n")
    config = base_config(auth_broker, tmp_path)
    config["mqtt"].update(username="sensor", password_file=str(secret))
    agent = agent_factory(config)
    agent.wait_for_event("mqtt_connected")
    code, _ = agent.terminate()
    assert code == 0


def test_wrong_password_is_refused_and_survived(
    auth_broker: MosquittoBroker, tmp_path: Path, agent_factory: AgentFactory
) -> None:
    """A refused login is logged with the broker's reason; the daemon keeps retrying."""
    secret = tmp_path / "mqtt-password"
    secret.write_text("wrong\n")
    config = base_config(auth_broker, tmp_path)
    config["mqtt"].update(username="sensor", password_file=str(secret))
    agent = agent_factory(config)
    event = agent.wait_for_event("mqtt_connect_refused")
    assert "Not authorized" in event["reason"] or "Bad user name" in event["reason"]
    assert agent.process.poll() is None
    code, took = agent.terminate()
    assert code == 0
    assert took < 5.0


@pytest.fixture
def tls_broker(tmp_path: Path) -> Iterator[tuple[MosquittoBroker, TlsFiles]]:
    """A broker that only speaks TLS, with a certificate from a throw-away CA."""
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command")
    workdir = tmp_path / "tls-broker"
    workdir.mkdir()
    tls = make_tls_files(workdir / "certs")
    broker = MosquittoBroker(workdir, tls=tls)
    broker.start()
    yield broker, tls
    broker.stop()


def test_connects_over_tls_with_a_private_ca(
    tls_broker: tuple[MosquittoBroker, TlsFiles], tmp_path: Path, agent_factory: AgentFactory
) -> None:
    """TLS with the CA from tls.ca_file; the server certificate is verified."""
    broker, tls = tls_broker
    config = base_config(broker, tmp_path)
    config["mqtt"]["tls"] = {"ca_file": str(tls.ca_cert)}
    agent = agent_factory(config)
    agent.wait_for_event("mqtt_connected")
    code, _ = agent.terminate()
    assert code == 0


def test_tls_with_an_untrusted_ca_does_not_connect(
    tls_broker: tuple[MosquittoBroker, TlsFiles], tmp_path: Path, agent_factory: AgentFactory
) -> None:
    """A broker certificate from another CA is refused; the daemon keeps running."""
    broker, _ = tls_broker
    other = make_tls_files(tmp_path / "other-ca")
    config = base_config(broker, tmp_path)
    config["mqtt"]["tls"] = {"ca_file": str(other.ca_cert)}
    agent = agent_factory(config)
    agent.wait_for_event("mqtt_connect_failed")
    assert agent.process.poll() is None
    assert not any(e["event"] == "mqtt_connected" for e in agent.log_events())


def test_status_takes_credentials_on_the_command_line(
    auth_broker: MosquittoBroker, tmp_path: Path
) -> None:
    """`edge-agent status` reaches a broker that refuses anonymous clients with --username
    and --password-file, as publish-update does; without them it says the broker refused."""
    secret = tmp_path / "mqtt-password"
    secret.write_text("s3cret\n")
    secret.chmod(0o600)
    command = [
        sys.executable,
        "-m",
        "agent",
        "status",
        "--port",
        str(auth_broker.port),
        "--wait",
        "0.5",
    ]
    with_user = subprocess.run(
        [*command, "--username", "sensor", "--password-file", str(secret)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert with_user.returncode == 0, with_user.stdout + with_user.stderr
    assert with_user.stdout.startswith("no devices under edge/")
    anonymous = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
    assert anonymous.returncode == 1
    assert "edge-agent status:" in anonymous.stderr
