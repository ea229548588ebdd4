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

    The journal records downloading, installing, trial and committed (each written before
    its effects); verifying is only reported, as the journal stays at downloading until the
    verified bytes are accepted.
    """

    DOWNLOADING = "downloading"
    VERIFYING = "verifying"
    INSTALLING = "installing"
    TRIAL = "trial"
    COMMITTED = "committed"


JOURNAL_STEPS = frozenset(
    {UpdateStep.DOWNLOADING, UpdateStep.INSTALLING, UpdateStep.TRIAL, UpdateStep.COMMITTED}
)
