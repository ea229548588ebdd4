"""``edge-agent model quantize``: dynamic int8 quantization and the fp32/int8 comparison.

onnxruntime's recipe: pre-process (ONNX and symbolic shape inference, then graph
optimization: ``quant_pre_process``), then ``quantize_dynamic`` with int8 weights; the
activations are quantized at run time, so no calibration data is needed. Both models are
then loaded with the daemon's own session code and compared on this device: file size, p50
latency at batch 1 and at the pipeline's batch size, and agreement on the golden set.

Every file is written next to OUT under a temporary name and removed on every path; the
caller renames the int8 one into place only when it passes (or is forced).
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import re
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from agent.durable import replace_durably
from agent.errors import ModelLoadError, ModelToolError, first_line
from agent.inference.codecs import TensorSpec
from agent.inference.golden import GoldenSet, Tolerances
from agent.inference.session import LoadedModel
from agent.inference.validation import ValidationReport, validate
from agent.modeltools.common import (
    OpenedModel,
    golden_feeds,
    percentile_ms,
    run_many,
    synthetic_feeds,
)
from agent.modeltools.reference import reference_outputs
from agent.pip_hint import pip_install

# The quantize extra of pyproject.toml (tests/test_model_quantize.py checks they agree).
QUANTIZE_REQUIREMENTS = ("onnx>=1.15", "sympy>=1.12")
QUANTIZE_EXTRA = (
    "quantization needs the onnx package, which edge-agent does not install by default: "
    f"{pip_install(*QUANTIZE_REQUIREMENTS)}"
)
WEIGHT_TYPE = "QInt8"
DEFAULT_BATCH = 32
SYNTHETIC_SAMPLES = 100
# Timing: both models are timed in alternating rounds, so that a slower moment of the
# machine (another process, a frequency change) hits both rather than one.
TIMING_S = 1.0  # per model and batch size
TIMING_ROUNDS = 5
MIN_RUNS_PER_ROUND = 3
WARMUP_RUNS = 3
# The operators quantize_dynamic puts in place of float ones (onnxruntime's IntegerOps).
# onnxruntime 1.17's refusal of ConvInteger/MatMulInteger with int8 weights.
_NO_INT8_KERNEL = re.compile(r"Could not find an implementation for (ConvInteger|MatMulInteger)")
QUANTIZED_OPS = frozenset(
    {
        "MatMulInteger",
        "ConvInteger",
        "DynamicQuantizeMatMul",
        "MatMulIntegerToFloat",
        "QGemm",
        "QLinearMatMul",
        "QLinearConv",
        "QAttention",
        "DynamicQuantizeLSTM",
        "QEmbedLayerNormalization",
    }
)


@dataclass
class Quantized:
    """The int8 model in its temporary file, and how it was made."""

    path: Path
    source: Path  # what was quantized: the pre-processed model, else the original
    preprocessed: bool
    preprocess_note: str | None  # why pre-processing failed or was partial (None: it ran fully)
    weight_type: str = WEIGHT_TYPE
    weight_note: str | None = None  # why the weights are not QInt8
    quantized_nodes: dict[str, int] = field(default_factory=dict)
    kept: bool = False

    def keep(self, target: Path) -> None:
        """Rename the int8 model to ``target`` (same folder: atomic)."""
        os.chmod(self.path, 0o644)  # mkstemp made it 0600; a model file is world-readable
        replace_durably(self.path, target)
        self.kept = True


@contextlib.contextmanager
def quantized_temp(model_path: Path, out_path: Path) -> Iterator[Quantized]:
    """Quantize ``model_path`` into a temporary file beside ``out_path``; every temporary
    file is gone when the block ends (but the one ``Quantized.keep`` renamed). Raises
    ``ModelToolError`` (``QUANTIZE_EXTRA`` when onnx is missing)."""
    quantization = _quantization_module()
    folder = out_path.parent
    if not folder.is_dir():
        raise ModelToolError(f"cannot write {out_path}: folder {folder} does not exist")
    temps: list[Path] = []
    result: Quantized | None = None
    try:
        pre = _temp(folder, out_path.name, ".pre.onnx", temps)
        int8 = _temp(folder, out_path.name, ".int8.onnx", temps)
        preprocessed, note = _preprocess(quantization, model_path, pre)
        result = Quantized(int8, pre if preprocessed else model_path, preprocessed, note)
        _quantize(quantization, result, WEIGHT_TYPE)
        yield result
    finally:
        for path in temps:
            if result is not None and result.kept and path == result.path:
                continue  # renamed to OUT
            with contextlib.suppress(FileNotFoundError):
                path.unlink()


def open_quantized(quantized: Quantized, load: Callable[[Path], OpenedModel]) -> OpenedModel:
    """Load the int8 model with ``load``. onnxruntime before 1.20 or so has ConvInteger
    kernels for uint8 weights only, and refuses the model quantize_dynamic makes of a CNN
    with int8 weights: there the model is quantized again with uint8 weights, and the
    report says so."""
    try:
        return load(quantized.path)
    except ModelLoadError as exc:
        if quantized.weight_type != "QInt8" or not _NO_INT8_KERNEL.search(str(exc)):
            raise
        problem = first_line(exc)
    _quantize(_quantization_module(), quantized, "QUInt8")
    quantized.weight_note = (
        "this onnxruntime has no kernel for the int8-weight model "
        f"({problem.rsplit(': ', 1)[-1]}): quantized with uint8 weights instead"
    )
    return load(quantized.path)


def _quantize(quantization: Any, quantized: Quantized, weight_type: str) -> None:
    try:
        with _quiet_root_logger():
            quantization.quantize_dynamic(
                str(quantized.source),
                str(quantized.path),
                weight_type=getattr(quantization.QuantType, weight_type),
            )
    except Exception as exc:  # onnxruntime.quantization raises many kinds
        raise ModelToolError(
            f"quantize_dynamic failed on {quantized.source}: {first_line(exc)}"
        ) from exc
    quantized.weight_type = weight_type
    quantized.quantized_nodes = _quantized_nodes(quantized.path)


def _quantization_module() -> Any:
    if importlib.util.find_spec("onnx") is None:
        raise ModelToolError(QUANTIZE_EXTRA)
    try:
        from onnxruntime import quantization  # noqa: PLC0415 - needs onnx
    except ImportError as exc:
        raise ModelToolError(f"{QUANTIZE_EXTRA} ({exc})") from exc
    return quantization


def _temp(folder: Path, name: str, suffix: str, temps: list[Path]) -> Path:
    try:
        fd, path = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=suffix)
    except OSError as exc:
        raise ModelToolError(f"cannot write in {folder}: {exc.strerror}") from exc
    os.close(fd)
    temps.append(Path(path))
    return Path(path)


def _preprocess(quantization: Any, source: Path, target: Path) -> tuple[bool, str | None]:
    """``quant_pre_process`` into ``target``: whether it worked, and what to tell about it."""
    symbolic = importlib.util.find_spec("sympy") is not None
    try:
        with _quiet_root_logger():
            # Positional paths: onnxruntime 1.17 names them input_model_path/output_model_path,
            # later versions input_model/output_model_path.
            quantization.quant_pre_process(
                str(source), str(target), skip_symbolic_shape=not symbolic
            )
    except Exception as exc:  # symbolic shape inference fails on some ops (ai.onnx.ml...)
        return False, f"pre-processing failed, the original was quantized: {first_line(exc)}"
    if not symbolic:
        return True, (
            "symbolic shape inference skipped: sympy is not installed "
            f"({pip_install(QUANTIZE_REQUIREMENTS[1])})"
        )
    return True, None


@contextlib.contextmanager
def _quiet_root_logger() -> Iterator[None]:
    """onnxruntime.quantization logs its advice through the root logger; the report says
    what matters, so its warnings are silenced while it runs (a short-lived command)."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(previous)


