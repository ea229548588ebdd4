"""The update intake's pure pieces: the inbox's message kinds and bounds, dispatch of each
kind, the state and step enums on the wire, and start-up recovery (no broker, no threads)."""

from __future__ import annotations

import hashlib
import json
import threading
from pathlib import Path
from typing import Any

from agent.config.schema import AgentConfig
from agent.errors import UpdateFailedError, UpdateRejectedError
from agent.inference.codecs import encode_json
from agent.updates.inbox import (
    INBOX_MAX_BYTES,
    MANIFESTS_WAITING_MAX,
    MANIFESTS_WAITING_MAX_BYTES,
    ChunkArrived,
    ChunkTooLarge,
    Downloaded,
    Finished,
    Inbox,
    InboxMessage,
    ManifestArrived,
    ManifestRefused,
    Tick,
)
from agent.updates.inflight import ActiveUpdate, FinalStatus
from agent.updates.manager import UpdateIntake
from agent.updates.recovery import recover
from agent.updates.states import UpdateState, UpdateStep
from agent.updates.status import StatusReporter
from agent.updates.store import JournalEntry, UpdateStore
from agent.updates.trust import UpdateTrust
from tests.update_helpers import chunks_of, payload_for

MODEL = b"model bytes " * 100


class Device:
    """An intake with a real store and inbox, statuses captured instead of published."""

    def __init__(self, tmp_path: Path, verify: Any = None) -> None:
        self.config = AgentConfig.model_validate(
            {
                "device_id": "dev1",
                "models_dir": str(tmp_path / "models"),
                "state_dir": str(tmp_path / "state"),
                "mqtt": {"topic_prefix": "edge/dev1"},
                "models": {"lin": {"file": "lin.onnx"}},
            }
        )
        self.sent: list[tuple[str, bytes]] = []
        self.installs: list[ActiveUpdate] = []
        self.store = UpdateStore(tmp_path / "state" / "updates")
        self.inbox = Inbox()
        self.reporter = StatusReporter(lambda: self.config, self._publish)
        self.intake = UpdateIntake(
            lambda: self.config,
            self.store,
            self.inbox,
            self.reporter,
            verify=verify or (lambda data: data),  # unsigned: the bytes are the payload
            trust=UpdateTrust(self.config),
            submit=self.installs.append,
            stopped=threading.Event(),
        )

    def _publish(self, topic: str, payload: bytes) -> None:
        self.sent.append((topic, payload))

    def statuses(self) -> list[dict[str, Any]]:
        """The status documents sent so far, without their time stamps."""
        found = []
        for topic, payload in self.sent:
            assert topic == "edge/dev1/updates/status"
            document = json.loads(payload)
            document.pop("ts")
            found.append(document)
        return found

    def states(self) -> list[tuple[str, str | None]]:
        return [(s["state"], s["step"]) for s in self.statuses()]

    def accept(self, update_id: str = "u1", version: int = 1) -> bytes:
        """Dispatch a manifest for MODEL in 4 KiB chunks; its bytes."""
        manifest = json.dumps(payload_for(MODEL, update_id=update_id, version=version)).encode()
        self.intake.dispatch(ManifestArrived("edge/dev1/updates/manifest", manifest))
        return manifest


# -- the state and step enums ------------------------------------------------------------------


def test_states_and_steps_are_their_strings_in_json_and_text() -> None:
    """str(), format(), json and orjson all give the plain value, as the wire always had."""
    assert [s.value for s in UpdateState] == [
        "QUEUED",
        "IN_PROGRESS",
        "SUCCEEDED",
        "FAILED",
        "REJECTED",
    ]
    assert [s.value for s in UpdateStep] == [
        "downloading",
        "waiting_for_transfer",
        "verifying",
        "installing",
        "trial",
        "building_engine",
        "validating",
        "shadow",
        "committed",
    ]
    for member in [*UpdateState, *UpdateStep]:
        assert str(member) == f"{member}" == member.value
        assert json.dumps(member) == json.dumps(member.value)
    document = {"state": UpdateState.IN_PROGRESS, "step": UpdateStep.TRIAL}
    assert encode_json(document) == b'{"state":"IN_PROGRESS","step":"trial"}'
    assert json.dumps(document, indent=1) == json.dumps(
        {"state": "IN_PROGRESS", "step": "trial"}, indent=1
    )


def test_a_status_document_keeps_its_fields_and_order(tmp_path: Path) -> None:
    """summary, device_id, state, step, reason, extras, ts; the reason names folders by their
    setting and is bounded."""
    device = Device(tmp_path)
    summary = {"update_id": "u1", "model": "lin", "version": 3, "authenticated": True}
    reason = f"cannot write {tmp_path / 'models'}/x: " + "y" * 600
    device.reporter.report(summary, UpdateState.FAILED, UpdateStep.VERIFYING, reason, dropped=2)
    payload = device.sent[0][1]
    document = json.loads(payload)
    assert list(document) == [
        "update_id",
        "model",
        "version",
        "authenticated",
        "device_id",
        "state",
        "step",
        "reason",
        "dropped",
        "ts",
    ]
    assert b'"state":"FAILED","step":"verifying","reason":"cannot write <models_dir>/x: ' in payload
    assert len(document["reason"]) == 500
    assert document["reason"].endswith("\u2026")
    device.reporter.report(summary, UpdateState.SUCCEEDED)
    assert b'"state":"SUCCEEDED","step":null,"reason":null,"ts":' in device.sent[1][1]


