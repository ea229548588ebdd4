"""The states and steps an update's statuses name, and the steps its journal records.

StrEnums: the wire (``P/updates/status``), the log and the state file keep the plain
strings, while mypy catches a misspelt one.
"""

from __future__ import annotations

from agent.strenum import StrEnum


class UpdateState(StrEnum):
    """The ``state`` of an update status; the last three are final."""

    QUEUED = "QUEUED"
    IN_PROGRESS = "IN_PROGRESS"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    REJECTED = "REJECTED"


class UpdateStep(StrEnum):
    """Where an update is: the ``step`` of an ``IN_PROGRESS`` or ``FAILED`` status, and the
    step its journal entry records.

    Waiting_for_transfer is reported (never journalled) while a chunk transfer has gone
    silent before its ``chunk_timeout_s``: the sender may send the chunks again.

    The journal records downloading, installing, trial and committed (each written before
    its effects); verifying is only reported, as the journal stays at downloading until the
    verified bytes are accepted. Building_engine (a first TensorRT engine build) and
    validating (the manifest's golden set runs through the new model) and shadow (the new
    model runs beside the serving one on live readings) are parts of the trial: reported in
    ``IN_PROGRESS`` statuses, and as the step of a ``FAILED`` one whose check failed there,
    while the journal stays at trial.
    """

    DOWNLOADING = "downloading"
    WAITING_FOR_TRANSFER = "waiting_for_transfer"
    VERIFYING = "verifying"
    INSTALLING = "installing"
    TRIAL = "trial"
    BUILDING_ENGINE = "building_engine"
    VALIDATING = "validating"
    SHADOW = "shadow"
    COMMITTED = "committed"


JOURNAL_STEPS = frozenset(
    {UpdateStep.DOWNLOADING, UpdateStep.INSTALLING, UpdateStep.TRIAL, UpdateStep.COMMITTED}
)
