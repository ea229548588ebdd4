"""How one pipeline feeds one model: which inputs come from the payload, constants and
stream state, whether readings can be stacked into a batch, and which outputs to fetch.

Built once per (pipeline, model version); pure, so the load-time checks and the worker use
the same rules.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from agent.config.schema import PipelineConfig
from agent.errors import PipelineFitError
from agent.inference.codecs import Tensor, TensorSpec


@dataclass(frozen=True)
class ModelView:
    """What a plan needs to know about a model."""

    inputs: tuple[TensorSpec, ...]
    outputs: tuple[str, ...]


@dataclass(frozen=True)
class RunPlan:
    """The recipe for one ``session.run`` of a pipeline."""

    payload: tuple[TensorSpec, ...]  # inputs each reading provides
    constants: dict[str, Tensor]  # fixed inputs, converted to the input dtype
    repeated: frozenset[str]  # constants repeated along the batch axis
    state: dict[str, str]  # stream state: input name -> output that feeds it
    stacked: bool  # readings are stacked along a new leading axis
    limit: int  # most readings in one run
    fetch: tuple[str, ...]  # outputs to compute: published + state
    published: tuple[str, ...]

    def zero_state(self, specs: tuple[TensorSpec, ...]) -> dict[str, Tensor]:
        """The state a new stream starts from: zeros of each state input's declared shape."""
        by_name = {spec.name: spec for spec in specs}
        return {name: zeros(by_name[name], leading=by_name[name].batched) for name in self.state}


def zeros(spec: TensorSpec, leading: bool, item_shape: tuple[int, ...] | None = None) -> Tensor:
    """Zeros for ``spec``: dynamic axes of length 1 (or ``item_shape``), plus a leading batch
    axis of 1 when ``leading``."""
    shape = item_shape or tuple(1 if d is None else d for d in spec.item_shape)
    return np.zeros(((1,) if leading else ()) + tuple(shape), dtype=spec.dtype)


def build_plan(model: ModelView, pipeline: PipelineConfig, name: str) -> RunPlan:
    """The plan for pipeline ``name`` on ``model``; raises PipelineFitError naming a mismatch."""
    by_name = {spec.name: spec for spec in model.inputs}
    takes = ", ".join(by_name)
    constants = _constants(pipeline, name, by_name)
    state = dict(pipeline.state.inputs) if pipeline.state is not None else {}
    for input_name, output_name in state.items():
        if input_name not in by_name:
            raise PipelineFitError(
                f"pipeline {name!r} carries state into input "
                f"{input_name!r} but the model has no such input (it "
                f"takes {takes})"
            )
        if output_name not in model.outputs:
            raise PipelineFitError(
                f"pipeline {name!r} takes state from output "
                f"{output_name!r} but the model has no such output (it "
                f"has {', '.join(model.outputs)})"
            )
    payload = tuple(
        spec for spec in model.inputs if spec.name not in constants and spec.name not in state
    )
    if not payload:
        raise PipelineFitError(f"pipeline {name!r} leaves no model input for the payload")
    published = _published(model, pipeline, name, state)
    stacked = all(spec.batched for spec in payload)
    repeated = frozenset(
        n
        for n, value in constants.items()
        if by_name[n].batched and value.ndim == len(by_name[n].item_shape)
    )
    # A constant fed as-is (not repeated per reading) only fits a run of one reading.
    batchable = stacked and not state and all(n in repeated for n in constants)
    limit = 1
    if batchable:
        fixed = [spec.max_batch for spec in payload if spec.max_batch is not None]
        limit = min([pipeline.batching.max_batch, *fixed])
    fetch = tuple(dict.fromkeys([*published, *state.values()]))
    return RunPlan(
        payload=payload,
        constants=constants,
        repeated=repeated,
        state=state,
        stacked=stacked,
        limit=limit,
        fetch=fetch,
        published=published,
    )


def _constants(
    pipeline: PipelineConfig, name: str, by_name: dict[str, TensorSpec]
) -> dict[str, Tensor]:
    prepared = {}
    for input_name, value in (pipeline.constants or {}).items():
        spec = by_name.get(input_name)
        if spec is None:
            raise PipelineFitError(
                f"pipeline {name!r} sets constant {input_name!r} but the "
                f"model has no such input (it takes {', '.join(by_name)})"
            )
        try:
            prepared[input_name] = np.asarray(value, dtype=spec.dtype)
        except (ValueError, TypeError) as exc:
            raise PipelineFitError(
                f"pipeline {name!r}: constants.{input_name} cannot be "
                f"converted to {spec.dtype.name}: {exc}"
            ) from exc
    return prepared


def _published(
    model: ModelView, pipeline: PipelineConfig, name: str, state: dict[str, str]
) -> tuple[str, ...]:
    wanted = pipeline.output.outputs
    if wanted is None:
        # State outputs feed the next reading; publishing them by default would only add
        # bytes to every result.
        return tuple(o for o in model.outputs if o not in state.values())
    unknown = [o for o in wanted if o not in model.outputs]
    if unknown:
        raise PipelineFitError(
            f"pipeline {name!r} publishes output {unknown[0]!r} but the "
            f"model has no such output (it has {', '.join(model.outputs)})"
        )
    return tuple(wanted)


def split_output(value: Any, index: int, size: int, stacked: bool) -> Any:
    """The part of one output that belongs to reading ``index`` of a run of ``size``."""
    if not stacked:
        return value
    if isinstance(value, np.ndarray) and value.ndim >= 1 and value.shape[0] == size:
        return value[index]
    if isinstance(value, list) and len(value) == size:
        return value[index]
    return value


def feeds_for(plan: RunPlan, items: list[dict[str, Tensor]]) -> dict[str, Any]:
    """The ``session.run`` feeds for readings ``items`` (one dict of payload tensors each)."""
    feeds: dict[str, Any] = {}
    for spec in plan.payload:
        if plan.stacked and len(items) == 1:
            feeds[spec.name] = items[0][spec.name][None]  # a view: np.stack would copy
        elif plan.stacked:
            feeds[spec.name] = np.stack([item[spec.name] for item in items])
        elif spec.batched:
            feeds[spec.name] = items[0][spec.name][None]
        else:
            feeds[spec.name] = items[0][spec.name]
    for name, value in plan.constants.items():
        feeds[name] = np.repeat(value[None], len(items), axis=0) if name in plan.repeated else value
    return feeds


def warmup_feeds(
    plan: RunPlan, specs: tuple[TensorSpec, ...], pipeline: PipelineConfig
) -> dict[str, Any]:
    """Feeds for a warm-up run that look like the pipeline's real readings."""
    target = pipeline.input.tensor or (plan.payload[0].name if len(plan.payload) == 1 else None)
    items = {}
    for spec in plan.payload:
        shape = pipeline.input.shape if spec.name == target else None
        items[spec.name] = zeros(spec, leading=False, item_shape=shape)
    feeds = feeds_for(plan, [items])
    feeds.update(plan.zero_state(specs))
    return feeds
