"""Golden sets: the npz format, its bounds on hostile files, and the comparison (pure)."""

from __future__ import annotations

import io
import os
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent.errors import GoldenSetError
from agent.inference.golden import (
    DEFAULT_ATOL,
    DEFAULT_RTOL,
    MAX_DECODED_BYTES,
    MAX_GOLDEN_BYTES,
    GoldenSet,
    Tolerances,
    compare,
    golden_path_for,
    parse_golden,
    read_golden_file,
    structure_problem,
)

SOURCE = "vib.golden.npz"


def npz(**arrays: Any) -> bytes:
    """``arrays`` saved as a compressed npz (keys may hold ':' through ``**``)."""
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    return buffer.getvalue()


def zip_of(members: dict[str, bytes]) -> bytes:
    """A deflated zip holding ``members`` as given (for files np.savez would not write)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def npy(array: np.ndarray, allow_pickle: bool = False) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=allow_pickle)
    return buffer.getvalue()


def simple(**extra: Any) -> dict[str, Any]:
    """The arrays of a valid 3-sample set: input x [3, 4], expected y [3, 2]."""
    arrays: dict[str, Any] = {
        "input:x": np.arange(12, dtype=np.float32).reshape(3, 4),
        "expected:y": np.ones((3, 2), np.float32),
    }
    arrays.update(extra)
    return arrays


def rejected(data: bytes) -> str:
    with pytest.raises(GoldenSetError) as caught:
        parse_golden(data, SOURCE)
    message = str(caught.value)
    assert message.startswith(SOURCE), message
    return message


def one_output(expected: np.ndarray, tolerances: Tolerances | None = None) -> GoldenSet:
    return GoldenSet(
        {"x": np.zeros((len(expected), 1), np.float32)},
        {"y": expected},
        tolerances or Tolerances(),
    )


# -- the format ------------------------------------------------------------------------------


def test_round_trip_keeps_arrays_dtypes_and_tolerances() -> None:
    """to_bytes then parse_golden gives back the same inputs, outputs and tolerances."""
    golden = GoldenSet(
        inputs={
            "x": np.random.default_rng(0).standard_normal((5, 4)).astype(np.float32),
            "n": np.arange(5, dtype=np.int64),
        },
        expected={
            "label": np.array([0, 1, 1, 0, 2], np.int64),
            "/model/probabilities:0": np.full((5, 3), 1 / 3, np.float32),
        },
        tolerances=Tolerances(rtol=1e-2, atol=1e-4, top1_agreement=0.99),
    )
    back = parse_golden(golden.to_bytes(), SOURCE)
    assert back.samples == 5
    assert set(back.inputs) == {"x", "n"}
    assert set(back.expected) == {"label", "/model/probabilities:0"}
    for name, array in golden.inputs.items():
        assert back.inputs[name].dtype == array.dtype
        np.testing.assert_array_equal(back.inputs[name], array)
    for name, array in golden.expected.items():
        assert back.expected[name].dtype == array.dtype
        np.testing.assert_array_equal(back.expected[name], array)
    assert back.tolerances == golden.tolerances
    assert back.with_tolerances(Tolerances()).tolerances == Tolerances()


def test_tolerances_default_when_absent_and_stored_when_given() -> None:
    """Without rtol/atol the defaults 1e-3 / 1e-5 apply; stored values win; to_dict names
    top1_agreement only when set."""
    default = parse_golden(npz(**simple()), SOURCE).tolerances
    assert (default.rtol, default.atol, default.top1_agreement) == (1e-3, 1e-5, None)
    assert (DEFAULT_RTOL, DEFAULT_ATOL) == (1e-3, 1e-5)
    assert default.to_dict() == {"rtol": 1e-3, "atol": 1e-5}
    stored = parse_golden(
        npz(**simple(rtol=np.float64(0.05), atol=np.int64(0), top1_agreement=np.float32(0.5))),
        SOURCE,
    ).tolerances
    assert stored == Tolerances(rtol=0.05, atol=0.0, top1_agreement=0.5)
    assert stored.to_dict() == {"rtol": 0.05, "atol": 0.0, "top1_agreement": 0.5}


def test_golden_path_is_beside_the_model() -> None:
    """vib.onnx -> vib.golden.npz in the same folder."""
    assert golden_path_for(Path("/m/vib.onnx")) == Path("/m/vib.golden.npz")
    assert golden_path_for(Path("/m/a.b.onnx")) == Path("/m/a.b.golden.npz")


# -- rejected files --------------------------------------------------------------------------


def test_not_a_zip_is_rejected() -> None:
    """Bytes that are no zip archive (an .npy, text, nothing)."""
    for data in (b"", b"hello", npy(np.zeros(3))):
        assert "not an .npz file" in rejected(data)


def test_a_member_that_is_not_npy_is_rejected() -> None:
    """A zip with a README.txt beside the arrays."""
    data = zip_of({"input:x.npy": npy(np.zeros((1, 2))), "README.txt": b"hi"})
    assert "member 'README.txt' is not a .npy array" in rejected(data)


def test_pickled_object_arrays_are_rejected_unread() -> None:
    """An object array (np.save with allow_pickle) is never unpickled."""
    payload = npy(np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    data = zip_of({"input:x.npy": payload, "expected:y.npy": npy(np.zeros((2, 1)))})
    message = rejected(data)
    assert "'input:x' has dtype object: golden sets hold numbers" in message


def test_non_numeric_dtypes_are_rejected() -> None:
    """Strings and complex numbers are not golden data."""
    assert "has dtype <U1" in rejected(npz(**simple(**{"expected:s": np.array(["a"] * 3)})))
    assert "has dtype complex" in rejected(npz(**simple(**{"expected:c": np.ones(3, complex)})))


def test_a_file_over_one_mib_is_rejected() -> None:
    """1 MiB is the cap, before anything is decompressed."""
    noise = np.random.default_rng(0).standard_normal((MAX_GOLDEN_BYTES // 8 + 100, 1))
    data = npz(**{"input:x": noise, "expected:y": noise})
    assert len(data) > MAX_GOLDEN_BYTES
    message = rejected(data)
    assert f"more than {MAX_GOLDEN_BYTES} (1 MiB)" in message


def test_a_zip_bomb_stops_at_64_mib() -> None:
    """A small file whose arrays decompress past 64 MiB, in one member or in two."""
    big = np.zeros((MAX_DECODED_BYTES // 8 + 16, 1))
    one = npz(**{"input:x": big, "expected:y": np.zeros((len(big), 1), np.uint8)})
    assert len(one) < MAX_GOLDEN_BYTES
    assert "decompress to more than 64 MiB" in rejected(one)
    half = np.zeros((MAX_DECODED_BYTES // 16 + 16, 1))
    two = npz(**{"input:x": half, "expected:y": half})
    assert len(two) < MAX_GOLDEN_BYTES
    assert "decompress to more than 64 MiB" in rejected(two)


def test_an_npy_header_promising_more_data_than_it_holds_is_rejected() -> None:
    """numpy allocates what a header declares: a header claiming 8 TB is refused first."""
    buffer = io.BytesIO()
    header = {"descr": "<f8", "fortran_order": False, "shape": (999999999999, 1)}
    np.lib.format.write_array_header_1_0(buffer, header)
    lying = buffer.getvalue() + bytes(32)
    data = zip_of({"input:x.npy": lying, "expected:y.npy": npy(np.zeros((2, 1)))})
    message = rejected(data)
    assert "'input:x' is not a valid .npy" in message
    assert "header declares [999999999999, 1] float64" in message


def test_a_corrupt_npy_is_rejected() -> None:
    """Bytes in a .npy member that are no npy at all."""
    data = zip_of({"input:x.npy": b"garbage!", "expected:y.npy": npy(np.zeros((2, 1)))})
    assert "'input:x' is not a valid .npy" in rejected(data)


def test_an_array_twice_is_rejected() -> None:
    """Two members of one name: which would count is not for a zip reader to decide."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("input:x.npy", npy(np.zeros((2, 1))))
        archive.writestr("expected:y.npy", npy(np.zeros((2, 1))))
        with pytest.warns(UserWarning, match="Duplicate name"):
            archive.writestr("expected:y.npy", npy(np.ones((2, 1))))
    assert "'expected:y' appears twice" in rejected(buffer.getvalue())


