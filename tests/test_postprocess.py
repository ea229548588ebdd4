"""Post-processing of a score vector: softmax, argmax, top-k, labels, threshold."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from agent.config.schema import Postprocess
from agent.errors import PayloadError
from agent.inference.postprocess import apply, load_labels


def post(**settings: object) -> Postprocess:
    return Postprocess.model_validate(settings)


def test_argmax_with_labels() -> None:
    """argmax names the best class and its score."""
    assert apply(post(argmax=True), [0.1, 0.7, 0.2], ["a", "b", "c"]) == {
        "label": "b",
        "score": pytest.approx(0.7),
    }


def test_argmax_without_labels_gives_the_index() -> None:
    """Without labels the class index stands in for the name."""
    assert apply(post(argmax=True), [0.1, 0.7, 0.2], None)["label"] == 1


def test_softmax_then_top_k() -> None:
    """Softmax turns logits into probabilities; top_k lists the best k, best first."""
    logits = np.array([1.0, 3.0, 2.0])
    added = apply(post(softmax=True, top_k=2), logits.tolist(), ["a", "b", "c"])
    probabilities = np.exp(logits) / np.exp(logits).sum()  # 0.090, 0.665, 0.245
    assert added["labels"] == ["b", "c"]
    assert added["scores"] == pytest.approx([probabilities[1], probabilities[2]], rel=1e-9)


def test_softmax_alone_gives_every_probability() -> None:
    """Softmax without argmax or top_k publishes the whole probability vector; large logits
    do not overflow."""
    logits = np.array([1000.0, 1001.0, 999.0, 1000.5])
    added = apply(post(softmax=True), logits.tolist(), None)
    shifted = np.exp(logits - logits.max())
    assert added == {"scores": pytest.approx((shifted / shifted.sum()).tolist(), rel=1e-9)}


def test_threshold_filters_and_blanks_the_label() -> None:
    """Below the threshold argmax gives no label and top_k leaves the entry out."""
    added = apply(post(argmax=True, top_k=3, threshold=0.5), [0.3, 0.45, 0.25], None)
    assert added["label"] is None
    assert added["score"] == pytest.approx(0.45)
    assert added["labels"] == []


def test_labels_file(tmp_path: Path) -> None:
    """One label per line; trailing blank lines ignored; too few labels is an error."""
    path = tmp_path / "labels.txt"
    path.write_text("cat\ndog\n\n")
    assert load_labels(path) == ["cat", "dog"]
    with pytest.raises(PayloadError, match="3 scores but only 2 labels"):
        apply(post(argmax=True), [1, 2, 3], load_labels(path))
