"""`edge-agent model quantize`: dynamic int8 quantization of real models (the
IsolationForest, an MLP, a 1-D CNN, a scikit-learn classifier), the side-by-side report, and
the golden set's verdict on whether OUT is written. No timing thresholds: the figures are
checked for presence and form, the sizes (deterministic) for direction."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
import yaml

from agent.cli.main import main
from agent.errors import ModelLoadError
from agent.modeltools import quantize
from agent.modeltools.reference import npz_bytes
from tests.model_zoo import (
    CNN_SAMPLES,
    FEATURES,
    build_cnn1d,
    build_iforest,
    build_mlp,
    build_mlp_classifier,
    sample_inputs,
)

BUILDERS: dict[str, tuple[Callable[[Path], Path], str, tuple[int, ...]]] = {
    "iforest": (build_iforest, "X", (FEATURES,)),
    "mlp": (build_mlp, "x", (FEATURES,)),
    "cnn": (build_cnn1d, "x", (1, CNN_SAMPLES)),
}


@pytest.fixture(autouse=True)
def short_timing(monkeypatch: pytest.MonkeyPatch) -> None:
    """The timing runs take a fraction of the default second: the tests check the report,
    not the speed."""
    monkeypatch.setattr(quantize, "TIMING_S", 0.05)


def write_config(tmp_path: Path, **extra: Any) -> Path:
    """A device config with its folders in ``tmp_path``."""
    (tmp_path / "models").mkdir(exist_ok=True)
    config = {
        "device_id": "bench",
        "models_dir": str(tmp_path / "models"),
        "state_dir": str(tmp_path / "state"),
        **extra,
    }
    path = tmp_path / "agent.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def build(kind: str, folder: Path) -> tuple[Path, str, tuple[int, ...]]:
    builder, name, shape = BUILDERS[kind]
    folder.mkdir(parents=True, exist_ok=True)
    return builder(folder / f"{kind}.onnx"), name, shape


def make_golden(model: Path, name: str, shape: tuple[int, ...], *tolerances: str) -> Path:
    """A golden set of 30 samples from ``model`` itself, with the given tolerance options."""
    inputs = model.with_name("inputs.npz")
    inputs.write_bytes(npz_bytes({f"input:{name}": sample_inputs(30, shape)}))
    out = model.with_name(f"{model.stem}.golden.npz")
    assert (
        main(["model", "golden", str(model), "--inputs", str(inputs), "-o", str(out), *tolerances])
        == 0
    )
    inputs.unlink()
    return out


def quantize_cli(model: Path, out: Path, config: Path, *options: str | Path) -> int:
    return main(
        [
            "model",
            "quantize",
            str(model),
            "-o",
            str(out),
            "--config",
            str(config),
            *map(str, options),
        ]
    )


def files_in(folder: Path) -> set[str]:
    return {path.name for path in folder.iterdir()}


@pytest.mark.parametrize("kind", ["iforest", "mlp", "cnn"])
def test_json_report_fields(kind: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Without --golden: OUT is written, agreement is measured against the fp32 model on
    synthetic inputs and reported as such, both sides have size, providers and p50 at batch
    1 and 32; nothing but OUT is left in its folder."""
    config = write_config(tmp_path)
    model, _, _ = build(kind, tmp_path / "models")
    out = tmp_path / "out" / f"{kind}.int8.onnx"
    out.parent.mkdir()

    # A tree ensemble has nothing to quantize: written only with --force (see below).
    forced = ["--force"] if kind == "iforest" else []
    assert quantize_cli(model, out, config, "--json", *forced) == 0

    report = json.loads(capsys.readouterr().out)
    assert report["written"] is True
    assert report["passed"] is None
    assert report["agreement_on"] == "synthetic"
    assert report["golden"] is None
    assert report["batch_sizes"] == [1, 32]
    assert report["quantization"]["method"] == "dynamic"
    if report["quantization"]["weight_type"] != "QInt8":  # onnxruntime 1.17 on the CNN
        assert kind == "cnn"
        assert report["quantization"]["weight_type"] == "QUInt8"
        assert "ConvInteger" in report["quantization"]["weight_note"]
    assert report["quantization"]["preprocessed"] is True
    for side in ("fp32", "int8"):
        figures = report[side]
        assert figures["size_bytes"] > 0
        assert figures["providers"] == ["CPUExecutionProvider"]
        assert set(figures["p50_ms"]) == {"1", "32"}
        assert all(value > 0 for value in figures["p50_ms"].values())
    assert report["fp32"]["validation"] is None  # the reference itself
    agreement = report["int8"]["validation"]
    assert agreement["samples"] == quantize.SYNTHETIC_SAMPLES
    assert agreement["max_abs_err"] is not None
    assert report["ratios"]["size"] == pytest.approx(
        report["fp32"]["size_bytes"] / report["int8"]["size_bytes"], rel=1e-3
    )
    assert set(report["ratios"]["speed"]) == {"1", "32"}
    assert out.stat().st_size == report["int8"]["size_bytes"]
    assert files_in(out.parent) == {out.name}
    ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    nodes = report["quantization"]["quantized_nodes"]
    if kind == "iforest":
        assert nodes == {}  # tree ensembles have nothing quantize_dynamic converts
    else:
        assert nodes.get("MatMulInteger", 0) >= 1


