"""``edge-agent model golden MODEL.onnx --inputs INPUTS.npz [--reference REF.onnx] -o G.npz``."""

from __future__ import annotations

import argparse
import sys

from agent.cli.model import EXIT_FAILED, EXIT_OK
from agent.cli.model_support import tool_logging
from agent.durable import write_atomically
from agent.errors import EdgeAgentError
from agent.inference.golden import DEFAULT_ATOL, DEFAULT_RTOL, MAX_GOLDEN_BYTES, Tolerances
from agent.modeltools.reference import REFERENCE_PROVIDERS, describe_arrays, make_golden


def run(args: argparse.Namespace) -> int:
    """Compute the expected outputs and write GOLDEN.npz; returns the exit code."""
    tool_logging()
    tolerances = Tolerances(
        rtol=DEFAULT_RTOL if args.rtol is None else args.rtol,
        atol=DEFAULT_ATOL if args.atol is None else args.atol,
        top1_agreement=args.top1,
    )
    try:
        result = make_golden(args.model_file, args.inputs, tolerances, args.reference)
        write_atomically(args.output, result.data)
    except EdgeAgentError as exc:
        print(f"edge-agent model golden: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except OSError as exc:
        print(f"edge-agent model golden: cannot write {args.output}: {exc}", file=sys.stderr)
        return EXIT_FAILED
    golden = result.golden
    size = len(result.data)
    limits = ", ".join(f"{key} {value:g}" for key, value in tolerances.to_dict().items())
    print(f"wrote {args.output}: {golden.samples} samples, {size} bytes ", end="")
    print(f"({100 * size / MAX_GOLDEN_BYTES:.0f} % of the 1 MiB a device accepts)")
    print(f"  inputs:   {describe_arrays(golden.inputs)}")
    print(f"  expected: {describe_arrays(golden.expected)}")
    print(f"  from {result.reference} on {', '.join(REFERENCE_PROVIDERS)}, one sample per run")
    print(f"  tolerances: {limits}")
    if result.ignored:
        print(f"  ignored in {args.inputs}: {', '.join(result.ignored)}")
    return EXIT_OK
