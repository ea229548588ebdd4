"""What drift measurement costs the serving thread per reading, in one process: a pipeline's
drift monitor (64 features, a reference of 2,000 readings) fed batches of one reading,
back to back (hot caches) and spaced like readings at a steady rate (cold caches, the
case of a device at 100-500 readings/s). Includes the binning of every 256 readings.

    .venv/bin/python scripts/bench_drift.py [--readings 20000] [--spacing-ms 2]

``scripts/bench_cpu.py --drift`` measures the same inside the daemon, against the loop.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

from bench_run import describe_run  # noqa: E402

from agent.config.schema import DriftConfig  # noqa: E402
from agent.inference.drift_setup import build_monitor  # noqa: E402

FEATURES = 64


def main() -> int:
    parser = argparse.ArgumentParser(description="drift's cost per reading")
    parser.add_argument("--readings", type=int, default=20_000)
    parser.add_argument("--spacing-ms", type=float, default=2.0)
    args = parser.parse_args()
    print(describe_run(), flush=True)
    rng = np.random.default_rng(0)
    reference = {"input:x": rng.normal(0, 1, (2000, FEATURES)).astype(np.float32)}
    monitor = build_monitor(DriftConfig(reference="bench", window_s=3600), reference, "bench")
    batches = [rng.normal(0, 1, (1, FEATURES)).astype(np.float32) for _ in range(args.readings)]
    started = time.perf_counter()
    for batch in batches:
        monitor.observe({"x": batch}, {}, stacked=True)
    hot_us = (time.perf_counter() - started) / len(batches) * 1e6
    spaced = batches[: max(1024, len(batches) // 10)]
    spent = 0.0
    for batch in spaced:
        time.sleep(args.spacing_ms / 1000)
        begun = time.perf_counter()
        monitor.observe({"x": batch}, {}, stacked=True)
        spent += time.perf_counter() - begun
    spaced_us = spent / len(spaced) * 1e6
    print(f"{FEATURES} features, batches of one reading")
    print(f"back to back:                 {hot_us:6.1f} us per reading ({len(batches)} readings)")
    print(
        f"{args.spacing_ms:g} ms apart (cold caches): {spaced_us:6.1f} us per reading "
        f"({len(spaced)} readings)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
