"""A pipeline's drift monitor from its ``drift`` settings: the reference found and read
(bounded, no symlink followed) and turned into per-feature bins.

``reference: FILE.npz`` is read once, when the pipeline is built (the main thread).
``reference: golden`` follows the serving model: the golden set it passed when it loaded
(a signed update's, or the ``NAME.golden.npz`` beside its file), else the one its last
signed update carried (kept in ``state_dir/references``), else the one beside its file. It
is read again whenever the serving model changes, on a thread of its own started by the
serving thread at the first batch of the new model: reading and binning a reference of
16 MB takes a while, and the serving path must not wait for it. The readings in between
go unmeasured (a few batches, against windows of minutes).
"""

from __future__ import annotations

import os
import threading
import time
from collections import deque
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
    the monitor from then on; a reference that follows the model is built on a thread of
    its own, which hands its monitor over through ``_built``; ``state`` is read by the health
    report (any thread)."""

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
        # (version, monitor or None, problem or None): appended by builder threads, taken
        # by the serving thread (a deque's append and popleft are thread-safe).
        self._built: deque[tuple[str, DriftMonitor | None, DriftState | None]] = deque()
        if not self._follows_model:
            self.monitor, self._problem = self._build(None)

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
        if self._follows_model:
            self._follow(model)
        if self.monitor is not None:
            self.monitor.observe(feeds, outputs, stacked)

    def _follow(self, model: LoadedModel) -> None:
        """Start building the reference of a newly serving ``model``, and take over a
        monitor once built (the serving thread)."""
        if model.version != self._version:
            self._version = model.version
            # The last model's reference does not describe this one: nothing to show
            # until the new one is built.
            self.monitor, self._problem = None, None
            threading.Thread(
                target=self._build_for,
                args=(model,),
                name=f"drift-reference-{self._name}",
                daemon=True,
            ).start()
        while self._built:
            version, monitor, problem = self._built.popleft()
            if version == self._version:  # else an earlier model's, late
                self.monitor, self._problem = monitor, problem

    def _build_for(self, model: LoadedModel) -> None:
        """The builder thread: the monitor for ``model``'s reference, handed over."""
        monitor, problem = self._build(model)
        self._built.append((model.version, monitor, problem))

    def _build(self, serving: LoadedModel | None) -> tuple[DriftMonitor | None, DriftState | None]:
        try:
            arrays, source = load_reference(self._settings, self._model, self._places, serving)
            return build_monitor(self._settings, arrays, source, self._log, self._clock), None
        except GoldenSetError as exc:
            self._log.error("drift_reference_unusable", error=str(exc))
            self._errors.report_step(f"drift: {exc}", pipeline=self._name)
            return None, DriftState(problem=str(exc))


def pipeline_drift(
    name: str, config: PipelineConfig, places: ReferencePlaces, errors: ErrorReporter
) -> PipelineDrift | None:
    """The drift of pipeline ``name``; None without ``drift`` settings. A reference that
    cannot be used is logged and reported on the errors topic, and the pipeline serves all
    the same."""
    if config.drift is None:
        return None
    return PipelineDrift(name, config, places, errors)
