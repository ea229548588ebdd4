"""Results to device data: the device a result belongs to, the bound on devices, and the
results of new devices, which wait for the next birth sequence.

Used by the edge node's thread only (``agent.integrations.sparkplug.node``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import structlog

from agent.config.schema import PipelineConfig
from agent.integrations.sparkplug.result_metrics import device_id, result_metrics
from agent.integrations.sparkplug.session import EdgeSession, Message

log = structlog.get_logger(__name__)

# A new stream's device joins in a new birth sequence (DBIRTHs must follow the NBIRTH before
# any data); its results wait this long so that streams appearing together share one.
NEW_DEVICE_BIRTH_DELAY_S = 1.0


@dataclass(frozen=True)
class Offered:
    """A result a pipeline handed to the edge node."""

    pipeline: str
    topic: str  # the reading's input topic: its wildcards name the device
    result: Mapping[str, Any]
    late: bool  # made while the node had no Sparkplug session: sent as is_historical


class DeviceFeed:
    """Turns offered results into DDATA, or holds them for the next birth sequence."""

    def __init__(
        self,
        session: EdgeSession,
        publish: Callable[[Message], None],
        *,
        max_devices: int,
        max_held: int,
    ) -> None:
        self._session = session
        self._publish = publish
        self._max_devices = max_devices
        self._max_held = max_held
        self._held: list[Offered] = []
        self.birth_due: float | None = None  # time.monotonic() of the next birth sequence
        self.refused = 0  # results of streams beyond max_devices
        self.dropped = 0  # held results that did not fit
        self._refusal_logged = False

    def send(self, item: Offered, pipelines: Mapping[str, PipelineConfig]) -> None:
        """Publish ``item`` as its device's DDATA, or hold it until its device is born."""
        pipeline = pipelines.get(item.pipeline)
        if pipeline is None:
            return  # removed since; its devices are dead
        device = device_id(item.pipeline, pipeline.input.topic, item.topic)
        if not self._session.knows(device) and self._session.device_count >= self._max_devices:
            self._refuse(device)
            return
        message = self._session.device_data(
            device,
            item.pipeline,
            result_metrics(item.result),
            taken_ms=result_taken_ms(item.result),
            now_ms=now_ms(),
            historical=item.late,
        )
        if message is not None:
            self._publish(message)
        elif self._session.needs_birth(device):
            # The first result of a new device is in its DBIRTH; later ones wait for it.
            if self.birth_due is None:
                self.birth_due = time.monotonic() + NEW_DEVICE_BIRTH_DELAY_S
            elif len(self._held) < self._max_held:
                self._held.append(item)
            else:
                self.dropped += 1

    def born(self, pipelines: Mapping[str, PipelineConfig]) -> None:
        """A birth sequence went out: send what waited for it."""
        self.birth_due = None
        held, self._held = self._held, []
        for item in held:
            self.send(item, pipelines)

    def _refuse(self, device: str) -> None:
        self.refused += 1
        if not self._refusal_logged:
            self._refusal_logged = True
            log.warning(
                "sparkplug_device_refused",
                device=device,
                max_devices=self._max_devices,
                action="results of new streams are not published on Sparkplug; raise "
                "sparkplug.max_devices if the streams are real",
            )


def result_taken_ms(result: Mapping[str, Any]) -> int:
    """When a result was made (its ``ts``), in ms; now when it has none."""
    ts = result.get("ts")
    return int(ts * 1000) if isinstance(ts, int | float) else now_ms()


def now_ms() -> int:
    """The wall clock in ms, as Sparkplug timestamps are."""
    return int(time.time() * 1000)