def test_the_journal_keeps_steps_as_strings(tmp_path: Path) -> None:
    """The state file holds plain step strings, read back equal to the enum members."""
    store = UpdateStore(tmp_path)
    entry = JournalEntry("u1", "lin", 1, "s", UpdateStep.DOWNLOADING, "t", "p")
    store.begin(entry)
    store.set_step("u1", UpdateStep.TRIAL)
    saved = json.loads((tmp_path / "state.json").read_text())
    assert saved["journal"][0]["step"] == "trial"
    assert UpdateStore(tmp_path).journal()[0].step == UpdateStep.TRIAL


def test_recovery_rolls_back_a_step_another_version_journalled(tmp_path: Path) -> None:
    """After a downgrade the journal may hold a step this agent never writes: the update is
    rolled back like one stopped mid-trial, its status names the step in the reason only,
    and later updates are still accepted (the state is not corrupt)."""
    device = Device(tmp_path)
    device.store.begin(JournalEntry("u1", "lin", 1, "s1", UpdateStep.DOWNLOADING, "t", "p"))
    state_file = tmp_path / "state" / "updates" / "state.json"
    saved = json.loads(state_file.read_text())
    saved["journal"][0]["step"] = "validating"
    state_file.write_text(json.dumps(saved))
    device.store = UpdateStore(state_file.parent)
    assert device.store.problem is None
    recover(device.store, device.config, device.reporter)
    assert device.states() == [("FAILED", None)]
    assert "during the validating step" in device.statuses()[0]["reason"]
    assert device.store.journal() == []
    assert device.store.highest_version("lin") == 0  # readable, not corrupt


# -- the inbox ---------------------------------------------------------------------------------


def test_each_message_kind_keeps_its_logged_name() -> None:
    """``update_intake_failed`` logs ``kind``: the names it always had."""
    kinds: list[type[InboxMessage]] = [
        ManifestArrived,
        ManifestRefused,
        ChunkArrived,
        ChunkTooLarge,
        Downloaded,
        Finished,
        Tick,
    ]
    assert [k.KIND for k in kinds] == [
        "manifest",
        "refused",
        "chunk",
        "chunk_too_large",
        "downloaded",
        "finished",
        "tick",
    ]


