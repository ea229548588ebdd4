"""What the device remembers about updates across restarts and power cuts.

One JSON file in ``state_dir/updates``, replaced atomically on every change: per model the
highest version ever accepted (the rollback and replay defence), the sha256 of the version
committed last (the only signed bytes a file dropped by hand may have), and a journal entry
per update in progress, so that a restart knows what a crash interrupted. Fails closed: an
unreadable file refuses updates instead of forgetting the versions it protects.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import structlog

from agent.durable import own_folder, refuse_symlink, write_atomically
from agent.errors import UnsafePathError, UpdateRejectedError
from agent.updates.states import UpdateStep

log = structlog.get_logger(__name__)

STATE_FILE = "state.json"
SIGNED_HISTORY = 8  # digests kept per model: the installed file, its .prev and a few before


@dataclass
class JournalEntry:
    """An update between acceptance and its final status."""

    update_id: str
    model: str
    version: int
    sha256: str
    # downloading | installing | trial | committed (``JOURNAL_STEPS``) when this agent wrote
    # it; a str, because a state file left by another version may hold a step this one lacks.
    step: str
    target: str  # the model file the update replaces
    staged: str  # the staging file the bytes are written to
    previous_sha256: str | None = None
    started: float = field(default_factory=time.time)
    manifest_sha256: str | None = None  # of the manifest's bytes, named in every status


@dataclass
class ModelRecord:
    """The update history of one model."""

    version: int = 0  # highest version ever accepted for install
    # sha256 of files installed by updates, newest last. Kept for state written before
    # ``committed`` existed: until that model's next commit, any of them may load.
    signed: list[str] = field(default_factory=list)
    committed: str | None = None  # sha256 of the version whose trial succeeded last


class UpdateStore:
    """The persisted update state; thread-safe (the intake and install threads share it)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.path = folder / STATE_FILE
        self._lock = threading.Lock()
        self._problem: str | None = None
        self._models: dict[str, ModelRecord] = {}
        self._journal: dict[str, JournalEntry] = {}
        self._load()

    @property
    def problem(self) -> str | None:
        """Why updates are refused (the state file is unreadable), or None."""
        return self._problem

    def highest_version(self, model: str) -> int:
        """The highest version ever accepted for ``model`` (0: none)."""
        self._check()
        with self._lock:
            return self._models.get(model, ModelRecord()).version

    def may_load(self, model: str, sha256: str) -> bool:
        """Whether a file with this digest may serve ``model`` under ``require_signed_files``:
        the version committed last, or the one an update in progress is trying. An older
        signed version (``NAME.onnx.prev`` copied back by hand) may not: that would be a
        rollback past the version floor."""
        with self._lock:
            record = self._models.get(model, ModelRecord())
            if any(
                e.model == model
                and e.sha256 == sha256
                and e.step in (UpdateStep.INSTALLING, UpdateStep.TRIAL)
                for e in self._journal.values()
            ):
                return True
            if record.committed is None:  # state from before commits were recorded
                return sha256 in record.signed
            return sha256 == record.committed

    def journal(self) -> list[JournalEntry]:
        """Updates in progress, oldest first."""
        with self._lock:
            return sorted(self._journal.values(), key=lambda e: e.started)

    def begin(self, entry: JournalEntry) -> None:
        """Record an accepted update before any of its bytes are written."""
        with self._lock:
            self._journal[entry.update_id] = entry
            self._save()

    def set_step(self, update_id: str, step: UpdateStep, **changes: Any) -> None:
        """Move a journalled update to ``step`` (durably, before the step's effects)."""
        with self._lock:
            entry = self._journal[update_id]
            entry.step = step
            for key, value in changes.items():
                setattr(entry, key, value)
            self._save()

    def accept(
        self, update_id: str, model: str, version: int, sha256: str, previous_sha256: str | None
    ) -> None:
        """Raise the model's version floor, trust its digest, and mark the update as
        installing over a file with digest ``previous_sha256``: one atomic write, so a crash
        leaves all of it or none."""
        with self._lock:
            record = self._models.setdefault(model, ModelRecord())
            record.version = max(record.version, version)
            if sha256 in record.signed:
                record.signed.remove(sha256)
            record.signed = [*record.signed, sha256][-SIGNED_HISTORY:]
            entry = self._journal[update_id]
            entry.step = UpdateStep.INSTALLING
            entry.previous_sha256 = previous_sha256
            self._save()

    def commit(self, update_id: str) -> None:
        """The trial succeeded: the update's bytes become the model's committed version."""
        with self._lock:
            entry = self._journal[update_id]
            entry.step = UpdateStep.COMMITTED
            self._models.setdefault(entry.model, ModelRecord()).committed = entry.sha256
            self._save()

    def finish(self, update_id: str) -> None:
        """Forget a journalled update (its final status has been sent)."""
        with self._lock:
            if self._journal.pop(update_id, None) is None:
                return
            try:
                self._save()
            except OSError as exc:
                # Forgetting can wait (state_dir full or read-only): the next save drops the
                # entry, and a restart before that finds it with its staging file gone and
                # ends it as interrupted. Raising here would lose the final status instead.
                log.warning(
                    "update_journal_write_failed",
                    update_id=update_id,
                    path=str(self.path),
                    error=exc.strerror or str(exc),
                )

    def _check(self) -> None:
        if self._problem is not None:
            raise UpdateRejectedError(self._problem)

    def _load(self) -> None:
        try:
            own_folder(self.folder)
            refuse_symlink(self.path)
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return
        except UnsafePathError as exc:
            self._problem = f"update state is refused: {exc}"
            return
        except OSError as exc:
            self._problem = f"update state {self.path} is unreadable: {exc.strerror}"
            return
        try:
            data = json.loads(text)
            self._models = {
                name: ModelRecord(**record) for name, record in data.get("models", {}).items()
            }
            self._journal = {
                entry["update_id"]: JournalEntry(**entry) for entry in data.get("journal", [])
            }
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            self._problem = (
                f"update state {self.path} is corrupt ({exc}); updates are "
                "refused until it is repaired or removed, because it holds the "
                "version floor that stops downgrades"
            )

    def _save(self) -> None:
        own_folder(self.folder)
        document = {
            "models": {name: asdict(record) for name, record in self._models.items()},
            "journal": [asdict(entry) for entry in self._journal.values()],
        }
        write_atomically(self.path, json.dumps(document, indent=1).encode(), mode=0o600)
