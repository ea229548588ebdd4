"""The report of ``edge-agent detect``: hardware, offered and chosen providers, hints."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import onnxruntime as ort

from agent import __version__
from agent.config.schema import AgentConfig
from agent.hardware.detect import detect
from agent.hardware.providers import PlanInputs, plan_providers


def build_report(
    config: AgentConfig, root: str = "/", machine: str | None = None
) -> dict[str, Any]:
    """Everything ``detect`` prints, as JSON-friendly data."""
    hardware = detect(root, machine)
    available = list(ort.get_available_providers())
    setting = config.providers
    plan = plan_providers(
        hardware,
        PlanInputs(
            available=available,
            requested=None if setting in (None, "auto") else list(setting),
            state_dir=Path(config.state_dir),
            gpu_mem_limit_mb=config.gpu_mem_limit_mb,
            cpu_threads=config.cpu_threads,
            ort_version=ort.__version__,
        ),
    )
    per_model = {
        name: list(model.providers)
        for name, model in config.models.items()
        if model.providers is not None and model.providers != "auto"
    }
    return {
        "agent_version": __version__,
        "onnxruntime_version": ort.__version__,
        "hardware": {"summary": hardware.summary(), **hardware.to_dict()},
        "available_providers": available,
        "providers_setting": setting if isinstance(setting, str) else list(setting or ()),
        "per_model_overrides": per_model,
        **plan.to_dict(),
        "hints": list(plan.hints),
    }


def format_report(report: dict[str, Any]) -> str:
    """The report as text for a terminal."""
    hw = report["hardware"]
    lines = [
        f"hardware:   {hw['summary']}",
        f"  board {hw['board']}, cpu {hw['cpu_vendor'] or '?'} {hw['cpu_model'] or ''}".rstrip(),
        f"  cores {hw['physical_cores']} physical / {hw['logical_cpus']} logical"
        f"{', usable ' + str(hw['usable_cpus']) if hw['usable_cpus'] else ''}, "
        f"flags {' '.join(hw['cpu_flags']) or '-'}",
    ]
    if hw["jetson"]:
        jetson = hw["jetson"]
        lines.append(
            f"  jetson {jetson['module']}, L4T {jetson['l4t'] or '?'}, "
            f"JetPack {jetson['jetpack'] or '?'}"
        )
    if hw["raspberry_pi"]:
        lines.append(
            f"  raspberry pi {hw['raspberry_pi']['model']}, revision "
            f"{hw['raspberry_pi']['revision'] or '?'}"
        )
    if hw["nvidia_gpu"]:
        gpu = hw["nvidia_gpu"]
        lines.append(
            f"  nvidia {', '.join(gpu['names']) or 'GPU'}, driver {gpu['driver_version'] or '?'}"
        )
    accelerators = [
        name
        for name, present in (
            ("intel iGPU", hw["intel_gpu"]),
            ("intel NPU", hw["intel_npu"]),
            ("AMD GPU", hw["amd_gpu"]),
        )
        if present
    ]
    if accelerators:
        lines.append(f"  also {', '.join(accelerators)}")
    lines += [
        f"onnxruntime {report['onnxruntime_version']} offers: "
        f"{', '.join(report['available_providers'])}",
        f"chosen (providers: {report['providers_setting']}):",
    ]
    for index, choice in enumerate(report["chosen"], 1):
        lines.append(f"  {index}. {choice['name']}: {choice['reason']}")
        for key, value in choice["options"].items():
            lines.append(f"       {key} = {value}")
    session = report["session"]
    lines.append(
        f"  cpu threads {session['intra_op_num_threads']}, spinning "
        f"{'on' if session['allow_spinning'] else 'off'}"
    )
    for skipped in report["skipped"]:
        lines.append(f"  skipped {skipped['name']}: {skipped['reason']}")
    for name, providers in report["per_model_overrides"].items():
        lines.append(f"  model {name} overrides: {', '.join(providers)}")
    for hint in report["hints"]:
        lines.append(f"hint: {hint}")
    return "\n".join(lines)
