"""The threads that own a paho client's socket: each turn waits, reads every packet that came,
lets the work those packets made run, and writes everything that became due.

paho's own ``loop_start`` thread writes a packet queued by another thread (a result from a
pipeline's worker, an acknowledgement) only in a later turn, after a wake-up byte, and one
queued from inside a callback in the turn after that: measured, 4 turns per reading for the
daemon against a hand-written loop's 2. Here, through paho's external-loop interface
(``socket``, ``loop_read``, ``loop_write``, ``loop_misc``, ``want_write``), packets queued
during a turn (the callbacks', and the ``after_read`` hooks': readings run in this thread)
leave at its end, and a packet queued by another thread wakes the loop once per burst.

Two threads take turns driving the client: the driver runs the turns; the other stands by.
When an ``after_read`` hook (a model run) holds the driver longer than ``RESCUE_AFTER_S``,
the standby thread becomes the driver, so keepalive, the other pipelines and the writes go
on; the old driver finishes its hook and stands by in turn. Only the driver calls paho's
``loop_*`` methods. paho itself writes from whichever thread queues a packet when no
external loop is registered, and two threads writing one TCP stream could interleave partial
packets, so ``on_socket_register_write`` is set (to nothing) to stop that, and
``LoopClient`` wakes the driver instead.

Reconnecting with backoff (``reconnect_delay_set``'s bounds) and keepalive
(``loop_misc`` each second) are done here as paho's ``loop_forever`` does them.
"""

from __future__ import annotations

import contextlib
import select
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as paho
import structlog
from paho.mqtt.enums import MQTTErrorCode

from agent.transport import paho_fast
from agent.transport.packet_guard import BoundedClient

log = structlog.get_logger(__name__)

MISC_EVERY_S = 1.0  # keepalive pings and timeouts (paho's loop_forever checks as often)
RESCUE_AFTER_S = 0.2  # an after_read hook running longer hands the loop to the standby
STANDBY_POLL_S = RESCUE_AFTER_S  # how often the standby looks: a wake-up each costs CPU


