"""``edge-agent keys sign`` and ``keys publish``: root-signed key sets of update keys.

A key set names the keys the devices verify update manifests with; it is signed with the
offline root keys the devices list in ``updates.root_keys`` and published retained on
``fleet/keys`` (or one device's ``PREFIX/ID/keys``). Publishing a set without a leaked key
revokes it on every device that receives the set; a set with ``--new-root`` rotates the root.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import TYPE_CHECKING

from agent.cli.broker_options import add_broker_arguments
from agent.errors import ConfigError, EdgeAgentError, KeySetError, UpdateKeyError

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import (
        Ed25519PrivateKey,
        Ed25519PublicKey,
    )

    from agent.updates.keyset import KeySet

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
FLEET_TOPIC = "fleet/keys"
PUBLISH_WAIT_S = 10.0


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``keys`` and its subcommands to the ``edge-agent`` parser."""
    keys = commands.add_parser(
        "keys",
        help="sign and publish key sets: rotate and revoke update keys over the air",
        description="A key set names the keys that sign update manifests. It is signed "
        "with the offline root keys the devices list in updates.root_keys, and published "
        "retained on fleet/keys.",
    )
    actions = keys.add_subparsers(dest="keys_command", metavar="SUBCOMMAND")
    actions.required = True

    sign = actions.add_parser(
        "sign",
        help="write a root-signed key set",
        description="Write a key set of the --key public keys, signed with every --root "
        "private key. For a root rotation pass the old root's and the new root's private "
        "keys as --root and the new root's public keys as --new-root.",
    )
    sign.add_argument(
        "--root",
        action="extend",
        nargs="+",
        required=True,
        type=Path,
        metavar="K.key",
        help="root private key to sign with (repeatable; a threshold needs several)",
    )
    sign.add_argument(
        "--key",
        action="extend",
        nargs="+",
        required=True,
        type=Path,
        metavar="PUB.pub",
        help="public key that may sign update manifests (repeatable)",
    )
    sign.add_argument(
        "--threshold", type=int, default=1, metavar="N", help="update signatures required (1)"
    )
    sign.add_argument(
        "--version",
        required=True,
        type=int,
        metavar="V",
        help="integer version; must be higher than the set the devices hold",
    )
    sign.add_argument(
        "--expires",
        default="90d",
        metavar="DURATION",
        help="validity, e.g. 30d, 12w (default 90d); devices stop taking updates after it "
        "until a newer set arrives",
    )
    sign.add_argument(
        "--new-root",
        action="extend",
        nargs="+",
        default=[],
        type=Path,
        metavar="PUB.pub",
        help="rotate the root to these public keys (their private keys must sign too)",
    )
    sign.add_argument(
        "--new-root-threshold",
        type=int,
        default=None,
        metavar="N",
        help="root signatures the new root requires from now on (default 1)",
    )
    sign.add_argument(
        "-o", "--output", required=True, type=Path, metavar="KEYSET.json", help="where to write"
    )

    publish = actions.add_parser(
        "publish",
        help="publish a key set retained on fleet/keys",
        description="Publish KEYSET.json retained, QoS 1, on fleet/keys (or PREFIX/ID/keys "
        "with --device) and wait for the broker's acknowledgement. --clear removes the "
        "retained set (devices keep the one they accepted).",
    )
    publish.add_argument("keyset", nargs="?", type=Path, metavar="KEYSET.json")
    publish.add_argument(
        "--clear", action="store_true", help="publish an empty retained message instead"
    )
    publish.add_argument(
        "--device", metavar="ID", help="only this device: its PREFIX/ID/keys topic"
    )
    publish.add_argument(
        "--prefix", default="edge", help="device topics are PREFIX/<device>/... (default: edge)"
    )
    add_broker_arguments(publish)


def run(args: argparse.Namespace) -> int:
    """Run one ``keys`` subcommand; returns the exit code."""
    name = f"edge-agent keys {args.keys_command}"
    try:
        if args.keys_command == "sign":
            return _sign(args, name)
        return _publish(args, name)
    except (UpdateKeyError, KeySetError, OSError) as exc:
        print(f"{name}: {exc}", file=sys.stderr)
        return EXIT_FAILED


