"""The terms of a shadow trial: the device's ``updates.shadow``, overridden key by key by
the ``shadow`` block a signed manifest may carry. Pure: parsing and merging only."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any

from agent.config.schema import ShadowConfig
from agent.errors import UpdateRejectedError

# The keys a manifest's ``shadow`` block may hold (``sample`` is the device's own business:
# how much of its CPU a trial may take).
SHADOW_KEYS = ("duration_s", "min_readings", "max_disagreement", "max_latency_ratio")
MAX_DURATION_S = 604_800.0  # a week, as the local setting allows


@dataclass(frozen=True)
class ShadowOverride:
    """The terms a manifest sets; None: the device's own setting applies."""

    duration_s: float | None = None
    min_readings: int | None = None
    max_disagreement: float | None = None
    max_latency_ratio: float | None = None

    def to_payload(self) -> dict[str, Any]:
        """The manifest's ``shadow`` block (only the keys set)."""
        return {key: value for key, value in asdict(self).items() if value is not None}


@dataclass(frozen=True)
class ShadowTerms:
    """What a shadow trial runs for and what it must show."""

    duration_s: float
    min_readings: int
    max_disagreement: float
    max_latency_ratio: float
    sample: float = 1.0

    @property
    def enabled(self) -> bool:
        """Whether there is a shadow trial at all."""
        return self.duration_s > 0

    def to_dict(self) -> dict[str, Any]:
        """For statuses and logs."""
        return asdict(self)


def terms_for(local: ShadowConfig, override: ShadowOverride | None) -> ShadowTerms:
    """The device's settings, with each key the manifest sets taking its place."""
    terms = ShadowTerms(**local.model_dump())  # the same five keys
    if override is None:
        return terms
    changes = {key: value for key, value in asdict(override).items() if value is not None}
    return replace(terms, **changes)


def parse_shadow(value: Any) -> ShadowOverride:
    """A manifest's ``shadow`` block; ``UpdateRejectedError`` names the first bad key."""
    if not isinstance(value, dict):
        raise UpdateRejectedError(f"shadow must be an object with some of {', '.join(SHADOW_KEYS)}")
    unknown = sorted(key for key in value if key not in SHADOW_KEYS)
    if unknown:
        raise UpdateRejectedError(
            f"shadow has unknown key {unknown[0][:64]!r}: it holds {', '.join(SHADOW_KEYS)}"
        )
    min_readings = value.get("min_readings")
    if min_readings is not None and (
        isinstance(min_readings, bool) or not isinstance(min_readings, int) or min_readings < 1
    ):
        raise UpdateRejectedError(
            f"shadow.min_readings must be a positive integer, got {repr(min_readings)[:64]}"
        )
    return ShadowOverride(
        duration_s=_number(value, "duration_s", 0.0, MAX_DURATION_S),
        min_readings=min_readings,
        max_disagreement=_number(value, "max_disagreement", 0.0, 1.0),
        max_latency_ratio=_number(value, "max_latency_ratio", 0.0, math.inf, low_open=True),
    )


def _number(
    data: dict[str, Any], key: str, low: float, high: float, *, low_open: bool = False
) -> float | None:
    if key not in data:
        return None
    value = data[key]
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise UpdateRejectedError(f"shadow.{key} must be a number, got {repr(value)[:64]}")
    if value < low or (low_open and value == low) or value > high:
        bounds = f"({low:g}, {high:g}]" if low_open else f"[{low:g}, {high:g}]"
        raise UpdateRejectedError(f"shadow.{key} must be in {bounds}, got {value!r}")
    return float(value)
