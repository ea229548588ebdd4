"""strict_json: the parser for bytes that may be hostile."""

from __future__ import annotations

import pytest

from agent.updates import strict_json


def test_ordinary_documents_parse_as_json_would() -> None:
    """Strings holding brackets, escaped quotes and surrogate pairs are ordinary JSON."""
    text = b'{"a": [1, {"b": "x[[[\\"{\\\\"}], "e": "\\ud83d\\ude00", "n": -9223372036854775808}'
    assert strict_json.loads(text) == {
        "a": [1, {"b": 'x[[["{\\'}],
        "e": "\U0001f600",
        "n": -(2**63),
    }


@pytest.mark.parametrize(
    ("data", "words"),
    [
        (b'{"a": 1, "a": 2}', "key 'a' appears twice in one object"),
        (b'{"x": {"b": 1, "c": [{"b": 2, "b": 3}]}}', "key 'b' appears twice"),
        (b"[" * 33 + b"]" * 33, "nested deeper than 32 levels"),
        (b"[" * 1_000_000, "nested deeper than 32 levels"),
        (b'{"v": 1180591620717411303424}', "integer of 22 digits is out of range"),
        (b'{"v": 9223372036854775808}', "integer 9223372036854775808 is out of range"),
        (b'["\\ud800"]', "lone UTF-16 surrogate"),
        (b'{"k\\udc00": 1}', "lone UTF-16 surrogate"),
        (b"\xff{}", "not UTF-8 at byte 0"),
        (b"{not json", "Expecting property name"),
    ],
)
def test_hostile_documents_are_refused_with_the_reason(data: bytes, words: str) -> None:
    """Each refusal is a ValueError that says what was wrong."""
    with pytest.raises(ValueError, match=words.replace("[", r"\[")):
        strict_json.loads(data)


def test_thirty_two_levels_are_accepted() -> None:
    """The limit is inclusive."""
    assert strict_json.loads(b"[" * 32 + b"]" * 32) is not None
