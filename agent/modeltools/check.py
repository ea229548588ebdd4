"""``edge-agent model check``: what the daemon would do with a model file on this device.

The model is loaded by the daemon's own code (``common.open_model``: the provider plan,
session options, provider check, node placement and warm-up), with ``require_providers``
off so that the report can say what the setting would refuse instead of stopping at it.
Everything the daemon would decide is decided by the same functions: ``pipeline_problems``
for the pipelines, ``placement_refusal`` for ``require_providers``, ``validate`` for the
golden set. The result is one JSON-friendly document; the command line renders it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from agent.config.schema import AgentConfig
from agent.errors import GoldenSetError, ModelLoadError
from agent.hardware.detect import Hardware, detect
from agent.hardware.providers import ProviderPlan
from agent.inference.codecs import ONNX_TO_NUMPY
from agent.inference.compat import pipeline_problems
from agent.inference.engine_build import first_engine_build
from agent.inference.golden import GoldenSet, golden_path_for, read_golden_file
from agent.inference.placement import placement_refusal
from agent.inference.runplan import ModelView
from agent.inference.session import LoadedModel, SessionFactory
from agent.inference.validation import validate
from agent.modeltools.common import OpenedModel, ToolModel, as_model, open_model, run_many

_HASH_CHUNK = 1024 * 1024

# Told, before a load that builds a TensorRT engine, where the engine goes: such a load can
# take minutes, and the operator should know why nothing happens.
Notice = Callable[[str], None]


@dataclass(frozen=True)
class CheckRequest:
    """What ``model check`` was asked: the file, as which model, with which providers and
    golden set (None: the ``NAME.golden.npz`` beside the file, as the daemon would)."""

    model_file: Path
    name: str | None = None
    providers: tuple[str, ...] | None = None
    golden_file: Path | None = None


def check_model(
    config: AgentConfig,
    request: CheckRequest,
    *,
    hardware: Hardware | None = None,
    notice: Notice | None = None,
) -> dict[str, Any]:
    """The ``model check`` report of ``request`` under ``config``; ``passed`` is the verdict
    (the daemon would serve the model and its golden set, if any, passes). Raises
    ``ModelLoadError`` only when the file cannot be read."""
    hardware = hardware or detect()
    tool = as_model(config, request.model_file, request.name, request.providers)
    version, size = file_version(tool.path)
    plan = SessionFactory(hardware).plan(tool.config, tool.name, version)
    report: dict[str, Any] = {
        "model": model_summary(tool, version, size),
        "providers": plan_summary(plan, from_command_line=bool(request.providers)),
        "session": session_summary(plan),
        "engine_build": engine_build_summary(plan),
    }
    if notice is not None and report["engine_build"]["first_build"]:
        notice(engine_build_note(report["engine_build"]["cache"]))
    problems: list[str] = []
    warnings: list[str] = []
    opened, pipeline_refusal, load_error = _load(tool, hardware)
    if opened is None:
        problems.append(f"{tool.path} does not load: {load_error}")
        report.update(_unloaded(config, tool, request, problems))
        return report
    model = opened.model
    report["providers"].update(loaded_summary(model))
    report["placement"] = model.placement.to_dict() if model.placement is not None else None
    report["placement_problem"] = model.placement_problem
    report["inputs"], report["outputs"] = tensor_summaries(model.session)
    for item in report["inputs"]:
        spec = model.input(item["name"])
        item["batch_axis"] = spec is not None and spec.batched
    report["pipelines"] = _pipelines(config, tool, model)
    report["warmup_ms"] = round(opened.load_seconds * 1000, 2)
    for pipeline in report["pipelines"]:
        if pipeline["uses_model"]:
            problems.extend(pipeline["problems"])
    if pipeline_refusal is not None and not problems:
        problems.append(pipeline_refusal)  # the warm-up with a pipeline's inputs failed
    refusal = placement_refusal(
        config.require_providers,
        report["providers"]["missing"],
        model.providers,
        model.placement,
        model.placement_problem,
    )
    if refusal is not None:
        problems.append(refusal)
    warnings.extend(_warnings(report, refusal))
    report["golden"] = _golden(request, tool, model)
    would_serve = not problems
    golden_ok = report["golden"] is None or report["golden"]["passed"] is True
    if report["golden"] is not None and not golden_ok:
        problems.extend(f"golden set: {p}" for p in report["golden"].get("problems", []))
    report["require_providers"] = config.require_providers
    report["refusal"] = refusal
    report["would_serve"] = would_serve
    report["passed"] = would_serve and golden_ok
    report["problems"] = problems
    report["warnings"] = warnings
    return report


def file_version(path: Path) -> tuple[str, int]:
    """The model version the daemon gives ``path`` (``sha256:<hex>``) and its size in bytes.
    Raises ``ModelLoadError`` naming the file when it cannot be read."""
    digest = hashlib.sha256()
    size = 0
    try:
        with path.open("rb") as handle:
            while chunk := handle.read(_HASH_CHUNK):
                digest.update(chunk)
                size += len(chunk)
    except OSError as exc:
        raise ModelLoadError(f"cannot read {path}: {exc.strerror}") from exc
    return "sha256:" + digest.hexdigest(), size


def model_summary(tool: ToolModel, version: str, size: int) -> dict[str, Any]:
    """The model file, the name it is checked as and whether the config names it."""
    return {
        "file": str(tool.path),
        "name": tool.name,
        "configured": tool.configured,
        "version": version,
        "size_bytes": size,
    }


def plan_summary(plan: ProviderPlan, from_command_line: bool = False) -> dict[str, Any]:
    """The providers requested, best first, each with its options and why it was chosen;
    ``loaded`` and ``missing`` are filled in once a session exists."""
    document = plan.to_dict()
    if from_command_line:  # the plan cannot tell --providers from the config's setting
        for choice in document["chosen"]:
            choice["reason"] = choice["reason"].replace(
                "requested in the config", "requested with --providers"
            )
    return {
        "requested": document["chosen"],
        "skipped": document["skipped"],
        "loaded": None,
        "missing": None,
    }


def session_summary(plan: ProviderPlan) -> dict[str, Any]:
    """The daemon's session options for this plan: CPU threads and spinning."""
    session: dict[str, Any] = plan.to_dict()["session"]
    return session


