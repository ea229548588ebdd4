"""Operator commands for signed updates: ``keygen``, ``sign`` and ``publish-update``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from agent.cli.broker_options import add_broker_arguments
from agent.cli.model import add_tolerance_arguments
from agent.cli.rollout_command import run_rollout
from agent.cli.shadow_options import add_shadow_arguments, shadow_override, shadow_problem
from agent.cli.update_sender import (
    ProgressBar,
    SignedUpdate,
    StatusFollower,
    send_update,
    sign_update,
)
from agent.errors import ConfigError, EdgeAgentError, GoldenSetError, UpdateKeyError
from agent.inference.golden import GoldenSet, Tolerances, read_golden_file
from agent.updates.manifest import (
    DEFAULT_CHUNK_SIZE,
    GROUP_PREFIX,
    MAX_CHUNK_SIZE,
    NAME_PATTERN,
    parse_duration,
)
from agent.updates.signing import generate_keypair

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def add_parsers(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the three update commands to the ``edge-agent`` parser."""
    keygen = commands.add_parser(
        "keygen",
        help="create an Ed25519 signing key pair",
        description="Write NAME.key (private, mode 0600: keep it off the devices) and "
        "NAME.pub (list it in the devices' updates.trusted_keys).",
    )
    keygen.add_argument("name", metavar="NAME", help="path stem of the two files")

    sign = commands.add_parser(
        "sign",
        help="write a signed update manifest",
        description="Sign MODEL.onnx for the named devices and groups; the manifest can be "
        "published by any MQTT tool, or used with --url for https delivery.",
    )
    _update_arguments(sign)
    sign.add_argument(
        "--url",
        help="devices download the model from this https URL "
        "(default: the bytes come as MQTT chunks)",
    )
    sign.add_argument(
        "-o", "--output", required=True, metavar="MANIFEST.json", help="where to write the manifest"
    )

    publish = commands.add_parser(
        "publish-update",
        help="sign and send a model to devices, then follow their status",
        description="Sign MODEL.onnx, publish the manifest and the model in chunks to each "
        "target over MQTT, then print the status every targeted device reports "
        "until all finished or --timeout. Exit 0 only when all SUCCEEDED.",
    )
    _update_arguments(publish)
    add_broker_arguments(publish)
    publish.add_argument(
        "--prefix", default="edge", help="device topics are PREFIX/<device>/... (default: edge)"
    )
    publish.add_argument(
        "--timeout",
        type=float,
        default=300.0,
        metavar="SECONDS",
        help="give up waiting for statuses after this long (default 300)",
    )
    publish.add_argument(
        "--settle",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="group targets: done once no new device has reported for this "
        "long and all that reported finished (default 10)",
    )
    publish.add_argument(
        "--url",
        help="devices download the model from this https URL instead of MQTT chunks "
        "(the source that scales to large fleets)",
    )
    _rollout_arguments(publish)


def _rollout_arguments(publish: argparse.ArgumentParser) -> None:
    rollout = publish.add_argument_group(
        "staged rollout",
        "With --waves the group's devices (from their retained health) get the update in "
        "growing waves, each device a manifest naming it alone; --timeout is then per wave.",
    )
    rollout.add_argument(
        "--waves",
        metavar="SPEC",
        help="cumulative wave sizes: a canary count, then shares of the group, "
        "e.g. 1,5%%,25%%,100%%",
    )
    rollout.add_argument(
        "--wave-wait",
        metavar="DURATION",
        help="a wave must stay healthy (model READY at the new version) this long "
        "before the next starts (default 60s)",
    )
    rollout.add_argument(
        "--abort-failures",
        metavar="SHARE",
        help="stop when more than this share of the devices targeted so far failed, "
        "were rejected, timed out or turned unhealthy (default 10%%)",
    )
    rollout.add_argument(
        "--abort-min",
        type=int,
        metavar="N",
        help="apply --abort-failures once at least N devices finished (default 3)",
    )
    rollout.add_argument(
        "--rollback-on-abort",
        action="store_true",
        help="after an abort, send --previous as version N+1 to the devices that took N",
    )
    rollout.add_argument(
        "--previous", type=Path, metavar="PREV.onnx", help="the model to roll back to"
    )
    rollout.add_argument(
        "--retain",
        action="store_true",
        help="leave each device's manifest retained (desired state: an offline device "
        "installs it when it is back); with --url also the group's, once all succeeded",
    )
    rollout.add_argument(
        "--report", type=Path, metavar="FILE", help="write the rollout's JSON report here"
    )
    rollout.add_argument(
        "--state",
        type=Path,
        metavar="FILE",
        help="where the rollout keeps its state (default: UPDATE_ID.rollout.json)",
    )
    rollout.add_argument(
        "--resume",
        type=Path,
        metavar="FILE",
        help="go on with the rollout whose state is in FILE (same model, keys, version)",
    )
    rollout.add_argument(
        "--discover-wait",
        type=float,
        default=1.0,
        metavar="SECONDS",
        help="after the broker returned the devices' retained health, wait this much "
        "longer before planning (default 1)",
    )


