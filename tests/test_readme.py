"""The examples of the README and of every docs page (``docs/**/*.md``) work as written: every
YAML block parses, every config snippet has only real keys and values, and every whole config
passes ``edge-agent check-config``."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from agent.config.loader import load_config
from agent.config.schema import AgentConfig
from agent.config.yaml_source import parse_yaml
from agent.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent
DOCUMENTS = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]
FENCE = re.compile(
    r"^(?P<indent> *)```(?P<lang>[A-Za-z0-9_-]*)\n(?P<body>.*?)^(?P=indent)```",
    re.MULTILINE | re.DOTALL,
)
CONFIG_KEYS = set(AgentConfig.model_fields)


def yaml_blocks() -> list[tuple[str, str]]:
    """(where, text) of every ```yaml block, its list indentation removed."""
    blocks = []
    for document in DOCUMENTS:
        text = document.read_text(encoding="utf-8")
        for match in FENCE.finditer(text):
            if match.group("lang") not in ("yaml", "yml"):
                continue
            line = text[: match.start()].count("\n") + 1
            indent = len(match.group("indent"))
            body = "\n".join(row[indent:] for row in match.group("body").splitlines())
            blocks.append((f"{document.relative_to(REPO)}:{line}", body + "\n"))
    return blocks


BLOCKS = yaml_blocks()


def test_the_readme_has_yaml_examples() -> None:
    """The extraction finds the blocks (a broken pattern would make every test vacuous)."""
    assert len(BLOCKS) >= 5, [where for where, _ in BLOCKS]


@pytest.mark.parametrize(("where", "text"), BLOCKS, ids=[where for where, _ in BLOCKS])
def test_yaml_block_is_valid(where: str, text: str, tmp_path: Path) -> None:
    """Each block parses without duplicate keys. A block whose keys are config keys is a
    config snippet: its keys and values must validate, leaving only files that live on a
    device (key files, CA bundles) to be missing here. A block with ``pipelines`` is a whole
    config and must pass ``check-config`` as it stands."""
    document = parse_yaml(text)
    assert not document.duplicates, f"{where}: duplicate keys {document.duplicates}"
    data = document.data
    if not isinstance(data, dict) or not set(data) & CONFIG_KEYS:
        return  # not an edge-agent config (a scrape config, a compose file, ...)
    unknown = set(data) - CONFIG_KEYS
    assert not unknown, f"{where}: not config keys: {sorted(unknown)}"
    path = tmp_path / "agent.yaml"
    path.write_text(text)
    if "pipelines" in data:
        done = subprocess.run(
            [sys.executable, "-m", "agent", "check-config", str(path)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert done.returncode == 0, f"{where}:\n{done.stdout}{done.stderr}"
        return
    try:
        load_config(path)
    except ConfigError as exc:
        real = [
            str(p)
            for p in exc.problems
            if not any(
                missing in p.message for missing in ("No such file or directory", "file not found")
            )
        ]
        assert not real, f"{where}: {real}"
