"""A pure-Python MQTT 3.1.1 broker (amqtt) in a thread of the demo's process.

For `make demo` on a machine without Mosquitto only: the daemon itself is tested against
Mosquitto and talks to real brokers. amqtt speaks MQTT 3.1.1, so the demo sets the daemon's
``mqtt.protocol`` to "3.1.1" when it uses this broker. It keeps everything in memory: its
retained messages and sessions end with the demo.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import threading
from pathlib import Path
from typing import Any

START_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 5.0


def available() -> bool:
    """Whether amqtt is installed (the ``demo`` extra brings it)."""
    try:
        importlib.import_module("amqtt.broker")
    except ImportError:
        return False
    return True


class EmbeddedBroker:
    """amqtt listening on ``host:port``, run by an asyncio loop in a daemon thread."""

    def __init__(self, host: str, port: int, log_file: Path) -> None:
        """``log_file``: where amqtt's own log goes (it would otherwise print its warnings,
        such as a client that disconnected without DISCONNECT, between the demo's results)."""
        self.host = host
        self.port = port
        self.log_file = log_file
        self._loop: asyncio.AbstractEventLoop | None = None
        self._broker: Any = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="embedded-broker", daemon=True)

    def start(self) -> None:
        """Start listening; raises what amqtt raised (e.g. the port is taken)."""
        self._send_logs_to_file()
        self._thread.start()
        if not self._ready.wait(START_TIMEOUT_S):
            raise TimeoutError(f"amqtt did not start within {START_TIMEOUT_S} s")
        if self._error is not None:
            raise self._error

    def stop(self) -> None:
        """Close the listener and every session, then end the loop's thread."""
        loop, broker = self._loop, self._broker
        if loop is None or broker is None:
            return
        try:
            asyncio.run_coroutine_threadsafe(broker.shutdown(), loop).result(STOP_TIMEOUT_S)
        except Exception:  # a half-closed session must not keep the demo from exiting
            logging.getLogger("amqtt").exception("embedded broker shutdown failed")
        loop.call_soon_threadsafe(loop.stop)
        self._thread.join(STOP_TIMEOUT_S)

    def _send_logs_to_file(self) -> None:
        handler = logging.FileHandler(self.log_file)
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
        for name in ("amqtt", "transitions"):
            logger = logging.getLogger(name)
            logger.addHandler(handler)
            logger.setLevel(logging.INFO)
            logger.propagate = False

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        try:
            # Imported here: amqtt is an optional dependency, present in the demo's venv only
            # (import_module also keeps mypy from needing its stubs in the dev venv).
            broker_module = importlib.import_module("amqtt.broker")
            self._broker = loop.run_until_complete(self._start(broker_module))
        except BaseException as exc:
            self._error = exc
            self._ready.set()
            loop.close()
            return
        self._loop = loop
        self._ready.set()
        try:
            loop.run_forever()
        finally:
            loop.close()

    async def _start(self, broker_module: Any) -> Any:
        # Only anonymous authentication: no $SYS topics, no per-packet logging plugins.
        broker = broker_module.Broker(
            {
                "listeners": {"default": {"type": "tcp", "bind": f"{self.host}:{self.port}"}},
                "plugins": {
                    "amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}
                },
            }
        )
        await broker.start()
        return broker
