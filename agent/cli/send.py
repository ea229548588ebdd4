"""``edge-agent send TOPIC MESSAGE [--result FILTER]``: publish one message; with
``--result``, print the first message that comes on FILTER: a reading in, its result out.

For trying a pipeline without mosquitto-clients: the reading is sent again every
``RESEND_S`` until a result comes (the daemon may still be starting, and a reading sent
before it subscribed reaches nobody), so a reading may be answered twice; only the first
answer is printed.
"""

from __future__ import annotations

import argparse
import queue
import sys
import time
from typing import Any

from agent.cli.broker_options import add_broker_arguments

RESEND_S = 2.0
EXIT_OK, EXIT_FAILED = 0, 1


def add_parser(commands: Any) -> None:
    """The ``send`` command's options."""
    send = commands.add_parser(
        "send",
        help="publish one message; with --result, print the answer",
        description="Publish MESSAGE to TOPIC (QoS 1). With --result FILTER, subscribe to "
        "FILTER first, send the message again every 2 s until a message comes on FILTER, "
        "print that message (topic and payload) and exit 0; exit 1 after --timeout.",
    )
    add_broker_arguments(send)
    send.add_argument("topic", metavar="TOPIC", help="where to publish")
    send.add_argument("message", metavar="MESSAGE", help="the payload (text; '-': read stdin)")
    send.add_argument("--result", metavar="FILTER", help="print the first message on FILTER")
    send.add_argument(
        "--timeout", type=float, default=30.0, help="seconds to wait for --result (30)"
    )


def run(args: argparse.Namespace) -> int:
    """Send, and with ``--result`` wait for the answer."""
    from agent.cli.tool_client import broker_settings, connect  # noqa: PLC0415 - paho
    from agent.errors import EdgeAgentError  # noqa: PLC0415

    payload = (sys.stdin.read() if args.message == "-" else args.message).encode()
    answers: queue.Queue[tuple[str, bytes]] = queue.Queue()

    def on_message(client: Any, userdata: Any, message: Any) -> None:  # paho's thread
        answers.put((message.topic, bytes(message.payload)))

    try:
        mqtt, password = broker_settings(args)
        subscriptions = [(args.result, 1)] if args.result else []
        client = connect(mqtt, password, subscriptions, on_message)
    except EdgeAgentError as exc:
        print(f"edge-agent send: {exc}", file=sys.stderr)
        return EXIT_FAILED
    try:
        deadline = time.monotonic() + args.timeout
        while True:
            client.publish(args.topic, payload, qos=1).wait_for_publish(timeout=10)
            if not args.result:
                print(f"sent {len(payload)} bytes to {args.topic}")
                return EXIT_OK
            try:
                topic, answer = answers.get(timeout=min(RESEND_S, deadline - time.monotonic()))
            except queue.Empty:
                if time.monotonic() < deadline:
                    continue
                print(
                    f"edge-agent send: nothing on {args.result} within {args.timeout:g} s: "
                    f"is the agent running, and does a pipeline take {args.topic}?",
                    file=sys.stderr,
                )
                return EXIT_FAILED
            print(f"{topic} {answer.decode(errors='replace')}")
            return EXIT_OK
    finally:
        client.disconnect()
        client.loop_stop()
