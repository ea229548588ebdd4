"""The install thread ("updates-install"): verify the staged bytes, install, trial, commit or
roll back. One install at a time.

The trial goes through the model registry, the same load path as a file dropped by hand,
with the manifest's golden set (``validation``) as the one the new model must pass, and
with a shadow trial (``updates.shadow`` or the manifest's ``shadow``) as the last word
before the new model may serve.
Every step is journalled in ``UpdateStore`` before its effects, so start-up recovery can
finish what a crash or power cut interrupted.
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from agent.config.schema import AgentConfig
from agent.durable import write_atomically
from agent.errors import UpdateFailedError
from agent.inference.golden import golden_path_for, reference_path_for
from agent.inference.registry import ModelRegistry
from agent.updates.failpoints import failpoint
from agent.updates.inbox import Finished, Inbox
from agent.updates.inflight import ActiveUpdate, FinalStatus
from agent.updates.install import (
    file_sha256,
    install,
    previous_path,
    restore_previous,
    verify_staged,
)
from agent.updates.manifest import UpdateManifest
from agent.updates.shadow_step import ShadowStep
from agent.updates.shadow_terms import terms_for
from agent.updates.states import UpdateState, UpdateStep
from agent.updates.status import StatusReporter
from agent.updates.store import UpdateStore

log = structlog.get_logger(__name__)

# The steps of a load the registry reports through ``progress`` that a status may name.
_LOAD_STEPS = {UpdateStep.BUILDING_ENGINE.value, UpdateStep.VALIDATING.value}
SUPERSEDED_SUFFIX = ".superseded"


@dataclass(frozen=True)
class TrialOutcome:
    """How a trial ended: why it failed and at which step (None: it passed), and the
    fields its SUCCEEDED status carries (``validation``)."""

    problem: str | None = None
    step: UpdateStep = UpdateStep.TRIAL
    extra: dict[str, Any] = field(default_factory=dict)


class Installer:
    """Runs the install thread: takes complete transfers and carries each to its final
    status, which it hands back to the intake thread through the inbox."""

    def __init__(
        self,
        config: Callable[[], AgentConfig],
        registry: ModelRegistry,
        store: UpdateStore,
        reporter: StatusReporter,
        *,
        inbox: Inbox,
        stopped: threading.Event,
    ) -> None:
        self._config = config  # the current config: it changes on reload
        self._registry = registry
        self._store = store
        self._reporter = reporter
        self._inbox = inbox
        self._stopped = stopped
        self._installs: queue.Queue[ActiveUpdate | None] = queue.Queue()  # None: stop

    def submit(self, active: ActiveUpdate) -> None:
        """Queue an update whose bytes are all staged (intake thread)."""
        self._installs.put(active)

    def close(self) -> None:
        """Make the install thread return once its install in progress ends."""
        self._installs.put(None)

    def run(self) -> None:
        """The install thread's loop."""
        while True:
            active = self._installs.get()
            if active is None or self._stopped.is_set():
                return
            accepted = False
            try:
                accepted = self._install(active)
            except Exception as exc:  # whatever happens, the update gets a final status
                log.exception("update_install_crashed", update_id=active.manifest.update_id)
                active.final = FinalStatus(
                    UpdateState.FAILED, None, f"{exc!r}; {self._undo(active)}"
                )
            finally:
                self._inbox.put(Finished(active.manifest.update_id, accepted))

    def _install(self, active: ActiveUpdate) -> bool:
        """Verify, install, trial, commit or roll back; whether the version floor was raised.
        Sets ``active.final`` unless stopped mid-trial."""
        manifest, summary = active.manifest, active.summary
        target, staged = Path(active.entry.target), Path(active.entry.staged)
        self._reporter.report(summary, UpdateState.IN_PROGRESS, step=UpdateStep.VERIFYING)
        try:
            verify_staged(staged, manifest.length, manifest.sha256)
        except UpdateFailedError as exc:
            staged.unlink(missing_ok=True)
            active.final = FinalStatus(UpdateState.FAILED, UpdateStep.VERIFYING, str(exc))
            return False
        failpoint("verified")
        previous = file_sha256(target)
        self._store.accept(
            manifest.update_id, manifest.model, manifest.version, manifest.sha256, previous
        )
        failpoint("accepted")
        self._reporter.report(summary, UpdateState.IN_PROGRESS, step=UpdateStep.INSTALLING)
        # Held from the install to the commit or rollback: the folder watcher sees the new
        # file appear (and the old one come back) and must not load it meanwhile, outside
        # the trial's deadline.
        with self._registry.hold(manifest.model):
            install(staged, target)
            failpoint("installed")
            self._store.set_step(manifest.update_id, UpdateStep.TRIAL)
            self._reporter.report(summary, UpdateState.IN_PROGRESS, step=UpdateStep.TRIAL)
            outcome = self._trial(manifest, summary, target)
            if self._stopped.is_set():
                # Stopped mid-trial (its warm-up was cancelled): the journal still says
                # "trial", so the next start rolls back before any model loads and reports.
                log.info("update_trial_interrupted", **summary)
                return True
            if outcome.problem is None:
                outcome = _supersede_golden(target, summary) or outcome
            if outcome.problem is None:
                self._store.commit(manifest.update_id)
                failpoint("committed")
                self._keep_reference(manifest, summary)
                active.final = FinalStatus(UpdateState.SUCCEEDED, extra=outcome.extra)
            else:
                done = restore_previous(target, previous)
                # The old model back, judged by its own golden set beside it, if any.
                self._registry.load(manifest.model)
                active.final = FinalStatus(
                    UpdateState.FAILED,
                    outcome.step,
                    f"{outcome.problem}; rolled back: {done}",
                    extra=outcome.extra,
                )
        return True

    def _keep_reference(self, manifest: UpdateManifest, summary: dict[str, Any]) -> None:
        """Keep the committed update's golden set, signed with the model, as the drift
        reference ``golden`` names (``state_dir/references/MODEL.npz``). A failure to
        write it costs the drift measure, never the update: logged."""
        if manifest.validation is None:
            return
        path = reference_path_for(Path(self._config().state_dir), manifest.model)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_atomically(path, manifest.validation.to_bytes())
        except OSError as exc:
            log.warning("drift_reference_not_kept", **summary, error=str(exc))
            return
        log.info("drift_reference_kept", **summary, path=str(path))

    def _undo(self, active: ActiveUpdate) -> str:
        """After an unexpected error (disk full, I/O error): put the previous file back if
        the new one may have been installed, as a restart would."""
        entry = next(
            (e for e in self._store.journal() if e.update_id == active.manifest.update_id), None
        )
        Path(active.entry.staged).unlink(missing_ok=True)
        if entry is None or entry.step not in (UpdateStep.INSTALLING, UpdateStep.TRIAL):
            return "nothing was installed"
        try:
            done = restore_previous(Path(entry.target), entry.previous_sha256)
        except (UpdateFailedError, OSError) as exc:
            return f"rollback failed: {exc}"
        self._registry.load(entry.model)
        return f"rolled back: {done}"

    def _trial(
        self, manifest: UpdateManifest, summary: dict[str, Any], target: Path
    ) -> TrialOutcome:
        """Load the installed file through the registry (checks, warm-up, the manifest's
        golden set, swap) within ``updates.trial_timeout_s``."""

        def progress(step: str) -> None:  # on this thread, from inside the load
            if step in _LOAD_STEPS:
                self._reporter.report(summary, UpdateState.IN_PROGRESS, step=UpdateStep(step))

        version = "sha256:" + manifest.sha256
        config = self._config()
        shadow = self._shadow_step(manifest, summary, config, previous_path(target))
        model = self._registry.load(
            manifest.model,
            # The shadow has a duration of its own: the bound is on loading and warming up.
            max_seconds=config.updates.trial_timeout_s,
            # Only the manifest's golden set judges the new model: a NAME.golden.npz beside
            # the file describes the old one (None when the manifest has none).
            golden=manifest.validation,
            progress=progress,
            gate=shadow,
        )
        if model is None or model.version != version:
            if shadow is not None and shadow.problem is not None:
                return TrialOutcome(
                    shadow.problem, UpdateStep.SHADOW, extra={"shadow": shadow.figures}
                )
            status = self._registry.status(manifest.model)
            last = status.last_load or {}
            error = status.error or "no error recorded"
            if last.get("step") == UpdateStep.VALIDATING and last.get("version") == version:
                return TrialOutcome(error, UpdateStep.VALIDATING)
            return TrialOutcome(f"the new model did not load: {error}")
        extra: dict[str, Any] = {}
        if model.validation is not None:
            extra["validation"] = model.validation.to_dict()
        if shadow is not None and shadow.figures is not None:
            extra["shadow"] = shadow.figures
        return TrialOutcome(extra=extra)

    def _shadow_step(
        self,
        manifest: UpdateManifest,
        summary: dict[str, Any],
        config: AgentConfig,
        serving_file: Path,
    ) -> ShadowStep | None:
        """The shadow trial of this update, if its terms ask for one (``serving_file``:
        where the install kept the file it replaced)."""
        terms = terms_for(config.updates.shadow, manifest.shadow)
        if not terms.enabled:
            return None

        def progress(figures: dict[str, Any]) -> None:  # the shadow thread; this one waits
            self._reporter.report(
                summary, UpdateState.IN_PROGRESS, step=UpdateStep.SHADOW, shadow=figures
            )

        tolerances = manifest.validation.tolerances if manifest.validation else None
        return ShadowStep(
            self._registry,
            terms,
            tolerances,
            serving_file=serving_file,
            stopped=self._stopped,
            progress=progress,
        )


def _supersede_golden(target: Path, summary: dict[str, Any]) -> TrialOutcome | None:
    """Move the ``NAME.golden.npz`` beside ``target`` aside (``.superseded``) before the
    commit: it describes the model being replaced, and would refuse the new one at its next
    load (a restart, a hot reload). Before, not after, the commit: a crash in between rolls
    back to the old model, which then loads unchecked (safe), never to the new model refused
    by a stale set. None when done (or nothing to do), else why the update must fail."""
    golden = golden_path_for(target)
    if not os.path.lexists(golden):
        return None
    aside = golden.with_name(golden.name + SUPERSEDED_SUFFIX)
    try:
        os.replace(golden, aside)  # renames a symlink itself, never what it points to
    except OSError as exc:
        return TrialOutcome(
            f"the trial passed, but {golden.name} (the golden set of the model being "
            f"replaced) cannot be moved aside to {aside.name}: {exc.strerror}; it would "
            "refuse the new model at its next load"
        )
    log.info("golden_set_superseded", **summary, golden=str(golden), moved_to=str(aside))
    failpoint("golden_superseded")
    return None
