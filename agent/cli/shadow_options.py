"""``--shadow`` and its thresholds on ``sign`` and ``publish-update``: the shadow trial's
terms that travel inside the signed payload and override each device's ``updates.shadow``."""

from __future__ import annotations

import argparse

from agent.cli.rollout_plan import parse_share
from agent.updates.manifest import parse_duration
from agent.updates.shadow_terms import MAX_DURATION_S, ShadowOverride


def add_shadow_arguments(parser: argparse.ArgumentParser) -> None:
    """The shadow trial's options."""
    group = parser.add_argument_group(
        "shadow trial",
        "after its golden set, each device runs the new model beside the serving one on its "
        "own live readings before it may serve (the device's updates.shadow, key by key "
        "overridden by these)",
    )
    group.add_argument(
        "--shadow",
        metavar="DURATION",
        help="how long, e.g. 10m, 1h; 0s turns the devices' own shadow trial off",
    )
    group.add_argument(
        "--shadow-min-readings",
        type=int,
        metavar="N",
        help="fewer live readings compared in that time fail the update",
    )
    group.add_argument(
        "--max-disagreement",
        metavar="F",
        help="the share of readings whose results may differ: 0.02 or 2%%",
    )
    group.add_argument(
        "--max-latency-ratio",
        type=float,
        metavar="R",
        help="the new model's median run time over the serving model's, at most",
    )


def shadow_problem(args: argparse.Namespace) -> str | None:
    """What is wrong with the shadow options, or None."""
    thresholds = (args.shadow_min_readings, args.max_disagreement, args.max_latency_ratio)
    if args.shadow is None:
        if thresholds == (None, None, None):
            return None
        return (
            "--shadow-min-readings, --max-disagreement and --max-latency-ratio are the "
            "terms of a shadow trial: add --shadow DURATION"
        )
    try:
        seconds = parse_duration(args.shadow).total_seconds()
    except ValueError as exc:
        return f"--shadow: {exc}"
    checks = [
        (seconds > MAX_DURATION_S, "--shadow: at most 7d"),
        (
            args.shadow_min_readings is not None and args.shadow_min_readings < 1,
            "--shadow-min-readings must be a positive integer",
        ),
        (
            args.max_disagreement is not None and _share(args.max_disagreement) is None,
            "--max-disagreement must be a share in 0..1, like 0.02, or a percentage, like 2%",
        ),
        (
            args.max_latency_ratio is not None and not args.max_latency_ratio > 0,
            "--max-latency-ratio must be a positive number",
        ),
    ]
    return next((message for failed, message in checks if failed), None)


def shadow_override(args: argparse.Namespace) -> ShadowOverride | None:
    """The manifest's ``shadow`` block from checked options (``shadow_problem`` was None)."""
    if args.shadow is None:
        return None
    return ShadowOverride(
        duration_s=parse_duration(args.shadow).total_seconds(),
        min_readings=args.shadow_min_readings,
        max_disagreement=(
            _share(args.max_disagreement) if args.max_disagreement is not None else None
        ),
        max_latency_ratio=args.max_latency_ratio,
    )


def _share(text: str) -> float | None:
    """``0.02`` or ``2%`` as 0.02; None when it is not a share in 0..1."""
    try:
        return parse_share(text)
    except ValueError:
        return None
