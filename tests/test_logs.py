"""Logging set-up: JSON lines off a terminal, text on one, stdlib loggers routed through."""

from __future__ import annotations

import io
import json
import logging

import structlog

from agent.logs import configure_logging, set_log_level


def test_json_lines_when_not_a_terminal() -> None:
    """A non-terminal stream gets one JSON object per event, with level and timestamp."""
    out = io.StringIO()
    configure_logging("info", stream=out)
    structlog.get_logger("agent.test").info("model_ready", model="vib", load_ms=1.5)
    event = json.loads(out.getvalue().strip())
    assert event["event"] == "model_ready"
    assert event["model"] == "vib"
    assert event["level"] == "info"
    assert "timestamp" in event


def test_stdlib_loggers_share_the_output() -> None:
    """paho and other stdlib loggers come out as the same JSON."""
    out = io.StringIO()
    configure_logging("debug", stream=out)
    logging.getLogger("paho.mqtt").debug("Sending CONNECT")
    event = json.loads(out.getvalue().strip())
    assert event == {**event, "event": "Sending CONNECT", "logger": "paho.mqtt", "level": "debug"}


def test_console_output_is_readable_text() -> None:
    """Console mode prints text, not JSON."""
    out = io.StringIO()
    configure_logging("info", json_output=False, stream=out)
    structlog.get_logger("agent.test").warning("mqtt_disconnected", reason="gone")
    text = out.getvalue()
    assert "mqtt_disconnected" in text
    assert "reason='gone'" in text or "reason=gone" in text
    assert not text.lstrip().startswith("{")


def test_level_filters_and_can_change_live() -> None:
    """Events below the level are dropped; set_log_level changes it at run time."""
    out = io.StringIO()
    configure_logging("warning", stream=out)
    log = structlog.get_logger("agent.test")
    log.info("quiet")
    assert out.getvalue() == ""
    set_log_level("info")
    log.info("loud")
    assert "loud" in out.getvalue()
