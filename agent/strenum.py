"""``enum.StrEnum`` on every supported Python: 3.10 lacks it.

States and modes that travel in JSON and logs are enums of this kind, so mypy catches a
misspelt state while the wire keeps the plain string.
"""

from __future__ import annotations

import enum
import sys

if sys.version_info >= (3, 11):
    StrEnum = enum.StrEnum
else:

    class StrEnum(str, enum.Enum):
        """A str whose str() and format() are its value, as in Python 3.11."""

        def __str__(self) -> str:
            return str.__str__(self)

        def __format__(self, format_spec: str) -> str:
            return str.__format__(self, format_spec)
