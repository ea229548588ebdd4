"""Where results go: straight to the broker, or into the outbox until it can take them.

At-least-once: a result is published directly while its broker is connected and the outbox
is empty, and its reading is acknowledged when the broker acknowledges the result; otherwise
it is appended to the outbox and its reading is acknowledged after the commit. Once the
outbox holds anything, new results queue behind it, so a pipeline's results reach the broker
in ``seq`` order. The flusher thread sends the outbox in order after a reconnect, at most
``outbox.flush_rate`` a second and ``mqtt.max_inflight`` at a time, then switches back to
direct publishing.

At-most-once: every result is handed to paho at once (paho queues QoS 1 while disconnected;
a crash loses them), as a hand-written loop would.

Threads: ``submit`` runs on the pipelines' workers; ``_flush`` on the flusher thread;
acknowledgement callbacks on paho's network thread (they take only ``_acked_lock``, never a
lock held while calling paho: paho runs them under its own message lock).
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable

import structlog
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.transport.mqtt import MqttConnection
from agent.transport.outbox import Outbox, OutboxRow, explain
from agent.transport.results import PendingResult

log = structlog.get_logger(__name__)

Done = Callable[[], None]
FLUSH_BATCH = 200
EXPIRE_EVERY_S = 10.0
IDLE_WAIT_S = 0.2
STORE_LOG_EVERY_S = 60.0  # a failing outbox is logged when it starts, then this often


class Delivery:
    """Hands results to the broker connection or the outbox, in order."""

    def __init__(
        self,
        connection: Callable[[], MqttConnection],
        outbox: Outbox | None,
        *,
        flush_rate: float,
        window: int,
    ) -> None:
        """``connection()`` returns the connection results go to now (it is replaced when
        the broker settings change); ``outbox`` None means at-most-once."""
        self._connection = connection
        self._outbox = outbox
        self.flush_rate = flush_rate  # results/s from the outbox; the main thread may change it
        self._window = window
        self._lock = threading.Lock()  # orders submit against the switch back to direct
        self._backlog = outbox is not None and len(outbox) > 0
        self._cursor = 0  # flusher: highest outbox id handed to paho
        self._flushed_on: MqttConnection | None = None
        self._ready_generation = -1  # flusher: connection generation cleared for flushing
        self._acked_lock = threading.Lock()
        self._in_flight: set[int] = set()  # outbox ids sent, awaiting the broker's ack
        self._acked: list[int] = []  # outbox ids acknowledged, to delete
        self._wake = threading.Event()
        self._stopped = threading.Event()
        self.published_from_outbox = 0
        # Outbox appends that failed (workers write, under _lock; health reads).
        self.store_errors = 0
        self._store_failing = False
        self._store_failure_logged = 0.0
        self._thread = threading.Thread(target=self._run, name="outbox-flusher", daemon=True)

    @property
    def backlog(self) -> bool:
        """Whether results currently queue in the outbox."""
        return self._backlog

    def start(self) -> None:
        """Start the flusher (at-least-once only)."""
        if self._outbox is not None:
            self._thread.start()

    def stop(self, timeout_s: float = 1.0) -> None:
        """Stop the flusher; what is still in the outbox stays there for the next start."""
        self._stopped.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout=timeout_s)
        self._delete_acked()

    # -- the pipelines' workers ----------------------------------------------------------------

    def submit(self, result: PendingResult, done: Done | None) -> None:
        """Publish ``result`` or store it; ``done()`` once it is handed off (see module)."""
        outbox = self._outbox
        if outbox is None:
            connection = self._connection()
            connection.publish(
                result.topic,
                result.payload,
                qos=result.qos,
                properties=_properties(result.correlation),
            )
            if done is not None:
                done()
            return
        with self._lock:
            connection = self._connection()
            if not self._backlog and connection.connected.is_set():
                # Under the lock so that the flusher cannot switch modes in between; paho's
                # publish never waits for the network.
                _publish_acked(connection, result, done)
                stored = False
            else:
                stored = self._store(outbox, connection, result, done)
        if done is not None and (stored or result.qos == 0):
            done()
        if stored:
            self._wake.set()

    def _store(
        self,
        outbox: Outbox,
        connection: MqttConnection,
        result: PendingResult,
        done: Done | None,
    ) -> bool:
        """Append ``result`` to the outbox (under ``_lock``); True when stored. When the
        outbox cannot be written (a full disk, a read-only remount, an I/O error) the result
        is handed to paho instead, which keeps QoS 1 messages in memory until the broker
        takes them: its reading is acknowledged only then, so a crash meanwhile makes the
        broker deliver the reading again. Unacknowledged readings are bounded by
        ``mqtt.receive_maximum``, so memory stays bounded too."""
        try:
            outbox.append([result])
        except sqlite3.Error as exc:
            self.store_errors += 1
            now = time.monotonic()
            if not self._store_failing or now - self._store_failure_logged >= STORE_LOG_EVERY_S:
                self._store_failure_logged = now
                log.error(
                    "outbox_write_failed",
                    error=explain(exc, outbox.path),
                    failures=self.store_errors,
                    action="results wait in memory for the broker; their readings are "
                    "acknowledged only once the broker has them",
                )
            self._store_failing = True
            _publish_acked(connection, result, done)
            return False
        if self._store_failing:
            self._store_failing = False
            log.info("outbox_write_recovered", failures=self.store_errors)
        self._backlog = True
        return True

    # -- the flusher thread --------------------------------------------------------------------

    def _run(self) -> None:
        assert self._outbox is not None
        next_expiry = time.monotonic() + EXPIRE_EVERY_S
        failure_logged = -STORE_LOG_EVERY_S
        while not self._stopped.is_set():
            self._wake.wait(IDLE_WAIT_S)
            self._wake.clear()
            try:
                self._delete_acked()
                if time.monotonic() >= next_expiry:
                    self._outbox.expire()
                    next_expiry = time.monotonic() + EXPIRE_EVERY_S
                if self._backlog:
                    self._flush(self._outbox)
            except Exception:  # the flusher must keep running whatever one round does
                # A full disk fails every round: say so when it starts, then once a minute.
                now = time.monotonic()
                if now - failure_logged >= STORE_LOG_EVERY_S:
                    failure_logged = now
                    log.exception("outbox_flush_failed")

    def _flush(self, outbox: Outbox) -> None:
        connection = self._connection()
        if connection is not self._flushed_on:
            # A new connection (config reload): what the old one had in flight is lost with
            # it, so everything still stored is sent again.
            self._flushed_on, self._cursor, self._ready_generation = connection, 0, -1
            outbox.forget_handed()
            with self._acked_lock:
                self._in_flight.clear()
        if not connection.connected.is_set():
            return
        if connection.generation != self._ready_generation:
            # Just reconnected: results paho kept from before the outage go out first, so
            # wait until the broker acknowledged them, then send the outbox after them.
            if connection.unacked:
                self._wake.set()
                time.sleep(0.01)
                return
            self._ready_generation = connection.generation
        interval = 1.0 / self.flush_rate
        sent_at = time.monotonic()
        while not self._stopped.is_set() and connection.connected.is_set():
            with self._acked_lock:
                room = self._window - len(self._in_flight)
            if room <= 0:
                time.sleep(0.002)
                self._delete_acked()
                continue
            rows = outbox.take(self._cursor, min(room, FLUSH_BATCH))
            if not rows:
                with self._lock:
                    if not outbox.after(self._cursor, 1):
                        self._backlog = False
                        log.info("outbox_drained", published=self.published_from_outbox)
                        return
                continue
            for row in rows:
                sent_at = max(sent_at + interval, time.monotonic())
                delay = sent_at - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                self._send(connection, row)
            self._delete_acked()

    def _send(self, connection: MqttConnection, row: OutboxRow) -> None:
        with self._acked_lock:
            self._in_flight.add(row.id)

        # Runs on paho's network thread (or here, for QoS 0).
        def acked(row_id: int = row.id) -> None:
            with self._acked_lock:
                self._in_flight.discard(row_id)
                self._acked.append(row_id)

        connection.publish(
            row.topic,
            row.payload,
            qos=row.qos,
            properties=_properties(row.correlation),
            on_acked=acked,
        )
        self._cursor = row.id
        self.published_from_outbox += 1

    def _delete_acked(self) -> None:
        with self._acked_lock:
            ids, self._acked = self._acked, []
        if ids and self._outbox is not None:
            self._outbox.delete(ids)


def _publish_acked(connection: MqttConnection, result: PendingResult, done: Done | None) -> None:
    """Hand ``result`` to paho; ``done()`` once the broker acknowledged it (QoS 1/2; for
    QoS 0 the caller calls it)."""
    connection.publish(
        result.topic,
        result.payload,
        qos=result.qos,
        properties=_properties(result.correlation),
        on_acked=done if result.qos > 0 else None,
    )


def _properties(correlation: bytes | None) -> Properties | None:
    """MQTT 5 properties of a response: its correlation data."""
    if correlation is None:
        return None
    properties = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    properties.CorrelationData = correlation
    return properties
