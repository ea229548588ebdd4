"""Payload decoding and checking: every way a reading can be wrong is a clear PayloadError."""

from __future__ import annotations

import io
import json
import math

import numpy as np
import pytest

from agent.config.schema import PipelineInput
from agent.errors import PayloadError
from agent.inference.codecs import TensorSpec, all_finite, decode_payload, encode_json

X = TensorSpec("x", np.dtype(np.float32), (4,))


def cfg(**kwargs: object) -> PipelineInput:
    return PipelineInput.model_validate({"topic": "s/+", **kwargs})


def test_json_plain_list() -> None:
    """A bare JSON list is the tensor of the only input."""
    tensors, reading_id = decode_payload(b"[1, 2, 3, 4]", cfg(), [X])
    assert reading_id is None
    assert tensors["x"].dtype == np.float32
    np.testing.assert_array_equal(tensors["x"], [1, 2, 3, 4])


def test_json_field_and_id() -> None:
    """input.field selects the tensor; id_field is echoed."""
    payload = json.dumps({"id": "r-7", "x": [1, 2, 3, 4], "other": 5}).encode()
    tensors, reading_id = decode_payload(payload, cfg(field="x"), [X])
    assert reading_id == "r-7"
    assert tensors["x"].shape == (4,)


def test_json_named_inputs() -> None:
    """{"inputs": {...}} feeds a multi-input model."""
    a = TensorSpec("a", np.dtype(np.float32), (2,))
    b = TensorSpec("b", np.dtype(np.int64), (2,))
    tensors, reading_id = decode_payload(
        b'{"id": 1, "inputs": {"a": [1.5, 2], "b": [3, 4]}}', cfg(), [a, b]
    )
    assert reading_id == 1
    assert tensors["b"].dtype == np.int64


def test_json_reshapes_flat_data_to_a_static_shape() -> None:
    """A flat list with the right element count is reshaped to a static item shape."""
    spec = TensorSpec("x", np.dtype(np.float32), (2, 2))
    tensors, _ = decode_payload(b"[1, 2, 3, 4]", cfg(), [spec])
    assert tensors["x"].shape == (2, 2)


def test_nesting_other_than_the_readings_shape_is_refused() -> None:
    """Two readings in one message, a reading with an extra axis or the wrong nesting: the
    error names the shape sent and the one expected, and nothing is flattened silently."""
    eight = TensorSpec("x", np.dtype(np.float32), (8,))
    with pytest.raises(PayloadError) as caught:
        decode_payload(b'{"x": [[1,2,3,4],[5,6,7,8]]}', cfg(field="x"), [eight])
    assert str(caught.value) == (
        "input 'x' expects shape [8] per reading (8 elements), got shape [2, 4] (8 elements): "
        "nested lists must have the reading's shape (or send a flat list of 8 numbers); "
        "a message holds one reading"
    )
    with pytest.raises(PayloadError, match=r"got shape \[1, 4\]"):
        decode_payload(b"[[1, 2, 3, 4]]", cfg(), [X])
    square = TensorSpec("x", np.dtype(np.float32), (2, 4))
    with pytest.raises(PayloadError, match=r"expects shape \[2, 4\] .* got shape \[4, 2\]"):
        decode_payload(b"[[1, 2], [3, 4], [5, 6], [7, 8]]", cfg(), [square])


def test_dynamic_axis_accepts_any_length() -> None:
    """A dynamic per-item axis takes any length."""
    spec = TensorSpec("x", np.dtype(np.float32), (None,))
    tensors, _ = decode_payload(b"[1, 2, 3, 4, 5, 6, 7]", cfg(), [spec])
    assert tensors["x"].shape == (7,)


def test_raw_little_endian() -> None:
    """raw: little-endian bytes of input.dtype, shaped by input.shape."""
    data = np.arange(4, dtype="<f8").tobytes()
    tensors, _ = decode_payload(data, cfg(format="raw", dtype="float64", shape=[4]), [X])
    assert tensors["x"].dtype == np.float32
    np.testing.assert_array_equal(tensors["x"], [0, 1, 2, 3])


def test_npy() -> None:
    """npy: NumPy's own format."""
    buffer = io.BytesIO()
    np.save(buffer, np.ones(4, dtype=np.float32))
    tensors, _ = decode_payload(buffer.getvalue(), cfg(format="npy"), [X])
    np.testing.assert_array_equal(tensors["x"], np.ones(4))


