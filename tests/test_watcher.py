"""The model file watcher: complete files only, debounced, temp files ignored, never dies."""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Iterator, MutableMapping
from pathlib import Path
from typing import Any

import pytest
import structlog.testing

from agent.config.schema import WatchConfig
from agent.inference.watcher import ModelFileWatcher, filesystem_type, is_temp_file


class Calls:
    """Records on_ready calls (made on the watcher's reload thread)."""

    def __init__(self, fail_first: bool = False) -> None:
        self.names: list[tuple[str, float]] = []
        self.fail_first = fail_first
        self.event = threading.Event()

    def __call__(self, name: str) -> None:
        self.names.append((name, time.monotonic()))
        self.event.set()
        if self.fail_first and len(self.names) == 1:
            raise RuntimeError("boom")

    def wait(self, count: int, timeout_s: float = 10.0) -> None:
        deadline = time.monotonic() + timeout_s
        while len(self.names) < count and time.monotonic() < deadline:
            time.sleep(0.02)
        assert len(self.names) >= count, self.names


@contextlib.contextmanager
def running_watcher(tmp_path: Path, calls: Calls, **config: object) -> Iterator[ModelFileWatcher]:
    """A started watcher of ``tmp_path/m.onnx`` reporting to ``calls``; stopped on exit."""
    settings = WatchConfig.model_validate({"debounce_ms": 50, "settle_ms": 300, **config})
    watcher = ModelFileWatcher({"m": tmp_path / "m.onnx"}, calls, settings)
    watcher.start()
    try:
        yield watcher
    finally:
        watcher.stop()


def test_temp_names() -> None:
    """Hidden files and .tmp/.part/.swp/~ names are temporary."""
    assert is_temp_file("/x/.m.onnx.Xy12")
    assert is_temp_file("/x/m.onnx.tmp")
    assert is_temp_file("/x/m.onnx.part")
    assert is_temp_file("/x/m.onnx~")
    assert not is_temp_file("/x/m.onnx")


def test_rename_into_place_triggers_one_reload(tmp_path: Path) -> None:
    """Writing a temp file and renaming it over the model gives exactly one reload."""
    calls = Calls()
    with running_watcher(tmp_path, calls) as watcher:
        assert watcher.mode == "inotify"
        temp = tmp_path / "m.onnx.tmp"
        temp.write_bytes(b"x" * 1000)
        os.replace(temp, tmp_path / "m.onnx")
        calls.wait(1)
        time.sleep(0.5)
        assert [name for name, _ in calls.names] == ["m"]


def test_slow_write_reloads_once_after_close(tmp_path: Path) -> None:
    """A file written in pieces over ~1.5 s is loaded once, after it is closed.

    The pieces come 0.15 s apart against a settle time of 3 s (20 times the gap), so a
    loaded machine that delays a write by a second still leaves the file unsettled."""
    calls = Calls()
    with running_watcher(tmp_path, calls, settle_ms=3000):
        with (tmp_path / "m.onnx").open("wb") as handle:
            for _ in range(10):
                handle.write(b"y" * 100)
                handle.flush()
                time.sleep(0.15)
            closed = time.monotonic()
        calls.wait(1)
        time.sleep(1.0)  # 20 times the debounce: a second load would have come by now
        assert len(calls.names) == 1
        assert calls.names[0][1] >= closed


def test_other_files_and_temp_files_are_ignored(tmp_path: Path) -> None:
    """Only the watched model paths count: other files and temporary names give no load,
    while the watched file, written afterwards, gives exactly one."""
    calls = Calls()
    with running_watcher(tmp_path, calls):
        (tmp_path / "other.onnx").write_bytes(b"1")
        (tmp_path / ".m.onnx.swp").write_bytes(b"1")
        (tmp_path / "m.onnx.part").write_bytes(b"1")
        time.sleep(1.0)  # 20 times the debounce, 3 times the settle time
        assert calls.names == []
        # The positive control: this watcher does see the file it watches.
        (tmp_path / "m.onnx").write_bytes(b"1")
        calls.wait(1)
        time.sleep(1.0)
        assert [name for name, _ in calls.names] == ["m"]


