"""MQTT topic rules: valid filters and names, result-topic placeholders, matching, rendering.

Pure functions: no broker.
"""

from __future__ import annotations

import re

import pytest

from agent import topics


@pytest.mark.parametrize("value", ["sensors/+/temp", "sensors/#", "#", "+", "a/+/+/#", "a//b"])
def test_check_filter_accepts_valid_filters(value: str) -> None:
    """A valid filter comes back unchanged."""
    assert topics.check_filter(value) == value


@pytest.mark.parametrize(
    ("value", "says"),
    [
        ("", "must not be empty"),
        ("a/#/b", "'#' must be a whole level and the last one in 'a/#/b'"),
        ("a/b#", "'#' must be a whole level and the last one in 'a/b#'"),
        ("#/a", "'#' must be a whole level and the last one"),
        ("a/b+", "'+' must be a whole level in 'a/b+'"),
        ("a/+b/c", "'+' must be a whole level"),
    ],
)
def test_check_filter_says_what_is_wrong(value: str, says: str) -> None:
    """An invalid filter is a ValueError naming the rule it breaks."""
    with pytest.raises(ValueError, match=re.escape(says)):
        topics.check_filter(value)


@pytest.mark.parametrize("value", ["results/a", "a//b", "/leading"])
def test_check_name_accepts_names(value: str) -> None:
    """A topic without wildcards can be published to."""
    assert topics.check_name(value) == value


@pytest.mark.parametrize(
    ("value", "says"),
    [
        ("", "topic must not be empty"),
        ("results/+", "wildcards '+' and '#' are not allowed in a topic to publish to"),
        ("results/#", "'results/#'"),
    ],
)
def test_check_name_refuses_wildcards(value: str, says: str) -> None:
    """Publishing needs a concrete topic: empty and wildcard topics are refused."""
    with pytest.raises(ValueError, match=re.escape(says)):
        topics.check_name(value)


def test_count_wildcards() -> None:
    """Each ``+`` and the ``#`` level count; text levels do not."""
    assert topics.count_wildcards("a/b") == 0
    assert topics.count_wildcards("a/+/c/+/#") == 3


def test_placeholder_problems_none_for_known_placeholders() -> None:
    """Numbered wildcards within range and the named placeholders are fine."""
    template = "r/{1}/{2}/{device_id}/{pipeline}/{model}"
    assert topics.placeholder_problems(template, "s/+/+") == []


def test_placeholder_problems_unknown_names() -> None:
    """A misspelt or zero placeholder is reported, not kept."""
    problems = topics.placeholder_problems("r/{devce_id}/{0}", "s/+")
    assert len(problems) == 2
    assert problems[0].startswith("unknown placeholder {devce_id}: use {1}..{n}")
    assert problems[1].startswith("unknown placeholder {0}:")


def test_placeholder_problems_wildcard_out_of_range() -> None:
    """``{n}`` needs an n-th wildcard in the input filter."""
    problems = topics.placeholder_problems("r/{2}", "s/+")
    assert problems == ["{2} refers to wildcard 2 but input topic 's/+' has 1"]


def test_placeholder_problems_without_an_input_topic_checks_names_only() -> None:
    """When the input topic is not a string (itself invalid), only names are checked."""
    assert topics.placeholder_problems("r/{9}", None) == []
    assert len(topics.placeholder_problems("r/{x}", None)) == 1


@pytest.mark.parametrize(
    ("topic_filter", "topic", "expected"),
    [
        ("s/+/t", "s/a/t", True),
        ("s/+", "s/a/b", False),  # '+' is one level, never more
        ("s/+/t", "s/a/b/t", False),
        ("s/+", "s/", True),  # an empty level is still a level
        ("s/#", "s", True),  # '#' also matches the parent level
        ("s/#", "s/a/b/c", True),
        ("s/#", "other", False),
        ("#", "anything/at/all", True),
        ("s/t", "s/t", True),
        ("s/t", "s/u", False),
    ],
)
def test_matches(topic_filter: str, topic: str, expected: bool) -> None:
    """MQTT matching rules."""
    assert topics.matches(topic_filter, topic) is expected


@pytest.mark.parametrize(
    ("topic_filter", "topic", "expected"),
    [
        ("s/+/t", "s/a/t", ["a"]),
        ("s/+/+", "s/a/b", ["a", "b"]),
        ("s/+/#", "s/a/b/c", ["a", "b/c"]),
        ("s/#", "s", [""]),  # '#' on the parent level matches nothing
        ("s/t", "s/t", []),
        ("s/+", "s/", [""]),
    ],
)
def test_wildcard_values(topic_filter: str, topic: str, expected: list[str]) -> None:
    """One value per wildcard, in order; ``#`` takes the rest of the topic."""
    assert topics.wildcard_values(topic_filter, topic) == expected


def test_unfilled_names_the_wildcards_a_topic_leaves_empty() -> None:
    """A result topic needs a non-empty level for each ``{n}``: missing or empty ones are
    named in order; named placeholders are not wildcards."""
    assert topics.unfilled("out/{1}/{2}/{pipeline}", ["a", "b"]) == []
    assert topics.unfilled("out/{1}/{3}/{2}", ["a", ""]) == ["3", "2"]
    assert topics.unfilled("out/{model}", []) == []


def test_render_fills_reading_placeholders() -> None:
    """``{n}``, ``{pipeline}`` and ``{model}`` are filled per reading."""
    rendered = topics.render("r/{1}/{pipeline}/{model}/{2}", ["a", "b/c"], pipeline="p", model="m")
    assert rendered == "r/a/p/m/b/c"


def test_render_missing_wildcard_is_empty() -> None:
    """A wildcard the topic did not provide renders empty (the pipeline rejects it first)."""
    assert topics.render("r/{2}", ["a"], pipeline="p", model="m") == "r/"


def test_render_leaves_device_id_alone() -> None:
    """``{device_id}`` was filled when the config was loaded, so a literal one stays."""
    assert topics.render("{device_id}/{1}", ["a"], pipeline="p", model="m") == "{device_id}/a"
