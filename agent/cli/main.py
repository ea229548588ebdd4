"""The ``edge-agent`` command line. Exit codes: 0 ok, 1 invalid input, 2 usage."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import structlog

from agent import __version__
from agent.cli.broker_options import add_broker_arguments
from agent.cli.keys import add_parser as add_keys_parser
from agent.cli.keys import run as run_keys_command
from agent.cli.model import add_parser as add_model_parser
from agent.cli.model import run as run_model_command
from agent.cli.send import add_parser as add_send_parser
from agent.cli.send import run as run_send_command
from agent.cli.updates import add_parsers as add_update_parsers
from agent.cli.updates import run as run_update_command
from agent.config.loader import (
    CONFIG_ENV_VAR,
    DEFAULT_CONFIG_PATH,
    default_config,
    load_config,
    resolve_config_path,
)
from agent.config.schema import AgentConfig
from agent.errors import ConfigError, EdgeAgentError
from agent.logs import LEVELS, configure_logging

EXIT_OK = 0
EXIT_INVALID = 1
EXIT_USAGE = 2

log = structlog.get_logger(__name__)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every command."""
    parser = argparse.ArgumentParser(
        prog="edge-agent",
        description="Run ONNX models on edge devices, fed by MQTT.",
    )
    parser.add_argument("--version", action="version", version=f"edge-agent {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True

    run = commands.add_parser(
        "run",
        help="run the daemon",
        description="Run the daemon. The config comes from --config, else "
        f"${CONFIG_ENV_VAR}, else {DEFAULT_CONFIG_PATH}; when none of these "
        "exists the built-in defaults are used.",
    )
    run.add_argument("--config", metavar="PATH", help="config file (YAML)")
    run.add_argument(
        "--log-level", choices=LEVELS, default=None, help="override the config's log_level"
    )
    run.add_argument(
        "--log-format",
        choices=("auto", "json", "console"),
        default="auto",
        help="auto: JSON lines unless stdout is a terminal (default)",
    )

    check = commands.add_parser(
        "check-config",
        help="validate a config file",
        description="Validate a config file. Prints one line per problem "
        "(FILE:LINE: dotted.key: message) and exits 1, or exits 0 when valid.",
    )
    check.add_argument("path", metavar="PATH", help="config file (YAML)")

    detect = commands.add_parser(
        "detect",
        help="show the hardware and the execution providers that would be used",
        description="Print the detected hardware, the execution providers the installed "
        "onnxruntime offers, the chosen order with per-provider options and why, "
        "and hints.",
    )
    detect.add_argument("--json", action="store_true", help="print JSON")
    detect.add_argument(
        "--config",
        metavar="PATH",
        help="config whose providers/state_dir settings apply (default: the "
        "run command's config if it exists)",
    )
    detect.add_argument(
        "--root",
        default="/",
        metavar="PATH",
        help="read /proc, /sys, /dev and /etc under PATH (default /)",
    )
    detect.add_argument(
        "--machine",
        default=None,
        metavar="ARCH",
        help="CPU architecture to assume (default: this machine's)",
    )

    status = commands.add_parser(
        "status",
        help="show the devices whose retained topics are on a broker",
        description="Read the retained status, health and model topics of one device or of "
        "every device under a prefix, and print a table: device, online (yes, NO, "
        "STALE: says online but its health is older than 3 health intervals), "
        "models and versions, throughput, latency, temperature, outbox, last "
        "seen. Devices that are not online show '-' for their figures.",
    )
    add_broker_arguments(status)
    status.add_argument(
        "--prefix", default="edge", help="topics are PREFIX/<device>/... (default: edge)"
    )
    status.add_argument("--device", help="only this device")
    status.add_argument("--group", metavar="G", help="only the devices whose health lists group G")
    status.add_argument(
        "--wait",
        type=_non_negative_seconds,
        default=1.5,
        metavar="SECONDS",
        help="how long to collect retained messages before printing "
        "(default 1.5; with --watch: before the first table)",
    )
    status.add_argument(
        "--watch",
        action="store_true",
        help="keep listening and redraw the table every second until Ctrl-C "
        "(in place on a terminal; timestamped tables otherwise)",
    )
    status.add_argument(
        "--json",
        action="store_true",
        help="print JSON instead of a table (with --watch: one line per second)",
    )
    add_update_parsers(commands)
    add_keys_parser(commands)
    add_model_parser(commands)
    add_send_parser(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script; returns the exit code."""
    args = build_parser().parse_args(argv)
    if args.command == "check-config":
        return _check_config(Path(args.path))
    if args.command == "detect":
        return _detect(args)
    if args.command == "status":
        return _status(args)
    if args.command in ("keygen", "sign", "publish-update"):
        return run_update_command(args)
    tools = {"model": run_model_command, "keys": run_keys_command, "send": run_send_command}
    if args.command in tools:
        return tools[args.command](args)
    return _run(args)


def _check_config(path: Path) -> int:
    try:
        config = load_config(path)
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem)
        print(f"{path}: {_count(len(exc.problems), 'problem')}", file=sys.stderr)
        return EXIT_INVALID
    print(
        f"{path}: ok (device_id {config.device_id}, {_count(len(config.models), 'model')}, "
        f"{_count(len(config.pipelines), 'pipeline')})"
    )
    return EXIT_OK


def _count(number: int, noun: str) -> str:
    """'1 model', '2 models'."""
    return f"{number} {noun}{'' if number == 1 else 's'}"


def _detect(args: argparse.Namespace) -> int:
    # Imported here: onnxruntime is slow to import and only detect and run need it.
    from agent.hardware.report import build_report, format_report  # noqa: PLC0415

    path = resolve_config_path(args.config)
    try:
        config = load_config(path) if path.exists() or args.config else default_config()
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return EXIT_INVALID
    report = build_report(config, root=args.root, machine=args.machine)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(format_report(report))
    return EXIT_OK


def _non_negative_seconds(text: str) -> float:
    """``--wait``: a number of seconds, zero or more."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number, 0 or more: {text!r}")
    return value


def _status(args: argparse.Namespace) -> int:
    from agent.cli.status import collect, in_group, report, table, watch  # noqa: PLC0415
    from agent.cli.tool_client import broker_settings  # noqa: PLC0415

    try:
        mqtt, password = broker_settings(args)
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return EXIT_INVALID
    except EdgeAgentError as exc:
        print(f"edge-agent status: {exc}", file=sys.stderr)
        return EXIT_INVALID
    prefix = args.prefix.rstrip("/")
    try:
        if args.watch:
            try:
                return watch(
                    mqtt,
                    prefix,
                    args.device,
                    args.group,
                    args.wait,
                    password=password,
                    as_json=args.json,
                )
            except BrokenPipeError:
                # The reader went away (``| head``): done. Point stdout at /dev/null so that
                # the interpreter's final flush does not fail on the closed pipe again.
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
                return EXIT_OK
        devices = in_group(collect(mqtt, prefix, args.device, args.wait, password), args.group)
    except EdgeAgentError as exc:
        print(f"edge-agent status: {exc}", file=sys.stderr)
        return EXIT_INVALID
    if args.json:
        print(json.dumps(report(devices), indent=2))
    elif devices:
        print(table(devices))
    else:
        group = f" in group {args.group}" if args.group else ""
        print(f"no devices{group} under {args.prefix}/ on {mqtt.host}:{mqtt.port}")
    return EXIT_OK


def _run(args: argparse.Namespace) -> int:
    json_output = {"auto": None, "json": True, "console": False}[args.log_format]
    configure_logging(args.log_level or "info", json_output=json_output)
    explicit = args.config is not None or bool(_env_config())
    path = resolve_config_path(args.config)
    config: AgentConfig
    source: Path | None = path
    try:
        if path.exists() or explicit:
            config = load_config(path)
        else:
            config = default_config()
            source = None
            log.warning(
                "config_not_found", path=str(path), action="running with the built-in defaults"
            )
    except ConfigError as exc:
        for problem in exc.problems:
            log.error("config_invalid", problem=str(problem))
        return EXIT_INVALID
    if args.log_level is None:
        configure_logging(config.log_level, json_output=json_output)

    # Imported late: it pulls in onnxruntime, which check-config and --help do not need.
    from agent.daemon.lifecycle import Daemon  # noqa: PLC0415

    try:
        return Daemon(config, source, log_level_override=args.log_level).run()
    except EdgeAgentError as exc:
        log.error("agent_failed", error=str(exc))
        return EXIT_INVALID


def _env_config() -> str | None:
    return os.environ.get(CONFIG_ENV_VAR) or None