def test_the_inbox_bounds_manifests_by_count_and_bytes() -> None:
    """What does not fit is dropped and counted once; taking one makes room for another."""
    inbox = Inbox()
    for _ in range(MANIFESTS_WAITING_MAX + 3):
        inbox.offer_manifest("t", b"{}")
    inbox.offer_refusal("too large")
    assert inbox.take_dropped() == 4
    assert inbox.take_dropped() == 0
    assert inbox.get(0) == ManifestArrived("t", b"{}")
    inbox.offer_refusal("too large")
    inbox.offer_manifest("t", b"{}")
    assert inbox.take_dropped() == 1
    left = inbox.drain()
    assert len(left) == MANIFESTS_WAITING_MAX
    assert left[-1] == ManifestRefused("too large")
    big = b"x" * (MANIFESTS_WAITING_MAX_BYTES // 2)
    inbox.offer_manifest("t", big)
    inbox.offer_manifest("t", big)
    inbox.offer_manifest("t", b"x")
    assert inbox.take_dropped() == 1


def test_the_inbox_bounds_chunk_bytes_and_remembers_whose_were_dropped() -> None:
    inbox = Inbox()
    half = b"x" * (INBOX_MAX_BYTES // 2)
    inbox.offer_chunk("u1", half)
    inbox.offer_chunk("u1", half)
    inbox.offer_chunk("u2", b"y")
    assert inbox.take_overflowed() == {"u2"}
    assert inbox.take_overflowed() == set()
    assert inbox.get(0) == ChunkArrived("u1", half)
    inbox.offer_chunk("u2", b"y")
    assert inbox.take_overflowed() == set()


def test_the_inbox_ticks_when_idle_and_ends_when_closed() -> None:
    inbox = Inbox()
    assert inbox.get(0) == Tick()
    inbox.put(Finished("u1", accepted=True))
    inbox.close()
    assert inbox.get(0) == Finished("u1", True)
    assert inbox.get(0) is None


# -- dispatch of each kind -----------------------------------------------------------------------


def test_a_refused_manifest_is_rejected_without_naming_an_update(tmp_path: Path) -> None:
    device = Device(tmp_path)
    device.intake.dispatch(ManifestRefused("manifest of 9 bytes is too large; not read"))
    assert device.statuses() == [
        {
            "update_id": None,
            "model": None,
            "version": None,
            "authenticated": False,
            "manifest_sha256": None,
            "device_id": "dev1",
            "state": "REJECTED",
            "step": None,
            "reason": "manifest of 9 bytes is too large; not read",
        }
    ]


def test_a_manifest_that_does_not_verify_is_rejected_by_its_digest(tmp_path: Path) -> None:
    def verify(data: bytes) -> bytes:
        raise UpdateRejectedError("no valid signature")

    device = Device(tmp_path, verify)
    manifest = device.accept()
    (status,) = device.statuses()
    assert status["state"] == "REJECTED"
    assert status["reason"] == "no valid signature"
    assert status["update_id"] is None
    assert status["authenticated"] is False
    assert status["manifest_sha256"] == hashlib.sha256(manifest).hexdigest()


def test_an_accepted_manifest_starts_a_transfer_that_chunks_complete(tmp_path: Path) -> None:
    device = Device(tmp_path)
    device.accept()
    assert device.states() == [("QUEUED", None), ("IN_PROGRESS", "downloading")]
    assert [e.step for e in device.store.journal()] == ["downloading"]
    for chunk in chunks_of(MODEL, 4096):
        device.intake.dispatch(ChunkArrived("u1", chunk))
    (active,) = device.installs
    assert Path(active.entry.staged).read_bytes() == MODEL
    device.intake.dispatch(ChunkArrived("u1", b"\0\0\0\0late"))  # after completion: ignored
    assert len(device.statuses()) == 2


def test_an_oversized_chunk_fails_its_transfer(tmp_path: Path) -> None:
    device = Device(tmp_path)
    device.accept()
    device.intake.dispatch(ChunkTooLarge("other", 10**7))  # no such transfer: ignored
    device.intake.dispatch(ChunkTooLarge("u1", 10**7))
    assert device.states()[-1] == ("FAILED", "downloading")
    assert "a chunk message of 10000000 bytes" in device.statuses()[-1]["reason"]
    assert device.store.journal() == []


def test_a_download_outcome_fails_or_hands_on_its_update(tmp_path: Path) -> None:
    device = Device(tmp_path)
    device.intake.dispatch(Downloaded("nobody", UpdateFailedError("gone")))  # ignored
    assert device.sent == []
    device.accept()
    device.intake.dispatch(Downloaded("u1", UpdateFailedError("https: 404")))
    assert device.states()[-1] == ("FAILED", "downloading")
    assert device.statuses()[-1]["reason"] == "https: 404"
    device.accept("u2", version=2)
    device.intake.dispatch(Downloaded("u2", None))
    assert [a.manifest.update_id for a in device.installs] == ["u2"]


def test_finished_publishes_the_final_status_and_remembers_the_manifest(tmp_path: Path) -> None:
    device = Device(tmp_path)
    manifest = device.accept()
    for chunk in chunks_of(MODEL, 4096):
        device.intake.dispatch(ChunkArrived("u1", chunk))
    device.installs[0].final = FinalStatus(UpdateState.SUCCEEDED)
    device.intake.dispatch(Finished("u1", accepted=True))
    assert device.states()[-1] == ("SUCCEEDED", None)
    assert device.store.journal() == []
    sent = len(device.sent)
    device.intake.dispatch(Finished("u1", accepted=True))  # no longer in flight: ignored
    device.intake.dispatch(ManifestArrived("edge/dev1/updates/manifest", manifest))  # an echo
    device.intake.dispatch(Tick())
    assert len(device.sent) == sent


def test_finished_without_a_final_status_leaves_it_to_the_next_start(tmp_path: Path) -> None:
    """Stopped mid-trial: no status now, the journal entry stays for recovery."""
    device = Device(tmp_path)
    device.accept()
    device.intake.dispatch(Downloaded("u1", None))
    device.intake.dispatch(Finished("u1", accepted=True))
    assert device.states() == [("QUEUED", None), ("IN_PROGRESS", "downloading")]
    assert [e.update_id for e in device.store.journal()] == ["u1"]


# -- start-up recovery ---------------------------------------------------------------------------


def test_recovery_reports_each_journalled_update_once(tmp_path: Path) -> None:
    device = Device(tmp_path)
    staged = tmp_path / "u1.part"
    staged.write_bytes(b"half")
    device.store.begin(JournalEntry("u1", "lin", 1, "s1", UpdateStep.DOWNLOADING, "t", str(staged)))
    device.store.begin(JournalEntry("u2", "lin", 2, "s2", UpdateStep.DOWNLOADING, "t", "p"))
    device.store.accept("u2", "lin", 2, "s2", previous_sha256=None)
    device.store.commit("u2")
    recover(device.store, device.config, device.reporter)
    assert device.states() == [("FAILED", "downloading"), ("SUCCEEDED", None)]
    assert [s["update_id"] for s in device.statuses()] == ["u1", "u2"]
    assert all(s["authenticated"] for s in device.statuses())
    assert not staged.exists()
    assert device.store.journal() == []