def _update_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model_file", metavar="MODEL.onnx", type=Path)
    parser.add_argument(
        "--key",
        action="append",
        required=True,
        type=Path,
        metavar="K",
        help="private key (repeat for a threshold of several signatures)",
    )
    parser.add_argument(
        "--model", required=True, metavar="NAME", help="model name in the devices' config"
    )
    parser.add_argument(
        "--version",
        required=True,
        type=int,
        metavar="N",
        help="integer version; must be higher than any the devices accepted",
    )
    parser.add_argument(
        "--device", action="append", default=[], metavar="ID", help="target device (repeatable)"
    )
    parser.add_argument(
        "--group", action="append", default=[], metavar="G", help="target group (repeatable)"
    )
    parser.add_argument(
        "--expires", default="7d", metavar="DURATION", help="validity, e.g. 12h, 30d (default 7d)"
    )
    parser.add_argument(
        "--chunk-size",
        type=int,
        default=DEFAULT_CHUNK_SIZE,
        metavar="BYTES",
        help=f"MQTT chunk size (default {DEFAULT_CHUNK_SIZE})",
    )
    parser.add_argument("--update-id", metavar="ID", help="default: MODEL-vN-<random>")
    parser.add_argument(
        "--golden",
        type=Path,
        metavar="GOLDEN.npz",
        help="golden set (`edge-agent model golden`) that travels in the signed manifest: "
        "each device runs it through the new model during the trial, and fails the update "
        "when the outputs are out of tolerance",
    )
    add_tolerance_arguments(parser)  # --rtol/--atol/--top1: override the golden set's own
    add_shadow_arguments(parser)


def run(args: argparse.Namespace) -> int:
    """Dispatch one of the update commands; returns the exit code."""
    try:
        if args.command == "keygen":
            private, public, key_id = generate_keypair(Path(args.name))
            print(f"wrote {private} (private, mode 0600) and {public}\nkeyid {key_id}")
            return EXIT_OK
        problem = _check_update_arguments(args)
        if problem:
            print(f"edge-agent {args.command}: {problem}", file=sys.stderr)
            return EXIT_USAGE
        args.golden_set = _golden(args)
        args.shadow_terms = shadow_override(args)
        if args.command == "sign":
            return _sign(args)
        if args.waves or args.resume:
            return run_rollout(args)
        return _publish(args)
    except (UpdateKeyError, GoldenSetError, OSError) as exc:
        print(f"edge-agent {args.command}: {exc}", file=sys.stderr)
        return EXIT_FAILED


def _check_update_arguments(args: argparse.Namespace) -> str | None:
    try:
        args.expires_in = parse_duration(args.expires)
    except ValueError as exc:
        return str(exc)
    names = (args.model, *args.device, *args.group, args.update_id or "x")
    resuming = getattr(args, "resume", None) is not None
    bad_name = next((value for value in names if not NAME_PATTERN.fullmatch(value)), None)
    url = getattr(args, "url", None)
    checks = [
        (
            not args.device and not args.group and not resuming,
            "name at least one --device or --group",
        ),
        (bad_name is not None, f"{bad_name!r} is not a valid name (1-64 of A-Z a-z 0-9 . _ -)"),
        (args.version < 1, "--version must be a positive integer"),
        (not 1 <= args.chunk_size <= MAX_CHUNK_SIZE, f"--chunk-size must be 1..{MAX_CHUNK_SIZE}"),
        (bool(url) and not str(url).lower().startswith("https://"), "--url must be https://"),
        (
            args.golden is None and (args.rtol, args.atol, args.top1) != (None, None, None),
            "--rtol, --atol and --top1 are the tolerances of a golden set: add --golden",
        ),
        (shadow_problem(args) is not None, shadow_problem(args) or ""),
    ]
    return next((message for failed, message in checks if failed), None)


