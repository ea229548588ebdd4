"""Config loading: defaults, filling, and located, complete error reports."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
from pydantic import ValidationError

from agent.config.loader import (
    default_config,
    load_config,
    resolve_config_path,
    secret_file_warning,
)
from agent.config.schema import AgentConfig
from agent.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent


def write(tmp_path: Path, text: str, name: str = "agent.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text).lstrip("\n"))
    return path


def problems(path: Path) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    return [str(p) for p in caught.value.problems]


VALID = """
device_id: gw1
models:
  vib: {file: vib.onnx}
pipelines:
  vibration:
    model: vib
    input: {topic: sensors/+/vib}
    output: {topic: "results/{1}/vib"}
"""


def test_example_and_demo_configs_are_valid() -> None:
    """The shipped example (every key) and demo configs validate."""
    example = load_config(REPO / "config" / "agent.example.yaml")
    assert example.pipelines
    demo = load_config(REPO / "config" / "demo.yaml")
    assert demo.pipelines


def test_defaults_for_an_empty_file(tmp_path: Path) -> None:
    """An empty file means all defaults; derived defaults use the device id."""
    config = load_config(write(tmp_path, "device_id: box7\n"))
    assert config.mqtt.host == "127.0.0.1"
    assert config.mqtt.port == 1883
    assert config.mqtt.client_id == "edge-agent-box7"
    assert config.topic_prefix == "edge/box7"
    assert config.health.interval_s == 10
    assert config.outbox.max_mb == 256
    assert config.providers == "auto"
    assert config.models == {}


def test_built_in_defaults_use_the_hostname() -> None:
    """Without a file the device id is the host name, and topics use it."""
    config = default_config()
    assert config.device_id
    assert config.topic_prefix == f"edge/{config.device_id}"


def test_device_id_placeholder_is_filled(tmp_path: Path) -> None:
    """{device_id} is filled in prefix, client id and pipeline topics; {1} is kept."""
    config = load_config(
        write(
            tmp_path,
            """
        device_id: gw9
        mqtt: {topic_prefix: "plant/{device_id}", client_id: "agent-{device_id}"}
        models: {m: {}}
        pipelines:
          p:
            model: m
            input: {topic: "in/{device_id}/+"}
            output: {topic: "out/{device_id}/{1}"}
          q:
            model: m
            input: {topic: "other/#"}
        """,
        )
    )
    assert config.topic_prefix == "plant/gw9"
    assert config.mqtt.client_id == "agent-gw9"
    assert config.pipelines["p"].input.topic == "in/gw9/+"
    assert config.pipelines["p"].output.topic == "out/gw9/{1}"
    assert config.pipelines["q"].output.topic == "plant/gw9/results/q"
    assert config.models["m"].file == "m.onnx"


def test_relative_paths_are_relative_to_the_config_file(tmp_path: Path) -> None:
    """models_dir and state_dir given relative resolve against the config's folder."""
    config = load_config(write(tmp_path, "device_id: a\nmodels_dir: models\nstate_dir: st\n"))
    assert config.models_dir == str(tmp_path / "models")
    assert config.state_dir == str(tmp_path / "st")


def test_config_objects_are_immutable(tmp_path: Path) -> None:
    """Config objects are frozen: nobody changes them behind the daemon's back."""
    config = load_config(write(tmp_path, VALID))
    with pytest.raises(ValidationError):
        config.mqtt.port = 1  # type: ignore[misc]


def test_misspelt_key_names_line_path_and_suggestion(tmp_path: Path) -> None:
    """An unknown key is reported with its line, dotted path and the likely intended key."""
    found = problems(
        write(
            tmp_path,
            """
        device_id: gw1
        mqtt:
          host: broker
          prot: 1884
        """,
        )
    )
    assert found == [
        f"{tmp_path}/agent.yaml:4: mqtt.prot: unknown key 'prot', did you mean 'port'?"
    ]


