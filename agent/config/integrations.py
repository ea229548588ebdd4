"""The ``home_assistant`` and ``sparkplug`` sections, and the checks that tie them to the
rest of the config (a result entity's pipeline, Sparkplug's broker)."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    model_validator,
)

from agent.config.base import Name, Section, TopicName
from agent.config.diagnostics import did_you_mean
from agent.config.yaml_source import KeyPath

# One Jinja expression and nothing else: a threshold is compared against its value.
SINGLE_EXPRESSION = re.compile(r"^\s*\{\{(?P<expression>(?:(?!\{\{|\}\}|\{%).)+)\}\}\s*$", re.S)
# Home Assistant discovery ids: its discovery topic takes [a-zA-Z0-9_-] only.
_NOT_DISCOVERY_ID = re.compile(r"[^a-zA-Z0-9_-]+")


def discovery_id(text: str) -> str:
    """``text`` as a Home Assistant discovery/object id: runs of other characters become
    ``_``, lower case."""
    return _NOT_DISCOVERY_ID.sub("_", text).strip("_").lower() or "_"


def _check_sparkplug_id(value: str) -> str:
    if not value:
        raise ValueError("a Sparkplug id must not be empty")
    bad = sorted({c for c in value if c in "+/#"})
    if bad:
        raise ValueError(
            f"a Sparkplug id must not contain {' '.join(repr(c) for c in bad)} "
            f"(they are MQTT topic separators and wildcards): {value!r}"
        )
    return value


SparkplugId = Annotated[StrictStr, AfterValidator(_check_sparkplug_id)]


class HomeAssistantResult(Section):
    """A result topic shown as a Home Assistant entity."""

    pipeline: Name = Field(description="the pipeline that publishes the topic (required)")
    topic: TopicName = Field(
        description="one result topic, wildcards filled in (e.g. machines/pump1/anomaly)"
    )
    name: StrictStr = Field(min_length=1, max_length=128, description="the entity's name")
    value_template: StrictStr = Field(
        description="Home Assistant template over the result, e.g. "
        "'{{ value_json.outputs.score[0][0] }}'"
    )
    platform: Literal["sensor", "binary_sensor"] = "sensor"
    threshold: StrictFloat | None = Field(
        None,
        description="binary_sensor: on when the template's value is above this; without "
        "it the template must give ON or OFF",
    )
    device_class: StrictStr | None = Field(None, description="Home Assistant device class")
    unit_of_measurement: StrictStr | None = None
    state_class: Literal["measurement", "total", "total_increasing"] | None = None
    expire_after: Annotated[StrictInt, Field(ge=1)] | None = Field(
        None, description="seconds without a result after which the entity is unavailable"
    )

    @model_validator(mode="after")
    def _platform_options(self) -> HomeAssistantResult:
        if self.threshold is not None:
            if self.platform != "binary_sensor":
                raise ValueError("threshold is for platform: binary_sensor")
            if not SINGLE_EXPRESSION.match(self.value_template):
                raise ValueError(
                    "with a threshold, value_template must be one expression, "
                    "'{{ ... }}', whose value is compared with it"
                )
        if self.platform == "binary_sensor" and (self.unit_of_measurement or self.state_class):
            raise ValueError("unit_of_measurement and state_class are for platform: sensor")
        return self

    @property
    def object_id(self) -> str:
        """The entity's id within the device, from its name: stable across restarts."""
        return f"result_{discovery_id(self.name)}"


class HomeAssistantConfig(Section):
    """Home Assistant MQTT discovery of the agent, its models, pipelines and results."""

    discovery: StrictBool = Field(False, description="publish the discovery config")
    prefix: TopicName = Field("homeassistant", description="Home Assistant's discovery prefix")
    results: tuple[HomeAssistantResult, ...] = Field(
        (), description="result topics to show as entities"
    )

    @model_validator(mode="after")
    def _unique_names(self) -> HomeAssistantConfig:
        seen: dict[str, str] = {}
        for result in self.results:
            if result.object_id in seen:
                raise ValueError(
                    f"results {seen[result.object_id]!r} and {result.name!r} would get the "
                    "same entity id: give them names that differ in letters or digits"
                )
            seen[result.object_id] = result.name
        return self


class SparkplugConfig(Section):
    """The agent as a Sparkplug B edge node, on an MQTT connection of its own."""

    enabled: StrictBool = False
    group_id: SparkplugId = "edge-agent"
    edge_node_id: SparkplugId = Field("{device_id}", description="default: the device id")
    primary_host_id: SparkplugId | None = Field(
        None,
        description="wait for this host application's STATE online before the births, "
        "and disconnect while it is offline",
    )
    broker: Literal["local", "upstream"] = Field(
        "local", description="which broker's settings (mqtt or upstream) the node connects with"
    )
    history_max: Annotated[StrictInt, Field(ge=0, le=1_000_000)] = Field(
        10_000,
        description="results kept in memory while the host cannot be reached, sent "
        "afterwards as is_historical; the oldest go first",
    )
    max_devices: Annotated[StrictInt, Field(ge=1, le=100_000)] = Field(
        1000, description="Sparkplug devices (pipeline streams) at most; later streams wait"
    )


Report = Callable[[KeyPath, str], None]


def cross_check(data: Mapping[str, Any], report: Report) -> None:
    """The integrations' references to the rest of the raw config ``data``."""
    pipelines = data.get("pipelines")
    names = set(pipelines) if isinstance(pipelines, Mapping) else set()
    home_assistant = data.get("home_assistant")
    results = home_assistant.get("results") if isinstance(home_assistant, Mapping) else None
    for index, result in enumerate(results if isinstance(results, list) else []):
        pipeline = result.get("pipeline") if isinstance(result, Mapping) else None
        if isinstance(pipeline, str) and pipeline not in names:
            known = ", ".join(sorted(str(n) for n in names)) or "none are defined"
            report(
                ("home_assistant", "results", index, "pipeline"),
                f"pipeline {pipeline!r} is not defined under pipelines ({known})"
                f"{did_you_mean(pipeline, [str(n) for n in names])}",
            )
    sparkplug = data.get("sparkplug")
    if (
        isinstance(sparkplug, Mapping)
        and sparkplug.get("broker") == "upstream"
        and data.get("upstream") is None
    ):
        report(
            ("sparkplug", "broker"),
            "broker: upstream needs an upstream section (or use broker: local)",
        )
