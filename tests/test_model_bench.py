"""``edge-agent model bench`` on real models: the IsolationForest, the MLP and the 1-D CNN,
timed per batch size on sessions built with the daemon's options. No timing thresholds:
the figures are checked for being there and being numbers, not for their size."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent.cli.main import main
from agent.inference.codecs import TensorSpec
from agent.modeltools.bench import batch_problem
from tests import model_zoo
from tests.onnx_builders import build_linear
from tests.test_model_check import ZOO, write_config, write_golden

REPO = Path(__file__).resolve().parent.parent
NUMBERS = ("load_ms", "cold_ms", "p50_ms", "p99_ms", "throughput_per_s", "rss_added_mb")


@pytest.fixture(scope="module")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The three models, built once for the module."""
    root = tmp_path_factory.mktemp("bench-zoo")
    return {name: build(root / f"{name}.onnx") for name, (build, _, _) in ZOO.items()}


def bench(
    capsys: pytest.CaptureFixture[str], *args: str | Path, as_json: bool = True
) -> tuple[int, Any, str]:
    """Run ``edge-agent model bench`` in-process: exit code, report, stderr."""
    argv = ["model", "bench", *(str(arg) for arg in args)]
    code = main([*argv, "--json"] if as_json else argv)
    captured = capsys.readouterr()
    return code, json.loads(captured.out) if as_json else captured.out, captured.err


@pytest.mark.parametrize("name", sorted(ZOO))
def test_bench_gives_figures_per_batch_size(
    name: str, zoo: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_config(tmp_path)
    args = (zoo[name], "--seconds", "0.2", "--batch", "1,4", "--config", config)
    code, report, err = bench(capsys, *args)
    assert code == 0, report
    assert err == ""  # not a terminal: no progress line
    assert report["model"]["name"] == name
    assert report["model"]["version"].startswith("sha256:")
    assert report["providers"]["loaded"] == ["CPUExecutionProvider"]
    assert report["providers"]["missing"] == []
    session = report["session"]
    assert isinstance(session["intra_op_num_threads"], int)
    assert isinstance(session["allow_spinning"], bool)
    assert report["engine_build"] == {"first_build": False, "cache": None}
    assert report["inputs"] == "random"
    assert [result["batch"] for result in report["results"]] == [1, 4]
    for result in report["results"]:
        for key in NUMBERS:
            assert type(result[key]) in {int, float}, key
        assert isinstance(result["runs"], int)
        assert result["runs"] >= 1
        assert "error" not in result
        assert "skipped" not in result


def test_the_text_report_is_a_table(
    zoo: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = (zoo["mlp"], "--seconds", "0.1", "--batch", "1,2,8", "--config", write_config(tmp_path))
    code, text, err = bench(capsys, *args, as_json=False)
    assert code == 0
    assert err == ""
    lines = text.splitlines()
    assert lines[1].startswith("providers  loaded CPUExecutionProvider")
    assert lines[2].startswith("session    ")
    assert "intra-op threads, spinning" in lines[2]
    header = next(index for index, line in enumerate(lines) if line.split()[:1] == ["batch"])
    assert lines[header].split() == [
        "batch",
        "load",
        "ms",
        "cold",
        "ms",
        "p50",
        "ms",
        "p99",
        "ms",
        "runs",
        "readings/s",
        "RSS",
        "+MB",
    ]
    assert [line.split()[0] for line in lines[header + 1 :]] == ["1", "2", "8"]


def test_a_terminal_gets_a_progress_line_that_is_cleared(
    zoo: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    args = (zoo["mlp"], "--seconds", "0.3", "--batch", "1", "--config", write_config(tmp_path))
    code, report, err = bench(capsys, *args)
    assert code == 0
    assert "\r\x1b[Kbatch 1: " in err
    assert " runs, " in err
    assert err.endswith("\r\x1b[K")  # erased: the terminal is left clean
    assert report["results"][0]["runs"] >= 1


def test_golden_inputs(
    zoo: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """With --golden the batches are made of the set's samples (repeated to fill them)."""
    golden = write_golden(zoo["cnn"], "x", (1, model_zoo.CNN_SAMPLES), tmp_path / "g.npz")
    args = (zoo["cnn"], "--golden", golden, "--seconds", "0.1", "--batch", "1,32")
    code, report, _ = bench(capsys, *args, "--config", write_config(tmp_path))
    assert code == 0
    assert report["inputs"] == "golden"
    assert [result["batch"] for result in report["results"]] == [1, 32]
    assert report["notes"] == []


def test_a_golden_set_for_another_model_is_refused(
    zoo: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    golden = write_golden(zoo["iforest"], "X", (model_zoo.FEATURES,), tmp_path / "g.npz")
    args = (zoo["mlp"], "--golden", golden, "--seconds", "0.1", "--config", write_config(tmp_path))
    code = main(["model", "bench", *map(str, args)])
    assert code == 1
    assert "the golden set has no input:x" in capsys.readouterr().err


def test_a_corrupt_model_is_refused_with_the_reason(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(b"\x08\x07 this is not a protobuf of a model" * 10)
    code = main(["model", "bench", str(corrupt), "--config", str(write_config(tmp_path))])
    captured = capsys.readouterr()
    assert code == 1
    assert captured.out == ""
    assert f"{corrupt} does not load: not an ONNX model" in captured.err


def test_batch_sizes_the_model_cannot_take_are_skipped() -> None:
    dynamic = TensorSpec("x", np.dtype(np.float32), (4,), batched=True, max_batch=None)
    fixed = TensorSpec("x", np.dtype(np.float32), (4,), batched=True, max_batch=1)
    state = TensorSpec("h", np.dtype(np.float32), (2, 1, 8), batched=False)
    assert batch_problem([dynamic], 32) is None
    assert batch_problem([fixed], 1) is None
    assert batch_problem([fixed], 8) == "input 'x' takes at most 1 reading(s) per run"
    assert batch_problem([state], 4) == "the model has no batch axis: it takes one reading per run"


def test_the_command_line_benchmarks(zoo: dict[str, Path], tmp_path: Path) -> None:
    """A real ``edge-agent`` process: JSON on stdout, nothing on stderr (not a terminal)."""
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "agent",
            "model",
            "bench",
            str(zoo["iforest"]),
            "--seconds",
            "0.2",
            "--batch",
            "1,4",
            "--json",
            "--config",
            str(write_config(tmp_path)),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stderr == ""
    report = json.loads(done.stdout)
    assert [result["batch"] for result in report["results"]] == [1, 4]


def test_a_model_exported_for_batch_one_skips_the_larger_sizes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Batch 1 is measured, batch 8 is skipped with the reason, and the exit code says
    that not every size was measured."""
    model = build_linear(tmp_path / "fixed.onnx", batch=1)
    args = (model, "--seconds", "0.1", "--batch", "1,8", "--config", write_config(tmp_path))
    code, report, _ = bench(capsys, *args)
    assert code == 1
    measured, skipped = report["results"]
    assert measured["runs"] >= 1
    assert "skipped" not in measured
    assert skipped["runs"] == 0
    assert skipped["p50_ms"] is None
    assert skipped["skipped"] == "input 'x' takes at most 1 reading(s) per run"
    code, text, _ = bench(capsys, *args, as_json=False)
    assert code == 1
    assert "batch 8: input 'x' takes at most 1 reading(s) per run" in text
