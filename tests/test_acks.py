"""Acknowledgement bookkeeping and message routing on their own, without a broker.

``PublishAcks`` (the broker acknowledging what we publish), ``ManualAcks`` (us
acknowledging what it delivers, after the result), ``Subscriptions`` (routing) and
``Inbound`` (the receiving path), driven the way paho's callbacks drive them.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from unittest import mock

import paho.mqtt.client as paho
import pytest
import structlog
from paho.mqtt.enums import CallbackAPIVersion

from agent.transport.acks import ManualAcks, PublishAcks
from agent.transport.inbound import Inbound
from agent.transport.packet_guard import BoundedClient
from agent.transport.session_memory import SessionMemory
from agent.transport.subscriptions import ROUTE_CACHE_SIZE, Subscription, Subscriptions

LOG = structlog.get_logger("agent.test")


def message(mid: int, qos: int = 1, topic: str = "sensors/a") -> paho.MQTTMessage:
    """A delivered message as paho hands it to on_message."""
    delivered = paho.MQTTMessage(mid=mid, topic=topic.encode())
    delivered.qos = qos
    return delivered


def recorder(calls: list[int], value: int) -> Callable[[], None]:
    """A callback that appends ``value`` to ``calls``."""
    return lambda: calls.append(value)


# -- PublishAcks: the broker acknowledging what we publish -------------------------------------


def test_acks_in_order_run_each_callback_once() -> None:
    """Each PUBACK hands back its own message's callback; unacked counts down to zero."""
    acks = PublishAcks()
    calls: list[int] = []
    for mid in (1, 2, 3):
        acks.track(paho.MQTT_ERR_SUCCESS, mid, 1, recorder(calls, mid))
    assert acks.unacked == 3
    for mid in (1, 2, 3):
        registered, callback = acks.acknowledged(mid)
        assert registered
        assert callback is not None
        callback()
    assert calls == [1, 2, 3]
    assert acks.unacked == 0


def test_acks_out_of_order_reach_the_right_callbacks() -> None:
    """QoS 1 acknowledgements may come in any order: each finds its own callback."""
    acks = PublishAcks()
    calls: list[int] = []
    for mid in (10, 11, 12):
        acks.track(paho.MQTT_ERR_SUCCESS, mid, 1, recorder(calls, mid))
    for mid in (12, 10, 11):
        _, callback = acks.acknowledged(mid)
        assert callback is not None
        callback()
        assert calls[-1] == mid
    assert acks.unacked == 0


def test_a_duplicate_ack_does_not_run_the_callback_again() -> None:
    """A second acknowledgement of one mid is not a registered message any more."""
    acks = PublishAcks()
    calls: list[int] = []
    acks.track(paho.MQTT_ERR_SUCCESS, 4, 1, recorder(calls, 4))
    assert acks.acknowledged(4)[0]
    assert acks.acknowledged(4) == (False, None)
    assert acks.unacked == 0
    assert calls == []  # the caller runs what acknowledged() hands back, nothing else does


def test_an_ack_that_overtakes_its_registration_runs_the_callback_on_register() -> None:
    """paho's thread may report a message before publish() has registered it: the callback
    then runs at registration, on the publishing thread, and nothing stays in flight."""
    acks = PublishAcks()
    calls: list[int] = []
    assert acks.acknowledged(7) == (False, None)
    acks.track(paho.MQTT_ERR_SUCCESS, 7, 1, recorder(calls, 7))
    assert calls == [7]
    assert acks.unacked == 0
    acks.track(paho.MQTT_ERR_SUCCESS, 7, 1, recorder(calls, 70))  # the early ack was used up
    assert calls == [7]
    assert acks.unacked == 1