def test_misspelt_nested_key_in_a_pipeline(tmp_path: Path) -> None:
    """Suggestions work inside named maps (pipelines.NAME.input)."""
    found = problems(write(tmp_path, VALID + "    batching: {max_batc: 4}\n"))
    assert len(found) == 1
    assert (
        "pipelines.vibration.batching.max_batc: unknown key 'max_batc', did you mean "
        "'max_batch'?" in found[0]
    )
    assert found[0].startswith(f"{tmp_path}/agent.yaml:9:")


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    """A misspelt key, a wrong type and a missing model: three lines, in file order."""
    found = problems(
        write(
            tmp_path,
            """
        device_id: gw1
        mqtt:
          hots: broker
          port: "1883"
        models:
          vib: {file: vib.onnx}
        pipelines:
          vibration:
            model: vibe
            input: {topic: sensors/+/vib}
        """,
        )
    )
    name = f"{tmp_path}/agent.yaml"
    assert found == [
        f"{name}:3: mqtt.hots: unknown key 'hots', did you mean 'host'?",
        f"{name}:4: mqtt.port: Input should be a valid integer (got '1883')",
        f"{name}:9: pipelines.vibration.model: model 'vibe' is not defined under models "
        "(vib), did you mean 'vib'?",
    ]


def test_out_of_range_and_missing_required(tmp_path: Path) -> None:
    """Range limits and required keys are reported with their paths."""
    found = problems(
        write(
            tmp_path,
            """
        device_id: gw1
        mqtt: {port: 70000}
        models: {m: {}}
        pipelines:
          p:
            model: m
            input: {qos: 3}
        """,
        )
    )
    assert any(":2: mqtt.port: Input should be less than or equal to 65535" in p for p in found)
    assert any(
        ":7: pipelines.p.input.qos: Input should be less than or equal to 2" in p for p in found
    )
    assert any(":7: pipelines.p.input.topic: required key is missing" in p for p in found)


def test_missing_pipeline_model_key(tmp_path: Path) -> None:
    """A pipeline without 'model' is a missing required key at the pipeline's line."""
    found = problems(
        write(
            tmp_path,
            """
        device_id: gw1
        pipelines:
          p:
            input: {topic: a}
        """,
        )
    )
    assert found == [f"{tmp_path}/agent.yaml:3: pipelines.p.model: required key is missing"]


def test_duplicate_yaml_key(tmp_path: Path) -> None:
    """A key given twice in one mapping is an error naming both lines."""
    found = problems(
        write(
            tmp_path,
            """
        device_id: gw1
        mqtt:
          port: 1883
          port: 1884
        """,
        )
    )
    assert found == [f"{tmp_path}/agent.yaml:4: mqtt.port: duplicate key (first defined on line 3)"]


def test_merge_keys_are_not_duplicates(tmp_path: Path) -> None:
    """YAML merge keys may be overridden by explicit keys without an error."""
    text = """
        device_id: gw1
        models: {m: {}}
        pipelines:
          base: &base
            model: m
            input: {topic: a/+}
          p:
            <<: *base
            model: m
            input: {topic: b/+}
        """
    loaded = load_config(write(tmp_path, text))
    assert loaded.pipelines["p"].input.topic == "b/+"


def test_two_pipelines_publishing_to_one_topic(tmp_path: Path) -> None:
    """Two pipelines with the same output topic would mix results: an error."""
    found = problems(
        write(
            tmp_path,
            """
        device_id: gw1
        models: {m: {}}
        pipelines:
          a: {model: m, input: {topic: x/+}, output: {topic: out}}
          b: {model: m, input: {topic: y/+}, output: {topic: out}}
        """,
        )
    )
    assert found == [
        f"{tmp_path}/agent.yaml:5: pipelines.b.output.topic: pipelines 'a' and "
        "'b' both publish to 'out'"
    ]


