"""From a YAML file to a validated ``AgentConfig``, with every mistake located and explained.

Before validation, the defaults that depend on other keys are filled in (``client_id``, the
output topics), ``{device_id}`` is expanded and relative paths are taken relative to the
config file. After it, the checks that span keys run: references between sections, topic
clashes, files that must exist, secret files others may rewrite, trusted keys that do not
load. Problems are collected and reported together, sorted by line.
"""

from __future__ import annotations

import os
import re
import socket
import stat
import typing
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from agent import topics
from agent.config import integrations
from agent.config.diagnostics import did_you_mean, dotted, problems_from_pydantic
from agent.config.keys import load_public_key
from agent.config.schema import AgentConfig
from agent.config.yaml_source import KeyPath, YamlDocument, YamlSyntaxError, parse_yaml
from agent.errors import ConfigError, ConfigProblem, UpdateKeyError

DEFAULT_CONFIG_PATH = Path("/etc/edge-agent/agent.yaml")
CONFIG_ENV_VAR = "EDGE_AGENT_CONFIG"


def resolve_config_path(explicit: str | None) -> Path:
    """The config path ``run`` uses: ``--config``, else ``$EDGE_AGENT_CONFIG``, else the default."""
    if explicit:
        return Path(explicit)
    from_env = os.environ.get(CONFIG_ENV_VAR)
    return Path(from_env) if from_env else DEFAULT_CONFIG_PATH


def load_config(path: Path) -> AgentConfig:
    """Read and validate ``path``; raise ``ConfigError`` listing every problem found."""
    name = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        problem = ConfigProblem(name, 1, "", f"cannot read file: {exc.strerror}")
        raise ConfigError([problem]) from exc
    except UnicodeDecodeError as exc:
        raise ConfigError([ConfigProblem(name, 1, "", "file is not UTF-8 text")]) from exc
    try:
        doc = parse_yaml(text)
    except YamlSyntaxError as exc:
        raise ConfigError([ConfigProblem(name, exc.line, "", str(exc))]) from exc
    return config_from_document(doc, name, base_dir=path.resolve().parent)


def default_config() -> AgentConfig:
    """The built-in defaults, as used by ``run`` when no config file exists."""
    return config_from_document(YamlDocument(data={}), "<defaults>", base_dir=Path("/"))


def config_from_document(doc: YamlDocument, file: str, base_dir: Path) -> AgentConfig:
    """Validate parsed YAML; relative paths are taken relative to ``base_dir``."""
    problems = [
        ConfigProblem(file, second, dotted(path), f"duplicate key (first defined on line {first})")
        for path, first, second in doc.duplicates
    ]
    data = doc.data if doc.data is not None else {}
    if not isinstance(data, dict):
        problems.append(ConfigProblem(file, 1, "", "the config must be a mapping of keys"))
        raise ConfigError(problems)
    data = _fill_defaults(data, base_dir)
    config: AgentConfig | None = None
    try:
        config = AgentConfig.model_validate(data)
    except ValidationError as exc:
        problems.extend(problems_from_pydantic(exc, doc, file, AgentConfig))
    problems.extend(_cross_check(data, doc, file))
    if problems:
        problems.sort(key=lambda p: (p.line, p.key))
        raise ConfigError(_unique(problems))
    assert config is not None
    return config


def _unique(problems: list[ConfigProblem]) -> list[ConfigProblem]:
    return list(dict.fromkeys(problems))