def test_qos0_messages_are_done_when_paho_takes_them_and_never_unacked() -> None:
    """QoS 0 goes no further than paho: its callback runs when paho took it (not when paho
    refused it), and it is never in flight; QoS 1 ones stay in flight across a disconnect
    for paho to send again."""
    acks = PublishAcks()
    calls: list[int] = []
    acks.track(paho.MQTT_ERR_SUCCESS, 1, 0, recorder(calls, 1))
    acks.track(paho.MQTT_ERR_NO_CONN, 5, 0, recorder(calls, 5))
    acks.track(paho.MQTT_ERR_NO_CONN, 2, 1, recorder(calls, 2))
    assert calls == [1]
    assert acks.unacked == 1
    acks.disconnected()
    assert acks.unacked == 1
    registered, callback = acks.acknowledged(2)  # after the reconnect
    assert registered
    assert callback is not None
    callback()
    assert calls == [1, 2]
    assert acks.unacked == 0


def test_a_disconnect_forgets_early_acks() -> None:
    """An early acknowledgement from a lost connection does not complete a message that
    reuses its mid on the next connection."""
    acks = PublishAcks()
    calls: list[int] = []
    acks.acknowledged(9)
    acks.disconnected()
    acks.track(paho.MQTT_ERR_SUCCESS, 9, 1, recorder(calls, 9))
    assert calls == []
    assert acks.unacked == 1


# -- ManualAcks: us acknowledging what the broker delivers -------------------------------------


class Link:
    """Records what ManualAcks sends, and plays the connection's up and down."""

    def __init__(self, enabled: bool = True) -> None:
        self.sent: list[tuple[int, int]] = []
        self.up = threading.Event()
        self.acks = ManualAcks(enabled, self.send, self.up.is_set)
        self.connect()

    def send(self, mid: int, qos: int) -> None:
        self.sent.append((mid, qos))

    def connect(self) -> None:
        """What on_connect does: a new generation, then connected."""
        self.acks.connected()
        self.up.set()

    def drop(self) -> None:
        self.up.clear()


def test_tokens_acknowledge_when_called_in_any_order() -> None:
    """Ack after result: nothing is sent on arrival, each token sends its own message's
    acknowledgement when its work is done, whatever the order."""
    link = Link()
    tokens = [link.acks.token(message(mid, qos)) for mid, qos in ((1, 1), (2, 2), (3, 1))]
    assert link.sent == []
    for index in (2, 0, 1):
        token = tokens[index]
        assert token is not None
        token()
    assert link.sent == [(3, 1), (1, 1), (2, 2)]


def test_no_token_for_qos0_or_without_manual_acks() -> None:
    """QoS 0 has nothing to acknowledge; without manual acks paho acknowledges on arrival."""
    assert Link().acks.token(message(1, qos=0)) is None
    off = Link(enabled=False)
    assert off.acks.token(message(1)) is None
    off.acks.handled(message(1), acknowledged_by_handler=False)
    off.acks.discarded(message(2))
    assert off.sent == []


def test_a_token_from_an_earlier_connection_sends_nothing() -> None:
    """After a reconnect the broker redelivers what was not acknowledged: the old token
    stays silent (the ack would name a mid of a session state that is gone), and the
    redelivered copy's token acknowledges it."""
    link = Link()
    old = link.acks.token(message(5))
    generation = link.acks.generation
    link.drop()
    link.connect()
    assert link.acks.generation == generation + 1
    assert old is not None
    old()
    assert link.sent == []
    again = link.acks.token(message(5))
    assert again is not None
    again()
    assert link.sent == [(5, 1)]


def test_a_token_called_while_disconnected_sends_nothing() -> None:
    """While the connection is down no acknowledgement is sent; the message comes again."""
    link = Link()
    token = link.acks.token(message(6))
    link.drop()
    assert token is not None
    token()
    assert link.sent == []


