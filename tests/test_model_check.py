"""``edge-agent model check`` on real models: an IsolationForest (skl2onnx), an MLP and a
1-D CNN, loaded by the daemon's own session code, with golden sets, configs whose pipelines
do and do not fit, ``require_providers`` and a corrupt file."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
import yaml

from agent.cli.main import main
from agent.cli.model_check import render
from agent.hardware.providers import TENSORRT, ProviderChoice, ProviderPlan
from agent.inference.golden import GoldenSet, golden_path_for
from agent.modeltools.check import engine_build_note, engine_build_summary
from tests import model_zoo

REPO = Path(__file__).resolve().parent.parent
CHECK_KEYS = {
    "model",
    "providers",
    "session",
    "engine_build",
    "placement",
    "placement_problem",
    "inputs",
    "outputs",
    "pipelines",
    "warmup_ms",
    "golden",
    "require_providers",
    "refusal",
    "would_serve",
    "passed",
    "problems",
    "warnings",
}
AZURE = "AzureExecutionProvider"
CPU = "CPUExecutionProvider"
# Each zoo model, the per-reading shape of its input, and its input's name.
ZOO: dict[str, tuple[Callable[[Path], Path], tuple[int, ...], str]] = {
    "iforest": (model_zoo.build_iforest, (model_zoo.FEATURES,), "X"),
    "mlp": (model_zoo.build_mlp, (model_zoo.FEATURES,), "x"),
    "cnn": (model_zoo.build_cnn1d, (1, model_zoo.CNN_SAMPLES), "x"),
}


@pytest.fixture(scope="module")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The three models, built once for the module, each in a folder of its own."""
    root = tmp_path_factory.mktemp("zoo")
    return {name: build(root / name / f"{name}.onnx") for name, (build, _, _) in ZOO.items()}


def write_config(tmp_path: Path, **settings: Any) -> Path:
    """A config file with its state in ``tmp_path`` (nothing touches /var/lib)."""
    document = {
        "device_id": "bench-01",
        "state_dir": str(tmp_path / "state"),
        "models_dir": str(tmp_path / "models"),
        **settings,
    }
    path = tmp_path / "agent.yaml"
    path.write_text(yaml.safe_dump(document))
    return path


def write_golden(model: Path, input_name: str, shape: tuple[int, ...], target: Path) -> Path:
    """A golden set of 12 samples whose expected outputs are ``model``'s own, on the CPU."""
    samples = model_zoo.sample_inputs(12, shape)
    session = ort.InferenceSession(str(model), providers=[CPU])
    names = [output.name for output in session.get_outputs()]
    outputs = session.run(None, {input_name: samples})
    golden = GoldenSet(
        inputs={input_name: samples},
        expected={name: np.asarray(value) for name, value in zip(names, outputs, strict=True)},
    )
    target.write_bytes(golden.to_bytes())
    return target


def check(
    capsys: pytest.CaptureFixture[str], *args: str | Path, as_json: bool = True
) -> tuple[int, Any, str]:
    """Run ``edge-agent model check`` in-process: exit code, report (parsed when JSON), stderr."""
    argv = ["model", "check", *(str(arg) for arg in args)]
    code = main([*argv, "--json"] if as_json else argv)
    captured = capsys.readouterr()
    return code, json.loads(captured.out) if as_json else captured.out, captured.err


