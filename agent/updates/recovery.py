"""Start-up after a crash or power cut mid-update: finish what the journal says was under way.

Runs on the main thread before the models are loaded, so a model a trial left behind is
rolled back before it ever serves. Every step of an update is journalled before its effects,
so the step recorded tells what may have happened: nothing installed yet (downloading),
the new file perhaps in place (installing, trial), or the trial passed (committed).
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

import structlog

from agent.config.schema import AgentConfig
from agent.errors import UnsafePathError, UpdateFailedError
from agent.updates.install import clean_staging, restore_previous, staging_dir
from agent.updates.staged import discard_staged, meta_path
from agent.updates.states import JOURNAL_STEPS, UpdateState, UpdateStep
from agent.updates.status import StatusReporter, journalled
from agent.updates.store import JournalEntry, UpdateStore

log = structlog.get_logger(__name__)

# A partial https download is kept this long across restarts (the default manifest validity):
# the same update sent again, or left retained, resumes from it.
KEEP_PARTIAL_S = 7 * 86_400


def recover(store: UpdateStore, config: AgentConfig, reporter: StatusReporter) -> None:
    """Give each update the journal remembers its final status (rolling back one that was
    not committed), then remove what staging folders hold."""
    if store.problem:
        log.error("update_state_unreadable", reason=store.problem)
        return
    for entry in store.journal():
        _finish(entry, reporter)
        store.finish(entry.update_id)
    for name in config.models:
        folder = staging_dir(config.model_path(name))
        try:
            removed = clean_staging(folder, keep=resumable_downloads(folder))
        except (UnsafePathError, OSError) as exc:
            log.error("update_staging_unsafe", folder=str(folder), problem=str(exc))
            continue
        if removed:
            log.info("update_leftovers_removed", folder=str(folder), files=removed)


def resumable_downloads(folder: Path, now: float | None = None) -> set[Path]:
    """The partial https downloads in a staging folder worth keeping: each ``.part`` with
    its sidecar (``transfer.meta_path``) written less than ``KEEP_PARTIAL_S`` ago, and the
    sidecar. The same update sent again resumes from them; the rest are leftovers."""
    now = time.time() if now is None else now
    keep: set[Path] = set()
    if not folder.is_dir() or folder.is_symlink():
        return keep
    for part in folder.glob("*.part"):
        meta = meta_path(part)
        with contextlib.suppress(OSError):
            if (
                not part.is_symlink()
                and not meta.is_symlink()
                and now - meta.stat().st_mtime < KEEP_PARTIAL_S
            ):
                keep.update((part, meta))
    return keep


def _staged_bytes(staged: Path) -> int:
    try:
        return 0 if staged.is_symlink() else staged.stat().st_size
    except OSError:
        return 0


def _finish(entry: JournalEntry, reporter: StatusReporter) -> None:
    summary = journalled(entry)
    if entry.step == UpdateStep.COMMITTED:
        reporter.report(summary, UpdateState.SUCCEEDED, reason="committed before the agent stopped")
    elif entry.step == UpdateStep.DOWNLOADING:
        staged = Path(entry.staged)
        kept = _staged_bytes(staged) if meta_path(staged).exists() else 0
        if not kept:
            discard_staged(staged)
        resume = (
            f"; the {kept} bytes downloaded are kept for {KEEP_PARTIAL_S // 86_400} days: "
            "the same manifest again (or a retained one) resumes the download"
            if kept
            else ""
        )
        reporter.report(
            summary,
            UpdateState.FAILED,
            step=UpdateStep.DOWNLOADING,
            reason="the agent stopped during the download (restart, crash "
            "or power loss); nothing was installed; send the update "
            f"again{resume}",
        )
    else:
        try:
            done = restore_previous(Path(entry.target), entry.previous_sha256)
        except (UpdateFailedError, OSError) as exc:
            done = f"rollback failed: {exc}"
        reporter.report(
            summary,
            UpdateState.FAILED,
            # installing or trial; a step another agent version journalled (before a
            # downgrade) is rolled back the same way, named in the reason only
            step=UpdateStep(entry.step) if entry.step in JOURNAL_STEPS else None,
            reason=f"the agent stopped during the {entry.step} step, before "
            f"the new model was committed; {done}; version "
            f"{entry.version} is now burnt: publish a higher one",
        )
