"""A pipeline's drift monitor from its ``drift`` settings: the reference file read (bounded,
no symlink followed) and turned into per-feature bins. Runs once, when the pipeline is
built (the main thread)."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import structlog

from agent.config.schema import DriftConfig, PipelineConfig
from agent.errors import GoldenSetError
from agent.inference.drift import (
    DriftMonitor,
    DriftSettings,
    DriftState,
    Reference,
    feature_names,
    features,
)
from agent.inference.golden import golden_path_for, read_npz_file
from agent.inference.reporting import ErrorReporter

log = structlog.get_logger(__name__)

MAX_REFERENCE_BYTES = 16 * 1024 * 1024
MIN_REFERENCE_READINGS = 100  # fewer give deciles too coarse to compare windows with
INPUT_PREFIX = "input:"
OUTPUT_PREFIX = "expected:"


def reference_path(config: DriftConfig, model_file: Path, models_dir: Path) -> Path:
    """Where the reference is: ``golden`` is the model's ``NAME.golden.npz``; a relative
    path is under ``models_dir``."""
    if config.reference == "golden":
        return golden_path_for(model_file)
    return models_dir / config.reference


def build_monitor(
    config: DriftConfig,
    model_file: Path,
    models_dir: Path,
    logger: Any = None,
    clock: Callable[[], float] = time.monotonic,
) -> DriftMonitor:
    """The monitor for a pipeline; ``GoldenSetError`` says what is wrong with the reference."""
    path = reference_path(config, model_file, models_dir)
    arrays = read_npz_file(path, "drift reference", MAX_REFERENCE_BYTES)
    chosen = sorted(
        (key.startswith(OUTPUT_PREFIX), key.partition(":")[2], array)
        for key, array in arrays.items()
        if key.startswith((INPUT_PREFIX, OUTPUT_PREFIX)) and ":" in key and key.partition(":")[2]
    )
    if not any(not is_output for is_output, _, _ in chosen):
        raise GoldenSetError(f"{path}: no input:<name> arrays to compare the readings with")
    rows = {int(array.shape[0]) if array.ndim else 0 for _, _, array in chosen}
    if len(rows) != 1:
        raise GoldenSetError(f"{path}: its arrays hold different numbers of readings")
    count = rows.pop()
    if count < MIN_REFERENCE_READINGS:
        raise GoldenSetError(
            f"{path}: {count} readings, fewer than the {MIN_REFERENCE_READINGS} a reference "
            "needs (capture more with `edge-agent model capture`)"
        )
    columns = [features(array, stacked=True) for _, _, array in chosen]
    names: list[str] = []
    for is_output, name, array in chosen:
        names += feature_names(f"out:{name}" if is_output else name, tuple(array.shape[1:]))
    table = np.concatenate(columns, axis=1)
    width = table.shape[1]
    table = table[:, : len(names)]
    table = table[np.isfinite(table).all(axis=1)]
    if len(table) < MIN_REFERENCE_READINGS:
        raise GoldenSetError(f"{path}: fewer than {MIN_REFERENCE_READINGS} finite readings")
    return DriftMonitor(
        Reference(table, names),
        tuple((name, is_output) for is_output, name, _ in chosen),
        DriftSettings(config.window_s, config.threshold, config.windows),
        width=width,
        clock=clock,
        logger=logger,
    )


class PipelineDrift:
    """A pipeline's drift: its monitor, or why it has none although ``drift`` is set."""

    def __init__(self, monitor: DriftMonitor | None, problem: str | None) -> None:
        self.monitor = monitor
        self._problem = DriftState(problem=problem) if problem is not None else None

    @property
    def state(self) -> DriftState | None:
        """The latest figures (any thread)."""
        return self.monitor.state if self.monitor is not None else self._problem


def pipeline_drift(
    name: str, config: PipelineConfig, model_file: Path, models_dir: Path, errors: ErrorReporter
) -> PipelineDrift | None:
    """The drift of pipeline ``name``; None without ``drift`` settings. A reference that
    cannot be used is logged and reported on the errors topic, and the pipeline serves all
    the same."""
    if config.drift is None:
        return None
    logger = log.bind(pipeline=name, model=config.model)
    try:
        return PipelineDrift(build_monitor(config.drift, model_file, models_dir, logger), None)
    except GoldenSetError as exc:
        logger.error("drift_reference_unusable", error=str(exc))
        errors.report_step(f"drift: {exc}", pipeline=name)
        return PipelineDrift(None, str(exc))
