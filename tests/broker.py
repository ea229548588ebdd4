"""A private Mosquitto for tests, plus an MQTT client that records what it receives."""

from __future__ import annotations

import getpass
import json
import os
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

LISTENER_LINE = "listener {port} 127.0.0.1"
# Every MQTT client and stream thread the helpers start, so that the test's teardown can stop
# what a failing test left running (its network thread would reconnect for the whole session).
_started_clients: list[paho.Client] = []
_started_streams: list[tuple[threading.Thread, threading.Event]] = []
BIND_ATTEMPTS = 5
# Saving persistence on a loaded CI disk can take seconds: SIGKILL is the last resort.
STOP_TIMEOUT_S = 30.0
# A broker that does not listen this long after it was started is an error (generous: the
# suite also runs beside CPU hogs).
READY_TIMEOUT_S = 30.0


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(
    port: int, timeout_s: float = 10.0, process: subprocess.Popen[bytes] | None = None
) -> None:
    """Block until something accepts connections on 127.0.0.1:port (or ``process`` exits)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise TimeoutError(f"the process exited with {process.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.02)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout_s} s")


def listens_on(pid: int, port: int) -> bool:
    """Whether process ``pid`` owns the socket listening on 127.0.0.1:``port`` (Linux /proc).

    Connecting is not proof: another process may hold a port ``free_port`` handed out."""
    inodes = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, state, inode = fields[1], fields[3], fields[9]
        if state == "0A" and int(local.split(":")[1], 16) == port:  # 0A: LISTEN
            inodes.add(f"socket:[{inode}]")
    try:
        owned = {os.readlink(fd) for fd in Path(f"/proc/{pid}/fd").iterdir()}
    except OSError:
        return False
    return bool(inodes & owned)


class MosquittoBroker:
    """A mosquitto process on a free port with its own config file; can be restarted."""

    def __init__(
        self,
        workdir: Path,
        *,
        persistence: bool = False,
        password_file: Path | None = None,
        tls: TlsFiles | None = None,
        extra_lines: tuple[str, ...] = (),
    ) -> None:
        binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        if not Path(binary).exists():
            raise RuntimeError("mosquitto is not installed (apt-get install -y mosquitto)")
        self.binary = binary
        self.workdir = workdir
        self.host = "127.0.0.1"
        self.port = free_port()
        self.config_file = workdir / "mosquitto.conf"
        self.log_file = workdir / "mosquitto.log"
        lines = [LISTENER_LINE.format(port=self.port)]
        if tls is not None:
            lines += [
                f"cafile {tls.ca_cert}",
                f"certfile {tls.server_cert}",
                f"keyfile {tls.server_key}",
            ]
        if password_file is not None:
            lines += ["allow_anonymous false", f"password_file {password_file}"]
        else:
            lines += ["allow_anonymous true"]
        lines += [
            # Started as root, mosquitto switches to user "mosquitto", which cannot read the
            # test's private folders: stay the user who runs the tests.
            f"user {getpass.getuser()}",
            # Without it QoS 1 delivery to a subscriber stalls at ~60 messages/s (Nagle).
            "set_tcp_nodelay true",
            f"log_dest file {self.log_file}",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "max_queued_messages 100000",
        ]
        if persistence:
            lines += ["persistence true", f"persistence_location {workdir}/"]
        lines += list(extra_lines)
        self.config_file.write_text("\n".join(lines) + "\n")
        self._process: subprocess.Popen[bytes] | None = None
        self.started_once = False

    def start(self) -> None:
        """Start mosquitto and wait until it accepts connections.

        ``free_port`` only found a port that was free a moment ago: if another process took
        it in between, the first start moves to a new port (a restart must keep its port:
        clients reconnect to it, so it tries the same one again)."""
        for attempt in range(BIND_ATTEMPTS):
            log_size = self.log_file.stat().st_size if self.log_file.exists() else 0
            self._process = subprocess.Popen(
                [self.binary, "-c", str(self.config_file)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )
            try:
                self._wait_ready(self._process)
            except TimeoutError as exc:
                log = self.log_file.read_text()[log_size:] if self.log_file.exists() else ""
                if self._process.poll() is not None and self._process.stderr is not None:
                    log += self._process.stderr.read().decode(errors="replace")
                self.stop()
                if "Address already in use" not in log or attempt == BIND_ATTEMPTS - 1:
                    raise TimeoutError(f"{exc}; mosquitto log:\n{log}") from exc
                if self.started_once:
                    time.sleep(0.5)
                else:
                    self._move_to(free_port())
            else:
                self.started_once = True
                return

    def _wait_ready(self, process: subprocess.Popen[bytes]) -> None:
        """Wait until this mosquitto itself listens on the port, as /proc shows it. A connect
        is no proof: another process may hold the port, and a connect to a port of the
        ephemeral range nobody listens on yet can reach itself (TCP self-connect), which
        under load once passed for a broker that was not ready."""
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not listens_on(process.pid, self.port):
            if process.poll() is not None:  # it could not bind: the port is taken
                raise TimeoutError(
                    f"mosquitto exited with {process.returncode} on port {self.port}"
                )
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"mosquitto does not listen on {self.port} after {READY_TIMEOUT_S} s"
                )
            time.sleep(0.02)

    def _move_to(self, port: int) -> None:
        text = self.config_file.read_text()
        self.config_file.write_text(
            text.replace(LISTENER_LINE.format(port=self.port), LISTENER_LINE.format(port=port), 1)
        )
        self.port = port

    def stop(self) -> None:
        """Stop mosquitto (SIGTERM) and wait for it to exit.

        A broker that needs SIGKILL has not written its persistence file, so a test that
        restarts it would see messages lost by the harness, not by the daemon: that is an
        error here, named as such."""
        if self._process is None:
            return
        process, self._process = self._process, None
        process.terminate()
        try:
            process.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            raise RuntimeError(
                f"mosquitto did not exit within {STOP_TIMEOUT_S} s of SIGTERM "
                "and was killed: what it held in memory is lost"
            ) from None
        finally:
            if process.stderr:
                process.stderr.close()

    def restart(self, down_s: float = 0.0) -> None:
        """Stop, optionally stay down for ``down_s`` seconds, and start again on the same port."""
        self.stop()
        time.sleep(down_s)
        self.start()


@dataclass(frozen=True)
class TlsFiles:
    """A throw-away CA and a server certificate for 127.0.0.1 signed by it."""

    ca_cert: Path
    server_cert: Path
    server_key: Path


def make_tls_files(folder: Path) -> TlsFiles:
    """Create a CA and a server certificate (SAN IP:127.0.0.1) with the openssl command."""
    folder.mkdir(parents=True, exist_ok=True)
    ca_key, ca_cert = folder / "ca.key", folder / "ca.crt"
    key, csr, cert = folder / "server.key", folder / "server.csr", folder / "server.crt"
    ext = folder / "san.ext"
    ext.write_text("subjectAltName=IP:127.0.0.1\n")

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True)

    openssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        str(ca_key),
        "-out",
        str(ca_cert),
        "-days",
        "2",
        "-subj",
        "/CN=edge-agent test CA",
    )
    openssl(
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        str(key),
        "-out",
        str(csr),
        "-subj",
        "/CN=127.0.0.1",
    )
    openssl(
        "x509",
        "-req",
        "-in",
        str(csr),
        "-CA",
        str(ca_cert),
        "-CAkey",
        str(ca_key),
        "-CAcreateserial",
        "-out",
        str(cert),
        "-days",
        "2",
        "-extfile",
        str(ext),
    )
    key.chmod(0o644)  # mosquitto may run as another user and must read it
    return TlsFiles(ca_cert, cert, key)


def make_password_file(path: Path, user: str, password: str) -> Path:
    """A Mosquitto password file holding one user."""
    path.write_text("")
    subprocess.run(
        ["mosquitto_passwd", "-b", str(path), user, password], check=True, capture_output=True
    )
    return path


@dataclass
class Received:
    """One message seen by a ``Recorder``."""

    topic: str
    payload: bytes
    retain: bool
    properties: Any = None


@dataclass
class Recorder:
    """An MQTT client that subscribes to filters and records every message it receives."""

    broker: MosquittoBroker
    filters: list[str]
    protocol: MQTTProtocolVersion = MQTTProtocolVersion.MQTTv5
    messages: list[Received] = field(default_factory=list)
    # A persistent session: the broker keeps what arrives while this recorder reconnects
    # (across broker restarts too, when the broker has persistence).
    session: str | None = None

    def __post_init__(self) -> None:
        self._cond = threading.Condition()
        self._subscribed = threading.Event()
        self.client = paho.Client(
            CallbackAPIVersion.VERSION2, protocol=self.protocol, client_id=self.session or ""
        )
        self.client.reconnect_delay_set(1, 1)
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = lambda *args: self._subscribed.set()
        self.client.on_message = self._on_message

    def start(self) -> Recorder:
        """Connect, subscribe and wait until the subscription is acknowledged."""
        self._subscribed.clear()
        if self.session:
            properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            properties.SessionExpiryInterval = 3600
            self.client.connect(
                self.broker.host, self.broker.port, clean_start=False, properties=properties
            )
        else:
            self.client.connect(self.broker.host, self.broker.port)
        self.client.loop_start()
        _started_clients.append(self.client)
        if not self._subscribed.wait(10):
            raise TimeoutError("subscription not acknowledged")
        return self

    def stop(self) -> None:
        """Disconnect."""
        self.client.disconnect()
        self.client.loop_stop()

    def _on_connect(
        self, client: paho.Client, userdata: Any, flags: Any, reason: Any, properties: Any
    ) -> None:
        client.subscribe([(f, 1) for f in self.filters])

    def _on_message(self, client: paho.Client, userdata: Any, message: paho.MQTTMessage) -> None:
        with self._cond:
            self.messages.append(
                Received(
                    message.topic,
                    bytes(message.payload),
                    bool(message.retain),
                    getattr(message, "properties", None),
                )
            )
            self._cond.notify_all()

    def payloads(self, prefix: str) -> list[dict[str, Any]]:
        """JSON payloads of the messages whose topic starts with ``prefix``, in arrival order."""
        with self._cond:
            return [json.loads(m.payload) for m in self.messages if m.topic.startswith(prefix)]

    def on(self, topic: str) -> list[Received]:
        """Messages received so far on ``topic``."""
        with self._cond:
            return [m for m in self.messages if m.topic == topic]

    def wait_for(
        self, predicate: Callable[[list[Received]], bool], timeout_s: float = 10.0
    ) -> list[Received]:
        """Wait until ``predicate(messages)`` holds; return the messages; raise on timeout."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while not predicate(self.messages):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    shown = [(m.topic, m.payload[:200]) for m in self.messages[-10:]]
                    raise TimeoutError(f"condition not met in {timeout_s} s; last: {shown}")
                self._cond.wait(remaining)
            return list(self.messages)

    def wait_for_payload(
        self, topic: str, payload: bytes, timeout_s: float = 10.0, after: int = 0
    ) -> None:
        """Wait for ``payload`` on ``topic`` among the messages from index ``after`` on."""
        self.wait_for(
            lambda ms: any(m.topic == topic and m.payload == payload for m in ms[after:]), timeout_s
        )


