"""The MQTT broker `make demo` and the quickstart use, chosen in this order:

1. one already answering on the host and port (default 127.0.0.1:1883);
2. a private Mosquitto started on that port, when Mosquitto is installed;
3. otherwise the embedded amqtt broker (scripts/embedded_broker.py, MQTT 3.1.1), for trying
   edge-agent only; the screen names the command that installs Mosquitto.

Shared by scripts/demo.py and scripts/broker.py; the first line either prints names the
broker chosen.
"""

from __future__ import annotations

import contextlib
import getpass
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
INSTALL_MOSQUITTO = "sudo apt-get install mosquitto"


def say(text: str = "") -> None:
    """Print at once: the output may be a pipe. An output that went away (a closed pipe or
    terminal) must not stop the clean-up."""
    with contextlib.suppress(OSError, ValueError):
        print(text, flush=True)


def shown(path: Path) -> str:
    """``path`` relative to the repository when it is inside it (shorter on screen)."""
    try:
        return str(path.relative_to(REPO))
    except ValueError:
        return str(path)


@dataclass
class Broker:
    """The broker chosen, and what it takes to stop it."""

    kind: str  # "existing", "mosquitto" or "embedded"
    protocol: str  # the daemon's mqtt.protocol: "5", or "3.1.1" for amqtt
    stop: Callable[[], None]

    @property
    def started_here(self) -> bool:
        """Whether it was started here (it forgets everything when stopped)."""
        return self.kind != "existing"


def broker_answers(host: str, port: int) -> bool:
    """Whether something accepts TCP connections on host:port."""
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def mosquitto_binary() -> str | None:
    """The mosquitto to start: $MOSQUITTO, else the one on PATH, else Debian's path."""
    import os  # noqa: PLC0415 - only here

    override = os.environ.get("MOSQUITTO")
    candidate = override or shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    return candidate if Path(candidate).is_file() else None


def start_broker(
    host: str, port: int, run_dir: Path, choice: str, *, who: str, existing_note: str = ""
) -> Broker:
    """The broker of the module docstring (``choice``: auto, mosquitto or embedded), its
    files in ``run_dir``; ``who`` (e.g. "the demo") starts and stops it. Exits with the
    reason when there is none."""
    answering = broker_answers(host, port)
    if choice == "auto" and answering:
        say(f"broker: the MQTT broker already answering on {host}:{port}{existing_note}")
        return Broker("existing", "5", lambda: None)
    if answering:
        sys.exit(
            f"--broker {choice}: something already listens on {host}:{port}; choose another --port"
        )
    if host not in ("127.0.0.1", "localhost", "::1"):
        sys.exit(f"no MQTT broker answers on {host}:{port} ({who} starts one only on 127.0.0.1)")
    binary = mosquitto_binary()
    if choice == "mosquitto" or (choice == "auto" and binary is not None):
        if binary is None:
            sys.exit(f"mosquitto is not installed: {INSTALL_MOSQUITTO}")
        return start_mosquitto(binary, host, port, run_dir, who)
    return start_embedded(host, port, run_dir, who)


def start_mosquitto(binary: str, host: str, port: int, run_dir: Path, who: str) -> Broker:
    """A private Mosquitto without persistence: it forgets everything when stopped."""
    run_dir.mkdir(parents=True, exist_ok=True)
    conf = run_dir / "mosquitto.conf"
    log_file = run_dir / "mosquitto.log"
    # Started as root, mosquitto switches to user "mosquitto", who may not write log_file.
    conf.write_text(
        f"listener {port} {host}\nallow_anonymous true\nset_tcp_nodelay true\n"
        f"user {getpass.getuser()}\nlog_dest file {log_file}\n"
    )
    process = subprocess.Popen(
        [binary, "-c", str(conf)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and process.poll() is None:
        if broker_answers(host, port):
            say(f"broker: a private Mosquitto on {host}:{port} ({binary}), stopped with {who}")

            def stop() -> None:
                process.terminate()
                try:
                    process.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()

            return Broker("mosquitto", "5", stop)
        time.sleep(0.05)
    process.kill()
    process.wait()
    sys.exit(f"mosquitto did not start on {host}:{port}; see {shown(log_file)}")


def start_embedded(host: str, port: int, run_dir: Path, who: str) -> Broker:
    """amqtt in this process (MQTT 3.1.1), for a machine without Mosquitto."""
    from embedded_broker import EmbeddedBroker, available  # noqa: PLC0415 - amqtt is optional

    if not available():
        sys.exit(
            f"no MQTT broker on {host}:{port}, Mosquitto is not installed and neither is "
            f"amqtt (`make demo` installs it). Install Mosquitto: {INSTALL_MOSQUITTO}"
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    broker = EmbeddedBroker(host, port, run_dir / "broker.log")
    try:
        broker.start()
    except OSError as exc:
        sys.exit(f"the embedded broker could not listen on {host}:{port}: {exc}")
    say(
        f"broker: Mosquitto is not installed, so {who} runs the embedded amqtt broker on "
        f"{host}:{port} (MQTT 3.1.1, pure Python, for trying edge-agent only)"
    )
    say(f"        install Mosquitto with: {INSTALL_MOSQUITTO}")
    return Broker("embedded", "3.1.1", broker.stop)