def _fill_defaults(raw: dict[str, Any], base_dir: Path) -> dict[str, Any]:
    """Fill the defaults that depend on other keys, expand ``{device_id}``, resolve paths.

    Works on the raw data before validation, so it must tolerate any types: values of the
    wrong type are left alone for the validator to report.
    """
    data = dict(raw)
    if data.get("device_id") is None:
        data["device_id"] = _hostname()
    filler = _Filler(data["device_id"], base_dir)
    for section in ("mqtt", "upstream"):
        if section == "mqtt" or data.get(section) is not None:
            data[section] = filler.mqtt(data.get(section))
    for key in ("models_dir", "state_dir"):
        if key in data:
            data[key] = filler.resolve(data[key])
    updates = data.get("updates")
    if isinstance(updates, dict):
        updates = dict(updates)
        for key in ("trusted_keys", "root_keys"):
            if isinstance(updates.get(key), list):
                updates[key] = [filler.resolve(k) for k in updates[key]]
        if "ca_file" in updates:
            updates["ca_file"] = filler.resolve(updates["ca_file"])
        data["updates"] = updates
    # Always filled: the edge node id's default names the device.
    sparkplug = {} if data.get("sparkplug") is None else data["sparkplug"]
    if isinstance(sparkplug, dict):
        node = sparkplug.get("edge_node_id")
        data["sparkplug"] = {**sparkplug, "edge_node_id": filler.expand(node or "{device_id}")}
    if isinstance(data.get("models"), dict):
        data["models"] = {name: _fill_model(name, body) for name, body in data["models"].items()}
    results_broker = data["upstream"] if isinstance(data.get("upstream"), dict) else data["mqtt"]
    prefix = results_broker.get("topic_prefix") if isinstance(results_broker, dict) else None
    if isinstance(data.get("pipelines"), dict):
        data["pipelines"] = {
            name: filler.pipeline(name, body, prefix) for name, body in data["pipelines"].items()
        }
    return data


class _Filler:
    """Default-filling helpers bound to one device id and config directory."""

    def __init__(self, device_id: Any, base_dir: Path) -> None:
        self.device_id = device_id if isinstance(device_id, str) else "{device_id}"
        self.base_dir = base_dir

    def expand(self, value: Any) -> Any:
        """Replace ``{device_id}`` in a string value."""
        return value.replace("{device_id}", self.device_id) if isinstance(value, str) else value

    def resolve(self, value: Any) -> Any:
        """Make a relative path relative to the config file's folder."""
        if isinstance(value, str) and value and not os.path.isabs(value):
            return str(self.base_dir / value)
        return value

    def mqtt(self, section: Any) -> Any:
        """Defaults of an ``mqtt``/``upstream`` section."""
        if section is None:
            section = {}
        if not isinstance(section, dict):
            return section
        mqtt = dict(section)
        # An explicit null means "the default" as much as leaving the key out does.
        if mqtt.get("client_id") is None:
            mqtt["client_id"] = "edge-agent-{device_id}"
        if mqtt.get("topic_prefix") is None:
            mqtt["topic_prefix"] = "edge/{device_id}"
        mqtt["client_id"] = self.expand(mqtt["client_id"])
        mqtt["topic_prefix"] = self.expand(mqtt["topic_prefix"])
        if "password_file" in mqtt:
            mqtt["password_file"] = self.resolve(mqtt["password_file"])
        if isinstance(mqtt.get("tls"), dict):
            mqtt["tls"] = {key: self.resolve(value) for key, value in mqtt["tls"].items()}
        return mqtt

    def pipeline(self, name: Any, body: Any, prefix: Any) -> Any:
        """Defaults of one pipeline: the output topic, ``{device_id}`` in topics."""
        if not isinstance(body, dict):
            return body
        body = dict(body)
        if isinstance(body.get("input"), dict) and "topic" in body["input"]:
            body["input"] = {**body["input"], "topic": self.expand(body["input"]["topic"])}
        out = {} if body.get("output") is None else body["output"]
        if isinstance(out, dict):
            out = dict(out)
            if out.get("topic") is None and isinstance(prefix, str):
                out["topic"] = f"{prefix}/results/{name}"
            if "topic" in out:
                out["topic"] = self.expand(out["topic"])
        body["output"] = out
        return body


def _fill_model(name: Any, body: Any) -> Any:
    if body is None:
        body = {}
    if isinstance(body, dict) and "file" not in body:
        return {**body, "file": f"{name}.onnx"}
    return body


def _hostname() -> str:
    host = socket.gethostname().split(".")[0]
    cleaned = re.sub(r"[^A-Za-z0-9._-]", "-", host)[:64]
    return cleaned or "edge-device"


