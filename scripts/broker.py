"""An MQTT broker for trying edge-agent: the one `make demo` would use, until stopped.

The first line names it: one already answering on 127.0.0.1:1883 (a Mosquitto service, say;
it is left alone), else a private Mosquitto on that port, else the embedded amqtt broker
(MQTT 3.1.1) on a machine with only Python. Runs until SIGINT or SIGTERM (Ctrl-C, or `kill`
of a background job), then stops the broker it started; exit 0.

    .venv/bin/python scripts/broker.py &        # the quickstart's broker
    kill %1                                     # when done
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

sys.path.insert(0, str(Path(__file__).resolve().parent))

from local_broker import REPO, say, start_broker


def main(argv: Sequence[str] | None = None) -> int:
    """Start the broker, wait for a stop signal, stop it."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--port", type=int, default=1883, help="port on 127.0.0.1 (1883)")
    parser.add_argument(
        "--broker",
        choices=("auto", "mosquitto", "embedded"),
        default="auto",
        help="auto: the broker answering on the port, else a private Mosquitto, else the "
        "embedded amqtt broker",
    )
    parser.add_argument(
        "--run-dir",
        type=Path,
        default=REPO / "quickstart" / "broker",
        help="the private broker's config and log (default quickstart/broker/)",
    )
    args = parser.parse_args(argv)
    stop = threading.Event()

    # Runs on the main thread between bytecodes: only sets the event.
    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, on_signal)
    broker = start_broker(
        "127.0.0.1",
        args.port,
        args.run_dir.resolve(),
        args.broker,
        who="scripts/broker.py",
        existing_note=" (left as it is)",
    )
    while not stop.wait(1.0):
        pass
    broker.stop()
    if broker.started_here:
        say(f"stopped the {broker.kind} broker (it kept nothing)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