def test_different_sample_counts_are_rejected() -> None:
    """Every array holds one row per sample."""
    message = rejected(npz(**simple(**{"expected:z": np.zeros((4, 1))})))
    assert "different numbers of samples" in message
    assert "expected:z 4" in message
    assert "input:x 3" in message


def test_scalars_are_rejected() -> None:
    """An input or expected output without a sample axis."""
    message = rejected(npz(**simple(**{"input:x": np.float32(1)})))
    assert "input:x is a scalar" in message
    assert "expected:y is a scalar" in rejected(npz(**simple(**{"expected:y": np.float32(1)})))


def test_zero_samples_are_rejected() -> None:
    """A set of no samples checks nothing."""
    empty = {"input:x": np.zeros((0, 4)), "expected:y": np.zeros((0, 2))}
    assert "0 samples" in rejected(npz(**empty))


def test_unknown_keys_are_rejected() -> None:
    """Anything but input:, expected:, rtol, atol and top1_agreement; 'input:' alone too."""
    assert "unexpected array 'comment'" in rejected(npz(**simple(comment=np.zeros(3))))
    assert "unexpected array 'input:'" in rejected(npz(**simple(**{"input:": np.zeros(3)})))


def test_no_inputs_or_no_expected_arrays_are_rejected() -> None:
    """A set needs both halves."""
    assert "no expected:<output name> arrays" in rejected(npz(**{"input:x": np.zeros((2, 1))}))
    assert "no input:<name> arrays" in rejected(npz(**{"expected:y": np.zeros((2, 1))}))


