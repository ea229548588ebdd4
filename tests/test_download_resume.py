"""Resumable https downloads: Range and If-Range after a broken connection, a fresh download
when the server ignores ranges or the file changed, and the digest check of a resumed file."""

from __future__ import annotations

import hashlib
import os
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from agent.errors import UpdateFailedError
from agent.updates.staged import meta_path, staged_prefix
from agent.updates.transfer import download
from tests.broker import MosquittoBroker, Recorder, make_tls_files
from tests.conftest import AgentProcess
from tests.onnx_builders import build_linear
from tests.test_updates import agent_config, wait_subscribed
from tests.update_helpers import (
    STATUS,
    envelope,
    make_key,
    manifest_statuses,
    payload_for,
    send,
    wait_until,
)

BODY = os.urandom(300_000)
SHA = hashlib.sha256(BODY).hexdigest()


@dataclass
class Server:
    """A local https server for one file, ``/model.onnx``, whose behaviour a test sets."""

    url: str
    ca_file: Path
    body: bytes = BODY
    etag: str | None = '"v1"'
    honour_range: bool = True
    cut_first: int = 0  # this many requests send half of what they announce, then close
    status: int = 200
    trickle: bool = False  # send the body 64 KiB at a time, slowly, while this is true
    sent: int = 0  # body bytes sent, by all requests
    requests: list[dict[str, str]] = field(default_factory=list)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    """The server, on a free port of 127.0.0.1, with a throw-away CA."""
    tls = make_tls_files(tmp_path / "tls")
    state: list[Server] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            srv = state[0]
            srv.requests.append(dict(self.headers.items()))
            if srv.status != 200:
                self.send_response(srv.status)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            start = 0
            wanted = self.headers.get("Range")
            if_range = self.headers.get("If-Range")
            if srv.honour_range and wanted and (if_range is None or if_range == srv.etag):
                start = int(wanted.removeprefix("bytes=").rstrip("-"))
            body = srv.body[start:]
            self.send_response(206 if start else 200)
            if start:
                total = len(srv.body)
                self.send_header("Content-Range", f"bytes {start}-{total - 1}/{total}")
            if srv.etag:
                self.send_header("ETag", srv.etag)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if srv.cut_first > 0:
                srv.cut_first -= 1
                self.wfile.write(body[: len(body) // 2])
                self.wfile.flush()
                self.close_connection = True
                self.connection.shutdown(2)
                return
            for offset in range(0, len(body), 64 * 1024):
                if srv.trickle:
                    time.sleep(0.1)
                self.wfile.write(body[offset : offset + 64 * 1024])
                srv.sent += len(body[offset : offset + 64 * 1024])

        def log_message(self, format: str, *args: Any) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(tls.server_cert, tls.server_key)
    httpd.socket = context.wrap_socket(httpd.socket, server_side=True)
    state.append(Server(f"https://127.0.0.1:{httpd.server_address[1]}/model.onnx", tls.ca_cert))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield state[0]
    httpd.shutdown()
    httpd.server_close()


def fetch(server: Server, staged: Path, sha256: str = SHA) -> None:
    """``download`` the server's file into ``staged`` as the daemon does."""
    download(
        server.url,
        staged,
        len(server.body),
        ca_file=str(server.ca_file),
        connect_timeout_s=5,
        deadline_s=60,
        sha256=sha256,
    )


def test_a_connection_cut_mid_body_resumes_with_a_range_request(
    server: Server, tmp_path: Path
) -> None:
    """The second request asks for the rest only (Range and If-Range), and the result is
    whole; the sidecar is gone afterwards."""
    server.cut_first = 1
    staged = tmp_path / "u1.part"
    fetch(server, staged)
    assert staged.read_bytes() == BODY
    assert len(server.requests) == 2
    assert server.requests[1]["Range"] == f"bytes={len(BODY) // 2}-"
    assert server.requests[1]["If-Range"] == '"v1"'
    assert not meta_path(staged).exists()


def test_a_server_that_ignores_range_gets_a_fresh_download(server: Server, tmp_path: Path) -> None:
    """A 200 to a resume replaces the staged prefix with the whole file."""
    server.cut_first, server.honour_range = 1, False
    staged = tmp_path / "u1.part"
    fetch(server, staged)
    assert staged.read_bytes() == BODY
    assert len(server.requests) == 2


def test_a_changed_file_is_downloaded_afresh(server: Server, tmp_path: Path) -> None:
    """If-Range with the old ETag gets the changed file whole (200), never a mix of the two;
    its bytes then fail the manifest's digest."""
    server.cut_first = 5
    staged = tmp_path / "u1.part"
    with pytest.raises(UpdateFailedError, match="5 attempts"):
        fetch(server, staged)
    assert staged_prefix(staged, server.url, len(BODY), SHA) > 0
    new = os.urandom(len(BODY))
    server.body, server.etag, server.cut_first = new, '"v2"', 0
    with pytest.raises(UpdateFailedError, match="hash to"):
        fetch(server, staged)
    assert server.requests[-1]["If-Range"] == '"v1"'
    assert staged.read_bytes() == new


def test_a_corrupt_staged_prefix_is_caught_by_the_digest(server: Server, tmp_path: Path) -> None:
    """A prefix altered on disk resumes, fails the digest, and is downloaded afresh once."""
    server.cut_first = 5
    staged = tmp_path / "u1.part"
    with pytest.raises(UpdateFailedError, match="5 attempts"):
        fetch(server, staged)
    with staged.open("r+b") as handle:
        handle.write(b"\0" * 100)
    fetch(server, staged)
    assert staged.read_bytes() == BODY
    assert "Range" not in server.requests[-1]


def test_a_fresh_download_with_other_bytes_names_both_digests(
    server: Server, tmp_path: Path
) -> None:
    """Bytes that do not hash to the signed digest fail, naming what they hash to."""
    with pytest.raises(UpdateFailedError, match=f"hash to {SHA[:16]}.*signs {'0' * 16}"):
        fetch(server, tmp_path / "u1.part", "0" * 64)


def test_not_found_is_not_retried(server: Server, tmp_path: Path) -> None:
    """An HTTP error is the server's answer: one request, and the reason names it."""
    server.status = 404
    with pytest.raises(UpdateFailedError, match="HTTP 404"):
        fetch(server, tmp_path / "u1.part")
    assert len(server.requests) == 1


def test_a_connection_that_keeps_breaking_gives_up_after_the_attempts(
    server: Server, tmp_path: Path
) -> None:
    """Five broken connections end the download, with the attempts and bytes named; the
    staged prefix and its sidecar stay for a later resume."""
    server.cut_first = 100
    staged = tmp_path / "u1.part"
    with pytest.raises(UpdateFailedError, match=r"after 5 attempts, \d+ of 300000 bytes"):
        fetch(server, staged)
    assert len(server.requests) == 5
    assert "Range" in server.requests[1]
    assert 0 < staged_prefix(staged, server.url, len(BODY), SHA) < len(BODY)


def test_without_a_validator_nothing_is_resumed(server: Server, tmp_path: Path) -> None:
    """No ETag (nor Last-Modified): a resume could mix two files, so each attempt is fresh."""
    server.etag, server.cut_first = None, 1
    staged = tmp_path / "u1.part"
    fetch(server, staged)
    assert staged.read_bytes() == BODY
    assert all("Range" not in request for request in server.requests)


# -- through the daemon: a SIGKILL mid-download, then the retained manifest resumes it ----------


@pytest.mark.broker
def test_a_download_cut_by_sigkill_resumes_after_the_restart(
    server: Server,
    broker: MosquittoBroker,
    tmp_path: Path,
    agent_factory: Callable[[dict[str, Any]], AgentProcess],
    recorder: Callable[..., Recorder],
) -> None:
    """A daemon killed mid-download keeps what it staged; started again, it takes the
    retained manifest, asks only for the rest (Range), and installs the model. Started once
    more, it ignores the retained manifest of the version it runs: no status at all."""
    private, public = make_key(tmp_path / "keys", "ops")
    (tmp_path / "models").mkdir(exist_ok=True)
    old = build_linear(tmp_path / "old.onnx", features=4).read_bytes()
    (tmp_path / "models" / "lin.onnx").write_bytes(old)
    new = build_linear(tmp_path / "new.onnx", features=4, pad_bytes=2_000_000).read_bytes()
    server.body, server.trickle = new, True
    config = agent_config(broker, tmp_path, [public], ca_file=str(server.ca_file))
    rec = recorder(STATUS)
    manifest = envelope(payload_for(new, update_id="big", version=2, url=server.url), [private])
    agent = agent_factory(config)
    wait_subscribed(agent)
    send(broker, manifest, retain=True)
    wait_until(lambda: server.sent > len(new) // 4, 30, "a quarter of the model sent")
    agent.kill()
    server.trickle = False

    again = agent_factory(config)
    # First the interrupted attempt's FAILED (from the journal), then the retained manifest's
    # second attempt.
    rec.wait_for(
        lambda _: any(s["state"] == "SUCCEEDED" for s in manifest_statuses(rec, manifest)), 60
    )
    assert server.requests[-1]["Range"].startswith("bytes=")
    assert int(server.requests[-1]["Range"][6:-1]) > 0
    interrupted = [s for s in manifest_statuses(rec, manifest) if s["state"] == "FAILED"]
    assert interrupted
    assert "bytes downloaded are kept" in interrupted[0]["reason"]
    again.terminate()

    answered = len(manifest_statuses(rec, manifest))
    third = agent_factory(config)
    third.wait_for_event("update_manifest_retained_ignored", 30)
    third.terminate()
    assert len(manifest_statuses(rec, manifest)) == answered