def test_polling_mode_sees_changes_after_they_settle(tmp_path: Path) -> None:
    """With polling (network filesystems) a change is loaded once size and mtime settle."""
    calls = Calls()
    with running_watcher(tmp_path, calls, mode="polling", poll_interval_s=0.2) as watcher:
        assert watcher.mode == "polling"
        time.sleep(0.3)
        (tmp_path / "m.onnx").write_bytes(b"z" * 100)
        calls.wait(1)
        assert [name for name, _ in calls.names] == ["m"]


def test_a_failing_reload_does_not_stop_watching(tmp_path: Path) -> None:
    """An exception from the reload callback is logged; the next change still reloads."""
    calls = Calls(fail_first=True)
    with running_watcher(tmp_path, calls):
        (tmp_path / "m.onnx").write_bytes(b"a")
        calls.wait(1)
        time.sleep(0.2)
        (tmp_path / "m.onnx").write_bytes(b"b")
        calls.wait(2)


def test_a_dead_observer_is_restarted(tmp_path: Path) -> None:
    """If watchdog's observer thread dies, the watcher starts a new one."""
    calls = Calls()
    with running_watcher(tmp_path, calls) as watcher:
        assert watcher._observer is not None
        watcher._observer.stop()
        watcher._observer.join()
        deadline = time.monotonic() + 5
        while not watcher._observer.is_alive() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert watcher._observer.is_alive()
        (tmp_path / "m.onnx").write_bytes(b"again")
        calls.wait(1)


@pytest.mark.parametrize(
    ("mounts", "expected"),
    [
        ("/dev/vda / ext4 rw 0 0\nserver:/models /mnt/models nfs4 rw 0 0\n", "nfs4"),
        ("/dev/vda / ext4 rw 0 0\n", "ext4"),
    ],
)
def test_filesystem_type_from_mounts(tmp_path: Path, mounts: str, expected: str) -> None:
    """The mount with the longest prefix decides the filesystem type."""
    mounts_file = tmp_path / "mounts"
    mounts_file.write_text(mounts)
    assert filesystem_type(Path("/mnt/models/sub"), mounts_file) == expected


def test_a_model_file_no_model_names_is_announced_once(tmp_path: Path) -> None:
    """A .onnx file in models_dir that no model names gets one info line naming it and the
    config key that would load it: at start for those already there, on arrival for new
    ones, once each; temporary names and the watched file get none."""
    (tmp_path / "m.onnx").write_bytes(b"1")
    (tmp_path / "old model.onnx").write_bytes(b"1")
    (tmp_path / "m.onnx.prev").write_bytes(b"1")
    settings = WatchConfig.model_validate({"debounce_ms": 50})
    with structlog.testing.capture_logs() as logs:
        watcher = ModelFileWatcher({"m": tmp_path / "m.onnx"}, Calls(), settings, tmp_path)
        watcher.start()
        try:
            (tmp_path / "new.onnx").write_bytes(b"1")
            (tmp_path / "new.onnx.part").write_bytes(b"1")
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and len(announced(logs)) < 2:
                time.sleep(0.05)
            (tmp_path / "new.onnx").write_bytes(b"2")
            time.sleep(0.5)
        finally:
            watcher.stop()
    assert announced(logs) == [
        (
            str(tmp_path / "old model.onnx"),
            "no model names this file; models.old_model.file: old model.onnx in the config "
            "loads it",
        ),
        (
            str(tmp_path / "new.onnx"),
            "no model names this file; models.new.file: new.onnx in the config loads it",
        ),
    ]


def announced(logs: list[MutableMapping[str, Any]]) -> list[tuple[str, str]]:
    return [(e["file"], e["hint"]) for e in logs if e["event"] == "model_file_not_configured"]
