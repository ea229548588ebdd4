"""Realistic models for the model-validation tests: the kinds a fleet runs.

An IsolationForest and an MLP classifier through skl2onnx (as users export them), an MLP
and a 1-D CNN built with onnx.helper, and ``perturbed``: the same model with every float
weight nudged, so its outputs drift by a known small amount.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from tests.onnx_builders import IR_VERSION, OPSET

FEATURES = 64
CNN_SAMPLES = 1024


def _weights(rng: np.random.Generator, name: str, *shape: int) -> onnx.TensorProto:
    scale = 1 / np.sqrt(np.prod(shape[1:]) if len(shape) > 2 else shape[0])
    array = (rng.standard_normal(shape) * scale).astype(np.float32)
    return numpy_helper.from_array(array, name)


def _save(graph: onnx.GraphProto, path: Path) -> Path:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def build_mlp(path: Path, seed: int = 0) -> Path:
    """x [N, 64] -> 128 -> 64 -> y [N, 8] with ReLU (float32)."""
    rng = np.random.default_rng(seed)
    graph = helper.make_graph(
        [
            helper.make_node("Gemm", ["x", "W1", "B1"], ["h1"], name="dense1"),
            helper.make_node("Relu", ["h1"], ["a1"], name="relu1"),
            helper.make_node("Gemm", ["a1", "W2", "B2"], ["h2"], name="dense2"),
            helper.make_node("Relu", ["h2"], ["a2"], name="relu2"),
            helper.make_node("Gemm", ["a2", "W3", "B3"], ["y"], name="dense3"),
        ],
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", FEATURES])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8])],
        [
            _weights(rng, "W1", FEATURES, 128),
            numpy_helper.from_array(np.zeros(128, np.float32), "B1"),
            _weights(rng, "W2", 128, 64),
            numpy_helper.from_array(np.zeros(64, np.float32), "B2"),
            _weights(rng, "W3", 64, 8),
            numpy_helper.from_array(np.zeros(8, np.float32), "B3"),
        ],
    )
    return _save(graph, path)


def build_cnn1d(path: Path, seed: int = 0, channels: int = 64) -> Path:
    """A 1-D CNN over x [N, 1, 1024]: three strided convolutions, global pooling, y [N, 4]
    class scores. Big enough (about 0.2 MB of weights) for quantization to show."""
    rng = np.random.default_rng(seed)
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["x", "K1", "C1"], ["c1"], strides=[2], pads=[4, 4]),
            helper.make_node("Relu", ["c1"], ["r1"]),
            helper.make_node("Conv", ["r1", "K2", "C2"], ["c2"], strides=[2], pads=[4, 4]),
            helper.make_node("Relu", ["c2"], ["r2"]),
            helper.make_node("Conv", ["r2", "K3", "C3"], ["c3"], strides=[2], pads=[4, 4]),
            helper.make_node("Relu", ["c3"], ["r3"]),
            helper.make_node("GlobalAveragePool", ["r3"], ["pooled"]),
            helper.make_node("Flatten", ["pooled"], ["flat"]),
            helper.make_node("Gemm", ["flat", "W", "B"], ["y"]),
        ],
        "cnn1d",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, CNN_SAMPLES])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
        [
            _weights(rng, "K1", channels // 2, 1, 9),
            numpy_helper.from_array(np.zeros(channels // 2, np.float32), "C1"),
            _weights(rng, "K2", channels, channels // 2, 9),
            numpy_helper.from_array(np.zeros(channels, np.float32), "C2"),
            _weights(rng, "K3", channels, channels, 9),
            numpy_helper.from_array(np.zeros(channels, np.float32), "C3"),
            _weights(rng, "W", channels, 4),
            numpy_helper.from_array(np.zeros(4, np.float32), "B"),
        ],
    )
    return _save(graph, path)


def build_iforest(path: Path, seed: int = 0, trees: int = 50) -> Path:
    """An IsolationForest over 64 features, exported by skl2onnx: outputs ``label`` (int64,
    1 or -1) and ``scores`` (float32)."""
    from skl2onnx import to_onnx  # noqa: PLC0415 - heavy: only the tests that need it
    from sklearn.ensemble import IsolationForest  # noqa: PLC0415

    rng = np.random.default_rng(seed)
    train = rng.standard_normal((1000, FEATURES)).astype(np.float32)
    forest = IsolationForest(n_estimators=trees, random_state=seed).fit(train)
    model = to_onnx(forest, train[:1], target_opset={"": 15, "ai.onnx.ml": 3})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(model.SerializeToString())
    return path


def build_mlp_classifier(path: Path, seed: int = 0, classes: int = 3) -> Path:
    """A scikit-learn MLPClassifier over 8 features, exported by skl2onnx without ZipMap:
    outputs ``label`` (int64) and ``probabilities`` (float32 [N, classes])."""
    from skl2onnx import to_onnx  # noqa: PLC0415
    from sklearn.neural_network import MLPClassifier  # noqa: PLC0415

    rng = np.random.default_rng(seed)
    train = rng.standard_normal((600, 8)).astype(np.float32)
    labels = (train[:, 0] > 0).astype(int) + (train[:, 1] > 0.5).astype(int)
    labels = np.minimum(labels, classes - 1)
    net = MLPClassifier(hidden_layer_sizes=(32,), max_iter=300, random_state=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ConvergenceWarning: a test model, not a good one
        net.fit(train, labels)
    model = to_onnx(
        net, train[:1], options={id(net): {"zipmap": False}}, target_opset={"": 15, "ai.onnx.ml": 3}
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(model.SerializeToString())
    return path


def perturbed(source: Path, target: Path, scale: float, seed: int = 1) -> Path:
    """``source`` with every float initializer multiplied by ``1 + scale * noise``: the same
    model, its outputs off by roughly ``scale`` relative."""
    model = onnx.load(str(source))
    rng = np.random.default_rng(seed)
    for index, tensor in enumerate(model.graph.initializer):
        array = numpy_helper.to_array(tensor)
        if array.dtype != np.float32 or array.size == 0:
            continue
        noise = rng.standard_normal(array.shape).astype(np.float32)
        changed = (array * (1 + scale * noise) + scale * noise).astype(np.float32)
        model.graph.initializer[index].CopyFrom(numpy_helper.from_array(changed, tensor.name))
    target.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(target))
    return target


def sample_inputs(count: int, shape: tuple[int, ...], seed: int = 7) -> np.ndarray:
    """``count`` float32 samples of ``shape`` (standard normal)."""
    return np.random.default_rng(seed).standard_normal((count, *shape)).astype(np.float32)
