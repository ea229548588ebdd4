"""``publish-update --waves``: a staged rollout over a fleet.

The devices of the group (from their retained health) are put in a fixed order, online
ones first, and split into cumulative waves. Each device of a wave gets a manifest that
names it alone, so a device that joins the group mid-rollout is never swept in. After a
wave has reported and stayed healthy for ``--wave-wait``, the next one starts; when the
failed, rejected, timed-out or unhealthy share of the devices targeted so far passes
``--abort-failures`` (once ``--abort-min`` finished), the rollout stops, and with
``--rollback-on-abort`` the devices that took the new model get the previous one back as
a newer signed version. Every change is written to the state file, so ``--resume`` goes on
where a killed command stopped without sending anything to a device that finished.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TextIO

import paho.mqtt.client as paho

from agent.cli.rollout_plan import (
    FAILED,
    FINISHED,
    PENDING,
    REJECTED,
    SENT,
    SUCCEEDED,
    TIMED_OUT,
    UNHEALTHY,
    AbortRule,
    DeviceRecord,
    RolloutState,
    WaveSize,
    report_document,
    summary_rows,
)
from agent.cli.rollout_watch import RolloutWatcher
from agent.cli.status import ONLINE, DeviceView, judge
from agent.cli.update_sender import Signer, send_update, wait_acked
from agent.durable import write_atomically
from agent.updates.manifest import GROUP_PREFIX

POLL_S = 0.2
HEALTH_POLL_S = 1.0  # how often --wave-wait looks at the retained model states
MANIFEST_WINDOW = 100  # manifests awaiting the broker's PUBACK while a wave is sent
SAVE_EVERY_S = 1.0  # the state file is rewritten at most this often while statuses pour in
EXIT_OK, EXIT_FAILED = 0, 1
_ROLLBACK_SUFFIX = "-rollback"


@dataclass(frozen=True)
class RolloutOptions:
    """The rollout's settings, from the command line."""

    waves: Sequence[WaveSize]
    wave_wait_s: float
    abort: AbortRule
    wave_timeout_s: float
    discover_s: float
    retain: bool
    rollback_model: Path | None
    state_file: Path
    report_file: Path | None


