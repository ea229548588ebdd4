"""What the model tools share: the device's config, a model file seen as one of its models,
a session built by the daemon's own code, and inputs to time it with.

The tools load a model exactly as the daemon would (``SessionFactory``: the same provider
plan, session options, provider check, placement and warm-up), so their figures are the
ones the daemon will see on this device.
"""

from __future__ import annotations

import hashlib
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from agent.config.loader import default_config, load_config, resolve_config_path
from agent.config.schema import AgentConfig, ModelConfig
from agent.errors import ModelLoadError
from agent.hardware.detect import Hardware, detect
from agent.inference.codecs import TensorSpec
from agent.inference.engine_build import first_engine_build
from agent.inference.golden import GoldenSet
from agent.inference.session import LoadedModel, SessionFactory, WarmupLimit
from agent.inference.validation import RunMany, timed_runs

_UNSAFE_NAME = re.compile(r"[^A-Za-z0-9._-]")


@dataclass(frozen=True)
class ToolModel:
    """A model file as one of the config's models: ``config`` holds it under ``name`` (with
    the pipelines that use it when the config names it) and ``configured`` says whether it
    did."""

    config: AgentConfig
    name: str
    path: Path
    configured: bool


@dataclass(frozen=True)
class OpenedModel:
    """A session built the daemon's way, and how long building and warming it up took."""

    model: LoadedModel
    load_seconds: float
    engine_cache: Path | None  # the TensorRT cache a first engine build filled, if any


def tool_config(path: str | None) -> AgentConfig:
    """The config the tools apply: ``path``, else the run command's if it exists, else the
    defaults. Raises ``ConfigError``."""
    resolved = resolve_config_path(path)
    if path is not None or resolved.exists():
        return load_config(resolved)
    return default_config()


def as_model(
    config: AgentConfig,
    model_file: Path,
    name: str | None = None,
    providers: Sequence[str] | None = None,
) -> ToolModel:
    """``model_file`` as the config's model ``name`` (default: the model whose file is this
    one, or has its file name), with ``providers`` replacing the configured ones. A file the
    config does not name is a model of its own that no pipeline uses."""
    path = model_file.resolve()
    matched = name if name is not None else _configured_name(config, path)
    configured = matched is not None and matched in config.models
    chosen = matched if configured and matched is not None else _file_name(path)
    entry = config.models.get(chosen) if configured else None
    model = ModelConfig(
        file=path.name,
        providers=list(providers) if providers else (entry.providers if entry else None),
    )
    pipelines = {p: c for p, c in config.pipelines.items() if configured and c.model == chosen}
    tool = config.model_copy(
        update={
            "models_dir": str(path.parent),
            "models": {chosen: model},
            "pipelines": pipelines,
            "providers": list(providers) if providers else config.providers,
        }
    )
    return ToolModel(config=tool, name=chosen, path=path, configured=configured)


def open_model(
    tool: ToolModel,
    hardware: Hardware | None = None,
    golden: GoldenSet | None = None,
) -> OpenedModel:
    """Build, check and warm up a session for ``tool`` with the daemon's code, with
    ``require_providers`` off so the caller can report what it would refuse. Raises
    ``ModelLoadError`` (``GoldenMismatchError`` when ``golden`` fails)."""
    factory = SessionFactory(hardware or detect())
    config = tool.config.model_copy(update={"require_providers": False})
    try:
        data = tool.path.read_bytes()
    except OSError as exc:
        raise ModelLoadError(f"cannot read {tool.path}: {exc.strerror}") from exc
    version = "sha256:" + hashlib.sha256(data).hexdigest()
    engine_cache = first_engine_build(
        factory.plan(config, tool.name, version), ort.get_available_providers()
    )
    started = time.monotonic()
    model = factory.build(
        config,
        tool.name,
        tool.path,
        data,
        version,
        started=started,
        limit=WarmupLimit(config.warmup_timeout_s, "warmup_timeout_s"),
        golden=golden,
        measure_placement=True,  # the operator asked what runs where, even on the CPU
    )
    return OpenedModel(model, time.monotonic() - started, engine_cache)


def run_many(model: LoadedModel) -> RunMany:
    """Time ``model``'s runs one feed at a time (for golden sets off the daemon)."""

    def run(feeds: dict[str, np.ndarray]) -> list[Any]:
        outputs: list[Any] = model.session.run(None, feeds)
        return outputs

    return timed_runs(run)


def synthetic_feeds(
    specs: Sequence[TensorSpec], batch: int, rng: np.random.Generator
) -> dict[str, np.ndarray]:
    """Random inputs of ``batch`` readings: normal floats, zero integers, dynamic axes of
    length 1; inputs without a batch axis (a stream's state) get zeros of their shape."""
    feeds: dict[str, np.ndarray] = {}
    for spec in specs:
        item = tuple(1 if dim is None else dim for dim in spec.item_shape)
        shape = (batch, *item) if spec.batched else item
        if spec.dtype.kind == "f" and spec.batched:
            feeds[spec.name] = rng.standard_normal(shape).astype(spec.dtype)
        else:
            feeds[spec.name] = np.zeros(shape, dtype=spec.dtype)
    return feeds


def golden_feeds(
    golden: GoldenSet, specs: Sequence[TensorSpec], batch: int
) -> dict[str, np.ndarray]:
    """A batch of ``batch`` readings taken from the golden set's samples, repeated as needed;
    inputs without a batch axis get the first sample's value."""
    feeds: dict[str, np.ndarray] = {}
    for spec in specs:
        values = golden.inputs.get(spec.name)
        if values is None:
            raise ModelLoadError(f"the golden set has no input:{spec.name}")
        if spec.batched:
            rows = np.resize(np.arange(len(values)), batch)
            feeds[spec.name] = np.ascontiguousarray(values[rows].astype(spec.dtype))
        else:
            feeds[spec.name] = np.ascontiguousarray(values[0].astype(spec.dtype))
    return feeds


def percentile_ms(seconds: Sequence[float], percent: float) -> float | None:
    """The ``percent`` percentile of run times in ms (None for none)."""
    if not seconds:
        return None
    return round(float(np.percentile(seconds, percent)) * 1000, 4)


def _configured_name(config: AgentConfig, path: Path) -> str | None:
    """The config's model whose file is ``path`` (the same file, else the same name)."""
    by_name = None
    for name in config.models:
        candidate = config.model_path(name)
        try:
            if candidate.exists() and candidate.samefile(path):
                return name
        except OSError:
            pass
        if candidate.name == path.name and by_name is None:
            by_name = name
    return by_name


def _file_name(path: Path) -> str:
    """A valid model name from a file name (``vib_iforest.onnx`` -> ``vib_iforest``)."""
    stem = _UNSAFE_NAME.sub("_", path.stem)[:64]
    return stem if stem not in ("", ".", "..") else "model"
