"""scripts/install.sh into a staging root: venv, config, unit; idempotent; uninstall."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "install.sh"
EDGE_AGENT = Path(sys.executable).parent / "edge-agent"


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=300, check=False
    )


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
        REPO / "systemd/edge-agent.service"
    ).read_text()
    config = root / "etc/edge-agent/agent.yaml"
    assert config.read_text() == (REPO / "config/agent.example.yaml").read_text()
    assert (root / "var/lib/edge-agent/models").is_dir()
    config.write_text(config.read_text() + "# edited by the operator\n")
    second = run("--root", str(root), "--pip-args", "--no-deps")
    assert second.returncode == 0, second.stdout + second.stderr
    assert "kept the existing" in second.stdout
    # a --no-deps venv cannot run check-config, and says so instead of faulting the config
    assert "config has problems" not in first.stdout + second.stdout
    assert "lacks dependencies" in second.stdout
    assert config.read_text().endswith("# edited by the operator\n")
    removed = run("--root", str(root), "--uninstall")
    assert removed.returncode == 0, removed.stderr
    assert not (root / "opt/edge-agent").exists()
    assert not (root / "etc/systemd/system/edge-agent.service").exists()
    assert config.exists()
    purged = run("--root", str(root), "--uninstall", "--purge")
    assert purged.returncode == 0, purged.stderr
    assert not config.exists()
    assert "user" not in purged.stdout  # a staging root never had one


def can_set_host_name() -> bool:
    """unshare --uts gives a process its own host name (needs root or user namespaces)."""
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(
        ["unshare", "--uts", "hostname", "probe-name"], capture_output=True, check=False
    )
    return probe.returncode == 0


@pytest.mark.skipif(not can_set_host_name(), reason="needs unshare --uts (root) to set a host name")
def test_two_host_names_give_two_device_ids(tmp_path: Path) -> None:
    """Two devices installed with the defaults do not share an id: the installed config
    names none, so each takes its host name, which the installer reports; the agent's own
    check-config (same code as the daemon's start) confirms it on each host."""
    ids = []
    for host in ("pi-kitchen", "pi-garage"):
        root = tmp_path / host
        script = (
            f"hostname {host} && bash {SCRIPT} --root {root} --pip-args --no-deps && "
            f"{EDGE_AGENT} check-config {root}/etc/edge-agent/agent.yaml"
        )
        done = subprocess.run(
            ["unshare", "--uts", "bash", "-c", script],
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        assert f"(here: {host})" in done.stdout
        found = re.search(r"ok \(device_id ([^,]+),", done.stdout)
        assert found is not None, done.stdout
        ids.append(found.group(1))
        assert not re.search(
            r"^device_id:", (root / "etc/edge-agent/agent.yaml").read_text(), re.MULTILINE
        )
    assert ids == ["pi-kitchen", "pi-garage"]


def test_help_is_the_usage_text() -> None:
    """--help prints the header comment as plain text, and none of the script's code."""
    done = run("--help")
    assert done.returncode == 0
    assert "--device-id ID" in done.stdout
    assert "--no-start" in done.stdout
    assert "set -euo" not in done.stdout
    assert not any(line.startswith("#") for line in done.stdout.splitlines())


def test_bad_option_is_a_usage_error() -> None:
    """Unknown options exit 2."""
    assert run("--frobnicate").returncode == 2


def make_wheel(folder: Path, name: str, version: str) -> Path:
    """A minimal installable wheel standing in for NVIDIA's onnxruntime-gpu (the real one is
    hundreds of MB and for aarch64 only)."""
    module = name.replace("-", "_")
    info = f"{module}-{version}.dist-info"
    files = {
        f"{module}_marker.py": "",
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
        f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
        "Tag: py3-none-any\n",
    }
    files[f"{info}/RECORD"] = "".join(f"{path},,\n" for path in files) + f"{info}/RECORD,,\n"
    wheel = folder / f"{module}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        for path, text in files.items():
            archive.writestr(path, text)
    return wheel


def test_device_id_and_ort_wheel_survive_an_upgrade(tmp_path: Path) -> None:
    """--device-id writes the id into a new config, and --ort-wheel (a Jetson's
    onnxruntime-gpu) replaces PyPI's onnxruntime; a later run without either, an upgrade,
    keeps the config as it is and puts the same wheel back instead of leaving PyPI's CPU
    onnxruntime in its place."""
    root = tmp_path / "root"
    wheel = make_wheel(tmp_path, "onnxruntime-gpu", "1.99.0")
    first = run(
        "--root",
        str(root),
        "--pip-args",
        "--no-deps",
        "--device-id",
        "press-7",
        "--ort-wheel",
        str(wheel),
    )
    assert first.returncode == 0, first.stdout + first.stderr
    config = root / "etc/edge-agent/agent.yaml"
    assert re.search(r"^device_id: press-7\b", config.read_text(), re.MULTILINE)
    assert "device id: press-7 (set in agent.yaml)" in first.stdout
    checked = subprocess.run(
        [str(EDGE_AGENT), "check-config", str(config)], capture_output=True, text=True, check=False
    )
    assert "device_id press-7," in checked.stdout, checked.stdout + checked.stderr
    assert run("--device-id", "no spaces allowed", "--root", str(root)).returncode == 2

    wheel.unlink()  # an upgrade months later: the file the operator once had is gone
    upgrade = run("--root", str(root), "--pip-args", "--no-deps")
    assert upgrade.returncode == 0, upgrade.stdout + upgrade.stderr
    assert "kept the existing" in upgrade.stdout
    assert "device id: press-7 (set in agent.yaml)" in upgrade.stdout
    assert "onnxruntime from onnxruntime_gpu-1.99.0-py3-none-any.whl" in upgrade.stdout
    shown = subprocess.run(
        [str(root / "opt/edge-agent/bin/python"), "-m", "pip", "show", "onnxruntime-gpu"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert "Version: 1.99.0" in shown.stdout, shown.stdout + shown.stderr
