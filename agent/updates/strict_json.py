"""JSON for bytes that may be hostile: duplicate keys, deep nesting and huge integers refused.

Python's ``json`` keeps the last of two equal keys, so a signed payload could say one thing
to a reviewer reading the first key and another to the device; it recurses once per level,
so a deeply nested document raises ``RecursionError`` instead of a parse error; and it turns
any run of digits into an integer, however long. Every check here raises ``ValueError`` with
a message that says what was wrong, so callers keep one ``except`` for every bad input.
"""

from __future__ import annotations

import json
import re
from typing import Any

MAX_DEPTH = 32  # the update documents nest 4 levels; room for extensions
MAX_INT_DIGITS = 19  # 2**63 - 1 has 19 digits: larger values are never meaningful here
INT64_MAX = 2**63 - 1
_STRINGS = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"')
_BRACKETS = re.compile(r"[\[\]{}]")


class DuplicateKeyError(ValueError):
    """An object has the same key twice."""


def loads(data: bytes | str) -> Any:
    """Parse ``data`` as JSON; ``ValueError`` for invalid JSON, a key that appears twice in
    one object, nesting deeper than ``MAX_DEPTH`` or an integer longer than 19 digits."""
    if isinstance(data, bytes | bytearray):
        try:
            text = bytes(data).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ValueError(f"not UTF-8 at byte {exc.start}") from exc
    else:
        text = data
    if _max_depth(text) > MAX_DEPTH:
        raise ValueError(f"nested deeper than {MAX_DEPTH} levels")
    try:
        document = json.loads(text, object_pairs_hook=_unique_keys, parse_int=_bounded_int)
    except RecursionError as exc:  # not reachable after the depth check; kept as a backstop
        raise ValueError("nested too deeply") from exc
    if "\\u" in text:  # only an escape can produce a lone surrogate (UTF-8 has none)
        try:
            json.dumps(document, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError as exc:
            raise ValueError(
                "a string holds a lone UTF-16 surrogate (\\ud800-\\udfff escape without its pair)"
            ) from exc
    return document


def _max_depth(text: str) -> int:
    """The deepest nesting of ``[`` and ``{`` outside strings, found without recursion (the
    regular expressions run in C, so a 2 MiB manifest costs milliseconds)."""
    depth = deepest = 0
    for bracket in _BRACKETS.findall(_STRINGS.sub("", text)):
        if bracket in "[{":
            depth += 1
            deepest = max(deepest, depth)
            if deepest > MAX_DEPTH:
                break  # enough to refuse it
        else:
            depth -= 1
    return deepest


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    document: dict[str, Any] = {}
    for key, value in pairs:
        if key in document:
            raise DuplicateKeyError(f"key {key[:64]!r} appears twice in one object")
        document[key] = value
    return document


def _bounded_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise ValueError(
            f"integer of {len(text.lstrip('-'))} digits is out of range (at most {INT64_MAX})"
        )
    value = int(text)
    if not -INT64_MAX - 1 <= value <= INT64_MAX:
        raise ValueError(f"integer {value} is out of range (at most {INT64_MAX})")
    return value
