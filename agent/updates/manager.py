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

Anyone who can publish to the manifest topics can send bytes here, so the intake is bounded
(count and bytes waiting, the size of one manifest), every manifest that is read gets
exactly one final status whatever its bytes, and a status about a manifest whose signatures
did not verify never names the update it claims to be (``authenticated: false``): it could
otherwise make an operator's tool report a legitimate update as refused. Every status
carries ``manifest_sha256``, the digest of the exact bytes it answers.
"""

from __future__ import annotations

import contextlib
import hashlib
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

from agent.config.schema import PACKET_OVERHEAD_BYTES, AgentConfig
from agent.errors import (
    UnsafePathError,
    UpdateFailedError,
    UpdateKeyError,
    UpdateRejectedError,
)
from agent.inference.codecs import encode_json
from agent.inference.registry import ModelRegistry
from agent.transport.mqtt import Subscription
from agent.updates import strict_json
from agent.updates.failpoints import failpoint
from agent.updates.install import (
    clean_staging,
    file_sha256,
    install,
    make_staging_dir,
    restore_previous,
    staging_dir,
    verify_staged,
)
from agent.updates.manifest import (
    MAX_MANIFEST_BYTES,
    NAME_PATTERN,
    ChunkSource,
    UpdateManifest,
    applicability_problem,
    parse_payload,
)
from agent.updates.store import JournalEntry, UpdateStore
from agent.updates.transfer import ChunkTransfer, DownloadThread, download

if TYPE_CHECKING:
    from agent.updates.signing import TrustedKeys

log = structlog.get_logger(__name__)

QUEUED, IN_PROGRESS = "QUEUED", "IN_PROGRESS"
SUCCEEDED, FAILED, REJECTED = "SUCCEEDED", "FAILED", "REJECTED"
# Chunks waiting for the intake thread. It only writes them to disk, so the queue stays
# near-empty; the cap keeps a flood (or a stuck disk) from growing memory without bound.
INBOX_MAX_BYTES = 64 * 1024 * 1024
# Manifests waiting for the intake thread: verifying one takes a millisecond, so more than a
# few waiting is a flood; what does not fit is dropped, counted and reported in one status.
MANIFESTS_WAITING_MAX = 16
MANIFESTS_WAITING_MAX_BYTES = 8 * 1024 * 1024
REASON_MAX_CHARS = 500
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
    summary: dict[str, Any]  # what every status of it names
    transfer: ChunkTransfer | None = None
    cancel: threading.Event | None = None
    # The final status (state, step, reason), decided by the install thread and published
    # by the intake thread once it has let the update go (the "finished" message hands it
    # over): an operator who sends the next update on SUCCEEDED must not find this one
    # still in progress.
    final: tuple[str, str | None, str | None] | None = None


def _unauthenticated(digest: str | None) -> dict[str, Any]:
    """The summary of a manifest that is not (yet) known to be signed: no claimed id, model
    or version, only the digest of its bytes."""
    return {
        "update_id": None,
        "model": None,
        "version": None,
        "authenticated": False,
        "manifest_sha256": digest,
    }


def _authenticated(manifest: UpdateManifest, digest: str) -> dict[str, Any]:
    return {**manifest.summary(), "authenticated": True, "manifest_sha256": digest}


class UpdateManager:
    """Receives signed updates for this device and carries each to a final status."""

    def __init__(
        self, config: AgentConfig, registry: ModelRegistry, publish: StatusPublisher
    ) -> None:
        self._config = config
        self._registry = registry
        self._publish = publish
        self._store = UpdateStore(Path(config.state_dir) / "updates")
        self._keys, self._key_problem = _load_keys(config)
        self._inbox: queue.Queue[tuple[str, Any, Any] | None] = queue.Queue()
        self._inbox_bytes = 0
        self._inbox_lock = threading.Lock()  # guards the counters of what waits in _inbox
        self._overflowed: set[str] = set()  # update ids whose chunks were dropped
        self._manifests_waiting = 0
        self._manifest_bytes_waiting = 0
        self._manifests_dropped = 0  # since the last status that reported drops
        self._installs: queue.Queue[_Active | None] = queue.Queue()
        self._active: dict[str, _Active] = {}
        # (update id, manifest digest) of updates installed lately: the same manifest arriving
        # again (a device both named and in a targeted group, a QoS 1 redelivery) is ignored,
        # not REJECTED.
        self._recent: deque[tuple[str, str]] = deque(maxlen=RECENT_IDS)
        self._stopped = threading.Event()
        self._intake = threading.Thread(target=self._run_intake, name="updates", daemon=True)
        self._installer = threading.Thread(
            target=self._run_installs, name="updates-install", daemon=True
        )

    # -- lifecycle (main thread) -------------------------------------------------------------

    def subscriptions(self) -> list[Subscription]:
        """Manifest and chunk topics of this device and of each of its groups."""
        bases = [self._config.topic_prefix] + [
            f"{GROUP_PREFIX}/{group}" for group in self._config.groups
        ]
        subs = []
        for base in bases:
            subs.append(
                Subscription(
                    f"{base}/updates/manifest",
                    1,
                    self.on_manifest,
                    on_too_large=self.on_manifest_too_large,
                )
            )
            subs.append(
                Subscription(
                    f"{base}/updates/chunks/+",
                    1,
                    self.on_chunk,
                    on_too_large=self.on_chunk_too_large,
                )
            )
        return subs

    def start(self) -> None:
        """Start the intake and install threads."""
        self._report_key_problem()
        self._intake.start()
        self._installer.start()

    def stop(self, timeout_s: float = 1.0) -> None:
        """Stop taking updates. An install in progress is not waited for beyond
        ``timeout_s``: its journal entry makes the next start roll it back. (The daemon
        cancels the registry's warm-ups first, so a trial in progress ends at once.)"""
        self._stopped.set()
        self._inbox.put(None)
        self._installs.put(None)
        for thread in (self._intake, self._installer):
            if thread.is_alive():
                thread.join(timeout=timeout_s)
        if not self._intake.is_alive() and not self._installer.is_alive():
            # An install that ended after the intake thread did: its final status is still
            # in the inbox (the intake thread is gone, so this thread owns the updates now).
            while not self._inbox.empty():
                item = self._inbox.get_nowait()
                if item is not None and item[0] == "finished":
                    self._dispatch(*item)

    def reconfigure(self, config: AgentConfig) -> None:
        """Adopt a reloaded config (SIGHUP): keys, threshold, timeouts, groups."""
        self._config = config
        self._keys, self._key_problem = _load_keys(config)
        self._report_key_problem()

    def _report_key_problem(self) -> None:
        """No keys configured is a choice (info); keys that do not load need the operator."""
        if not self._key_problem:
            return
        if self._config.updates.trusted_keys:
            log.error("updates_disabled", reason=self._key_problem)
        else:
            log.info("updates_disabled", reason=self._key_problem)

    def recover(self) -> None:
        """Finish what a crash interrupted; runs before the models are loaded, so a model a
        trial left behind is rolled back before it ever serves."""
        if self._store.problem:
            log.error("update_state_unreadable", reason=self._store.problem)
            return
        for entry in self._store.journal():
            summary = {
                "update_id": entry.update_id,
                "model": entry.model,
                "version": entry.version,
                "authenticated": True,
                "manifest_sha256": entry.manifest_sha256,
            }
            if entry.step == "committed":
                self._status(summary, SUCCEEDED, reason="committed before the agent stopped")
            elif entry.step == "downloading":
                with contextlib.suppress(FileNotFoundError):
                    Path(entry.staged).unlink()
                self._status(
                    summary,
                    FAILED,
                    step="downloading",
                    reason="the agent stopped during the download (restart, crash "
                    "or power loss); nothing was installed; send the update "
                    "again",
                )
            else:
                try:
                    done = restore_previous(Path(entry.target), entry.previous_sha256)
                except (UpdateFailedError, OSError) as exc:
                    done = f"rollback failed: {exc}"
                self._status(
                    summary,
                    FAILED,
                    step=entry.step,
                    reason=f"the agent stopped during the {entry.step} step, before "
                    f"the new model was committed; {done}; version "
                    f"{entry.version} is now burnt: publish a higher one",
                )
            self._store.finish(entry.update_id)
        for name in self._config.models:
            folder = staging_dir(self._config.model_path(name))
            try:
                removed = clean_staging(folder, keep=set())
            except (UnsafePathError, OSError) as exc:
                log.error("update_staging_unsafe", folder=str(folder), problem=str(exc))
                continue
            if removed:
                log.info("update_leftovers_removed", folder=str(folder), files=removed)

    def admission(self, name: str, version: str) -> str | None:
        """The registry's check before loading a file: with ``require_signed_files`` only
        files installed by a signed update load. Called on the loading thread."""
        if not self._config.updates.require_signed_files:
            return None
        if self._store.may_load(name, version.removeprefix("sha256:")):
            return None
        return (
            "not installed by a signed update as the version committed last, and "
            "updates.require_signed_files is true: only that version, or a newer one sent "
            "with `edge-agent publish-update`, may load (an older signed file, such as "
            "NAME.onnx.prev copied back, would be a rollback)"
        )

    # -- paho's network thread: enqueue only ---------------------------------------------------

    def on_manifest(self, message: paho.MQTTMessage) -> None:
        """A manifest arrived (paho's thread); an empty one clears a retained manifest. One
        over ``MAX_MANIFEST_BYTES`` is refused unread; one that finds the intake full is
        dropped and counted."""
        size = len(message.payload)
        if not size:
            return
        if size > MAX_MANIFEST_BYTES:
            self._refuse_unread(
                f"manifest of {size} bytes is larger than the "
                f"{MAX_MANIFEST_BYTES} bytes a manifest may have; not read"
            )
            return
        with self._inbox_lock:
            if (
                self._manifests_waiting >= MANIFESTS_WAITING_MAX
                or self._manifest_bytes_waiting + size > MANIFESTS_WAITING_MAX_BYTES
            ):
                self._manifests_dropped += 1
                return
            self._manifests_waiting += 1
            self._manifest_bytes_waiting += size
        self._inbox.put(("manifest", message.topic, bytes(message.payload)))

    def on_manifest_too_large(self, topic: str, size: int) -> None:
        """A message over ``mqtt.max_packet_bytes`` on a manifest topic (paho's thread)."""
        self._refuse_unread(
            f"manifest message of {size} bytes is larger than mqtt.max_packet_bytes; not read"
        )

    def on_chunk_too_large(self, topic: str, size: int) -> None:
        """A message over ``mqtt.max_packet_bytes`` on a chunk topic (paho's thread): no
        chunk of an accepted update can be that large, the manifest was checked for it."""
        self._inbox.put(("chunk_too_large", topic.rsplit("/", 1)[-1], size))

    def _refuse_unread(self, reason: str) -> None:
        """Queue the REJECTED status of a manifest that was not read; counted against the
        intake like a manifest, so a flood of them is bounded too (paho's thread)."""
        with self._inbox_lock:
            if self._manifests_waiting >= MANIFESTS_WAITING_MAX:
                self._manifests_dropped += 1
                return
            self._manifests_waiting += 1
        self._inbox.put(("refused", reason, None))

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
                self._report_dropped()
            except Exception:  # one bad update must not end update handling
                log.exception("update_intake_failed", kind=item[0])
        for active in list(self._active.values()):
            if active.transfer is not None:
                active.transfer.abandon()
            if active.cancel is not None:
                active.cancel.set()

    def _dispatch(self, kind: str, first: Any, second: Any) -> None:
        if kind == "manifest":
            with self._inbox_lock:
                self._manifests_waiting -= 1
                self._manifest_bytes_waiting -= len(second)
            self._on_manifest(first, second)
        elif kind == "refused":
            with self._inbox_lock:
                self._manifests_waiting -= 1
            self._status(_unauthenticated(None), REJECTED, reason=first)
        elif kind == "chunk_too_large":
            active = self._active.get(first)
            if active is not None and active.transfer is not None:
                self._fail_transfer(
                    active,
                    f"a chunk message of {second} bytes arrived, larger than mqtt.max_packet_bytes",
                )
        elif kind == "chunk":
            with self._inbox_lock:
                self._inbox_bytes -= len(second)
            self._on_chunk(first, second)
        elif kind == "downloaded":
            self._on_downloaded(first, second)
        elif kind == "finished":
            active = self._active.pop(first, None)
            if active is None:
                return
            if second:  # past the version floor: a repeat is an echo
                self._recent.append((first, active.summary["manifest_sha256"]))
            if active.final is not None:  # None: stopped mid-trial, the next start reports
                state, step, reason = active.final
                self._status(active.summary, state, step=step, reason=reason)
                self._store.finish(first)

    def _report_dropped(self) -> None:
        """One REJECTED status for the manifests a full intake dropped since the last one."""
        with self._inbox_lock:
            dropped, self._manifests_dropped = self._manifests_dropped, 0
        if dropped:
            self._status(
                _unauthenticated(None),
                REJECTED,
                dropped=dropped,
                reason=f"{dropped} manifest(s) dropped unread: more than "
                f"{MANIFESTS_WAITING_MAX} (or {MANIFESTS_WAITING_MAX_BYTES} "
                "bytes) were waiting to be verified; send again",
            )

    def _on_manifest(self, topic: str, data: bytes) -> None:
        digest = hashlib.sha256(data).hexdigest()
        log.info("update_manifest_received", topic=topic, bytes=len(data), manifest_sha256=digest)
        summary = _unauthenticated(digest)
        try:
            payload = self._verified_payload(data)
            # Signed, not yet known to be well-formed: what it names may be quoted now.
            summary.update(_signed_claims(payload), authenticated=True)
            manifest = parse_payload(payload)
            summary = _authenticated(manifest, digest)
            if self._is_repeat(manifest, digest):
                return
            self._check_acceptable(manifest)
        except UpdateRejectedError as exc:
            self._status(summary, REJECTED, reason=str(exc))
            return
        except Exception as exc:  # whatever the bytes did, they get their one status
            log.exception("update_manifest_unreadable", manifest_sha256=digest)
            self._status(summary, REJECTED, reason=f"manifest could not be read: {exc!r}")
            return
        try:
            self._begin(manifest, summary)
        except (OSError, UnsafePathError) as exc:  # folder not writable or a link, disk full
            active = self._active.get(manifest.update_id)
            reason = f"cannot start the transfer: {exc}"
            if active is not None:
                self._fail_transfer(active, reason)
            else:
                self._status(summary, FAILED, step="downloading", reason=reason)

    def _is_repeat(self, manifest: UpdateManifest, digest: str) -> bool:
        """The same bytes again (an echo: ignored), or ``UpdateRejectedError`` when the id of
        an update in progress or installed lately comes with other bytes."""
        seen = [
            a.summary["manifest_sha256"]
            for a in self._active.values()
            if a.manifest.update_id == manifest.update_id
        ]
        seen += [d for update_id, d in self._recent if update_id == manifest.update_id]
        if not seen:
            return False
        if digest in seen:
            log.debug("update_manifest_repeated", update_id=manifest.update_id)
            return True
        raise UpdateRejectedError(
            f"update_id {manifest.update_id!r} was already used by "
            "another manifest on this device; give each update its own id"
        )

    def _verified_payload(self, data: bytes) -> bytes:
        if self._keys is None:
            raise UpdateRejectedError(self._key_problem or "signed updates are disabled")
        return self._keys.verify(data)

    def _check_acceptable(self, manifest: UpdateManifest) -> None:
        config = self._config
        problem = applicability_problem(
            manifest, config.device_id, config.groups, datetime.now(timezone.utc)
        )
        if problem:
            raise UpdateRejectedError(problem)
        if manifest.model not in config.models:
            raise UpdateRejectedError(
                f"model {manifest.model!r} is not configured on this device "
                f"(models: {sorted(config.models)})"
            )
        highest = self._store.highest_version(manifest.model)
        if manifest.version <= highest:
            raise UpdateRejectedError(
                f"version {manifest.version} is not newer than version "
                f"{highest}, the highest this device accepted for "
                f"{manifest.model!r} (rollback or replay)"
            )
        if isinstance(manifest.source, ChunkSource):
            limit = config.max_packet_bytes(config.upstream or config.mqtt)
            largest = limit - PACKET_OVERHEAD_BYTES
            if manifest.source.chunk_size > largest:
                raise UpdateRejectedError(
                    f"chunk_size {manifest.source.chunk_size} is larger than this device takes "
                    f"({largest} bytes, from mqtt.max_packet_bytes {limit}): send it with "
                    f"--chunk-size {largest} or less"
                )
        for other in self._active.values():
            if other.manifest.model == manifest.model:
                raise UpdateRejectedError(
                    f"update {other.manifest.update_id} (version "
                    f"{other.manifest.version}) of {manifest.model!r} is in "
                    "progress; send this one when it has finished"
                )
        folder = config.model_path(manifest.model).parent
        folder.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(folder).free
        if manifest.length + DISK_MARGIN_BYTES > free:
            # Where and how much is free is for the device's log, not for the fleet.
            log.warning(
                "update_disk_space_low",
                folder=str(folder),
                free_mb=free / 1e6,
                needed_mb=(manifest.length + DISK_MARGIN_BYTES) / 1e6,
            )
            raise UpdateRejectedError(
                f"not enough disk space for the model: it needs {manifest.length / 1e6:.1f} MB "
                f"plus a {DISK_MARGIN_BYTES // 2**20} MB margin"
            )

    def _begin(self, manifest: UpdateManifest, summary: dict[str, Any]) -> None:
        target = self._config.model_path(manifest.model)
        folder = make_staging_dir(target)
        staged = folder / f"{manifest.update_id}.part"
        entry = JournalEntry(
            update_id=manifest.update_id,
            model=manifest.model,
            version=manifest.version,
            sha256=manifest.sha256,
            step="downloading",
            target=str(target),
            staged=str(staged),
            manifest_sha256=summary["manifest_sha256"],
        )
        self._store.begin(entry)
        log.info(
            "update_accepted",
            **summary,
            length=manifest.length,
            source=type(manifest.source).__name__,
        )
        self._status(summary, QUEUED)
        active = _Active(manifest, entry, summary)
        self._active[manifest.update_id] = active
        self._status(summary, IN_PROGRESS, step="downloading")
        if isinstance(manifest.source, ChunkSource):
            active.transfer = ChunkTransfer(manifest.source, manifest.length, staged)
            return
        active.cancel = threading.Event()
        url, cancel, updates = manifest.source.url, active.cancel, self._config.updates
        DownloadThread(
            f"update-download-{manifest.update_id}",
            lambda: download(
                url,
                staged,
                manifest.length,
                ca_file=updates.ca_file,
                connect_timeout_s=updates.connect_timeout_s,
                deadline_s=updates.download_timeout_s,
                cancelled=lambda: cancel.is_set() or self._stopped.is_set(),
            ),
            # Runs on the download thread: hand the outcome to the intake thread.
            lambda error: self._inbox.put(("downloaded", manifest.update_id, error)),
        ).start()

    def _on_chunk(self, update_id: str, data: bytes) -> None:
        active = self._active.get(update_id)
        if active is None or active.transfer is None:
            log.debug(
                "update_chunk_ignored",
                update_id=update_id,
                reason="no transfer in progress with this id",
            )
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
            log.info(
                "update_transfer_complete",
                update_id=update_id,
                chunks=transfer.source.chunks,
                duplicates=transfer.duplicates,
            )
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

    def _public(self, reason: str) -> str:
        """``reason`` as the fleet sees it: bounded, and without the device's paths."""
        for folder, setting in (
            (self._config.models_dir, "<models_dir>"),
            (self._config.state_dir, "<state_dir>"),
        ):
            reason = reason.replace(str(Path(folder)), setting)
        return _bounded(reason)

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
                self._fail_transfer(
                    active,
                    "chunks arrived faster than they could be written "
                    f"(more than {INBOX_MAX_BYTES // 2**20} MiB waiting); "
                    f"{transfer.progress()}",
                )
            elif now - transfer.last_activity > limit:
                self._fail_transfer(
                    active,
                    f"transfer stalled: no chunk for {limit:g} s "
                    f"(updates.chunk_timeout_s); {transfer.progress()}",
                )

    def _fail_transfer(self, active: _Active, reason: str) -> None:
        if active.transfer is not None:
            active.transfer.abandon()
            active.transfer = None
        with contextlib.suppress(FileNotFoundError):
            Path(active.entry.staged).unlink()
        self._store.finish(active.manifest.update_id)
        self._active.pop(active.manifest.update_id, None)
        self._status(active.summary, FAILED, step="downloading", reason=reason)

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
                active.final = (FAILED, None, f"{exc!r}; {self._undo(active)}")
            finally:
                self._inbox.put(("finished", active.manifest.update_id, accepted))

    def _install(self, active: _Active) -> bool:
        """Verify, install, trial, commit or roll back; whether the version floor was raised.
        Sets ``active.final`` unless stopped mid-trial."""
        manifest, entry, summary = active.manifest, active.entry, active.summary
        target, staged = Path(entry.target), Path(entry.staged)
        self._status(summary, IN_PROGRESS, step="verifying")
        try:
            verify_staged(staged, manifest.length, manifest.sha256)
        except UpdateFailedError as exc:
            staged.unlink(missing_ok=True)
            active.final = (FAILED, "verifying", str(exc))
            return False
        failpoint("verified")
        previous = file_sha256(target)
        self._store.accept(
            manifest.update_id, manifest.model, manifest.version, manifest.sha256, previous
        )
        failpoint("accepted")
        self._status(summary, IN_PROGRESS, step="installing")
        # Held from the install to the commit or rollback: the folder watcher sees the new
        # file appear (and the old one come back) and must not load it meanwhile, outside
        # the trial's deadline.
        with self._registry.hold(manifest.model):
            install(staged, target)
            failpoint("installed")
            self._store.set_step(manifest.update_id, "trial")
            self._status(summary, IN_PROGRESS, step="trial")
            problem = self._trial(manifest)
            if self._stopped.is_set():
                # Stopped mid-trial (its warm-up was cancelled): the journal still says
                # "trial", so the next start rolls back before any model loads and reports.
                log.info("update_trial_interrupted", **summary)
                return True
            if problem is None:
                self._store.commit(manifest.update_id)
                failpoint("committed")
                active.final = (SUCCEEDED, None, None)
            else:
                done = restore_previous(target, previous)
                self._registry.load(manifest.model)
                active.final = (FAILED, "trial", f"{problem}; rolled back: {done}")
        return True

    def _undo(self, active: _Active) -> str:
        """After an unexpected error (disk full, I/O error): put the previous file back if
        the new one may have been installed, as a restart would."""
        entry = next(
            (e for e in self._store.journal() if e.update_id == active.manifest.update_id), None
        )
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
        model = self._registry.load(
            manifest.model, max_seconds=self._config.updates.trial_timeout_s
        )
        if model is None or model.version != "sha256:" + manifest.sha256:
            status = self._registry.status(manifest.model)
            return f"the new model did not load: {status.error or 'no error recorded'}"
        return None

    # -- status ------------------------------------------------------------------------------

    def _status(
        self,
        summary: dict[str, Any],
        state: str,
        step: str | None = None,
        reason: str | None = None,
        **extra: Any,
    ) -> None:
        """Log and publish on ``P/updates/status`` (QoS 1; paho keeps it while disconnected):
        the one place every update state change is reported. The log gets the whole reason;
        the status a bounded one, with the device's folders named by their settings."""
        level = log.warning if state in (FAILED, REJECTED) else log.info
        level(
            "update_status",
            **summary,
            state=state,
            step=step,
            reason=_encodable(reason) if reason else reason,
            **extra,
        )
        document = {
            **summary,
            "device_id": self._config.device_id,
            "state": state,
            "step": step,
            "reason": self._public(reason) if reason else reason,
            **extra,
            "ts": round(time.time(), 3),
        }
        try:
            self._publish(f"{self._config.topic_prefix}/updates/status", encode_json(document))
        except Exception:  # a status that cannot be sent must not break the update itself
            log.exception("update_status_not_sent", **summary)


def _load_keys(config: AgentConfig) -> tuple[TrustedKeys | None, str | None]:
    updates = config.updates
    if not updates.trusted_keys:
        return None, "signed updates are disabled on this device (updates.trusted_keys is empty)"
    # Imported only when keys are configured: cryptography's OpenSSL costs ~8 MB of RSS.
    from agent.updates.signing import TrustedKeys  # noqa: PLC0415

    try:
        return TrustedKeys.from_files(updates.trusted_keys, updates.threshold), None
    except UpdateKeyError as exc:
        return None, f"updates.trusted_keys: {exc}"


def _signed_claims(payload: bytes) -> dict[str, Any]:
    """update_id, model and version of a verified payload that may fail the strict parse,
    each only where it is well-formed, so a REJECTED status can name the update."""
    claims: dict[str, Any] = {}
    with contextlib.suppress(ValueError):
        document = strict_json.loads(payload)
        if isinstance(document, dict):
            for key in ("update_id", "model"):
                value = document.get(key)
                if isinstance(value, str) and NAME_PATTERN.fullmatch(value):
                    claims[key] = value
            version = document.get("version")
            if isinstance(version, int) and not isinstance(version, bool):
                claims["version"] = version
    return claims


def _encodable(text: str) -> str:
    """``text`` with anything UTF-8 cannot carry (a lone surrogate) escaped."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _bounded(text: str) -> str:
    """At most ``REASON_MAX_CHARS``, and encodable as UTF-8 whatever a sender put in it."""
    if len(text) > REASON_MAX_CHARS:
        text = text[: REASON_MAX_CHARS - 1] + "\u2026"
    return _encodable(text)
