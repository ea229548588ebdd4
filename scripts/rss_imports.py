"""Where the daemon's resident memory comes from before it serves: RSS after each import.

    .venv/bin/python scripts/rss_imports.py

Imports the daemon's dependencies one at a time in a fresh interpreter, in the order the
hand-written loop (``scripts/baseline_loop.py``) needs them first and then what the daemon
adds, printing the resident size after each and the step. The loop's own imports are the
baseline the daemon is compared with in ``scripts/bench_cpu.py``; everything after them is
the daemon's extra at start, before any model is loaded or reading arrives.
"""

from __future__ import annotations

import subprocess
import sys

# (label, statement), imported cumulatively in this order.
STEPS = (
    ("python", "pass"),
    ("numpy", "import numpy"),
    ("onnxruntime", "import onnxruntime"),
    ("paho-mqtt", "import paho.mqtt.client"),
    ("json (the loop ends here)", "import json"),
    ("orjson", "import orjson"),
    ("pyyaml", "import yaml"),
    # structlog imports rich (and pygments) when installed: the demo extra brings them (amqtt
    # needs typer), a device installed without it has neither.
    (
        "rich, if installed",
        "import importlib.util as u\nif u.find_spec('rich'): import rich.console, rich.traceback",
    ),
    ("structlog", "import structlog"),
    ("pydantic", "import pydantic"),
    ("watchdog", "import watchdog.observers"),
    ("cryptography", "from cryptography.hazmat.primitives.asymmetric import ed25519"),
    ("prometheus-client", "import prometheus_client"),
    ("sqlite3", "import sqlite3"),
    ("agent's config schema", "import agent.config.schema"),
    ("agent (the whole daemon)", "import agent.daemon.lifecycle"),
)

PROBE = """
import sys
def rss_kb():
    for line in open('/proc/self/status'):
        if line.startswith('VmRSS:'):
            return int(line.split()[1])
for statement in sys.argv[1:]:
    exec(statement)
    print(rss_kb(), flush=True)
"""


def main() -> int:
    """Print RSS after each step and what the step added."""
    output = subprocess.run(
        [sys.executable, "-c", PROBE, *(statement for _, statement in STEPS)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    sizes = [int(kb) / 1024 for kb in output]
    print(f"{'after':<28} {'RSS MB':>8} {'+MB':>7}")
    previous = sizes[0]
    for (label, _), size in zip(STEPS, sizes, strict=True):
        print(f"{label:<28} {size:8.1f} {size - previous:+7.1f}")
        previous = size
    loop_end = next(i for i, (label, _) in enumerate(STEPS) if label.startswith("json"))
    print(f"\nthe daemon's imports beyond the loop's: {sizes[-1] - sizes[loop_end]:+.1f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
