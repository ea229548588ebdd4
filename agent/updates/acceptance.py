"""Whether this device takes a verified manifest now: the policy checks before a transfer.

Run on the intake thread once the signatures verified; each refusal is an
``UpdateRejectedError`` whose message is the REJECTED status's reason.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterable
from datetime import datetime, timezone
from typing import Any

import structlog

from agent.config.schema import PACKET_OVERHEAD_BYTES, AgentConfig
from agent.errors import UpdateRejectedError
from agent.updates import strict_json
from agent.updates.manifest import (
    NAME_PATTERN,
    ChunkSource,
    UpdateManifest,
    applicability_problem,
)
from agent.updates.store import UpdateStore

log = structlog.get_logger(__name__)

DISK_MARGIN_BYTES = 16 * 1024 * 1024  # leave the device this much besides the new model


def check_acceptable(
    manifest: UpdateManifest,
    config: AgentConfig,
    store: UpdateStore,
    in_progress: Iterable[UpdateManifest],
) -> None:
    """``UpdateRejectedError`` unless ``manifest`` is for this device, now, for a configured
    model, above its version floor, in chunks this device can receive, for a model no other
    update (``in_progress``) is changing, and fits on the disk. May create the model's
    folder (to measure its free space)."""
    problem = applicability_problem(
        manifest, config.device_id, config.groups, datetime.now(timezone.utc)
    )
    if problem:
        raise UpdateRejectedError(problem)
    if manifest.model not in config.models:
        raise UpdateRejectedError(
            f"model {manifest.model!r} is not configured on this device "
            f"(models: {sorted(config.models)})"
        )
    highest = store.highest_version(manifest.model)
    if manifest.version <= highest:
        raise UpdateRejectedError(
            f"version {manifest.version} is not newer than version "
            f"{highest}, the highest this device accepted for "
            f"{manifest.model!r} (rollback or replay)"
        )
    if isinstance(manifest.source, ChunkSource):
        limit = config.max_packet_bytes(config.upstream or config.mqtt)
        largest = limit - PACKET_OVERHEAD_BYTES
        if manifest.source.chunk_size > largest:
            raise UpdateRejectedError(
                f"chunk_size {manifest.source.chunk_size} is larger than this device takes "
                f"({largest} bytes, from mqtt.max_packet_bytes {limit}): send it with "
                f"--chunk-size {largest} or less"
            )
    for other in in_progress:
        if other.model == manifest.model:
            raise UpdateRejectedError(
                f"update {other.update_id} (version "
                f"{other.version}) of {manifest.model!r} is in "
                "progress; send this one when it has finished"
            )
    folder = config.model_path(manifest.model).parent
    folder.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(folder).free
    if manifest.length + DISK_MARGIN_BYTES > free:
        # Where and how much is free is for the device's log, not for the fleet.
        log.warning(
            "update_disk_space_low",
            folder=str(folder),
            free_mb=free / 1e6,
            needed_mb=(manifest.length + DISK_MARGIN_BYTES) / 1e6,
        )
        raise UpdateRejectedError(
            f"not enough disk space for the model: it needs {manifest.length / 1e6:.1f} MB "
            f"plus a {DISK_MARGIN_BYTES // 2**20} MB margin"
        )


def signed_claims(payload: bytes) -> dict[str, Any]:
    """update_id, model and version of a verified payload that may fail the strict parse,
    each only where it is well-formed, so a REJECTED status can name the update."""
    claims: dict[str, Any] = {}
    with contextlib.suppress(ValueError):
        document = strict_json.loads(payload)
        if isinstance(document, dict):
            for key in ("update_id", "model"):
                value = document.get(key)
                if isinstance(value, str) and NAME_PATTERN.fullmatch(value):
                    claims[key] = value
            version = document.get("version")
            if isinstance(version, int) and not isinstance(version, bool):
                claims["version"] = version
    return claims
