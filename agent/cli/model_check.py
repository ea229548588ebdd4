"""``edge-agent model check MODEL.onnx``: what the daemon would do with a model on this
device, printed as a readable block or (``--json``) one JSON document. Exit 0 when the
daemon would serve it and its golden set passes, 1 otherwise, 2 for a usage error."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

from agent.cli.model import EXIT_FAILED, EXIT_OK, EXIT_USAGE
from agent.cli.model_support import load_tool_config, tool_logging
from agent.errors import EdgeAgentError
from agent.inference.placement import MAX_NAMED_NODES
from agent.modeltools.check import CheckRequest, check_model

_LABEL = 12  # width of the label column of the text report
_NAMED_NODES = 5  # fallen-back nodes the text names; the JSON names MAX_NAMED_NODES


def run(args: argparse.Namespace) -> int:
    """Check ``args.model_file``; returns the exit code."""
    tool_logging()
    config = load_tool_config(args.config)
    if config is None:
        return EXIT_FAILED
    if args.model is not None and args.model not in config.models:
        known = ", ".join(config.models) or "none"
        print(
            f"edge-agent model check: --model {args.model}: the config has no such model "
            f"(it has {known})",
            file=sys.stderr,
        )
        return EXIT_USAGE
    request = CheckRequest(
        model_file=args.model_file,
        name=args.model,
        providers=tuple(args.providers) if args.providers else None,
        golden_file=args.golden,
    )
    try:
        report = check_model(config, request, notice=lambda text: print(text, file=sys.stderr))
    except EdgeAgentError as exc:
        print(f"edge-agent model check: {exc}", file=sys.stderr)
        return EXIT_FAILED
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(render(report))
    return EXIT_OK if report["passed"] else EXIT_FAILED


def render(report: dict[str, Any]) -> str:
    """The text report: one labelled section per line group."""
    lines: list[str] = []
    model = report["model"]
    named = "named in the config" if model["configured"] else "not named in the config"
    _section(lines, "model", [model["file"], f"as {model['name']} ({named})"])
    _section(lines, "", [f"{model['version']}, {_size(model['size_bytes'])}"])
    _section(lines, "providers", _providers(report))
    session = report["session"]
    spinning = "on" if session["allow_spinning"] else "off"
    _section(
        lines,
        "session",
        [f"{session['intra_op_num_threads']} intra-op threads, spinning {spinning}"],
    )
    engine = report["engine_build"]
    if engine["first_build"]:
        _section(lines, "tensorrt", [f"the first run builds the engine; cache {engine['cache']}"])
    _section(lines, "placement", _placement(report))
    _section(lines, "inputs", _tensors(report["inputs"]))
    _section(lines, "outputs", _tensors(report["outputs"]))
    _section(lines, "pipelines", _pipelines(report["pipelines"]))
    warmup = report["warmup_ms"]
    _section(
        lines,
        "warm-up",
        ["-" if warmup is None else f"{warmup:g} ms (session built, checked and run once)"],
    )
    _section(lines, "golden", _golden(report["golden"]))
    value = report["require_providers"]
    setting = str(value).lower() if isinstance(value, bool) else str(value)  # as in YAML
    if report["passed"]:
        verdict = "PASS: the daemon would serve it"
    elif report["would_serve"]:
        verdict = "FAIL: the daemon would serve it, but the golden set fails"
    else:
        verdict = "FAIL: the daemon would not serve it"
    verdict += f" (require_providers: {setting})"
    _section(lines, "verdict", [verdict])
    if report["problems"]:
        _section(lines, "problems", [f"- {p}" for p in report["problems"]])
    if report["warnings"]:
        _section(lines, "warnings", [f"- {w}" for w in report["warnings"]])
    return "\n".join(lines)


def _section(lines: list[str], label: str, rows: Sequence[str]) -> None:
    for index, row in enumerate(rows):
        lines.append(f"{label if index == 0 else '':<{_LABEL}}{row}".rstrip())


def _providers(report: dict[str, Any]) -> list[str]:
    providers = report["providers"]
    rows = [f"requested  {c['name']}: {c['reason']}" for c in providers["requested"]]
    rows.extend(f"skipped    {s['name']}: {s['reason']}" for s in providers["skipped"])
    if providers["loaded"] is not None:
        rows.append(f"loaded     {', '.join(providers['loaded'])}")
        rows.append(f"missing    {', '.join(providers['missing']) or 'none'}")
    return rows


def _placement(report: dict[str, Any]) -> list[str]:
    placement = report["placement"]
    if placement is None:
        return [report.get("placement_problem") or "-"]
    counts = ", ".join(f"{name} {count} nodes" for name, count in placement["nodes"].items())
    fallback = placement["fallback_nodes"]
    if not fallback:
        return [f"{counts or 'no nodes profiled'}; no node fell back to the CPU"]
    rows = [f"{counts}; {fallback} node(s) fell back to the CPU:"]
    rows.extend(f"  {node}" for node in placement["fallback"][:_NAMED_NODES])
    if fallback > _NAMED_NODES:
        rows.append(f"  and {fallback - _NAMED_NODES} more (--json names {MAX_NAMED_NODES})")
    return rows


def _tensors(tensors: list[dict[str, Any]] | None) -> list[str]:
    if tensors is None:
        return ["-"]
    rows = []
    for tensor in tensors:
        shape = (
            "?"
            if tensor["shape"] is None
            else "[" + ", ".join("?" if d is None else str(d) for d in tensor["shape"]) + "]"
        )
        rows.append(f"{tensor['name']}  {tensor['dtype']}  {shape}")
    return rows


def _pipelines(pipelines: list[dict[str, Any]]) -> list[str]:
    if not pipelines:
        return ["none configured"]
    rows = []
    for pipeline in pipelines:
        uses = "uses it" if pipeline["uses_model"] else f"uses model {pipeline['model']}"
        if pipeline["fits"] is None:
            rows.append(f"{pipeline['name']} ({uses}): not checked")
        elif pipeline["fits"]:
            rows.append(f"{pipeline['name']} ({uses}): fits")
        else:
            rows.append(f"{pipeline['name']} ({uses}): does not fit")
            rows.extend(f"  {problem}" for problem in pipeline["problems"])
    return rows


def _golden(golden: dict[str, Any] | None) -> list[str]:
    if golden is None:
        return ["none (--golden G.npz, or NAME.golden.npz beside the model)"]
    rows = [f"{golden['file']} ({golden['source']})"]
    if "samples" in golden:
        latency = golden["latency_ms"]
        top1 = golden.get("top1_agreement")
        rows.append(
            f"{'passed' if golden['passed'] else 'FAILED'}: {golden['samples']} samples, "
            f"max abs err {_number(golden['max_abs_err'])}, max rel err "
            f"{_number(golden['max_rel_err'])}"
            + (f", top-1 agreement {top1:g}" if top1 is not None else "")
        )
        rows.append(
            f"rtol {golden['rtol']:g}, atol {golden['atol']:g}; latency p50 "
            f"{_number(latency['p50'])} ms, p99 {_number(latency['p99'])} ms"
        )
    elif golden["passed"] is False:
        rows.append("FAILED")
    return rows


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


def _size(size: int) -> str:
    if size >= 1024 * 1024:
        return f"{size / (1024 * 1024):.1f} MiB"
    if size >= 1024:
        return f"{size / 1024:.1f} KiB"
    return f"{size} bytes"
