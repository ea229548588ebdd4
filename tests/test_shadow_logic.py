"""Shadow trials as pure logic: how two models' results are judged, how the figures add up,
the verdict, the terms (device settings, manifest block, command line)."""

from __future__ import annotations

import io
import json
import math
import threading
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as paho
import pytest

from agent.cli.main import main
from agent.cli.update_sender import StatusFollower, shadow_line
from agent.config.schema import Postprocess, ShadowConfig
from agent.errors import UpdateRejectedError
from agent.inference.agreement import BatchAgreement, Differences, Judge
from agent.inference.runplan import RunPlan
from agent.inference.shadow import Offered, ShadowTally, ShadowTap, coalesce
from agent.updates.manifest import parse_payload
from agent.updates.shadow_step import verdict
from agent.updates.shadow_terms import ShadowOverride, ShadowTerms, parse_shadow, terms_for
from agent.updates.signing import TrustedKeys
from tests.test_updates import linear

TERMS = ShadowTerms(duration_s=60, min_readings=100, max_disagreement=0.02, max_latency_ratio=1.5)


def test_float_outputs_agree_within_the_tolerances_reading_by_reading() -> None:
    """Batch of 3: the second reading is off by more than atol + rtol * |value|."""
    judge = Judge(("y",), stacked=True, rtol=1e-3, atol=1e-5)
    served = {"y": np.array([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]], np.float32)}
    candidate = {"y": served["y"] + np.array([[1e-4, 0], [0.5, 0], [0, -1e-3]], np.float32)}
    result = judge.compare(served, candidate, 3)
    assert (result.readings, result.disagreeing) == (3, 1)
    assert result.max_abs_err == pytest.approx(0.5)
    figures = result.apart.figures()
    assert figures["mean_abs_err"] == pytest.approx((1e-4 + 0.5 + 1e-3) / 6, rel=1e-3)
    assert figures["max_rel_err"] == pytest.approx(0.5 / 3, rel=1e-3)
    assert figures["mean_rel_err"] == pytest.approx((1e-4 + 0.5 / 3 + 1e-3 / 6) / 6, rel=1e-3)


def test_relative_differences_near_zero_are_taken_against_atol() -> None:
    """A serving value of 0 does not make the relative difference infinite: it is taken
    against atol; a value that is not finite makes every figure infinite (null in JSON)."""
    judge = Judge(("y",), stacked=True, rtol=1e-3, atol=1e-2)
    served = {"y": np.array([[0.0]], np.float32)}
    figures = judge.compare(served, {"y": np.array([[0.005]], np.float32)}, 1).apart.figures()
    assert figures["max_rel_err"] == pytest.approx(0.5, rel=1e-3)
    inf = judge.compare(served, {"y": np.array([[np.inf]], np.float32)}, 1).apart.figures()
    assert inf["mean_abs_err"] == math.inf


def test_labels_compare_exactly_and_maps_by_their_top_class() -> None:
    """An int64 label output and a ZipMap's per-reading maps, as skl2onnx classifiers give."""
    judge = Judge(("label", "probabilities"), stacked=True)
    served = {
        "label": np.array([1, 0], np.int64),
        "probabilities": [{0: 0.2, 1: 0.8}, {0: 0.9, 1: 0.1}],
    }
    candidate = {
        "label": np.array([1, 1], np.int64),
        "probabilities": [{0: 0.3, 1: 0.7}, {0: 0.4, 1: 0.6}],
    }
    result = judge.compare(served, candidate, 2)
    assert result.disagreeing == 1
    assert result.max_abs_err == pytest.approx(0.5)


def test_with_a_threshold_the_flag_is_what_must_agree() -> None:
    """postprocess argmax + threshold 0.5: scores that move but stay on the same side of the
    threshold agree; one that crosses it does not, whatever the raw difference."""
    post = Postprocess(argmax=True, threshold=0.5)
    judge = Judge(("scores",), stacked=True, postprocess=post)
    served = {"scores": np.array([[0.1, 0.9], [0.45, 0.55], [0.7, 0.3]], np.float32)}
    candidate = {"scores": np.array([[0.3, 0.7], [0.55, 0.45], [0.8, 0.2]], np.float32)}
    result = judge.compare(served, candidate, 3)
    assert result.disagreeing == 1  # the second reading's top class changed


