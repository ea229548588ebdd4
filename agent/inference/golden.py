"""Golden sets: sample inputs and the outputs a model must give for them, and the comparison.

A golden set is an ``.npz`` file: ``input:<name>`` arrays (one sample per row of the first
axis), ``expected:<output name>`` arrays with the same number of rows, and optional scalars
``rtol``, ``atol`` and ``top1_agreement``. It arrives from a signed update or sits beside a
model in ``models_dir``, so it is read as hostile input: at most ``MAX_GOLDEN_BYTES`` of file,
at most ``MAX_DECODED_BYTES`` once decompressed, numbers only (no pickles, no objects).
Everything here is pure: running the samples through a session is ``validation``'s job.
"""

from __future__ import annotations

import io
import math
import os
import stat
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from agent.errors import GoldenSetError

MAX_GOLDEN_BYTES = 1024 * 1024  # the npz itself, as DESIGN caps it in a manifest
MAX_DECODED_BYTES = 64 * 1024 * 1024  # its arrays decompressed: a zip bomb stops here
MAX_ARRAYS = 256
MAX_SAMPLES = 100_000
DEFAULT_RTOL = 1e-3
DEFAULT_ATOL = 1e-5
INPUT_PREFIX = "input:"
EXPECTED_PREFIX = "expected:"
GOLDEN_SUFFIX = ".golden.npz"
_NUMERIC_KINDS = "biuf"  # bool, signed, unsigned, float


@dataclass(frozen=True)
class Tolerances:
    """How close a model's outputs must come to the expected ones.

    Elementwise: ``|got - expected| <= atol + rtol * |expected|`` (``numpy.allclose``). With
    ``top1_agreement`` the set is a classifier's: its label outputs (integers) and class
    score outputs (a last axis of two or more) must agree on the top class for at least that
    fraction of the samples, and only the other outputs are held to ``rtol``/``atol``.
    """

    rtol: float = DEFAULT_RTOL
    atol: float = DEFAULT_ATOL
    top1_agreement: float | None = None

    def problem(self) -> str | None:
        """Why these tolerances are unusable, or None."""
        for key, value in (("rtol", self.rtol), ("atol", self.atol)):
            if not math.isfinite(value) or value < 0:
                return f"{key} must be a finite number >= 0, got {value!r}"
        top1 = self.top1_agreement
        if top1 is not None and not (math.isfinite(top1) and 0 < top1 <= 1):
            return f"top1_agreement must be in (0, 1], got {top1!r}"
        return None

    def to_dict(self) -> dict[str, Any]:
        """The tolerances as a manifest's ``validation`` and the reports name them."""
        document: dict[str, Any] = {"rtol": self.rtol, "atol": self.atol}
        if self.top1_agreement is not None:
            document["top1_agreement"] = self.top1_agreement
        return document


@dataclass(frozen=True)
class GoldenSet:
    """Sample inputs by model input name, expected outputs by output name, tolerances."""

    inputs: Mapping[str, np.ndarray]
    expected: Mapping[str, np.ndarray]
    tolerances: Tolerances = field(default_factory=Tolerances)

    @property
    def samples(self) -> int:
        """How many samples (rows of the first axis) the set holds."""
        return int(next(iter(self.inputs.values())).shape[0])

    def with_tolerances(self, tolerances: Tolerances) -> GoldenSet:
        """The same samples judged by other tolerances (a manifest's own win)."""
        return replace(self, tolerances=tolerances)

    def to_bytes(self) -> bytes:
        """The set as a compressed ``.npz``."""
        arrays: dict[str, Any] = {f"{INPUT_PREFIX}{k}": v for k, v in self.inputs.items()}
        arrays.update({f"{EXPECTED_PREFIX}{k}": v for k, v in self.expected.items()})
        arrays["rtol"] = np.float64(self.tolerances.rtol)
        arrays["atol"] = np.float64(self.tolerances.atol)
        if self.tolerances.top1_agreement is not None:
            arrays["top1_agreement"] = np.float64(self.tolerances.top1_agreement)
        buffer = io.BytesIO()
        np.savez_compressed(buffer, **arrays)
        return buffer.getvalue()


@dataclass(frozen=True)
class Comparison:
    """How a model's outputs on a golden set compare with the expected ones."""

    samples: int
    max_abs_err: float
    max_rel_err: float
    top1_agreement: float | None
    problems: tuple[str, ...]  # empty: within the tolerances

    @property
    def passed(self) -> bool:
        """Whether every output is within the tolerances."""
        return not self.problems


def golden_path_for(model_path: Path) -> Path:
    """The golden set an operator may put beside a model: ``vib.onnx`` -> ``vib.golden.npz``."""
    return model_path.with_name(model_path.stem + GOLDEN_SUFFIX)


