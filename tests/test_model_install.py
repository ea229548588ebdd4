"""Atomic install, rollback and the persisted update state (pure file logic)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from agent.errors import UpdateFailedError, UpdateRejectedError
from agent.updates.install import (
    clean_staging,
    install,
    previous_path,
    restore_previous,
    staging_dir,
    verify_staged,
)
from agent.updates.store import JournalEntry, UpdateStore


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def stage(target: Path, data: bytes) -> Path:
    folder = staging_dir(target)
    folder.mkdir(parents=True, exist_ok=True)
    staged = folder / "u1.part"
    staged.write_bytes(data)
    return staged


def test_install_keeps_prev_and_restore_is_idempotent(tmp_path: Path) -> None:
    """install keeps the old file as .prev; restoring twice gives the old bytes both times."""
    target = tmp_path / "m.onnx"
    target.write_bytes(b"old")
    install(stage(target, b"new"), target)
    assert target.read_bytes() == b"new"
    assert previous_path(target).read_bytes() == b"old"
    assert restore_previous(target, sha(b"old")) == "restored the previous file"
    assert restore_previous(target, sha(b"old")) == "the previous file is in place"
    assert target.read_bytes() == b"old"
    assert previous_path(target).read_bytes() == b"old"


def test_restore_without_a_previous_file_removes_the_new_one(tmp_path: Path) -> None:
    """First install on a device without the model: rolling back removes it again."""
    target = tmp_path / "m.onnx"
    install(stage(target, b"new"), target)
    assert "removed the new file" in restore_previous(target, None)
    assert not target.exists()


def test_restore_refuses_a_changed_prev(tmp_path: Path) -> None:
    """A .prev that is not the recorded previous file is not put in place."""
    target = tmp_path / "m.onnx"
    target.write_bytes(b"old")
    install(stage(target, b"new"), target)
    previous_path(target).write_bytes(b"someone else's")
    with pytest.raises(UpdateFailedError, match="missing or changed"):
        restore_previous(target, sha(b"old"))


def test_verify_staged_checks_length_then_digest(tmp_path: Path) -> None:
    """Wrong size and wrong sha256 are told apart."""
    staged = stage(tmp_path / "m.onnx", b"abc")
    with pytest.raises(UpdateFailedError, match="received 3 bytes, the manifest signs 4"):
        verify_staged(staged, 4, sha(b"abc"))
    with pytest.raises(UpdateFailedError, match="altered or corrupted"):
        verify_staged(staged, 3, sha(b"abd"))
    verify_staged(staged, 3, sha(b"abc"))
    assert clean_staging(staged.parent, keep=set()) == ["u1.part"]


def test_store_survives_a_restart_and_fails_closed_when_corrupt(tmp_path: Path) -> None:
    """The version floor, signed digests and journal are read back; a corrupt file refuses
    updates instead of forgetting the floor."""
    store = UpdateStore(tmp_path)
    store.begin(
        JournalEntry(
            update_id="u1",
            model="m",
            version=4,
            sha256="s",
            step="downloading",
            target="t",
            staged="p",
        )
    )
    store.accept("u1", "m", 4, "s", previous_sha256="old")
    again = UpdateStore(tmp_path)
    assert again.highest_version("m") == 4
    assert again.may_load("m", "s")
    assert [(e.step, e.previous_sha256) for e in again.journal()] == [("installing", "old")]
    again.finish("u1")
    assert UpdateStore(tmp_path).journal() == []
    (tmp_path / "state.json").write_text("{broken")
    broken = UpdateStore(tmp_path)
    with pytest.raises(UpdateRejectedError, match="corrupt"):
        broken.highest_version("m")
