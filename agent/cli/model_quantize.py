"""``edge-agent model quantize MODEL.onnx -o OUT.onnx [--golden G.npz] [--batch N] [--force]``."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from agent.cli.model import EXIT_FAILED, EXIT_OK
from agent.cli.model_support import load_tool_config, tool_logging
from agent.errors import EdgeAgentError, ModelToolError
from agent.hardware.detect import detect
from agent.inference.golden import GoldenSet, read_golden_file
from agent.modeltools.common import as_model, open_model
from agent.modeltools.quantize import (
    SYNTHETIC_SAMPLES,
    QuantizeReport,
    batch_sizes,
    compare,
    open_quantized,
    quantized_temp,
)

_NAME = "edge-agent model quantize"


def run(args: argparse.Namespace) -> int:
    """Quantize, compare, and write OUT when the int8 model passes (or ``--force``)."""
    tool_logging()
    config = load_tool_config(args.config)
    if config is None:
        return EXIT_FAILED
    model_file, out = args.model_file, args.output
    if out.resolve() == model_file.resolve():
        print(
            f"{_NAME}: OUT is MODEL ({out}): write the int8 model to another file", file=sys.stderr
        )
        return EXIT_FAILED
    try:
        golden: GoldenSet | None = read_golden_file(args.golden) if args.golden else None
        fp32_tool = as_model(config, model_file, providers=args.providers)
        hardware = detect()
        fp32 = open_model(fp32_tool, hardware)
        pipelines = [p.batching.max_batch for p in fp32_tool.config.pipelines.values()]
        sizes = batch_sizes(args.batch, pipelines, fp32.model.inputs)
        with quantized_temp(model_file, out) as quantized:
            if not quantized.quantized_nodes and not args.force:
                kept = " (the file there is left as it was)" if out.exists() else ""
                raise ModelToolError(
                    f"{out} not written{kept}: {model_file} has nothing dynamic "
                    "quantization converts (MatMul, Gemm, Conv, Attention, LSTM...), so the "
                    "int8 file would be the same model, larger; serve the original "
                    "(--force writes it anyway)"
                )
            int8 = open_quantized(
                quantized,
                lambda path: open_model(
                    as_model(config, path, fp32_tool.name, args.providers), hardware
                ),
            )
            report = compare(
                fp32,
                int8,
                model_path=model_file,
                out_path=out,
                quantized=quantized,
                golden=golden,
                golden_path=args.golden,
                sizes=sizes,
            )
            write = report.passed is not False or args.force
            if write:
                quantized.keep(out)
    except EdgeAgentError as exc:
        print(f"{_NAME}: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except OSError as exc:
        print(f"{_NAME}: {exc}", file=sys.stderr)
        return EXIT_FAILED
    if args.json:
        print(json.dumps(report.to_dict(written=write, forced=args.force), indent=2))
    else:
        print(format_report(report, written=write))
    if not write:
        kept = " (the file there is left as it was)" if out.exists() else ""
        print(
            f"{_NAME}: {out} not written{kept}: the int8 model fails the golden set: "
            f"{report.failure()} (--force writes it anyway)",
            file=sys.stderr,
        )
        return EXIT_FAILED
    return EXIT_OK


def format_report(report: QuantizeReport, written: bool) -> str:
    """The side-by-side report as text."""
    quantized = report.quantized
    weights = "int8" if quantized.weight_type == "QInt8" else "uint8"
    lines = [f"quantized {report.model} -> {report.output}: dynamic, {weights} weights"]
    if quantized.weight_note:
        lines.append(f"  weights: {quantized.weight_note}")
    lines.append(
        "  pre-processing: "
        + ("shape inference and optimization" if quantized.preprocessed else "none")
        + (f" ({quantized.preprocess_note})" if quantized.preprocess_note else "")
    )
    nodes = ", ".join(f"{op} {count}" for op, count in quantized.quantized_nodes.items())
    lines.append(
        "  quantized nodes: "
        + (
            nodes
            or "none: the model has nothing quantize_dynamic converts (MatMul, Gemm, Conv, "
            "Attention, LSTM...); the original serves as well"
        )
    )
    ratios = report.ratios()
    rows = [
        ("", "fp32", "int8", "fp32/int8"),
        (
            "size",
            f"{report.fp32.size_bytes} B",
            f"{report.int8.size_bytes} B",
            _times(ratios["size"]),
        ),
    ]
    for batch in report.batch_sizes:
        rows.append(
            (
                f"p50 batch {batch}",
                _ms(report.fp32.p50_ms.get(batch)),
                _ms(report.int8.p50_ms.get(batch)),
                _times(ratios["speed"][str(batch)]),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    for row in rows:
        cells = [row[0].ljust(widths[0])] + [
            c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True)
        ]
        lines.append("  " + "  ".join(cells).rstrip())
    lines.append(f"  providers: {', '.join(report.int8.providers)}")
    lines.extend(f"  timing problem: {problem}" for problem in report.problems)
    lines.extend(_agreement(report))
    if written and report.passed is False:
        lines.append(f"written anyway (--force): {report.output}; {report.failure()}")
    elif written:
        lines.append(f"written: {report.output}")
    return "\n".join(lines)


def _agreement(report: QuantizeReport) -> list[str]:
    int8 = report.int8.validation
    if report.golden is None:
        head = (
            f"agreement with the fp32 model on {SYNTHETIC_SAMPLES} synthetic (random) inputs, "
            "not a golden set: nothing to pass or fail (give --golden to judge it)"
        )
        return [head, *([f"  int8  {_errors(int8.to_dict())}"] if int8 else [])]
    limits = ", ".join(f"{k} {v:g}" for k, v in (int8.tolerances.to_dict() if int8 else {}).items())
    samples = int8.comparison.samples if int8 else 0
    lines = [f"agreement on {report.golden} ({samples} samples; {limits}):"]
    for side, validation in (("fp32", report.fp32.validation), ("int8", int8)):
        if validation is not None:
            verdict = "passed" if validation.passed else "FAILED"
            lines.append(f"  {side}  {_errors(validation.to_dict())}: {verdict}")
    return lines


def _errors(document: dict[str, Any]) -> str:
    text = (
        f"max abs err {_num(document['max_abs_err'])}, max rel err {_num(document['max_rel_err'])}"
    )
    if document.get("top1_agreement") is not None:
        text += f", top-1 agreement {document['top1_agreement']:.4f}"
    return text


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g}"


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f} ms"


def _times(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"
