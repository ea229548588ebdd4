"""The shadow step of an update's trial: after its golden set, the candidate runs beside the
serving model on the device's live readings for the trial's duration, and may serve only
if it agreed often enough, ran fast enough and saw enough readings.

The rule for a quiet stream is the same on every device: the shadow lasts ``duration_s``,
never longer, and fewer than ``min_readings`` compared in that time fail the update (the
candidate is not proven on this device). With no model serving there is nothing to
compare against: the shadow is skipped, and the status says so.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import structlog

from agent.errors import ModelLoadError, ShadowRefusedError
from agent.inference.golden import DEFAULT_ATOL, DEFAULT_RTOL, Tolerances
from agent.inference.registry import ModelRegistry
from agent.inference.session import LoadedModel
from agent.inference.shadow import ShadowTally, ShadowTap, run_beside
from agent.inference.shadow_models import ShadowModels, lower_this_thread, shadow_models
from agent.updates.shadow_terms import ShadowTerms

log = structlog.get_logger(__name__)

PROGRESS_EVERY_S = 5.0  # an IN_PROGRESS status with the running figures at most this often

ProgressReport = Callable[[dict[str, Any]], None]


class ShadowStep:
    """The registry's gate for one update's load (the install thread): runs the shadow on a
    thread of its own at the lowest priority and raises ``ShadowRefusedError`` when the
    candidate must not serve. ``figures`` are the final ones once it ran."""

    def __init__(
        self,
        registry: ModelRegistry,
        terms: ShadowTerms,
        tolerances: Tolerances | None,
        *,
        serving_file: Path,
        stopped: threading.Event,
        progress: ProgressReport,
    ) -> None:
        self._registry = registry
        self._terms = terms
        self._rtol = tolerances.rtol if tolerances is not None else DEFAULT_RTOL
        self._atol = tolerances.atol if tolerances is not None else DEFAULT_ATOL
        self._serving_file = serving_file  # where the install kept the serving model's file
        self._stopped = stopped
        self._progress = progress
        self.figures: dict[str, Any] | None = None
        self.problem: str | None = None

    def __call__(
        self, candidate: LoadedModel, serving: LoadedModel | None, candidate_bytes: bytes
    ) -> None:
        """Run the shadow of ``candidate`` beside ``serving``."""
        if serving is None:
            self.figures = {
                "readings": 0,
                "disagreement": None,
                "max_abs_err": None,
                "latency_ratio": None,
                "skipped": "no model was serving: nothing to compare the candidate with",
            }
            log.info("update_shadow_skipped", model=candidate.name, reason="nothing serving")
            return
        log.info("update_shadow_started", model=candidate.name, **self._terms.to_dict())
        outcome: list[ShadowTally | BaseException] = []

        def shadow_thread() -> None:
            try:
                outcome.append(self._shadow(candidate, serving, candidate_bytes))
            except BaseException as exc:  # handed to the install thread, raised there
                outcome.append(exc)

        thread = threading.Thread(target=shadow_thread, name=f"shadow-{candidate.name}")
        thread.start()
        thread.join()  # it ends by the duration, or within half a second of ``stopped``
        tally = outcome[0]
        if isinstance(tally, ModelLoadError):  # a copy could not be built
            self.problem = str(tally)
            log.error("update_shadow_failed", model=candidate.name, error=self.problem)
            raise ShadowRefusedError(self.problem, {}) from tally
        if isinstance(tally, BaseException):
            raise tally
        if self._stopped.is_set():
            self.problem = "the agent stopped during the shadow trial"
        else:
            self.problem = verdict(tally, self._terms)
        figures = self.figures or {}
        log.info("update_shadow_ended", model=candidate.name, problem=self.problem, **figures)
        if self.problem is not None:
            raise ShadowRefusedError(self.problem, figures)

    def _shadow(
        self, candidate: LoadedModel, serving: LoadedModel, candidate_bytes: bytes
    ) -> ShadowTally:
        """The shadow itself (its own thread, at the lowest priority: the copies are built
        and run there, and ``progress`` is heard there while the install thread waits)."""
        lower_this_thread()
        models = shadow_models(candidate, candidate_bytes, serving, self._serving_file)
        tap = ShadowTap(self._terms.sample)
        self._registry.taps.open(candidate.name, tap)
        self._progress(self._figures(ShadowTally(), tap, models))  # the fleet sees it begin
        try:
            tally = run_beside(
                models,
                tap,
                until=time.monotonic() + self._terms.duration_s,
                stopped=self._stopped,
                progress=lambda running: self._progress(self._figures(running, tap, models)),
                progress_every_s=PROGRESS_EVERY_S,
                rtol=self._rtol,
                atol=self._atol,
            )
        finally:
            self._registry.taps.close(candidate.name)
        self.figures = self._figures(tally, tap, models)
        return tally

    def _figures(self, tally: ShadowTally, tap: ShadowTap, models: ShadowModels) -> dict[str, Any]:
        figures = tally.figures()
        figures["not_compared"] = tap.skipped
        figures["duration_s"] = self._terms.duration_s
        figures["timing"] = models.timing
        if models.note is not None:
            figures["timing_note"] = models.note
        return figures


def verdict(tally: ShadowTally, terms: ShadowTerms) -> str | None:
    """Why the candidate must not serve after a shadow that counted ``tally``, or None.
    Judged on the exact counts and times, not on the rounded figures a status shows."""
    readings = tally.readings
    if readings < terms.min_readings:
        return (
            f"the shadow compared {readings} live readings in {terms.duration_s:g} s, fewer "
            f"than min_readings {terms.min_readings}: the candidate is not proven on this "
            "device's readings"
        )
    disagreement = tally.disagreeing / readings
    if disagreement > terms.max_disagreement:
        worst = max(tally.pipelines, key=lambda name: tally.pipelines[name].disagreement)
        errors = f", {tally.errors} of them failed runs" if tally.errors else ""
        return (
            f"the candidate disagreed with the serving model on {disagreement:.2%} of "
            f"{readings} live readings{errors} (most on pipeline {worst!r}), more than "
            f"max_disagreement {terms.max_disagreement:.2%}"
        )
    ratio = tally.latency_ratio
    if ratio is not None and ratio > terms.max_latency_ratio:
        latency = tally.figures()["latency_ms"]
        return (
            f"the candidate's median run took {ratio:.2f}x the serving model's on the same "
            f"readings ({latency['candidate']['p50']} ms against {latency['serving']['p50']} "
            f"ms per reading), more than max_latency_ratio {terms.max_latency_ratio:g}"
        )
    return None
