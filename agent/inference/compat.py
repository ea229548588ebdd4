"""Does a model fit the pipelines that use it? Checked before a model may become READY.

A model that does not fit would answer every reading with an error; refusing it at load
time keeps the previous model serving and names the mismatch once.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from agent.config.schema import PipelineConfig
from agent.errors import PipelineFitError
from agent.inference.codecs import TensorSpec
from agent.inference.runplan import ModelView, build_plan


def pipeline_problems(model: ModelView, pipelines: Mapping[str, PipelineConfig]) -> list[str]:
    """Every mismatch between ``model`` and the pipelines given (all of which use it)."""
    problems: list[str] = []
    for name, pipeline in pipelines.items():
        problems.extend(_check_one(model, name, pipeline))
    return problems


def _check_one(model: ModelView, name: str, pipeline: PipelineConfig) -> list[str]:
    problems = []
    input_names = [spec.name for spec in model.inputs]
    try:
        plan = build_plan(model, pipeline, name)
    except PipelineFitError as exc:
        return [str(exc)]
    fed_by_payload = list(plan.payload)
    tensor = pipeline.input.tensor
    if tensor is not None and tensor not in input_names:
        problems.append(
            f"pipeline {name!r} feeds input {tensor!r} but the model has no such "
            f"input (it takes {', '.join(input_names)})"
        )
    elif pipeline.input.format != "json" and len(fed_by_payload) > 1 and tensor is None:
        problems.append(
            f"pipeline {name!r} sends one {pipeline.input.format} tensor but the "
            f"model takes {', '.join(s.name for s in fed_by_payload)}: set "
            "input.tensor and constants for the others, or use json with "
            '{"inputs": {...}}'
        )
    target = _target_spec(fed_by_payload, tensor)
    if target is not None and pipeline.input.shape is not None:
        problems.extend(_shape_problems(model, name, pipeline, target))
    if (
        target is not None
        and pipeline.input.format == "raw"
        and pipeline.input.shape is None
        and any(d is None for d in target.item_shape)
    ):
        problems.append(
            f"pipeline {name!r} sends raw bytes but input {target.name!r} has "
            f"dynamic axes {target.describe_shape()}: set input.shape"
        )
    # Batching is on by default; only a batching section the operator wrote is held against a
    # model without a dynamic batch axis (such a model then simply runs one reading at a time).
    explicit_batching = "batching" in pipeline.model_fields_set
    if explicit_batching and pipeline.batching.max_batch > 1 and plan.limit == 1 and not plan.state:
        problems.append(
            f"pipeline {name!r} batches up to {pipeline.batching.max_batch} "
            "readings but the model has no dynamic batch axis (first axis of "
            f"{', '.join(input_names)}): export it with a dynamic first axis, or "
            "set batching.max_batch: 1"
        )
    return problems


def _target_spec(specs: Sequence[TensorSpec], tensor: str | None) -> TensorSpec | None:
    if tensor is not None:
        return next((s for s in specs if s.name == tensor), None)
    return specs[0] if len(specs) == 1 else None


def _shape_problems(
    model: ModelView, name: str, pipeline: PipelineConfig, target: TensorSpec
) -> list[str]:
    shape = pipeline.input.shape
    assert shape is not None
    batch = 1 if target.batched else 0
    expected_rank = len(target.item_shape) + batch
    sent_rank = len(shape) + batch
    if sent_rank != expected_rank:
        return [
            f"input {target.name!r} expects rank {expected_rank}, pipeline {name!r} sends "
            f"rank {sent_rank} (input.shape {list(shape)}"
            f"{' plus the batch axis' if batch else ''})"
        ]
    for axis, (sent, wanted) in enumerate(zip(shape, target.item_shape, strict=True)):
        if wanted is not None and sent != wanted:
            return [
                f"input {target.name!r} expects {target.describe_shape()} per reading, "
                f"pipeline {name!r} sends {list(shape)} (axis {axis + batch})"
            ]
    return []
