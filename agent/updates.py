"""Signed fleet model updates: verify, transfer, install atomically, trial, commit or roll back.

Threads and what they own:
- paho's network thread calls ``on_manifest`` and ``on_chunk``: they only enqueue.
- the intake thread ("updates") owns the updates being transferred: it verifies manifests,
  writes chunks into staging files, watches for stalls and hands complete transfers on.
- download threads stream https sources and report back through the intake queue.
- the install thread ("updates-install") verifies the staged bytes, installs them, runs the
  trial through the model registry (the same load path as a file dropped by hand), and
  commits or rolls back. One install at a time.
Every step is journalled in ``UpdateStore`` before its effects, so ``recover`` (at start-up,
before models load) can finish what a crash or power cut interrupted.
"""

from __future__ import annotations

import base64
import contextlib
import json
import queue
import shutil
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import paho.mqtt.client as paho
import structlog

from agent.codecs import encode_json
from agent.config import AgentConfig
from agent.errors import UpdateFailedError, UpdateKeyError, UpdateRejectedError
from agent.failpoints import failpoint
from agent.install import (
    clean_staging,
    file_sha256,
    install,
    restore_previous,
    staging_dir,
    verify_staged,
)
from agent.manifest import ChunkSource, UpdateManifest, applicability_problem, parse_payload
from agent.models import ModelRegistry
from agent.mqtt import Subscription
from agent.transfer import ChunkTransfer, DownloadThread, download
from agent.update_store import JournalEntry, UpdateStore

if TYPE_CHECKING:
    from agent.signing import TrustedKeys

log = structlog.get_logger(__name__)

QUEUED, IN_PROGRESS = "QUEUED", "IN_PROGRESS"
SUCCEEDED, FAILED, REJECTED = "SUCCEEDED", "FAILED", "REJECTED"
# Chunks waiting for the intake thread. It only writes them to disk, so the queue stays
# near-empty; the cap keeps a flood (or a stuck disk) from growing memory without bound.
INBOX_MAX_BYTES = 64 * 1024 * 1024
DISK_MARGIN_BYTES = 16 * 1024 * 1024  # leave the device this much besides the new model
POLL_S = 0.5
GROUP_PREFIX = "fleet/groups"
RECENT_IDS = 64

StatusPublisher = Callable[[str, bytes], None]


@dataclass
class _Active:
    """An accepted update until its final status; owned by the intake thread."""

    manifest: UpdateManifest
    entry: JournalEntry
    transfer: ChunkTransfer | None = None
    cancel: threading.Event | None = None