def loaded_summary(model: LoadedModel) -> dict[str, list[str]]:
    """The providers onnxruntime loaded, and the requested ones it did not."""
    return {
        "loaded": list(model.providers),
        "missing": [name for name in model.requested if name not in model.providers],
    }


def engine_build_summary(plan: ProviderPlan) -> dict[str, Any]:
    """Whether the first load builds a TensorRT engine, and the cache it goes to."""
    cache = first_engine_build(plan)
    return {"first_build": cache is not None, "cache": str(cache) if cache else None}


def engine_build_note(cache: str | None) -> str:
    """The operator's warning before a load that builds a TensorRT engine."""
    return (
        f"TensorRT: the first run builds the engine (minutes on a small board); it is "
        f"cached in {cache} and later loads reuse it"
    )


def tensor_summaries(session: ort.InferenceSession) -> tuple[list[dict[str, Any]], ...]:
    """The inputs and the outputs of ``session``: name, dtype and declared shape (symbolic
    axes by their name, unknown ones as null)."""

    def describe(item: Any) -> dict[str, Any]:
        return {
            "name": item.name,
            "dtype": _dtype(item.type),
            "shape": [_axis(axis) for axis in item.shape] if item.shape is not None else None,
        }

    return (
        [describe(item) for item in session.get_inputs()],
        [describe(item) for item in session.get_outputs()],
    )


