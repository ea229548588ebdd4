"""`edge-agent model golden`: a golden set's expected outputs from a reference run, on real
models (an MLP, a scikit-learn classifier, a 1-D CNN) and captured-style sample inputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from agent.cli.main import main
from agent.inference.golden import MAX_GOLDEN_BYTES, parse_golden
from agent.modeltools.reference import npz_bytes
from tests.model_zoo import (
    CNN_SAMPLES,
    FEATURES,
    build_cnn1d,
    build_mlp,
    build_mlp_classifier,
    perturbed,
    sample_inputs,
)


def plain_run(model: Path, name: str, samples: np.ndarray) -> list[np.ndarray]:
    """Each output of ``model`` for every sample, one sample per run, stacked."""
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    runs = [session.run(None, {name: samples[i : i + 1]}) for i in range(len(samples))]
    return [np.concatenate([run[k] for run in runs]) for k in range(len(runs[0]))]


def write_inputs(path: Path, **arrays: np.ndarray) -> Path:
    """An INPUTS.npz as `model capture` writes it (keys given as they are)."""
    path.write_bytes(npz_bytes(arrays))
    return path


def golden(argv: list[str | Path]) -> int:
    return main(["model", "golden", *map(str, argv)])


def test_mlp_golden_set_holds_a_plain_reference_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The expected outputs are a plain CPU onnxruntime run, sample by sample; the file
    parses as a golden set with the default tolerances; the summary says what it holds."""
    model = build_mlp(tmp_path / "mlp.onnx")
    samples = sample_inputs(50, (FEATURES,))
    inputs = write_inputs(tmp_path / "inputs.npz", **{"input:x": samples})
    out = tmp_path / "mlp.golden.npz"

    assert golden([model, "--inputs", inputs, "-o", out]) == 0

    parsed = parse_golden(out.read_bytes(), str(out))
    assert parsed.samples == 50
    np.testing.assert_array_equal(parsed.inputs["x"], samples)
    np.testing.assert_array_equal(parsed.expected["y"], plain_run(model, "x", samples)[0])
    assert (parsed.tolerances.rtol, parsed.tolerances.atol) == (1e-3, 1e-5)
    assert parsed.tolerances.top1_agreement is None
    printed = capsys.readouterr().out
    assert "50 samples" in printed
    assert "y [50, 8] float32" in printed
    assert "CPUExecutionProvider" in printed


def test_classifier_golden_set_with_top1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A scikit-learn classifier: labels and probabilities are expected, --top1 and the
    tolerances given travel in the file."""
    model = build_mlp_classifier(tmp_path / "clf.onnx")
    samples = sample_inputs(40, (8,))
    inputs = write_inputs(tmp_path / "inputs.npz", **{"input:X": samples})
    out = tmp_path / "clf.golden.npz"

    code = golden(
        [model, "--inputs", inputs, "-o", out, "--top1", "0.99", "--rtol", "0.01", "--atol", "0"]
    )

    assert code == 0, capsys.readouterr().err
    parsed = parse_golden(out.read_bytes(), str(out))
    labels, probabilities = plain_run(model, "X", samples)
    np.testing.assert_array_equal(parsed.expected["label"], labels)
    np.testing.assert_array_equal(parsed.expected["probabilities"], probabilities)
    assert parsed.tolerances.top1_agreement == 0.99
    assert (parsed.tolerances.rtol, parsed.tolerances.atol) == (0.01, 0.0)


def test_reference_model_gives_the_expected_outputs(tmp_path: Path) -> None:
    """--reference: the expected outputs are the reference's (here a perturbed copy), not
    the model's own."""
    model = build_mlp(tmp_path / "mlp.onnx")
    reference = perturbed(model, tmp_path / "reference.onnx", scale=0.05)
    samples = sample_inputs(20, (FEATURES,))
    inputs = write_inputs(tmp_path / "inputs.npz", **{"input:x": samples})
    out = tmp_path / "g.npz"

    assert golden([model, "--inputs", inputs, "--reference", reference, "-o", out]) == 0

    expected = parse_golden(out.read_bytes(), str(out)).expected["y"]
    np.testing.assert_array_equal(expected, plain_run(reference, "x", samples)[0])
    assert not np.allclose(expected, plain_run(model, "x", samples)[0], rtol=1e-3, atol=1e-5)


