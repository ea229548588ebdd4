"""The Home Assistant device discovery config of one agent: pure, from the config.

Device-based discovery (``PREFIX/device/OBJECT_ID/config``, Home Assistant 2024.11 and later):
one retained message carries the device, the origin and every entity (``cmps``), so the
agent's dozens of entities arrive, change and go as one message instead of one retained
message each. An entity that is gone is removed by keeping it in ``cmps`` with only its
platform (``{"p": "sensor"}``), which is how Home Assistant's discovery removes a component
of a device; an empty payload removes the whole device.

Every entity reads topics the agent already publishes: ``P/status`` (availability),
``P/models/NAME`` and ``P/health`` (JSON, read by ``value_template``), and the pipelines'
own result topics for the results the config lists.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from agent.config.integrations import SINGLE_EXPRESSION, HomeAssistantResult, discovery_id
from agent.config.schema import AgentConfig

ORIGIN_NAME = "edge-agent"

MODEL_STATES = ("LOADING", "READY", "FAILED")

Component = dict[str, Any]


@dataclass(frozen=True)
class Discovery:
    """What the agent publishes for Home Assistant: the retained config and its topic."""

    topic: str
    payload: dict[str, Any]

    @property
    def platforms(self) -> dict[str, str]:
        """Component id -> platform of every entity it declares (removed ones included)."""
        return {cid: str(body["p"]) for cid, body in self.payload["cmps"].items()}


def object_id(device_id: str) -> str:
    """The device's id in the discovery topic and in every entity's unique id."""
    return f"edge-agent_{discovery_id(device_id)}"


def discovery_topic(prefix: str, device_id: str) -> str:
    """Where the device config is retained."""
    return f"{prefix}/device/{object_id(device_id)}/config"


def build(
    config: AgentConfig,
    *,
    agent_version: str,
    hardware: str,
    removed: Mapping[str, str] = {},
) -> Discovery:
    """The discovery config for ``config``; ``removed`` (component id -> platform) are
    entities published before that the config no longer has: they go out as removals."""
    node = object_id(config.device_id)
    entities = _Entities(config.topic_prefix)
    components: dict[str, Component] = {}
    components.update(entities.agent())
    for name in config.models:
        components.update(entities.model(name))
    for name, pipeline in config.pipelines.items():
        components.update(entities.pipeline(name, drift=pipeline.drift is not None))
    for result in config.home_assistant.results:
        components[result.object_id] = entities.result(result)
    # Stable across restarts, so Home Assistant keeps each entity's id, name and history.
    components = {cid: {**body, "unique_id": f"{node}_{cid}"} for cid, body in components.items()}
    for cid, platform in removed.items():
        components.setdefault(cid, {"p": platform})
    payload = {
        "dev": {
            "ids": [node],
            "name": config.device_id,
            "mf": "edge-agent",
            "mdl": hardware,
            "sw": agent_version,
        },
        "o": {"name": ORIGIN_NAME, "sw": agent_version},
        "qos": 1,
        "cmps": components,
    }
    return Discovery(discovery_topic(config.home_assistant.prefix, config.device_id), payload)


class _Entities:
    """The entity configs of one agent, keyed by component id."""

    def __init__(self, prefix: str) -> None:
        self._prefix = prefix

    def agent(self) -> dict[str, Component]:
        """Connectivity, and the device's health figures."""
        health = f"{self._prefix}/health"
        components: dict[str, Component] = {
            # Not tied to availability: it must show "off" while the agent is offline.
            "agent_online": {
                "p": "binary_sensor",
                "name": "Online",
                "device_class": "connectivity",
                "state_topic": f"{self._prefix}/status",
                "payload_on": "online",
                "payload_off": "offline",
                "entity_category": "diagnostic",
            },
            "agent_warnings": self._available(
                {
                    "p": "binary_sensor",
                    "name": "Warnings",
                    "device_class": "problem",
                    "state_topic": health,
                    "value_template": "{{ 'ON' if value_json.get('warnings') else 'OFF' }}",
                    "json_attributes_topic": health,
                    "json_attributes_template": (
                        "{{ {'warnings': value_json.get('warnings', [])} | tojson }}"
                    ),
                    "entity_category": "diagnostic",
                }
            ),
        }
        for cid, name, template, extra in (
            ("cpu", "CPU", "value_json.cpu_percent", {"unit_of_measurement": "%"}),
            ("rss", "Memory (RSS)", "value_json.rss_mb", _megabytes()),
            (
                "temperature",
                "Temperature",
                "(value_json.temperatures_c.values() | max) if value_json.temperatures_c else None",
                {"device_class": "temperature", "unit_of_measurement": "°C"},
            ),
            ("disk_free", "Disk free", "value_json.disk_free_mb", _megabytes()),
            (
                "outbox_depth",
                "Outbox depth",
                "value_json.get('delivery', {}).get('outbox', {}).get('depth')",
                {"unit_of_measurement": "results"},
            ),
            (
                "uptime",
                "Uptime",
                "value_json.uptime_s",
                {"device_class": "duration", "unit_of_measurement": "s"},
            ),
        ):
            components[f"agent_{cid}"] = self._health_sensor(name, template, extra)
        return components

    def model(self, name: str) -> dict[str, Component]:
        """A model's state, version and degraded flag."""
        cid = f"model_{discovery_id(name)}"
        state = f"{self._prefix}/models/{name}"
        return {
            f"{cid}_state": self._available(
                {
                    "p": "sensor",
                    "name": f"{name} state",
                    "state_topic": state,
                    "value_template": "{{ value_json.state }}",
                    "device_class": "enum",
                    "options": list(MODEL_STATES),
                    "json_attributes_topic": state,
                    "entity_category": "diagnostic",
                }
            ),
            f"{cid}_version": self._available(
                {
                    "p": "sensor",
                    "name": f"{name} version",
                    "state_topic": state,
                    # sha256:<64 hex>: the first 12 hex digits, as `edge-agent status` shows.
                    "value_template": "{{ (value_json.version or 'none')[7:19] or 'none' }}",
                    "entity_category": "diagnostic",
                }
            ),
            f"{cid}_degraded": self._available(
                {
                    "p": "binary_sensor",
                    "name": f"{name} degraded",
                    "device_class": "problem",
                    "state_topic": f"{self._prefix}/health",
                    "value_template": (
                        f"{{{{ 'ON' if value_json.get('models', {{}}).get('{name}', {{}})"
                        ".get('degraded') else 'OFF' }}"
                    ),
                    "entity_category": "diagnostic",
                }
            ),
        }

    def pipeline(self, name: str, *, drift: bool = False) -> dict[str, Component]:
        """A pipeline's throughput, p95 latency, drops and errors; with ``drift`` settings,
        whether its readings have drifted."""
        cid = f"pipeline_{discovery_id(name)}"
        figures = f"value_json.get('pipelines', {{}}).get('{name}', {{}})"
        found = {} if not drift else {f"{cid}_drift": self._drift(name, figures)}
        return found | {
            f"{cid}_throughput": self._health_sensor(
                f"{name} throughput",
                f"{figures}.get('throughput')",
                {"unit_of_measurement": "readings/s"},
            ),
            f"{cid}_latency_p95": self._health_sensor(
                f"{name} latency p95",
                f"{figures}.get('latency_ms', {{}}).get('p95')",
                {"device_class": "duration", "unit_of_measurement": "ms"},
            ),
            f"{cid}_dropped": self._health_sensor(
                f"{name} dropped", f"{figures}.get('dropped')", _counter()
            ),
            f"{cid}_errors": self._health_sensor(
                f"{name} errors", f"{figures}.get('errors')", _counter()
            ),
        }

    def _drift(self, name: str, figures: str) -> Component:
        return self._available(
            {
                "p": "binary_sensor",
                "name": f"{name} drift",
                "device_class": "problem",
                "state_topic": f"{self._prefix}/health",
                "value_template": (
                    f"{{{{ 'ON' if {figures}.get('drift', {{}}).get('flagged') else 'OFF' }}}}"
                ),
                "json_attributes_topic": f"{self._prefix}/health",
                "json_attributes_template": f"{{{{ {figures}.get('drift', {{}}) | tojson }}}}",
                "entity_category": "diagnostic",
            }
        )

    def result(self, result: HomeAssistantResult) -> Component:
        """A result topic the config lists, as a sensor or a thresholded binary sensor."""
        component: Component = {
            "p": result.platform,
            "name": result.name,
            "state_topic": result.topic,
            "value_template": result.value_template,
        }
        if result.threshold is not None:
            match = SINGLE_EXPRESSION.match(result.value_template)
            assert match is not None, "the config check allows a threshold only then"
            expression = match.group("expression").strip()
            component["value_template"] = (
                f"{{{{ 'ON' if (({expression}) | float(0)) > {result.threshold!r} else 'OFF' }}}}"
            )
        for key in ("device_class", "unit_of_measurement", "state_class", "expire_after"):
            value = getattr(result, key)
            if value is not None:
                component[key] = value
        return self._available(component)

    def _health_sensor(self, name: str, expression: str, extra: Mapping[str, Any]) -> Component:
        return self._available(
            {
                "p": "sensor",
                "name": name,
                "state_topic": f"{self._prefix}/health",
                "value_template": f"{{{{ {expression} }}}}",
                "state_class": "measurement",
                "entity_category": "diagnostic",
                **extra,
            }
        )

    def _available(self, component: Component) -> Component:
        # Per entity, not shared at device level: the connectivity sensor has none.
        return {**component, "availability_topic": f"{self._prefix}/status"}


def _megabytes() -> dict[str, Any]:
    return {"device_class": "data_size", "unit_of_measurement": "MB"}


def _counter() -> dict[str, Any]:
    # Counters restart at 0 with the agent; total_increasing reads a drop as a reset.
    return {"state_class": "total_increasing"}