def publisher(
    broker: MosquittoBroker, protocol: MQTTProtocolVersion = MQTTProtocolVersion.MQTTv5
) -> paho.Client:
    """A connected client for publishing test readings (call ``loop_stop`` when done)."""
    client = paho.Client(CallbackAPIVersion.VERSION2, protocol=protocol)
    client.reconnect_delay_set(1, 1)  # tests restart brokers: come back at once
    client.connect(broker.host, broker.port)
    client.loop_start()
    _started_clients.append(client)
    return client


def track_client(client: paho.Client) -> None:
    """Have a client started outside this module disconnected after the test too, even one
    whose test failed before its own ``stop``."""
    _started_clients.append(client)


def started_so_far() -> tuple[int, int]:
    """A mark for ``stop_started_since``: how many clients and streams were started."""
    return len(_started_clients), len(_started_streams)


def stop_started_since(mark: tuple[int, int]) -> list[str]:
    """Stop the stream threads and disconnect the clients started after ``mark``; return
    the stream threads that would not stop. Stopping twice is harmless, so this also
    catches what a failing test never reached its own ``stop`` for."""
    clients, streams = mark
    leftovers = []
    while len(_started_streams) > streams:
        thread, stop = _started_streams.pop()
        stop.set()
        thread.join(timeout=10)
        if thread.is_alive():
            leftovers.append(thread.name)
    while len(_started_clients) > clients:
        client = _started_clients.pop()
        client.disconnect()
        client.loop_stop()
    return leftovers


