"""Small real ONNX models, built with onnx.helper, for tests, the demo and benchmarks.

scripts/demo.py imports this module in a venv without test tooling (the ``demo`` extra): it
must import nothing but numpy and onnx (tests/test_demo.py checks).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

# ONNX Runtime >= 1.17 reads IR version 9 / opset 17; newer onnx writes newer IR by default.
IR_VERSION = 8
OPSET = 13


def _save(graph: onnx.GraphProto, path: Path) -> Path:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def linear_weights(features: int, outputs: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The weights ``build_linear`` uses for ``seed`` (so tests can compute expected results)."""
    rng = np.random.default_rng(seed)
    weight = rng.standard_normal((features, outputs)).astype(np.float32)
    bias = rng.standard_normal(outputs).astype(np.float32)
    return weight, bias


def build_linear(
    path: Path,
    *,
    features: int = 4,
    outputs: int = 2,
    seed: int = 0,
    batch: int | str = "N",
    pad_bytes: int = 0,
    input_name: str = "x",
) -> Path:
    """y = x @ W + b with input ``x`` [batch, features] (float32) and output ``y``.

    ``pad_bytes`` adds an unused initializer, to make a bigger file for reload benchmarks;
    ``input_name`` renames ``x`` (a pipeline that names ``x`` cannot use the model then).
    """
    weight, bias = linear_weights(features, outputs, seed)
    initializers = [numpy_helper.from_array(weight, "W"), numpy_helper.from_array(bias, "B")]
    if pad_bytes:
        initializers.append(
            numpy_helper.from_array(np.zeros(pad_bytes // 4, dtype=np.float32), "padding")
        )
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", [input_name, "W"], ["xw"]),
            helper.make_node("Add", ["xw", "B"], ["y"]),
        ],
        "linear",
        [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, [batch, features])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, outputs])],
        initializers,
    )
    return _save(graph, path)


def build_two_inputs(path: Path, features: int = 3) -> Path:
    """sum = a + b, product = a * b over two float32 inputs [N, features]."""
    graph = helper.make_graph(
        [
            helper.make_node("Add", ["a", "b"], ["sum"]),
            helper.make_node("Mul", ["a", "b"], ["product"]),
        ],
        "two_inputs",
        [
            helper.make_tensor_value_info("a", TensorProto.FLOAT, ["N", features]),
            helper.make_tensor_value_info("b", TensorProto.FLOAT, ["N", features]),
        ],
        [
            helper.make_tensor_value_info("sum", TensorProto.FLOAT, ["N", features]),
            helper.make_tensor_value_info("product", TensorProto.FLOAT, ["N", features]),
        ],
    )
    return _save(graph, path)


def build_vibration_scorer(path: Path, samples: int = 64, threshold: float = 1.5) -> Path:
    """A vibration anomaly scorer: rms of the window and sigmoid(4 * (rms - threshold)).

    Input ``x`` [N, samples] float32; outputs ``rms`` [N, 1] and ``anomaly`` [N, 1].
    """
    graph = helper.make_graph(
        [
            helper.make_node("Mul", ["x", "x"], ["squared"]),
            helper.make_node("ReduceMean", ["squared"], ["mean_square"], axes=[1], keepdims=1),
            helper.make_node("Sqrt", ["mean_square"], ["rms"]),
            helper.make_node("Sub", ["rms", "threshold"], ["excess"]),
            helper.make_node("Mul", ["excess", "gain"], ["logit"]),
            helper.make_node("Sigmoid", ["logit"], ["anomaly"]),
        ],
        "vibration_scorer",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", samples])],
        [
            helper.make_tensor_value_info("rms", TensorProto.FLOAT, ["N", 1]),
            helper.make_tensor_value_info("anomaly", TensorProto.FLOAT, ["N", 1]),
        ],
        [
            numpy_helper.from_array(np.array([threshold], dtype=np.float32), "threshold"),
            numpy_helper.from_array(np.array([4.0], dtype=np.float32), "gain"),
        ],
    )
    return _save(graph, path)


def recurrent_weights(features: int, hidden: int) -> tuple[np.ndarray, np.ndarray]:
    """The weights ``build_recurrent`` uses (so tests can run the same recurrence directly)."""
    rng = np.random.default_rng(42)
    w = (rng.standard_normal((features, hidden)) * 0.5).astype(np.float32)
    u = (rng.standard_normal((hidden, hidden)) * 0.5).astype(np.float32)
    return w, u


def build_recurrent(path: Path, features: int = 4, hidden: int = 3) -> Path:
    """A tiny recurrent cell: h_out = tanh(x @ W + h @ U); outputs ``y`` (= h_out) and ``h_out``.

    Inputs ``x`` [N, features] and state ``h`` [N, hidden], both with a dynamic batch axis.
    """
    w, u = recurrent_weights(features, hidden)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "W"], ["xw"]),
            helper.make_node("MatMul", ["h", "U"], ["hu"]),
            helper.make_node("Add", ["xw", "hu"], ["pre"]),
            helper.make_node("Tanh", ["pre"], ["h_out"]),
            helper.make_node("Identity", ["h_out"], ["y"]),
        ],
        "recurrent",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", features]),
            helper.make_tensor_value_info("h", TensorProto.FLOAT, ["N", hidden]),
        ],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", hidden]),
            helper.make_tensor_value_info("h_out", TensorProto.FLOAT, ["N", hidden]),
        ],
        [numpy_helper.from_array(w, "W"), numpy_helper.from_array(u, "U")],
    )
    return _save(graph, path)


