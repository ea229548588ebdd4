"""Classifier post-processing users expect without writing code: softmax, argmax, top-k,
labels and a score threshold, added to the result as ``label``/``score`` and
``labels``/``scores``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from agent.config.schema import Postprocess
from agent.errors import PayloadError


def load_labels(path: Path) -> list[str]:
    """One label per line; blank lines at the end are ignored."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise PayloadError(f"cannot read labels file {path}: {exc.strerror}") from exc
    while lines and not lines[-1].strip():
        lines.pop()
    return [line.strip() for line in lines]


def apply(config: Postprocess, scores: Any, labels: list[str] | None) -> dict[str, Any]:
    """Fields to add to one reading's result, from that reading's score vector."""
    vector = np.asarray(scores, dtype=np.float64).reshape(-1)
    if vector.size == 0:
        raise PayloadError("postprocess: the output is empty")
    if labels is not None and len(labels) < vector.size:
        raise PayloadError(f"postprocess: {vector.size} scores but only {len(labels)} labels")
    if config.softmax:
        shifted = np.exp(vector - vector.max())
        vector = shifted / shifted.sum()

    def name(index: int) -> str | int:
        return labels[index] if labels is not None else index

    added: dict[str, Any] = {}
    threshold = config.threshold
    if config.argmax or (config.top_k is None and (labels is not None or threshold is not None)):
        best = int(vector.argmax())
        passed = threshold is None or vector[best] >= threshold
        added["label"] = name(best) if passed else None
        added["score"] = float(vector[best])
    if config.top_k is not None:
        order = np.argsort(-vector, kind="stable")[: config.top_k]
        if threshold is not None:
            order = order[vector[order] >= threshold]
        added["labels"] = [name(int(i)) for i in order]
        added["scores"] = [float(vector[i]) for i in order]
    if config.softmax and not added:
        added["scores"] = vector.tolist()
    return added