class LoopClient(BoundedClient):
    """A ``BoundedClient`` whose queued packets wake the ``NetworkLoop`` that owns it, and
    that skips paho's per-packet debug lines unless they would be logged."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.waker: Callable[[], None] | None = None  # set by the NetworkLoop
        self._acked_callback: Any = None
        paho_fast.install()
        self._debug = paho_fast.debug_enabled()

    def _packet_queue(
        self,
        command: int,
        packet: bytes | bytearray,
        mid: int,
        qos: int,
        info: paho.MQTTMessageInfo | None = None,
    ) -> MQTTErrorCode:
        rc = super()._packet_queue(command, packet, mid, qos, info)
        waker = self.waker
        if waker is not None:
            waker()
        return rc

    # paho calls on_publish for every QoS 0 message it writes, with a ReasonCode and a
    # Properties object built for the call: a tenth of the loop's time at 100 QoS 0
    # results/s. The connection needs it only for QoS 1/2 acknowledgements, so paho is shown
    # no on_publish (its QoS 0 path then builds nothing), and the callback is called from
    # ``_do_on_publish``, paho's handling of a PUBACK or PUBCOMP, after paho's bookkeeping.
    @property
    def on_publish(self) -> None:
        return None

    @on_publish.setter
    def on_publish(self, func: Any) -> None:
        self._acked_callback = func

    def _do_on_publish(self, mid: int, reason_code: Any, properties: Any) -> MQTTErrorCode:
        rc = super()._do_on_publish(mid, reason_code, properties)
        callback = self._acked_callback
        if callback is not None:
            callback(self, self._userdata, mid, reason_code, properties)
        return rc

    def _easy_log(self, level: Any, fmt: str, *args: Any) -> None:
        if level == paho.MQTT_LOG_DEBUG and not self._debug:
            return
        super()._easy_log(level, fmt, *args)


class NetworkLoop:
    """Drives one ``LoopClient`` on two threads of its own until ``stop``.

    ``after_read`` hooks run on the driving thread after each read, before the turn's writes
    (the pipelines that run their readings there); set it whole (a tuple), from any thread.
    ``on_connect_fail`` is told of each failed connect attempt, on the driving thread.
    """

    def __init__(
        self,
        client: LoopClient,
        name: str,
        *,
        reconnect_min_s: float,
        reconnect_max_s: float,
        on_connect_fail: Callable[[], None],
    ) -> None:
        self._client = client
        self._reconnect_min_s = reconnect_min_s
        self._reconnect_max_s = reconnect_max_s
        self._on_connect_fail = on_connect_fail
        self._delay_s = reconnect_min_s
        self.after_read: tuple[Callable[[], None], ...] = ()
        self.turns = 0  # select calls so far (the driver writes, anyone reads)
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._wake_pending = False  # a wake-up byte is on its way (any thread writes)
        self._stopping = threading.Event()
        # The handover: which thread drives, and since when the driver runs the hooks.
        self._handover = threading.Lock()
        self._driver: int | None = None  # thread ident
        self._hooks_since: float | None = None
        self._threads = [
            threading.Thread(target=self._serve, name=f"mqtt-{name}", daemon=True),
            threading.Thread(target=self._serve, name=f"mqtt-{name}-standby", daemon=True),
        ]
        # paho writes directly from the queuing thread unless an external loop is
        # registered: the driver writes, so the callback only has to exist.
        client.on_socket_register_write = _nothing
        client.waker = self.wake

    def add_after_read(self, hook: Callable[[], None]) -> None:
        """Call ``hook()`` on the driving thread after each read, before the turn's writes
        (a pipeline that runs its readings there). Main thread."""
        self.after_read = (*self.after_read, hook)

    def remove_after_read(self, hook: Callable[[], None]) -> None:
        """Stop calling ``hook`` (main thread)."""
        self.after_read = tuple(h for h in self.after_read if h != hook)

    @property
    def alive(self) -> bool:
        """Whether the loop's threads run."""
        return all(thread.is_alive() for thread in self._threads)

    def start(self) -> None:
        """Start the threads; the first drives and connects (``connect_async`` must have
        been called)."""
        self._driver = None
        for thread in self._threads:
            thread.start()

    def stop(self, timeout_s: float) -> None:
        """Stop after the client's DISCONNECT (if one is queued) has been written, or
        ``timeout_s``; then close the wake-up pair."""
        self._stopping.set()
        self.wake()
        deadline = time.monotonic() + timeout_s
        for thread in self._threads:
            thread.join(timeout=max(0.0, deadline - time.monotonic()))
        if not any(thread.is_alive() for thread in self._threads):
            self._wake_r.close()
            self._wake_w.close()

    def connected(self) -> None:
        """A CONNACK accepted the connection: the next reconnect waits the least again
        (called on the driving thread, inside its read)."""
        self._delay_s = self._reconnect_min_s

    def wake(self) -> None:
        """Make the driver turn now (any thread). On the driving thread there is nothing to
        do: it writes at the end of the turn. Elsewhere one byte per burst: the flag stays
        set until the driver's next turn begins, before it looks at what to write."""
        if self._wake_pending or threading.get_ident() == self._driver:
            return
        # Two threads may both get here: two bytes, one extra turn. No lock needed.
        self._wake_pending = True
        # Closed at stop, or full: the loop is awake either way.
        with contextlib.suppress(OSError):
            self._wake_w.send(b"\0")

    # -- the loop's threads ---------------------------------------------------------------------

    def _serve(self) -> None:
        me = threading.get_ident()
        with self._handover:
            if self._driver is None:
                self._driver = me
        while not self._stopping.is_set() or self._client.socket() is not None:
            if self._driver == me:
                self._drive(me)
            elif not self._stand_by(me):
                return

    def _stand_by(self, me: int) -> bool:
        """Wait; take over when the driver's hooks run too long. False once stopped."""
        while not self._stopping.wait(STANDBY_POLL_S):
            with self._handover:
                since = self._hooks_since
                if since is not None and time.monotonic() - since > RESCUE_AFTER_S:
                    self._driver = me
                    self._hooks_since = None
                    log.info("mqtt_loop_handed_over", held_s=round(time.monotonic() - since, 3))
                    return True
        return False

    def _drive(self, me: int) -> None:
        client = self._client
        next_misc = time.monotonic() + MISC_EVERY_S
        while self._driver == me:
            if self._stopping.is_set() and client.socket() is None:
                return
            if client.socket() is None:
                if self._connect():
                    next_misc = time.monotonic() + MISC_EVERY_S
                continue
            try:
                next_misc = self._turn(me, next_misc)
            except Exception:  # one bad turn must not end the connection's thread
                log.exception("mqtt_loop_turn_failed")
                self._stopping.wait(0.1)
            if client.socket() is None and not self._stopping.is_set() and self._driver == me:
                # Lost (paho has called on_disconnect): wait before reconnecting, as paho's
                # own loop does.
                self._back_off()

    def _connect(self) -> bool:
        """One connect attempt (paho's ``reconnect``: on_pre_connect, TCP, CONNECT)."""
        try:
            self._client.reconnect()
        except (OSError, ValueError) as exc:
            log.debug("mqtt_reconnect_failed", error=str(exc))
            self._on_connect_fail()
            self._back_off()
            return False
        return True

    def _back_off(self) -> None:
        """Wait the current delay (a stop ends it), then double it up to the bound; a
        CONNACK sets it back (``connected``)."""
        self._stopping.wait(self._delay_s)
        self._delay_s = min(self._delay_s * 2, self._reconnect_max_s)

    def _turn(self, me: int, next_misc: float) -> float:
        """Wait for the network, a wake-up or the next keepalive check; read; run the
        ``after_read`` hooks; write what is queued. Returns when the next keepalive check is
        due. A driver whose hooks were taken over returns without writing: it no longer
        drives."""
        client = self._client
        # Cleared before the wait: a wake-up from now on writes its byte, which ends it.
        self._wake_pending = False
        sock = client.socket()
        if sock is None:
            return next_misc
        pending = sock.pending() if hasattr(sock, "pending") else 0  # bytes TLS holds
        timeout = 0.0 if pending else max(0.0, next_misc - time.monotonic())
        writes = [sock] if client.want_write() else []
        self.turns += 1
        try:
            readable, writable, _ = select.select([sock, self._wake_r], writes, [], timeout)
        except (OSError, ValueError, TypeError):  # the socket went meanwhile
            return next_misc
        if self._wake_r in readable:
            _drain(self._wake_r)
        if sock in readable or pending:
            client.loop_read()
        hooks = self.after_read
        if hooks:
            self._hooks_since = time.monotonic()
            for hook in hooks:
                hook()
            with self._handover:
                self._hooks_since = None
                if self._driver != me:
                    return next_misc  # taken over meanwhile: the new driver writes
        if client.want_write() or sock in writable:
            client.loop_write()
        now = time.monotonic()
        if now >= next_misc:
            client.loop_misc()
            next_misc = now + MISC_EVERY_S
        return next_misc


def _drain(wake: socket.socket) -> None:
    with contextlib.suppress(OSError):  # BlockingIOError: drained
        while wake.recv(4096):
            pass


def _nothing(client: paho.Client, userdata: Any, sock: Any) -> None:
    """``on_socket_register_write``: the driver writes what is queued at each turn's end."""