def reference_path_for(state_dir: Path, model: str) -> Path:
    """Where the golden set of the last signed update of ``model`` that carried one is kept
    (the drift reference ``golden`` prefers it to the set beside the model file)."""
    return state_dir / "references" / f"{model}.npz"


def read_golden_file(path: Path) -> GoldenSet:
    """Read and parse a golden set file without following a symlink; ``GoldenSetError``."""
    return parse_golden(read_bounded(path, "golden set", MAX_GOLDEN_BYTES), str(path))


def read_npz_file(path: Path, what: str, max_bytes: int) -> dict[str, np.ndarray]:
    """The arrays of an ``.npz`` file of at most ``max_bytes``, numbers only, read without
    following a symlink and with a bound on what it decompresses to; ``GoldenSetError``
    names ``what`` it is and what is wrong."""
    return _read_arrays(read_bounded(path, what, max_bytes), str(path))


def read_bounded(path: Path, what: str, max_bytes: int) -> bytes:
    """The bytes of the regular file ``path`` (not a symlink), at most ``max_bytes``."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError as exc:
        raise GoldenSetError(f"{what} {path} not found") from exc
    except OSError as exc:
        if os.path.islink(path):
            raise GoldenSetError(f"{what} {path} is a symlink: refused") from exc
        raise GoldenSetError(f"cannot open {what} {path}: {exc.strerror}") from exc
    try:
        # Checked on the descriptor before any read: fdopen refuses a folder with an
        # exception of its own, and a FIFO opened non-blocking must not be read.
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise GoldenSetError(f"{what} {path} is not a regular file")
        if info.st_size > max_bytes:
            raise GoldenSetError(_too_big(str(path), info.st_size, what, max_bytes))
        with os.fdopen(fd, "rb", closefd=False) as handle:
            data = handle.read(max_bytes + 1)
    except OSError as exc:
        raise GoldenSetError(f"cannot read {what} {path}: {exc.strerror}") from exc
    finally:
        os.close(fd)
    if len(data) > max_bytes:
        raise GoldenSetError(_too_big(str(path), len(data), what, max_bytes))
    return data


def parse_golden(data: bytes, source: str) -> GoldenSet:
    """Parse ``.npz`` bytes from ``source`` (named in every error) into a checked set."""
    if len(data) > MAX_GOLDEN_BYTES:
        raise GoldenSetError(_too_big(source, len(data)))
    arrays = _read_arrays(data, source)
    inputs: dict[str, np.ndarray] = {}
    expected: dict[str, np.ndarray] = {}
    scalars: dict[str, float] = {}
    for key, array in arrays.items():
        if key.startswith(INPUT_PREFIX) and len(key) > len(INPUT_PREFIX):
            inputs[key[len(INPUT_PREFIX) :]] = array
        elif key.startswith(EXPECTED_PREFIX) and len(key) > len(EXPECTED_PREFIX):
            expected[key[len(EXPECTED_PREFIX) :]] = array
        elif key in ("rtol", "atol", "top1_agreement"):
            if array.size != 1 or array.dtype.kind not in "iuf":
                raise GoldenSetError(f"{source}: {key} must be a single number")
            scalars[key] = float(array.reshape(()))
        else:
            raise GoldenSetError(
                f"{source}: unexpected array {key!r}: a golden set holds input:<name>, "
                "expected:<output name>, rtol, atol and top1_agreement"
            )
    tolerances = Tolerances(
        rtol=scalars.get("rtol", DEFAULT_RTOL),
        atol=scalars.get("atol", DEFAULT_ATOL),
        top1_agreement=scalars.get("top1_agreement"),
    )
    golden = GoldenSet(inputs, expected, tolerances)
    problem = structure_problem(golden)
    if problem is not None:
        raise GoldenSetError(f"{source}: {problem}")
    return golden


def structure_problem(golden: GoldenSet) -> str | None:
    """Why ``golden`` is not a usable set (no samples, rows that differ, bad tolerances)."""
    if not golden.inputs:
        return "no input:<name> arrays"
    if not golden.expected:
        return "no expected:<output name> arrays (make them with `edge-agent model golden`)"
    rows: dict[str, int] = {}
    for prefix, arrays in ((INPUT_PREFIX, golden.inputs), (EXPECTED_PREFIX, golden.expected)):
        for name, array in arrays.items():
            if array.ndim == 0:
                return f"{prefix}{name} is a scalar: the first axis must count the samples"
            rows[prefix + name] = int(array.shape[0])
    counts = set(rows.values())
    if len(counts) > 1:
        listed = ", ".join(f"{k} {v}" for k, v in rows.items())
        return f"the arrays hold different numbers of samples ({listed})"
    count = counts.pop()
    if not 1 <= count <= MAX_SAMPLES:
        return f"{count} samples: a golden set holds 1 to {MAX_SAMPLES}"
    return golden.tolerances.problem()


def compare(golden: GoldenSet, actual: Mapping[str, np.ndarray]) -> Comparison:
    """Compare a model's outputs (shaped like the expected arrays) with the golden set."""
    tolerances = golden.tolerances
    problems: list[str] = []
    max_abs = max_rel = 0.0
    agreements: list[float] = []
    for name, expected in golden.expected.items():
        got = actual.get(name)
        if got is None:
            problems.append(
                f"the model has no output {name!r} (it gives {', '.join(actual) or 'none'})"
            )
            continue
        if got.dtype.kind not in _NUMERIC_KINDS:
            problems.append(
                f"output {name!r} holds {got.dtype}, the golden set expects numbers "
                f"({expected.dtype})"
            )
            continue
        if got.shape != expected.shape:
            problems.append(
                f"output {name!r} has shape {list(got.shape)}, the golden set expects "
                f"{list(expected.shape)} (samples first)"
            )
            continue
        errors = _errors(got, expected, tolerances)
        max_abs = max(max_abs, errors.max_abs)
        max_rel = max(max_rel, errors.max_rel)
        if tolerances.top1_agreement is not None and _is_classification(expected):
            agreement = _top1(got, expected)
            agreements.append(agreement)
            if agreement < tolerances.top1_agreement:
                problems.append(
                    f"output {name!r}: top-1 agreement {agreement:.4f} is below "
                    f"{tolerances.top1_agreement:g} ({round((1 - agreement) * len(got))} of "
                    f"{len(got)} samples disagree, the first is sample "
                    f"{_first_disagreement(got, expected)})"
                )
        elif expected.dtype.kind in "iub" and tolerances.top1_agreement is None:
            agreements.append(_top1(got, expected))  # a classifier's labels: report it
            if errors.out_of_tolerance:
                problems.append(errors.describe(name, tolerances))
        elif errors.out_of_tolerance:
            problems.append(errors.describe(name, tolerances))
    if tolerances.top1_agreement is not None and not agreements:
        problems.append(
            "top1_agreement is set but no output holds labels or class scores "
            "(integers, or a last axis of 2 or more)"
        )
    return Comparison(
        samples=golden.samples,
        max_abs_err=max_abs,
        max_rel_err=max_rel,
        top1_agreement=min(agreements) if agreements else None,
        problems=tuple(problems),
    )