@pytest.mark.parametrize(
    ("key", "value", "fragment"),
    [
        ("rtol", np.float64(-1), "rtol must be a finite number >= 0"),
        ("atol", np.float64(np.nan), "atol must be a finite number >= 0"),
        ("rtol", np.float64(np.inf), "rtol must be a finite number >= 0"),
        ("top1_agreement", np.float64(1.5), "top1_agreement must be in (0, 1]"),
        ("top1_agreement", np.float64(0), "top1_agreement must be in (0, 1]"),
        ("rtol", np.array([1e-3, 1e-3]), "rtol must be a single number"),
        ("atol", np.array(True), "atol must be a single number"),
    ],
)
def test_bad_tolerances_are_rejected(key: str, value: np.ndarray, fragment: str) -> None:
    """Negative, NaN or infinite tolerances, an agreement outside (0, 1], non-scalars."""
    assert fragment in rejected(npz(**simple(**{key: value})))


def test_structure_problem_of_a_hand_made_set() -> None:
    """The same checks on a set built in code (an update's, a tool's)."""
    good = GoldenSet({"x": np.zeros((2, 1))}, {"y": np.zeros((2, 1))})
    assert structure_problem(good) is None
    assert "no input" in str(structure_problem(GoldenSet({}, {"y": np.zeros((2, 1))})))
    bad = good.with_tolerances(Tolerances(rtol=-1))
    assert "rtol must be" in str(structure_problem(bad))


# -- reading the file ------------------------------------------------------------------------


def test_read_golden_file_reads_a_regular_file(tmp_path: Path) -> None:
    """The happy path: the parsed set, errors naming the path."""
    path = tmp_path / "vib.golden.npz"
    path.write_bytes(npz(**simple()))
    assert read_golden_file(path).samples == 3
    path.write_bytes(b"nope")
    with pytest.raises(GoldenSetError, match=f"^{path}: not an .npz file"):
        read_golden_file(path)


def test_read_golden_file_refuses_a_symlink(tmp_path: Path) -> None:
    """A symlink is not followed, even to a valid set."""
    real = tmp_path / "real.npz"
    real.write_bytes(npz(**simple()))
    link = tmp_path / "vib.golden.npz"
    link.symlink_to(real)
    with pytest.raises(GoldenSetError, match="is a symlink: refused"):
        read_golden_file(link)


def test_read_golden_file_refuses_a_fifo_and_a_folder(tmp_path: Path) -> None:
    """A FIFO (which would block a plain open) and a folder are no regular files."""
    fifo = tmp_path / "fifo.golden.npz"
    os.mkfifo(fifo)
    with pytest.raises(GoldenSetError, match="is not a regular file"):
        read_golden_file(fifo)
    folder = tmp_path / "dir.golden.npz"
    folder.mkdir()
    with pytest.raises(GoldenSetError, match="is not a regular file"):
        read_golden_file(folder)


def test_read_golden_file_missing_and_too_big(tmp_path: Path) -> None:
    """A missing file, and one over 1 MiB (refused by its size, unread)."""
    with pytest.raises(GoldenSetError, match="not found"):
        read_golden_file(tmp_path / "none.npz")
    big = tmp_path / "big.npz"
    with big.open("wb") as handle:
        handle.truncate(MAX_GOLDEN_BYTES + 1)
    with pytest.raises(GoldenSetError, match="more than 1048576"):
        read_golden_file(big)


