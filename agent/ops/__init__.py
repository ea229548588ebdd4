"""What operators see of a running daemon: health telemetry, Prometheus metrics, systemd.

May import config, hardware, transport and inference; never updates, the daemon or the CLI.
"""
