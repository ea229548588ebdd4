"""Signed over-the-air model updates: manifests, signatures, transfers, trial and rollback.

May import everything below it (config, hardware, transport, inference); never ops, the
daemon or the CLI.
"""
