"""``publish-update --waves ... | --resume FILE``: check the options, plan or reload the
rollout, connect, and hand it to ``agent.cli.rollout.Rollout``."""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

from agent.cli.rollout import Rollout, RolloutOptions
from agent.cli.rollout_plan import (
    AbortRule,
    RolloutState,
    parse_seconds,
    parse_share,
    parse_waves,
    plan_waves,
)
from agent.cli.rollout_watch import RolloutWatcher
from agent.cli.status import wait_for_retained
from agent.cli.tool_client import broker_settings, connect
from agent.cli.update_sender import Signer, make_signer
from agent.errors import ConfigError, EdgeAgentError
from agent.updates.manifest import format_time, parse_time

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
DEFAULT_WAVE_WAIT_S = 60.0
DEFAULT_ABORT_SHARE = 0.10
DEFAULT_ABORT_MIN = 3


def run_rollout(args: argparse.Namespace) -> int:
    """Run (or resume) a staged rollout; returns the exit code."""
    try:
        mqtt, password = broker_settings(args)
    except (ConfigError, EdgeAgentError) as exc:
        print(f"edge-agent publish-update: {exc}", file=sys.stderr)
        return EXIT_FAILED
    signer = make_signer(
        args.model_file,
        args.key,
        model=args.model,
        version=args.version,
        expires_in=args.expires_in,
        url=args.url,
        chunk_size=args.chunk_size,
        update_id=args.update_id,
        golden=args.golden_set,
        shadow=args.shadow_terms,
    )
    state: RolloutState | None = None
    try:
        if args.resume:
            state = _resumed_state(args, signer)
            signer = signer_for(state, signer)
        options = _options(args, state, Path(f"{signer.update_id}.rollout.json"))
    except ValueError as exc:
        print(f"edge-agent publish-update: {exc}", file=sys.stderr)
        return EXIT_USAGE
    prefix = (state.prefix if state else args.prefix).rstrip("/")
    watcher = RolloutWatcher(prefix)
    subscriptions = [
        (f"{prefix}/+/updates/status", 1),
        (f"{prefix}/+/status", 1),
        (f"{prefix}/+/health", 1),
        (f"{prefix}/+/models/{signer.model}", 1),
        (watcher.fleet.marker_topic, 1),
    ]
    try:
        client = connect(mqtt, password, subscriptions, watcher.on_message)
    except EdgeAgentError as exc:
        print(f"edge-agent publish-update: {exc}", file=sys.stderr)
        return EXIT_FAILED
    try:
        wait_for_retained(client, watcher.fleet, options.discover_s)
        if state is None:
            state = _plan(args, signer, prefix, watcher, options)
            if state is None:
                return EXIT_FAILED
        else:
            print(
                f"resuming rollout {state.update_id} at wave {state.wave + 1}/"
                f"{len(state.waves)} ({state.phase}); state in {options.state_file}",
                flush=True,
            )
        rollout = Rollout(client, watcher, state=state, signer=signer, options=options)
        return rollout.run()
    except TimeoutError as exc:
        print(f"edge-agent publish-update: {exc} (resume with --resume)", file=sys.stderr)
        return EXIT_FAILED
    finally:
        client.disconnect()
        client.loop_stop()


