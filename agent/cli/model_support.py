"""What the ``edge-agent model`` subcommands share on the command-line side: where the daemon
code's log goes, and the device's config read with its problems printed."""

from __future__ import annotations

import sys

from agent.config.schema import AgentConfig
from agent.errors import ConfigError
from agent.logs import configure_logging
from agent.modeltools.common import tool_config


def tool_logging() -> None:
    """The daemon code's log events go to stderr, errors only: stdout holds the report
    (JSON with ``--json``), and the report already says what its warnings say."""
    configure_logging("error", json_output=False, stream=sys.stderr)


def load_tool_config(path: str | None) -> AgentConfig | None:
    """The config the tools apply (``tool_config``), or None after printing its problems
    on stderr, one per line."""
    try:
        return tool_config(path)
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return None
