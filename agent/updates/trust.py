"""Which keys update manifests are verified against now: a key set, or ``updates.trusted_keys``.

Without ``updates.root_keys`` a device trusts ``updates.trusted_keys`` as it always did. With
root keys, a key set published on ``fleet/keys`` (or ``P/keys``) and signed by the root
replaces them: from its acceptance on, manifests are verified against the key set's keys and
threshold only, and a leaked signing key is revoked by publishing a set without it.

Stored state (``state_dir/updates/keyset.json``, mode 0600, replaced atomically)::

    {"format": 1, "envelopes": ["<base64 of an accepted key set's exact bytes>", ...]}

The last envelope is the key set in use; the ones before it are the root rotations that lead
from ``updates.root_keys`` to the root that signed it, oldest first. Nothing else is stored:
on every start (and reload) the chain is verified again from the configured root keys, so the
file holds only signed bytes and a changed or tampered file cannot widen trust. Trust never
comes from local state alone. A rotation is signed by the old root and the new one, so after
an operator moves ``updates.root_keys`` on to the new root, the chain still verifies from
there (its older part is dropped at the next write). Expiry is not checked on re-reading: an
expired set still holds the version floor and the current root; it only stops manifests.

Fails closed, like ``agent.updates.store``: a stored key set that is unreadable, corrupt or no
longer verifies refuses manifests and key sets, with a reason naming the file, because it
holds the version floor that stops a replay of an older set (one that still lists a revoked
key). Removing the file starts over from the configured keys.

``cryptography`` (~8 MB of RSS) is imported only when ``trusted_keys`` or ``root_keys`` are
configured.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import threading
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from agent.config.schema import AgentConfig
from agent.durable import own_folder, refuse_symlink, write_atomically
from agent.errors import KeySetError, UnsafePathError, UpdateKeyError, UpdateRejectedError

if TYPE_CHECKING:
    from agent.updates.keyset import KeySet
    from agent.updates.signing import TrustedKeys

log = structlog.get_logger(__name__)

KEYSET_FILE = "keyset.json"
STORE_FORMAT = 1
MAX_ROTATIONS = 32  # root rotations kept before the key set in use (years of yearly ones)
# Base64 of that many envelopes of at most 256 KiB, with room for the JSON around them.
MAX_STORE_BYTES = (MAX_ROTATIONS + 1) * (256 * 1024 * 4 // 3 + 16) + 1024
DISABLED = "signed updates are disabled on this device (updates.trusted_keys is empty)"
NO_KEY_SET = (
    "no key set received yet: publish one with `edge-agent keys publish` (updates.root_keys is set)"
)
ROOTLESS = "updates.root_keys is empty: this device does not use key sets"


@dataclass(frozen=True)
class KeySetOutcome:
    """What became of a key set offered to the device."""

    accepted: bool
    ignored: bool  # a replay, an older or equal version, the set in use again, or empty
    reason: str | None  # why it was ignored or refused (None when accepted)
    version: int | None  # the set's version (claimed, when ignored unverified)


@dataclass(frozen=True)
class _State:
    """Everything trust depends on, rebuilt from config and disk; replaced, never mutated."""

    trusted: TrustedKeys | None = None
    trusted_problem: str | None = DISABLED
    roots_configured: bool = False
    base_root: TrustedKeys | None = None  # updates.root_keys
    root: TrustedKeys | None = None  # the current root: base_root, or one rotated to
    problem: str | None = None  # root keys that do not load, or an unusable stored set
    chain: tuple[KeySet, ...] = ()  # the stored sets; the last is in use

    @property
    def current(self) -> KeySet | None:
        return self.chain[-1] if self.chain else None


class UpdateTrust:
    """The keys manifests must be signed with. Thread-safe: the intake thread verifies and
    offers key sets, the main thread reconfigures (SIGHUP)."""

    def __init__(self, config: AgentConfig) -> None:
        self._folder = Path(config.state_dir) / "updates"
        self.path = self._folder / KEYSET_FILE
        self._lock = threading.Lock()
        self._state = _load(config, self.path)

    def reconfigure(self, config: AgentConfig) -> None:
        """Adopt a reloaded config: reload the keys and re-verify the stored key set against
        the (perhaps new) root keys. Under the lock, so that a key set the intake thread
        accepts meanwhile is not replaced by what the file held before it."""
        with self._lock:
            self._state = _load(config, self.path)

    def verify_manifest(self, envelope_bytes: bytes, now: datetime) -> bytes:
        """The verified payload of an update manifest; ``UpdateRejectedError`` (a
        ``SignatureError`` for bad signatures) carries the reason its REJECTED status gives."""
        with self._lock:
            state = self._state
        problem = _problem(state, now)
        keys = _keys_in_force(state)
        if problem is not None or keys is None:
            raise UpdateRejectedError(problem or DISABLED)
        return keys.verify(envelope_bytes)

    def offer_keyset(self, envelope_bytes: bytes, topic: str, now: datetime) -> KeySetOutcome:
        """Verify a key set that arrived on ``topic``, and adopt and store it when it is newer
        than the one in use. Called on the intake thread."""
        with self._lock:
            outcome = self._offer(envelope_bytes, now)
        fields = {"topic": topic, "version": outcome.version, "reason": outcome.reason}
        if outcome.accepted:
            log.info("keyset_accepted", **fields, **self._summary())
        elif outcome.ignored:
            log.info("keyset_ignored", **fields)
        else:
            log.warning("keyset_refused", **fields)
        return outcome

    def problem(self, now: datetime | None = None) -> str | None:
        """Why manifests are refused now (no keys, keys that do not load, a key set that
        expired or cannot be read), or None when they can be verified."""
        with self._lock:
            state = self._state
        return _problem(state, now or datetime.now(timezone.utc))

    def describe(self, now: datetime | None = None) -> dict[str, Any]:
        """The health document's view: where the keys come from (``key_set``,
        ``trusted_keys`` or ``disabled``), the key set's version and expiry, the key ids in
        force (16 hex digits each), their threshold (0: none), the current root's key ids,
        and the problem, if any."""
        with self._lock:
            state = self._state
        keys = _keys_in_force(state)
        current = state.current if state.problem is None else None
        source = "key_set" if current else "trusted_keys" if keys else "disabled"
        root = state.root if state.problem is None else None
        return {
            "source": source,
            "key_set_version": current.version if current else None,
            "expires": _format_time(current.expires) if current else None,
            "keyids": sorted(k[:16] for k in keys.keys) if keys else [],
            "threshold": keys.threshold if keys else 0,
            "root_keyids": sorted(k[:16] for k in root.keys) if root else [],
            "problem": _problem(state, now or datetime.now(timezone.utc)),
        }

    def _summary(self) -> dict[str, Any]:
        info = self.describe()
        return {"keyids": info["keyids"], "expires": info["expires"]}

    def _offer(self, data: bytes, now: datetime) -> KeySetOutcome:
        """``offer_keyset`` under the lock."""
        state = self._state
        if not state.roots_configured or state.problem is not None or state.root is None:
            return KeySetOutcome(False, False, state.problem or ROOTLESS, None)
        return _screen(state.current, data) or self._adopt(state, state.root, data, now)

    def _adopt(self, state: _State, root: TrustedKeys, data: bytes, now: datetime) -> KeySetOutcome:
        """Verify ``data`` against the current ``root``; store and use it when it holds."""
        from agent.updates.keyset import extend_chain, verify_keyset  # noqa: PLC0415

        try:
            key_set = verify_keyset(data, root, now)
        except KeySetError as exc:
            return KeySetOutcome(False, False, str(exc), None)
        current = state.current
        if current is not None and key_set.version <= current.version:
            # Unreachable while _screen reads the same claim; kept as the rule's backstop.
            return KeySetOutcome(
                False, True, _not_newer(key_set.version, current.version), key_set.version
            )
        chain = extend_chain(state.chain, state.base_root or root, key_set)
        if len(chain) > MAX_ROTATIONS + 1:
            return KeySetOutcome(
                False,
                False,
                f"the device keeps at most {MAX_ROTATIONS} root rotations: set "
                "updates.root_keys to the current root (key ids "
                f"{', '.join(sorted(k[:16] for k in root.keys))}) and reload",
                key_set.version,
            )
        try:
            self._store(chain)
        except (OSError, UnsafePathError) as exc:
            return KeySetOutcome(
                False, False, f"cannot store the key set in {self.path}: {exc}", key_set.version
            )
        self._state = replace(state, root=key_set.root or root, chain=chain)
        return KeySetOutcome(True, False, None, key_set.version)

    def _store(self, chain: tuple[KeySet, ...]) -> None:
        own_folder(self._folder)
        document = {
            "format": STORE_FORMAT,
            "envelopes": [base64.b64encode(k.envelope).decode("ascii") for k in chain],
        }
        write_atomically(self.path, json.dumps(document, indent=1).encode(), mode=0o600)


def _keys_in_force(state: _State) -> TrustedKeys | None:
    """The keys manifests are verified against (expired or not), or None."""
    if state.roots_configured:
        if state.problem is not None:
            return None
        if state.current is not None:
            return state.current.keys
    return state.trusted


def _problem(state: _State, now: datetime) -> str | None:
    """Why manifests are refused at ``now``, or None when they can be verified."""
    if state.roots_configured:
        if state.problem is not None:
            return state.problem
        if state.current is not None:
            return state.current.expired_reason(now)
        if state.trusted is None and state.trusted_problem == DISABLED:
            return NO_KEY_SET
    return state.trusted_problem if state.trusted is None else None


def _screen(current: KeySet | None, data: bytes) -> KeySetOutcome | None:
    """The outcome for a key set decided without verifying it (empty, oversize, the one in
    use, an older version claimed), or None when it must be verified."""
    from agent.updates.keyset import claimed_version  # noqa: PLC0415
    from agent.updates.manifest import MAX_KEYSET_BYTES  # noqa: PLC0415

    if not data:
        in_use = f"version {current.version}" if current else "none"
        return KeySetOutcome(
            False,
            True,
            f"empty message (a cleared retained key set); the key set in use stays: {in_use}",
            None,
        )
    if len(data) > MAX_KEYSET_BYTES:  # before anything reads it
        return KeySetOutcome(
            False,
            False,
            f"key set is {len(data)} bytes, more than {MAX_KEYSET_BYTES} (256 KiB): refused unread",
            None,
        )
    if current is None:
        return None
    if data == current.envelope:
        return KeySetOutcome(
            False, True, f"key set version {current.version} is already in use", current.version
        )
    claimed = claimed_version(data)
    if claimed is not None and claimed <= current.version:
        return KeySetOutcome(False, True, _not_newer(claimed, current.version), claimed)
    return None


def _not_newer(version: int, in_use: int) -> str:
    return (
        f"key set version {version} is not newer than version {in_use} in use "
        "(a replay or an older set): ignored"
    )


def _load(config: AgentConfig, path: Path) -> _State:
    """The trust state for ``config``: its keys loaded, the stored key set re-verified."""
    updates = config.updates
    trusted: TrustedKeys | None = None
    trusted_problem: str | None = DISABLED
    if updates.trusted_keys:
        # Imported only when keys are configured: cryptography's OpenSSL costs ~8 MB of RSS.
        from agent.updates.signing import TrustedKeys  # noqa: PLC0415

        try:
            trusted = TrustedKeys.from_files(updates.trusted_keys, updates.threshold)
            trusted_problem = None
        except UpdateKeyError as exc:
            trusted_problem = f"updates.trusted_keys: {exc}"
    if not updates.root_keys:
        return _State(trusted, trusted_problem)
    from agent.updates.keyset import verify_chain  # noqa: PLC0415
    from agent.updates.signing import TrustedKeys  # noqa: PLC0415

    base = _State(trusted, trusted_problem, roots_configured=True)
    try:
        root = TrustedKeys.from_files(
            updates.root_keys, updates.root_threshold, "updates.root_keys"
        )
    except UpdateKeyError as exc:
        return replace(base, problem=f"updates.root_keys: {exc}")
    try:
        envelopes = _read_store(path)
        chain, current_root = verify_chain(envelopes, root)
    except KeySetError as exc:
        return replace(
            base,
            problem=f"stored key set {path} cannot be used: {exc}; updates are refused "
            "until it is repaired or removed, because it holds the key set version floor "
            "that stops replays",
        )
    return replace(base, base_root=root, root=current_root, chain=chain)


def _format_time(moment: datetime) -> str:
    from agent.updates.manifest import format_time  # noqa: PLC0415 (loaded with the key set)

    return format_time(moment)


def _read_store(path: Path) -> list[bytes]:
    """The stored envelopes, oldest first (none when there is no file); ``KeySetError``
    when the file cannot be read or is not what this module writes."""
    try:
        own_folder(path.parent)
        refuse_symlink(path)
        size = os.lstat(path).st_size
        if size <= MAX_STORE_BYTES:
            return _decode_store(path.read_bytes())
    except FileNotFoundError:
        return []
    except (OSError, UnsafePathError) as exc:
        raise KeySetError(f"unreadable ({exc})") from exc
    raise KeySetError(f"corrupt (it is {size} bytes, more than {MAX_STORE_BYTES})")


def _decode_store(text: bytes) -> list[bytes]:
    try:
        document = json.loads(text)
    except ValueError as exc:
        raise KeySetError(f"corrupt (not JSON: {exc})") from exc
    if not isinstance(document, dict) or document.get("format") != STORE_FORMAT:
        raise KeySetError(f"corrupt (expected an object with format {STORE_FORMAT})")
    envelopes = document.get("envelopes")
    if not isinstance(envelopes, list) or not envelopes:
        raise KeySetError("corrupt (envelopes must be a non-empty list)")
    if len(envelopes) > MAX_ROTATIONS + 1:
        raise KeySetError(f"corrupt ({len(envelopes)} envelopes, at most {MAX_ROTATIONS + 1})")
    try:
        return [base64.b64decode(item, validate=True) for item in envelopes]
    except (ValueError, TypeError, binascii.Error) as exc:
        raise KeySetError(f"corrupt (an envelope is not base64: {exc})") from exc