def test_a_missing_output_or_another_shape_disagrees() -> None:
    judge = Judge(("y",), stacked=True)
    served = {"y": np.zeros((1, 2), np.float32)}
    assert judge.compare(served, {}, 1).disagreeing == 1
    assert judge.compare(served, {"y": np.zeros((1, 3), np.float32)}, 1).disagreeing == 1
    nan = {"y": np.array([[np.nan, 0]], np.float32)}
    assert judge.compare(served, nan, 1).disagreeing == 1


def test_the_tally_adds_batches_failures_and_latency() -> None:
    tally = ShadowTally()
    apart = Differences(count=8, abs_max=0.25, abs_sum=0.4, rel_max=0.5, rel_sum=0.8)
    tally.add("p", BatchAgreement(4, 1, apart), served_s=0.004, ran_s=0.008)
    tally.add("q", BatchAgreement(2, 0), served_s=0.002, ran_s=0.004)
    tally.failed("q", 2, "the candidate failed: shape")
    figures = tally.figures()
    assert figures["readings"] == 8
    assert figures["disagreement"] == pytest.approx(3 / 8)
    assert figures["max_abs_err"] == 0.25
    assert figures["mean_abs_err"] == 0.05
    assert (figures["max_rel_err"], figures["mean_rel_err"]) == (0.5, 0.1)
    assert figures["latency_ratio"] == pytest.approx(2.0)
    assert figures["latency_ms"]["serving"]["p50"] == pytest.approx(1.0)
    assert figures["errors"] == 2
    assert figures["last_error"] == "the candidate failed: shape"
    assert figures["pipelines"]["q"] == {
        "readings": 4,
        "disagreement": 0.5,
        "max_abs_err": 0.0,
        "mean_abs_err": 0.0,
        "max_rel_err": 0.0,
        "mean_rel_err": 0.0,
    }


def plan(limit: int = 4, state: dict[str, str] | None = None) -> RunPlan:
    """A stacked plan feeding x and fetching y (what coalescing reads of a plan)."""
    return RunPlan((), {}, frozenset(), state or {}, True, limit, ("y",), ("y",))


def offered(shared: RunPlan, size: int, start: float, pipeline: str = "p") -> Offered:
    """A batch of ``size`` readings, x counting up from ``start``, y twice x."""
    x = np.arange(start, start + size, dtype=np.float32)[:, None]
    return Offered(pipeline, shared, None, None, {"x": x}, {"y": x * 2}, size, 0.001)


def test_batches_the_candidate_may_run_together_are_joined_in_order() -> None:
    """Runs of one pipeline's batches join up to the plan's limit, feeds and outputs alike;
    another pipeline, a stateful plan or other trailing shapes break a run."""
    shared = plan(limit=4)
    items = [offered(shared, 1, 0), offered(shared, 2, 1), offered(shared, 1, 3)]
    items += [offered(shared, 1, 4), offered(shared, 1, 5, pipeline="q")]
    joined = coalesce(items)
    assert [item.size for item in joined] == [4, 1, 1]
    first = joined[0]
    assert first.feeds["x"].ravel().tolist() == [0, 1, 2, 3]
    assert first.served["y"].ravel().tolist() == [0, 2, 4, 6]
    assert first.seconds == pytest.approx(0.003)
    judge = Judge(("y",), stacked=True)
    assert judge.compare(first.served, {"y": first.feeds["x"] * 2}, 4).disagreeing == 0
    stateful = plan(limit=4, state={"h_in": "h_out"})
    assert len(coalesce([offered(stateful, 1, 0), offered(stateful, 1, 1)])) == 2
    wide = offered(shared, 1, 0)
    wider = Offered("p", shared, None, None, {"x": np.zeros((1, 2), np.float32)}, {"y": []}, 1, 0)
    assert len(coalesce([wide, wider])) == 2
    maps = [
        Offered("p", shared, None, None, {"x": np.zeros((1, 1))}, {"y": [{"a": 1.0}]}, 1, 0)
        for _ in range(2)
    ]
    assert coalesce(maps)[0].served["y"] == [{"a": 1.0}, {"a": 1.0}]


def test_the_tap_keeps_what_fits_and_counts_the_rest() -> None:
    """A candidate that falls behind loses batches (counted), never blocks the offer."""
    tap = ShadowTap(capacity=2)
    item = Offered("p", None, None, None, {}, {}, 3, 0.001)  # type: ignore[arg-type]
    for _ in range(4):
        tap.offer(item)
    assert len(tap.take(0)) == 2
    assert tap.skipped == 6
    assert tap.take(0.01) == []
    sampled = ShadowTap(sample=0.25)
    for _ in range(2000):
        sampled.offer(item)
    assert 200 < sampled.skipped / 3 + len(sampled.take(0)) < 1000  # about 500 sampled in
    taken: list[list[Offered]] = []
    waiter = threading.Thread(target=lambda: taken.append(tap.take(5)))
    waiter.start()
    tap.offer(item)
    waiter.join(5)
    assert len(taken) == 1
    assert len(taken[0]) == 1


