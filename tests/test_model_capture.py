"""`edge-agent model capture`: a pipeline's real readings from a real broker, decoded as the
daemon decodes them, as the sample inputs of a golden set.

The readings are published retained, one per device topic under the pipeline's wildcard
filter, before the capture starts: the broker hands them all to the new subscription at
once, so the test needs no wait for the capture to be subscribed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from agent.cli.main import main
from agent.inference.golden import parse_golden
from agent.modeltools.reference import read_inputs
from tests.broker import MosquittoBroker, publisher
from tests.conftest import base_config
from tests.model_zoo import FEATURES, build_mlp, sample_inputs
from tests.onnx_builders import build_recurrent, build_two_inputs


def write_config(broker: MosquittoBroker, tmp_path: Path, model: str, **pipeline: Any) -> Path:
    """A config with one pipeline ``vib`` (JSON readings on sensors/+/vib) over ``model``."""
    config = base_config(
        broker,
        tmp_path,
        models={"vib": {"file": model}},
        pipelines={
            "vib": {
                "model": "vib",
                "input": {"topic": "sensors/+/vib", **pipeline.pop("input", {})},
                "output": {"topic": "results/{1}"},
                **pipeline,
            }
        },
    )
    path = tmp_path / "agent.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def publish_retained(broker: MosquittoBroker, readings: dict[str, Any]) -> None:
    """Each reading retained on its own topic, acknowledged by the broker."""
    client = publisher(broker)
    for topic, document in readings.items():
        payload = document if isinstance(document, bytes) else json.dumps(document)
        client.publish(topic, payload, qos=1, retain=True).wait_for_publish(10)
    client.disconnect()
    client.loop_stop()


def capture(config: Path, out: Path, count: int, timeout: float) -> int:
    return main(
        [
            "model",
            "capture",
            "--config",
            str(config),
            "--pipeline",
            "vib",
            "--count",
            str(count),
            "--timeout",
            str(timeout),
            "-o",
            str(out),
        ]
    )


@pytest.mark.broker
def test_capture_keeps_the_readings_that_decode_and_reports_the_bad_one(
    broker: MosquittoBroker, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Nine good readings and one of the wrong shape: asked for ten, the capture writes the
    nine at the timeout, names the bad one and why; `model golden` takes the file as is."""
    build_mlp(tmp_path / "models" / "mlp.onnx")
    config = write_config(broker, tmp_path, "mlp.onnx", input={"field": "x"})
    samples = sample_inputs(9, (FEATURES,))
    readings: dict[str, Any] = {
        f"sensors/d{i}/vib": {"id": i, "x": samples[i].tolist()} for i in range(9)
    }
    readings["sensors/bad/vib"] = {"id": "bad", "x": [1.0, 2.0, 3.0]}
    publish_retained(broker, readings)
    out = tmp_path / "inputs.npz"

    assert capture(config, out, count=10, timeout=3) == 0

    printed = capsys.readouterr().out
    assert "captured 9 readings of pipeline vib (sensors/+/vib" in printed
    assert "skipped 1 that did not decode" in printed
    assert "sensors/bad/vib: input 'x' expects shape [64] per reading" in printed
    assert "10 readings did not arrive in 3 s" in printed
    arrays = read_inputs(out)
    assert set(arrays) == {"input:x"}
    assert arrays["input:x"].shape == (9, FEATURES)
    assert arrays["input:x"].dtype == np.float32
    # Every good reading, once (retained messages come in the broker's order, not ours).
    got = sorted(map(tuple, arrays["input:x"].tolist()))
    assert got == sorted(map(tuple, samples.tolist()))

    golden = tmp_path / "golden.npz"
    model = tmp_path / "models" / "mlp.onnx"
    assert main(["model", "golden", str(model), "--inputs", str(out), "-o", str(golden)]) == 0
    assert parse_golden(golden.read_bytes(), str(golden)).samples == 9


