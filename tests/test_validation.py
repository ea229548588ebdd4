"""Golden sets run through real onnxruntime sessions: feeds, output alignment, the report."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from agent.config.schema import AgentConfig
from agent.errors import GoldenMismatchError
from agent.hardware.detect import detect
from agent.inference.golden import GoldenSet, Tolerances
from agent.inference.session import LoadedModel, SessionFactory, WarmupLimit
from agent.inference.validation import (
    Feeds,
    SampleRunError,
    as_array,
    require_pass,
    sample_feeds,
    stack_runs,
    timed_runs,
    validate,
)
from tests import model_zoo
from tests.onnx_builders import IR_VERSION, OPSET, build_loop, build_recurrent, recurrent_weights

CPU = ["CPUExecutionProvider"]
CONTRACT_KEYS = {"samples", "max_abs_err", "max_rel_err", "latency_ms", "providers"}


def load(tmp_path: Path, model: Path, golden: GoldenSet | None = None) -> LoadedModel:
    """The model as the daemon builds it (CPU, warmed up), with ``golden`` checked."""
    config = AgentConfig(
        device_id="d",
        models_dir=str(model.parent),
        state_dir=str(tmp_path / "state"),
        models={"m": {"file": model.name}},
        providers=CPU,
    )
    return SessionFactory(detect()).build(
        config,
        "m",
        model,
        model.read_bytes(),
        "sha256:test",
        started=time.monotonic(),
        limit=WarmupLimit(60, "warmup_timeout_s"),
        golden=golden,
    )


def session_runs(model: LoadedModel) -> Any:
    def run(feeds: Feeds) -> list[Any]:
        outputs: list[Any] = model.session.run(None, feeds)
        return outputs

    return timed_runs(run)


def check(model: LoadedModel, golden: GoldenSet) -> Any:
    return validate(golden, model.inputs, model.outputs, model.providers, session_runs(model))


def recurrence(x: np.ndarray, h: np.ndarray) -> np.ndarray:
    w, u = recurrent_weights(4, 3)
    result: np.ndarray = np.tanh(x @ w + h @ u)
    return result


def build_with_constant_input(path: Path) -> Path:
    """y = 2 x over x [N, 4] (batched) and s_out = s + 1 over s [3] (no batch axis)."""
    graph = helper.make_graph(
        [
            helper.make_node("Add", ["x", "x"], ["y"]),
            helper.make_node("Add", ["s", "one"], ["s_out"]),
        ],
        "constant_input",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4]),
            helper.make_tensor_value_info("s", TensorProto.FLOAT, [3]),
        ],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4]),
            helper.make_tensor_value_info("s_out", TensorProto.FLOAT, [3]),
        ],
        [helper.make_tensor("one", TensorProto.FLOAT, [1], [1.0])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = IR_VERSION
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


# -- feeds -----------------------------------------------------------------------------------


def test_batched_inputs_and_a_state_input_get_a_batch_of_one(tmp_path: Path) -> None:
    """The recurrent cell's x and its state h both have a batch axis: each sample is fed as
    [1, ...], and the outputs line up with the expected rows."""
    model = load(tmp_path, build_recurrent(tmp_path / "rnn.onnx"))
    rng = np.random.default_rng(0)
    x = rng.standard_normal((6, 4)).astype(np.float32)
    h = rng.standard_normal((6, 3)).astype(np.float32)
    golden = GoldenSet({"x": x, "h": h}, {"y": recurrence(x, h), "h_out": recurrence(x, h)})
    feeds, problems = sample_feeds(golden, model.inputs)
    assert problems == []
    assert len(feeds) == 6
    assert {name: a.shape for name, a in feeds[0].items()} == {"x": (1, 4), "h": (1, 3)}
    np.testing.assert_array_equal(feeds[5]["h"], h[5:6])
    report = check(model, golden)
    assert report.passed, report.reason()
    assert report.comparison.samples == 6
    assert report.comparison.max_abs_err < 1e-5


def test_an_unbatched_scalar_input_is_fed_as_a_scalar(tmp_path: Path) -> None:
    """The Loop model's iteration count n is an int64 scalar: each sample's n goes in as a
    0-d array (not [1], which the model refuses), next to x as [1, 8]."""
    model = load(tmp_path, build_loop(tmp_path / "loop.onnx"))
    spec = {s.name: s for s in model.inputs}
    assert spec["x"].batched
    assert not spec["n"].batched
    x = np.random.default_rng(1).standard_normal((3, 8)).astype(np.float32)
    n = np.array([0, 1, 3], np.int64)
    expected = np.stack([x[0], np.tanh(x[1]), np.tanh(np.tanh(np.tanh(x[2])))])
    golden = GoldenSet({"x": x, "n": n}, {"y": expected})
    feeds, problems = sample_feeds(golden, model.inputs)
    assert problems == []
    assert feeds[2]["n"].shape == ()
    assert int(feeds[2]["n"]) == 3
    report = check(model, golden)
    assert report.passed, report.reason()


def test_missing_and_extra_inputs_are_reported_and_nothing_runs(tmp_path: Path) -> None:
    """A set without the state input and with an input the model lacks."""
    model = load(tmp_path, build_recurrent(tmp_path / "rnn.onnx"))
    golden = GoldenSet(
        {"x": np.zeros((2, 4), np.float32), "z": np.zeros((2, 1), np.float32)},
        {"y": np.zeros((2, 3), np.float32)},
    )
    feeds, problems = sample_feeds(golden, model.inputs)
    assert feeds == []
    assert problems == [
        "the golden set has no input:h (the model takes x, h)",
        "the golden set feeds input 'z', which the model lacks (it takes x, h)",
    ]

    def never(_: Any) -> Any:
        raise AssertionError("nothing may run")

    report = validate(golden, model.inputs, model.outputs, model.providers, never)
    assert not report.passed
    assert report.reason() == (
        "golden set check failed: the golden set has no input:h (the model takes x, h) (and 1 more)"
    )
    document = report.to_dict()
    assert document["max_abs_err"] is None
    assert document["latency_ms"] == {"p50": None, "p99": None}
    assert len(document["problems"]) == 2


def test_dtypes_convert_within_a_kind_and_integers_to_floats_only(tmp_path: Path) -> None:
    """float64 samples feed a float32 input and integers a float one; floats for an int64
    input are a problem."""
    model = load(tmp_path, build_loop(tmp_path / "loop.onnx"))
    ints_for_floats = GoldenSet(
        {"x": np.zeros((2, 8), np.int32), "n": np.zeros(2, np.int32)},
        {"y": np.zeros((2, 8), np.float64)},
    )
    feeds, problems = sample_feeds(ints_for_floats, model.inputs)
    assert problems == []
    assert feeds[0]["x"].dtype == np.float32
    assert feeds[0]["n"].dtype == np.int64
    assert check(model, ints_for_floats).passed
    floats_for_ints = GoldenSet(
        {"x": np.zeros((2, 8), np.float64), "n": np.zeros(2, np.float64)},
        {"y": np.zeros((2, 8), np.float32)},
    )
    assert sample_feeds(floats_for_ints, model.inputs) == (
        [],
        ["input:n holds float64, the model takes int64"],
    )


def test_a_sample_onnxruntime_refuses_is_a_problem_not_an_exception(tmp_path: Path) -> None:
    """x of the wrong width: onnxruntime's error becomes the report's problem."""
    model = load(tmp_path, build_recurrent(tmp_path / "rnn.onnx"))
    golden = GoldenSet(
        {"x": np.zeros((2, 5), np.float32), "h": np.zeros((2, 3), np.float32)},
        {"y": np.zeros((2, 3), np.float32)},
    )
    report = check(model, golden)
    assert not report.passed
    assert report.comparison.problems[0].startswith("running the golden samples failed: ")
    assert "x" in report.comparison.problems[0]

    def broken(_: Feeds) -> list[Any]:
        raise RuntimeError("kernel exploded\nsecond line")

    with pytest.raises(SampleRunError, match=r"^kernel exploded$"):
        timed_runs(broken)([{}])


# -- outputs ---------------------------------------------------------------------------------


def test_batch_of_one_and_unbatched_outputs_line_up_with_the_expected_rows(
    tmp_path: Path,
) -> None:
    """y [1, 4] per run becomes a row of [N, 4]; s_out [3] (no batch axis) is stacked."""
    model = load(tmp_path, build_with_constant_input(tmp_path / "const.onnx"))
    x = np.random.default_rng(2).standard_normal((4, 4)).astype(np.float32)
    s = np.arange(12, dtype=np.float32).reshape(4, 3)
    golden = GoldenSet({"x": x, "s": s}, {"y": 2 * x, "s_out": s + 1})
    feeds, _ = sample_feeds(golden, model.inputs)
    assert feeds[1]["s"].shape == (3,)
    report = check(model, golden)
    assert report.passed, report.reason()
    wrong = GoldenSet({"x": x, "s": s}, {"y": np.zeros((4, 5), np.float32)})
    assert check(model, wrong).comparison.problems == (
        "output 'y' of sample 0 has shape [1, 4], the golden set expects [5] per sample",
    )
    unknown = GoldenSet({"x": x, "s": s}, {"z": np.zeros((4, 1), np.float32)})
    assert check(model, unknown).comparison.problems == (
        "the model has no output 'z' (it gives y, s_out)",
    )


def test_iforest_labels_and_scores_line_up(tmp_path: Path) -> None:
    """The IsolationForest's label [N] and scores [N, 1] checked against a reference run."""
    path = model_zoo.build_iforest(tmp_path / "iforest.onnx", trees=10)
    model = load(tmp_path, path)
    x = model_zoo.sample_inputs(5, (model_zoo.FEATURES,))
    label, scores = model.session.run(None, {"X": x})
    golden = GoldenSet({"X": x}, {"label": label, "scores": scores})
    report = check(model, golden)
    assert report.passed, report.reason()
    assert report.comparison.top1_agreement == 1.0  # the labels' agreement, reported