def test_topic_syntax_and_placeholders(tmp_path: Path) -> None:
    """Bad filters, wildcards in output topics and unknown placeholders are reported."""
    found = problems(
        write(
            tmp_path,
            """
        device_id: gw1
        models: {m: {}}
        pipelines:
          a: {model: m, input: {topic: "x/#/y"}, output: {topic: "out/+"}}
          b: {model: m, input: {topic: "x/+"}, output: {topic: "out/{2}/{foo}"}}
        """,
        )
    )
    text = "\n".join(found)
    assert "pipelines.a.input.topic: '#' must be a whole level and the last one" in text
    assert "pipelines.a.output.topic: wildcards '+' and '#' are not allowed" in text
    assert "pipelines.b.output.topic: {2} refers to wildcard 2 but input topic 'x/+' has 1" in text
    assert "pipelines.b.output.topic: unknown placeholder {foo}" in text


def test_inline_password_is_refused(tmp_path: Path) -> None:
    """Secrets only by file: 'password' in the YAML is an error that says what to do."""
    found = problems(write(tmp_path, "device_id: a\nmqtt: {username: u, password: p}\n"))
    assert len(found) == 1
    assert "mqtt.password: a password is not accepted in the config file" in found[0]
    assert "password_file" in found[0]


def test_password_file_must_exist(tmp_path: Path) -> None:
    """A password_file that does not exist is reported at load time, not at connect time."""
    found = problems(
        write(tmp_path, "device_id: a\nmqtt: {username: u, password_file: nope.txt}\n")
    )
    assert found == [
        f"{tmp_path}/agent.yaml:2: mqtt.password_file: file not found: {tmp_path}/nope.txt"
    ]


def test_password_file_needs_a_username_and_may_not_be_world_writable(tmp_path: Path) -> None:
    """A password without a user name would never be sent; a password file anyone can rewrite
    lets anyone choose what the agent sends. Both are config errors."""
    secret = tmp_path / "pw.txt"
    secret.write_text("s3cret")
    secret.chmod(0o666)
    found = problems(write(tmp_path, f"device_id: a\nmqtt: {{password_file: {secret}}}\n"))
    assert found == [
        f"{tmp_path}/agent.yaml:2: mqtt: password_file is set but username is not: the broker "
        "is only sent a password together with a user name",
        f"{tmp_path}/agent.yaml:2: mqtt.password_file: {secret} is writable by every user "
        f"(mode -rw-rw-rw-): anyone could replace the password; run chmod 600 {secret}",
    ]
    secret.chmod(0o640)
    load_config(write(tmp_path, f"device_id: a\nmqtt: {{username: u, password_file: {secret}}}\n"))
    assert "readable by other users (mode -rw-r-----)" in str(secret_file_warning(str(secret)))
    secret.chmod(0o600)
    assert secret_file_warning(str(secret)) is None


def test_unknown_execution_provider(tmp_path: Path) -> None:
    """Provider names are checked against onnxruntime's list, with a suggestion."""
    found = problems(write(tmp_path, "device_id: a\nproviders: [CUDAExecutionProvidr]\n"))
    assert found == [
        f"{tmp_path}/agent.yaml:2: providers: unknown execution provider "
        "'CUDAExecutionProvidr', did you mean 'CUDAExecutionProvider'?"
    ]


def test_invalid_names(tmp_path: Path) -> None:
    """Model names and device ids must be topic- and path-safe."""
    found = problems(write(tmp_path, "device_id: a/b\nmodels: {'../x': {}}\n"))
    text = "\n".join(found)
    assert "device_id: 'a/b' is not a valid name" in text
    assert "models.../x: invalid key: '../x' is not a valid name" in text


def test_wrong_section_type(tmp_path: Path) -> None:
    """A scalar where a mapping belongs says so."""
    found = problems(write(tmp_path, "device_id: a\nmqtt: 5\n"))
    assert found == [f"{tmp_path}/agent.yaml:2: mqtt: expected a mapping of keys to values, got 5"]