def build_classifier(path: Path, features: int = 4, classes: int = 3) -> Path:
    """Logits [N, classes] = x @ W (a stand-in for a classifier head; seeded weights)."""
    rng = np.random.default_rng(9)
    weight = rng.standard_normal((features, classes)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["logits"])],
        "classifier",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", features])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", classes])],
        [numpy_helper.from_array(weight, "W")],
    )
    return _save(graph, path)


def _slow_stack(
    features: int, width: int, layers: int
) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """Nodes and weights of ``x`` [N, features] widened to ``width``, through ``layers``
    dense tanh layers, averaged to ``y`` [N, 1]."""
    rng = np.random.default_rng(3)
    widen = (rng.standard_normal((features, width)) / np.sqrt(features)).astype(np.float32)
    square = (rng.standard_normal((width, width)) / np.sqrt(width)).astype(np.float32)
    # One square weight shared by every layer keeps the file small (~4 MB) and the cost high.
    initializers = [numpy_helper.from_array(widen, "Wide"), numpy_helper.from_array(square, "W")]
    nodes, previous = [], "x"
    for index in range(layers):
        nodes.append(
            helper.make_node("MatMul", [previous, "Wide" if index == 0 else "W"], [f"m{index}"])
        )
        nodes.append(helper.make_node("Tanh", [f"m{index}"], [f"t{index}"]))
        previous = f"t{index}"
    nodes.append(helper.make_node("ReduceMean", [previous], ["y"], axes=[1], keepdims=1))
    return nodes, initializers


def build_slow(path: Path, features: int = 8, width: int = 1024, layers: int = 24) -> Path:
    """A deliberately expensive model: input ``x`` [N, features] widened to ``width`` and run
    through ``layers`` dense layers; output ``y`` [N, 1]. For overload tests, where the daemon
    must be slower than its input."""
    nodes, initializers = _slow_stack(features, width, layers)
    graph = helper.make_graph(
        nodes,
        "slow",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", features])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 1])],
        initializers,
    )
    return _save(graph, path)


def _tanh_loop_body(features: int) -> onnx.GraphProto:
    """The body of a Loop that applies tanh to ``x`` [N, features] once per iteration."""
    return helper.make_graph(
        [
            helper.make_node("Identity", ["cond_in"], ["cond_out"]),
            helper.make_node("Tanh", ["x_in"], ["x_out"]),
        ],
        "body",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info("x_in", TensorProto.FLOAT, ["N", features]),
        ],
        [
            helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("x_out", TensorProto.FLOAT, ["N", features]),
        ],
    )


def build_loop(path: Path, features: int = 8) -> Path:
    """y = tanh applied ``n`` times to x, with ``n`` an int64 scalar input: a model whose run
    time the reading chooses (n = 10**9 hangs a worker, for watchdog tests)."""
    body = _tanh_loop_body(features)
    graph = helper.make_graph(
        [helper.make_node("Loop", ["n", "", "x"], ["y"], body=body)],
        "loop",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", features]),
            helper.make_tensor_value_info("n", TensorProto.INT64, []),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", features])],
    )
    return _save(graph, path)


def build_slow_warmup(path: Path, features: int = 4, iterations: int = 2_000_000) -> Path:
    """Like ``build_linear``'s interface (x [N, features] -> y [N, features]) but every run
    loops ``iterations`` times (a constant in the file): its warm-up takes seconds. For update
    trials that must be interrupted or time out."""
    body = _tanh_loop_body(features)
    graph = helper.make_graph(
        [helper.make_node("Loop", ["n", "", "x"], ["y"], body=body)],
        "slow_warmup",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", features])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", features])],
        [numpy_helper.from_array(np.array(iterations, dtype=np.int64), "n")],
    )
    return _save(graph, path)


def build_batch_probe(
    path: Path, *, batch: int | str = "N", features: int = 8, width: int = 1024, layers: int = 24
) -> Path:
    """``build_slow``'s model (input ``x`` [batch, features], output ``y`` [batch, 1]) plus an
    output ``batch_size`` [batch, 1]: the first axis of the run that gave each row, as float32.
    So a result tells how many readings shared its ``session.run``. ``batch=1`` fixes the
    first axis."""
    nodes, initializers = _slow_stack(features, width, layers)
    initializers.append(numpy_helper.from_array(np.array([0], dtype=np.int64), "first_axis"))
    nodes += [
        helper.make_node("Shape", ["x"], ["x_shape"]),
        helper.make_node("Gather", ["x_shape", "first_axis"], ["rows"], axis=0),
        helper.make_node("Cast", ["rows"], ["rows_float"], to=TensorProto.FLOAT),
        helper.make_node("Shape", ["y"], ["y_shape"]),
        helper.make_node("Expand", ["rows_float", "y_shape"], ["batch_size"]),
    ]
    graph = helper.make_graph(
        nodes,
        "batch_probe",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, features])],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 1]),
            helper.make_tensor_value_info("batch_size", TensorProto.FLOAT, [batch, 1]),
        ],
        initializers,
    )
    return _save(graph, path)
