"""The pure logic of a staged rollout: wave sizes, the abort rule and the rollout's state
file. Nothing here touches the network; ``agent.cli.rollout`` drives it."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from agent.cli.update_sender import shadow_line, validation_line
from agent.durable import write_atomically
from agent.updates.manifest import parse_duration

STATE_FORMAT = 1
STATE_KIND = "edge-agent rollout"

# A device's place in the rollout. The first three are the device's own final word;
# TIMED_OUT and UNHEALTHY are the command's verdicts; PENDING: offline when its wave came,
# its manifest is kept retained for it; SENT: targeted, nothing final heard yet.
SUCCEEDED, FAILED, REJECTED = "SUCCEEDED", "FAILED", "REJECTED"
TIMED_OUT, UNHEALTHY, PENDING, SENT = "TIMED_OUT", "UNHEALTHY", "PENDING", "SENT"
BAD = frozenset({FAILED, REJECTED, TIMED_OUT, UNHEALTHY})
FINISHED = BAD | {SUCCEEDED}

_WAVE = re.compile(r"(\d+(?:\.\d+)?)(%?)")


@dataclass(frozen=True)
class WaveSize:
    """One entry of ``--waves``: a device count, or a fraction of the population."""

    count: int | None = None
    fraction: float | None = None

    def cumulative(self, population: int) -> int:
        """How many devices this wave and the ones before it target together."""
        if self.count is not None:
            return min(self.count, population)
        assert self.fraction is not None
        return min(population, math.ceil(self.fraction * population - 1e-9))

    def __str__(self) -> str:
        return str(self.count) if self.count is not None else f"{self.fraction:.0%}"


def parse_waves(text: str) -> list[WaveSize]:
    """``1,5%,25%,100%`` -> wave sizes, cumulative: absolute counts or percentages of the
    population. ``ValueError`` says what is wrong."""
    sizes: list[WaveSize] = []
    for item in text.split(","):
        match = _WAVE.fullmatch(item.strip())
        if match is None:
            raise ValueError(f"--waves: {item.strip()!r} is neither a count (5) nor a share (25%)")
        number, percent = float(match.group(1)), match.group(2)
        if percent:
            if not 0 < number <= 100:
                raise ValueError(f"--waves: {item.strip()} is not a share between 0 and 100%")
            sizes.append(WaveSize(fraction=number / 100))
        else:
            if number != int(number) or number < 1:
                raise ValueError(f"--waves: {item.strip()} is not a whole number of devices")
            sizes.append(WaveSize(count=int(number)))
    return sizes


def parse_share(text: str) -> float:
    """``10%`` or ``0.1`` -> 0.1; ``ValueError`` when it is not a share of 0..100 %."""
    stripped = text.strip()
    try:
        value = float(stripped[:-1]) / 100 if stripped.endswith("%") else float(stripped)
    except ValueError:
        raise ValueError(f"{text!r} is not a share: use e.g. 10% or 0.1") from None
    if not 0 <= value <= 1:
        raise ValueError(f"{text!r} is not a share between 0 and 100%")
    return value


def parse_seconds(text: str) -> float:
    """``60``, ``60s``, ``2m``, ``1h30m`` -> seconds."""
    try:
        return float(text)
    except ValueError:
        return parse_duration(text).total_seconds()


def plan_waves(devices: Sequence[str], sizes: Sequence[WaveSize]) -> list[list[str]]:
    """Split ``devices`` (in rollout order) into waves whose cumulative sizes follow
    ``sizes``; a wave that would add no device is left out. Devices past the last size's
    share are not targeted at all (a rollout that ends at 25 % stops there)."""
    waves: list[list[str]] = []
    done = 0
    for size in sizes:
        upto = max(done, size.cumulative(len(devices)))
        if upto > done:
            waves.append(list(devices[done:upto]))
            done = upto
    return waves


@dataclass(frozen=True)
class AbortRule:
    """Stop the rollout when more than ``share`` of the devices targeted so far failed,
    were rejected, timed out or turned unhealthy, once at least ``minimum`` finished."""

    share: float
    minimum: int

    def verdict(self, outcomes: Iterable[str]) -> str | None:
        """Why the rollout must stop, given the outcome of every device targeted so far;
        None while it may go on."""
        states = list(outcomes)
        targeted = len(states)
        finished = sum(state in FINISHED for state in states)
        bad = sum(state in BAD for state in states)
        if not targeted or finished < self.minimum or bad / targeted <= self.share:
            return None
        return (
            f"{bad} of {targeted} targeted devices failed, were rejected, timed out or "
            f"turned unhealthy ({_percent(bad / targeted)} > {_percent(self.share)}, "
            f"{finished} finished, at least {self.minimum} needed)"
        )


def _percent(share: float) -> str:
    """0.051 -> '5.1%', 0.05 -> '5%': a share just over the threshold must not print as
    equal to it."""
    return f"{share:.1%}".replace(".0%", "%")


@dataclass
class DeviceRecord:
    """What the rollout knows about one targeted device."""

    wave: int
    state: str = SENT
    manifest_sha256: str | None = None
    step: str | None = None
    reason: str | None = None
    validation: dict[str, Any] | None = None
    shadow: dict[str, Any] | None = None  # its shadow trial's figures, passed or failed
    rollback: str | None = None  # the rollback update's outcome, when one was sent
    finished_s: float | None = None  # seconds from the rollout's start to the final word


@dataclass
class RolloutState:
    """Everything needed to resume a rollout: the signed update's fixed fields (so the
    manifests signed again are the same bytes: Ed25519 is deterministic), the planned
    waves and each targeted device's outcome. The command is its only writer."""

    update_id: str
    model: str
    version: int
    model_sha256: str
    issued_at: str
    expires: str
    prefix: str
    population: list[str]
    waves: list[list[str]]
    settings: dict[str, Any]
    url: str | None = None
    offline: list[str] = field(default_factory=list)  # offline when the rollout planned
    wave: int = 0  # the wave being sent or followed (len(waves): all done)
    phase: str = "running"  # running, aborted, completed
    abort_reason: str | None = None
    devices: dict[str, DeviceRecord] = field(default_factory=dict)
    started_at: float = 0.0
    finished_at: float | None = None

    def outcomes(self) -> list[str]:
        """The state of every targeted device."""
        return [record.state for record in self.devices.values()]

    def counts(self) -> dict[str, int]:
        """How many targeted devices are in each state."""
        counts: dict[str, int] = {}
        for state in self.outcomes():
            counts[state] = counts.get(state, 0) + 1
        return counts

    def to_json(self) -> dict[str, Any]:
        """The state file's document."""
        # Shallow copies: asdict's deep copy of 100,000 records costs seconds.
        document = {f.name: getattr(self, f.name) for f in fields(self)}
        document["devices"] = {name: vars(r) for name, r in self.devices.items()}
        document["kind"], document["format"] = STATE_KIND, STATE_FORMAT
        return document

    def save(self, path: Path) -> None:
        """Replace the state file atomically (a SIGKILL leaves the old or the new one)."""
        write_atomically(path, json.dumps(self.to_json(), separators=(",", ":")).encode())

    @classmethod
    def load(cls, path: Path) -> RolloutState:
        """Read a state file; ``ValueError`` when it is not one this version wrote."""
        try:
            document = json.loads(path.read_bytes())
        except (OSError, ValueError) as exc:
            raise ValueError(f"cannot read rollout state {path}: {exc}") from exc
        if not isinstance(document, dict) or document.get("kind") != STATE_KIND:
            raise ValueError(f"{path} is not a rollout state file")
        if document.get("format") != STATE_FORMAT:
            raise ValueError(f"{path}: rollout state format {document.get('format')!r} unknown")
        document = {k: v for k, v in document.items() if k not in ("kind", "format")}
        try:
            records = document.pop("devices")
            state = cls(**document)
            state.devices = {name: DeviceRecord(**record) for name, record in records.items()}
        except (TypeError, KeyError, AttributeError) as exc:
            raise ValueError(f"{path}: damaged rollout state: {exc}") from exc
        return state


def report_document(state: RolloutState) -> dict[str, Any]:
    """The ``--report`` JSON: the rollout's settings, result and every device's outcome."""
    document = state.to_json()
    document["counts"] = state.counts()
    document["not_targeted"] = sorted(set(state.population) - set(state.devices))
    return document


def summary_rows(devices: Mapping[str, DeviceRecord]) -> list[tuple[str, str, str, str]]:
    """The final table: device, wave, result, reason or validation figures."""
    rows = [("DEVICE", "WAVE", "RESULT", "DETAIL")]
    for name in sorted(devices, key=lambda n: (devices[n].wave, n)):
        record = devices[name]
        if record.state == SUCCEEDED and (record.validation or record.shadow):
            figures = []
            if record.validation:
                figures.append(validation_line(record.validation))
            if record.shadow:
                figures.append(f"shadow {shadow_line(record.shadow)}")
            detail = "; ".join(figures)
        else:
            detail = record.reason or (f"step {record.step}" if record.step else "")
        if record.rollback:
            detail = f"{detail}; rollback {record.rollback}".lstrip("; ")
        rows.append((name, str(record.wave + 1), record.state, detail))
    return rows
