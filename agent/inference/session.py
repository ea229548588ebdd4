"""Sessions: build an ONNX Runtime session from a model's bytes, check it and warm it up.

The model registry hands this module a file's bytes and gets back a ``LoadedModel`` that is
ready to serve, or a ``ModelLoadError`` that says why not. Here live the session options,
the hand-off to provider selection, the check of which providers really loaded, the check
against the pipelines that use the model, and the warm-up with its deadline. Every warm-up
run ends by a deadline: onnxruntime's ``RunOptions.terminate`` stops it from a timer.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import structlog

from agent.config.schema import AgentConfig, PipelineConfig
from agent.errors import ModelLoadError, PipelineFitError, first_line
from agent.hardware.detect import Hardware
from agent.hardware.providers import PlanInputs, ProviderPlan, plan_providers
from agent.inference.codecs import ONNX_TO_NUMPY, TensorSpec
from agent.inference.compat import pipeline_problems
from agent.inference.engine_build import BuildHeartbeat, first_engine_build
from agent.inference.golden import GoldenSet
from agent.inference.placement import Placement, ProfiledRun, cpu_only, placement_refusal
from agent.inference.runplan import ModelView, build_plan, warmup_feeds, zeros
from agent.inference.validation import (
    Feeds,
    SampleRunError,
    ValidationReport,
    require_pass,
    validate,
)

# Called on the loading thread with the step a long load is at: "building_engine" (a first
# TensorRT engine build), "validating" (its golden set runs).
Progress = Callable[[str], None]

log = structlog.get_logger(__name__)

# ONNX Runtime's session constructor is not thread-safe (onnxruntime #27089): one at a time.
SESSION_CREATION = threading.Lock()


@dataclass(frozen=True)
class LoadedModel:
    """A serving session and what the pipelines need to know about it."""

    name: str
    version: str
    path: Path
    session: ort.InferenceSession
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[str, ...]
    providers: tuple[str, ...]
    requested: tuple[str, ...]
    degraded: bool
    loaded_at: float
    placement: Placement | None = None  # None: unknown (``placement_problem`` says why)
    placement_problem: str | None = None
    validation: ValidationReport | None = None  # its golden set's verdict, when it had one
    golden: GoldenSet | None = None  # the set it passed (a drift reference may be its inputs)

    def input(self, name: str) -> TensorSpec | None:
        """The input called ``name``, if the model has one."""
        return next((spec for spec in self.inputs if spec.name == name), None)


@dataclass(frozen=True)
class WarmupLimit:
    """How long a load may take, and the setting that says so (for the error). With
    ``whole_load`` (an update's trial) the load, warm-up and golden check together must fit;
    otherwise the bound stops the warm-up runs."""

    seconds: float
    setting: str
    whole_load: bool = False

    def for_engine_build(self, seconds: float) -> WarmupLimit:
        """The limit of a load that builds a TensorRT engine first."""
        if seconds <= self.seconds:
            return self
        return replace(
            self, seconds=seconds, setting="updates.engine_build_timeout_s: a first engine build"
        )

    def overrun(self, started: float) -> str | None:
        """Why a whole load begun at ``started`` took too long, or None."""
        took = time.monotonic() - started
        if not self.whole_load or took <= self.seconds:
            return None
        return (
            f"loading, warming up and checking took {took:.1f} s, more than the "
            f"{self.seconds:g} s allowed ({self.setting})"
        )

    def deadline(self, started: float) -> float:
        """The monotonic time by which a load begun at ``started`` must be warmed up."""
        return started + self.seconds

    def explain(self, started: float) -> str:
        """Why a load begun at ``started`` was stopped at the deadline."""
        return (
            f"warm-up did not finish within {self.seconds:g} s ({self.setting}): stopped "
            f"after {time.monotonic() - started:.1f} s; a model whose run never ends "
            "(a Loop without a bound, say) cannot serve"
        )


class SessionFactory:
    """Builds checked, warmed-up sessions for the registry; any thread may build, and loads
    of different models build at the same time (only session construction is serialized)."""

    def __init__(self, hardware: Hardware) -> None:
        self._hardware = hardware
        self._warmups = _WarmupRuns()

    def cancel(self) -> None:
        """Stop every warm-up run in progress, and any that would start. Any thread."""
        self._warmups.cancel()

    def plan(self, config: AgentConfig, name: str, version: str) -> ProviderPlan:
        """The execution providers for model ``name`` (per-model setting, else global)."""
        setting = config.models[name].providers or config.providers
        return plan_providers(
            self._hardware,
            PlanInputs(
                available=ort.get_available_providers(),
                requested=None if setting in (None, "auto") else list(setting),
                model_sha256=version,
                state_dir=Path(config.state_dir),
                gpu_mem_limit_mb=config.gpu_mem_limit_mb,
                cpu_threads=config.cpu_threads,
                ort_version=ort.__version__,
            ),
        )

    def build(
        self,
        config: AgentConfig,
        name: str,
        path: Path,
        data: bytes,
        version: str,
        *,
        started: float,
        limit: WarmupLimit,
        golden: GoldenSet | None = None,
        progress: Progress | None = None,
        measure_placement: bool | None = None,
    ) -> LoadedModel:
        """A session for ``data`` (model ``name`` at ``version``), its providers and node
        placement checked against ``require_providers``, fit to the pipelines of ``config``
        that use it, warmed up, and its ``golden`` set passed, by ``limit``'s deadline counted
        from ``started``. Raises ``ModelLoadError`` (``GoldenMismatchError`` when the golden
        set fails). Runs on the caller's thread.

        Node placement is measured (the warm-up profiled) when ``measure_placement``, or by
        default when a provider other than the CPU is requested."""
        plan = self.plan(config, name, version)
        engine_cache = first_engine_build(plan, ort.get_available_providers())
        if engine_cache is not None:
            limit = limit.for_engine_build(config.updates.engine_build_timeout_s)
            if progress is not None:
                progress("building_engine")
        heartbeat = (
            BuildHeartbeat(name, engine_cache)
            if engine_cache is not None
            else contextlib.nullcontext()
        )
        try:
            with heartbeat:
                model = self._build(
                    config,
                    plan,
                    measure=not cpu_only(plan.names)
                    if measure_placement is None
                    else measure_placement,
                    name=name,
                    path=path,
                    data=data,
                    version=version,
                    deadline=limit.deadline(started),
                )
            if golden is not None:
                if progress is not None:
                    progress("validating")
                model = self._validate(model, golden, deadline=limit.deadline(started))
        except _WarmupStopped as stop:
            raise ModelLoadError(
                limit.explain(started)
                if stop.timed_out
                else "warm-up stopped: the agent is stopping"
            ) from None
        overrun = limit.overrun(started)
        if overrun is not None:
            raise ModelLoadError(overrun)
        return model

    def _validate(self, model: LoadedModel, golden: GoldenSet, *, deadline: float) -> LoadedModel:
        """Run the golden set with the serving providers; ``GoldenMismatchError`` if off."""

        def run_many(feeds: Sequence[Feeds]) -> list[tuple[list[Any], float]]:
            return self._warmups.run_many(model.session, feeds, deadline)

        report = validate(golden, model.inputs, model.outputs, model.providers, run_many)
        log.info(
            "golden_set_checked",
            model=model.name,
            version=model.version,
            passed=report.passed,
            samples=report.comparison.samples,
            max_abs_err=report.comparison.max_abs_err,
            p50_ms=report.latency_p50_ms,
        )
        require_pass(report)
        return replace(model, validation=report, golden=golden)

    def _build(
        self,
        config: AgentConfig,
        plan: ProviderPlan,
        *,
        measure: bool,
        name: str,
        path: Path,
        data: bytes,
        version: str,
        deadline: float,
    ) -> LoadedModel:
        requested = plan.names
        options = session_options(plan)
        profile = ProfiledRun()
        if measure:
            profile.configure(options)
        else:
            profile.problem = "not measured: only the CPU was requested, nothing can fall back"
        session: ort.InferenceSession | None = None
        try:
            try:
                with SESSION_CREATION:
                    session = ort.InferenceSession(
                        data, sess_options=options, providers=plan.for_session()
                    )
            except Exception as exc:  # ORT raises its own exception types, not importable
                raise ModelLoadError(_explain_load_error(exc)) from exc
            model, users = _checked(
                config, session, requested, name=name, path=path, version=version
            )
            _warm_up(model, users, lambda feeds: self._warmups.run(model.session, feeds, deadline))
        finally:
            # Profiling ends here on every path (a refused or failed load too), and its
            # folder goes with it.
            placement = profile.finish(session, requested)
        model = replace(model, placement=placement, placement_problem=profile.problem)
        if placement is not None and placement.fallback:
            log.warning(
                "nodes_fell_back_to_cpu",
                model=name,
                requested=requested,
                count=len(placement.fallback),
                nodes=placement.describe_fallback(),
            )
        missing = [p for p in requested if p not in model.providers]
        refusal = placement_refusal(
            config.require_providers,
            missing,
            model.providers,
            # Only the CPU asked for: nothing can have fallen back, whether measured or not.
            Placement({}, ()) if cpu_only(requested) and placement is None else placement,
            profile.problem,
        )
        if refusal is not None:
            raise ModelLoadError(refusal)
        return model


def _checked(
    config: AgentConfig,
    session: ort.InferenceSession,
    requested: Sequence[str],
    *,
    name: str,
    path: Path,
    version: str,
) -> tuple[LoadedModel, dict[str, PipelineConfig]]:
    """The model ``session`` serves, once ``require_providers`` (the requested providers
    loaded) and the pipelines that use it accept it, and those pipelines; else
    ``ModelLoadError``."""
    loaded = tuple(session.get_providers())
    missing = [p for p in requested if p not in loaded]
    if missing:
        log.warning(
            "providers_not_loaded",
            model=name,
            requested=list(requested),
            loaded=list(loaded),
            missing=missing,
            reason="onnxruntime fell back without an error: the provider is not "
            "installed or its libraries (CUDA, cuDNN, TensorRT) failed to load; "
            "run `edge-agent detect`",
        )
        refusal = placement_refusal(config.require_providers, missing, loaded, None, None)
        if refusal is not None:
            raise ModelLoadError(refusal)
    inputs = describe_inputs(session)
    outputs = tuple(o.name for o in session.get_outputs())
    users = {p: c for p, c in config.pipelines.items() if c.model == name}
    problems = pipeline_problems(ModelView(inputs, outputs), users)
    if problems:
        raise ModelLoadError("; ".join(problems))
    model = LoadedModel(
        name=name,
        version=version,
        path=path,
        session=session,
        inputs=inputs,
        outputs=outputs,
        providers=loaded,
        requested=tuple(requested),
        degraded=bool(missing),
        loaded_at=time.time(),
    )
    return model, users


def session_options(plan: ProviderPlan) -> ort.SessionOptions:
    """Session options for ``plan``: CPU threads, spinning, logging."""
    return threads_options(plan.intra_op_num_threads, spinning=plan.allow_spinning)


def threads_options(threads: int, *, spinning: bool) -> ort.SessionOptions:
    """Session options with ``threads`` intra-op threads (one: the run stays on the calling
    thread) that spin between runs or not, and onnxruntime's errors only in its log."""
    options = ort.SessionOptions()
    options.log_severity_level = 3  # ORT's own warnings duplicate ours; keep its errors only
    options.intra_op_num_threads = threads
    # Spinning threads burn a core waiting for work: wasteful on small boards that mostly
    # idle between readings, and it heats the SoC.
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    return options


def describe_inputs(session: ort.InferenceSession) -> tuple[TensorSpec, ...]:
    """Per-reading input specs.

    An input has a batch axis when its first axis is dynamic, or fixed at 1 with more axes
    after it (models exported for batch size 1); how a pipeline batches is its run plan's
    business.
    """
    specs = []
    for item in session.get_inputs():
        if item.type not in ONNX_TO_NUMPY:
            raise ModelLoadError(f"input {item.name!r} has unsupported type {item.type}")
        shape = tuple(d if isinstance(d, int) and d > 0 else None for d in item.shape)
        dynamic_first = len(shape) >= 1 and shape[0] is None
        fixed_one = len(shape) >= 2 and shape[0] == 1
        batched = dynamic_first or fixed_one
        specs.append(
            TensorSpec(
                name=item.name,
                dtype=np.dtype(ONNX_TO_NUMPY[item.type]),
                item_shape=shape[1:] if batched else shape,
                batched=batched,
                max_batch=None if dynamic_first else 1 if fixed_one else None,
            )
        )
    return tuple(specs)


class _WarmupStopped(Exception):  # noqa: N818 - a signal between two methods, not an error
    """A warm-up run was ended by its deadline (``timed_out``) or by ``cancel``."""

    def __init__(self, timed_out: bool) -> None:
        super().__init__("timed out" if timed_out else "cancelled")
        self.timed_out = timed_out


class _WarmupRuns:
    """Warm-up runs in progress, each with onnxruntime ``RunOptions`` whose ``terminate``
    flag a timer (the deadline) or ``cancel`` (the agent stopping) sets. Any thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._running: dict[int, ort.RunOptions] = {}  # by id(): pybind objects, no __eq__
        self._cancelled = False

    def cancel(self) -> None:
        with self._lock:
            self._cancelled = True
            for options in self._running.values():
                options.terminate = True

    def run(self, session: ort.InferenceSession, feeds: dict[str, Any], deadline: float) -> None:
        """``session.run(None, feeds)``, ended at ``deadline`` (``_WarmupStopped``)."""
        with self._bounded(deadline) as options:
            session.run(None, feeds, options)

    def run_many(
        self, session: ort.InferenceSession, feeds: Sequence[Feeds], deadline: float
    ) -> list[tuple[list[Any], float]]:
        """Each of ``feeds`` once, with its outputs and seconds, all ended at ``deadline``
        (``_WarmupStopped``); a run onnxruntime refuses raises ``SampleRunError``."""
        results = []
        with self._bounded(deadline) as options:
            for one in feeds:
                began = time.perf_counter()
                try:
                    outputs = session.run(None, one, options)
                except Exception as exc:
                    if options.terminate:
                        raise  # the deadline or a stop: _bounded says which
                    raise SampleRunError(first_line(exc)) from exc
                results.append((outputs, time.perf_counter() - began))
        return results

    @contextlib.contextmanager
    def _bounded(self, deadline: float) -> Iterator[ort.RunOptions]:
        """RunOptions whose ``terminate`` a timer sets at ``deadline`` and ``cancel`` sets
        at once; a run ended by either raises ``_WarmupStopped`` out of the block."""
        options = ort.RunOptions()
        options.log_severity_level = 4  # the terminated run's error is ours to report
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise _WarmupStopped(timed_out=True)
        timer = threading.Timer(remaining, self._expire, args=(options,))
        timer.daemon = True
        with self._lock:
            if self._cancelled:
                raise _WarmupStopped(timed_out=False)
            self._running[id(options)] = options
        timer.start()
        try:
            yield options
        except SampleRunError:
            raise
        except Exception:
            with self._lock:
                stopped, cancelled = options.terminate, self._cancelled
            if stopped:
                raise _WarmupStopped(timed_out=not cancelled) from None
            raise
        finally:
            timer.cancel()
            with self._lock:
                self._running.pop(id(options), None)

    def _expire(self, options: ort.RunOptions) -> None:  # the timer's thread
        with self._lock:
            options.terminate = True


def _warm_up(
    model: LoadedModel,
    pipelines: Mapping[str, PipelineConfig],
    run: Callable[[dict[str, Any]], None],
) -> None:
    """Run once before serving: the first run allocates and optimizes and is much slower.

    Uses each pipeline's constants, state and ``input.shape``, so the warm-up looks like real
    readings; a model no pipeline uses gets zeros with dynamic axes of length 1.
    """
    runs: list[dict[str, Any]] = []
    try:
        for name, pipeline in pipelines.items():
            plan = build_plan(ModelView(model.inputs, model.outputs), pipeline, name)
            runs.append(warmup_feeds(plan, model.inputs, pipeline))
    except PipelineFitError as exc:
        raise ModelLoadError(str(exc)) from exc
    if not runs:
        runs.append({spec.name: zeros(spec, leading=spec.batched) for spec in model.inputs})
    for feeds in runs:
        try:
            run(feeds)
        except _WarmupStopped:
            raise
        except Exception as exc:
            raise ModelLoadError(
                f"warm-up inference failed: {first_line(exc)} (set the pipeline's input.shape and "
                "constants so the warm-up uses realistic inputs)"
            ) from exc


def _explain_load_error(exc: Exception) -> str:
    text = str(exc)
    if "INVALID_PROTOBUF" in text or "Protobuf parsing failed" in text:
        return "not an ONNX model (the file does not parse as an ONNX protobuf)"
    return f"onnxruntime could not load the model: {first_line(exc)}"
