"""Typed, immutable configuration and the YAML loader that explains every mistake.

The schema is the contract of ``DESIGN.md`` Part 1 (plus a few documented extensions).
Validation uses pydantic v2: ``extra="forbid"`` catches misspelt keys, strict scalar types stop
YAML's guesses (``port: "1883"``, ``qos: yes``) from passing unnoticed, and every error carries
a location that is mapped back to the file's line. Problems are collected and reported together.
"""

from __future__ import annotations

import difflib
import math
import os
import re
import socket
import stat
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    ValidationError,
    field_validator,
    model_validator,
)

from agent import topics
from agent.config.yaml_source import KeyPath, YamlDocument, YamlSyntaxError, parse_yaml
from agent.errors import ConfigError, ConfigProblem, UpdateKeyError
from agent.strenum import StrEnum

DEFAULT_CONFIG_PATH = Path("/etc/edge-agent/agent.yaml")
CONFIG_ENV_VAR = "EDGE_AGENT_CONFIG"

# The largest update message this agent takes: a manifest (a few KB, plus an optional inline
# golden set of at most 1 MiB npz, base64 twice: 1.78 MiB) or one update chunk.
UPDATE_MESSAGE_MAX_BYTES = 2 * 1024 * 1024
# Room for the topic, the 4-byte chunk index and MQTT 5 properties beyond a message's payload.
PACKET_OVERHEAD_BYTES = 64 * 1024
MQTT_MAX_PACKET_BYTES = 268_435_455  # the largest remaining length MQTT can encode

NAME_PATTERN = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


class DeliveryMode(StrEnum):
    """When a reading is acknowledged to its broker (the ``delivery`` key)."""

    AT_LEAST_ONCE = "at_least_once"  # after its result is delivered or stored
    AT_MOST_ONCE = "at_most_once"  # on arrival


Dtype = Literal[
    "float32", "float16", "float64", "int8", "uint8", "int16", "uint16", "int32", "int64", "bool"
]


def _check_name(value: str) -> str:
    if not NAME_PATTERN.match(value):
        raise ValueError(f"{value!r} is not a valid name: use 1-64 of A-Z a-z 0-9 . _ -")
    return value


def _check_listen(value: str | None) -> str | None:
    if value is None:
        return None
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"expected HOST:PORT, e.g. '127.0.0.1:9108', got {value!r}")
    return value


def _mqtt_protocol(value: Any) -> Any:
    # YAML reads `protocol: 5` as an int; accept it as the string it stands for.
    return str(value) if isinstance(value, int) and not isinstance(value, bool) else value


def _check_providers(value: Any) -> Any:
    if value is None or value == "auto":
        return value
    if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
        raise ValueError("expected 'auto' or a list of execution provider names")
    if not value:
        raise ValueError("the provider list must not be empty (use 'auto' to choose automatically)")
    known = _known_providers()
    for name in value:
        if name not in known:
            hint = _did_you_mean(name, known)
            raise ValueError(f"unknown execution provider {name!r}{hint}")
    return tuple(value)


def _known_providers() -> list[str]:
    # Imported here: loading onnxruntime costs ~0.2 s and most configs never name providers.
    import onnxruntime  # noqa: PLC0415

    return list(onnxruntime.get_all_providers())


Name = Annotated[StrictStr, AfterValidator(_check_name)]
TopicFilter = Annotated[StrictStr, AfterValidator(topics.check_filter)]
TopicName = Annotated[StrictStr, AfterValidator(topics.check_name)]
Port = Annotated[StrictInt, Field(ge=1, le=65535)]
QoS = Annotated[StrictInt, Field(ge=0, le=2)]
PositiveFloat = Annotated[StrictFloat, Field(gt=0, allow_inf_nan=False)]
Providers = Annotated[Literal["auto"] | tuple[str, ...] | None, BeforeValidator(_check_providers)]