def test_handled_acknowledges_unless_a_handler_does() -> None:
    """Messages no handler acknowledges itself are acknowledged as soon as the handlers
    returned; QoS 0 ones never."""
    link = Link()
    link.acks.handled(message(1), acknowledged_by_handler=False)
    link.acks.handled(message(2), acknowledged_by_handler=True)
    link.acks.handled(message(3, qos=0), acknowledged_by_handler=False)
    link.acks.discarded(message(4, qos=2))
    assert link.sent == [(1, 1), (4, 2)]


def test_a_failing_send_on_paho_thread_is_swallowed() -> None:
    """On paho's thread an exception would kill the network thread: it is suppressed."""

    def broken(mid: int, qos: int) -> None:
        raise RuntimeError("socket gone")

    acks = ManualAcks(True, broken, lambda: True)
    acks.handled(message(1), acknowledged_by_handler=False)
    acks.discarded(message(2))


# -- Subscriptions: routing --------------------------------------------------------------------


def subscriptions(
    client: paho.Client | None = None, memory: SessionMemory | None = None
) -> tuple[Subscriptions, threading.Event]:
    """A subscription table on a client that is never connected, and its connected event."""
    connected = threading.Event()
    table = Subscriptions(
        client or paho.Client(CallbackAPIVersion.VERSION2, client_id="test"),
        connected=connected,
        v5=True,
        session_memory=memory,
        log=LOG,
    )
    return table, connected


def handler_to(received: list[str], name: str) -> Callable[[paho.MQTTMessage], None]:
    """A message handler that records its name."""
    return lambda _message: received.append(name)


def test_routes_follow_filters_wildcards_and_changes() -> None:
    """A topic reaches every matching filter's handler; the cached route follows adds and
    removals; an unmatched topic reaches nobody."""
    table, _ = subscriptions()
    got: list[str] = []
    table.add(Subscription("sensors/+", 1, handler_to(got, "plus")))
    table.add(Subscription("sensors/#", 1, handler_to(got, "hash"), acknowledges=True))
    handlers, acknowledged = table.route("sensors/a")
    for handler in handlers:
        handler(message(1))
    assert sorted(got) == ["hash", "plus"]
    assert acknowledged
    assert table.route("other/a") == ((), False)
    table.remove("sensors/#")
    handlers, acknowledged = table.route("sensors/a")
    assert len(handlers) == 1
    assert not acknowledged
    table.remove("sensors/#")  # gone already: nothing happens
    table.add(Subscription("other/#", 0, handler_to(got, "other")))
    assert len(table.route("other/a")[0]) == 1


def test_shared_subscriptions_route_by_their_topic_filter() -> None:
    """``$share/GROUP/filter`` is what the broker gets; messages arrive on plain topics."""
    table, _ = subscriptions()
    shared = Subscription("jobs/#", 1, handler_to([], "s"), shared_group="workers")
    assert shared.subscribe_filter == "$share/workers/jobs/#"
    table.add(shared)
    assert len(table.route("jobs/1")[0]) == 1
    assert table.matching("jobs/1") == [shared]
    table.remove("jobs/#")  # not its subscribe_filter
    assert table.matching("jobs/1") == [shared]
    table.remove("$share/workers/jobs/#")
    assert table.matching("jobs/1") == []


def test_routing_stays_right_past_the_route_cache_size() -> None:
    """More distinct topics than the cache holds: routes are still found."""
    table, _ = subscriptions()
    table.add(Subscription("s/+", 1, handler_to([], "s")))
    for index in range(ROUTE_CACHE_SIZE + 10):
        assert len(table.route(f"s/{index}")[0]) == 1
    assert len(table.route("s/0")[0]) == 1


def test_remove_all_leaves_nothing_to_route() -> None:
    """After unsubscribe_all (here while disconnected) no topic reaches a handler."""
    table, _ = subscriptions()
    table.add(Subscription("s/#", 1, handler_to([], "s")))
    assert table.route("s/1")[0]
    table.remove_all(wait_s=0)
    assert table.route("s/1") == ((), False)


