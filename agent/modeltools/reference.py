"""``edge-agent model golden``: a golden set's expected outputs from a reference run.

The sample inputs (``INPUTS.npz``, e.g. from ``edge-agent model capture``) go one sample per
run through the reference model on the CPU in full precision: a plain onnxruntime session
with its default graph optimizations, none of the daemon's provider choices. What it gives
is what every device must reproduce within the tolerances.
"""

from __future__ import annotations

import io
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from agent.errors import ModelLoadError, ModelToolError, first_line
from agent.inference.codecs import TensorSpec
from agent.inference.golden import (
    EXPECTED_PREFIX,
    INPUT_PREFIX,
    MAX_GOLDEN_BYTES,
    GoldenSet,
    Tolerances,
    structure_problem,
)

# The private name is the daemon's own reading of a session's inputs (batch axis or not):
# the reference run must describe them exactly as the device will.
from agent.inference.session import describe_inputs
from agent.inference.validation import (
    SampleRunError,
    as_array,
    sample_feeds,
    stack_runs,
    timed_runs,
)

REFERENCE_PROVIDERS = ("CPUExecutionProvider",)
# INPUTS.npz is the operator's own file, but it is still read with bounds: a capture of
# long audio readings can be large, and a corrupt or hostile zip must not fill the memory.
MAX_INPUTS_BYTES = 512 * 1024 * 1024
MAX_INPUTS_DECODED = 1024 * 1024 * 1024
_TOLERANCE_KEYS = ("rtol", "atol", "top1_agreement")
_NUMERIC_KINDS = "biuf"


@dataclass(frozen=True)
class GoldenResult:
    """A golden set made by a reference run, and its ``.npz`` bytes."""

    golden: GoldenSet
    data: bytes
    reference: Path
    ignored: tuple[str, ...]  # keys of INPUTS.npz that were not inputs (a golden set's own)


def plain_session(path: Path) -> ort.InferenceSession:
    """A CPU session of ``path`` with onnxruntime's defaults: the reference run's."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    try:
        return ort.InferenceSession(str(path), options, providers=list(REFERENCE_PROVIDERS))
    except Exception as exc:  # onnxruntime raises its own exception types
        raise ModelLoadError(f"cannot load {path}: {first_line(exc)}") from exc


def input_specs(session: ort.InferenceSession) -> tuple[TensorSpec, ...]:
    """The session's inputs as the daemon describes them."""
    return describe_inputs(session)


def read_inputs(path: Path) -> dict[str, np.ndarray]:
    """The arrays of ``path`` (an ``.npz``), numbers only, read with bounds on the file and
    on what it decompresses to. Raises ``ModelToolError`` naming the file."""
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise ModelToolError(f"cannot read {path}: {exc.strerror}") from exc
    if size > MAX_INPUTS_BYTES:
        raise ModelToolError(
            f"{path} is {size} bytes, more than {MAX_INPUTS_BYTES // 2**20} MiB: a golden set "
            "holds at most 1 MiB anyway, capture fewer readings"
        )
    try:
        with zipfile.ZipFile(path) as archive:
            declared = sum(member.file_size for member in archive.infolist())
    except (zipfile.BadZipFile, OSError) as exc:
        raise ModelToolError(f"{path} is not an .npz file: {exc}") from exc
    if declared > MAX_INPUTS_DECODED:
        raise ModelToolError(
            f"{path}: its arrays decompress to {declared} bytes, more than "
            f"{MAX_INPUTS_DECODED // 2**20} MiB"
        )
    arrays: dict[str, np.ndarray] = {}
    try:
        with np.load(path, allow_pickle=False) as archive:
            for key in archive.files:
                arrays[key] = np.asarray(archive[key])
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
        # allow_pickle=False: an object array raises ValueError instead of running code
        raise ModelToolError(f"{path}: cannot read its arrays: {exc}") from exc
    for key, array in arrays.items():
        if array.dtype.kind not in _NUMERIC_KINDS:
            raise ModelToolError(
                f"{path}: array {key!r} has dtype {array.dtype}: inputs are numbers"
            )
    return arrays


def match_inputs(
    arrays: Mapping[str, np.ndarray], specs: Sequence[TensorSpec], source: str
) -> tuple[dict[str, np.ndarray], tuple[str, ...]]:
    """The model's inputs from ``arrays``: ``input:<name>`` or a bare ``<name>``. A golden
    set's own keys (``expected:*``, the tolerances) are ignored and returned as such; any
    other key, a missing input or differing sample counts raise ``ModelToolError``."""
    names = [spec.name for spec in specs]
    takes = ", ".join(names)
    inputs: dict[str, np.ndarray] = {}
    ignored: list[str] = []
    for key, array in arrays.items():
        bare = key[len(INPUT_PREFIX) :] if key.startswith(INPUT_PREFIX) else key
        if bare not in names and (key.startswith(EXPECTED_PREFIX) or key in _TOLERANCE_KEYS):
            ignored.append(key)
            continue
        if bare not in names:
            raise ModelToolError(
                f"{source}: array {key!r} is not an input of the model (it takes {takes})"
            )
        if bare in inputs:
            raise ModelToolError(f"{source}: input {bare!r} is given twice ({key!r} and another)")
        if array.ndim == 0:
            raise ModelToolError(
                f"{source}: {key!r} is a scalar: the first axis must count the samples"
            )
        inputs[bare] = array
    missing = [name for name in names if name not in inputs]
    if missing:
        raise ModelToolError(
            f"{source} lacks the model input {', '.join(map(repr, missing))} (it takes {takes}; "
            "give each as input:<name>, one sample per row)"
        )
    rows = {name: int(array.shape[0]) for name, array in inputs.items()}
    if len(set(rows.values())) > 1:
        listed = ", ".join(f"{name} {count}" for name, count in rows.items())
        raise ModelToolError(f"{source}: the inputs hold different numbers of samples ({listed})")
    return inputs, tuple(ignored)


