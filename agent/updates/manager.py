"""Signed fleet model updates: verify, transfer, install atomically, trial, commit or roll back.

Threads and what they own:
- paho's network thread calls ``on_manifest`` and ``on_chunk``: they only enqueue (``Inbox``).
- the intake thread ("updates", ``UpdateIntake``) owns the updates being transferred
  (``inflight.InFlight``): it verifies manifests, writes chunks into staging files, watches
  for stalls and hands complete transfers on.
- download threads stream https sources and report back through the intake queue.
- the install thread ("updates-install", ``trial.Installer``) verifies the staged bytes,
  installs them, runs the trial through the model registry (the same load path as a file
  dropped by hand), and commits or rolls back. One install at a time.
Every step is journalled in ``UpdateStore`` before its effects, so ``recover`` (at start-up,
before models load; ``recovery``) can finish what a crash or power cut interrupted.

Anyone who can publish to the manifest topics can send bytes here, so the intake is bounded
(count and bytes waiting, the size of one manifest), and every manifest that is read gets
exactly one final status whatever its bytes (``status`` says what a status may name).
"""

from __future__ import annotations

import hashlib
import threading
from collections import deque
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import structlog

from agent.config.schema import AgentConfig
from agent.errors import UpdateRejectedError
from agent.inference.registry import ModelRegistry
from agent.transport.subscriptions import Subscription
from agent.updates import recovery
from agent.updates.acceptance import check_acceptable, signed_claims
from agent.updates.inbox import (
    MANIFESTS_WAITING_MAX,
    MANIFESTS_WAITING_MAX_BYTES,
    ChunkArrived,
    ChunkTooLarge,
    Downloaded,
    Finished,
    Inbox,
    InboxMessage,
    KeySetArrived,
    ManifestArrived,
    ManifestRefused,
    Tick,
)
from agent.updates.inflight import ActiveUpdate, InFlight
from agent.updates.manifest import (
    GROUP_PREFIX,
    MAX_KEYSET_BYTES,
    MAX_MANIFEST_BYTES,
    UpdateManifest,
    parse_payload,
)
from agent.updates.states import UpdateState
from agent.updates.status import StatusPublisher, StatusReporter, authenticated, unauthenticated
from agent.updates.store import UpdateStore
from agent.updates.trial import Installer
from agent.updates.trust import UpdateTrust

log = structlog.get_logger(__name__)

POLL_S = 0.5
# Where root-signed key sets arrive (retained): the fleet's, and one device's own.
FLEET_KEYS_TOPIC = "fleet/keys"
RECENT_IDS = 64


