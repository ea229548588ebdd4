"""A Sparkplug B host application for tests: it decodes every message of the namespace and
checks an edge node's session against the Sparkplug 3.0 specification's rules, each named
by its TCK assertion id (``tck-id-...``), as a host would see them on the wire."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from agent.integrations.sparkplug.payloads import REBIRTH, DataType, MetricValue, decode, encode
from agent.integrations.sparkplug.sparkplug_b_pb2 import Payload
from tests.broker import MosquittoBroker, track_client

DATA_VERBS = ("NDATA", "DDATA", "DBIRTH", "DDEATH")


@dataclass
class SpbMessage:
    """One decoded message of the Sparkplug namespace."""

    topic: str
    verb: str
    node: str  # GROUP/EDGE_NODE
    device: str | None
    payload: Payload
    qos: int
    retain: bool

    def metric(self, name: str) -> Payload.Metric | None:
        """The metric called ``name`` (births carry names)."""
        return next((m for m in self.payload.metrics if m.name == name), None)

    @property
    def bdseq(self) -> int | None:
        """The bdSeq metric's value, where there is one."""
        metric = self.metric("bdSeq")
        return None if metric is None else int(metric.long_value)


@dataclass
class _NodeState:
    """What the checks remember of one edge node while reading its messages in order."""

    seq: int | None = None  # last seq seen in this birth sequence
    bdseq: int | None = None  # of the current NBIRTH
    born: bool = False
    data_started: bool = False  # NDATA/DDATA seen since the NBIRTH
    node_aliases: set[int] = field(default_factory=set)
    device_aliases: dict[str, set[int]] = field(default_factory=dict)
    births: int = 0