@pytest.mark.parametrize(
    ("payload", "config", "message"),
    [
        (b"{not json", {}, "payload is not valid JSON"),
        (b'{"x": [1,2,3,4]}', {}, "payload is a JSON object but input.field is not set"),
        (b'{"y": [1,2,3,4]}', {"field": "x"}, "payload has no field 'x'"),
        (b"[1, 2, 3]", {}, "input 'x' expects shape [4] per reading (4 elements), got shape [3]"),
        (b"[[1, 2], [3]]", {}, "not a rectangular array"),
        (b'["a", "b", "c", "d"]', {}, "expected numbers, got text"),
        (b"[1, 2, NaN, 4]", {}, "contains NaN or infinity"),
        (b"[1, 2, 3, 4]", {"max_payload_bytes": 5}, "exceeds input.max_payload_bytes (5)"),
        (b"\x00\x00\x80", {"format": "raw"}, "not a whole number of float32 elements"),
        (b"\x00" * 12, {"format": "raw", "shape": [4]}, "payload has 3 elements but input.shape"),
        (b"garbage", {"format": "npy"}, "not a valid .npy payload"),
    ],
)
def test_bad_payloads_are_explained(
    payload: bytes, config: dict[str, object], message: str
) -> None:
    """Each malformed payload raises PayloadError saying what is wrong."""
    with pytest.raises(PayloadError, match=None) as caught:
        decode_payload(payload, cfg(**config), [X])
    assert message in str(caught.value)


def test_integer_input_refuses_fractions_and_overflow() -> None:
    """Values that would change when cast to an integer input are refused."""
    spec = TensorSpec("n", np.dtype(np.int8), (2,))
    with pytest.raises(PayloadError, match="non-integer"):
        decode_payload(b"[1.5, 2]", cfg(), [spec])
    with pytest.raises(PayloadError, match="outside the int8 range"):
        decode_payload(b"[1, 300]", cfg(), [spec])
    tensors, _ = decode_payload(b"[1.0, 2]", cfg(), [spec])
    assert tensors["n"].dtype == np.int8


def test_multi_input_needs_names() -> None:
    """A plain tensor for a two-input model says how to name the inputs."""
    a = TensorSpec("a", np.dtype(np.float32), (2,))
    with pytest.raises(PayloadError, match="several inputs"):
        decode_payload(b"[1, 2]", cfg(), [a, X])
    with pytest.raises(PayloadError, match="'inputs' lacks 'x'"):
        decode_payload(b'{"inputs": {"a": [1, 2]}}', cfg(), [a, X])


def test_encode_json_handles_numpy_and_int_keys() -> None:
    """Results encode numpy arrays and scalars, float16, and the int-keyed maps of skl2onnx."""
    encoded = encode_json(
        {
            "a": np.float32(1.5),
            "b": np.arange(3),
            "c": np.ones(2, dtype=np.float16),
            "d": [{0: 0.25, 1: 0.75}],
        }
    )
    assert json.loads(encoded) == {
        "a": 1.5,
        "b": [0, 1, 2],
        "c": [1.0, 1.0],
        "d": [{"0": 0.25, "1": 0.75}],
    }


def test_non_finite_outputs_are_detected() -> None:
    """all_finite spots NaN/inf in float tensors (orjson would write them as null), small
    (summed as Python floats) or large (numpy), and is not fooled by a sum that overflows."""
    assert all_finite(np.ones(3, dtype=np.float32))
    assert not all_finite(np.array([1.0, math.nan]))
    assert not all_finite(np.array([math.inf]))
    assert all_finite(np.arange(3))
    assert not all_finite(np.array([[1.0, 2.0], [-math.inf, 4.0]], dtype=np.float16))
    big = np.ones(5000, dtype=np.float32)
    assert all_finite(big)
    big[4321] = math.nan
    assert not all_finite(big)
    assert all_finite(np.array([1.7e308, 1.7e308]))  # finite, though their sum is not


@pytest.mark.parametrize(
    ("dtype", "payload", "accepted"),
    [
        (np.float32, b"[1, 2, 3, 1e39]", False),  # finite in JSON, infinite as float32
        (np.float32, b"[1, 2, 3, -3.4e38]", True),
        (np.float16, b"[1, 2, 3, 70000]", False),
        (np.float64, b"[1, 2, 3, 1e300]", True),
        (np.float64, b"[1e308, 1e308, 1e308, 1e308]", True),  # the sum overflows, no value
        (np.float32, b"[1, true, 3, 4]", True),
        (np.float32, b"[1, 2, 3, Infinity]", False),
    ],
)
def test_json_float_lists_are_checked_against_the_input_type(
    dtype: type[np.floating], payload: bytes, accepted: bool
) -> None:
    """A JSON list of numbers is refused when a value is not finite or would not be once
    converted to the input's float type; every accepted value arrives unchanged in it."""
    spec = TensorSpec("x", np.dtype(dtype), (4,))
    if not accepted:
        with pytest.raises(PayloadError, match="contains NaN or infinity"):
            decode_payload(payload, cfg(), [spec])
        return
    tensors, _ = decode_payload(payload, cfg(), [spec])
    assert tensors["x"].dtype == dtype
    assert np.isfinite(tensors["x"]).all()
    np.testing.assert_array_equal(tensors["x"], np.asarray(json.loads(payload), dtype=dtype))
