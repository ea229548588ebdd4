"""The getting-started page works as written: its quickstart's shell blocks run verbatim, in
order, in one bash session in a temporary folder, on the broker `make demo` would choose (no
sudo, no mosquitto-clients), with its Python and YAML blocks saved where the page says; and
the README's quickstart is made of the same blocks."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PAGE = REPO / "docs" / "getting-started" / "laptop.md"
FENCE = re.compile(
    r"^(?P<indent> *)```(?P<lang>[a-z]*)\n(?P<body>.*?)^(?P=indent)```", re.MULTILINE | re.DOTALL
)
RUN_LANGUAGES = ("sh", "python", "yaml")


def blocks(text: str) -> list[tuple[str, str]]:
    """(language, body without its indentation) of every sh, python and yaml block."""
    found = []
    for match in FENCE.finditer(text):
        if match.group("lang") not in RUN_LANGUAGES:
            continue
        indent = len(match.group("indent"))
        body = "\n".join(row[indent:] for row in match.group("body").splitlines()) + "\n"
        found.append((match.group("lang"), body))
    return found


def quickstart(text: str) -> str:
    """The quickstart section of a page."""
    start = text.index("## Quickstart: your own model")
    end = text.find("\n## ", start + 1)
    return text[start : end if end >= 0 else len(text)]


def saved_as(body: str) -> str | None:
    """Where a Python or YAML block says it is saved: its first line, ``# quickstart/...``."""
    first = body.splitlines()[0]
    found = re.match(r"# (quickstart/[\w./-]+)", first)
    return found.group(1) if found else None


@pytest.mark.broker
def test_the_quickstart_runs_as_written(tmp_path: Path) -> None:
    """Every shell block of the quickstart, verbatim: a model trained and checked, the
    config checked, the broker and the daemon started in the background, two readings
    answered (one an anomaly), a bad one answered on the errors topic with its id, the model
    replaced, and both stopped with exit 0, leaving nothing running."""
    checkout = tmp_path / "checkout"
    checkout.mkdir()
    # The page runs from a checkout: its venv (the one running these tests) and scripts/.
    (checkout / ".venv").symlink_to(Path(sys.prefix))
    (checkout / "scripts").symlink_to(REPO / "scripts")
    script = ["set -e"]
    for lang, body in blocks(quickstart(PAGE.read_text())):
        if lang == "sh":
            script.append(body)
            continue
        path = saved_as(body)
        assert path is not None, f"a {lang} block that says nowhere where it is saved:\n{body}"
        (checkout / path).parent.mkdir(parents=True, exist_ok=True)
        (checkout / path).write_text(body)
    done = subprocess.run(
        ["bash", "-c", "\n".join(script)],
        cwd=checkout,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    assert re.search(r"^broker: ", output, re.M), output
    assert "inputs      X  float32  [?, 8]" in output
    assert "quickstart/quickstart.yaml: ok (device_id laptop, 1 model, 1 pipeline)" in output
    assert 'machines/press-1/anomaly {"id":1,' in output
    assert re.search(r'machines/press-1/anomaly \{"id":2,.*"label":\[-1\]', output), output
    assert re.search(r'edge/laptop/errors \{.*"id":3,.*expects shape \[8\]', output), output
    log = (checkout / "quickstart" / "agent.log").read_text()
    assert "agent_stopped" in log
    assert "Traceback" not in log
    leftover = subprocess.run(
        ["pgrep", "-f", str(checkout)], capture_output=True, text=True, check=False
    )
    assert leftover.stdout == "", leftover.stdout


def test_the_readme_quickstart_is_the_pages() -> None:
    """The README's five-minute quickstart uses exactly blocks the page runs (and tests)."""
    page = blocks(quickstart(PAGE.read_text()))
    readme = blocks(quickstart((REPO / "README.md").read_text()))
    assert readme
    missing = [body for block in readme if block not in page for _, body in [block]]
    assert missing == []


def test_the_walk_through_model_is_made_as_written(tmp_path: Path) -> None:
    """The models page's one-liner that builds the walk-through's CNN, run verbatim from a
    checkout, writes the model the page's figures are of (224,503 bytes)."""
    text = (REPO / "docs" / "models.md").read_text()
    command = next(body for lang, body in blocks(text) if "build_cnn1d" in body)
    (tmp_path / ".venv").symlink_to(Path(sys.prefix))
    (tmp_path / "tests").symlink_to(REPO / "tests")
    done = subprocess.run(
        ["bash", "-c", command], cwd=tmp_path, capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "vib_cnn.onnx").stat().st_size == 224_503
