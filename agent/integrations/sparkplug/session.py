"""One edge node's Sparkplug session as data: the topics, ``seq``, the metric aliases, which
devices are born and the values the host last saw. It builds each message; it sends nothing.

Owned by the edge node's thread (``agent.integrations.sparkplug.node``); the will is built
on paho's thread from ``death_payload``, which reads nothing mutable.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import NamedTuple

from agent.integrations.sparkplug.payloads import (
    BDSEQ,
    REBIRTH,
    DataType,
    MetricValue,
    Value,
    encode,
)
from agent.integrations.sparkplug.result_metrics import Metrics

NAMESPACE = "spBv1.0"


class Message(NamedTuple):
    """One MQTT message to publish (births and data: QoS 0, never retained)."""

    topic: str
    payload: bytes
    qos: int = 0


@dataclass(frozen=True)
class NodeTopics:
    """The topics of one edge node (``spBv1.0/GROUP/VERB/NODE[/DEVICE]``)."""

    group_id: str
    edge_node_id: str

    def node(self, verb: str) -> str:
        """An edge node topic: NBIRTH, NDATA, NDEATH, NCMD."""
        return f"{NAMESPACE}/{self.group_id}/{verb}/{self.edge_node_id}"

    def device(self, verb: str, device: str) -> str:
        """A device topic: DBIRTH, DDATA, DDEATH."""
        return f"{self.node(verb)}/{device}"


def state_topic(host_id: str) -> str:
    """Where the primary host application says it is online (Sparkplug 3.0)."""
    return f"{NAMESPACE}/STATE/{host_id}"


def death_payload(bdseq: int, timestamp_ms: int) -> bytes:
    """The NDEATH payload: the ``bdSeq`` of the CONNECT it is the will of, and no seq."""
    return encode(
        [MetricValue(DataType.INT64, bdseq, name=BDSEQ)], timestamp_ms=timestamp_ms, seq=None
    )


@dataclass
class _Declared:
    """A metric as a birth declared it, and the value the host last saw."""

    datatype: DataType
    alias: int
    value: Value


@dataclass
class _Device:
    pipeline: str
    metrics: dict[str, _Declared] = field(default_factory=dict)
    born: bool = False


class EdgeSession:
    """Sequence numbers, aliases and last values of the edge node and its devices."""

    def __init__(self, topics: NodeTopics) -> None:
        self.topics = topics
        self._seq = 0
        self._aliases: dict[tuple[str, str], int] = {}  # (device or "", metric) -> alias
        self._node: dict[str, _Declared] = {}
        self._devices: dict[str, _Device] = {}
        self.born = False  # an NBIRTH went out on the current connection

    # -- births ----------------------------------------------------------------------------

    def node_birth(self, bdseq: int, metrics: Metrics, now_ms: int) -> Message:
        """The NBIRTH (seq 0): bdSeq, ``Node Control/Rebirth`` (no alias, as the
        specification requires) and every node metric. Every device is born again after it
        (``device_birth``), before any data."""
        self._seq = 0
        self._node = {
            name: _Declared(datatype, self._alias("", name), value)
            for name, (datatype, value) in metrics.items()
        }
        for device in self._devices.values():
            device.born = False
        self.born = True
        declared = [
            MetricValue(
                DataType.INT64, bdseq, name=BDSEQ, alias=self._alias("", BDSEQ), timestamp_ms=now_ms
            ),
            MetricValue(DataType.BOOLEAN, False, name=REBIRTH, timestamp_ms=now_ms),
        ] + [
            MetricValue(d.datatype, d.value, name=name, alias=d.alias, timestamp_ms=now_ms)
            for name, d in self._node.items()
        ]
        return Message(self.topics.node("NBIRTH"), encode(declared, timestamp_ms=now_ms, seq=0))

    def node_metric_names(self) -> set[str]:
        """The node metrics the current NBIRTH declared."""
        return set(self._node)

    def device_birth(self, device_id: str, now_ms: int) -> Message:
        """The DBIRTH of a known device, with every metric it declared and its last value."""
        device = self._devices[device_id]
        device.born = True
        declared = [
            MetricValue(d.datatype, d.value, name=name, alias=d.alias, timestamp_ms=now_ms)
            for name, d in device.metrics.items()
        ]
        return Message(
            self.topics.device("DBIRTH", device_id),
            encode(declared, timestamp_ms=now_ms, seq=self._next_seq()),
        )

    def devices(self) -> list[str]:
        """Every device known in this session, in the order they appeared."""
        return list(self._devices)

    @property
    def device_count(self) -> int:
        """How many devices are known (safe to read from another thread)."""
        return len(self._devices)

    def devices_of(self, pipeline: str) -> list[str]:
        """The devices of ``pipeline``."""
        return [name for name, d in self._devices.items() if d.pipeline == pipeline]

    def knows(self, device_id: str) -> bool:
        """Whether ``device_id`` has appeared before."""
        return device_id in self._devices

    # -- data ------------------------------------------------------------------------------

    def node_data(self, metrics: Metrics, now_ms: int) -> Message | None:
        """NDATA with the node metrics whose value changed, or None when none did. The
        caller re-births when the set of names differs from the NBIRTH's."""
        changed = []
        for name, (_, value) in metrics.items():
            declared = self._node[name]
            if value != declared.value:
                declared.value = value
                changed.append(
                    MetricValue(declared.datatype, value, alias=declared.alias, timestamp_ms=now_ms)
                )
        if not changed:
            return None
        return Message(
            self.topics.node("NDATA"), encode(changed, timestamp_ms=now_ms, seq=self._next_seq())
        )

    def device_data(
        self,
        device_id: str,
        pipeline: str,
        metrics: Metrics,
        *,
        taken_ms: int,
        now_ms: int,
        historical: bool = False,
    ) -> Message | None:
        """The DDATA that carries one result of ``device_id``, with the metrics that changed
        (metrics the result lacks become null); None when nothing changed or the device
        cannot take it yet: a new device, or one whose result has a metric its birth did not
        declare, is declared here and must be born in a new birth sequence first
        (``needs_birth``), since DBIRTHs follow the NBIRTH before any DATA. ``taken_ms``
        stamps the metrics; ``historical`` marks a stored result sent late."""
        device = self._devices.get(device_id)
        if device is None or not set(metrics) <= set(device.metrics):
            self._declare(device_id, pipeline, metrics, device)
            return None
        if not device.born:
            return None
        changed = []
        for name, declared in device.metrics.items():
            value = metrics[name][1] if name in metrics else None
            if value != declared.value or historical:
                if not historical:
                    declared.value = value
                changed.append(
                    MetricValue(
                        declared.datatype,
                        value,
                        alias=declared.alias,
                        timestamp_ms=taken_ms,
                        historical=historical,
                    )
                )
        if not changed:
            return None
        return Message(
            self.topics.device("DDATA", device_id),
            encode(changed, timestamp_ms=now_ms, seq=self._next_seq()),
        )

    def needs_birth(self, device_id: str) -> bool:
        """Whether ``device_id`` waits for a birth sequence before its data can go."""
        device = self._devices.get(device_id)
        return device is not None and not device.born

    def device_death(self, device_id: str, now_ms: int) -> Message:
        """The DDEATH of a device; it is born again on its next result or birth sequence."""
        self._devices[device_id].born = False
        return Message(
            self.topics.device("DDEATH", device_id),
            encode([], timestamp_ms=now_ms, seq=self._next_seq()),
        )

    def forget(self, device_id: str) -> None:
        """Drop a device whose pipeline is gone (after its DDEATH)."""
        self._devices.pop(device_id, None)

    def connection_lost(self) -> None:
        """The MQTT session ended: the next one starts with a new birth sequence."""
        self.born = False
        for device in self._devices.values():
            device.born = False

    # -- internals -------------------------------------------------------------------------

    def _declare(
        self, device_id: str, pipeline: str, metrics: Metrics, previous: _Device | None
    ) -> _Device:
        # Born with this result's values: the DBIRTH carries them.
        known: Mapping[str, _Declared] = previous.metrics if previous is not None else {}
        device = _Device(pipeline)
        for name, declared in known.items():
            device.metrics[name] = declared
        for name, (datatype, value) in metrics.items():
            if name in device.metrics:
                device.metrics[name].value = value
            else:
                device.metrics[name] = _Declared(datatype, self._alias(device_id, name), value)
        self._devices[device_id] = device
        return device

    def _alias(self, device_id: str, name: str) -> int:
        # Unique across the whole edge node (devices included) and stable for the life of
        # the process, so a host that kept its alias map across a rebirth stays right.
        key = (device_id, name)
        alias = self._aliases.get(key)
        if alias is None:
            alias = self._aliases[key] = len(self._aliases) + 1
        return alias

    def _next_seq(self) -> int:
        self._seq = (self._seq + 1) % 256
        return self._seq
