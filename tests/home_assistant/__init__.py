"""Home Assistant's own code in a virtual environment of its own, to check what edge-agent
publishes for it (``check_discovery.py`` runs there)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

HERE = Path(__file__).resolve().parent
VENV = HERE.parent.parent / ".venv-home-assistant"
REQUIREMENTS = HERE / "requirements.txt"
# CI sets this: there the check must run, not be skipped.
REQUIRED = os.environ.get("EDGE_AGENT_REQUIRE_HOME_ASSISTANT") == "1"


def find_python313() -> str | None:
    """A Python 3.13 to build Home Assistant's environment with (its releases need 3.13)."""
    candidates = [os.environ.get("HA_PYTHON", "")]
    pyenv_root = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv"))
    candidates += sorted(str(p) for p in pyenv_root.glob("versions/3.13*/bin/python3.13"))
    candidates += ["/usr/bin/python3.13", "python3.13"]
    for candidate in candidates:
        if not candidate:
            continue
        try:
            done = subprocess.run(
                [candidate, "-c", "import sys; print(sys.version_info[:2] == (3, 13))"],
                capture_output=True,
                text=True,
                check=False,
                timeout=30,
            )
        except (OSError, subprocess.TimeoutExpired):
            continue
        if done.stdout.strip() == "True":
            return candidate
    return None


def home_assistant_python() -> Path:
    """The Python of a virtual environment with Home Assistant (built with uv on first use,
    about 30 s, then reused while the requirements stay the same)."""
    python = VENV / "bin" / "python"
    stamp = VENV / ".requirements"
    wanted = REQUIREMENTS.read_text()
    if python.exists() and stamp.exists() and stamp.read_text() == wanted:
        return python
    base = find_python313()
    if base is None:
        message = "Home Assistant needs Python 3.13: set HA_PYTHON or install python3.13"
        if REQUIRED:
            pytest.fail(message)
        pytest.skip(message)
    uv = [sys.executable, "-m", "uv"]
    subprocess.run([*uv, "venv", "-q", "--clear", "-p", base, str(VENV)], check=True)
    subprocess.run(
        [*uv, "pip", "install", "-q", "--python", str(python), "-r", str(REQUIREMENTS)],
        check=True,
    )
    stamp.write_text(wanted)
    return python


def check_with_home_assistant(
    prefix: str, configs: dict[str, bytes], samples: dict[str, bytes]
) -> dict[str, Any]:
    """Home Assistant's verdict on discovery ``configs`` (topic -> payload), with each
    entity's templates rendered against ``samples`` (topic -> payload)."""
    request = {
        "prefix": prefix,
        "configs": {topic: payload.decode() for topic, payload in configs.items()},
        "samples": {topic: payload.decode() for topic, payload in samples.items()},
    }
    done = subprocess.run(
        [str(home_assistant_python()), str(HERE / "check_discovery.py")],
        input=json.dumps(request),
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    answer: dict[str, Any] = json.loads(done.stdout)
    return answer
