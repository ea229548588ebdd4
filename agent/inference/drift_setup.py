"""A pipeline's drift monitor from its ``drift`` settings: the reference found and read
(bounded, no symlink followed) and turned into per-feature bins.

``reference: FILE.npz`` is read once, when the pipeline is built (the main thread).
``reference: golden`` follows the serving model: the golden set it passed when it loaded
(a signed update's, or the ``NAME.golden.npz`` beside its file), else the one its last
signed update carried (kept in ``state_dir/references``), else the one beside its file. It
is read on the pipeline's serving thread at its first batch and again whenever the
serving model changes: once per model, not per reading.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
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
from agent.inference.golden import golden_path_for, read_npz_file, reference_path_for
from agent.inference.reporting import ErrorReporter
from agent.inference.session import LoadedModel

log = structlog.get_logger(__name__)

MAX_REFERENCE_BYTES = 16 * 1024 * 1024
MIN_REFERENCE_READINGS = 100  # fewer give deciles too coarse to compare windows with
INPUT_PREFIX = "input:"
OUTPUT_PREFIX = "expected:"
Clock = Callable[[], float]


@dataclass(frozen=True)
class ReferencePlaces:
    """Where a pipeline's reference files may be."""

    model_file: Path
    models_dir: Path
    state_dir: Path


def load_reference(
    config: DriftConfig, model: str, places: ReferencePlaces, serving: LoadedModel | None
) -> tuple[Mapping[str, np.ndarray], str]:
    """The reference's arrays (``input:<name>``, ``expected:<name>``) and what they are, for
    errors; ``GoldenSetError`` when there is none or it cannot be read."""
    if config.reference != "golden":
        path = places.models_dir / config.reference
        return read_npz_file(path, "drift reference", MAX_REFERENCE_BYTES), str(path)
    if serving is not None and serving.golden is not None:
        golden = serving.golden
        arrays = {INPUT_PREFIX + k: v for k, v in golden.inputs.items()}
        arrays |= {OUTPUT_PREFIX + k: v for k, v in golden.expected.items()}
        return arrays, f"the golden set {serving.version[:19]}... passed"
    kept = reference_path_for(places.state_dir, model)
    path = kept if os.path.lexists(kept) else golden_path_for(places.model_file)
    return read_npz_file(path, "drift reference", MAX_REFERENCE_BYTES), str(path)


def build_monitor(
    config: DriftConfig,
    arrays: Mapping[str, np.ndarray],
    source: str,
    logger: Any = None,
    clock: Clock = time.monotonic,
) -> DriftMonitor:
    """The monitor for a reference's arrays; ``GoldenSetError`` says what is wrong."""
    chosen = sorted(
        (key.startswith(OUTPUT_PREFIX), key.partition(":")[2], array)
        for key, array in arrays.items()
        if key.startswith((INPUT_PREFIX, OUTPUT_PREFIX)) and key.partition(":")[2]
    )
    if not any(not is_output for is_output, _, _ in chosen):
        raise GoldenSetError(f"{source}: no input:<name> arrays to compare the readings with")
    rows = {int(array.shape[0]) if array.ndim else 0 for _, _, array in chosen}
    if len(rows) != 1:
        raise GoldenSetError(f"{source}: its arrays hold different numbers of readings")
    count = rows.pop()
    if count < MIN_REFERENCE_READINGS:
        raise GoldenSetError(
            f"{source}: {count} readings, fewer than the {MIN_REFERENCE_READINGS} a reference "
            "needs (capture more with `edge-agent model capture`)"
        )
    names: list[str] = []
    for is_output, name, array in chosen:
        names += feature_names(f"out:{name}" if is_output else name, tuple(array.shape[1:]))
    table = np.concatenate([features(array, stacked=True) for _, _, array in chosen], axis=1)
    width = table.shape[1]
    table = table[:, : len(names)]
    table = table[np.isfinite(table).all(axis=1)]
    if len(table) < MIN_REFERENCE_READINGS:
        raise GoldenSetError(f"{source}: fewer than {MIN_REFERENCE_READINGS} finite readings")
    return DriftMonitor(
        Reference(table, names),
        tuple((name, is_output) for is_output, name, _ in chosen),
        DriftSettings(config.window_s, config.threshold, config.windows),
        width=width,
        clock=clock,
        logger=logger,
    )


class PipelineDrift:
    """A pipeline's drift: its monitor, or why it has none although ``drift`` is set.

    Built on the main thread; ``observe`` runs on the pipeline's serving thread, which owns
    the monitor from then on; ``state`` is read by the health report (any thread)."""

    def __init__(
        self,
        name: str,
        config: PipelineConfig,
        places: ReferencePlaces,
        errors: ErrorReporter,
        clock: Clock = time.monotonic,
    ) -> None:
        assert config.drift is not None
        self._name = name
        self._settings = config.drift
        self._model = config.model
        self._places = places
        self._errors = errors
        self._clock = clock
        self._log = log.bind(pipeline=name, model=config.model)
        self._follows_model = config.drift.reference == "golden"
        self._version: str | None = None  # the serving model the monitor was built for
        self.monitor: DriftMonitor | None = None
        self._problem: DriftState | None = None
        if not self._follows_model:
            self._build(None)

    @property
    def state(self) -> DriftState | None:
        """The latest figures (any thread)."""
        return self.monitor.state if self.monitor is not None else self._problem

    def observe(
        self,
        feeds: Mapping[str, Any],
        outputs: Mapping[str, Any],
        stacked: bool,
        model: LoadedModel,
    ) -> None:
        """One batch ``model`` ran (the serving thread)."""
        if self._follows_model and model.version != self._version:
            self._version = model.version
            self._build(model)
        if self.monitor is not None:
            self.monitor.observe(feeds, outputs, stacked)

    def _build(self, serving: LoadedModel | None) -> None:
        try:
            arrays, source = load_reference(self._settings, self._model, self._places, serving)
            self.monitor = build_monitor(self._settings, arrays, source, self._log, self._clock)
            self._problem = None
        except GoldenSetError as exc:
            self.monitor = None
            self._problem = DriftState(problem=str(exc))
            self._log.error("drift_reference_unusable", error=str(exc))
            self._errors.report_step(f"drift: {exc}", pipeline=self._name)


def pipeline_drift(
    name: str, config: PipelineConfig, places: ReferencePlaces, errors: ErrorReporter
) -> PipelineDrift | None:
    """The drift of pipeline ``name``; None without ``drift`` settings. A reference that
    cannot be used is logged and reported on the errors topic, and the pipeline serves all
    the same."""
    if config.drift is None:
        return None
    return PipelineDrift(name, config, places, errors)