def tally_of(
    readings: int, disagreeing: int = 0, errors: int = 0, latency_ratio: float = 1.0
) -> ShadowTally:
    """A tally of pipeline p: ``readings`` compared in one batch, ``errors`` of them from a
    failed candidate run, the candidate ``latency_ratio`` times as slow (0.1 ms a reading)."""
    tally = ShadowTally()
    compared = readings - errors
    served_s = 0.0001 * compared
    tally.add(
        "p", BatchAgreement(compared, disagreeing - errors), served_s, served_s * latency_ratio
    )
    if errors:
        tally.failed("p", errors, "the candidate failed: shape")
    return tally


@pytest.mark.parametrize(
    ("tally", "words"),
    [
        (tally_of(40), "compared 40 live readings in 60 s, fewer than min_readings 100"),
        (
            tally_of(200, disagreeing=10),
            "disagreed with the serving model on 5.00% of 200 live readings (most on "
            "pipeline 'p'), more than max_disagreement 2.00%",
        ),
        (
            tally_of(200, disagreeing=10, errors=10),
            "200 live readings, 10 of them failed runs",
        ),
        (tally_of(200, latency_ratio=2.5), "2.50x"),
    ],
)
def test_the_verdict_names_what_failed(tally: ShadowTally, words: str) -> None:
    problem = verdict(tally, TERMS)
    assert problem is not None
    assert words in problem


def test_a_shadow_within_every_threshold_passes() -> None:
    assert verdict(tally_of(100, disagreeing=2, latency_ratio=1.5), TERMS) is None


def test_the_verdict_takes_the_exact_share_not_the_rounded_figure() -> None:
    """2,001 of 100,000 disagreeing: the status shows 0.02 (four decimals), the verdict
    sees 2.001 % and refuses."""
    tally = tally_of(100_000, disagreeing=2_001)
    assert tally.figures()["disagreement"] == 0.02
    assert verdict(tally, TERMS) is not None


def test_the_manifest_block_overrides_the_device_settings_key_by_key() -> None:
    local = ShadowConfig(duration_s=0, min_readings=200, sample=0.5)
    assert not terms_for(local, None).enabled
    terms = terms_for(local, parse_shadow({"duration_s": 600, "max_disagreement": 0.1}))
    assert terms == ShadowTerms(600.0, 200, 0.1, 1.5, 0.5)
    assert parse_shadow({"min_readings": 5}).to_payload() == {"min_readings": 5}


@pytest.mark.parametrize(
    ("block", "words"),
    [
        ([], "shadow must be an object"),
        ({"sample": 0.5}, "unknown key 'sample'"),
        ({"duration_s": "10m"}, "shadow.duration_s must be a number"),
        ({"duration_s": -1}, "shadow.duration_s must be in [0, 604800]"),
        ({"max_disagreement": 2}, "shadow.max_disagreement must be in [0, 1]"),
        ({"max_latency_ratio": 0}, "shadow.max_latency_ratio must be in (0, inf]"),
        ({"min_readings": 0}, "shadow.min_readings must be a positive integer"),
        ({"min_readings": True}, "shadow.min_readings must be a positive integer"),
    ],
)
def test_a_bad_shadow_block_is_refused_naming_the_key(block: Any, words: str) -> None:
    with pytest.raises(UpdateRejectedError) as caught:
        parse_shadow(block)
    assert words in str(caught.value)