def _sign(args: argparse.Namespace, name: str) -> int:
    from agent.updates.manifest import parse_duration  # noqa: PLC0415

    try:
        expires_in = parse_duration(args.expires)
    except ValueError as exc:
        return _usage(name, str(exc))
    checks = [
        (args.version < 1, "--version must be a positive integer"),
        (args.threshold < 1, "--threshold must be 1 or more"),
        (expires_in.total_seconds() <= 0, "--expires must be longer than 0s"),
        (
            args.new_root_threshold is not None and not args.new_root,
            "--new-root-threshold needs --new-root",
        ),
        (
            args.new_root_threshold is not None and args.new_root_threshold < 1,
            "--new-root-threshold must be 1 or more",
        ),
    ]
    problem = next((message for failed, message in checks if failed), None)
    if problem:
        return _usage(name, problem)
    signers = _private_keys(args.root)
    keys = _public_keys(args.key)
    new_root = _public_keys(args.new_root)
    new_threshold = args.new_root_threshold or 1
    problem = _rotation_problem(signers, new_root, new_threshold)
    if problem:
        print(f"{name}: {problem}", file=sys.stderr)
        return EXIT_FAILED
    envelope = _signed_keyset(
        args, signers, keys, new_root=new_root, new_threshold=new_threshold, expires_in=expires_in
    )
    args.output.write_bytes(envelope)
    from agent.updates.keyset import inspect_keyset  # noqa: PLC0415

    summary = describe(inspect_keyset(envelope))
    print(f"wrote {args.output}: {summary}, {len(signers)} root signature(s)")
    return EXIT_OK


def _signed_keyset(
    args: argparse.Namespace,
    signers: list[Ed25519PrivateKey],
    keys: list[Ed25519PublicKey],
    *,
    new_root: list[Ed25519PublicKey],
    new_threshold: int,
    expires_in: timedelta,
) -> bytes:
    """The key set's envelope bytes: the payload signed with every root key."""
    from agent.updates.keyset import KEYSET_PAYLOAD_TYPE, build_keyset_payload  # noqa: PLC0415
    from agent.updates.signing import sign_envelope  # noqa: PLC0415

    payload = build_keyset_payload(
        version=args.version,
        expires=datetime.now(timezone.utc).replace(microsecond=0) + expires_in,
        keys=keys,
        threshold=args.threshold,
        root_keys=new_root,
        root_threshold=new_threshold,
    )
    return json.dumps(sign_envelope(payload, signers, KEYSET_PAYLOAD_TYPE)).encode()


def _rotation_problem(
    signers: list[Ed25519PrivateKey], new_root: list[Ed25519PublicKey], threshold: int
) -> str | None:
    """Why a rotation to ``new_root`` would be refused for lack of new-root signatures."""
    if not new_root:
        return None
    from agent.updates.signing import keyid  # noqa: PLC0415

    signing = {keyid(key.public_key()) for key in signers}
    present = len(signing & {keyid(key) for key in new_root})
    if present >= threshold:
        return None
    return (
        f"a root rotation must also be signed by {threshold} of the new root's keys, and "
        f"{present} of the --root keys are in --new-root: pass the new root's private keys "
        "as --root too (devices accept a new root only when the old and the new both sign)"
    )


def _private_keys(paths: list[Path]) -> list[Ed25519PrivateKey]:
    """The keys in ``paths``, each once (a key given twice would only sign twice)."""
    from agent.updates.signing import keyid, load_private_key  # noqa: PLC0415

    keys: dict[str, Ed25519PrivateKey] = {}
    for path in paths:
        key = load_private_key(path)
        keys.setdefault(keyid(key.public_key()), key)
    return list(keys.values())


