"""Install hints that install into the environment edge-agent runs from.

A bare ``pip install NAME`` may reach another Python's pip, and a hint naming this project's
distribution with an extra (``pip install 'NAME[extra]'``) installs whatever PyPI holds under
that name: the command is built from the running interpreter and names the packages
themselves.
"""

from __future__ import annotations

import shlex
import sys


def pip_install(*requirements: str) -> str:
    """The shell command that installs ``requirements`` into the running Python's env."""
    words = [sys.executable, "-m", "pip", "install", *requirements]
    return " ".join(shlex.quote(word) for word in words)


def pip_replace(old: str, new: str) -> str:
    """The shell command that replaces the package ``old`` by ``new`` in that env."""
    python = shlex.quote(sys.executable)
    return f"{python} -m pip uninstall -y {shlex.quote(old)} && {pip_install(new)}"