# -- compare ---------------------------------------------------------------------------------


def test_within_tolerance_passes_with_its_errors_measured() -> None:
    """Outputs off by less than atol + rtol * |expected| pass; the errors are reported."""
    expected = np.linspace(1, 2, 12, dtype=np.float32).reshape(3, 4)
    result = compare(one_output(expected), {"y": expected * (1 + 5e-4)})
    assert result.passed
    assert result.problems == ()
    assert result.samples == 3
    assert 0 < result.max_abs_err < 2e-3
    assert result.max_rel_err == pytest.approx(5e-4, rel=1e-2)
    assert result.top1_agreement is None


def test_out_of_tolerance_names_output_worst_sample_element_and_error() -> None:
    """The problem says which output, how many samples, the worst sample and element, what
    was got and expected, and the error against its allowance."""
    expected = np.zeros((3, 2, 4), np.float32)
    got = expected.copy()
    got[0, 0, 0] = 0.01
    got[2, 1, 3] = 0.5
    result = compare(one_output(expected), {"y": got})
    assert not result.passed
    (problem,) = result.problems
    assert problem.startswith("output 'y' is out of tolerance in 2 of 3 samples")
    assert "worst: sample 2, element [1, 3]: got 0.5, expected 0, error 0.5 > allowed 1e-05" in (
        problem
    )
    assert result.max_abs_err == pytest.approx(0.5)


def test_an_expected_zero_does_not_make_the_relative_error_infinite() -> None:
    """A ReLU output's exact zeros: the relative error is measured where expected != 0."""
    expected = np.array([[0.0, 2.0], [0.0, 4.0]])
    result = compare(one_output(expected), {"y": expected + 1e-6})
    assert result.passed
    assert result.max_rel_err == pytest.approx(5e-7)


def test_nan_against_a_number_fails_nan_against_nan_passes() -> None:
    """NaN where a number was expected (or the reverse) is the worst error; NaN == NaN."""
    expected = np.array([[1.0], [np.nan]])
    assert compare(one_output(expected), {"y": np.array([[1.0], [np.nan]])}).passed
    got_nan = compare(one_output(expected), {"y": np.array([[np.nan], [np.nan]])})
    assert not got_nan.passed
    assert "worst: sample 0, element [0]: got nan, expected 1" in got_nan.problems[0]
    assert got_nan.max_abs_err == np.inf
    lost_nan = compare(one_output(expected), {"y": np.array([[1.0], [3.0]])})
    assert not lost_nan.passed
    assert "sample 1" in lost_nan.problems[0]


def test_infinities_must_match_exactly() -> None:
    """inf == inf passes; a finite number where inf was expected (or the reverse) fails."""
    expected = np.array([[np.inf], [-np.inf], [1.0]])
    assert compare(one_output(expected), {"y": expected.copy()}).passed
    for got in (
        [[5.0], [-np.inf], [1.0]],
        [[np.inf], [np.inf], [1.0]],
        [[np.inf], [-np.inf], [np.inf]],
    ):
        assert not compare(one_output(expected), {"y": np.array(got)}).passed, got


def test_missing_output_wrong_shape_and_non_numbers_are_problems() -> None:
    """What the model gives that cannot be compared is named, not raised."""
    golden = one_output(np.zeros((2, 3)))
    missing = compare(golden, {"z": np.zeros((2, 3))})
    assert missing.problems == ("the model has no output 'y' (it gives z)",)
    shape = compare(golden, {"y": np.zeros((2, 4))})
    assert shape.problems == (
        "output 'y' has shape [2, 4], the golden set expects [2, 3] (samples first)",
    )
    strings = compare(one_output(np.array([1, 2])), {"y": np.array(["cat", "dog"])})
    assert strings.problems == ("output 'y' holds <U3, the golden set expects numbers (int64)",)


def test_exact_tolerances_compare_exactly() -> None:
    """rtol = atol = 0: any difference fails, equality passes."""
    golden = one_output(np.array([[1.0, 2.0]]), Tolerances(rtol=0, atol=0))
    assert compare(golden, {"y": np.array([[1.0, 2.0]])}).passed
    result = compare(golden, {"y": np.array([[1.0, 2.0 + 1e-12]])})
    assert not result.passed
    assert "allowed 0" in result.problems[0]


