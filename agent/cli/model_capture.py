"""``edge-agent model capture --config PATH --pipeline NAME --count N -o INPUTS.npz``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from agent.cli.model import EXIT_FAILED, EXIT_OK
from agent.cli.model_support import tool_logging
from agent.cli.tool_client import broker_settings, connect
from agent.config.loader import load_config
from agent.durable import write_atomically
from agent.errors import ConfigError, EdgeAgentError
from agent.inference.runplan import ModelView, build_plan
from agent.modeltools.capture import ReadingCollector
from agent.modeltools.common import as_model, open_model
from agent.modeltools.reference import describe_arrays, npz_bytes

_NAME = "edge-agent model capture"


def run(args: argparse.Namespace) -> int:
    """Record the pipeline's readings and write INPUTS.npz; returns the exit code."""
    tool_logging()
    try:
        config = load_config(Path(args.config))
        mqtt, password = broker_settings(args)
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return EXIT_FAILED
    except EdgeAgentError as exc:
        print(f"{_NAME}: {exc}", file=sys.stderr)
        return EXIT_FAILED
    pipeline = config.pipelines.get(args.pipeline)
    if pipeline is None:
        names = ", ".join(config.pipelines) or "none"
        print(
            f"{_NAME}: {args.config} has no pipeline {args.pipeline!r} (it has {names})",
            file=sys.stderr,
        )
        return EXIT_FAILED
    topic = pipeline.input.topic
    try:
        # The model as the daemon loads it: its inputs decide how readings decode.
        tool = as_model(config, config.model_path(pipeline.model), pipeline.model)
        model = open_model(tool).model
        plan = build_plan(ModelView(model.inputs, model.outputs), pipeline, args.pipeline)
        collector = ReadingCollector(pipeline, plan, model.inputs, args.count)
        # The plain topic, never the pipeline's $share group: a capture must see a copy of
        # the readings, not take them away from the daemons that serve them.
        client = connect(mqtt, password, [(topic, pipeline.input.qos)], collector.on_message)
    except EdgeAgentError as exc:
        print(f"{_NAME}: {exc}", file=sys.stderr)
        return EXIT_FAILED
    terminal = sys.stderr.isatty()
    where = f"pipeline {args.pipeline} ({topic} on {mqtt.host}:{mqtt.port})"
    interrupted = False
    try:
        reached = collector.wait(args.timeout, _progress(where, args.count) if terminal else None)
    except KeyboardInterrupt:
        interrupted, reached = True, False
    finally:
        client.disconnect()
        client.loop_stop()
    if terminal:
        sys.stderr.write("\n")
    return _write(args, collector, where, reached, interrupted)


def _write(
    args: argparse.Namespace,
    collector: ReadingCollector,
    where: str,
    reached: bool,
    interrupted: bool,
) -> int:
    skipped = ""
    if collector.skipped:
        skipped = (
            f"; skipped {collector.skipped} that did not decode as the daemon decodes them "
            f"(first: {collector.first_problem})"
        )
    if not collector.kept:
        print(
            f"{_NAME}: no reading of {where} arrived in {args.timeout:g} s{skipped}",
            file=sys.stderr,
        )
        return EXIT_FAILED
    arrays = collector.arrays()
    data = npz_bytes(arrays)
    try:
        write_atomically(args.output, data)
    except (OSError, EdgeAgentError) as exc:
        print(f"{_NAME}: cannot write {args.output}: {exc}", file=sys.stderr)
        return EXIT_FAILED
    print(f"captured {collector.kept} readings of {where} -> {args.output} ({len(data)} bytes)")
    print(f"  {describe_arrays(arrays)}")
    for name, source in collector.fixed_inputs().items():
        print(f"  input:{name}: {source}")
    if skipped:
        print(f"  {skipped[2:]}")
    if interrupted:
        print(f"  interrupted before {args.count} readings arrived")
    elif collector.full:
        print("  stopped early: the readings fill 256 MiB")
    elif not reached:
        print(f"  {args.count} readings did not arrive in {args.timeout:g} s: wrote what came")
    return EXIT_OK


def _progress(where: str, count: int) -> Callable[[int, int], None]:
    def tick(kept: int, skipped: int) -> None:
        sys.stderr.write(f"\rcapturing {where}: {kept}/{count} readings ({skipped} skipped)")
        sys.stderr.flush()

    return tick