def _options(
    args: argparse.Namespace, resumed: RolloutState | None, default_state_file: Path
) -> RolloutOptions:
    """The rollout options, checked (a resumed rollout keeps the settings it started with);
    ``ValueError`` says which is wrong."""
    settings = resumed.settings if resumed is not None else {}
    if resumed is None and not args.group:
        raise ValueError("--waves rolls out to a --group: name one")
    rollback = bool(settings.get("rollback_on_abort", args.rollback_on_abort))
    if rollback and args.previous is None:
        raise ValueError("--rollback-on-abort needs --previous PREV.onnx (the model to restore)")
    if args.previous is not None and not args.previous.is_file():
        raise ValueError(f"--previous {args.previous}: no such file")
    if args.abort_min is not None and args.abort_min < 1:
        raise ValueError("--abort-min must be at least 1")
    # Given on the command line, a setting wins over the resumed rollout's own.
    wave_wait = (
        parse_seconds(args.wave_wait)
        if args.wave_wait is not None
        else float(settings.get("wave_wait_s", DEFAULT_WAVE_WAIT_S))
    )
    share = (
        parse_share(args.abort_failures)
        if args.abort_failures is not None
        else float(settings.get("abort_failures", DEFAULT_ABORT_SHARE))
    )
    minimum = (
        args.abort_min
        if args.abort_min is not None
        else int(settings.get("abort_min", DEFAULT_ABORT_MIN))
    )
    return RolloutOptions(
        waves=parse_waves(args.waves) if args.waves and resumed is None else [],
        wave_wait_s=wave_wait,
        abort=AbortRule(share, minimum),
        wave_timeout_s=float(settings.get("wave_timeout_s", args.timeout)),
        discover_s=args.discover_wait,
        retain=bool(settings.get("retain", args.retain)),
        rollback_model=args.previous if rollback else None,
        state_file=args.resume or args.state or default_state_file,
        report_file=args.report,
    )


def _resumed_state(args: argparse.Namespace, signer: Signer) -> RolloutState:
    """The state of the rollout to resume; ``ValueError`` when it is not this update."""
    state = RolloutState.load(args.resume)
    mismatches = [
        what
        for what, ours, theirs in (
            ("model name", args.model, state.model),
            ("version", args.version, state.version),
            ("model file (sha256)", signer.sha256, state.model_sha256),
        )
        if ours != theirs
    ]
    if mismatches:
        raise ValueError(
            f"{args.resume} is the rollout of {state.model} version {state.version}: "
            f"the {', '.join(mismatches)} given differ"
        )
    return state


def _plan(
    args: argparse.Namespace,
    signer: Signer,
    prefix: str,
    watcher: RolloutWatcher,
    options: RolloutOptions,
) -> RolloutState | None:
    """A new rollout's state: the group's devices in order, split into waves; saved."""
    ordered, offline = Rollout.population(watcher.devices(), args.group, args.device, time.time())
    skipped = [] if args.retain else offline
    population = [d for d in ordered if d not in skipped]
    if not population:
        print(
            f"edge-agent publish-update: no device of {', '.join(args.group)} under "
            f"{prefix}/ is online (retained health lists the groups; check --prefix)",
            file=sys.stderr,
        )
        return None
    waves = plan_waves(population, options.waves)
    state = RolloutState(
        update_id=signer.update_id,
        model=signer.model,
        version=signer.version,
        model_sha256=signer.sha256,
        issued_at=format_time(signer.issued_at),
        expires=format_time(signer.expires),
        prefix=prefix,
        population=population,
        waves=waves,
        settings={
            "groups": list(args.group),
            "devices": list(args.device),
            "waves": args.waves,
            "wave_wait_s": options.wave_wait_s,
            "abort_failures": options.abort.share,
            "abort_min": options.abort.minimum,
            "retain": options.retain,
            "rollback_on_abort": options.rollback_model is not None,
            "wave_timeout_s": options.wave_timeout_s,
        },
        url=signer.url,
        offline=offline,
        started_at=time.time(),
    )
    state.save(options.state_file)
    sizes = ", ".join(str(sum(len(w) for w in waves[: i + 1])) for i in range(len(waves)))
    print(
        f"rollout {state.update_id}: model {state.model} version {state.version} to "
        f"{len(population)} device(s) of {', '.join(args.group)} in {len(waves)} wave(s) "
        f"of cumulative size {sizes}"
        + (f"; {len(skipped)} offline, not targeted" if skipped else "")
        + (f"; {len(offline)} offline, their manifests retained" if offline and not skipped else "")
        + f"\nstate in {options.state_file}: resume with --resume {options.state_file}",
        flush=True,
    )
    return state


def signer_for(state: RolloutState, base: Signer) -> Signer:
    """``base`` with the times of ``state``: a resumed rollout signs the same bytes."""
    return replace(
        base,
        model=state.model,
        version=state.version,
        update_id=state.update_id,
        issued_at=parse_time(state.issued_at, "issued_at"),
        expires=parse_time(state.expires, "expires"),
        url=state.url,
    )