class Section(BaseModel):
    """Base of every config section: immutable, and unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class TlsConfig(Section):
    """TLS settings for the broker connection; all paths are PEM files."""

    ca_file: StrictStr | None = Field(None, description="CA bundle that signed the broker's cert")
    cert_file: StrictStr | None = Field(None, description="client certificate (mutual TLS)")
    key_file: StrictStr | None = Field(None, description="private key of cert_file")

    @model_validator(mode="after")
    def _cert_and_key_together(self) -> TlsConfig:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file must be given together")
        return self

    @property
    def enabled(self) -> bool:
        """Whether TLS is in use at all."""
        return self.ca_file is not None or self.cert_file is not None


class MqttConfig(Section):
    """Connection to an MQTT broker (the local one, or ``upstream``)."""

    host: StrictStr = Field("127.0.0.1", description="broker host name or address")
    port: Port = Field(1883, description="broker TCP port")
    client_id: StrictStr = Field("", description="default: edge-agent-{device_id}")
    username: StrictStr | None = Field(None, description="user name for the broker")
    password_file: StrictStr | None = Field(
        None, description="file holding the password; never the password itself in YAML"
    )
    tls: TlsConfig = Field(default_factory=TlsConfig, description="TLS; off when empty")
    keepalive_s: Annotated[StrictInt, Field(ge=5, le=65535)] = Field(
        30, description="MQTT keepalive; the broker declares us gone after 1.5x this"
    )
    topic_prefix: TopicName = Field(
        "edge/{device_id}", description="where the agent's own topics live (P in the docs)"
    )
    protocol: Annotated[Literal["5", "3.1.1"], BeforeValidator(_mqtt_protocol)] = Field(
        "5", description="MQTT protocol version"
    )
    reconnect_max_s: Annotated[StrictFloat, Field(ge=1, le=3600)] = Field(
        30.0, description="upper bound of the reconnect backoff (it starts at 1 s and doubles)"
    )
    max_inflight: Annotated[StrictInt, Field(ge=1, le=65535)] = Field(
        100, description="QoS 1 messages awaiting the broker's acknowledgement at once"
    )
    session_expiry_s: Annotated[StrictInt, Field(ge=0, le=4_294_967_295)] = Field(
        86_400,
        description="at_least_once: how long the broker keeps the session (and the "
        "readings that arrive) while the agent is away",
    )
    receive_maximum: Annotated[StrictInt, Field(ge=1, le=65535)] = Field(
        100,
        description="at_least_once, MQTT 5: readings the broker may send before the "
        "agent acknowledges them; bounds the duplicates after a crash",
    )
    max_packet_bytes: Annotated[StrictInt, Field(ge=4096, le=MQTT_MAX_PACKET_BYTES)] | None = Field(
        None,
        description="MQTT 5 Maximum Packet Size sent in CONNECT (the broker drops "
        "larger messages for this client); a larger packet that still arrives is "
        "skipped unbuffered. Default: the largest input.max_payload_bytes or update "
        "message (2 MiB), plus 64 KiB",
    )

    @model_validator(mode="after")
    def _password_needs_user(self) -> MqttConfig:
        if self.password_file is not None and self.username is None:
            raise ValueError(
                "password_file is set but username is not: the broker is only "
                "sent a password together with a user name"
            )
        return self

    @field_validator("topic_prefix")
    @classmethod
    def _no_outer_slashes(cls, value: str) -> str:
        if value.startswith("/") or value.endswith("/"):
            raise ValueError(f"topic_prefix must not start or end with '/': {value!r}")
        return value


class ModelConfig(Section):
    """One named model; its file is hot-reloaded when it changes."""

    file: StrictStr = Field("", description="path relative to models_dir; default NAME.onnx")
    providers: Providers = Field(None, description="per-model override of the global providers")


class PipelineInput(Section):
    """Where readings come from and how their payload is decoded."""

    topic: TopicFilter = Field(description="MQTT filter with + and # wildcards (required)")
    qos: QoS = Field(1, description="subscription QoS")
    format: Literal["json", "raw", "npy"] = Field("json", description="payload encoding")
    field: StrictStr | None = Field(None, description="json: key holding the tensor")
    id_field: StrictStr = Field("id", description="json: key echoed into the result as id")
    tensor: StrictStr | None = Field(None, description="model input name; default its only one")
    dtype: Dtype = Field("float32", description="raw: element type, little-endian")
    shape: tuple[Annotated[StrictInt, Field(ge=1)], ...] | None = Field(
        None, description="per-item shape, batch axis excluded; default from the model"
    )
    shared_group: Name | None = Field(
        None, description="subscribe as $share/NAME/<topic> to split a stream across daemons"
    )
    max_payload_bytes: Annotated[StrictInt, Field(ge=1)] = Field(
        1_048_576, description="larger payloads are rejected before decoding"
    )


class Postprocess(Section):
    """Post-processing applied to the first published output."""

    output: StrictStr | None = Field(None, description="output to use; default the first")
    softmax: StrictBool = False
    argmax: StrictBool = False
    top_k: Annotated[StrictInt, Field(ge=1)] | None = None
    labels: StrictStr | None = Field(
        None, description="text file, one label per line; relative to models_dir"
    )
    threshold: StrictFloat | None = None


class PipelineOutput(Section):
    """Where and what results are published."""

    topic: TopicName = Field(
        description="{1}..{n}: wildcard matches of the input topic; {device_id} {pipeline} "
        "{model}; default P/results/{pipeline}"
    )
    qos: QoS = Field(1, description="publish QoS")
    outputs: tuple[StrictStr, ...] | None = Field(None, description="default: all outputs")
    postprocess: Postprocess | None = Field(None, description="softmax, argmax, top_k, labels...")


class Batching(Section):
    """Dynamic batching: batches form under load, a lone reading is never held back."""

    max_batch: Annotated[StrictInt, Field(ge=1, le=65536)] = 32
    max_delay_ms: Annotated[StrictFloat, Field(ge=0, le=10_000)] = Field(
        2.0, description="upper bound on waiting for company, never a fixed wait"
    )


class QueueConfig(Section):
    """Bound of the readings waiting for inference; overflow drops the oldest."""

    max: Annotated[StrictInt, Field(ge=1, le=10_000_000)] = 1000


class StreamState(Section):
    """Stateful streams: outputs fed back as the next reading's inputs, per stream key."""

    key: StrictStr = Field("{1}", description="stream key template over the input topic")
    inputs: Annotated[Mapping[StrictStr, StrictStr], Field(min_length=1)] = Field(
        description="model input name -> model output name that feeds it"
    )
    reset_after_s: PositiveFloat = 60.0