def zipmap_classifier(path: Path) -> Path:
    """A scikit-learn LogisticRegression exported with ZipMap (skl2onnx's default):
    output_probability is a list of {class: probability} dicts."""
    from skl2onnx import to_onnx  # noqa: PLC0415 - heavy
    from sklearn.linear_model import LogisticRegression  # noqa: PLC0415

    rng = np.random.default_rng(0)
    train = rng.standard_normal((200, 4)).astype(np.float32)
    labels = (train[:, 0] > 0).astype(int) + (train[:, 1] > 0).astype(int)
    model = to_onnx(
        LogisticRegression().fit(train, labels),
        train[:1],
        target_opset={"": 15, "ai.onnx.ml": 3},
    )
    path.write_bytes(model.SerializeToString())
    return path


def test_as_array_turns_zipmap_dicts_into_class_ordered_rows(tmp_path: Path) -> None:
    """ZipMap's [{0: p0, 1: p1, 2: p2}] is [[p0, p1, p2]]; a golden set of class scores with
    top1_agreement checks the classifier through it."""
    assert as_array([{"b": 0.25, "a": 0.75}]).tolist() == [[0.75, 0.25]]
    assert as_array([1, 2]).tolist() == [1, 2]
    model = load(tmp_path, zipmap_classifier(tmp_path / "zipmap.onnx"))
    x = np.random.default_rng(3).standard_normal((8, 4)).astype(np.float32)
    label, probabilities = model.session.run(None, {"X": x})
    assert isinstance(probabilities, list)
    assert isinstance(probabilities[0], dict)
    rows = as_array(probabilities)
    assert rows.shape == (8, 3)
    np.testing.assert_array_equal(rows.argmax(axis=1), label)
    golden = GoldenSet(
        {"X": x},
        {"output_label": label, "output_probability": rows},
        Tolerances(top1_agreement=0.99),
    )
    report = check(model, golden)
    assert report.passed, report.reason()
    document = report.to_dict()
    assert document["top1_agreement"] == 1.0  # measured, not the threshold
    assert document["min_top1_agreement"] == 0.99


