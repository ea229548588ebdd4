"""edge-agent: run ONNX models on edge devices, fed by MQTT."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("edge-agent-onnx")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
