"""Retained state topics (``P/models/NAME``, later ``P/health``) that never go stale.

paho sends messages queued before a connection after ones published during the CONNECT
handshake, so a retained ``LOADING`` could overtake the ``FAILED`` that followed it, and a
broker restarted without persistence forgets retained messages altogether. Hence one thread
owns publishing these topics: it sends the latest payload of each changed topic at QoS 0
while connected (QoS 0 is never queued by paho, so never re-ordered), and all of them again
after every connect.
"""

from __future__ import annotations

import threading

import structlog

from agent.transport.mqtt import MqttConnection

log = structlog.get_logger(__name__)


class RetainedPublisher:
    """Latest-value retained topics, published in order by one thread."""

    def __init__(self, connection: MqttConnection) -> None:
        self._connection = connection
        self._cond = threading.Condition()
        self._latest: dict[str, bytes] = {}
        self._dirty: dict[str, None] = {}  # ordered set of topics to (re)send
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="retained-publisher", daemon=True)
        connection.add_connect_listener(self.republish_all)

    def start(self) -> None:
        """Start the publishing thread."""
        self._thread.start()

    def set(self, topic: str, payload: bytes) -> None:
        """Make ``payload`` the retained value of ``topic`` (any thread)."""
        with self._cond:
            self._latest[topic] = payload
            self._dirty[topic] = None
            self._cond.notify()

    def republish_all(self) -> None:
        """Send every topic again (called on paho's thread after each connect; never blocks)."""
        with self._cond:
            self._dirty.update(dict.fromkeys(self._latest))
            self._cond.notify()

    def stop(self) -> None:
        """Send what is pending, then stop the thread."""
        with self._cond:
            self._stopped = True
            self._cond.notify()
        self._thread.join(timeout=2.0)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._stopped and not (
                    self._dirty and self._connection.connected.is_set()
                ):
                    self._cond.wait(timeout=1.0)
                if self._stopped and not (self._dirty and self._connection.connected.is_set()):
                    return
                batch = [(topic, self._latest[topic]) for topic in self._dirty]
                self._dirty.clear()
            for topic, payload in batch:
                try:
                    self._connection.publish(topic, payload, qos=0, retain=True)
                except Exception:  # keep the thread alive whatever paho raises
                    log.exception("retained_publish_failed", topic=topic)