def _cross_check(data: dict[str, Any], doc: YamlDocument, file: str) -> list[ConfigProblem]:
    """Checks that span keys: references between sections, topic clashes, files that must exist."""
    problems: list[ConfigProblem] = []

    def report(path: KeyPath, message: str) -> None:
        problems.append(ConfigProblem(file, doc.line_of(path), dotted(path), message))

    models = _mapping(data.get("models"))
    publishers: dict[str, str] = {}
    for name, body in _mapping(data.get("pipelines")).items():
        model = _mapping(body).get("model")
        if isinstance(model, str) and model not in models:
            known = ", ".join(sorted(str(m) for m in models)) or "none are defined"
            report(
                ("pipelines", name, "model"),
                f"model {model!r} is not defined under models ({known})"
                f"{did_you_mean(model, [str(m) for m in models])}",
            )
        topic = _mapping(_mapping(body).get("output")).get("topic")
        if not isinstance(topic, str):
            continue
        if topic in publishers:
            report(
                ("pipelines", name, "output", "topic"),
                f"pipelines {publishers[topic]!r} and {name!r} both publish to {topic!r}",
            )
        publishers.setdefault(topic, str(name))
        in_topic = _mapping(_mapping(body).get("input")).get("topic")
        for message in topics.placeholder_problems(topic, in_topic):
            report(("pipelines", name, "output", "topic"), message)

    for section in ("mqtt", "upstream"):
        mqtt = _mapping(data.get(section))
        _check_file_exists(mqtt.get("password_file"), (section, "password_file"), report)
        _check_secret_file(mqtt.get("password_file"), (section, "password_file"), report)
        for key, value in _mapping(mqtt.get("tls")).items():
            _check_file_exists(value, (section, "tls", key), report)
    updates = _mapping(data.get("updates"))
    keys = updates.get("trusted_keys")
    for index, value in enumerate(keys if isinstance(keys, list) else []):
        _check_public_key(value, ("updates", "trusted_keys", index), report)
    threshold = updates.get("threshold", 1)
    if isinstance(keys, list) and keys and isinstance(threshold, int) and threshold > len(keys):
        report(
            ("updates", "threshold"),
            f"threshold {threshold} is more than the "
            f"{len(keys)} trusted key(s): no update could ever be accepted",
        )
    roots = updates.get("root_keys")
    for index, value in enumerate(roots if isinstance(roots, list) else []):
        _check_public_key(value, ("updates", "root_keys", index), report)
    root_threshold = updates.get("root_threshold", 1)
    if (
        isinstance(roots, list)
        and roots
        and isinstance(root_threshold, int)
        and root_threshold > len(roots)
    ):
        report(
            ("updates", "root_threshold"),
            f"root_threshold {root_threshold} is more than the "
            f"{len(roots)} root key(s): no key set could ever be accepted",
        )
    _check_file_exists(updates.get("ca_file"), ("updates", "ca_file"), report)
    integrations.cross_check(data, report)
    return problems


def _check_public_key(
    value: Any, path: KeyPath, report: typing.Callable[[KeyPath, str], None]
) -> None:
    if not isinstance(value, str):
        return
    try:
        load_public_key(Path(value))
    except UpdateKeyError as exc:
        report(path, str(exc))


def _mapping(value: Any) -> dict[Any, Any]:
    """``value`` when it is a mapping, else an empty one (the validator reports the type)."""
    return value if isinstance(value, dict) else {}


def _check_file_exists(
    value: Any, path: KeyPath, report: typing.Callable[[KeyPath, str], None]
) -> None:
    if isinstance(value, str) and not os.path.exists(value):
        report(path, f"file not found: {value}")


def _check_secret_file(
    value: Any, path: KeyPath, report: typing.Callable[[KeyPath, str], None]
) -> None:
    """A secret anyone may rewrite is refused (they would choose the broker password the
    agent sends); one others may read only draws a warning at start (``secret_file_mode``)."""
    if not isinstance(value, str):
        return
    try:
        mode = os.stat(value).st_mode
    except OSError:
        return  # reported as missing, or unreadable when the agent reads it
    if mode & stat.S_IWOTH:
        report(
            path,
            f"{value} is writable by every user (mode {stat.filemode(mode)}): "
            f"anyone could replace the password; run chmod 600 {value}",
        )


def secret_file_warning(path: str) -> str | None:
    """What is wrong with a secret file others may read, or None (logged as a warning)."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return None
    if mode & (stat.S_IRGRP | stat.S_IROTH):
        return (
            f"{path} is readable by other users (mode {stat.filemode(mode)}); "
            f"run chmod 600 {path} (owner: the agent's user)"
        )
    return None
