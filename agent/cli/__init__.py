"""The ``edge-agent`` command line: run, check-config, detect, status, sign, publish-update.

The top layer: may import anything; nothing imports it.
"""