def test_stack_runs_joins_batches_of_one_and_stacks_the_rest() -> None:
    """[1, 2] runs are concatenated; unbatched [2] runs stacked."""
    assert stack_runs([np.zeros((1, 2)), np.ones((1, 2))]).shape == (2, 2)
    assert stack_runs([np.zeros(2), np.ones(2)]).shape == (2, 2)
    assert stack_runs([np.float32(1), np.float32(2)]).shape == (2,)


# -- the report ------------------------------------------------------------------------------


def test_report_to_dict_holds_the_contract_fields(tmp_path: Path) -> None:
    """samples, max_abs_err, max_rel_err, latency_ms {p50, p99}, providers (+ top1_agreement
    when measured), then rtol, atol and passed."""
    path = model_zoo.build_mlp(tmp_path / "mlp.onnx")
    model = load(tmp_path, path)
    x = model_zoo.sample_inputs(10, (model_zoo.FEATURES,))
    (y,) = model.session.run(None, {"x": x})
    report = check(model, GoldenSet({"x": x}, {"y": y}))
    document = report.to_dict()
    assert set(document) >= CONTRACT_KEYS
    assert "top1_agreement" not in document
    assert document["samples"] == 10
    assert document["providers"] == CPU
    assert set(document["latency_ms"]) == {"p50", "p99"}
    assert 0 < document["latency_ms"]["p50"] <= document["latency_ms"]["p99"]
    assert document["max_abs_err"] == 0.0
    assert document["max_rel_err"] == 0.0
    assert document["rtol"] == 1e-3
    assert document["atol"] == 1e-5
    assert document["passed"] is True
    assert "problems" not in document
    assert report.reason() == ""
    assert require_pass(report) is report


def test_a_perturbed_model_fails_and_the_error_carries_the_report(tmp_path: Path) -> None:
    """The MLP with its weights nudged by 1 %: out of tolerance through SessionFactory.build,
    which raises GoldenMismatchError carrying the figures; with a loose tolerance it
    serves and its LoadedModel carries the validation."""
    original = model_zoo.build_mlp(tmp_path / "mlp.onnx")
    reference = load(tmp_path, original)
    x = model_zoo.sample_inputs(16, (model_zoo.FEATURES,))
    (y,) = reference.session.run(None, {"x": x})
    golden = GoldenSet({"x": x}, {"y": y})
    nudged = model_zoo.perturbed(original, tmp_path / "nudged" / "mlp.onnx", scale=0.01)
    with pytest.raises(GoldenMismatchError) as caught:
        load(tmp_path, nudged, golden)
    message = str(caught.value)
    assert message.startswith("golden set check failed: output 'y' is out of tolerance in ")
    assert "worst: sample " in message
    document = caught.value.report.to_dict()  # type: ignore[attr-defined]
    assert document["passed"] is False
    assert document["max_abs_err"] > 1e-3
    assert document["problems"][0] in message
    loose = golden.with_tolerances(Tolerances(rtol=0.5, atol=0.5))
    served = load(tmp_path, nudged, loose)
    assert served.validation is not None
    assert served.validation.passed
    assert served.validation.to_dict()["samples"] == 16