def test_yaml_syntax_error_has_a_line(tmp_path: Path) -> None:
    """Broken YAML is one problem at the line the parser stopped."""
    found = problems(write(tmp_path, "device_id: a\nmqtt:\n  host: [broken\n  port: 1\n"))
    assert len(found) == 1
    assert found[0].startswith(f"{tmp_path}/agent.yaml:4: (top level): invalid YAML at column 7")


@pytest.mark.parametrize(
    ("line", "quoted"),
    [
        ("    output: {topic: vad/{1}, outputs: [output]}", '"vad/{1}"'),
        ("    output:\n      topic: {1}/vib", '"{1}/vib"'),
        ("    output: {topic: machines/{1}/anomaly}", '"machines/{1}/anomaly"'),
        ("    output: {topic: plant/{1}/{2}/out, qos: 1}", '"plant/{1}/{2}/out"'),
    ],
)
def test_unquoted_topic_template_gets_a_hint(tmp_path: Path, line: str, quoted: str) -> None:
    """A topic template left unquoted where YAML reads braces as a mapping says to quote it."""
    found = problems(write(tmp_path, "pipelines:\n  vad:\n" + line + "\n"))
    assert len(found) == 1
    assert "invalid YAML at column" in found[0]
    assert found[0].endswith(f"(braces start a YAML mapping: quote the topic, {quoted})")


def test_tab_indentation_gets_a_hint(tmp_path: Path) -> None:
    """Tabs are the other classic: the message says YAML wants spaces."""
    found = problems(write(tmp_path, "mqtt:\n\thost: x\n"))
    assert found == [
        f"{tmp_path}/agent.yaml:2: (top level): invalid YAML at column 1: found "
        "character '\\t' that cannot start any token (YAML indents with spaces, "
        "not tabs)"
    ]


@pytest.mark.parametrize(
    ("text", "hint"),
    [
        (
            "mqtt:\n  host: broker.local\n   port: 1883\n",
            "this line is indented deeper than 'host' on line 2, which already has a value: "
            "give it the same indentation as the keys beside it",
        ),
        (
            "models:\n  vib: {file: vib.onnx}\n pipelines:\n  p: {}\n",
            "this line's indentation matches no key above it: line it up with the other keys "
            "of its section; YAML nests by indentation, two spaces a level",
        ),
        ("device_id: gw: 1\n", "a value that holds ': ' must be quoted, e.g. name: \"a: b\""),
    ],
)
def test_bad_indentation_gets_a_hint(tmp_path: Path, text: str, hint: str) -> None:
    """PyYAML's bare "mapping values are not allowed here" and "expected <block end>" come
    with what is wrong with the line and how to fix it."""
    found = problems(write(tmp_path, text))
    assert len(found) == 1
    assert found[0].endswith(f"({hint})")


def test_unreadable_file(tmp_path: Path) -> None:
    """A missing file is a problem, not a traceback."""
    found = problems(tmp_path / "missing.yaml")
    assert found == [
        f"{tmp_path}/missing.yaml:1: (top level): cannot read file: No such file or directory"
    ]


def test_config_path_resolution(monkeypatch: pytest.MonkeyPatch) -> None:
    """--config wins over $EDGE_AGENT_CONFIG, which wins over /etc/edge-agent/agent.yaml."""
    monkeypatch.delenv("EDGE_AGENT_CONFIG", raising=False)
    assert resolve_config_path(None) == Path("/etc/edge-agent/agent.yaml")
    monkeypatch.setenv("EDGE_AGENT_CONFIG", "/tmp/env.yaml")
    assert resolve_config_path(None) == Path("/tmp/env.yaml")
    assert resolve_config_path("/tmp/flag.yaml") == Path("/tmp/flag.yaml")


