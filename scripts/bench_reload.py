"""Reload benchmark: memory after many hot reloads, and reload-to-serving latency.

Runs the real registry and file watcher in this process (no broker: the point is the
model swap). Two ~2 MB models alternate at the model path, each written as a temp file
renamed into place; after each write it waits until the registry serves the new version.

    .venv/bin/python scripts/bench_reload.py [--reloads 200] [--size-mb 2]

Prints RSS after the first reload and after the last, their difference, and the median and
p95 of the time from rename to serving.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench_run import describe_run  # noqa: E402

from agent.config.loader import config_from_document  # noqa: E402
from agent.config.yaml_source import YamlDocument  # noqa: E402
from agent.hardware.detect import detect  # noqa: E402
from agent.inference.registry import ModelRegistry  # noqa: E402
from agent.inference.watcher import ModelFileWatcher  # noqa: E402
from agent.logs import configure_logging  # noqa: E402
from agent.procfs import rss_mb  # noqa: E402
from tests.onnx_builders import build_linear  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reloads", type=int, default=200)
    parser.add_argument("--size-mb", type=float, default=2.0)
    args = parser.parse_args()
    print(describe_run(), flush=True)
    configure_logging("warning")

    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        pad = int(args.size_mb * 1024 * 1024)
        models = [
            build_linear(
                root / "build" / f"{i}.onnx", features=64, outputs=8, seed=i, pad_bytes=pad
            ).read_bytes()
            for i in range(2)
        ]
        config = config_from_document(
            YamlDocument(
                data={
                    "device_id": "bench",
                    "models_dir": str(root / "models"),
                    "state_dir": str(root / "state"),
                    "models": {"m": {}},
                    "watch": {"mode": "inotify"},
                }
            ),
            "<bench>",
            base_dir=root,
        )
        target = config.model_path("m")
        target.parent.mkdir(parents=True)
        target.write_bytes(models[0])
        registry = ModelRegistry(config, detect(), lambda name, payload: None)
        registry.load_all()
        watcher = ModelFileWatcher({"m": target}, registry.load, config.watch)
        watcher.start()
        latencies: list[float] = []
        rss_first = 0.0
        try:
            for index in range(1, args.reloads + 1):
                data = models[index % 2]
                temp = target.with_name("m.onnx.tmp")
                temp.write_bytes(data)
                previous = registry.get("m")
                started = time.perf_counter()
                os.replace(temp, target)
                while registry.get("m") is previous:
                    time.sleep(0.0005)
                    if time.perf_counter() - started > 30:
                        raise TimeoutError(f"reload {index} did not finish")
                latencies.append(time.perf_counter() - started)
                if index == 1:
                    rss_first = rss_mb() or float("nan")
        finally:
            watcher.stop()
        rss_last = rss_mb() or float("nan")
    latencies.sort()
    print(f"model size            {len(models[0]) / 1e6:.2f} MB")
    print(f"reloads               {args.reloads}")
    print(f"RSS after reload 1    {rss_first:.1f} MB")
    print(f"RSS after reload {args.reloads:<4} {rss_last:.1f} MB")
    print(f"RSS growth            {rss_last - rss_first:+.1f} MB")
    print(
        f"reload-to-serving     median {statistics.median(latencies) * 1000:.1f} ms, "
        f"p95 {latencies[int(len(latencies) * 0.95) - 1] * 1000:.1f} ms"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