@pytest.mark.broker
def test_capture_stops_at_the_count(
    broker: MosquittoBroker, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Once COUNT readings arrived the capture writes them (a long timeout never runs out)."""
    build_mlp(tmp_path / "models" / "mlp.onnx")
    config = write_config(broker, tmp_path, "mlp.onnx")
    samples = sample_inputs(6, (FEATURES,))
    publish_retained(broker, {f"sensors/d{i}/vib": samples[i].tolist() for i in range(6)})
    out = tmp_path / "inputs.npz"

    assert capture(config, out, count=4, timeout=600) == 0

    assert read_inputs(out)["input:x"].shape == (4, FEATURES)
    printed = capsys.readouterr().out
    assert "captured 4 readings" in printed
    assert "did not arrive" not in printed


@pytest.mark.broker
def test_constants_and_state_become_inputs_of_their_own(
    broker: MosquittoBroker, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A pipeline's constant is repeated per row, so the golden set feeds every input."""
    build_two_inputs(tmp_path / "models" / "two.onnx", features=3)
    config = write_config(
        broker, tmp_path, "two.onnx", input={"tensor": "a"}, constants={"b": [10, 20, 30]}
    )
    publish_retained(broker, {f"sensors/d{i}/vib": [1, 2, i] for i in range(3)})
    out = tmp_path / "inputs.npz"

    assert capture(config, out, count=3, timeout=60) == 0

    arrays = read_inputs(out)
    assert sorted(arrays["input:a"][:, 2].tolist()) == [0, 1, 2]
    np.testing.assert_array_equal(arrays["input:b"], np.tile([10, 20, 30], (3, 1)))
    assert "input:b: the pipeline's constant" in capsys.readouterr().out
    golden = tmp_path / "golden.npz"
    model = tmp_path / "models" / "two.onnx"
    assert main(["model", "golden", str(model), "--inputs", str(out), "-o", str(golden)]) == 0
    expected = parse_golden(golden.read_bytes(), str(golden)).expected
    np.testing.assert_array_equal(expected["sum"], arrays["input:a"] + arrays["input:b"])


@pytest.mark.broker
def test_stream_state_starts_from_zeros(
    broker: MosquittoBroker, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A stateful pipeline's state input gets zeros: what a stream's first reading sees."""
    build_recurrent(tmp_path / "models" / "rnn.onnx", features=4, hidden=3)
    config = write_config(broker, tmp_path, "rnn.onnx", state={"inputs": {"h": "h_out"}})
    publish_retained(broker, {f"sensors/d{i}/vib": [i, 0, 0, 1] for i in range(2)})
    out = tmp_path / "inputs.npz"

    assert capture(config, out, count=2, timeout=60) == 0

    arrays = read_inputs(out)
    assert arrays["input:x"].shape == (2, 4)
    np.testing.assert_array_equal(arrays["input:h"], np.zeros((2, 3), np.float32))
    assert "input:h: stream state: zeros" in capsys.readouterr().out


@pytest.mark.broker
def test_nothing_arrived(
    broker: MosquittoBroker, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """No reading in the time allowed: exit 1, no file."""
    build_mlp(tmp_path / "models" / "mlp.onnx")
    config = write_config(broker, tmp_path, "mlp.onnx")
    out = tmp_path / "inputs.npz"

    assert capture(config, out, count=5, timeout=0.5) == 1

    assert "no reading of pipeline vib (sensors/+/vib" in capsys.readouterr().err
    assert not out.exists()


def test_an_unknown_pipeline_is_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A pipeline the config lacks: exit 1 naming the ones it has (no broker needed)."""
    config = tmp_path / "agent.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "device_id": "d",
                "models_dir": str(tmp_path),
                "state_dir": str(tmp_path / "state"),
                "models": {"m": {}},
                "pipelines": {
                    "other": {"model": "m", "input": {"topic": "a/#"}, "output": {"topic": "r"}}
                },
            }
        )
    )
    out = tmp_path / "inputs.npz"

    assert capture(config, out, count=1, timeout=1) == 1

    assert "has no pipeline 'vib' (it has other)" in capsys.readouterr().err
