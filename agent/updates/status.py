"""Update statuses: what each names, and the one place they are logged and published.

A status about a manifest whose signatures did not verify never names the update it claims
to be (``authenticated: false``): it could otherwise make an operator's tool report a
legitimate update as refused. Every status carries ``manifest_sha256``, the digest of the
exact bytes it answers.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import structlog

from agent.config.schema import AgentConfig
from agent.inference.codecs import encode_json
from agent.updates.manifest import UpdateManifest
from agent.updates.states import UpdateState, UpdateStep
from agent.updates.store import JournalEntry

log = structlog.get_logger(__name__)

REASON_MAX_CHARS = 500

StatusPublisher = Callable[[str, bytes], None]


def unauthenticated(digest: str | None) -> dict[str, Any]:
    """The summary of a manifest that is not (yet) known to be signed: no claimed id, model
    or version, only the digest of its bytes."""
    return {
        "update_id": None,
        "model": None,
        "version": None,
        "authenticated": False,
        "manifest_sha256": digest,
    }


def authenticated(manifest: UpdateManifest, digest: str) -> dict[str, Any]:
    """The summary of a verified, well-formed manifest."""
    return {**manifest.summary(), "authenticated": True, "manifest_sha256": digest}


def journalled(entry: JournalEntry) -> dict[str, Any]:
    """The summary of an update the journal remembers (it was verified when accepted)."""
    return {
        "update_id": entry.update_id,
        "model": entry.model,
        "version": entry.version,
        "authenticated": True,
        "manifest_sha256": entry.manifest_sha256,
    }


class StatusReporter:
    """Logs and publishes update statuses; called on the intake, install and main threads."""

    def __init__(self, config: Callable[[], AgentConfig], publish: StatusPublisher) -> None:
        self._config = config  # the current config: it changes on reload
        self._publish = publish

    def report(
        self,
        summary: dict[str, Any],
        state: UpdateState,
        step: UpdateStep | None = None,
        reason: str | None = None,
        **extra: Any,
    ) -> None:
        """Log and publish on ``P/updates/status`` (QoS 1; paho keeps it while disconnected):
        the one place every update state change is reported. The log gets the whole reason;
        the status a bounded one, with the device's folders named by their settings."""
        config = self._config()
        level = log.warning if state in (UpdateState.FAILED, UpdateState.REJECTED) else log.info
        level(
            "update_status",
            **summary,
            state=state,
            step=step,
            reason=encodable(reason) if reason else reason,
            **extra,
        )
        document = {
            **summary,
            "device_id": config.device_id,
            "state": state,
            "step": step,
            "reason": self.public(reason) if reason else reason,
            **extra,
            "ts": round(time.time(), 3),
        }
        try:
            self._publish(f"{config.topic_prefix}/updates/status", encode_json(document))
        except Exception:  # a status that cannot be sent must not break the update itself
            log.exception("update_status_not_sent", **summary)

    def public(self, reason: str) -> str:
        """``reason`` as the fleet sees it: bounded, and without the device's paths."""
        config = self._config()
        for folder, setting in (
            (config.models_dir, "<models_dir>"),
            (config.state_dir, "<state_dir>"),
        ):
            reason = reason.replace(str(Path(folder)), setting)
        return bounded(reason)


def encodable(text: str) -> str:
    """``text`` with anything UTF-8 cannot carry (a lone surrogate) escaped."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def bounded(text: str) -> str:
    """At most ``REASON_MAX_CHARS``, and encodable as UTF-8 whatever a sender put in it."""
    if len(text) > REASON_MAX_CHARS:
        text = text[: REASON_MAX_CHARS - 1] + "\u2026"
    return encodable(text)