def test_cnn_text_report_has_size_and_speed_ratios(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The 1-D CNN: its convolutions become ConvInteger, the file shrinks (int8 weights),
    and the report shows size and speed ratios per batch size."""
    config = write_config(tmp_path)
    model, _, _ = build("cnn", tmp_path / "models")
    out = tmp_path / "cnn.int8.onnx"

    assert quantize_cli(model, out, config, "--batch", "8") == 0

    printed = capsys.readouterr().out
    assert "ConvInteger 3" in printed
    rows = {line.split()[0]: line.split() for line in printed.splitlines() if line.startswith("  ")}
    size = rows["size"]  # size  224503 B  59982 B  3.74x
    assert size[-1].endswith("x")
    assert float(size[-1].rstrip("x")) > 3  # 4-byte float weights become 1-byte ones
    speeds = [line.split() for line in printed.splitlines() if line.startswith("  p50 batch")]
    assert [row[2] for row in speeds] == ["1", "8"]
    for row in speeds:  # p50 batch 8  1.234 ms  0.567 ms  2.18x
        assert row[-1].endswith("x")
        assert float(row[-1].rstrip("x")) > 0
    assert "synthetic (random) inputs" in printed
    assert f"written: {out}" in printed


def test_tight_threshold_refuses_and_force_writes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A golden set with atol 1e-9 and rtol 0 cannot be met by int8 arithmetic: exit 1,
    OUT not written, the failed threshold named, no temporary file left; --force writes it."""
    config = write_config(tmp_path)
    model, name, shape = build("cnn", tmp_path / "models")
    golden = make_golden(model, name, shape, "--atol", "1e-9", "--rtol", "0")
    out = tmp_path / "out" / "cnn.int8.onnx"
    out.parent.mkdir()
    capsys.readouterr()

    assert quantize_cli(model, out, config, "--golden", golden, "--json") == 1

    captured = capsys.readouterr()
    report = json.loads(captured.out)
    assert report["written"] is False
    assert report["passed"] is False
    assert "out of tolerance" in report["reason"]
    assert "atol 1e-09 + rtol 0" in captured.err
    assert "not written" in captured.err
    assert "--force" in captured.err
    assert report["fp32"]["validation"]["passed"] is True  # its own outputs: exact
    assert report["int8"]["validation"]["passed"] is False
    assert not out.exists()
    assert files_in(out.parent) == set()
    # A file already at OUT (an earlier int8 model) is left as it was.
    out.write_bytes(b"earlier")
    assert quantize_cli(model, out, config, "--golden", golden) == 1
    assert "(the file there is left as it was)" in capsys.readouterr().err
    assert out.read_bytes() == b"earlier"
    assert files_in(out.parent) == {out.name}

    assert quantize_cli(model, out, config, "--golden", golden, "--force", "--json") == 0

    report = json.loads(capsys.readouterr().out)
    assert report["written"] is True
    assert report["forced"] is True
    assert report["passed"] is False
    assert files_in(out.parent) == {out.name}
    ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize(
    ("kind", "tolerances"),
    [("mlp", ("--atol", "1")), ("cnn", ("--atol", "1"))],
)
def test_loose_threshold_writes_a_model_that_loads(
    kind: str, tolerances: tuple[str, ...], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A threshold int8 meets (atol 1): OUT is written and onnxruntime loads it."""
    config = write_config(tmp_path)
    model, name, shape = build(kind, tmp_path / "models")
    golden = make_golden(model, name, shape, *tolerances)
    out = tmp_path / f"{kind}.int8.onnx"
    capsys.readouterr()

    assert quantize_cli(model, out, config, "--golden", golden) == 0

    printed = capsys.readouterr().out
    assert f"agreement on {golden} (30 samples" in printed
    assert "int8  max abs err" in printed
    assert f"written: {out}" in printed
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    feeds = {name: sample_inputs(2, shape)}
    assert session.run(None, feeds)[0].shape[0] == 2


def test_classifier_top1_threshold(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A classifier's golden set with --top1 0.5: labels and probabilities are judged by
    top-1 agreement, which int8 keeps; the report shows it."""
    config = write_config(tmp_path)
    model = build_mlp_classifier(tmp_path / "models" / "clf.onnx")
    golden = make_golden(model, "X", (8,), "--top1", "0.5")
    out = tmp_path / "clf.int8.onnx"
    capsys.readouterr()

    assert quantize_cli(model, out, config, "--golden", golden, "--json") == 0

    report = json.loads(capsys.readouterr().out)
    assert report["passed"] is True
    assert report["int8"]["validation"]["top1_agreement"] >= 0.5
    assert out.exists()


def test_the_pipeline_batch_size_comes_from_the_config(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Without --batch the larger batch is the max_batch of the pipeline using the model."""
    model, _, _ = build("mlp", tmp_path / "models")
    config = write_config(
        tmp_path,
        models={"vib": {"file": model.name}},
        pipelines={
            "vib": {
                "model": "vib",
                "input": {"topic": "sensors/+/vib"},
                "output": {"topic": "results/{1}"},
                "batching": {"max_batch": 4},
            }
        },
    )

    assert quantize_cli(model, tmp_path / "mlp.int8.onnx", config, "--json") == 0

    assert json.loads(capsys.readouterr().out)["batch_sizes"] == [1, 4]


def test_nothing_to_quantize_is_refused_unless_forced(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A model with no node dynamic quantization converts (an IsolationForest) would give a
    larger copy of itself: refused with the reason, exit 1, nothing written or left."""
    config = write_config(tmp_path)
    model, _, _ = build("iforest", tmp_path / "models")
    out = tmp_path / "out" / "iforest.int8.onnx"
    out.parent.mkdir()

    assert quantize_cli(model, out, config) == 1

    assert capsys.readouterr().err == (
        f"edge-agent model quantize: {out} not written: {model} has nothing dynamic "
        "quantization converts (MatMul, Gemm, Conv, Attention, LSTM...), so the int8 file "
        "would be the same model, larger; serve the original (--force writes it anyway)\n"
    )
    assert files_in(out.parent) == set()


def test_the_install_hint_names_the_quantize_extras_packages() -> None:
    """The hint installs the packages themselves into this Python, as pyproject's quantize
    extra lists them (a distribution name with an extra could reach another PyPI project)."""
    extra = sorted(
        requirement.split(";")[0].strip().replace(" ", "")
        for requirement in importlib.metadata.requires("edge-agent-onnx") or []
        if 'extra == "quantize"' in requirement
    )
    assert extra == sorted(quantize.QUANTIZE_REQUIREMENTS)


def test_failed_preprocessing_falls_back_to_the_original(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """When onnxruntime's pre-processing fails, the original is quantized and the report
    says why."""
    from onnxruntime import quantization  # noqa: PLC0415

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("symbolic shape inference failed on node 'odd'")

    monkeypatch.setattr(quantization, "quant_pre_process", broken)
    config = write_config(tmp_path)
    model, _, _ = build("mlp", tmp_path / "models")
    out = tmp_path / "out" / "mlp.int8.onnx"
    out.parent.mkdir()

    assert quantize_cli(model, out, config, "--json") == 0

    quantization_report = json.loads(capsys.readouterr().out)["quantization"]
    assert quantization_report["preprocessed"] is False
    assert "symbolic shape inference failed on node 'odd'" in quantization_report["preprocess_note"]
    assert quantization_report["quantized_nodes"] == {"MatMulInteger": 3}
    assert files_in(out.parent) == {out.name}


def test_missing_onnx_names_the_extra(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """onnxruntime.quantization needs onnx, not a runtime dependency: a clear message."""
    real = importlib.util.find_spec

    def without_onnx(name: str, *args: Any) -> Any:
        return None if name == "onnx" else real(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", without_onnx)
    config = write_config(tmp_path)
    model, _, _ = build("mlp", tmp_path / "models")
    out = tmp_path / "out" / "mlp.int8.onnx"
    out.parent.mkdir()

    assert quantize_cli(model, out, config) == 1

    assert f"{sys.executable} -m pip install 'onnx>=1.15' 'sympy>=1.12'" in (
        capsys.readouterr().err
    )
    assert files_in(out.parent) == set()


def test_out_must_differ_from_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = write_config(tmp_path)
    model, _, _ = build("mlp", tmp_path / "models")
    before = model.read_bytes()

    assert quantize_cli(model, model, config) == 1

    assert "OUT is MODEL" in capsys.readouterr().err
    assert model.read_bytes() == before


def test_a_golden_set_for_other_inputs_is_reported(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A golden set that does not fit the model cannot pass: OUT is not written and the
    reason names the input."""
    config = write_config(tmp_path)
    model, _, _ = build("mlp", tmp_path / "models")
    other = build_mlp_classifier(tmp_path / "clf.onnx")
    golden = make_golden(other, "X", (8,))
    out = tmp_path / "mlp.int8.onnx"
    capsys.readouterr()

    assert quantize_cli(model, out, config, "--golden", golden) == 1

    assert "the golden set has no input:x" in capsys.readouterr().err
    assert not out.exists()
    assert not np.any([p.name.startswith(".mlp.int8.onnx") for p in tmp_path.iterdir()])


def test_uint8_weights_where_onnxruntime_lacks_the_int8_kernel(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """onnxruntime 1.17 has ConvInteger for uint8 weights only and refuses the int8 CNN
    (the refusal is played here on newer versions): the model is quantized again with uint8
    weights, the report says why, and OUT loads."""
    from agent.modeltools.common import open_model  # noqa: PLC0415

    refused: list[Path] = []

    def old_onnxruntime(tool: Any, *args: Any, **kwargs: Any) -> Any:
        if tool.path.name.startswith(".") and not refused:
            refused.append(tool.path)
            raise ModelLoadError(
                "onnxruntime could not load the model: [ONNXRuntimeError] : 9 : NOT_IMPLEMENTED"
                " : Could not find an implementation for ConvInteger(10) node with name ''"
            )
        return open_model(tool, *args, **kwargs)

    monkeypatch.setattr("agent.cli.model_quantize.open_model", old_onnxruntime)
    config = write_config(tmp_path)
    model, _, _ = build("cnn", tmp_path / "models")
    out = tmp_path / "out" / "cnn.int8.onnx"
    out.parent.mkdir()

    assert quantize_cli(model, out, config) == 0

    printed = capsys.readouterr().out
    assert refused
    assert "dynamic, uint8 weights" in printed
    assert "Could not find an implementation for ConvInteger(10)" in printed
    assert "quantized with uint8 weights instead" in printed
    assert files_in(out.parent) == {out.name}
    ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
