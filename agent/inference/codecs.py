"""Payload decoding (json, raw, npy) into checked tensors, and result encoding.

Everything here is pure: it runs on paho's network thread for every reading, so it raises
``PayloadError`` with a message fit for the errors topic and never touches shared state.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import orjson

from agent.config.schema import PipelineInput
from agent.errors import PayloadError

ONNX_TO_NUMPY = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8,
    "tensor(int16)": np.int16,
    "tensor(uint16)": np.uint16,
    "tensor(int32)": np.int32,
    "tensor(uint32)": np.uint32,
    "tensor(int64)": np.int64,
    "tensor(uint64)": np.uint64,
    "tensor(bool)": np.bool_,
}


@dataclass(frozen=True)
class TensorSpec:
    """A model input as the decoder needs it: name, element type, and per-item shape.

    ``item_shape`` excludes the leading batch axis when the input has one (``batched``);
    ``None`` entries are dynamic axes that accept any length. ``max_batch`` is None for a
    dynamic batch axis, 1 for one fixed at 1.
    """

    name: str
    dtype: np.dtype[Any]
    item_shape: tuple[int | None, ...]
    batched: bool = False
    max_batch: int | None = None

    def describe_shape(self) -> str:
        """The per-item shape as text, dynamic axes shown as '?'."""
        return "[" + ", ".join("?" if d is None else str(d) for d in self.item_shape) + "]"


Tensor = npt.NDArray[Any]


def decode_payload(
    payload: bytes | bytearray, config: PipelineInput, specs: Sequence[TensorSpec]
) -> tuple[dict[str, Tensor], Any]:
    """Decode one reading into ``{input name: item tensor}`` and its echoed id (or None).

    ``specs`` are the model inputs the payload must provide (constants and state inputs
    already removed). Raises ``PayloadError`` naming what is wrong.
    """
    if len(payload) > config.max_payload_bytes:
        raise PayloadError(
            f"payload of {len(payload)} bytes exceeds input.max_payload_bytes "
            f"({config.max_payload_bytes})"
        )
    if config.format == "json":
        document = _loads(payload)
        reading_id = document.get(config.id_field) if isinstance(document, dict) else None
        try:
            return {
                spec.name: _to_tensor(value, spec)
                for spec, value in _decode_json(document, config, specs)
            }, reading_id
        except PayloadError as exc:
            raise PayloadError(str(exc), reading_id=_printable_id(reading_id)) from exc
    default = _default_spec(config, specs)
    if config.format == "raw":
        wire = np.dtype(config.dtype).newbyteorder("<")
        if len(payload) % wire.itemsize:
            raise PayloadError(
                f"raw payload of {len(payload)} bytes is not a whole number of "
                f"{config.dtype} elements ({wire.itemsize} bytes each)"
            )
        array = np.frombuffer(payload, dtype=wire)
        if config.shape is not None:
            array = _reshape(array, config.shape, "input.shape")
        return {default.name: _to_tensor(array, default)}, None
    try:
        array = np.load(io.BytesIO(payload), allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise PayloadError(f"not a valid .npy payload: {exc}") from exc
    return {default.name: _to_tensor(array, default)}, None


def _default_spec(config: PipelineInput, specs: Sequence[TensorSpec]) -> TensorSpec:
    if config.tensor is not None:
        return _spec(specs, config.tensor)
    if len(specs) != 1:
        names = ", ".join(s.name for s in specs)
        raise PayloadError(
            f"the model takes several inputs ({names}): send "
            '{"inputs": {NAME: tensor, ...}} or set input.tensor'
        )
    return specs[0]


def _spec(specs: Sequence[TensorSpec], name: str) -> TensorSpec:
    for spec in specs:
        if spec.name == name:
            return spec
    names = ", ".join(s.name for s in specs)
    raise PayloadError(f"the model has no input {name!r} (it takes: {names})")


def _printable_id(reading_id: Any) -> Any:
    """An id as an error may echo it: a string (at most 128 characters) or a number; any
    other JSON value (a list, an object) is not an id and is left out."""
    if isinstance(reading_id, str):
        return reading_id[:128]
    if isinstance(reading_id, int | float) and not isinstance(reading_id, bool):
        return reading_id
    return None


def _decode_json(
    document: Any, config: PipelineInput, specs: Sequence[TensorSpec]
) -> list[tuple[TensorSpec, Any]]:
    """Each input the payload provides, with its (not yet converted) value."""
    if isinstance(document, dict):
        named = document.get("inputs")
        if isinstance(named, dict):
            missing = [s.name for s in specs if s.name not in named]
            if missing:
                raise PayloadError(f"'inputs' lacks {', '.join(map(repr, missing))}")
            extra = [k for k in named if k not in {s.name for s in specs}]
            if extra:
                raise PayloadError(f"'inputs' has unknown tensors {', '.join(map(repr, extra))}")
            return [(spec, named[spec.name]) for spec in specs]
        if config.field is None:
            raise PayloadError(
                "payload is a JSON object but input.field is not set: set it to "
                "the key holding the tensor, or send the tensor itself"
            )
        if config.field not in document:
            raise PayloadError(f"payload has no field {config.field!r}")
        document = document[config.field]
    elif config.field is not None:
        raise PayloadError(
            f"expected a JSON object with field {config.field!r}, got {type(document).__name__}"
        )
    return [(_default_spec(config, specs), document)]


def _to_tensor(value: Any, spec: TensorSpec) -> Tensor:
    """Convert to the model's dtype and per-item shape, refusing lossy or invalid data."""
    target = spec.dtype
    largest = _FLOAT_MAX.get(target)
    if largest is not None and isinstance(value, list):
        # The common case, a flat JSON list of numbers for a float input: checked while
        # still Python floats (C loops that start far faster than a numpy reduction, which
        # matters at a few readings a second, when every reading starts with cold caches)
        # and converted once, straight to the input's type.
        try:
            finite = (
                math.isfinite(math.fsum(value)) and -largest <= min(value) <= max(value) <= largest
            )
        except (TypeError, ValueError, OverflowError):
            pass  # nested or empty lists, text, huge sums: the general path says which
        else:
            if not finite:
                raise PayloadError(f"input {spec.name!r}: contains NaN or infinity")
            array = np.asarray(value, dtype=target)
            if array.shape == spec.item_shape:  # a static shape, as sent: compared in C
                return array
            return _fit_shape(array, spec)
    try:
        array = np.asarray(value)
    except (ValueError, TypeError) as exc:
        raise PayloadError(f"input {spec.name!r}: not a rectangular array ({exc})") from exc
    if array.dtype == object or array.dtype.kind in "USV":
        raise PayloadError(
            f"input {spec.name!r}: expected numbers, got "
            f"{'ragged nested lists' if array.dtype == object else 'text'}"
        )
    if (
        target.kind in "iu"
        and array.dtype.kind == "f"
        and (not np.all(np.isfinite(array)) or not np.all(np.mod(array, 1) == 0))
    ):
        raise PayloadError(f"input {spec.name!r} takes {target.name}: got non-integer values")
    if target.kind in "iu" and array.dtype.kind in "iu" and array.size:
        info = np.iinfo(target)
        if array.min() < info.min or array.max() > info.max:
            raise PayloadError(f"input {spec.name!r}: values outside the {target.name} range")
    if target.kind == "f" and array.dtype.kind == "f" and not np.all(np.isfinite(array)):
        raise PayloadError(f"input {spec.name!r}: contains NaN or infinity")
    array = array.astype(target, copy=False)
    return _fit_shape(array, spec)