def test_labels_without_top1_are_reported_and_held_to_tolerance() -> None:
    """Integer labels: their agreement is reported; a different label is out of tolerance."""
    golden = one_output(np.array([1, -1, 1, 1], np.int64))
    same = compare(golden, {"y": np.array([1, -1, 1, 1], np.int64)})
    assert same.passed
    assert same.top1_agreement == 1.0
    flipped = compare(golden, {"y": np.array([1, 1, 1, 1], np.int64)})
    assert not flipped.passed
    assert flipped.top1_agreement == 0.75
    assert "sample 1" in flipped.problems[0]


def classifier_set(top1: float | None) -> GoldenSet:
    """Labels [4], class scores [4, 3] and a regression output [4, 1]."""
    probabilities = np.array(
        [[0.8, 0.1, 0.1], [0.1, 0.8, 0.1], [0.1, 0.1, 0.8], [0.2, 0.7, 0.1]], np.float32
    )
    return GoldenSet(
        {"x": np.zeros((4, 2), np.float32)},
        {
            "label": np.array([0, 1, 2, 1], np.int64),
            "probabilities": probabilities,
            "value": np.array([[1.0], [2.0], [3.0], [4.0]], np.float32),
        },
        Tolerances(top1_agreement=top1),
    )


def test_top1_judges_labels_and_scores_by_agreement_and_the_rest_by_tolerance() -> None:
    """With top1_agreement, labels and class scores pass when the top class agrees often
    enough (however far the scores moved); other outputs still need rtol/atol."""
    golden = classifier_set(top1=0.7)
    got = {
        "label": np.array([0, 1, 2, 2], np.int64),  # 3 of 4 agree
        "probabilities": np.array(
            [[0.5, 0.3, 0.2], [0.3, 0.6, 0.1], [0.3, 0.3, 0.4], [0.1, 0.5, 0.4]], np.float32
        ),  # far off, but every argmax agrees
        "value": golden.expected["value"].copy(),
    }
    result = compare(golden, got)
    assert result.passed, result.problems
    assert result.top1_agreement == 0.75
    strict = compare(golden.with_tolerances(Tolerances(top1_agreement=0.8)), got)
    assert strict.problems == (
        "output 'label': top-1 agreement 0.7500 is below 0.8 (1 of 4 samples disagree, the "
        "first is sample 3)",
    )
    moved = dict(got, value=got["value"] + 0.5)
    (problem,) = compare(golden, moved).problems
    assert problem.startswith("output 'value' is out of tolerance in 4 of 4 samples")


def test_top1_on_class_scores_names_the_first_disagreement() -> None:
    """A class score output whose argmax flips on sample 2."""
    golden = classifier_set(top1=0.99)
    got = {name: array.copy() for name, array in golden.expected.items()}
    got["probabilities"][2] = [0.9, 0.05, 0.05]
    (problem,) = compare(golden, got).problems
    assert problem.startswith("output 'probabilities': top-1 agreement 0.7500 is below 0.99")
    assert "the first is sample 2" in problem


def test_top1_without_a_classifiable_output_is_a_problem() -> None:
    """top1_agreement on a regressor (float outputs with a last axis of 1) cannot be judged."""
    golden = one_output(np.ones((3, 1), np.float32), Tolerances(top1_agreement=0.9))
    result = compare(golden, {"y": np.ones((3, 1), np.float32)})
    assert result.problems == (
        "top1_agreement is set but no output holds labels or class scores (integers, or a "
        "last axis of 2 or more)",
    )


def test_mangled_files_raise_only_golden_set_errors() -> None:
    """Bytes of a valid set flipped, cut or spliced at random: parsed or refused with a
    GoldenSetError, never another exception (a load must fail truthfully, not crash)."""
    valid = npz(**simple(rtol=np.float64(0.01)))
    rng = np.random.default_rng(11)
    outcomes = {"parsed": 0, "refused": 0}
    for _ in range(400):
        data = bytearray(valid)
        kind = rng.integers(3)
        if kind == 0:
            for position in rng.integers(len(data), size=int(rng.integers(1, 8))):
                data[position] = int(rng.integers(256))
        elif kind == 1:
            data = data[: int(rng.integers(len(data)))]
        else:
            start = int(rng.integers(len(data)))
            data[start:start] = rng.bytes(int(rng.integers(1, 64)))
        try:
            parse_golden(bytes(data), SOURCE)
        except GoldenSetError:
            outcomes["refused"] += 1
        else:
            outcomes["parsed"] += 1
    assert outcomes["refused"] > 0