@dataclass(frozen=True)
class _Errors:
    max_abs: float
    max_rel: float
    bad_samples: int
    worst_sample: int
    worst_index: tuple[int, ...]
    worst_got: float
    worst_expected: float
    samples: int

    @property
    def out_of_tolerance(self) -> bool:
        return self.bad_samples > 0

    def describe(self, name: str, tolerances: Tolerances) -> str:
        allowed = tolerances.atol + tolerances.rtol * abs(self.worst_expected)
        return (
            f"output {name!r} is out of tolerance in {self.bad_samples} of {self.samples} "
            f"samples; worst: sample {self.worst_sample}, element {list(self.worst_index[1:])}: "
            f"got {self.worst_got:.6g}, expected {self.worst_expected:.6g}, error "
            f"{abs(self.worst_got - self.worst_expected):.3g} > allowed {allowed:.3g} "
            f"(atol {tolerances.atol:g} + rtol {tolerances.rtol:g} * |expected|)"
        )


def _errors(got: np.ndarray, expected: np.ndarray, tolerances: Tolerances) -> _Errors:
    got64 = got.astype(np.float64)
    want64 = expected.astype(np.float64)
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        error = np.abs(got64 - want64)
        both_nan = np.isnan(got64) & np.isnan(want64)
        error = np.where(both_nan | (got64 == want64), 0.0, error)  # inf == inf: no error
        error = np.where(np.isnan(error), np.inf, error)  # NaN against a number: worst
        # Relative to the expected value where it is a finite non-zero number; an expected
        # 0 (a ReLU's output) has no relative error, its absolute one counts.
        scale = np.abs(want64)
        measurable = (scale > 0) & np.isfinite(scale)
        relative = np.where(measurable, error / np.where(measurable, scale, 1.0), 0.0)
        allowed = tolerances.atol + tolerances.rtol * scale
        # Out of tolerance: a non-zero error that is infinite (NaN or an infinity against
        # a number) or above its allowance; ``ratio`` ranks the bad ones (inf: the worst).
        bad = (error > 0) & ~(np.isfinite(error) & (error <= allowed))
        ratio = np.where(
            bad, np.where(np.isfinite(error) & (allowed > 0), error / allowed, np.inf), 0.0
        )
    per_sample = bad.reshape(len(bad), -1).any(axis=1)
    errors = _Errors(
        max_abs=float(error.max(initial=0.0)),
        max_rel=float(relative.max(initial=0.0)),
        bad_samples=int(per_sample.sum()),
        worst_sample=0,
        worst_index=(0,),
        worst_got=0.0,
        worst_expected=0.0,
        samples=len(got),
    )
    if not errors.bad_samples:
        return errors
    index = tuple(int(i) for i in np.unravel_index(int(np.argmax(ratio)), ratio.shape))
    return replace(
        errors,
        worst_sample=index[0],
        worst_index=index,
        worst_got=float(got64[index]),
        worst_expected=float(want64[index]),
    )


