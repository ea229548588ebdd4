"""``edge-agent model golden | check | bench | quantize | capture``: the export -> validate ->
quantize -> benchmark workflow, run on the device itself, without a broker (but ``capture``).

Each subcommand lives in its own module (``agent.cli.model_<name>``), imported when it runs:
they pull in onnxruntime, which the rest of the command line does not need.
"""

from __future__ import annotations

import argparse
import importlib
import math
from pathlib import Path

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``model`` and its subcommands to the ``edge-agent`` parser."""
    model = commands.add_parser(
        "model",
        help="check, benchmark and quantize a model on this device",
        description="Tools for the model workflow on the device: capture sample inputs, "
        "make a golden set, check what the daemon would do with a model, benchmark it, "
        "and quantize it with a side-by-side report.",
    )
    tools = model.add_subparsers(dest="model_command", metavar="SUBCOMMAND")
    tools.required = True

    golden = tools.add_parser(
        "golden",
        help="compute a golden set's expected outputs from a reference run",
        description="Run INPUTS.npz through MODEL.onnx (or --reference) on the CPU in full "
        "precision, one sample at a time, and write GOLDEN.npz: the input:<name> arrays, "
        "the expected:<output> arrays and the tolerances.",
    )
    golden.add_argument("model_file", metavar="MODEL.onnx", type=Path)
    golden.add_argument(
        "--inputs",
        required=True,
        type=Path,
        metavar="INPUTS.npz",
        help="sample inputs: input:<name> (or <name>) arrays, one sample per row "
        "(`edge-agent model capture` writes one)",
    )
    golden.add_argument(
        "--reference",
        type=Path,
        metavar="REF.onnx",
        help="take the expected outputs from this model instead (e.g. the fp32 original "
        "of a quantized model)",
    )
    golden.add_argument("-o", "--output", required=True, type=Path, metavar="GOLDEN.npz")
    _tolerance_arguments(golden)

    check = tools.add_parser(
        "check",
        help="what the daemon would do with a model on this device",
        description="Load MODEL.onnx as the daemon would: the providers chosen and actually "
        "loaded, node placement, inputs and outputs, the configured pipelines it fits "
        "(and why not), warm-up time and the golden set comparison. Exit 0 when the "
        "daemon would serve it and it passes, 1 otherwise.",
    )
    check.add_argument("model_file", metavar="MODEL.onnx", type=Path)
    check.add_argument("--golden", type=Path, metavar="G.npz", help="golden set to compare")
    _config_arguments(check)
    check.add_argument(
        "--model",
        metavar="NAME",
        help="check it as this model of the config (default: the model whose file has "
        "this name, if any)",
    )
    check.add_argument("--json", action="store_true", help="print JSON")

    bench = tools.add_parser(
        "bench",
        help="latency, throughput and memory per batch size on this device",
        description="Per batch size: first-run (cold) latency, p50/p99 latency, "
        "throughput and the RSS the session adds, with the daemon's own session options "
        "and providers.",
    )
    bench.add_argument("model_file", metavar="MODEL.onnx", type=Path)
    bench.add_argument(
        "--batch",
        type=_batch_sizes,
        default=(1, 8, 32),
        metavar="1,8,32",
        help="batch sizes, comma separated (default 1,8,32)",
    )
    bench.add_argument(
        "--seconds",
        type=_positive_float,
        default=5.0,
        metavar="S",
        help="measuring time per batch size (default 5)",
    )
    bench.add_argument(
        "--golden",
        type=Path,
        metavar="G.npz",
        help="take the inputs from a golden set (default: random numbers)",
    )
    _config_arguments(bench)
    bench.add_argument("--json", action="store_true", help="print JSON")

    quantize = tools.add_parser(
        "quantize",
        help="dynamic int8 quantization with a side-by-side report",
        description="Quantize MODEL.onnx to int8 (onnxruntime.quantization.quantize_dynamic, "
        "after onnxruntime's pre-processing), then compare the fp32 and int8 models on "
        "this device: file size, p50 latency at batch 1 and at the pipeline's batch "
        "size, and agreement on the golden set. OUT is not written when agreement is "
        "below the golden set's thresholds, unless --force.",
    )
    quantize.add_argument("model_file", metavar="MODEL.onnx", type=Path)
    quantize.add_argument("-o", "--output", required=True, type=Path, metavar="OUT.onnx")
    quantize.add_argument(
        "--golden", type=Path, metavar="G.npz", help="golden set the int8 model must pass"
    )
    quantize.add_argument(
        "--batch",
        type=_positive_int,
        default=None,
        metavar="N",
        help="the larger batch size to time (default: the pipeline's max_batch from "
        "--config, else 32)",
    )
    quantize.add_argument(
        "--force", action="store_true", help="write OUT even when agreement is too low"
    )
    _config_arguments(quantize)
    quantize.add_argument("--json", action="store_true", help="print JSON")

    capture = tools.add_parser(
        "capture",
        help="record real readings of a pipeline as sample inputs",
        description="Subscribe to a pipeline's input topic, decode each reading exactly as "
        "the daemon does, and write the first COUNT as INPUTS.npz (input:<name> arrays, "
        "one row per reading) for `model golden`.",
    )
    capture.add_argument("--config", required=True, metavar="PATH", help="the device's config")
    capture.add_argument("--pipeline", required=True, metavar="NAME", help="pipeline to record")
    capture.add_argument(
        "--count", type=_positive_int, default=200, metavar="N", help="readings (default 200)"
    )
    capture.add_argument(
        "--timeout",
        type=_positive_float,
        default=300.0,
        metavar="SECONDS",
        help="give up after this long (default 300); what arrived is written",
    )
    capture.add_argument("-o", "--output", required=True, type=Path, metavar="INPUTS.npz")
    capture.add_argument("--host", help="broker host (default: the config's)")
    capture.add_argument("--port", type=int, help="broker port (default: the config's)")
    capture.add_argument("--username", help="broker user name")
    capture.add_argument("--password-file", metavar="PATH", help="file holding the password")
    capture.add_argument("--ca-file", metavar="PATH", help="CA certificate: connect with TLS")


def run(args: argparse.Namespace) -> int:
    """Run one ``model`` subcommand; returns the exit code."""
    module = importlib.import_module(f"agent.cli.model_{args.model_command}")
    code: int = module.run(args)
    return code


def _config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        metavar="PATH",
        help="the device's config: its providers, threads, require_providers and "
        "pipelines apply (default: the run command's config if it exists)",
    )
    parser.add_argument(
        "--providers",
        nargs="+",
        metavar="PROVIDER",
        help="request these execution providers, in order, instead of the config's",
    )


def _tolerance_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--rtol", type=_non_negative_float, default=None, help="relative tolerance (1e-3)"
    )
    parser.add_argument(
        "--atol", type=_non_negative_float, default=None, help="absolute tolerance (1e-5)"
    )
    parser.add_argument(
        "--top1",
        type=_fraction,
        default=None,
        metavar="FRACTION",
        help="judge it as a classifier's: top-1 agreement of at least FRACTION (e.g. 0.99)",
    )


def add_tolerance_arguments(parser: argparse.ArgumentParser) -> None:
    """``--rtol``, ``--atol`` and ``--top1``: for ``sign``/``publish-update --golden`` too."""
    _tolerance_arguments(parser)


def _batch_sizes(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of batch sizes: {text!r}") from None
    if not sizes or any(size < 1 or size > 65_536 for size in sizes):
        raise argparse.ArgumentTypeError(f"batch sizes must be 1..65536: {text!r}")
    return sizes


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more: {text!r}")
    return value


def _number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be finite: {text!r}")
    return value


def _positive_float(text: str) -> float:
    value = _number(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be more than 0: {text!r}")
    return value


def _non_negative_float(text: str) -> float:
    value = _number(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more: {text!r}")
    return value


def _fraction(text: str) -> float:
    value = _number(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1]: {text!r}")
    return value