class UpdateManager:
    """Receives signed updates for this device and carries each to a final status."""

    def __init__(self, config: AgentConfig, registry: ModelRegistry,
                 publish: StatusPublisher) -> None:
        self._config = config
        self._registry = registry
        self._publish = publish
        self._store = UpdateStore(Path(config.state_dir) / "updates")
        self._keys, self._key_problem = _load_keys(config)
        self._inbox: queue.Queue[tuple[str, Any, Any] | None] = queue.Queue()
        self._inbox_bytes = 0
        self._inbox_lock = threading.Lock()
        self._overflowed: set[str] = set()  # update ids whose chunks were dropped
        self._installs: queue.Queue[_Active | None] = queue.Queue()
        self._active: dict[str, _Active] = {}
        # Ids of updates installed lately: the same manifest arriving again (a device both
        # named and in a targeted group, a QoS 1 redelivery) is ignored, not REJECTED.
        self._recent: deque[str] = deque(maxlen=RECENT_IDS)
        self._stopped = threading.Event()
        self._intake = threading.Thread(target=self._run_intake, name="updates", daemon=True)
        self._installer = threading.Thread(target=self._run_installs, name="updates-install",
                                           daemon=True)

    # -- lifecycle (main thread) -------------------------------------------------------------

    def subscriptions(self) -> list[Subscription]:
        """Manifest and chunk topics of this device and of each of its groups."""
        bases = [self._config.topic_prefix] + [f"{GROUP_PREFIX}/{group}"
                                               for group in self._config.groups]
        subs = []
        for base in bases:
            subs.append(Subscription(f"{base}/updates/manifest", 1, self.on_manifest))
            subs.append(Subscription(f"{base}/updates/chunks/+", 1, self.on_chunk))
        return subs

    def start(self) -> None:
        """Start the intake and install threads."""
        if self._key_problem:
            log.error("updates_disabled", reason=self._key_problem)
        self._intake.start()
        self._installer.start()

    def stop(self, timeout_s: float = 1.0) -> None:
        """Stop taking updates. An install in progress is not waited for beyond
        ``timeout_s``: its journal entry makes the next start roll it back."""
        self._stopped.set()
        self._inbox.put(None)
        self._installs.put(None)
        for thread in (self._intake, self._installer):
            if thread.is_alive():
                thread.join(timeout=timeout_s)

    def reconfigure(self, config: AgentConfig) -> None:
        """Adopt a reloaded config (SIGHUP): keys, threshold, timeouts, groups."""
        self._config = config
        self._keys, self._key_problem = _load_keys(config)
        if self._key_problem:
            log.error("updates_disabled", reason=self._key_problem)

    def recover(self) -> None:
        """Finish what a crash interrupted; runs before the models are loaded, so a model a
        trial left behind is rolled back before it ever serves."""
        if self._store.problem:
            log.error("update_state_unreadable", reason=self._store.problem)
            return
        for entry in self._store.journal():
            summary = {"update_id": entry.update_id, "model": entry.model,
                       "version": entry.version}
            if entry.step == "committed":
                self._status(summary, SUCCEEDED, reason="committed before the agent stopped")
            elif entry.step == "downloading":
                with contextlib.suppress(FileNotFoundError):
                    Path(entry.staged).unlink()
                self._status(summary, FAILED, step="downloading",
                             reason="the agent stopped during the download (restart, crash "
                                    "or power loss); nothing was installed; send the update "
                                    "again")
            else:
                try:
                    done = restore_previous(Path(entry.target), entry.previous_sha256)
                except (UpdateFailedError, OSError) as exc:
                    done = f"rollback failed: {exc}"
                self._status(summary, FAILED, step=entry.step,
                             reason=f"the agent stopped during the {entry.step} step, before "
                                    f"the new model was committed; {done}; version "
                                    f"{entry.version} is now burnt: publish a higher one")
            self._store.finish(entry.update_id)
        for name in self._config.models:
            folder = staging_dir(self._config.model_path(name))
            removed = clean_staging(folder, keep=set())
            if removed:
                log.info("update_leftovers_removed", folder=str(folder), files=removed)

    def admission(self, name: str, version: str) -> str | None:
        """The registry's check before loading a file: with ``require_signed_files`` only
        files installed by a signed update load. Called on the loading thread."""
        if not self._config.updates.require_signed_files:
            return None
        if self._store.is_signed(name, version.removeprefix("sha256:")):
            return None
        return ("not installed by a signed update, and updates.require_signed_files is true: "
                "send it with `edge-agent publish-update`")

    # -- paho's network thread: enqueue only ---------------------------------------------------

    def on_manifest(self, message: paho.MQTTMessage) -> None:
        """A manifest arrived (paho's thread); an empty one clears a retained manifest."""
        if not message.payload:
            return
        self._inbox.put(("manifest", message.topic, bytes(message.payload)))

    def on_chunk(self, message: paho.MQTTMessage) -> None:
        """A chunk arrived (paho's thread); dropped when the intake is far behind."""
        update_id = message.topic.rsplit("/", 1)[-1]
        size = len(message.payload)
        with self._inbox_lock:
            if self._inbox_bytes + size > INBOX_MAX_BYTES:
                self._overflowed.add(update_id)
                return
            self._inbox_bytes += size
        self._inbox.put(("chunk", update_id, message.payload))

    # -- the intake thread -------------------------------------------------------------------

    def _run_intake(self) -> None:
        while not self._stopped.is_set():
            try:
                item = self._inbox.get(timeout=POLL_S)
            except queue.Empty:
                item = ("tick", None, None)
            if item is None:
                break
            try:
                self._dispatch(*item)
                self._check_stalls()
            except Exception:  # one bad update must not end update handling
                log.exception("update_intake_failed", kind=item[0])
        for active in list(self._active.values()):
            if active.transfer is not None:
                active.transfer.abandon()
            if active.cancel is not None:
                active.cancel.set()

    def _dispatch(self, kind: str, first: Any, second: Any) -> None:
        if kind == "manifest":
            self._on_manifest(first, second)
        elif kind == "chunk":
            with self._inbox_lock:
                self._inbox_bytes -= len(second)
            self._on_chunk(first, second)
        elif kind == "downloaded":
            self._on_downloaded(first, second)
        elif kind == "finished":
            self._active.pop(first, None)
            if second:  # past the version floor: a repeat can only be an echo
                self._recent.append(first)

    def _on_manifest(self, topic: str, data: bytes) -> None:
        summary = _unverified_summary(data)
        log.info("update_manifest_received", topic=topic, **summary)
        try:
            manifest = parse_payload(self._verified_payload(data))
            summary = manifest.summary()
            if manifest.update_id in self._active or manifest.update_id in self._recent:
                log.debug("update_manifest_repeated", update_id=manifest.update_id)
                return
            self._check_acceptable(manifest)
        except UpdateRejectedError as exc:
            self._status(summary, REJECTED, reason=str(exc))
            return
        try:
            self._begin(manifest)
        except OSError as exc:  # state or staging folder not writable, disk full
            active = self._active.get(manifest.update_id)
            reason = f"cannot start the transfer: {exc}"
            if active is not None:
                self._fail_transfer(active, reason)
            else:
                self._status(summary, FAILED, step="downloading", reason=reason)

    def _verified_payload(self, data: bytes) -> bytes:
        if self._keys is None:
            raise UpdateRejectedError(self._key_problem or "signed updates are disabled")
        return self._keys.verify(data)

    def _check_acceptable(self, manifest: UpdateManifest) -> None:
        config = self._config
        problem = applicability_problem(manifest, config.device_id, config.groups,
                                        datetime.now(timezone.utc))
        if problem:
            raise UpdateRejectedError(problem)
        if manifest.model not in config.models:
            raise UpdateRejectedError(f"model {manifest.model!r} is not configured on this device "
                                 f"(models: {sorted(config.models)})")
        highest = self._store.highest_version(manifest.model)
        if manifest.version <= highest:
            raise UpdateRejectedError(f"version {manifest.version} is not newer than version "
                                 f"{highest}, the highest this device accepted for "
                                 f"{manifest.model!r} (rollback or replay)")
        for other in self._active.values():
            if other.manifest.model == manifest.model:
                raise UpdateRejectedError(f"update {other.manifest.update_id} (version "
                                     f"{other.manifest.version}) of {manifest.model!r} is in "
                                     "progress; send this one when it has finished")
        folder = config.model_path(manifest.model).parent
        folder.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(folder).free
        if manifest.length + DISK_MARGIN_BYTES > free:
            raise UpdateRejectedError(f"not enough disk space in {folder}: the model needs "
                                 f"{manifest.length / 1e6:.1f} MB, {free / 1e6:.1f} MB free")

    def _begin(self, manifest: UpdateManifest) -> None:
        target = self._config.model_path(manifest.model)
        folder = staging_dir(target)
        folder.mkdir(parents=True, exist_ok=True)
        staged = folder / f"{manifest.update_id}.part"
        entry = JournalEntry(update_id=manifest.update_id, model=manifest.model,
                             version=manifest.version, sha256=manifest.sha256,
                             step="downloading", target=str(target), staged=str(staged))
        self._store.begin(entry)
        summary = manifest.summary()
        log.info("update_accepted", **summary, length=manifest.length,
                 source=type(manifest.source).__name__)
        self._status(summary, QUEUED)
        active = _Active(manifest, entry)
        self._active[manifest.update_id] = active
        self._status(summary, IN_PROGRESS, step="downloading")
        if isinstance(manifest.source, ChunkSource):
            active.transfer = ChunkTransfer(manifest.source, manifest.length, staged)
            return
        active.cancel = threading.Event()
        url, cancel, updates = manifest.source.url, active.cancel, self._config.updates
        DownloadThread(
            f"update-download-{manifest.update_id}",
            lambda: download(url, staged, manifest.length, ca_file=updates.ca_file,
                             connect_timeout_s=updates.connect_timeout_s,
                             deadline_s=updates.download_timeout_s,
                             cancelled=lambda: cancel.is_set() or self._stopped.is_set()),
            # Runs on the download thread: hand the outcome to the intake thread.
            lambda error: self._inbox.put(("downloaded", manifest.update_id, error)),
        ).start()

    def _on_chunk(self, update_id: str, data: bytes) -> None:
        active = self._active.get(update_id)
        if active is None or active.transfer is None:
            log.debug("update_chunk_ignored", update_id=update_id,
                      reason="no transfer in progress with this id")
            return
        transfer = active.transfer
        try:
            transfer.add(data)
        except UpdateFailedError as exc:
            self._fail_transfer(active, str(exc))
            return
        if transfer.complete:
            transfer.close()
            active.transfer = None
            log.info("update_transfer_complete", update_id=update_id,
                     chunks=transfer.source.chunks, duplicates=transfer.duplicates)
            self._installs.put(active)

    def _on_downloaded(self, update_id: str, error: UpdateFailedError | None) -> None:
        active = self._active.get(update_id)
        if active is None:
            return
        if error is not None:
            self._fail_transfer(active, str(error))
        else:
            log.info("update_download_complete", update_id=update_id)
            self._installs.put(active)

    def _check_stalls(self) -> None:
        now = time.monotonic()
        limit = self._config.updates.chunk_timeout_s
        with self._inbox_lock:
            overflowed, self._overflowed = self._overflowed, set()
        for active in list(self._active.values()):
            transfer = active.transfer
            if transfer is None:
                continue
            if active.manifest.update_id in overflowed:
                self._fail_transfer(active, "chunks arrived faster than they could be written "
                                    f"(more than {INBOX_MAX_BYTES // 2**20} MiB waiting); "
                                    f"{transfer.progress()}")
            elif now - transfer.last_activity > limit:
                self._fail_transfer(active, f"transfer stalled: no chunk for {limit:g} s "
                                    f"(updates.chunk_timeout_s); {transfer.progress()}")

    def _fail_transfer(self, active: _Active, reason: str) -> None:
        if active.transfer is not None:
            active.transfer.abandon()
            active.transfer = None
        with contextlib.suppress(FileNotFoundError):
            Path(active.entry.staged).unlink()
        self._store.finish(active.manifest.update_id)
        self._active.pop(active.manifest.update_id, None)
        self._status(active.manifest.summary(), FAILED, step="downloading", reason=reason)

    # -- the install thread ------------------------------------------------------------------

    def _run_installs(self) -> None:
        while True:
            active = self._installs.get()
            if active is None or self._stopped.is_set():
                return
            accepted = False
            try:
                accepted = self._install(active)
            except Exception as exc:  # whatever happens, the update gets a final status
                log.exception("update_install_crashed", update_id=active.manifest.update_id)
                self._status(active.manifest.summary(), FAILED,
                             reason=f"{exc!r}; {self._undo(active)}")
                self._store.finish(active.manifest.update_id)
            finally:
                self._inbox.put(("finished", active.manifest.update_id, accepted))

    def _install(self, active: _Active) -> bool:
        """Verify, install, trial, commit or roll back; whether the version floor was raised."""
        manifest, entry = active.manifest, active.entry
        summary = manifest.summary()
        target, staged = Path(entry.target), Path(entry.staged)
        self._status(summary, IN_PROGRESS, step="verifying")
        try:
            verify_staged(staged, manifest.length, manifest.sha256)
        except UpdateFailedError as exc:
            staged.unlink(missing_ok=True)
            self._store.finish(manifest.update_id)
            self._status(summary, FAILED, step="verifying", reason=str(exc))
            return False
        failpoint("verified")
        previous = file_sha256(target)
        self._store.accept(manifest.update_id, manifest.model, manifest.version,
                           manifest.sha256, previous)
        failpoint("accepted")
        self._status(summary, IN_PROGRESS, step="installing")
        install(staged, target)
        failpoint("installed")
        self._store.set_step(manifest.update_id, "trial")
        self._status(summary, IN_PROGRESS, step="trial")
        problem = self._trial(manifest)
        if problem is None:
            self._store.set_step(manifest.update_id, "committed")
            failpoint("committed")
            self._status(summary, SUCCEEDED)
        else:
            done = restore_previous(target, previous)
            self._registry.load(manifest.model)
            self._status(summary, FAILED, step="trial",
                         reason=f"{problem}; rolled back: {done}")
        self._store.finish(manifest.update_id)
        return True

    def _undo(self, active: _Active) -> str:
        """After an unexpected error (disk full, I/O error): put the previous file back if
        the new one may have been installed, as a restart would."""
        entry = next((e for e in self._store.journal()
                      if e.update_id == active.manifest.update_id), None)
        Path(active.entry.staged).unlink(missing_ok=True)
        if entry is None or entry.step not in ("installing", "trial"):
            return "nothing was installed"
        try:
            done = restore_previous(Path(entry.target), entry.previous_sha256)
        except (UpdateFailedError, OSError) as exc:
            return f"rollback failed: {exc}"
        self._registry.load(entry.model)
        return f"rolled back: {done}"

    def _trial(self, manifest: UpdateManifest) -> str | None:
        """Load the installed file through the registry (checks, warm-up, swap) within
        ``updates.trial_timeout_s``; why it failed, or None."""
        model = self._registry.load(manifest.model,
                                    max_seconds=self._config.updates.trial_timeout_s)
        if model is None or model.version != "sha256:" + manifest.sha256:
            status = self._registry.status(manifest.model)
            return f"the new model did not load: {status.error or 'no error recorded'}"
        return None

    # -- status ------------------------------------------------------------------------------

    def _status(self, summary: dict[str, Any], state: str, step: str | None = None,
                reason: str | None = None) -> None:
        """Log and publish on ``P/updates/status`` (QoS 1; paho keeps it while disconnected):
        the one place every update state change is reported."""
        document = {**summary, "device_id": self._config.device_id, "state": state,
                    "step": step, "reason": reason, "ts": round(time.time(), 3)}
        level = log.warning if state in (FAILED, REJECTED) else log.info
        level("update_status", **{k: v for k, v in document.items() if k != "ts"})
        try:
            self._publish(f"{self._config.topic_prefix}/updates/status", encode_json(document))
        except Exception:  # a status that cannot be sent must not break the update itself
            log.exception("update_status_not_sent", **summary)


def _load_keys(config: AgentConfig) -> tuple[TrustedKeys | None, str | None]:
    updates = config.updates
    if not updates.trusted_keys:
        return None, "signed updates are disabled on this device (updates.trusted_keys is empty)"
    # Imported only when keys are configured: cryptography's OpenSSL costs ~8 MB of RSS.
    from agent.signing import TrustedKeys  # noqa: PLC0415

    try:
        return TrustedKeys.from_files(updates.trusted_keys, updates.threshold), None
    except UpdateKeyError as exc:
        return None, f"updates.trusted_keys: {exc}"


def _unverified_summary(data: bytes) -> dict[str, Any]:
    """update_id, model and version read from an envelope *before* verification, only so a
    REJECTED status can name the update it refers to."""
    summary: dict[str, Any] = {"update_id": None, "model": None, "version": None}
    with contextlib.suppress(Exception):
        payload = json.loads(base64.b64decode(json.loads(data)["payload"]))
        for key in summary:
            value = payload.get(key)
            if isinstance(value, str | int) and not isinstance(value, bool):
                summary[key] = value if not isinstance(value, str) else value[:64]
    return summary
