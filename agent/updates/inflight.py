"""The updates in flight: accepted, their bytes being transferred, until their final status.

Owned by the intake thread ("updates"). An update's bytes arrive as MQTT chunks (written
straight into its staging file) or from an https download on a thread of its own that
reports back through the inbox; a complete transfer goes to the install thread, a stalled,
flooded or broken one ends FAILED at the downloading step.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from agent.config.schema import AgentConfig
from agent.errors import UnsafePathError, UpdateFailedError
from agent.updates.inbox import INBOX_MAX_BYTES, Downloaded, Inbox
from agent.updates.install import make_staging_dir
from agent.updates.manifest import ChunkSource, UpdateManifest
from agent.updates.staged import discard_staged, staged_prefix
from agent.updates.states import UpdateState, UpdateStep
from agent.updates.status import StatusReporter
from agent.updates.store import JournalEntry, UpdateStore
from agent.updates.transfer import ChunkTransfer, DownloadThread, download

log = structlog.get_logger(__name__)

# A chunk transfer silent this long (or half of updates.chunk_timeout_s, if less) reports
# IN_PROGRESS at step waiting_for_transfer: the chunks can be sent again for it.
WAITING_REPORT_S = 5.0


@dataclass(frozen=True)
class FinalStatus:
    """The last status of an update: its state, where and why it failed, and the fields
    only some final statuses carry (``extra``: a SUCCEEDED trial's ``validation``)."""

    state: UpdateState
    step: UpdateStep | None = None
    reason: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class ActiveUpdate:
    """An accepted update until its final status; owned by the intake thread, lent to the
    install thread from a complete transfer until the ``Finished`` message."""

    manifest: UpdateManifest
    entry: JournalEntry
    summary: dict[str, Any]  # what every status of it names
    transfer: ChunkTransfer | None = None
    cancel: threading.Event | None = None
    # The final status, decided by the install thread and published by the intake thread
    # once it has let the update go (the ``Finished`` message hands it over): an operator
    # who sends the next update on SUCCEEDED must not find this one still in progress.
    final: FinalStatus | None = None
    # When (monotonic) the last waiting_for_transfer status was sent; 0: none yet.
    waiting_reported: float = 0.0


class InFlight:
    """The accepted updates by id, and their transfers (intake thread)."""

    def __init__(
        self,
        config: Callable[[], AgentConfig],
        store: UpdateStore,
        inbox: Inbox,
        reporter: StatusReporter,
        *,
        submit: Callable[[ActiveUpdate], None],
        stopped: threading.Event,
    ) -> None:
        self._config = config  # the current config: it changes on reload
        self._store = store
        self._inbox = inbox
        self._reporter = reporter
        self._submit = submit  # hands a complete transfer to the install thread
        self._stopped = stopped
        self._active: dict[str, ActiveUpdate] = {}

    def updates(self) -> list[ActiveUpdate]:
        """The updates in flight, oldest first."""
        return list(self._active.values())

    def pop(self, update_id: str) -> ActiveUpdate | None:
        """Let an update go (its final status is being sent)."""
        return self._active.pop(update_id, None)

    def start(self, manifest: UpdateManifest, summary: dict[str, Any]) -> None:
        """Journal an accepted update and start receiving its bytes; FAILED when that
        cannot start."""
        try:
            self._begin(manifest, summary)
        except (OSError, UnsafePathError) as exc:  # folder not writable or a link, disk full
            active = self._active.get(manifest.update_id)
            reason = f"cannot start the transfer: {exc}"
            if active is not None:
                self._fail_transfer(active, reason)
            else:
                self._reporter.report(
                    summary, UpdateState.FAILED, step=UpdateStep.DOWNLOADING, reason=reason
                )

    def on_chunk(self, update_id: str, data: bytes | bytearray) -> None:
        """Write one chunk message; a complete transfer goes to the install thread."""
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
            self._submit(active)

    def on_chunk_too_large(self, update_id: str, size: int) -> None:
        """A chunk message too large to read: the transfer cannot complete."""
        active = self._active.get(update_id)
        if active is not None and active.transfer is not None:
            self._fail_transfer(
                active,
                f"a chunk message of {size} bytes arrived, larger than mqtt.max_packet_bytes",
            )

    def on_downloaded(self, update_id: str, error: UpdateFailedError | None) -> None:
        """An https download ended: on to the install thread, or FAILED."""
        active = self._active.get(update_id)
        if active is None:
            return
        if error is not None:
            self._fail_transfer(active, str(error))
        else:
            log.info("update_download_complete", update_id=update_id)
            self._submit(active)

    def check_stalls(self) -> None:
        """FAILED for each chunk transfer that went silent or whose chunks were dropped."""
        now = time.monotonic()
        limit = self._config().updates.chunk_timeout_s
        overflowed = self._inbox.take_overflowed()
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
            elif (
                now - transfer.last_activity > min(WAITING_REPORT_S, limit / 2)
                and transfer.last_activity > active.waiting_reported
            ):
                # Chunks stopped (or never came: a retained manifest whose sender is gone):
                # say so once per silence, so an operator's tool can send them again.
                active.waiting_reported = now
                self._reporter.report(
                    active.summary,
                    UpdateState.IN_PROGRESS,
                    step=UpdateStep.WAITING_FOR_TRANSFER,
                    received=transfer.received,
                    chunks=transfer.source.chunks,
                )

    def abandon_all(self) -> None:
        """Stop every transfer (the intake thread is ending); their journal entries make the
        next start report them."""
        for active in list(self._active.values()):
            if active.transfer is not None:
                active.transfer.abandon()
            if active.cancel is not None:
                active.cancel.set()

    def _begin(self, manifest: UpdateManifest, summary: dict[str, Any]) -> None:
        target = self._config().model_path(manifest.model)
        folder = make_staging_dir(target)
        staged = folder / f"{manifest.update_id}.part"
        entry = JournalEntry(
            update_id=manifest.update_id,
            model=manifest.model,
            version=manifest.version,
            sha256=manifest.sha256,
            step=UpdateStep.DOWNLOADING,
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
        self._reporter.report(summary, UpdateState.QUEUED)
        active = ActiveUpdate(manifest, entry, summary)
        self._active[manifest.update_id] = active
        self._reporter.report(summary, UpdateState.IN_PROGRESS, step=UpdateStep.DOWNLOADING)
        if isinstance(manifest.source, ChunkSource):
            active.transfer = ChunkTransfer(manifest.source, manifest.length, staged)
            return
        active.cancel = threading.Event()
        url, cancel, updates = manifest.source.url, active.cancel, self._config().updates
        kept = staged_prefix(staged, url, manifest.length, manifest.sha256)
        if kept:  # staged by an earlier attempt at this update (the agent restarted)
            log.info("update_download_resuming", update_id=manifest.update_id, kept_bytes=kept)
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
                sha256=manifest.sha256,
            ),
            # Runs on the download thread: hand the outcome to the intake thread.
            lambda error: self._inbox.put(Downloaded(manifest.update_id, error)),
        ).start()

    def _fail_transfer(self, active: ActiveUpdate, reason: str) -> None:
        if active.transfer is not None:
            active.transfer.abandon()
            active.transfer = None
        discard_staged(Path(active.entry.staged))
        self._store.finish(active.manifest.update_id)
        self._active.pop(active.manifest.update_id, None)
        self._reporter.report(
            active.summary, UpdateState.FAILED, step=UpdateStep.DOWNLOADING, reason=reason
        )
