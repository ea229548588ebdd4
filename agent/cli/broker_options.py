"""The broker options every operator command that talks MQTT shares (``--config``, ``--host``,
``--port``, ``--username``, ``--password-file``, ``--ca-file``), read by
``agent.cli.tool_client.broker_settings``. Kept apart from the client so that declaring
them (for ``--help``) does not import paho."""

from __future__ import annotations

import argparse


def add_broker_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the broker address, credential and TLS options to ``parser``."""
    parser.add_argument(
        "--config", metavar="PATH", help="take broker address, credentials and TLS from this config"
    )
    parser.add_argument("--host", help="broker host (default: the config's, else 127.0.0.1)")
    parser.add_argument("--port", type=int, help="broker port (default: the config's, else 1883)")
    parser.add_argument("--username", help="broker user name")
    parser.add_argument("--password-file", metavar="PATH", help="file holding the password")
    parser.add_argument("--ca-file", metavar="PATH", help="CA certificate: connect with TLS")