class PipelineConfig(Section):
    """MQTT readings -> a model -> MQTT results."""

    model: Name = Field(description="name of a model under models: (required)")
    input: PipelineInput
    output: PipelineOutput
    batching: Batching = Field(default_factory=Batching)
    queue: QueueConfig = Field(default_factory=QueueConfig)
    state: StreamState | None = None
    constants: Mapping[StrictStr, Any] | None = Field(None, description="fixed model inputs")


class WatchConfig(Section):
    """How changes to model files are noticed."""

    mode: Literal["auto", "inotify", "polling", "off"] = Field(
        "auto", description="auto: inotify, or polling on network filesystems / no inotify"
    )
    debounce_ms: Annotated[StrictFloat, Field(ge=0, le=60_000)] = Field(
        100.0, description="wait after a file is closed (a rename into place needs none)"
    )
    settle_ms: Annotated[StrictFloat, Field(ge=0, le=600_000)] = Field(
        1000.0, description="without a close event: size and mtime unchanged this long"
    )
    poll_interval_s: Annotated[StrictFloat, Field(gt=0, le=3600)] = 1.0


class HealthConfig(Section):
    """Health telemetry on P/health."""

    interval_s: Annotated[StrictFloat, Field(ge=0.2, le=86_400)] = 10.0
    stuck_after_s: Annotated[StrictFloat, Field(gt=0, le=86_400)] = Field(
        60.0, description="an inference batch running longer withholds the systemd watchdog"
    )


class MetricsConfig(Section):
    """Optional Prometheus endpoint."""

    listen: Annotated[StrictStr | None, AfterValidator(_check_listen)] = None


class UpdatesConfig(Section):
    """Signed fleet model updates."""

    trusted_keys: tuple[StrictStr, ...] = Field((), description="Ed25519 public key files")
    threshold: Annotated[StrictInt, Field(ge=1)] = 1
    require_signed_files: StrictBool = False
    ca_file: StrictStr | None = Field(
        None, description="CA bundle for https update downloads (default: the system's)"
    )
    chunk_timeout_s: Annotated[StrictFloat, Field(gt=0, le=86_400)] = Field(
        60.0, description="an MQTT chunk transfer with no chunk for this long fails"
    )
    connect_timeout_s: Annotated[StrictFloat, Field(gt=0, le=600)] = Field(
        15.0, description="https: connect and per-read timeout"
    )
    download_timeout_s: Annotated[StrictFloat, Field(gt=0, le=604_800)] = Field(
        1800.0, description="https: the whole download must finish within this"
    )
    trial_timeout_s: Annotated[StrictFloat, Field(gt=0, le=86_400)] = Field(
        600.0, description="a new model must load and warm up within this, or is rolled back"
    )