class SparkplugHost:
    """Subscribes to ``spBv1.0/#``; with ``host_id`` it is a primary host that publishes its
    retained STATE (online on start, offline as its will)."""

    def __init__(self, broker: MosquittoBroker, host_id: str | None = None) -> None:
        self.broker = broker
        self.host_id = host_id
        self.messages: list[SpbMessage] = []
        self.exercised: set[str] = set()  # assertion ids a check actually applied to
        self._cond = threading.Condition()
        self._subscribed = threading.Event()
        self._client = paho.Client(CallbackAPIVersion.VERSION2, protocol=MQTTProtocolVersion.MQTTv5)
        self._client.on_connect = self._on_connect
        self._client.on_subscribe = lambda *args: self._subscribed.set()
        self._client.on_message = self._on_message
        self._state_ts = 0

    def start(self) -> SparkplugHost:
        """Connect, subscribe, and (primary host) publish STATE online."""
        if self.host_id is not None:
            self._client.will_set(
                f"spBv1.0/STATE/{self.host_id}", self._state(False), qos=1, retain=True
            )
        self._client.connect(self.broker.host, self.broker.port)
        self._client.loop_start()
        track_client(self._client)
        if not self._subscribed.wait(10):
            raise TimeoutError("subscription not acknowledged")
        if self.host_id is not None:
            self.set_online(True)
        return self

    def stop(self) -> None:
        """Disconnect."""
        self._client.disconnect()
        self._client.loop_stop()

    def set_online(self, online: bool) -> None:
        """Publish this primary host's STATE, retained, with a newer timestamp."""
        assert self.host_id is not None
        self._client.publish(
            f"spBv1.0/STATE/{self.host_id}", self._state(online), qos=1, retain=True
        ).wait_for_publish(5)

    def rebirth(self, node: str) -> None:
        """Send NCMD ``Node Control/Rebirth`` = true to ``node`` (GROUP/EDGE_NODE)."""
        group, edge = node.split("/")
        payload = encode(
            [MetricValue(DataType.BOOLEAN, True, name=REBIRTH)],
            timestamp_ms=int(time.time() * 1000),
            seq=None,
        )
        self._client.publish(f"spBv1.0/{group}/NCMD/{edge}", payload, qos=0).wait_for_publish(5)

    def of(self, verb: str, device: str | None = None) -> list[SpbMessage]:
        """Messages with ``verb`` (and device) so far."""
        with self._cond:
            return [
                m
                for m in self.messages
                if m.verb == verb and (device is None or m.device == device)
            ]

    def wait_for(
        self, predicate: Callable[[list[SpbMessage]], bool], timeout_s: float = 15.0
    ) -> list[SpbMessage]:
        """Wait until ``predicate(messages)`` holds."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while not predicate(self.messages):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    seen = [(m.verb, m.device, m.payload.seq) for m in self.messages[-15:]]
                    raise TimeoutError(f"condition not met in {timeout_s} s; last: {seen}")
                self._cond.wait(remaining)
            return list(self.messages)

    # -- the checks ------------------------------------------------------------------------

    def violations(self) -> list[str]:
        """Every rule the recorded messages break, as ``tck-id-...: what``."""
        problems: list[str] = []
        nodes: dict[str, _NodeState] = {}
        for message in list(self.messages):
            state = nodes.setdefault(message.node, _NodeState())
            check = _Checker(message, state, problems, self.exercised)
            check.apply()
        return problems

    # -- paho's thread ---------------------------------------------------------------------

    def _state(self, online: bool) -> bytes:
        self._state_ts = max(self._state_ts + 1, int(time.time() * 1000))
        return json.dumps({"online": online, "timestamp": self._state_ts}).encode()

    def _on_connect(self, client: paho.Client, *args: Any) -> None:
        client.subscribe("spBv1.0/#", qos=1)

    def _on_message(self, client: paho.Client, userdata: Any, message: paho.MQTTMessage) -> None:
        parts = message.topic.split("/")
        if len(parts) < 4 or parts[1] == "STATE" or parts[2] in ("NCMD", "DCMD"):
            return  # a host's own words, not the edge node's
        _, group, verb, edge, *device = parts
        decoded = SpbMessage(
            message.topic,
            verb,
            f"{group}/{edge}",
            device[0] if device else None,
            decode(message.payload),
            message.qos,
            bool(message.retain),
        )
        with self._cond:
            self.messages.append(decoded)
            self._cond.notify_all()


class _Checker:
    """The rules for one message, given what came before it from the same edge node."""

    def __init__(
        self, message: SpbMessage, state: _NodeState, problems: list[str], exercised: set[str]
    ) -> None:
        self.m = message
        self.s = state
        self._problems = problems
        self._exercised = exercised

    def expect(self, rule: str, ok: bool, what: str) -> None:
        self._exercised.add(rule)
        if not ok:
            self._problems.append(f"{rule}: {self.m.verb} {self.m.topic}: {what}")

    def apply(self) -> None:
        m, s = self.m, self.s
        if m.verb == "NCMD":
            return
        if m.verb == "NDEATH":
            self.death()
            return
        self.expect(
            "tck-id-principles-birth-certificates-order",
            m.verb == "NBIRTH" or s.born,
            "sent before the edge node's NBIRTH",
        )
        self.expect(
            f"tck-id-payloads-{m.verb.lower()}-timestamp",
            m.payload.HasField("timestamp"),
            "no payload timestamp",
        )
        self.expect(f"tck-id-payloads-{m.verb.lower()}-qos", m.qos == 0, f"QoS {m.qos}")
        self.expect(
            "tck-id-topics-nbirth-mqtt" if m.verb == "NBIRTH" else "tck-id-payloads-ddata-retain",
            not m.retain,
            "retained",
        )
        if m.verb == "NBIRTH":
            self.node_birth()
        else:
            self.in_sequence()

    def node_birth(self) -> None:
        m, s = self.m, self.s
        self.expect("tck-id-topics-nbirth-seq-num", m.payload.seq == 0, f"seq {m.payload.seq}")
        bdseq = m.metric("bdSeq")
        self.expect(
            "tck-id-topics-nbirth-bdseq-included",
            bdseq is not None and bdseq.datatype == DataType.INT64,
            "no Int64 bdSeq metric",
        )
        rebirth = m.metric(REBIRTH)
        self.expect(
            "tck-id-operational-behavior-data-commands-rebirth-name", rebirth is not None, ""
        )
        if rebirth is not None:
            self.expect(
                "tck-id-operational-behavior-data-commands-rebirth-datatype",
                rebirth.datatype == DataType.BOOLEAN,
                f"datatype {rebirth.datatype}",
            )
            self.expect(
                "tck-id-operational-behavior-data-commands-rebirth-value",
                rebirth.WhichOneof("value") == "boolean_value" and not rebirth.boolean_value,
                "not false",
            )
            self.expect(
                "tck-id-operational-behavior-data-commands-rebirth-name-aliases",
                not rebirth.HasField("alias"),
                "has an alias",
            )
        if s.births and not s.born and s.bdseq is not None and m.bdseq is not None:
            # A new MQTT session (after an NDEATH): the next bdSeq.
            self.expect(
                "tck-id-topics-nbirth-bdseq-increment",
                m.bdseq == (s.bdseq + 1) % 256,
                f"bdSeq {m.bdseq} after {s.bdseq}",
            )
        elif s.born and s.bdseq is not None:
            # A rebirth in the same MQTT session keeps its bdSeq.
            self.expect(
                "tck-id-operational-behavior-data-commands-rebirth-action-3",
                m.bdseq == s.bdseq,
                f"bdSeq {m.bdseq} in a rebirth of bdSeq {s.bdseq}",
            )
        s.births += 1
        s.born, s.seq, s.bdseq, s.data_started = True, 0, m.bdseq, False
        s.node_aliases, s.device_aliases = set(), {}
        self.declare(s.node_aliases, skip=REBIRTH)

    def declare(self, into: set[int], skip: str | None = None) -> None:
        everything = set().union(self.s.node_aliases, *self.s.device_aliases.values())
        for metric in self.m.payload.metrics:
            if metric.name == skip:
                continue
            self.expect(
                "tck-id-payloads-alias-birth-requirement",
                bool(metric.name) and metric.HasField("alias"),
                f"metric {metric.name!r} without name and alias",
            )
            self.expect(
                "tck-id-payloads-alias-uniqueness",
                metric.alias not in everything and metric.alias not in into,
                f"alias {metric.alias} of {metric.name!r} used twice",
            )
            into.add(metric.alias)

    def in_sequence(self) -> None:
        m, s = self.m, self.s
        rule = {
            "DBIRTH": "tck-id-payloads-dbirth-seq-inc",
            "DDATA": "tck-id-payloads-ddata-seq-inc",
            "NDATA": "tck-id-payloads-ndata-seq-inc",
            "DDEATH": "tck-id-payloads-ddeath-seq-inc",
        }[m.verb]
        expected = None if s.seq is None else (s.seq + 1) % 256
        self.expect(
            rule,
            m.payload.HasField("seq") and m.payload.seq == expected,
            (f"seq {m.payload.seq}, expected {expected}"),
        )
        self.expect("tck-id-payloads-sequence-num-incrementing", m.payload.seq == expected, "")
        s.seq = m.payload.seq
        if m.verb == "DBIRTH":
            self.expect("tck-id-payloads-dbirth-order", not s.data_started, "after NDATA/DDATA")
            assert m.device is not None
            aliases = s.device_aliases[m.device] = set()
            self.declare(aliases)
        elif m.verb in ("DDATA", "NDATA"):
            s.data_started = True
            known = s.node_aliases if m.verb == "NDATA" else s.device_aliases.get(m.device or "")
            if m.verb == "DDATA":
                self.expect(
                    "tck-id-payloads-ddata-order", known is not None, "no DBIRTH for the device"
                )
            for metric in m.payload.metrics:
                self.expect(
                    "tck-id-payloads-alias-data-cmd-requirement",
                    not metric.name and metric.HasField("alias"),
                    f"metric {metric.name!r} sent by name",
                )
                self.expect(
                    "tck-id-payloads-alias-uniqueness",
                    known is not None and metric.alias in known,
                    f"alias {metric.alias} was not declared in the birth",
                )
        elif m.verb == "DDEATH":
            s.device_aliases.pop(m.device or "", None)

    def death(self) -> None:
        m, s = self.m, self.s
        self.expect("tck-id-payloads-ndeath-seq", not m.payload.HasField("seq"), "has a seq")
        self.expect("tck-id-payloads-ndeath-will-message-qos", m.qos == 1, f"QoS {m.qos}")
        self.expect("tck-id-payloads-ndeath-will-message-retain", not m.retain, "retained")
        if s.born and s.bdseq is not None:
            # A will of a CONNECT that never reached its NBIRTH carries another bdSeq, which
            # hosts ignore: only the death of a born session must match.
            self.expect(
                "tck-id-payloads-ndeath-bdseq",
                m.bdseq == s.bdseq,
                f"bdSeq {m.bdseq}, the NBIRTH said {s.bdseq}",
            )
        s.born = False
        s.seq = None