def reference_outputs(
    session: ort.InferenceSession, inputs: Mapping[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """Every output of ``session`` for each sample of ``inputs``, run one sample at a time,
    as arrays with one row per sample. Raises ``ModelToolError``."""
    specs = input_specs(session)
    feeds, problems = sample_feeds(GoldenSet(inputs, {}), specs)
    if problems:
        raise ModelToolError("; ".join(problems))

    def run(feed: dict[str, np.ndarray]) -> list[Any]:
        outputs: list[Any] = session.run(None, feed)
        return outputs

    try:
        results = timed_runs(run)(feeds)
    except SampleRunError as exc:
        raise ModelToolError(f"the reference run failed: {exc}") from exc
    names = [output.name for output in session.get_outputs()]
    expected: dict[str, np.ndarray] = {}
    for position, name in enumerate(names):
        try:
            expected[name] = stack_runs([as_array(outputs[position]) for outputs, _ in results])
        except ValueError as exc:  # per-sample outputs of differing shapes cannot stack
            raise ModelToolError(
                f"output {name!r} has a different shape from one sample to the next: a golden "
                f"set needs one shape per output ({exc})"
            ) from exc
    return expected


def interface_problems(model: ort.InferenceSession, reference: ort.InferenceSession) -> list[str]:
    """How ``model``'s inputs and outputs differ from the reference's (none: it may be judged
    by the reference's outputs)."""
    problems: list[str] = []
    ours = {spec.name: spec for spec in input_specs(model)}
    theirs = {spec.name: spec for spec in input_specs(reference)}
    for name in theirs.keys() - ours.keys():
        problems.append(f"the model lacks the reference's input {name!r}")
    for name in ours.keys() - theirs.keys():
        problems.append(f"the model takes input {name!r}, which the reference lacks")
    for name in ours.keys() & theirs.keys():
        a, b = ours[name], theirs[name]
        if a.dtype != b.dtype or a.batched != b.batched or len(a.item_shape) != len(b.item_shape):
            problems.append(
                f"input {name!r}: the model takes {a.dtype} {a.describe_shape()}, the reference "
                f"{b.dtype} {b.describe_shape()}"
            )
    model_outputs = {o.name: o.type for o in model.get_outputs()}
    for output in reference.get_outputs():
        if output.name not in model_outputs:
            problems.append(f"the model has no output {output.name!r} (the reference has)")
        elif model_outputs[output.name] != output.type:
            problems.append(
                f"output {output.name!r}: the model gives {model_outputs[output.name]}, the "
                f"reference {output.type}"
            )
    return sorted(problems)


def make_golden(
    model_path: Path,
    inputs_path: Path,
    tolerances: Tolerances,
    reference_path: Path | None = None,
) -> GoldenResult:
    """The golden set of ``model_path`` for the samples in ``inputs_path``, its expected
    outputs from ``reference_path`` (default: the model itself). Raises ``ModelToolError``
    (``ModelLoadError`` for a model that does not load)."""
    problem = tolerances.problem()
    if problem is not None:
        raise ModelToolError(problem)
    reference = reference_path or model_path
    session = plain_session(reference)
    if reference_path is not None:
        problems = interface_problems(plain_session(model_path), session)
        if problems:
            raise ModelToolError(
                f"{model_path} does not take the same inputs and give the same outputs as "
                f"{reference_path}: " + "; ".join(problems)
            )
    arrays = read_inputs(inputs_path)
    inputs, ignored = match_inputs(arrays, input_specs(session), str(inputs_path))
    expected = reference_outputs(session, inputs)
    golden = GoldenSet(inputs, expected, tolerances)
    problem = structure_problem(golden)
    if problem is not None:
        raise ModelToolError(f"{inputs_path}: {problem}")
    data = golden.to_bytes()
    if len(data) > MAX_GOLDEN_BYTES:
        fit = samples_that_fit(golden)
        raise ModelToolError(
            f"the golden set would be {len(data)} bytes, more than {MAX_GOLDEN_BYTES} (1 MiB), "
            f"which devices refuse: {fit} of its {golden.samples} samples fit"
            + (" (use fewer samples, e.g. `model capture --count`)" if fit else "")
        )
    return GoldenResult(golden, data, reference, ignored)


def samples_that_fit(golden: GoldenSet) -> int:
    """How many of ``golden``'s first samples fit in ``MAX_GOLDEN_BYTES`` (compressed sizes
    do not scale exactly with the count, so this measures: a binary search)."""
    low, high = 0, golden.samples  # low fits (nothing always does), high does not
    while high - low > 1:
        middle = (low + high) // 2
        if len(_first(golden, middle).to_bytes()) <= MAX_GOLDEN_BYTES:
            low = middle
        else:
            high = middle
    return low


def _first(golden: GoldenSet, count: int) -> GoldenSet:
    return GoldenSet(
        {name: array[:count] for name, array in golden.inputs.items()},
        {name: array[:count] for name, array in golden.expected.items()},
        golden.tolerances,
    )


def describe_arrays(arrays: Mapping[str, np.ndarray]) -> str:
    """``x [200, 64] float32, y [200, 8] float32``."""
    return ", ".join(f"{name} {list(array.shape)} {array.dtype}" for name, array in arrays.items())


def npz_bytes(arrays: Mapping[str, np.ndarray]) -> bytes:
    """``arrays`` as a compressed ``.npz``."""
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **dict(arrays))  # type: ignore[arg-type]
    return buffer.getvalue()
