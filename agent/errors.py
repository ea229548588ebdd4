"""Every exception the agent raises on purpose, in one place, and how one is described."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


class EdgeAgentError(Exception):
    """Base class: anything the agent reports to the operator rather than crashing on."""


@dataclass(frozen=True)
class ConfigProblem:
    """One problem found in a config file, located by file, line and dotted key path."""

    file: str
    line: int
    key: str
    message: str

    def __str__(self) -> str:
        where = self.key or "(top level)"
        return f"{self.file}:{self.line}: {where}: {self.message}"


class ConfigError(EdgeAgentError):
    """A config file could not be read or is invalid; carries every problem found."""

    def __init__(self, problems: list[ConfigProblem]) -> None:
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))


class ModelLoadError(EdgeAgentError):
    """A model file could not be turned into a serving ONNX Runtime session."""


class GoldenSetError(EdgeAgentError):
    """A golden set (``.npz`` of inputs and expected outputs) cannot be read or is malformed."""


class GoldenMismatchError(ModelLoadError):
    """A model's outputs on its golden set are out of tolerance: it must not serve.

    ``report`` is the ``ValidationReport`` of the failed check (figures for the operator).
    """

    def __init__(self, message: str, report: object) -> None:
        super().__init__(message)
        self.report = report


class ShadowRefusedError(ModelLoadError):
    """An update's candidate did not prove itself beside the serving model on live readings
    (its shadow trial): it must not serve. ``figures`` are the trial's, for the operator."""

    def __init__(self, message: str, figures: dict[str, Any]) -> None:
        super().__init__(message)
        self.figures = figures


class PayloadError(EdgeAgentError):
    """A reading could not be decoded or does not fit the model input it is meant for.

    ``reading_id``: the reading's id when it could be read before the problem was found."""

    def __init__(self, message: str, reading_id: object = None) -> None:
        super().__init__(message)
        self.reading_id = reading_id


class PipelineFitError(EdgeAgentError):
    """A model does not fit a pipeline that uses it (inputs, outputs, constants, state)."""


class UpdateKeyError(EdgeAgentError):
    """An Ed25519 key file cannot be read, is of the wrong kind, or would be overwritten."""


class UpdateRejectedError(EdgeAgentError):
    """A signed update was refused before anything was attempted (status ``REJECTED``)."""


class SignatureError(UpdateRejectedError):
    """A manifest's DSSE envelope is malformed or lacks enough trusted signatures."""


class KeySetError(EdgeAgentError):
    """A key set (``fleet/keys``, ``P/keys``: the root-signed update keys) is refused, or the
    stored one cannot be used; the message says what was wrong."""


class UpdateFailedError(EdgeAgentError):
    """An accepted update did not work: transfer, verification, install or trial (``FAILED``)."""


class DownloadInterruptedError(UpdateFailedError):
    """An https download broke off mid-body: what was written is kept, and a retry asks for
    the rest."""


class UnsafePathError(EdgeAgentError):
    """A path the agent owns (staging, state, lock files) is a symlink or not what it made."""


class SeqReserveError(EdgeAgentError):
    """The next block of ``seq`` numbers could not be persisted (``state_dir`` full or
    read-only)."""


class ModelToolError(EdgeAgentError):
    """An ``edge-agent model`` tool cannot do what it was asked (unreadable sample inputs,
    a reference model that does not match, a quantizer that is not installed)."""


def first_line(exc: BaseException) -> str:
    """The first line of ``exc``'s message (onnxruntime's run the whole graph dump after it),
    or its repr when the message is empty."""
    text = str(exc)
    return text.splitlines()[0] if text else repr(exc)
