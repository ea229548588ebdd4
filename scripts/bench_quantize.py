"""What dynamic int8 quantization buys on this machine: `edge-agent model quantize` on the
1-D CNN, the MLP and the IsolationForest of tests/model_zoo.py, each with a golden set of
200 samples, run ``--runs`` times; prints the medians of the size and speed ratios and the
agreement, to check onnxruntime's "typically 4x smaller, 2-4x faster, <1 % quality loss".

Usage: python scripts/bench_quantize.py [--runs 3] [--models cnn,mlp,iforest]
Needs the dev and quantize extras (onnx, scikit-learn, skl2onnx; sympy optional).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

from bench_run import describe_run  # noqa: E402

from tests import model_zoo  # noqa: E402

SAMPLES = 200


def _edge_agent(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agent", *args],
        capture_output=True,
        text=True,
        check=False,
        cwd=REPO,
    )


def _prepare(name: str, folder: Path) -> tuple[Path, Path]:
    """The model and its golden set (200 standard-normal samples, judged by top-1 0.99)."""
    if name == "cnn":
        model = model_zoo.build_cnn1d(folder / "cnn.onnx")
        inputs = {"input:x": model_zoo.sample_inputs(SAMPLES, (1, model_zoo.CNN_SAMPLES))}
    elif name == "mlp":
        model = model_zoo.build_mlp(folder / "mlp.onnx")
        inputs = {"input:x": model_zoo.sample_inputs(SAMPLES, (model_zoo.FEATURES,))}
    else:
        model = model_zoo.build_iforest(folder / "iforest.onnx")
        inputs = {"input:X": model_zoo.sample_inputs(SAMPLES, (model_zoo.FEATURES,))}
    samples = folder / f"{name}.inputs.npz"
    np.savez(samples, **inputs)  # type: ignore[arg-type]
    golden = folder / f"{name}.golden.npz"
    done = _edge_agent(
        "model", "golden", str(model), "--inputs", str(samples), "--top1", "0.99",
        "-o", str(golden),
    )  # fmt: skip
    if done.returncode != 0:
        raise SystemExit(f"model golden failed for {name}: {done.stderr}")
    return model, golden


def _quantize(model: Path, golden: Path, out: Path) -> dict[str, Any]:
    done = _edge_agent(
        "model", "quantize", str(model), "-o", str(out), "--golden", str(golden), "--json"
    )
    try:
        report: dict[str, Any] = json.loads(done.stdout)
    except ValueError as exc:
        raise SystemExit(f"model quantize printed no JSON: {done.stderr}") from exc
    return report


def _median(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return statistics.median(known) if known else None


def _fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}x"


def main() -> int:
    """Run the measurement and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--models", default="cnn,mlp,iforest")
    args = parser.parse_args()
    print(describe_run(), flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        for name in args.models.split(","):
            model, golden = _prepare(name, folder)
            reports = [
                _quantize(model, golden, folder / f"{name}.int8.onnx") for _ in range(args.runs)
            ]
            batches = [str(b) for b in reports[0]["batch_sizes"]]
            int8 = reports[-1]["int8"]["validation"] or {}
            rows.append(
                (
                    name,
                    reports[-1]["fp32"]["size_bytes"],
                    reports[-1]["int8"]["size_bytes"],
                    _median([r["ratios"]["size"] for r in reports]),
                    {b: _median([r["ratios"]["speed"].get(b) for r in reports]) for b in batches},
                    int8.get("top1_agreement"),
                    int8.get("max_abs_err"),
                    reports[-1]["quantization"]["weight_type"],
                )
            )
    print(f"\nmedians of {args.runs} runs; speed = fp32 p50 / int8 p50 (above 1: int8 faster)")
    print("model    fp32 B    int8 B  size    speed by batch          top-1   max abs err  weights")
    for name, fp32, int8_size, size, speed, top1, err, weights in rows:
        speeds = ", ".join(f"{b}: {_fmt(v)}" for b, v in speed.items())
        top = "-" if top1 is None else f"{top1:.3f}"
        error = "-" if err is None else f"{err:.3g}"
        print(
            f"{name:<8} {fp32:>7} {int8_size:>9}  {_fmt(size)}  {speeds:<22}  {top:>5}   "
            f"{error:>11}  {weights}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