class OutboxConfig(Section):
    """Durable queue for results that cannot be published yet."""

    max_mb: Annotated[StrictFloat, Field(ge=1)] = Field(
        256.0, description="the outbox file stays under this; the oldest results go first"
    )
    max_age_s: PositiveFloat = Field(604_800.0, description="older results are dropped")
    flush_rate: Annotated[StrictFloat, Field(gt=0)] = Field(
        1000.0, description="results per second sent from the outbox after an outage"
    )


class AgentConfig(Section):
    """The whole agent configuration."""

    device_id: Name = Field(description="default: the host name")
    groups: tuple[Name, ...] = Field((), description="fleet groups, for group-targeted updates")
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    mqtt: MqttConfig = Field(default_factory=MqttConfig)
    models_dir: StrictStr = "/var/lib/edge-agent/models"
    state_dir: StrictStr = "/var/lib/edge-agent/state"
    providers: Providers = "auto"
    models: Mapping[Name, ModelConfig] = Field(default_factory=dict)
    pipelines: Mapping[Name, PipelineConfig] = Field(default_factory=dict)
    require_providers: StrictBool = False
    gpu_mem_limit_mb: Annotated[StrictInt, Field(ge=64)] | None = Field(
        None, description="CUDA arena cap; default on Jetson: half the shared memory"
    )
    cpu_threads: Annotated[StrictInt, Field(ge=1, le=1024)] | None = Field(
        None, description="onnxruntime intra-op threads; default: the physical cores"
    )
    warmup_timeout_s: Annotated[StrictFloat, Field(gt=0, le=86_400)] = Field(
        600.0,
        description="a model's warm-up runs must finish within this after its load "
        "began, or they are stopped and the load fails (the serving model stays); an update's "
        "trial is bounded by updates.trial_timeout_s instead",
    )
    watch: WatchConfig = Field(default_factory=WatchConfig)
    health: HealthConfig = Field(default_factory=HealthConfig)
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)
    updates: UpdatesConfig = Field(default_factory=UpdatesConfig)
    upstream: MqttConfig | None = None
    outbox: OutboxConfig = Field(default_factory=OutboxConfig)
    delivery: DeliveryMode = Field(
        DeliveryMode.AT_LEAST_ONCE,
        description="at_least_once: persistent session, readings "
        "acknowledged after their result is delivered or stored; at_most_once: acknowledged "
        "on arrival",
    )

    @property
    def topic_prefix(self) -> str:
        """``P`` of the topic reference: the prefix of the agent's own topics (on the
        upstream broker when there is one, since they go there)."""
        return (self.upstream or self.mqtt).topic_prefix

    def model_path(self, name: str) -> Path:
        """Absolute path of model ``name``'s file."""
        return Path(self.models_dir) / self.models[name].file

    def max_packet_bytes(self, mqtt: MqttConfig) -> int:
        """The largest MQTT packet the connection ``mqtt`` (``self.mqtt`` or ``upstream``)
        accepts: its ``max_packet_bytes``, else the largest message this config can need
        (a reading's ``max_payload_bytes`` or an update message) plus room for headers."""
        if mqtt.max_packet_bytes is not None:
            return mqtt.max_packet_bytes
        largest_reading = max(
            (p.input.max_payload_bytes for p in self.pipelines.values()), default=0
        )
        return min(
            MQTT_MAX_PACKET_BYTES,
            max(largest_reading, UPDATE_MESSAGE_MAX_BYTES) + PACKET_OVERHEAD_BYTES,
        )


class LoadedConfig(typing.NamedTuple):
    """A validated config and where it came from (``None``: built-in defaults)."""

    config: AgentConfig
    source: Path | None