def paced_stream(
    broker: MosquittoBroker, topic: str, payloads: Sequence[bytes | str], rate: float, qos: int = 1
) -> threading.Thread:
    """Publish ``payloads`` at ``rate`` per second from a background thread (started)."""
    stop = threading.Event()

    def run() -> None:
        client = publisher(broker)
        acknowledged = threading.Semaphore(0)
        # paho's network thread: once per message the broker acknowledged (QoS 1).
        client.on_publish = lambda *args: acknowledged.release()
        started = time.monotonic()
        sent = 0
        for index, payload in enumerate(payloads):
            delay = started + index / rate - time.monotonic()
            if delay > 0 and stop.wait(delay):
                break
            client.publish(topic, payload, qos=qos)
            sent += 1
        # QoS 1 messages published while the broker was away wait in paho's queue: let them
        # all be acknowledged before disconnecting, which would drop them. (Their
        # MQTTMessageInfo cannot tell: it raises "not currently connected".)
        deadline = time.monotonic() + 30
        pending = sent if qos > 0 else 0
        while pending and time.monotonic() < deadline and not stop.is_set():
            if acknowledged.acquire(timeout=0.05):
                pending -= 1
        client.disconnect()
        client.loop_stop()

    thread = threading.Thread(target=run, name="paced-stream")
    thread.start()
    _started_streams.append((thread, stop))
    return thread
