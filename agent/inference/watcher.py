"""Watch model files and ask for a reload once a new file is complete.

watchdog reports created/modified events while a file is still being written (watchdog
#309), so this module acts on close-after-write and rename-into-place events, debounces
them, and for events without a close (polling, network filesystems) waits until size and
mtime have settled. The folder watcher only schedules: loads run on this module's reload
thread, never on watchdog's. A handler exception would kill watchdog's observer thread, so
handlers catch everything, and a dead observer is restarted.
"""

from __future__ import annotations

import os
import re
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
from watchdog.events import (
    FileClosedEvent,
    FileCreatedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers import Observer
from watchdog.observers.api import BaseObserver
from watchdog.observers.polling import PollingObserver

from agent.config.schema import WatchConfig

log = structlog.get_logger(__name__)

NETWORK_FILESYSTEMS = frozenset(
    {
        "nfs",
        "nfs4",
        "cifs",
        "smb3",
        "smbfs",
        "fuse.sshfs",
        "9p",
        "ceph",
        "glusterfs",
        "fuse.s3fs",
        "davfs",
        "fuse.rclone",
        "virtiofs",
        "fuse.gcsfuse",
    }
)
TEMP_SUFFIXES = (".tmp", ".part", ".swp", ".partial", "~")
# A model whose load is in progress (an update trial) is looked at again this much later.
BUSY_RETRY_S = 1.0


def is_temp_file(path: str) -> bool:
    """Editors', rsync's and downloaders' temporary names: never a model to load."""
    name = os.path.basename(path)
    return name.startswith(".") or name.endswith(TEMP_SUFFIXES)


def filesystem_type(path: Path, mounts_file: Path = Path("/proc/mounts")) -> str | None:
    """The filesystem type of the mount holding ``path`` (longest mount-point prefix)."""
    try:
        lines = mounts_file.read_text().splitlines()
    except OSError:
        return None
    target = str(path.resolve())
    best, best_type = "", None
    for line in lines:
        fields = line.split()
        if len(fields) < 3:
            continue
        mount_point = fields[1].replace("\\040", " ")
        inside = target == mount_point or target.startswith(mount_point.rstrip("/") + "/")
        if inside and len(mount_point) >= len(best):
            best, best_type = mount_point, fields[2]
    return best_type


@dataclass
class _Pending:
    due: float
    settle: bool  # True: wait for size/mtime to stop changing
    stat: tuple[int, int] | None = None


class ModelFileWatcher:
    """Turns file events on the watched paths into debounced ``on_ready(model_name)`` calls.

    ``on_ready`` runs on this watcher's reload thread, one call at a time; when it returns
    False (that model is loading already) the file is looked at again a moment later.
    """

    def __init__(
        self,
        models: Mapping[str, Path],
        on_ready: Callable[[str], Any],
        config: WatchConfig,
        models_dir: Path | None = None,
    ) -> None:
        """``models_dir``: where model files no model names are looked for at start."""
        self._files = {name: Path(path).absolute() for name, path in models.items()}
        self._paths: dict[Path, list[str]] = {}
        for name, path in self._files.items():
            self._paths.setdefault(path, []).append(name)
        self._on_ready = on_ready
        self._config = config
        self._cond = threading.Condition()
        self._pending: dict[str, _Pending] = {}
        self._stopped = False
        self._observer: BaseObserver | None = None
        # (st_dev, st_ino) of each watched folder when it was scheduled, None: missing. A
        # folder deleted and made again is a new inode the old watch never sees.
        self._folder_ids: dict[Path, tuple[int, int] | None] = {}
        self.mode = "off"
        self._unconfigured = _Unconfigured()
        self._models_dir = models_dir
        self._thread = threading.Thread(target=self._run, name="model-reload", daemon=True)

    def start(self) -> None:
        """Start watching (and the reload thread); say which files in ``models_dir`` no
        model names."""
        if self._models_dir is not None:
            for path in unconfigured_model_files(self._models_dir, self._paths):
                self._unconfigured.announce(path)
        if self._config.mode == "off" or not self._paths:
            log.info(
                "model_watch_off",
                reason="watch.mode is off" if self._paths else "no models configured",
            )
            return
        self._start_observer()
        self._thread.start()

    def stop(self) -> None:
        """Stop watching. A reload in progress is not waited for beyond a second: stopping
        must stay fast, and the half-built session is simply never swapped in."""
        with self._cond:
            self._stopped = True
            self._cond.notify_all()
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(timeout=2)
        if self._thread.is_alive():
            self._thread.join(timeout=1.0)

    def notify(self, path: str, complete: bool, renamed: bool = False) -> None:
        """Record an event on ``path``; ``complete``: closed after writing or renamed into place
        (``renamed``: a rename is atomic, so it needs no debounce).

        Called on watchdog's thread, and by tests.
        """
        names = self._paths.get(Path(path).absolute())
        if is_temp_file(path):
            return
        if not names:
            if complete:
                self._unconfigured.announce(Path(path))
            return
        now = time.monotonic()
        stat = None if complete else _stat(Path(path))
        with self._cond:
            for name in names:
                self._note(name, complete, now, stat, renamed)
            self._cond.notify()

    def _note(
        self, name: str, complete: bool, now: float, stat: tuple[int, int] | None, renamed: bool
    ) -> None:
        if complete:
            delay = 0.0 if renamed else self._config.debounce_ms / 1000
            self._pending[name] = _Pending(due=now + delay, settle=False)
            return
        existing = self._pending.get(name)
        if existing is None or existing.settle:
            self._pending[name] = _Pending(
                due=now + self._config.settle_ms / 1000, settle=True, stat=stat
            )
        else:  # a close is already pending; more writes push it back a little
            existing.due = max(existing.due, now + self._config.debounce_ms / 1000)

    # -- observer management -------------------------------------------------------------

    def _choose_mode(self) -> str:
        if self._config.mode in ("inotify", "polling"):
            return self._config.mode
        for folder in self._folders():
            fs_type = filesystem_type(folder)
            if fs_type in NETWORK_FILESYSTEMS:
                log.info(
                    "model_watch_polling",
                    folder=str(folder),
                    filesystem=fs_type,
                    reason="inotify does not see changes made by other hosts",
                )
                return "polling"
        return "inotify"

    def _folders(self) -> list[Path]:
        return sorted({path.parent for path in self._paths})

    def _start_observer(self) -> None:
        mode = self._choose_mode()
        observer = self._make_observer(mode)
        try:
            self._schedule(observer)
            observer.start()
        except OSError as exc:  # inotify instance or watch limits reached, or unsupported
            if mode == "polling":
                raise
            log.warning(
                "model_watch_inotify_failed", error=str(exc), action="falling back to polling"
            )
            mode = "polling"
            observer = self._make_observer(mode)
            self._schedule(observer)
            observer.start()
        self._observer = observer
        self._folder_ids = self._current_folder_ids()
        self.mode = mode
        log.info(
            "model_watch_started",
            mode=mode,
            folders=[str(f) for f in self._folders()],
            files=len(self._paths),
        )

    def _make_observer(self, mode: str) -> BaseObserver:
        if mode == "polling":
            return PollingObserver(timeout=self._config.poll_interval_s)
        return Observer()

    def _schedule(self, observer: BaseObserver) -> None:
        handler = _Handler(self)
        for folder in self._folders():
            folder.mkdir(parents=True, exist_ok=True)
            observer.schedule(handler, str(folder), recursive=False)

    def _ensure_observer_alive(self) -> None:
        if self._observer is not None and not self._observer.is_alive() and not self._stopped:
            log.error("model_watch_died", action="restarting the file watcher")
            try:
                self._start_observer()
            except Exception:
                log.exception("model_watch_restart_failed")
            return
        self._follow_replaced_folders()

    def _current_folder_ids(self) -> dict[Path, tuple[int, int] | None]:
        ids: dict[Path, tuple[int, int] | None] = {}
        for folder in self._folders():
            try:
                info = folder.stat()
            except OSError:
                ids[folder] = None
                continue
            ids[folder] = (info.st_dev, info.st_ino)
        return ids

    def _follow_replaced_folders(self) -> None:
        """A watched folder that was deleted is reported once; once a folder of that name
        exists again, watching restarts on it and the model files in it are loaded."""
        if self._observer is None or self._stopped:
            return
        current = self._current_folder_ids()
        if current == self._folder_ids:
            return
        for folder, ident in current.items():
            if ident is None and self._folder_ids.get(folder) is not None:
                log.warning(
                    "model_folder_missing",
                    folder=str(folder),
                    action="serving the loaded models; watching for the folder to return",
                )
        if any(ident is None for ident in current.values()):
            self._folder_ids = current
            return
        log.warning("model_folder_replaced", folders=[str(f) for f in current])
        old = self._observer
        old.stop()
        old.join(timeout=1.0)
        try:
            self._start_observer()
        except Exception:
            log.exception("model_watch_restart_failed")
            return
        for path in self._paths:
            if path.exists():  # loaded now; one that is unchanged is a no-op
                self.notify(str(path), complete=True, renamed=True)

    # -- the reload thread ---------------------------------------------------------------

    def _run(self) -> None:
        while True:
            name = self._next_due()
            if name is None:
                return
            try:
                done = self._on_ready(name)
            except Exception:  # a failing reload must not end reloading
                log.exception("model_reload_failed", model=name)
                continue
            if done is False:  # that model is loading already (an update's trial): later
                with self._cond:
                    self._pending.setdefault(
                        name, _Pending(due=time.monotonic() + BUSY_RETRY_S, settle=False)
                    )

    def _next_due(self) -> str | None:
        """Block until a model is due for loading (None: stopped)."""
        with self._cond:
            while not self._stopped:
                now = time.monotonic()
                due = [(p.due, n) for n, p in self._pending.items() if p.due <= now]
                for _, name in sorted(due):
                    pending = self._pending[name]
                    if pending.settle and not self._settled(name, pending, now):
                        continue
                    del self._pending[name]
                    return name
                upcoming = [p.due for p in self._pending.values()]
                timeout = min(upcoming) - now if upcoming else 1.0
                self._cond.wait(timeout=max(0.01, min(timeout, 1.0)))
                self._ensure_observer_alive()
            return None

    def _settled(self, name: str, pending: _Pending, now: float) -> bool:
        """Whether the file stopped changing since the last look; if not, look again later."""
        stat = _stat(self._files[name])
        if stat is not None and stat == pending.stat:
            return True
        pending.stat = stat
        pending.due = now + self._config.settle_ms / 1000
        return False


def _stat(path: Path) -> tuple[int, int] | None:
    try:
        info = path.stat()
    except OSError:
        return None
    return info.st_size, info.st_mtime_ns


class _Handler(FileSystemEventHandler):
    """watchdog callbacks; they run on watchdog's observer thread and must never raise."""

    def __init__(self, watcher: ModelFileWatcher) -> None:
        self._watcher = watcher

    def dispatch(self, event: FileSystemEvent) -> None:
        try:
            if isinstance(event, FileMovedEvent):
                self._watcher.notify(_text(event.dest_path), complete=True, renamed=True)
            elif isinstance(event, FileClosedEvent):
                self._watcher.notify(_text(event.src_path), complete=True)
            elif isinstance(event, FileCreatedEvent | FileModifiedEvent):
                self._watcher.notify(_text(event.src_path), complete=False)
        except Exception:
            log.exception("model_watch_event_failed", event=repr(event))


class _Unconfigured:
    """Model files no model names, each announced once (from ``start`` and watchdog's
    thread: the lock keeps the set whole)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._announced: set[Path] = set()

    def announce(self, path: Path) -> None:
        """Log ``path`` with the key that loads it, the first time it is seen."""
        with self._lock:
            if path.suffix != ".onnx" or path in self._announced:
                return
            self._announced.add(path)
        announce_unconfigured(path)


def unconfigured_model_files(models_dir: Path, configured: Iterable[Path]) -> list[Path]:
    """The ``.onnx`` files directly in ``models_dir`` that no model's ``file`` names, by
    name only (nothing is opened, no link followed); [] when the folder cannot be read."""
    known = {Path(path).absolute() for path in configured}
    try:
        entries = sorted(os.scandir(models_dir), key=lambda entry: entry.name)
    except OSError:
        return []
    return [
        Path(entry.path).absolute()
        for entry in entries
        if entry.name.endswith(".onnx")
        and not is_temp_file(entry.name)
        and Path(entry.path).absolute() not in known
    ]


def announce_unconfigured(path: Path) -> None:
    """One info line for a model file no model names, with the config key that loads it."""
    name = re.sub(r"[^A-Za-z0-9._-]", "_", path.stem)[:64] or "model"
    log.info(
        "model_file_not_configured",
        file=str(path),
        hint=f"no model names this file; models.{name}.file: {path.name} in the config loads it",
    )


def _text(path: str | bytes) -> str:
    return path.decode() if isinstance(path, bytes) else path