def test_reference_with_other_inputs_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A reference that takes other inputs cannot judge the model: exit 1, naming them."""
    model = build_mlp(tmp_path / "mlp.onnx")
    reference = build_mlp_classifier(tmp_path / "clf.onnx")
    inputs = write_inputs(tmp_path / "inputs.npz", x=sample_inputs(5, (FEATURES,)))
    out = tmp_path / "g.npz"

    assert golden([model, "--inputs", inputs, "--reference", reference, "-o", out]) == 1

    err = capsys.readouterr().err
    assert "does not take the same inputs" in err
    assert "'X'" in err
    assert "'x'" in err
    assert not out.exists()


def test_bare_keys_are_accepted(tmp_path: Path) -> None:
    """INPUTS.npz may name the inputs without the input: prefix (np.savez(x=...))."""
    model = build_cnn1d(tmp_path / "cnn.onnx", channels=8)
    samples = sample_inputs(10, (1, CNN_SAMPLES))
    inputs = tmp_path / "inputs.npz"
    np.savez(inputs, x=samples)
    out = tmp_path / "g.npz"

    assert golden([model, "--inputs", inputs, "-o", out]) == 0

    parsed = parse_golden(out.read_bytes(), str(out))
    np.testing.assert_array_equal(parsed.expected["y"], plain_run(model, "x", samples)[0])


def test_a_golden_set_serves_as_inputs(tmp_path: Path) -> None:
    """A golden set's own expected arrays and tolerances are skipped: re-making a set from
    another reference works on the old file."""
    model = build_mlp(tmp_path / "mlp.onnx")
    inputs = write_inputs(tmp_path / "inputs.npz", x=sample_inputs(5, (FEATURES,)))
    first, second = tmp_path / "first.npz", tmp_path / "second.npz"
    reference = perturbed(model, tmp_path / "reference.onnx", scale=0.05)
    assert golden([model, "--inputs", inputs, "-o", first]) == 0

    assert golden([model, "--inputs", first, "--reference", reference, "-o", second]) == 0

    parsed = parse_golden(second.read_bytes(), str(second))
    assert parsed.samples == 5


def test_an_input_the_model_lacks_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An array that is not an input of the model: exit 1 with its name and the model's."""
    model = build_mlp(tmp_path / "mlp.onnx")
    inputs = write_inputs(
        tmp_path / "inputs.npz",
        **{"input:x": sample_inputs(5, (FEATURES,)), "input:bogus": np.zeros((5, 2))},
    )
    out = tmp_path / "g.npz"

    assert golden([model, "--inputs", inputs, "-o", out]) == 1

    err = capsys.readouterr().err
    assert "'input:bogus' is not an input of the model (it takes x)" in err
    assert not out.exists()


def test_a_missing_input_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = build_mlp(tmp_path / "mlp.onnx")
    inputs = write_inputs(tmp_path / "inputs.npz", rtol=np.float64(0.1))

    assert golden([model, "--inputs", inputs, "-o", tmp_path / "g.npz"]) == 1

    assert "lacks the model input 'x'" in capsys.readouterr().err


def test_pickled_inputs_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """An object array (a pickle) is never loaded."""
    model = build_mlp(tmp_path / "mlp.onnx")
    inputs = tmp_path / "inputs.npz"
    np.savez(inputs, x=np.array([{"a": 1}], dtype=object))

    assert golden([model, "--inputs", inputs, "-o", tmp_path / "g.npz"]) == 1

    assert "cannot read its arrays" in capsys.readouterr().err


def test_oversize_golden_set_is_refused_with_the_count_that_fits(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Devices refuse a golden set over 1 MiB: the command refuses to write one and says how
    many of the samples would fit (random floats hardly compress: 400 CNN windows of 1024
    samples are about 1.6 MB)."""
    model = build_cnn1d(tmp_path / "cnn.onnx", channels=8)
    samples = sample_inputs(400, (1, CNN_SAMPLES))
    inputs = write_inputs(tmp_path / "inputs.npz", **{"input:x": samples})
    out = tmp_path / "g.npz"

    assert golden([model, "--inputs", inputs, "-o", out]) == 1

    err = capsys.readouterr().err
    assert "more than 1048576 (1 MiB), which devices refuse" in err
    fit = int(err.split(" of its 400 samples fit")[0].rsplit(": ", 1)[1])
    assert 0 < fit < 400
    assert not out.exists()
    # The count is right: that many samples make a set a device accepts.
    inputs = write_inputs(tmp_path / "fewer.npz", **{"input:x": samples[:fit]})
    assert golden([model, "--inputs", inputs, "-o", out]) == 0
    assert out.stat().st_size <= MAX_GOLDEN_BYTES