class _RolloutParts:
    """The state, options and connection of a rollout, and what it does after the waves;
    ``Rollout`` adds the waves. The main thread is the only caller."""

    def __init__(
        self,
        client: paho.Client,
        watcher: RolloutWatcher,
        *,
        state: RolloutState,
        signer: Signer,
        options: RolloutOptions,
        out: TextIO = sys.stdout,
    ) -> None:
        self._client = client
        self._watcher = watcher
        self.state = state
        self._signer = signer
        self._options = options
        self._out = out
        self._saved_at = 0.0
        self._save_cost_s = 0.0
        self._collected_at = 0.0
        self._rollback: Signer | None = None

    # -- after the waves ------------------------------------------------------------------

    def _roll_back(self) -> None:
        """Send the previous model, as version N+1, to the devices that took version N
        (also to one whose SUCCEEDED comes late, while the rollback runs)."""
        state = self.state
        took = [
            d
            for d, r in state.devices.items()
            if r.state in (SUCCEEDED, UNHEALTHY) and r.rollback not in FINISHED
        ]
        if not took:
            return
        signer = self._rollback_signer()
        self._say(
            f"rolling back {len(took)} device(s): {self._options.rollback_model} as version "
            f"{signer.version} ({signer.update_id})"
        )
        pending: dict[str, str] = {}
        for device in took:
            self._send_rollback(signer, device)
            pending[device] = SENT
        self._save(force=True)
        deadline = time.monotonic() + self._options.wave_timeout_s
        while SENT in pending.values() and time.monotonic() < deadline:
            for device, status in self._watcher.take_finals().items():
                record = state.devices.get(device)
                if record is None:
                    continue
                result = str(status.get("state"))
                if pending.get(device) == SENT:  # the rollback's own final word
                    pending[device] = record.rollback = result
                elif device not in pending and result == SUCCEEDED:  # took N late
                    record.state, record.reason = SUCCEEDED, "SUCCEEDED after the abort"
                    self._send_rollback(signer, device)
                    pending[device] = SENT
            time.sleep(POLL_S)
        for device, result in pending.items():
            if result == SENT:
                state.devices[device].rollback = TIMED_OUT
        ok = sum(result == SUCCEEDED for result in pending.values())
        self._say(f"rollback: {ok} of {len(pending)} devices serve the previous model again")

    def _send_rollback(self, signer: Signer, device: str) -> None:
        update = signer.sign([device])
        self._watcher.expect(device, update.update_id, update.manifest_sha256())
        send_update(
            self._client,
            [f"{self.state.prefix}/{device}"],
            update,
            lambda done, total: None,
            retain=self._options.retain,
        )
        self.state.devices[device].rollback = SENT

    def _rollback_signer(self) -> Signer:
        if self._rollback is None:
            assert self._options.rollback_model is not None
            data = self._options.rollback_model.read_bytes()
            update_id = self.state.update_id[: 64 - len(_ROLLBACK_SUFFIX)] + _ROLLBACK_SUFFIX
            self._rollback = replace(  # the same keys and times, the previous bytes
                self._signer,
                data=data,
                sha256=_sha256(data),
                version=self.state.version + 1,
                update_id=update_id,
                url=None,
                golden=None,
            )
        return self._rollback

    def _leave_desired_state(self) -> None:
        """With ``--retain``: clear the retained manifests that must not be acted on later
        (devices that failed or were rejected, and after an abort every device that did
        not take the update), and once the whole group succeeded with an https source,
        leave a group manifest retained for devices that join it later."""
        if not self._options.retain:
            return
        state = self.state
        aborted = state.phase == "aborted"
        for device, record in state.devices.items():
            if record.rollback is not None:
                continue  # its retained manifest is the rollback's now
            if record.state in (FAILED, REJECTED, UNHEALTHY) or (
                aborted and record.state != SUCCEEDED
            ):
                self._client.publish(
                    f"{state.prefix}/{device}/updates/manifest", b"", qos=1, retain=True
                ).wait_for_publish(10)
        groups = state.settings.get("groups") or []
        everyone = len(state.devices) == len(state.population) and all(
            record.state == SUCCEEDED for record in state.devices.values()
        )
        if state.phase == "completed" and everyone and state.url and groups:
            update = self._signer.sign([], groups)
            for group in groups:
                self._client.publish(
                    f"{GROUP_PREFIX}/{group}/updates/manifest",
                    update.manifest_bytes(),
                    qos=1,
                    retain=True,
                ).wait_for_publish(10)
            self._say(f"group manifest left retained for {', '.join(groups)}: late joiners")

    def _finish(self) -> int:
        state = self.state
        rows = summary_rows(state.devices)
        widths = [max(len(row[i]) for row in rows) for i in range(3)]
        for row in rows:
            cells = [cell.ljust(width) for cell, width in zip(row[:3], widths, strict=True)]
            print("  ".join([*cells, row[3]]).rstrip(), file=self._out)
        untouched = sorted(set(state.population) - set(state.devices))
        counts = ", ".join(f"{n} {s.lower()}" for s, n in sorted(state.counts().items()))
        self._say(
            f"rollout {state.update_id} {state.phase}: {counts or 'nothing sent'}"
            + (f"; {len(untouched)} not targeted" if untouched else "")
        )
        if self._options.report_file is not None:
            write_atomically(
                self._options.report_file,
                json.dumps(report_document(state), indent=1).encode(),
            )
        ok = state.phase == "completed" and all(
            r.state == SUCCEEDED for r in state.devices.values()
        )
        return EXIT_OK if ok and state.devices else EXIT_FAILED

    # -- small helpers ----------------------------------------------------------------------

    def _already_installed(self, view: DeviceView | None) -> bool:
        versions = ((view.health if view else None) or {}).get("update_versions")
        if not isinstance(versions, dict):
            return False
        have = versions.get(self.state.model)
        return isinstance(have, int) and have >= self.state.version

    def _online(self, view: DeviceView | None) -> bool:
        return view is not None and judge(view, time.time()).state == ONLINE

    def _counts_line(self, wave: Sequence[str]) -> str:
        counts: dict[str, int] = {}
        for device in wave:
            record = self.state.devices.get(device)
            state = record.state if record else "NOT SENT"
            counts[state] = counts.get(state, 0) + 1
        return ", ".join(f"{n} {s.lower()}" for s, n in sorted(counts.items()))

    def _save(self, force: bool = False) -> None:
        """Write the state file: when forced, else at most every ``SAVE_EVERY_S`` and never
        more than a tenth of the time (a 100,000-device state takes a while to write)."""
        now = time.monotonic()
        if force or now - self._saved_at >= max(SAVE_EVERY_S, 10 * self._save_cost_s):
            self.state.save(self._options.state_file)
            self._saved_at = time.monotonic()
            self._save_cost_s = self._saved_at - now

    def _say(self, line: str) -> None:
        print(line, file=self._out, flush=True)