# ---------------------------------------------------------------------------------------------
# Loading


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
        ConfigProblem(file, second, _dotted(path), f"duplicate key (first defined on line {first})")
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
        problems.extend(_problems_from_pydantic(exc, doc, file))
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
        if isinstance(updates.get("trusted_keys"), list):
            updates["trusted_keys"] = [filler.resolve(k) for k in updates["trusted_keys"]]
        if "ca_file" in updates:
            updates["ca_file"] = filler.resolve(updates["ca_file"])
        data["updates"] = updates
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
        problems.append(ConfigProblem(file, doc.line_of(path), _dotted(path), message))

    models = _mapping(data.get("models"))
    publishers: dict[str, str] = {}
    for name, body in _mapping(data.get("pipelines")).items():
        model = _mapping(body).get("model")
        if isinstance(model, str) and model not in models:
            known = ", ".join(sorted(str(m) for m in models)) or "none are defined"
            report(
                ("pipelines", name, "model"),
                f"model {model!r} is not defined under models ({known})"
                f"{_did_you_mean(model, [str(m) for m in models])}",
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
    _check_file_exists(updates.get("ca_file"), ("updates", "ca_file"), report)
    return problems


def _check_public_key(
    value: Any, path: KeyPath, report: typing.Callable[[KeyPath, str], None]
) -> None:
    if not isinstance(value, str):
        return
    from agent.updates.signing import load_public_key  # noqa: PLC0415 - cryptography is heavy

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


# ---------------------------------------------------------------------------------------------
# Turning pydantic errors into located, readable problems


def _problems_from_pydantic(
    exc: ValidationError, doc: YamlDocument, file: str
) -> list[ConfigProblem]:
    problems = []
    for error in exc.errors(include_url=False):
        loc = tuple(part for part in error["loc"] if part != "[key]")
        path: KeyPath = tuple(part for part in loc if isinstance(part, str | int))
        kind = error["type"]
        if kind == "extra_forbidden":
            key = str(path[-1])
            known = _fields_at(path[:-1])
            message = f"unknown key {key!r}{_did_you_mean(key, known)}"
            if key == "password" and "password_file" in known:
                message = (
                    "a password is not accepted in the config file: put it in a file "
                    "readable only by the agent and set 'password_file' to its path"
                )
        elif kind == "missing":
            message = "required key is missing"
        elif kind in ("tuple_type", "list_type"):
            message = f"expected a list, got {_describe(error.get('input'))}"
        elif kind in ("model_type", "dict_type", "model_attributes_type"):
            message = f"expected a mapping of keys to values, got {_describe(error.get('input'))}"
        else:
            message = str(error["msg"]).removeprefix("Value error, ")
            value = error.get("input")
            if kind != "value_error" and not isinstance(value, dict | list):
                message += f" (got {_describe(value)})"
        if "[key]" in error["loc"]:
            message = f"invalid key: {message}"
        problems.append(ConfigProblem(file, doc.line_of(path), _dotted(path), message))
    return problems


def _describe(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and math.isnan(value):
        return "nan"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return repr(value)


def _did_you_mean(word: str, candidates: typing.Iterable[str]) -> str:
    matches = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.6)
    return f", did you mean {matches[0]!r}?" if matches else ""


def _dotted(path: KeyPath) -> str:
    text = ""
    for part in path:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += f".{part}" if text else str(part)
    return text


def _fields_at(path: KeyPath) -> list[str]:
    """Names of the keys allowed at ``path`` (for "did you mean"), following the schema."""
    current: Any = AgentConfig
    for part in path:
        current = _child_type(current, part)
        if current is None:
            return []
    if _is_model(current):
        return list(current.model_fields)
    return []


def _is_model(tp: Any) -> bool:
    # On Python 3.10 isinstance(Mapping[str, X], type) is True; issubclass would then raise.
    return isinstance(tp, type) and typing.get_origin(tp) is None and issubclass(tp, BaseModel)


def _child_type(tp: Any, part: str | int) -> Any:
    if _is_model(tp):
        field = tp.model_fields.get(str(part))
        return _unwrap(field.annotation) if field is not None else None
    origin = typing.get_origin(tp)
    if origin in (dict, Mapping, typing.Mapping):
        return _unwrap(typing.get_args(tp)[1])
    if origin in (tuple, list):
        return _unwrap(typing.get_args(tp)[0])
    return None


def _unwrap(tp: Any) -> Any:
    """Strip Annotated and Optional to reach the model or container type underneath."""
    while True:
        origin = typing.get_origin(tp)
        if origin is Annotated:
            tp = typing.get_args(tp)[0]
        elif origin in (typing.Union, types.UnionType):
            args = [a for a in typing.get_args(tp) if a is not type(None)]
            structured = [a for a in args if typing.get_origin(_unwrap(a)) is not Literal]
            tp = structured[0] if structured else args[0]
        else:
            return tp