def _load(tool: ToolModel, hardware: Hardware) -> tuple[OpenedModel | None, str | None, str | None]:
    """Load as the daemon would, with the pipelines that use the model. When that fails and
    pipelines were involved, load once more without them: a model that loads on its own was
    refused for its pipelines (the first error says how), else it does not load at all.
    Returns (the opened model, the pipelines' refusal, the load error)."""
    try:
        return open_model(tool, hardware), None, None
    except ModelLoadError as exc:
        if not tool.config.pipelines:
            return None, None, str(exc)
        first = str(exc)
    alone = replace(tool, config=tool.config.model_copy(update={"pipelines": {}}))
    try:
        return open_model(alone, hardware), first, None
    except ModelLoadError:
        return None, None, first


def _pipelines(config: AgentConfig, tool: ToolModel, model: LoadedModel) -> list[dict[str, Any]]:
    """Every configured pipeline: does it use this model, does it fit it, and why not."""
    view = ModelView(model.inputs, model.outputs)
    rows = []
    for name, pipeline in config.pipelines.items():
        problems = pipeline_problems(view, {name: pipeline})
        rows.append(
            {
                "name": name,
                "model": pipeline.model,
                "uses_model": tool.configured and pipeline.model == tool.name,
                "fits": not problems,
                "problems": problems,
            }
        )
    return rows


def _golden(request: CheckRequest, tool: ToolModel, model: LoadedModel) -> dict[str, Any] | None:
    """The golden comparison with the serving providers, or None when there is no set."""
    path, source = _golden_path(request, tool)
    if path is None:
        return None
    try:
        golden: GoldenSet = read_golden_file(path)
    except GoldenSetError as exc:
        return {"file": str(path), "source": source, "passed": False, "problems": [str(exc)]}
    report = validate(golden, model.inputs, model.outputs, model.providers, run_many(model))
    document = report.to_dict()
    return {"file": str(path), "source": source, **document}


def _golden_path(request: CheckRequest, tool: ToolModel) -> tuple[Path | None, str]:
    if request.golden_file is not None:
        return request.golden_file, "--golden"
    beside = golden_path_for(tool.path)
    if beside.exists():
        return beside, "beside the model (the daemon checks it too)"
    return None, ""


def _warnings(report: dict[str, Any], refusal: str | None) -> list[str]:
    """What the daemon would serve despite: providers that did not load, nodes that fell
    back, while ``require_providers`` lets it."""
    if refusal is not None:
        return []
    warnings = []
    missing = report["providers"]["missing"]
    if missing:
        warnings.append(
            f"requested providers {missing} did not load: the daemon would serve on "
            f"{report['providers']['loaded']} (degraded)"
        )
    placement = report["placement"]
    if placement is not None and placement["fallback_nodes"]:
        warnings.append(
            f"{placement['fallback_nodes']} node(s) fell back to the CPU "
            "(require_providers: all_nodes would refuse the model)"
        )
    return warnings


def _unloaded(
    config: AgentConfig, tool: ToolModel, request: CheckRequest, problems: list[str]
) -> dict[str, Any]:
    """The rest of the report of a model that does not load."""
    path, source = _golden_path(request, tool)
    return {
        "placement": None,
        "placement_problem": None,
        "inputs": None,
        "outputs": None,
        "pipelines": [
            {
                "name": name,
                "model": pipeline.model,
                "uses_model": tool.configured and pipeline.model == tool.name,
                "fits": None,
                "problems": [],
            }
            for name, pipeline in config.pipelines.items()
        ],
        "warmup_ms": None,
        "golden": None
        if path is None
        else {
            "file": str(path),
            "source": source,
            "passed": None,
            "problems": ["not run: the model does not load"],
        },
        "require_providers": config.require_providers,
        "refusal": None,
        "would_serve": False,
        "passed": False,
        "problems": problems,
        "warnings": [],
    }


def _dtype(onnx_type: str) -> str:
    """``tensor(float)`` -> ``float32``; other types (sequences, maps) as onnxruntime names
    them."""
    numpy_type = ONNX_TO_NUMPY.get(onnx_type)
    return onnx_type if numpy_type is None else np.dtype(numpy_type).name


def _axis(axis: Any) -> int | str | None:
    if isinstance(axis, int) and axis >= 0:
        return axis
    if isinstance(axis, str) and axis:
        return axis
    return None
