"""Memory after a burst: the daemon's RSS before, right after and a health report after a
burst of readings sent at once.

    .venv/bin/python scripts/bench_burst.py [--model mlp] [--readings 20000] [--bursts 2]

A private Mosquitto, the daemon with its defaults (QoS 1, at-least-once) and
``health.interval_s: 0.5``, so that the health loop (which gives freed memory back with
``malloc_trim``) runs soon after each burst.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

from bench import build_models, saturation, stop_process, warm  # noqa: E402
from bench_cpu import start_broker, start_daemon  # noqa: E402
from bench_run import describe_run  # noqa: E402

from agent.procfs import rss_mb  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description="RSS after a burst of readings")
    parser.add_argument("--model", default="mlp", choices=["mlp", "iforest", "cnn"])
    parser.add_argument("--readings", type=int, default=20_000)
    parser.add_argument("--bursts", type=int, default=2)
    args = parser.parse_args()
    print(describe_run(), flush=True)
    with tempfile.TemporaryDirectory(prefix="edge-agent-burst-") as temp:
        folder = Path(temp)
        broker = start_broker(folder)
        try:
            case = build_models(folder, args.readings, [args.model])[0]
            target = start_daemon(case, broker, folder, {"health.interval_s": 0.5})
            try:
                warm(broker, target.results, target.messages)
                pid = target.process.pid
                print(f"after warm-up: {rss_mb(pid)} MB")
                for index in range(args.bursts):
                    rate = saturation(broker, target.results, target.messages)
                    print(
                        f"burst {index + 1}: {args.readings:,} readings at {rate:,.0f}/s, "
                        f"RSS {rss_mb(pid)} MB",
                        flush=True,
                    )
                time.sleep(1.5)  # a health report or two: the freed memory goes back
                print(f"after a health report: {rss_mb(pid)} MB")
            finally:
                target.results.close()
                stop_process(target.process)
        finally:
            broker.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