def test_mqtt_protocol_accepts_yaml_int(tmp_path: Path) -> None:
    """`protocol: 5` (a YAML int) and `protocol: "3.1.1"` are both accepted."""
    assert load_config(write(tmp_path, "device_id: a\nmqtt: {protocol: 5}\n")).mqtt.protocol == "5"
    v311 = load_config(write(tmp_path, "device_id: a\nmqtt: {protocol: 3.1.1}\n"))
    assert v311.mqtt.protocol == "3.1.1"


def test_schema_is_the_contract() -> None:
    """Every top-level key of the contract exists in the schema."""
    contract = {
        "device_id",
        "groups",
        "mqtt",
        "models_dir",
        "state_dir",
        "providers",
        "models",
        "pipelines",
        "require_providers",
        "health",
        "metrics",
        "updates",
        "upstream",
        "outbox",
        "home_assistant",
        "sparkplug",
    }
    assert contract <= set(AgentConfig.model_fields)


def test_trusted_keys_must_be_ed25519_public_keys(tmp_path: Path) -> None:
    """A private key, a missing file and a threshold above the key count are each located."""
    from agent.updates.signing import generate_keypair  # noqa: PLC0415

    generate_keypair(tmp_path / "ops")
    path = write(
        tmp_path,
        """
    device_id: gw1
    updates:
      trusted_keys: [ops.pub, ops.key, gone.pub]
      threshold: 4
    """,
    )
    found = problems(path)
    assert any(
        ":3: updates.trusted_keys[1]:" in p and "not a PEM public key" in p for p in found
    ), found
    assert any(
        ":3: updates.trusted_keys[2]:" in p and "cannot read public key" in p for p in found
    ), found
    assert any(
        ":4: updates.threshold: threshold 4 is more than the 3 trusted key(s)" in p for p in found
    ), found


def test_integration_settings_are_checked_with_their_place(tmp_path: Path) -> None:
    """home_assistant and sparkplug: a result entity of a pipeline that does not exist, a
    threshold on a sensor, a threshold over a template that is not one expression, a
    Sparkplug id with a topic separator, and broker: upstream without an upstream."""
    found = problems(
        write(
            tmp_path,
            VALID
            + textwrap.dedent(
                """
                home_assistant:
                  discovery: true
                  results:
                    - {pipeline: vibraton, topic: results/a/vib, name: A, value_template: "{{ 1 }}"}
                    - {pipeline: vibration, topic: results/b/vib, name: B, threshold: 0.5,
                       value_template: "{{ 1 }}"}
                    - {pipeline: vibration, topic: results/c/vib, name: C, threshold: 0.5,
                       platform: binary_sensor, value_template: "{% if x %}1{% endif %}"}
                sparkplug: {enabled: true, group_id: "plant/3", broker: upstream}
                """
            ),
        )
    )
    text = "\n".join(found)
    assert (
        "agent.yaml:13: home_assistant.results[0].pipeline: pipeline 'vibraton' is not "
        "defined under pipelines (vibration), did you mean 'vibration'?"
    ) in text
    assert (
        "agent.yaml:14: home_assistant.results[1]: threshold is for platform: binary_sensor" in text
    )
    assert "agent.yaml:16: home_assistant.results[2]: with a threshold, value_template must" in text
    assert "agent.yaml:18: sparkplug.group_id: a Sparkplug id must not contain '/'" in text
    assert "agent.yaml:18: sparkplug.broker: broker: upstream needs an upstream section" in text


def test_sparkplug_edge_node_id_defaults_to_the_device_id(tmp_path: Path) -> None:
    """``{device_id}`` in sparkplug.edge_node_id is filled, and is the default."""
    config = load_config(write(tmp_path, VALID))
    assert config.sparkplug.edge_node_id == "gw1"
    named = load_config(write(tmp_path, VALID + "sparkplug: {edge_node_id: 'line3-{device_id}'}\n"))
    assert named.sparkplug.edge_node_id == "line3-gw1"