def _is_classification(expected: np.ndarray) -> bool:
    """Labels (integers) or class scores (a last axis of 2 or more after the sample axis)."""
    return expected.dtype.kind in "iub" or (expected.ndim >= 2 and expected.shape[-1] >= 2)


def _top_classes(values: np.ndarray) -> np.ndarray:
    if values.dtype.kind in "iub":
        return values.reshape(len(values), -1)
    top: np.ndarray = np.argmax(values, axis=-1)
    return top.reshape(len(values), -1)


def _top1(got: np.ndarray, expected: np.ndarray) -> float:
    """The fraction of samples whose top class (or label) is the expected one."""
    if not len(got):
        return 1.0
    same = (_top_classes(got) == _top_classes(expected)).all(axis=1)
    return float(same.mean())


def _first_disagreement(got: np.ndarray, expected: np.ndarray) -> int:
    same = (_top_classes(got) == _top_classes(expected)).all(axis=1)
    return int(np.argmin(same))


def _read_arrays(data: bytes, source: str) -> dict[str, np.ndarray]:
    """The npz members as arrays, each read with a bound on its decompressed size."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
        members = archive.infolist()
    except Exception as exc:  # BadZipFile, NotImplementedError (a version), struct.error...
        raise GoldenSetError(f"{source}: not an .npz file (it is not a zip archive)") from exc
    if len(members) > MAX_ARRAYS:
        raise GoldenSetError(f"{source}: {len(members)} arrays, more than {MAX_ARRAYS}")
    arrays: dict[str, np.ndarray] = {}
    budget = MAX_DECODED_BYTES
    for member in members:
        if not member.filename.endswith(".npy"):
            raise GoldenSetError(f"{source}: member {member.filename!r} is not a .npy array")
        try:
            with archive.open(member) as handle:
                raw = handle.read(budget + 1)
        except Exception as exc:  # zipfile/zlib raise many kinds on a corrupt member
            raise GoldenSetError(
                f"{source}: member {member.filename!r} cannot be read: {exc}"
            ) from exc
        if len(raw) > budget:
            raise GoldenSetError(
                f"{source}: the arrays decompress to more than {MAX_DECODED_BYTES // 2**20} MiB"
            )
        budget -= len(raw)
        key = member.filename[: -len(".npy")]
        if key in arrays:
            raise GoldenSetError(f"{source}: array {key!r} appears twice")
        arrays[key] = _read_npy(raw, source, key)
    return arrays


def _read_npy(raw: bytes, source: str, key: str) -> np.ndarray:
    """One ``.npy``, its header checked first: numpy allocates the array a header declares
    before it reads the data, so a header may not promise more than ``raw`` holds."""
    stream = io.BytesIO(raw)
    try:
        version = np.lib.format.read_magic(stream)
        if version == (1, 0):
            shape, _, dtype = np.lib.format.read_array_header_1_0(stream)
        else:  # 2.0 and 3.0 differ only in the header's text encoding
            shape, _, dtype = np.lib.format.read_array_header_2_0(stream)
    except Exception as exc:  # numpy raises ValueError, OSError, EOFError...
        raise GoldenSetError(f"{source}: array {key!r} is not a valid .npy: {exc}") from exc
    if dtype.hasobject or dtype.kind not in _NUMERIC_KINDS:
        raise GoldenSetError(f"{source}: array {key!r} has dtype {dtype}: golden sets hold numbers")
    held = len(raw) - stream.tell()
    if math.prod(shape) * dtype.itemsize > held:
        raise GoldenSetError(
            f"{source}: array {key!r} is not a valid .npy: its header declares "
            f"{list(shape)} {dtype}, more than the {held} bytes of data it holds"
        )
    stream.seek(0)
    try:
        array: np.ndarray = np.lib.format.read_array(stream, allow_pickle=False)
    except Exception as exc:
        raise GoldenSetError(f"{source}: array {key!r} is not a valid .npy: {exc}") from exc
    return array


def _too_big(
    source: str, size: int, what: str = "golden set", max_bytes: int = MAX_GOLDEN_BYTES
) -> str:
    return (
        f"{source}: {what} is {size} bytes, more than {max_bytes} "
        f"({max_bytes / 2**20:g} MiB): use fewer samples"
    )
