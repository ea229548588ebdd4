"""Models and pipelines: loading ONNX models, decoding readings, batching, running, results.

Imports the bottom layer, ``agent.config``, ``agent.hardware`` and ``agent.transport``;
never updates, ops, the daemon or the CLI.
"""
