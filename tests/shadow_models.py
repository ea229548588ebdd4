"""Candidates for shadow trials, each beside ``build_linear``'s model of the same seed
(x [N, 4] -> y [N, 2]): one that is the same model in other bytes, one that agrees only on
small inputs, one that gives the same results much more slowly."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from tests.onnx_builders import _save, build_linear, linear_weights

FEATURES = 4
OUTPUTS = 2


def build_reexport(path: Path, seed: int = 0) -> Path:
    """The same model as ``build_linear(seed)``, exported again: other bytes, same results."""
    build_linear(path, features=FEATURES, outputs=OUTPUTS, seed=seed)
    model = onnx.load(str(path))
    model.doc_string = "exported again"
    onnx.save(model, str(path))
    return path


def build_diverging(path: Path, seed: int = 0, knee: float = 5.0) -> Path:
    """``build_linear(seed)`` plus ``relu(x - knee) @ 3``: the same results while every
    input stays under ``knee`` (a golden set of small readings passes), others far apart."""
    weight, bias = linear_weights(FEATURES, OUTPUTS, seed)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "W"], ["xw"]),
            helper.make_node("Add", ["xw", "B"], ["base"]),
            helper.make_node("Sub", ["x", "knee"], ["over"]),
            helper.make_node("Relu", ["over"], ["excess"]),
            helper.make_node("MatMul", ["excess", "K"], ["extra"]),
            helper.make_node("Add", ["base", "extra"], ["y"]),
        ],
        "diverging",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", FEATURES])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", OUTPUTS])],
        [
            numpy_helper.from_array(weight, "W"),
            numpy_helper.from_array(bias, "B"),
            numpy_helper.from_array(np.array(knee, np.float32), "knee"),
            numpy_helper.from_array(np.full((FEATURES, OUTPUTS), 3.0, np.float32), "K"),
        ],
    )
    return _save(graph, path)


def build_slower(path: Path, seed: int = 0, layers: int = 12, width: int = 512) -> Path:
    """``build_linear(seed)``'s results plus zero times a stack of ``layers`` dense layers
    of ``width``: the same outputs, many times the run time."""
    weight, bias = linear_weights(FEATURES, OUTPUTS, seed)
    rng = np.random.default_rng(seed + 1)
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["xw"]),
        helper.make_node("Add", ["xw", "B"], ["base"]),
        helper.make_node("MatMul", ["x", "A"], ["h0"]),
    ]
    initializers = [
        numpy_helper.from_array(weight, "W"),
        numpy_helper.from_array(bias, "B"),
        numpy_helper.from_array(rng.standard_normal((FEATURES, width)).astype(np.float32), "A"),
        numpy_helper.from_array(np.array(0.0, np.float32), "zero"),
    ]
    for layer in range(layers):
        scale = 1 / np.sqrt(width)
        matrix = (rng.standard_normal((width, width)) * scale).astype(np.float32)
        initializers.append(numpy_helper.from_array(matrix, f"L{layer}"))
        nodes.append(helper.make_node("MatMul", [f"h{layer}", f"L{layer}"], [f"m{layer}"]))
        nodes.append(helper.make_node("Tanh", [f"m{layer}"], [f"h{layer + 1}"]))
    nodes += [
        helper.make_node("ReduceMean", [f"h{layers}"], ["total"], axes=[1], keepdims=1),
        helper.make_node("Mul", ["total", "zero"], ["nothing"]),
        helper.make_node("Add", ["base", "nothing"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "slower",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", FEATURES])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", OUTPUTS])],
        initializers,
    )
    return _save(graph, path)