def _quantized_nodes(path: Path) -> dict[str, int]:
    import onnx  # noqa: PLC0415 - present: quantization needs it

    model = onnx.load(str(path), load_external_data=False)
    counts = Counter(node.op_type for node in model.graph.node if node.op_type in QUANTIZED_OPS)
    return dict(sorted(counts.items()))


@dataclass(frozen=True)
class ModelFigures:
    """One side of the comparison."""

    path: Path
    size_bytes: int
    providers: tuple[str, ...]
    load_s: float
    p50_ms: Mapping[int, float | None]  # by batch size
    validation: ValidationReport | None

    def to_dict(self) -> dict[str, Any]:
        """This side as the ``--json`` report shows it."""
        return {
            "file": str(self.path),
            "size_bytes": self.size_bytes,
            "providers": list(self.providers),
            "load_s": round(self.load_s, 4),
            "p50_ms": {str(batch): value for batch, value in self.p50_ms.items()},
            "validation": None if self.validation is None else self.validation.to_dict(),
        }


@dataclass(frozen=True)
class QuantizeReport:
    """The fp32 and int8 models side by side."""

    model: Path
    output: Path
    quantized: Quantized
    fp32: ModelFigures
    int8: ModelFigures
    batch_sizes: tuple[int, ...]
    golden: Path | None  # None: agreement measured on synthetic inputs
    problems: tuple[str, ...]  # timing runs that failed

    @property
    def passed(self) -> bool | None:
        """Whether the int8 model meets the golden set's thresholds (None: no golden set)."""
        if self.golden is None or self.int8.validation is None:
            return None
        return self.int8.validation.passed

    def failure(self) -> str:
        """Why the int8 model fails the golden set (empty when it does not)."""
        return (
            self.int8.validation.reason() if self.passed is False and self.int8.validation else ""
        )

    def ratios(self) -> dict[str, Any]:
        """Size fp32/int8 and speed fp32_p50/int8_p50 per batch size (None: not measured)."""
        speed: dict[str, float | None] = {}
        for batch in self.batch_sizes:
            slow, fast = self.fp32.p50_ms.get(batch), self.int8.p50_ms.get(batch)
            speed[str(batch)] = round(slow / fast, 3) if slow and fast else None
        size = self.fp32.size_bytes / self.int8.size_bytes if self.int8.size_bytes else None
        return {"size": None if size is None else round(size, 3), "speed": speed}

    def to_dict(self, written: bool, forced: bool) -> dict[str, Any]:
        """The ``--json`` document."""
        return {
            "model": str(self.model),
            "output": str(self.output),
            "written": written,
            "forced": forced and self.passed is False,
            "passed": self.passed,
            "reason": self.failure() or None,
            "quantization": {
                "method": "dynamic",
                "weight_type": self.quantized.weight_type,
                "weight_note": self.quantized.weight_note,
                "preprocessed": self.quantized.preprocessed,
                "preprocess_note": self.quantized.preprocess_note,
                "quantized_nodes": self.quantized.quantized_nodes,
            },
            "agreement_on": "golden" if self.golden is not None else "synthetic",
            "golden": None if self.golden is None else str(self.golden),
            "batch_sizes": list(self.batch_sizes),
            "fp32": self.fp32.to_dict(),
            "int8": self.int8.to_dict(),
            "ratios": self.ratios(),
            "problems": list(self.problems),
        }


