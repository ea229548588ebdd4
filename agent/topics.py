"""MQTT topic rules, in one place: what a valid filter and topic name are, which placeholders
a result topic may use, how a topic matches a filter and how a template is filled.

The bottom layer: the config validates templates with it, the transport routes messages with
it and the pipelines render their result topics with it.
"""

from __future__ import annotations

import re

import paho.mqtt.client as paho

# Any {...} in a template, so that a misspelt placeholder is reported instead of kept.
_ANY_PLACEHOLDER = re.compile(r"\{([^{}]*)\}")
# What a pipeline fills per reading; {device_id} was filled when the config was loaded.
_READING_PLACEHOLDER = re.compile(r"\{(\d+|pipeline|model)\}")
_WILDCARD_PLACEHOLDER = re.compile(r"\{(\d+)\}")
NAMED_PLACEHOLDERS = frozenset({"device_id", "pipeline", "model"})


def check_filter(value: str) -> str:
    """``value`` when it is a valid subscription filter, else ValueError saying why."""
    if not value:
        raise ValueError("topic must not be empty")
    levels = value.split("/")
    for index, level in enumerate(levels):
        if "#" in level and (level != "#" or index != len(levels) - 1):
            raise ValueError(f"'#' must be a whole level and the last one in {value!r}")
        if "+" in level and level != "+":
            raise ValueError(f"'+' must be a whole level in {value!r}")
    return value


def check_name(value: str) -> str:
    """``value`` when it is a topic one may publish to (no wildcards), else ValueError."""
    if not value:
        raise ValueError("topic must not be empty")
    if "+" in value or "#" in value:
        raise ValueError(
            f"wildcards '+' and '#' are not allowed in a topic to publish to: {value!r}"
        )
    return value


def count_wildcards(topic_filter: str) -> int:
    """How many ``+`` and ``#`` levels ``topic_filter`` has (what ``{1}``..``{n}`` may use)."""
    return sum(1 for level in topic_filter.split("/") if level in ("+", "#"))


def placeholder_problems(template: str, input_topic: object) -> list[str]:
    """What is wrong with the placeholders of ``template`` for a pipeline reading from
    ``input_topic`` (not a string: only the placeholder names are checked)."""
    wildcards = count_wildcards(input_topic) if isinstance(input_topic, str) else None
    problems = []
    for placeholder in _ANY_PLACEHOLDER.findall(template):
        if placeholder in NAMED_PLACEHOLDERS:
            continue
        if not placeholder.isdigit() or int(placeholder) < 1:
            problems.append(
                f"unknown placeholder {{{placeholder}}}: use {{1}}..{{n}}, "
                "{device_id}, {pipeline} or {model}"
            )
        elif wildcards is not None and int(placeholder) > wildcards:
            problems.append(
                f"{{{placeholder}}} refers to wildcard {placeholder} but input "
                f"topic {input_topic!r} has {wildcards}"
            )
    return problems


def matches(topic_filter: str, topic: str) -> bool:
    """Whether ``topic`` matches ``topic_filter``, by the MQTT rules (paho's own matcher)."""
    return bool(paho.topic_matches_sub(topic_filter, topic))


def wildcard_values(topic_filter: str, topic: str) -> list[str]:
    """The parts of ``topic`` matched by each ``+`` or ``#`` of ``topic_filter``, in order."""
    values = []
    levels = topic.split("/")
    for index, level in enumerate(topic_filter.split("/")):
        if level == "#":
            values.append("/".join(levels[index:]))
            break
        if level == "+" and index < len(levels):
            values.append(levels[index])
    return values


def unfilled(template: str, wildcards: list[str]) -> list[str]:
    """The ``{n}`` placeholders of ``template`` (their numbers, in order) that ``wildcards``
    leaves empty: no such wildcard, or an empty level matched."""
    missing = []
    for number in _WILDCARD_PLACEHOLDER.findall(template):
        index = int(number) - 1
        if index >= len(wildcards) or not wildcards[index]:
            missing.append(number)
    return missing


def render(template: str, wildcards: list[str], *, pipeline: str, model: str) -> str:
    """Fill ``{1}``..``{n}``, ``{pipeline}`` and ``{model}`` (``{device_id}`` is filled at load)."""

    def fill(found: re.Match[str]) -> str:
        key = found.group(1)
        if key == "pipeline":
            return pipeline
        if key == "model":
            return model
        index = int(key) - 1
        return wildcards[index] if index < len(wildcards) else ""

    return _READING_PLACEHOLDER.sub(fill, template)
