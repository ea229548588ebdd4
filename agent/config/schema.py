"""The configuration's schema: typed, immutable sections, one pydantic model each.

The schema is a contract with the config files already written on devices: the README's
Configuration reference and ``config/agent.example.yaml`` document every key, and a key
renamed or removed would make an upgraded agent refuse a file that worked
(``test_schema_is_the_contract`` pins the top-level keys).

Validation uses pydantic v2: ``extra="forbid"`` catches misspelt keys, strict scalar types
stop YAML's guesses (``port: "1883"``, ``qos: yes``) from passing unnoticed, and every error
carries a location that ``agent.config.diagnostics`` maps back to the file's line. Reading the
file and the checks that span keys live in ``agent.config.loader``.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BeforeValidator,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    field_validator,
    model_validator,
)

from agent import topics
from agent.config.base import Name, Section, TopicName
from agent.config.diagnostics import did_you_mean
from agent.config.integrations import HomeAssistantConfig, SparkplugConfig
from agent.strenum import StrEnum

# The largest update message this agent takes: a manifest (a few KB, plus an optional inline
# golden set of at most 1 MiB npz, base64 twice: 1.78 MiB) or one update chunk.
UPDATE_MESSAGE_MAX_BYTES = 2 * 1024 * 1024
# Room for the topic, the 4-byte chunk index and MQTT 5 properties beyond a message's payload.
PACKET_OVERHEAD_BYTES = 64 * 1024
MQTT_MAX_PACKET_BYTES = 268_435_455  # the largest remaining length MQTT can encode


class DeliveryMode(StrEnum):
    """When a reading is acknowledged to its broker (the ``delivery`` key)."""

    AT_LEAST_ONCE = "at_least_once"  # after its result is delivered or stored
    AT_MOST_ONCE = "at_most_once"  # on arrival


Dtype = Literal[
    "float32", "float16", "float64", "int8", "uint8", "int16", "uint16", "int32", "int64", "bool"
]


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
            hint = did_you_mean(name, known)
            raise ValueError(f"unknown execution provider {name!r}{hint}")
    return tuple(value)


def _check_require_providers(value: Any) -> Any:
    # One clear error for a wrong value, not one per member of the union.
    if isinstance(value, bool) or value == "all_nodes":
        return value
    raise ValueError(f"expected true, false or all_nodes, got {value!r}")


def _known_providers() -> list[str]:
    # Imported here: loading onnxruntime costs ~0.2 s and most configs never name providers.
    import onnxruntime  # noqa: PLC0415

    return list(onnxruntime.get_all_providers())


TopicFilter = Annotated[StrictStr, AfterValidator(topics.check_filter)]
Port = Annotated[StrictInt, Field(ge=1, le=65535)]
QoS = Annotated[StrictInt, Field(ge=0, le=2)]
PositiveFloat = Annotated[StrictFloat, Field(gt=0, allow_inf_nan=False)]
Providers = Annotated[Literal["auto"] | tuple[str, ...] | None, BeforeValidator(_check_providers)]


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


class DriftConfig(Section):
    """How far a pipeline's live readings have drifted from a reference (per feature PSI
    in rolling windows)."""

    reference: StrictStr = Field(
        description="an .npz with input:<name> arrays (and expected:<output> for the outputs), "
        "relative to models_dir, such as `edge-agent model capture` writes; or `golden`: the "
        "model's NAME.golden.npz"
    )
    window_s: Annotated[StrictFloat, Field(ge=1, le=86_400)] = Field(
        300.0, description="readings are compared in windows this long"
    )
    threshold: Annotated[StrictFloat, Field(gt=0)] = Field(
        0.2, description="a window whose worst feature's PSI is above this is over"
    )
    windows: Annotated[StrictInt, Field(ge=1, le=1000)] = Field(
        3, description="windows over the threshold in a row flag the drift (and under, clear it)"
    )


class PipelineConfig(Section):
    """MQTT readings -> a model -> MQTT results."""

    model: Name = Field(description="name of a model under models: (required)")
    input: PipelineInput
    output: PipelineOutput
    batching: Batching = Field(default_factory=Batching)
    queue: QueueConfig = Field(default_factory=QueueConfig)
    state: StreamState | None = None
    constants: Mapping[StrictStr, Any] | None = Field(None, description="fixed model inputs")
    drift: DriftConfig | None = None


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


class ShadowConfig(Section):
    """The shadow trial: after its golden set, a candidate runs beside the serving model on
    live readings before it may serve. An update's manifest may carry its own terms."""

    duration_s: Annotated[StrictFloat, Field(ge=0, le=604_800)] = Field(
        0.0, description="how long the candidate runs beside the serving model; 0 = no shadow"
    )
    min_readings: Annotated[StrictInt, Field(ge=1)] = Field(
        200, description="fewer readings compared in duration_s fail the trial"
    )
    max_disagreement: Annotated[StrictFloat, Field(ge=0, le=1)] = Field(
        0.02, description="the share of readings whose results may differ"
    )
    max_latency_ratio: Annotated[StrictFloat, Field(gt=0)] = Field(
        1.5, description="the candidate's median run time over the serving model's"
    )
    sample: Annotated[StrictFloat, Field(gt=0, le=1)] = Field(
        1.0, description="the share of batches the candidate also runs"
    )


class UpdatesConfig(Section):
    """Signed fleet model updates."""

    trusted_keys: tuple[StrictStr, ...] = Field((), description="Ed25519 public key files")
    threshold: Annotated[StrictInt, Field(ge=1)] = 1
    root_keys: tuple[StrictStr, ...] = Field(
        (),
        description="Ed25519 public key files of the offline root keys that sign key sets "
        "(fleet/keys); once a key set is accepted, manifests are verified against its keys "
        "instead of trusted_keys",
    )
    root_threshold: Annotated[StrictInt, Field(ge=1)] = Field(
        1, description="distinct root signatures a key set needs"
    )
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
        600.0,
        description="a new model must load, warm up and pass its golden set within this, "
        "or is rolled back",
    )
    engine_build_timeout_s: Annotated[StrictFloat, Field(gt=0, le=86_400)] = Field(
        3600.0,
        description="the bound instead of trial_timeout_s (and warmup_timeout_s) on a load "
        "that builds a TensorRT engine for the first time: minutes on a Jetson",
    )
    shadow: ShadowConfig = Field(default_factory=ShadowConfig)


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
    require_providers: Annotated[
        StrictBool | Literal["all_nodes"], BeforeValidator(_check_require_providers)
    ] = Field(
        False,
        description="true: a model whose requested providers did not load does not serve; "
        "all_nodes: nor one any node of which fell back to the CPU",
    )
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
    home_assistant: HomeAssistantConfig = Field(
        default_factory=HomeAssistantConfig, description="Home Assistant MQTT discovery"
    )
    sparkplug: SparkplugConfig = Field(
        default_factory=SparkplugConfig, description="Sparkplug B edge node"
    )
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