def batch_sizes(
    requested: int | None, pipelines_batch: Sequence[int], specs: Sequence[TensorSpec]
) -> tuple[int, ...]:
    """Batch 1 and the pipeline's batch size (``requested``, else the largest ``max_batch``
    of the pipelines using the model, else ``DEFAULT_BATCH``), as far as the model allows:
    an input fixed at batch 1, or none with a batch axis, leaves batch 1 alone."""
    wanted = requested or max(pipelines_batch, default=DEFAULT_BATCH)
    batched = [spec for spec in specs if spec.batched]
    if not batched:
        return (1,)
    fixed = [spec.max_batch for spec in batched if spec.max_batch is not None]
    largest = min([wanted, *fixed])
    return (1,) if largest <= 1 else (1, largest)


def compare(
    fp32: OpenedModel,
    int8: OpenedModel,
    *,
    model_path: Path,
    out_path: Path,
    quantized: Quantized,
    golden: GoldenSet | None,
    golden_path: Path | None,
    sizes: tuple[int, ...],
) -> QuantizeReport:
    """Time both models and judge their agreement (on ``golden``, else on synthetic inputs
    against the fp32 model's outputs)."""
    rng = np.random.default_rng(0)
    specs = fp32.model.inputs
    p50: dict[str, dict[int, float | None]] = {"fp32": {}, "int8": {}}
    problems: list[str] = []
    for batch in sizes:
        feeds = golden_feeds(golden, specs, batch) if golden else synthetic_feeds(specs, batch, rng)
        runs = {
            "fp32": _runner(fp32.model, feeds),
            "int8": _runner(int8.model, feeds),
        }
        for side, value in _interleaved_p50(runs, problems, batch).items():
            p50[side][batch] = value
    if golden is not None:
        reference = golden
        fp32_check: ValidationReport | None = _validate(reference, fp32.model)
    else:
        reference = _synthetic_golden(fp32.model, rng)
        fp32_check = None  # the fp32 model is the reference: nothing to compare
    return QuantizeReport(
        model=model_path,
        output=out_path,
        quantized=quantized,
        fp32=_figures(fp32, model_path, p50["fp32"], fp32_check),
        int8=_figures(int8, out_path, p50["int8"], _validate(reference, int8.model)),
        batch_sizes=sizes,
        golden=golden_path,
        problems=tuple(problems),
    )


