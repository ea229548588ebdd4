"""Files and folders the agent creates are never written through a symlink."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from agent.durable import create_file, lock_folder, own_folder, write_atomically
from agent.errors import UnsafePathError
from agent.updates.install import clean_staging


def test_create_file_refuses_a_symlink_and_leaves_its_target_alone(tmp_path: Path) -> None:
    """A link planted where the agent writes (a .part file, a temp file) is refused."""
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    (tmp_path / "u1.part").symlink_to(victim)
    with pytest.raises(UnsafePathError, match="is a symbolic link"):
        create_file(tmp_path / "u1.part")
    (tmp_path / f".state.json.{os.getpid()}.tmp").symlink_to(victim)  # write_atomically's
    (tmp_path / "state.json").write_bytes(b"{}")
    with pytest.raises(UnsafePathError):
        write_atomically(tmp_path / "state.json", b"new")
    assert victim.read_bytes() == b"precious"
    assert (tmp_path / "state.json").read_bytes() == b"{}"


def test_create_file_replaces_a_regular_file(tmp_path: Path) -> None:
    """A leftover regular file of that name is replaced (mode 0600)."""
    (tmp_path / "u1.part").write_bytes(b"old")
    fd = create_file(tmp_path / "u1.part")
    os.write(fd, b"new")
    os.close(fd)
    assert (tmp_path / "u1.part").read_bytes() == b"new"
    assert (tmp_path / "u1.part").stat().st_mode & 0o777 == 0o600


def test_the_lock_file_is_not_truncated_through_a_link(tmp_path: Path) -> None:
    """state_dir/agent.lock as a link to another file: refused, the file keeps its bytes."""
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "agent.lock").symlink_to(victim)
    with pytest.raises(UnsafePathError, match="symbolic link"):
        lock_folder(tmp_path / "state")
    assert victim.read_bytes() == b"precious"


def test_own_folders_and_staging_cleanup_refuse_links(tmp_path: Path) -> None:
    """A link where the agent's own folder should be is refused, by creation and by cleanup,
    and nothing in the folder it names is deleted."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "keep.json").write_bytes(b"{}")
    staging = tmp_path / "models" / ".edge-agent-staging"
    staging.parent.mkdir()
    staging.symlink_to(elsewhere)
    with pytest.raises(UnsafePathError, match="is a symbolic link"):
        own_folder(staging)
    with pytest.raises(UnsafePathError):
        clean_staging(staging, keep=set())
    assert (elsewhere / "keep.json").exists()
    staging.unlink()
    assert own_folder(staging).is_dir()
    (staging / "planted").symlink_to(elsewhere / "keep.json")
    assert clean_staging(staging, keep=set()) == ["planted"]
    assert (elsewhere / "keep.json").exists()
