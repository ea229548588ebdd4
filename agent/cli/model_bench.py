"""``edge-agent model bench MODEL.onnx``: cold and warm latency, throughput and memory per
batch size, as a table or (``--json``) one JSON document. A progress line is drawn on
stderr when it is a terminal. Exit 0 when every batch size was measured, 1 otherwise."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from agent.cli.model import EXIT_FAILED, EXIT_OK
from agent.cli.model_support import load_tool_config, tool_logging
from agent.errors import EdgeAgentError
from agent.modeltools.bench import BenchRequest, bench_model

_CLEAR = "\r\x1b[K"  # back to the line's start and erase it


def run(args: argparse.Namespace) -> int:
    """Benchmark ``args.model_file``; returns the exit code."""
    tool_logging()
    config = load_tool_config(args.config)
    if config is None:
        return EXIT_FAILED
    request = BenchRequest(
        model_file=args.model_file,
        batches=tuple(args.batch),
        seconds=args.seconds,
        providers=tuple(args.providers) if args.providers else None,
        golden_file=args.golden,
    )
    line = ProgressLine() if sys.stderr.isatty() else None
    try:
        report = bench_model(
            config,
            request,
            progress=line.draw if line is not None else None,
            notice=lambda text: print(text, file=sys.stderr),
        )
    except EdgeAgentError as exc:
        print(f"edge-agent model bench: {exc}", file=sys.stderr)
        return EXIT_FAILED
    finally:
        if line is not None:
            line.clear()
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(render(report))
    failed = any("error" in result or "skipped" in result for result in report["results"])
    return EXIT_FAILED if failed else EXIT_OK


class ProgressLine:
    """One line on the terminal, redrawn in place (``\\r``) and erased at the end."""

    def __init__(self) -> None:
        self._drawn = False

    def draw(self, text: str) -> None:
        """Replace the line with ``text``."""
        sys.stderr.write(f"{_CLEAR}{text}")
        sys.stderr.flush()
        self._drawn = True

    def clear(self) -> None:
        """Erase the line, if one was drawn."""
        if self._drawn:
            sys.stderr.write(_CLEAR)
            sys.stderr.flush()
            self._drawn = False


def render(report: dict[str, Any]) -> str:
    """The text report: the model, providers and session options, then a table."""
    model = report["model"]
    providers = report["providers"]
    session = report["session"]
    requested = ", ".join(choice["name"] for choice in providers["requested"])
    lines = [
        f"model      {model['file']} ({model['name']}), {model['version']}",
        f"providers  loaded {', '.join(providers['loaded'])} (requested {requested})",
        f"session    {session['intra_op_num_threads']} intra-op threads, spinning "
        f"{'on' if session['allow_spinning'] else 'off'}",
        "inputs     "
        + ("the golden set's samples" if report["inputs"] == "golden" else "random numbers")
        + f", {report['seconds']:g} s per batch size",
    ]
    if providers["missing"]:
        lines.append(f"missing    {', '.join(providers['missing'])} did not load")
    placement = report["placement"]
    if placement is not None and placement["fallback_nodes"]:
        lines.append(f"placement  {placement['fallback_nodes']} node(s) fell back to the CPU")
    engine = report["engine_build"]
    if engine["first_build"]:
        lines.append(f"tensorrt   the first run builds the engine; cache {engine['cache']}")
    lines.extend(f"note       {note}" for note in report["notes"])
    lines.append("")
    header = ("batch", "load ms", "cold ms", "p50 ms", "p99 ms", "runs", "readings/s", "RSS +MB")
    rows = [header]
    for result in report["results"]:
        rows.append(
            (
                str(result["batch"]),
                _number(result["load_ms"]),
                _number(result["cold_ms"]),
                _number(result["p50_ms"]),
                _number(result["p99_ms"]),
                str(result["runs"]),
                _number(result["throughput_per_s"], ".1f"),
                _number(result["rss_added_mb"], ".1f"),
            )
        )
    widths = [max(len(row[column]) for row in rows) for column in range(len(header))]
    lines.extend(
        "  ".join(cell.rjust(width) for cell, width in zip(row, widths, strict=True))
        for row in rows
    )
    for result in report["results"]:
        why = result.get("error") or result.get("skipped")
        if why:
            lines.append(f"batch {result['batch']}: {why}")
    return "\n".join(lines)


def _number(value: float | None, style: str = ".4g") -> str:
    return "-" if value is None else format(value, style)
