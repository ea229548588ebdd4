"""scripts/install.sh into a staging root: venv, config, unit; idempotent; uninstall."""

from __future__ import annotations

import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "install.sh"


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True,
                          timeout=300, check=False)


def test_install_is_idempotent_and_uninstalls(tmp_path: Path) -> None:
    """Installs the package, the example config and the unit; a second run keeps an edited
    config; --uninstall removes the venv and unit but keeps config and state. Every run
    exits 0 (a staging root never touches systemd, and a config that check-config faults
    is reported, not an install failure)."""
    root = tmp_path / "root"
    # --no-deps keeps the test fast: what is checked here is the script, not pip.
    first = run("--root", str(root), "--pip-args", "--no-deps")
    assert first.returncode == 0, first.stdout + first.stderr
    assert (root / "opt/edge-agent/bin/python").exists()
    assert (root / "etc/systemd/system/edge-agent.service").read_text() == (
        REPO / "systemd/edge-agent.service").read_text()
    config = root / "etc/edge-agent/agent.yaml"
    assert config.read_text() == (REPO / "config/agent.example.yaml").read_text()
    assert (root / "var/lib/edge-agent/models").is_dir()
    config.write_text(config.read_text() + "# edited by the operator\n")
    second = run("--root", str(root), "--pip-args", "--no-deps")
    assert second.returncode == 0, second.stdout + second.stderr
    assert "kept the existing" in second.stdout
    assert config.read_text().endswith("# edited by the operator\n")
    removed = run("--root", str(root), "--uninstall")
    assert removed.returncode == 0, removed.stderr
    assert not (root / "opt/edge-agent").exists()
    assert not (root / "etc/systemd/system/edge-agent.service").exists()
    assert config.exists()
    purged = run("--root", str(root), "--uninstall", "--purge")
    assert purged.returncode == 0, purged.stderr
    assert not config.exists()


def test_bad_option_is_a_usage_error() -> None:
    """Unknown options exit 2."""
    assert run("--frobnicate").returncode == 2