def test_sign_carries_the_shadow_terms_in_the_signed_payload(tmp_path: Path) -> None:
    """--shadow 10m --shadow-min-readings 500 --max-disagreement 1% --max-latency-ratio 2."""
    assert main(["keygen", str(tmp_path / "a")]) == 0
    model = tmp_path / "m.onnx"
    model.write_bytes(linear(tmp_path, 0))
    out = tmp_path / "manifest.json"
    code = main(
        [
            "sign", str(model), "--key", str(tmp_path / "a.key"), "--model", "lin",
            "--version", "3", "--device", "gw1", "--shadow", "10m",
            "--shadow-min-readings", "500", "--max-disagreement", "1%",
            "--max-latency-ratio", "2", "-o", str(out),
        ]
    )  # fmt: skip
    assert code == 0
    trusted = TrustedKeys.from_files([str(tmp_path / "a.pub")], 1)
    manifest = parse_payload(trusted.verify(out.read_bytes()))
    assert manifest.shadow == ShadowOverride(600.0, 500, 0.01, 2.0)


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--max-disagreement", "0.1"], "add --shadow DURATION"),
        (["--shadow", "soon"], "--shadow: invalid duration"),
        (["--shadow", "2w"], "at most 7d"),
        (["--shadow", "5m", "--max-disagreement", "150%"], "--max-disagreement must be"),
        (["--shadow", "5m", "--max-latency-ratio", "0"], "--max-latency-ratio must be"),
        (["--shadow", "5m", "--shadow-min-readings", "0"], "--shadow-min-readings must be"),
    ],
)
def test_bad_shadow_options_are_usage_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], words: str
) -> None:
    assert main(["keygen", str(tmp_path / "a")]) == 0
    (tmp_path / "m.onnx").write_bytes(b"x")
    base = ["sign", str(tmp_path / "m.onnx"), "--key", str(tmp_path / "a.key")]
    code = main([*base, "--model", "lin", "--version", "1", "--device", "d", *args, "-o", "o"])
    assert code == 2
    assert words in capsys.readouterr().err


def test_publish_update_prints_the_shadow_figures_a_device_sends() -> None:
    out = io.StringIO()
    follower = StatusFollower("u1", levels=1, out=out)
    for state, shadow in (
        ("IN_PROGRESS", {"readings": 120, "disagreement": 0.0, "max_abs_err": 0.0}),
        (
            "FAILED",
            {
                "readings": 300,
                "disagreement": 0.5,
                "max_abs_err": 3.2,
                "mean_abs_err": 0.41,
                "max_rel_err": 0.8,
                "latency_ratio": 1.1,
            },
        ),
    ):
        message = paho.MQTTMessage(topic=b"edge/dev1/updates/status")
        status = {"update_id": "u1", "device_id": "dev1", "state": state, "step": "shadow"}
        message.payload = json.dumps({**status, "shadow": shadow}).encode()
        follower.on_message(None, None, message)  # type: ignore[arg-type]
    assert out.getvalue().splitlines() == [
        "dev1: IN_PROGRESS (shadow)",
        "  shadow: 120 readings, disagreement 0.00%, max abs err 0, mean abs err ?, "
        "max rel err ?, latency ratio ?",
        "dev1: FAILED (shadow)",
        "  shadow: 300 readings, disagreement 50.00%, max abs err 3.2, mean abs err 0.41, "
        "max rel err 0.8, latency ratio 1.10",
    ]
    assert shadow_line({"skipped": "no model was serving"}) == "skipped: no model was serving"


def test_a_stacked_batch_compared_at_once_agrees_with_reading_by_reading() -> None:
    """The numpy path for batch-first tensors gives what the per-reading rules give: float
    tolerances, NaN, integer labels, a missing output."""
    rng = np.random.default_rng(9)
    judge = Judge(("y", "label"), stacked=True, rtol=1e-3, atol=1e-5)
    for case in range(50):
        size = int(rng.integers(1, 9))
        served: dict[str, np.ndarray] = {
            "y": rng.normal(0, 1, (size, 3)).astype(np.float32),
            "label": rng.integers(0, 3, size).astype(np.int64),
        }
        candidate = {k: v.copy() for k, v in served.items()}
        nudged = rng.random(size) < 0.3
        candidate["y"][nudged, 0] += rng.choice([1e-7, 1e-2], size=int(nudged.sum()))
        if case % 7 == 0:
            candidate["y"][0, 1] = np.nan
        if case % 5 == 0:
            candidate["label"][-1] = (candidate["label"][-1] + 1) % 3
        per_reading = [judge._reading(served, candidate, i, size) for i in range(size)]
        apart = Differences()
        for _, reading in per_reading:
            apart.add(reading)
        whole = judge.compare(served, candidate, size)
        assert whole.readings == size, case
        assert whole.disagreeing == sum(not agree for agree, _ in per_reading), case
        for name, value in whole.apart.figures().items():
            assert value == pytest.approx(apart.figures()[name], rel=1e-9), (case, name)
    assert judge.compare(served, {"y": served["y"]}, size).disagreeing == size
