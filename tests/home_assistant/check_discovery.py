"""Check edge-agent's Home Assistant discovery configs with Home Assistant's own code.

Runs under the Python of a virtual environment holding ``homeassistant`` (see
``tests/home_assistant/requirements.txt`` for the version), not under edge-agent's: the test
``tests/test_home_assistant_schema.py`` builds that environment and starts this script.

Reads JSON on stdin: ``{"prefix": ..., "configs": {topic: payload}, "samples": {topic:
payload}}``. Each config goes through what Home Assistant's MQTT discovery does with a
device discovery message: the topic pattern, the abbreviation expansion, the device
schema, then per component the shared options, and the platform's ``DISCOVERY_SCHEMA``.
Each entity's templates are then rendered against the sample payload of its topic, as the
entity would render a message. Prints JSON: ``{"problems": [...], "states": {component id:
{key: rendered}}}``; a problem is a string naming the component and what failed.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import sys
import tempfile
from typing import Any

from homeassistant.components.mqtt import discovery
from homeassistant.components.mqtt.models import MqttValueTemplate
from homeassistant.components.mqtt.schemas import DEVICE_DISCOVERY_SCHEMA, SHARED_OPTIONS
from homeassistant.const import __version__ as ha_version
from homeassistant.core import HomeAssistant
from homeassistant.helpers.template import Template

TEMPLATE_KEYS = ("value_template", "json_attributes_template")


def check(request: dict[str, Any], hass: HomeAssistant) -> dict[str, Any]:
    """The problems of every config in ``request``, and the states their entities show."""
    problems: list[str] = []
    states: dict[str, dict[str, Any]] = {}
    prefix = request["prefix"]
    for topic, text in request["configs"].items():
        match = discovery.TOPIC_MATCHER.match(topic.removeprefix(f"{prefix}/"))
        if match is None or match.group("component") != "device":
            problems.append(f"{topic}: not a device discovery topic Home Assistant accepts")
            continue
        payload = json.loads(text)
        discovery._replace_all_abbreviations(payload)
        try:
            DEVICE_DISCOVERY_SCHEMA(payload)
        except Exception as exc:
            problems.append(f"{topic}: device schema: {exc}")
            continue
        for cid, component in payload["components"].items():
            platform = component.pop("platform")
            if not component:
                continue  # a removal
            for option in SHARED_OPTIONS:
                if option in payload and option not in component:
                    component[option] = payload[option]
            component["device"] = payload["device"]
            component["origin"] = payload.get("origin")
            module = importlib.import_module(f"homeassistant.components.mqtt.{platform}")
            try:
                validated = module.DISCOVERY_SCHEMA(component)
            except Exception as exc:
                problems.append(f"{cid} ({platform}): {exc}")
                continue
            states[cid] = render(cid, validated, request["samples"], hass, problems)
    return {"problems": problems, "states": states, "home_assistant": ha_version}


def render(
    cid: str,
    validated: dict[str, Any],
    samples: dict[str, str],
    hass: HomeAssistant,
    problems: list[str],
) -> dict[str, Any]:
    """Each template of one entity rendered against the sample message of its topic."""
    rendered: dict[str, Any] = {}
    for key in TEMPLATE_KEYS:
        template = validated.get(key)
        if not isinstance(template, Template):
            continue
        topic_key = "state_topic" if key == "value_template" else "json_attributes_topic"
        sample = samples.get(validated.get(topic_key, ""))
        if sample is None:
            continue
        template.hass = hass
        try:
            rendered[key] = MqttValueTemplate(template).async_render_with_possible_json_value(
                sample
            )
        except Exception as exc:
            problems.append(f"{cid}: {key} {template.template!r} failed: {exc}")
    return rendered


async def main() -> None:
    """Read the request, check it, print the answer."""
    request = json.load(sys.stdin)
    with tempfile.TemporaryDirectory() as config_dir:
        hass = HomeAssistant(config_dir)
        answer = check(request, hass)
    json.dump(answer, sys.stdout, default=str)


if __name__ == "__main__":
    asyncio.run(main())