def _fit_shape(array: Tensor, spec: TensorSpec) -> Tensor:
    """``array`` in the reading's shape. A flat list with the right number of elements fills
    a static shape; any other nesting must be the shape itself: ``[[1, 2, 3, 4], [5, 6, 7,
    8]]`` for a reading of shape [8] is two readings in one message, or a reading shaped
    otherwise, never one reading to flatten silently."""
    shape = spec.item_shape
    if _matches(array.shape, shape):
        return array
    static = all(d is not None for d in shape)
    expected = math.prod(d for d in shape if d is not None)
    if static and array.ndim == 1 and array.size == expected:
        return array.reshape(tuple(d for d in shape if d is not None))
    hint = ""
    if static and array.size == expected:
        hint = (
            f": nested lists must have the reading's shape (or send a flat list of "
            f"{expected} numbers); a message holds one reading"
        )
    raise PayloadError(
        f"input {spec.name!r} expects shape {spec.describe_shape()} per reading "
        f"({expected if static else 'any number of'} elements), got shape "
        f"{list(array.shape)} ({array.size} elements){hint}"
    )


def _matches(actual: tuple[int, ...], expected: tuple[int | None, ...]) -> bool:
    if actual == expected:  # the common case: a static shape, compared in C
        return True
    return len(actual) == len(expected) and all(
        e is None or a == e for a, e in zip(actual, expected, strict=True)
    )


def _reshape(array: Tensor, shape: tuple[int, ...], where: str) -> Tensor:
    if array.size != math.prod(shape):
        raise PayloadError(
            f"payload has {array.size} elements but {where} {list(shape)} needs {math.prod(shape)}"
        )
    return array.reshape(shape)


def _loads(payload: bytes | bytearray) -> Any:
    """Parse JSON with orjson (about 5x faster than json on sensor payloads); when it refuses,
    ask the json module, which explains errors better and reads the NaN/Infinity that
    Python senders emit, so that the NaN check can name the real problem."""
    try:
        return orjson.loads(payload)
    except orjson.JSONDecodeError:
        pass
    try:
        return json.loads(payload)
    except (ValueError, UnicodeDecodeError) as exc:
        raise PayloadError(f"payload is not valid JSON: {exc}") from exc


_ORJSON_OPTIONS = orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NON_STR_KEYS


def encode_json(document: Mapping[str, Any]) -> bytes:
    """Encode a result or status document; numpy arrays and scalars become JSON numbers.

    orjson writes NaN and infinity as null; callers that must not publish those check
    first (``all_finite``).
    """
    return orjson.dumps(document, default=_json_default, option=_ORJSON_OPTIONS)


_FLOAT_MAX = {np.dtype(t): float(np.finfo(t).max) for t in (np.float16, np.float32, np.float64)}
SMALL_TENSOR = 1024  # elements: up to here all_finite sums Python floats


def all_finite(value: Any) -> bool:
    """False when a float tensor holds NaN or infinity. NaN and infinity carry through a
    sum, and ``math.fsum`` of finite values is exact (it raises only when the sum itself
    overflows, which is checked element by element). A small tensor is summed as Python
    floats: at a few readings a second caches are cold, and starting a numpy reduction then
    costs several times more than ``tolist`` and ``fsum``."""
    if isinstance(value, np.ndarray) and value.dtype.kind == "f":
        if value.size <= SMALL_TENSOR:
            try:
                return math.isfinite(math.fsum(value.ravel().tolist()))
            except OverflowError:
                pass
        return bool(np.isfinite(value).all())
    return True


def _json_default(value: Any) -> Any:
    if isinstance(value, np.ndarray):  # dtypes orjson does not take (float16, object...)
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    raise TypeError(f"cannot encode {type(value).__name__} as JSON")