def _figures(
    opened: OpenedModel,
    shown: Path,
    p50: dict[int, float | None],
    validation: ValidationReport | None,
) -> ModelFigures:
    return ModelFigures(
        path=shown,
        size_bytes=opened.model.path.stat().st_size,
        providers=opened.model.providers,
        load_s=opened.load_seconds,
        p50_ms=p50,
        validation=validation,
    )


def _validate(golden: GoldenSet, model: LoadedModel) -> ValidationReport:
    return validate(golden, model.inputs, model.outputs, model.providers, run_many(model))


def _synthetic_golden(model: LoadedModel, rng: np.random.Generator) -> GoldenSet:
    """Random inputs and the fp32 model's own outputs for them, at the default tolerances."""
    batch = synthetic_feeds(model.inputs, SYNTHETIC_SAMPLES, rng)
    inputs = {
        spec.name: batch[spec.name]
        if spec.batched
        else np.repeat(batch[spec.name][None], SYNTHETIC_SAMPLES, axis=0)
        for spec in model.inputs
    }
    return GoldenSet(inputs, reference_outputs(model.session, inputs), Tolerances())


def _runner(model: LoadedModel, feeds: dict[str, np.ndarray]) -> Callable[[], object]:
    session = model.session

    def run() -> object:
        return session.run(None, feeds)

    return run


def _interleaved_p50(
    runs: Mapping[str, Callable[[], object]], problems: list[str], batch: int
) -> dict[str, float | None]:
    """The p50 (ms) of each run, timed in alternating rounds after a few warm-up runs; a run
    that fails is reported in ``problems`` and has no figure."""
    times: dict[str, list[float]] = {side: [] for side in runs}
    failed: set[str] = set()
    per_round = TIMING_S / TIMING_ROUNDS
    for side, run in runs.items():
        try:
            for _ in range(WARMUP_RUNS):
                run()
        except Exception as exc:  # onnxruntime's own exception types
            problems.append(f"{side} at batch {batch}: {first_line(exc)}")
            failed.add(side)
    for _ in range(TIMING_ROUNDS):
        for side, run in runs.items():
            if side in failed:
                continue
            finish = time.perf_counter() + per_round
            done = 0
            try:
                while done < MIN_RUNS_PER_ROUND or time.perf_counter() < finish:
                    started = time.perf_counter()
                    run()
                    times[side].append(time.perf_counter() - started)
                    done += 1
            except Exception as exc:  # onnxruntime's own exception types
                problems.append(f"{side} at batch {batch}: {first_line(exc)}")
                failed.add(side)
    return {side: None if side in failed else percentile_ms(times[side], 50) for side in runs}