def _public_keys(paths: list[Path]) -> list[Ed25519PublicKey]:
    """The keys in ``paths``, each once, in the order given."""
    from agent.config.keys import load_public_key  # noqa: PLC0415
    from agent.updates.signing import keyid  # noqa: PLC0415

    keys: dict[str, Ed25519PublicKey] = {}
    for path in paths:
        key = load_public_key(path)
        keys.setdefault(keyid(key), key)
    return list(keys.values())


def describe(key_set: KeySet) -> str:
    """One line for the operator: version, update key ids, threshold, expiry, rotation."""
    from agent.updates.manifest import format_time  # noqa: PLC0415

    ids = ", ".join(k[:16] for k in key_set.keyids())
    text = (
        f"key set version {key_set.version}, {len(key_set.keys.keys)} update key(s) ({ids}), "
        f"threshold {key_set.keys.threshold}, expires {format_time(key_set.expires)}"
    )
    if key_set.root is not None:
        roots = ", ".join(sorted(k[:16] for k in key_set.root.keys))
        text += (
            f", rotates the root to {len(key_set.root.keys)} key(s) ({roots}), "
            f"threshold {key_set.root.threshold}"
        )
    return text


def _publish(args: argparse.Namespace, name: str) -> int:
    from agent.updates.manifest import NAME_PATTERN, format_time  # noqa: PLC0415

    if args.clear == (args.keyset is not None):
        return _usage(name, "give KEYSET.json, or --clear to remove the retained key set")
    if args.device is not None and not NAME_PATTERN.fullmatch(args.device):
        return _usage(name, f"{args.device!r} is not a valid device id")
    topic = f"{args.prefix.rstrip('/')}/{args.device}/keys" if args.device else FLEET_TOPIC
    data = b""
    what = "cleared the retained key set"
    if args.keyset is not None:
        from agent.updates.keyset import inspect_keyset  # noqa: PLC0415
        from agent.updates.manifest import MAX_KEYSET_BYTES  # noqa: PLC0415

        size = args.keyset.stat().st_size
        if size > MAX_KEYSET_BYTES:
            raise KeySetError(
                f"{args.keyset} is {size} bytes; devices refuse key sets over 256 KiB"
            )
        data = args.keyset.read_bytes()
        key_set = inspect_keyset(data)
        now = datetime.now(timezone.utc)
        if now >= key_set.expires:
            raise KeySetError(
                f"{args.keyset}: key set version {key_set.version} expired at "
                f"{format_time(key_set.expires)}; devices refuse it: sign a newer one"
            )
        what = f"published {describe(key_set)}"
    try:
        where = _send(args, topic, data)
    except EdgeAgentError as exc:
        print(f"{name}: {exc}", file=sys.stderr)
        return EXIT_FAILED
    print(f"{what}: retained on {topic} at {where}")
    return EXIT_OK


def _send(args: argparse.Namespace, topic: str, data: bytes) -> str:
    """Publish ``data`` retained at QoS 1 and wait for the broker's acknowledgement;
    returns the broker's address. ``EdgeAgentError`` when it cannot be delivered."""
    from agent.cli.tool_client import broker_settings, connect  # noqa: PLC0415

    try:
        mqtt, password = broker_settings(args)
    except ConfigError as exc:
        raise EdgeAgentError(f"{args.config}: {exc.problems[0]}") from exc
    client = connect(mqtt, password, [], lambda *_: None)
    try:
        info = client.publish(topic, data, qos=1, retain=True)
        try:
            info.wait_for_publish(PUBLISH_WAIT_S)
        except (RuntimeError, ValueError) as exc:
            raise EdgeAgentError(f"the broker did not take the key set: {exc}") from exc
        if not info.is_published():
            raise EdgeAgentError(
                f"no acknowledgement from {mqtt.host}:{mqtt.port} within {PUBLISH_WAIT_S:g} s"
            )
    finally:
        client.disconnect()
        client.loop_stop()
    return f"{mqtt.host}:{mqtt.port}"


def _usage(name: str, message: str) -> int:
    print(f"{name}: {message}", file=sys.stderr)
    return EXIT_USAGE