class UpdateManager:
    """Receives signed updates for this device and carries each to a final status."""

    def __init__(
        self, config: AgentConfig, registry: ModelRegistry, publish: StatusPublisher
    ) -> None:
        self._config = config
        self._store = UpdateStore(Path(config.state_dir) / "updates")
        self._trust = UpdateTrust(config)
        self._inbox = Inbox()
        self._stopped = threading.Event()
        self._reporter = StatusReporter(lambda: self._config, publish)
        self._installer = Installer(
            lambda: self._config,
            registry,
            self._store,
            self._reporter,
            inbox=self._inbox,
            stopped=self._stopped,
        )
        self._intake = UpdateIntake(
            lambda: self._config,
            self._store,
            self._inbox,
            self._reporter,
            verify=self._verified_payload,
            trust=self._trust,
            submit=self._installer.submit,
            stopped=self._stopped,
        )
        self._intake_thread = threading.Thread(target=self._intake.run, name="updates", daemon=True)
        self._install_thread = threading.Thread(
            target=self._installer.run, name="updates-install", daemon=True
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
        if self._config.updates.root_keys:
            for topic in (FLEET_KEYS_TOPIC, f"{self._config.topic_prefix}/keys"):
                subs.append(
                    Subscription(topic, 1, self.on_keyset, on_too_large=self.on_keyset_too_large)
                )
        return subs

    def start(self) -> None:
        """Start the intake and install threads."""
        self._report_key_problem()
        self._intake_thread.start()
        self._install_thread.start()

    def stop(self, timeout_s: float = 1.0) -> None:
        """Stop taking updates. An install in progress is not waited for beyond
        ``timeout_s``: its journal entry makes the next start roll it back. (The daemon
        cancels the registry's warm-ups first, so a trial in progress ends at once.)"""
        self._stopped.set()
        self._inbox.close()
        self._installer.close()
        threads = (self._intake_thread, self._install_thread)
        for thread in threads:
            if thread.is_alive():
                thread.join(timeout=timeout_s)
        if not any(thread.is_alive() for thread in threads):
            # An install that ended after the intake thread did: its final status is still
            # in the inbox (the intake thread is gone, so this thread owns the updates now).
            for message in self._inbox.drain():
                if isinstance(message, Finished):
                    self._intake.dispatch(message)

    def reconfigure(self, config: AgentConfig) -> None:
        """Adopt a reloaded config (SIGHUP): keys, threshold, timeouts, groups."""
        self._config = config
        self._trust.reconfigure(config)
        self._report_key_problem()

    def key_status(self) -> dict[str, Any]:
        """Where the update keys come from and their key set, for the health document (any
        thread)."""
        return self._trust.describe()

    def versions(self) -> dict[str, int]:
        """Per configured model, the highest update version this device accepted (0: none),
        for the health document: a fleet tool sees which devices a rollout still has to
        reach without asking them (any thread). Empty when the update state is unreadable."""
        if self._store.problem:
            return {}
        return {name: self._store.highest_version(name) for name in self._config.models}

    def _report_key_problem(self) -> None:
        """No keys configured is a choice (info); keys that do not load need the operator."""
        problem = self._trust.problem()
        if not problem:
            return
        updates = self._config.updates
        if updates.trusted_keys or updates.root_keys:
            log.error("updates_disabled", reason=problem)
        else:
            log.info("updates_disabled", reason=problem)

    def recover(self) -> None:
        """Finish what a crash interrupted; runs before the models are loaded, so a model a
        trial left behind is rolled back before it ever serves."""
        recovery.recover(self._store, self._config, self._reporter)

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

    def _verified_payload(self, data: bytes) -> bytes:
        """The payload of a manifest whose signatures verify (intake thread); the keys are
        replaced on reload or by a key set, so they are looked up at each call."""
        return self._trust.verify_manifest(data, datetime.now(timezone.utc))

    # -- paho's network thread: enqueue only ---------------------------------------------------

    def on_manifest(self, message: paho.MQTTMessage) -> None:
        """A manifest arrived (paho's thread); an empty one clears a retained manifest. One
        over ``MAX_MANIFEST_BYTES`` is refused unread; one that finds the intake full is
        dropped and counted."""
        size = len(message.payload)
        if not size:
            return
        if size > MAX_MANIFEST_BYTES:
            self._inbox.offer_refusal(
                f"manifest of {size} bytes is larger than the "
                f"{MAX_MANIFEST_BYTES} bytes a manifest may have; not read"
            )
            return
        self._inbox.offer_manifest(message.topic, bytes(message.payload), bool(message.retain))

    def on_manifest_too_large(self, topic: str, size: int) -> None:
        """A message over ``mqtt.max_packet_bytes`` on a manifest topic (paho's thread)."""
        self._inbox.offer_refusal(
            f"manifest message of {size} bytes is larger than mqtt.max_packet_bytes; not read"
        )

    def on_chunk_too_large(self, topic: str, size: int) -> None:
        """A message over ``mqtt.max_packet_bytes`` on a chunk topic (paho's thread): no
        chunk of an accepted update can be that large, the manifest was checked for it."""
        self._inbox.put(ChunkTooLarge(topic.rsplit("/", 1)[-1], size))

    def on_keyset(self, message: paho.MQTTMessage) -> None:
        """A key set arrived on a keys topic (paho's thread). One over the size a key set may
        have is refused unread; an empty one (a cleared retained set) changes nothing and
        is not queued."""
        size = len(message.payload)
        if not size:
            return
        if size > MAX_KEYSET_BYTES:
            log.warning(
                "keyset_refused",
                topic=message.topic,
                reason=f"key set of {size} bytes is larger than the {MAX_KEYSET_BYTES} "
                "bytes a key set may have; not read",
            )
            return
        self._inbox.offer_keyset(message.topic, bytes(message.payload))

    def on_keyset_too_large(self, topic: str, size: int) -> None:
        """A message over ``mqtt.max_packet_bytes`` on a keys topic (paho's thread)."""
        log.warning(
            "keyset_refused",
            topic=topic,
            reason=f"key set message of {size} bytes is larger than mqtt.max_packet_bytes",
        )

    def on_chunk(self, message: paho.MQTTMessage) -> None:
        """A chunk arrived (paho's thread); dropped when the intake is far behind."""
        self._inbox.offer_chunk(message.topic.rsplit("/", 1)[-1], message.payload)


class UpdateIntake:
    """The intake thread ("updates"): takes the inbox's messages one at a time, decides on
    each manifest and hands the accepted ones to ``InFlight``."""

    def __init__(
        self,
        config: Callable[[], AgentConfig],
        store: UpdateStore,
        inbox: Inbox,
        reporter: StatusReporter,
        *,
        verify: Callable[[bytes], bytes],
        trust: UpdateTrust,
        submit: Callable[[ActiveUpdate], None],
        stopped: threading.Event,
    ) -> None:
        self._config = config  # the current config: it changes on reload
        self._store = store
        self._inbox = inbox
        self._reporter = reporter
        self._verify = verify  # a manifest's bytes -> its verified payload
        self._trust = trust  # takes the key sets
        self._stopped = stopped
        self.inflight = InFlight(config, store, inbox, reporter, submit=submit, stopped=stopped)
        # (update id, manifest digest) of updates installed lately: the same manifest arriving
        # again (a device both named and in a targeted group, a QoS 1 redelivery) is ignored,
        # not REJECTED.
        self._recent: deque[tuple[str, str]] = deque(maxlen=RECENT_IDS)

    def run(self) -> None:
        """The intake thread's loop, until the inbox is closed or the manager stopped."""
        while not self._stopped.is_set():
            message = self._inbox.get(POLL_S)
            if message is None:
                break
            try:
                self.dispatch(message)
                self.inflight.check_stalls()
                self._report_dropped()
            except Exception:  # one bad update must not end update handling
                log.exception("update_intake_failed", kind=message.KIND)
        self.inflight.abandon_all()

    def dispatch(self, message: InboxMessage) -> None:
        """Act on one message (intake thread; the main thread after it stopped)."""
        match message:
            case ManifestArrived(topic, data, retained):
                self._on_manifest(topic, data, retained)
            case KeySetArrived(topic, data):
                # offer_keyset logs the outcome: accepted, ignored (a replay) or refused.
                self._trust.offer_keyset(data, topic, datetime.now(timezone.utc))
            case ManifestRefused(reason):
                self._reporter.report(unauthenticated(None), UpdateState.REJECTED, reason=reason)
            case ChunkTooLarge(update_id, size):
                self.inflight.on_chunk_too_large(update_id, size)
            case ChunkArrived(update_id, data):
                self.inflight.on_chunk(update_id, data)
            case Downloaded(update_id, error):
                self.inflight.on_downloaded(update_id, error)
            case Finished(update_id, accepted):
                self._on_finished(update_id, accepted)
            case Tick():
                pass

    def _on_finished(self, update_id: str, accepted: bool) -> None:
        active = self.inflight.pop(update_id)
        if active is None:
            return
        if accepted:  # past the version floor: a repeat is an echo
            self._recent.append((update_id, active.summary["manifest_sha256"]))
        if active.final is not None:  # None: stopped mid-trial, the next start reports
            final = active.final
            self._reporter.report(
                active.summary, final.state, step=final.step, reason=final.reason, **final.extra
            )
            self._store.finish(update_id)

    def _report_dropped(self) -> None:
        """One REJECTED status for the manifests a full intake dropped since the last one."""
        dropped_keysets = self._inbox.take_dropped_keysets()
        if dropped_keysets:
            log.warning(
                "keyset_dropped",
                dropped=dropped_keysets,
                reason="more key sets than the intake can hold were waiting; publish again",
            )
        dropped = self._inbox.take_dropped()
        if dropped:
            self._reporter.report(
                unauthenticated(None),
                UpdateState.REJECTED,
                dropped=dropped,
                reason=f"{dropped} manifest(s) dropped unread: more than "
                f"{MANIFESTS_WAITING_MAX} (or {MANIFESTS_WAITING_MAX_BYTES} "
                "bytes) were waiting to be verified; send again",
            )

    def _on_manifest(self, topic: str, data: bytes, retained: bool = False) -> None:
        digest = hashlib.sha256(data).hexdigest()
        log.info(
            "update_manifest_received",
            topic=topic,
            bytes=len(data),
            manifest_sha256=digest,
            retained=retained,
        )
        summary = unauthenticated(digest)
        try:
            payload = self._verify(data)
            # Signed, not yet known to be well-formed: what it names may be quoted now.
            summary.update(signed_claims(payload), authenticated=True)
            manifest = parse_payload(payload)
            summary = authenticated(manifest, digest)
            if retained and self._already_there(manifest, digest):
                return
            if self._is_repeat(manifest, digest):
                return
            in_progress = [active.manifest for active in self.inflight.updates()]
            check_acceptable(manifest, self._config(), self._store, in_progress)
        except UpdateRejectedError as exc:
            self._reporter.report(summary, UpdateState.REJECTED, reason=str(exc))
            return
        except Exception as exc:  # whatever the bytes did, they get their one status
            log.exception("update_manifest_unreadable", manifest_sha256=digest)
            self._reporter.report(
                summary, UpdateState.REJECTED, reason=f"manifest could not be read: {exc!r}"
            )
            return
        self.inflight.start(manifest, summary)

    def _already_there(self, manifest: UpdateManifest, digest: str) -> bool:
        """Whether a retained manifest (desired state, delivered again at every reconnect)
        needs nothing: this device is at or above its version, or it has expired. Such a
        manifest gets no status: it was answered when it was new."""
        floor = self._store.highest_version(manifest.model)
        expired = datetime.now(timezone.utc) >= manifest.expires
        if manifest.version > floor and not expired:
            return False
        log.info(
            "update_manifest_retained_ignored",
            update_id=manifest.update_id,
            model=manifest.model,
            version=manifest.version,
            device_version=floor,
            expired=expired,
            manifest_sha256=digest,
        )
        return True

    def _is_repeat(self, manifest: UpdateManifest, digest: str) -> bool:
        """The same bytes again (an echo: ignored), or ``UpdateRejectedError`` when the id of
        an update in progress or installed lately comes with other bytes."""
        seen = [
            a.summary["manifest_sha256"]
            for a in self.inflight.updates()
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
