"""The operator's model tools (``edge-agent model``): check, benchmark, quantize and make
golden sets on the device, with the daemon's own session code.

Imports config, hardware and inference; never updates, ops, the daemon or the command line.
"""