def _golden(args: argparse.Namespace) -> GoldenSet | None:
    """The ``--golden`` set judged by its own tolerances, but those given on the command
    line; ``GoldenSetError`` when the file cannot be used."""
    if args.golden is None:
        return None
    golden = read_golden_file(args.golden)
    own = golden.tolerances
    tolerances = Tolerances(
        rtol=own.rtol if args.rtol is None else args.rtol,
        atol=own.atol if args.atol is None else args.atol,
        top1_agreement=own.top1_agreement if args.top1 is None else args.top1,
    )
    return golden.with_tolerances(tolerances)


def _signed(args: argparse.Namespace, url: str | None) -> SignedUpdate:
    """The update the ``sign`` and ``publish-update`` options describe, signed; ``url``: its
    https source (None: sent in MQTT chunks)."""
    return sign_update(
        args.model_file,
        args.key,
        model=args.model,
        version=args.version,
        devices=args.device,
        groups=args.group,
        expires_in=args.expires_in,
        url=url,
        chunk_size=args.chunk_size,
        update_id=args.update_id,
        golden=args.golden_set,
        shadow=args.shadow_terms,
    )


def _sign(args: argparse.Namespace) -> int:
    update = _signed(args, args.url)
    Path(args.output).write_bytes(update.manifest_bytes())
    golden = args.golden_set
    carries = f", golden set of {golden.samples} samples" if golden is not None else ""
    print(
        f"wrote {args.output}: update {update.update_id}, model {args.model} version "
        f"{args.version}, {len(args.key)} signature(s){carries}"
    )
    return EXIT_OK


def _publish(args: argparse.Namespace) -> int:
    from agent.cli.tool_client import broker_settings, connect  # noqa: PLC0415

    try:
        mqtt, password = broker_settings(args)
    except (ConfigError, EdgeAgentError) as exc:
        print(f"edge-agent publish-update: {exc}", file=sys.stderr)
        return EXIT_FAILED
    update = _signed(args, url=args.url)
    prefix = args.prefix.rstrip("/")
    follower = StatusFollower(
        update.update_id, levels=len(prefix.split("/")), manifest_sha256=update.manifest_sha256()
    )
    try:
        client = connect(mqtt, password, [(f"{prefix}/+/updates/status", 1)], follower.on_message)
    except EdgeAgentError as exc:
        print(f"edge-agent publish-update: {exc}", file=sys.stderr)
        return EXIT_FAILED
    bases = [f"{prefix}/{device}" for device in args.device] + [
        f"{GROUP_PREFIX}/{group}" for group in args.group
    ]
    golden = args.golden_set
    carries = f" with a golden set of {golden.samples} samples" if golden is not None else ""
    print(
        f"update {update.update_id}: model {args.model} version {args.version}, "
        f"{len(update.data)} bytes{carries} to {', '.join(bases)}",
        flush=True,
    )
    bar = ProgressBar(sys.stderr)
    follower.before_line = bar.interrupt
    device_bases = {f"{prefix}/{device}": device for device in args.device}
    try:
        send_update(
            client,
            bases,
            update,
            bar,
            answered=lambda base: follower.has_final(device_bases.get(base)),
        )
        finished = follower.wait(args.device, bool(args.group), args.timeout, args.settle)
    except TimeoutError as exc:
        print(f"edge-agent publish-update: {exc}", file=sys.stderr)
        return EXIT_FAILED
    finally:
        client.disconnect()
        client.loop_stop()
    return _summary(follower, args.device, finished)


def _summary(follower: StatusFollower, devices: list[str], finished: bool) -> int:
    finals = follower.finals
    succeeded = sorted(d for d, s in finals.items() if s.get("state") == "SUCCEEDED")
    unsuccessful = sorted(d for d, s in finals.items() if s.get("state") != "SUCCEEDED")
    silent = sorted((set(devices) | follower.seen) - set(finals))
    print(
        f"{len(succeeded)} succeeded, {len(unsuccessful)} failed or rejected"
        + (f" ({', '.join(unsuccessful)})" if unsuccessful else "")
        + (f", no final status from {', '.join(silent)}" if silent else "")
        + ("" if finished or silent else ", timed out")
    )
    if not finals and not finished:
        print(
            "no device reported: check --prefix, the targets and that the devices are online",
            file=sys.stderr,
        )
    ok = finished and not unsuccessful and not silent and bool(finals)
    return EXIT_OK if ok else EXIT_FAILED