def test_subscribed_waits_for_connect_and_suback() -> None:
    """wait_acked: with no filters, being connected is enough; with filters, the SUBACK of
    this connection; a disconnect starts over."""
    client = mock.Mock(spec=paho.Client)
    client.subscribe.return_value = (paho.MQTT_ERR_SUCCESS, 1)
    table, connected = subscriptions(client)
    assert not table.wait_acked(0)
    connected.set()
    assert table.wait_acked(0)
    table.add(Subscription("s/#", 1, handler_to([], "s")))  # connected: subscribes at once
    assert client.subscribe.call_count == 1
    table.resubscribe()
    assert not table.wait_acked(0)
    table.on_subscribe(client, None, 1, [], None)
    assert table.wait_acked(0)
    table.lost()
    assert not table.wait_acked(0)


def test_resubscribe_drops_filters_left_from_an_earlier_config(tmp_path: Path) -> None:
    """A persistent session still holding a filter the config no longer has: the first
    connect unsubscribes it, then subscribes what is wanted."""
    path = tmp_path / "session.json"
    path.write_text('{"filters": ["old/#", "s/#"]}', encoding="utf-8")
    client = mock.Mock(spec=paho.Client)
    client.subscribe.return_value = (paho.MQTT_ERR_SUCCESS, 1)
    table, _ = subscriptions(client, SessionMemory(path))
    table.add(Subscription("s/#", 1, handler_to([], "s")))  # disconnected: only remembered
    client.subscribe.assert_not_called()
    table.resubscribe()
    client.unsubscribe.assert_called_once_with(["old/#"])
    client.subscribe.assert_called_once()
    assert '"s/#"' in path.read_text(encoding="utf-8")


# -- Inbound: route, then settle ---------------------------------------------------------------


@pytest.fixture
def inbound() -> tuple[Inbound, BoundedClient, Subscriptions, Link]:
    """An Inbound on a never-connected client with manual acknowledgement."""
    client = BoundedClient(
        CallbackAPIVersion.VERSION2, client_id="test", manual_ack=True, max_packet_bytes=1000
    )
    table, _ = subscriptions(client)
    link = Link()
    return Inbound(client, table, link.acks, LOG), client, table, link


def test_inbound_acknowledges_after_handlers_unless_they_do(
    inbound: tuple[Inbound, BoundedClient, Subscriptions, Link],
) -> None:
    """A handler that keeps the delivery promise acknowledges itself; for the others the
    message is acknowledged when they return, even when one raised."""
    receiver, client, table, link = inbound
    got: list[str] = []

    def broken(_message: paho.MQTTMessage) -> None:
        raise ValueError("bad reading")

    table.add(Subscription("own/#", 1, handler_to(got, "own"), acknowledges=True))
    table.add(Subscription("plain/#", 1, broken))
    receiver.on_message(client, None, message(1, topic="own/a"))
    receiver.on_message(client, None, message(2, topic="plain/a"))
    receiver.on_message(client, None, message(3, topic="nobody/a"))
    assert got == ["own"]
    assert link.sent == [(2, 1), (3, 1)]


def test_inbound_reports_and_acknowledges_a_message_too_large(
    inbound: tuple[Inbound, BoundedClient, Subscriptions, Link],
) -> None:
    """An oversized message (its payload dropped unread) is not routed: the matching
    subscriptions are told, and it is acknowledged so it does not come again."""
    receiver, client, table, link = inbound
    routed: list[str] = []
    told: list[tuple[str, int]] = []
    table.add(
        Subscription(
            "big/#",
            1,
            handler_to(routed, "big"),
            acknowledges=True,
            on_too_large=lambda topic, size: told.append((topic, size)),
        )
    )
    client.too_large = ("big/a", 5000)
    receiver.on_message(client, None, message(8, topic="big/a"))
    assert routed == []
    assert told == [("big/a", 5000)]
    assert link.sent == [(8, 1)]