class Rollout(_RolloutParts):
    """Drives one rollout on a connected client; the main thread is its only caller."""

    # -- the plan -------------------------------------------------------------------------

    @staticmethod
    def population(
        devices: dict[str, DeviceView], groups: Sequence[str], named: Sequence[str], now: float
    ) -> tuple[list[str], list[str]]:
        """The devices to roll out to, in order (online first, then by name), and which
        of them were not online: members of any of ``groups`` by their retained health,
        and the ``named`` devices."""
        members = {name for name, view in devices.items() if set(groups) & set(view.groups)} | set(
            named
        )
        offline = sorted(
            name
            for name in members
            if name not in devices or judge(devices[name], now).state != ONLINE
        )
        online = sorted(members - set(offline))
        return online + offline, offline

    # -- running --------------------------------------------------------------------------

    def run(self) -> int:
        """Send the waves not yet done, then roll back or leave the desired state; prints
        the table, writes the report, returns the exit code."""
        state = self.state
        total = len(state.waves)
        for device, record in state.devices.items():  # a resumed rollout listens again
            if record.state in (SENT, PENDING) and record.manifest_sha256:
                self._watcher.expect(device, state.update_id, record.manifest_sha256)
        while state.phase == "running" and state.wave < total:
            index = state.wave
            wave = state.waves[index]
            targeted = sum(len(w) for w in state.waves[: index + 1])
            self._say(
                f"wave {index + 1}/{total}: {len(wave)} device(s), "
                f"{targeted} of {len(state.population)} targeted"
            )
            self._send_wave(index, wave)
            self._follow(wave, time.monotonic() + self._options.wave_timeout_s)
            if state.phase == "running" and index + 1 < total:
                self._hold(index)
            self._say(f"wave {index + 1}/{total} done: {self._counts_line(wave)}")
            if state.phase == "running":
                state.wave = index + 1
            self._save(force=True)
        if state.phase == "running":
            self._wait_for_pending()
        if state.phase == "running":
            state.phase = "completed"
        if state.phase == "aborted":
            self._say(f"ABORTED: {state.abort_reason}")
            if self._options.rollback_model is not None:
                self._roll_back()
        self._leave_desired_state()
        state.finished_at = state.finished_at or time.time()
        self._save(force=True)
        return self._finish()

    def _send_wave(self, index: int, wave: Sequence[str]) -> None:
        """Send the manifest (and its chunks) to every device of the wave that has no
        final word yet; a device that already took this version (its health says so, a
        status lost while the command was down) counts as SUCCEEDED without a send.

        Manifests without chunks go out ``MANIFEST_WINDOW`` at a time before their acks
        are awaited: one round trip per device would make a 10,000-device wave slow."""
        state = self.state
        views = self._watcher.devices(wave)
        window: deque[paho.MQTTMessageInfo] = deque()
        for device in wave:
            record = state.devices.get(device)
            if record is not None and record.state in FINISHED:
                continue
            if self._already_installed(views.get(device)):
                state.devices[device] = DeviceRecord(
                    wave=index, state=SUCCEEDED, reason="version installed (device health)"
                )
                continue
            update = self._signer.sign([device])
            digest = update.manifest_sha256()
            self._watcher.expect(device, update.update_id, digest)
            base = f"{state.prefix}/{device}"
            # Offline now (at planning, or since): with --retain its manifest waits for it,
            # and it asks for its chunks when it is back.
            away = self._options.retain and not self._online(views.get(device))
            if update.chunk_size is None or away:
                window.append(
                    self._client.publish(
                        f"{base}/updates/manifest",
                        update.manifest_bytes(),
                        qos=1,
                        retain=self._options.retain,
                    )
                )
                if len(window) >= MANIFEST_WINDOW:
                    wait_acked(window.popleft())
            else:
                send_update(
                    self._client,
                    [base],
                    update,
                    lambda done, total: None,
                    retain=self._options.retain,
                )
            state.devices[device] = DeviceRecord(
                wave=index, state=PENDING if away else SENT, manifest_sha256=digest
            )
            if time.monotonic() - self._collected_at >= POLL_S:
                self._collect()
            if state.phase != "running":
                break  # aborted mid-wave: the rest of the wave is not sent
        while window:
            wait_acked(window.popleft())

    def _follow(self, wave: Sequence[str], deadline: float) -> None:
        """Wait until every device of the wave that was sent the update while online has
        its final word, or the deadline; then those still silent have TIMED_OUT. An abort
        on the way does not cut this short: the devices already sent are installing, and
        their outcome decides what a rollback must undo."""
        state = self.state
        sent = [state.devices[d] for d in wave if d in state.devices]
        while True:
            self._collect()
            if not any(r.state == SENT for r in sent) or time.monotonic() >= deadline:
                break
            time.sleep(POLL_S)
        for record in sent:
            if record.state == SENT:
                record.state = TIMED_OUT
                record.reason = f"no final status in {self._options.wave_timeout_s:g} s"
        self._check_abort()
        self._save(force=True)  # a wave's outcome is on disk before anything else happens

    def _wait_for_pending(self) -> None:
        """After the last wave: give the devices that were offline when their wave came
        (their manifest is retained) up to ``--timeout`` to come back and finish. Those
        that do not stay PENDING: they install when they are back, and ``--resume`` hears
        about it."""
        pending = [d for d, r in self.state.devices.items() if r.state in (PENDING, SENT)]
        if not pending:
            return
        self._say(
            f"waiting up to {self._options.wave_timeout_s:g} s for {len(pending)} "
            "offline device(s) to come back for their retained manifest"
        )
        deadline = time.monotonic() + self._options.wave_timeout_s
        while self.state.phase == "running" and time.monotonic() < deadline:
            self._collect()
            if not any(self.state.devices[d].state in (SENT, PENDING) for d in pending):
                return
            time.sleep(POLL_S)
        for device in pending:
            record = self.state.devices[device]
            if record.state == SENT:  # came back and asked, then went silent
                record.state = TIMED_OUT
                record.reason = f"no final status in {self._options.wave_timeout_s:g} s"
        self._check_abort()

    def _hold(self, index: int) -> None:
        """``--wave-wait``: the devices that took the update must stay healthy (model
        READY at the new version) this long before the next wave starts."""
        deadline = time.monotonic() + self._options.wave_wait_s
        if self._options.wave_wait_s > 0:
            self._say(f"wave {index + 1}: watching for {self._options.wave_wait_s:g} s")
        while self.state.phase == "running" and time.monotonic() < deadline:
            self._collect()
            self._check_health()
            time.sleep(HEALTH_POLL_S)

    def _collect(self) -> None:
        """Take the finals that came in, re-send chunks on request, check the abort rule."""
        state = self.state
        self._collected_at = time.monotonic()
        for device, status in self._watcher.take_finals().items():
            record = state.devices.get(device)
            # The device's own final word, even after the command said TIMED_OUT.
            if record is None or (record.state in FINISHED and record.state != TIMED_OUT):
                continue
            record.state = str(status.get("state"))
            record.finished_s = round(time.time() - state.started_at, 2)
            record.step = _text(status.get("step"))
            record.reason = _text(status.get("reason"))
            validation = status.get("validation")
            record.validation = validation if isinstance(validation, dict) else None
            shadow = status.get("shadow")
            record.shadow = shadow if isinstance(shadow, dict) else None
            if record.state != SUCCEEDED:
                self._say(
                    f"{device}: {record.state}" + (f": {record.reason}" if record.reason else "")
                )
        for device in self._watcher.take_waiting():
            record = state.devices.get(device)
            if record is not None and record.state in (SENT, PENDING, TIMED_OUT):
                record.state = SENT  # it is back and asking: followed to the end again
                update = self._signer.sign([device])
                self._say(f"{device}: waiting for its chunks, sending them again")
                send_update(
                    self._client,
                    [f"{state.prefix}/{device}"],
                    update,
                    lambda done, total: None,
                    manifest=False,
                )
        self._check_abort()
        self._save()

    def _check_health(self) -> None:
        took = [d for d, r in self.state.devices.items() if r.state == SUCCEEDED]
        views = self._watcher.devices(took)
        expected = f"sha256:{self.state.model_sha256}"
        for device in took:
            record = self.state.devices[device]
            model = (views.get(device) or DeviceView(device)).models.get(self.state.model) or {}
            if not model:
                continue
            if model.get("state") == "FAILED" or model.get("version") not in (None, expected):
                record.state = UNHEALTHY
                record.reason = (
                    f"after the update the model is {model.get('state')} at "
                    f"{str(model.get('version'))[:15]}: {_text(model.get('error')) or ''}"
                ).rstrip(": ")
                self._say(f"{device}: UNHEALTHY: {record.reason}")

    def _check_abort(self) -> None:
        if self.state.phase != "running":
            return
        reason = self._options.abort.verdict(self.state.outcomes())
        if reason is not None:
            self.state.phase, self.state.abort_reason = "aborted", reason


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _text(value: object) -> str | None:
    return None if value is None else str(value)[:300]