@pytest.mark.parametrize("name", sorted(ZOO))
def test_check_reports_what_the_daemon_would_do(
    name: str, zoo: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Every key is there, the model loads on the CPU, its input is described, exit 0."""
    config = write_config(tmp_path)
    code, report, _ = check(capsys, zoo[name], "--config", config)
    assert code == 0, report["problems"]
    assert set(report) >= CHECK_KEYS
    assert report["model"]["name"] == name
    assert report["model"]["configured"] is False
    assert report["model"]["version"].startswith("sha256:")
    assert report["model"]["size_bytes"] == zoo[name].stat().st_size
    assert report["providers"]["requested"][-1]["name"] == CPU
    assert report["providers"]["requested"][-1]["reason"]
    assert report["providers"]["loaded"] == [CPU]
    assert report["providers"]["missing"] == []
    assert report["placement"]["nodes"][CPU] >= 1
    assert report["placement"]["fallback_nodes"] == 0
    _, shape, input_name = ZOO[name]
    assert report["inputs"][0]["name"] == input_name
    assert report["inputs"][0]["dtype"] == "float32"
    assert report["inputs"][0]["shape"][1:] == list(shape)
    assert report["inputs"][0]["batch_axis"] is True
    assert all(output["dtype"] for output in report["outputs"])
    assert report["pipelines"] == []
    assert isinstance(report["warmup_ms"], float)
    assert report["engine_build"] == {"first_build": False, "cache": None}
    assert report["golden"] is None
    assert report["require_providers"] is False
    assert (report["would_serve"], report["passed"], report["problems"]) == (True, True, [])


@pytest.mark.parametrize("name", sorted(ZOO))
def test_a_golden_set_of_matching_outputs_passes(
    name: str, zoo: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The golden comparison runs every sample with the serving providers and passes."""
    _, shape, input_name = ZOO[name]
    golden = write_golden(zoo[name], input_name, shape, tmp_path / "g.npz")
    code, report, _ = check(
        capsys, zoo[name], "--golden", golden, "--config", write_config(tmp_path)
    )
    assert code == 0, report["problems"]
    assert report["golden"]["passed"] is True
    assert report["golden"]["samples"] == 12
    assert report["golden"]["source"] == "--golden"
    assert report["golden"]["providers"] == [CPU]
    assert report["golden"]["latency_ms"]["p50"] is not None
    assert report["passed"] is True


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_a_perturbed_model_fails_its_golden_set(
    name: str, zoo: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A copy with nudged weights would load and serve, but its outputs are off: exit 1,
    with the output named, in the JSON and in the text."""
    _, shape, input_name = ZOO[name]
    golden = write_golden(zoo[name], input_name, shape, tmp_path / "g.npz")
    bad = model_zoo.perturbed(zoo[name], tmp_path / "bad" / f"{name}.onnx", scale=0.05)
    config = write_config(tmp_path)
    code, report, _ = check(capsys, bad, "--golden", golden, "--config", config)
    assert code == 1
    assert report["would_serve"] is True
    assert report["passed"] is False
    assert report["golden"]["passed"] is False
    assert any("'y'" in problem for problem in report["golden"]["problems"])
    assert any("golden set" in p and "'y'" in p for p in report["problems"])
    code, text, _ = check(capsys, bad, "--golden", golden, "--config", config, as_json=False)
    assert code == 1
    assert "FAIL: the daemon would serve it, but the golden set fails" in text
    assert "'y'" in text


def test_the_golden_set_beside_the_model_is_checked_as_the_daemon_would(
    zoo: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Without --golden, MODEL.golden.npz beside the file is compared (the daemon would)."""
    model = model_zoo.perturbed(zoo["mlp"], tmp_path / "m" / "mlp.onnx", scale=0.05)
    write_golden(zoo["mlp"], "x", (model_zoo.FEATURES,), golden_path_for(model))
    code, report, _ = check(capsys, model, "--config", write_config(tmp_path))
    assert code == 1
    assert report["golden"]["file"] == str(golden_path_for(model))
    assert report["golden"]["source"].startswith("beside the model")
    assert report["golden"]["passed"] is False


def test_an_unusable_golden_file_is_a_failure_naming_it(
    zoo: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    broken = tmp_path / "broken.npz"
    broken.write_bytes(b"PK\x03\x04 not really a zip")
    code, report, _ = check(
        capsys, zoo["mlp"], "--golden", broken, "--config", write_config(tmp_path)
    )
    assert code == 1
    assert report["would_serve"] is True
    assert report["golden"]["passed"] is False
    assert str(broken) in report["golden"]["problems"][0]


def pipeline(name: str, model: str, shape: list[int] | None = None) -> dict[str, Any]:
    """A pipeline section feeding ``model`` readings of ``shape``."""
    section: dict[str, Any] = {"model": model, "input": {"topic": f"sensors/+/{name}"}}
    if shape is not None:
        section["input"]["shape"] = shape
    section["output"] = {"topic": f"results/{{1}}/{name}"}
    return section


def test_pipelines_that_do_not_fit_are_listed_with_the_reason(
    zoo: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A pipeline of this model with the wrong input.shape keeps it from serving (exit 1);
    pipelines of other models are listed, fitting or not, without deciding anything."""
    models = tmp_path / "models"
    models.mkdir()
    model = models / "vib.onnx"
    model.write_bytes(zoo["mlp"].read_bytes())
    config = write_config(
        tmp_path,
        models={"vib": {"file": "vib.onnx"}, "other": {"file": "other.onnx"}},
        pipelines={
            "vibration": pipeline("vibration", "vib", [32]),
            "elsewhere": pipeline("elsewhere", "other", [5, 5]),
            "fine": pipeline("fine", "other", [model_zoo.FEATURES]),
        },
    )
    code, report, _ = check(capsys, model, "--config", config)
    assert code == 1
    assert report["model"]["name"] == "vib"
    assert report["model"]["configured"] is True
    rows = {row["name"]: row for row in report["pipelines"]}
    assert rows["vibration"]["uses_model"] is True
    assert rows["vibration"]["fits"] is False
    assert "expects [64] per reading" in rows["vibration"]["problems"][0]
    elsewhere = rows["elsewhere"]
    assert (elsewhere["model"], elsewhere["uses_model"], elsewhere["fits"]) == (
        "other",
        False,
        False,
    )
    assert "rank" in elsewhere["problems"][0]
    assert rows["fine"]["fits"] is True
    assert report["would_serve"] is False
    assert report["problems"] == rows["vibration"]["problems"]
    # The model itself was still loaded and described.
    assert report["inputs"][0]["name"] == "x"
    assert report["providers"]["loaded"] == [CPU]

    code, text, _ = check(capsys, model, "--config", config, as_json=False)
    assert code == 1
    assert "vibration (uses it): does not fit" in text
    assert "fine (uses model other): fits" in text

    # As a model the config does not name, no pipeline uses it: it would serve.
    loose = tmp_path / "loose.onnx"
    loose.write_bytes(zoo["mlp"].read_bytes())
    code, report, _ = check(capsys, loose, "--config", config)
    assert code == 0, report["problems"]
    assert not any(row["uses_model"] for row in report["pipelines"])


def test_an_unknown_model_name_is_a_usage_error(
    zoo: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(
        [
            "model",
            "check",
            str(zoo["mlp"]),
            "--model",
            "nope",
            "--config",
            str(write_config(tmp_path)),
        ]
    )
    assert code == 2
    assert "--model nope: the config has no such model" in capsys.readouterr().err


@pytest.mark.skipif(
    AZURE not in ort.get_available_providers(), reason="this onnxruntime has no Azure provider"
)
@pytest.mark.parametrize("name", ["mlp", "iforest"])
def test_all_nodes_refuses_a_model_whose_nodes_fell_back(
    name: str, zoo: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The Azure provider loads but runs no node: every node falls back to the CPU, which
    ``all_nodes`` refuses and ``true`` accepts (the providers did load)."""
    strict = write_config(tmp_path, require_providers="all_nodes")
    code, report, _ = check(capsys, zoo[name], "--providers", AZURE, CPU, "--config", strict)
    assert code == 1
    assert report["providers"]["loaded"] == [AZURE, CPU]
    assert report["providers"]["requested"][0]["reason"] == "requested with --providers"
    placement = report["placement"]
    assert placement["fallback_nodes"] == placement["nodes"][CPU] > 0
    assert placement["fallback"]
    assert all(node.endswith(")") for node in placement["fallback"])
    assert report["would_serve"] is False
    assert "fell back" in report["refusal"]
    assert "all_nodes" in report["refusal"]
    assert report["refusal"] in report["problems"]

    code, text, _ = check(
        capsys, zoo[name], "--providers", AZURE, CPU, "--config", strict, as_json=False
    )
    assert code == 1
    assert "node(s) fell back to the CPU:" in text

    lenient = tmp_path / "lenient"
    lenient.mkdir()
    config = write_config(lenient, require_providers=True)
    code, report, _ = check(capsys, zoo[name], "--providers", AZURE, CPU, "--config", config)
    assert code == 0, report["problems"]
    assert report["would_serve"] is True
    assert report["placement"]["fallback_nodes"] > 0
    assert any("fell back" in warning for warning in report["warnings"])


def test_a_provider_that_does_not_load_is_refused_under_require_providers(
    zoo: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A provider this onnxruntime does not offer: missing; served degraded unless refused."""
    absent = next(p for p in ort.get_all_providers() if p not in ort.get_available_providers())
    config = write_config(tmp_path, require_providers=True)
    code, report, _ = check(capsys, zoo["mlp"], "--providers", absent, CPU, "--config", config)
    assert code == 1
    assert report["providers"]["missing"] == [absent]
    assert "did not load" in report["refusal"]
    lenient = tmp_path / "lenient"
    lenient.mkdir()
    code, report, _ = check(
        capsys, zoo["mlp"], "--providers", absent, CPU, "--config", write_config(lenient)
    )
    assert code == 0
    assert any("degraded" in warning for warning in report["warnings"])


def test_a_corrupt_model_is_reported_as_not_loading(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(b"\x08\x07 this is not a protobuf of a model" * 10)
    config = write_config(tmp_path)
    code, report, _ = check(capsys, corrupt, "--config", config)
    assert code == 1
    assert report["would_serve"] is False
    assert report["passed"] is False
    assert report["inputs"] is None
    assert report["model"]["size_bytes"] == corrupt.stat().st_size
    assert len(report["problems"]) == 1
    assert str(corrupt) in report["problems"][0]
    assert "does not load" in report["problems"][0]
    assert "not an ONNX model" in report["problems"][0]
    code, text, _ = check(capsys, corrupt, "--config", config, as_json=False)
    assert code == 1
    assert "not an ONNX model" in text
    assert "FAIL: the daemon would not serve it" in text


def test_a_missing_file_is_a_failure_naming_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "nowhere.onnx"
    code = main(["model", "check", str(missing), "--config", str(write_config(tmp_path))])
    assert code == 1
    assert f"cannot read {missing}" in capsys.readouterr().err


def test_the_command_line_prints_a_readable_report(zoo: dict[str, Path], tmp_path: Path) -> None:
    """A real ``edge-agent`` process: the text block on stdout, nothing on stderr, exit 0."""
    golden = write_golden(zoo["mlp"], "x", (model_zoo.FEATURES,), tmp_path / "g.npz")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "agent",
            "model",
            "check",
            str(zoo["mlp"]),
            "--golden",
            str(golden),
            "--config",
            str(write_config(tmp_path)),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stderr == ""
    labels = [
        line.split()[0] for line in done.stdout.splitlines() if line and not line[0].isspace()
    ]
    assert labels == [
        "model",
        "providers",
        "session",
        "placement",
        "inputs",
        "outputs",
        "pipelines",
        "warm-up",
        "golden",
        "verdict",
    ]
    assert "passed: 12 samples" in done.stdout
    assert "PASS: the daemon would serve it (require_providers: false)" in done.stdout


def test_a_first_tensorrt_engine_build_is_announced(
    zoo: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """TensorRT requested with an empty engine cache: the report says the first run builds
    the engine and where it goes (no TensorRT here: the plan is made up, the rendering real)."""
    cache = tmp_path / "trt-cache"
    plan = ProviderPlan(
        chosen=(
            ProviderChoice(TENSORRT, {"trt_engine_cache_path": str(cache)}, "test"),
            ProviderChoice(CPU, {}, "test"),
        ),
        skipped=(),
        intra_op_num_threads=1,
        allow_spinning=False,
    )
    assert engine_build_summary(plan) == {"first_build": True, "cache": str(cache)}
    assert str(cache) in engine_build_note(str(cache))
    cache.mkdir()
    (cache / "model_fp16.engine").write_bytes(b"built")
    assert engine_build_summary(plan) == {"first_build": False, "cache": None}

    _, report, _ = check(capsys, zoo["mlp"], "--config", write_config(tmp_path))
    report["engine_build"] = {"first_build": True, "cache": str(cache)}
    assert f"tensorrt    the first run builds the engine; cache {cache}" in render(report)
