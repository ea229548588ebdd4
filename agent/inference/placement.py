"""Node placement: which execution provider ran each node of a model's first run.

ONNX Runtime assigns every node to a provider when it builds the session and says nothing
when a node the first-choice provider cannot take goes to the CPU (onnxruntime #7238). Its
profiler names the provider of each node it runs, in the same JSON format since onnxruntime
1.x, so the warm-up runs with profiling on: the profile is read once, its file deleted, and
profiling ends before the session serves (``end_profiling`` turns it off). Nodes the warm-up
never reaches (the untaken branch of an If) are not listed. A TensorRT or OpenVINO
subgraph shows as one fused node of that provider.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnxruntime as ort
import structlog

CPU = "CPUExecutionProvider"
MAX_PROFILE_BYTES = 32 * 1024 * 1024
MAX_NAMED_NODES = 20  # in a status or an error; the count covers the rest
_KERNEL_SUFFIX = "_kernel_time"
# Copies between device and host memory that onnxruntime inserts itself.
_COPY_OPS = frozenset({"MemcpyToHost", "MemcpyFromHost"})

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class Placement:
    """How many nodes each provider ran, and the nodes that fell back to the CPU while
    another provider was asked for (``name (OpType)``)."""

    by_provider: Mapping[str, int]
    fallback: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        """As ``P/models/NAME`` and ``model check --json`` show it."""
        return {
            "nodes": dict(self.by_provider),
            "fallback_nodes": len(self.fallback),
            "fallback": list(self.fallback[:MAX_NAMED_NODES]),
        }

    def describe_fallback(self) -> str:
        """The fallen-back nodes for a log line or an error, the first few by name."""
        named = ", ".join(self.fallback[:MAX_NAMED_NODES])
        more = len(self.fallback) - MAX_NAMED_NODES
        return named + (f" and {more} more" if more > 0 else "")


def placement_from_events(events: Iterable[Any], requested: Sequence[str]) -> Placement:
    """Read a profile's node events. A node fell back when it ran on the CPU while the
    requested providers include another one."""
    # Keyed by node index where the profile has one: ONNX does not make node names unique,
    # and each warm-up run lists every node again.
    providers: dict[str, tuple[str, str]] = {}
    for event in events:
        if not isinstance(event, dict) or event.get("cat") != "Node":
            continue
        name = event.get("name")
        args = event.get("args")
        if not isinstance(name, str) or not name.endswith(_KERNEL_SUFFIX):
            continue
        if not isinstance(args, dict) or not isinstance(args.get("provider"), str):
            continue
        op = str(args.get("op_name") or "?")
        if op in _COPY_OPS:
            continue
        label = f"{name[: -len(_KERNEL_SUFFIX)] or '(unnamed)'} ({op})"
        index = args.get("node_index")
        key = f"#{index}" if isinstance(index, str | int) else label
        providers.setdefault(key, (label, args["provider"]))
    counts = Counter(provider for _, provider in providers.values())
    wants_other = any(provider != CPU for provider in requested)
    fallback = tuple(label for label, provider in providers.values() if provider == CPU)
    return Placement(
        by_provider=dict(sorted(counts.items())), fallback=fallback if wants_other else ()
    )


class ProfiledRun:
    """Profiling for one session's warm-up: ``options`` writes its profile into a private
    folder; ``finish`` ends profiling, reads the placement and removes the folder. Used by
    one loading thread."""

    def __init__(self) -> None:
        self.folder: Path | None = None
        self.problem: str | None = None

    def configure(self, options: ort.SessionOptions) -> None:
        """Turn profiling on in ``options``; without a temporary folder placement is unknown."""
        try:
            self.folder = Path(tempfile.mkdtemp(prefix="edge-agent-placement-"))
        except OSError as exc:
            self.problem = f"node placement unknown: no temporary folder ({exc.strerror})"
            return
        options.enable_profiling = True
        options.profile_file_prefix = str(self.folder / "profile")

    def finish(
        self, session: ort.InferenceSession | None, requested: Sequence[str]
    ) -> Placement | None:
        """End profiling and read the placement (None, with ``problem``, when unknown)."""
        if self.folder is None:
            return None
        try:
            written = session.end_profiling() if session is not None else ""
            if not written:
                self.problem = self.problem or "node placement unknown: no profile was written"
                return None
            events, complete = _read_events(Path(written))
            if not complete:
                self.problem = (
                    f"node placement from the first {MAX_PROFILE_BYTES // 2**20} MiB of the "
                    "warm-up's profile only (a long run: a Loop, say)"
                )
            return placement_from_events(events, requested)
        except (OSError, ValueError) as exc:
            self.problem = f"node placement unknown: the profile cannot be read ({exc})"
            return None
        finally:
            shutil.rmtree(self.folder, ignore_errors=True)
            self.folder = None


def _read_events(path: Path) -> tuple[list[Any], bool]:
    """The profile's events, one JSON object per line as onnxruntime writes them, read up
    to ``MAX_PROFILE_BYTES``; and whether the whole file was read. A warm-up that runs a
    Loop for seconds writes hundreds of MB, which must not be loaded whole."""
    events: list[Any] = []
    read = 0
    with path.open("rb") as handle:
        for line in handle:
            read += len(line)
            if read > MAX_PROFILE_BYTES:
                return events, False
            text = line.strip().rstrip(b",")
            if text.startswith(b"{"):
                events.append(json.loads(text))
    return events, True


def cpu_only(requested: Sequence[str]) -> bool:
    """Whether only the CPU was requested: then no node can fall back, and placement is
    not measured (profiling a warm-up costs time and memory for nothing)."""
    return all(provider == CPU for provider in requested)


def placement_refusal(
    setting: bool | str,
    missing: Sequence[str],
    loaded: Sequence[str],
    placement: Placement | None,
    placement_problem: str | None,
) -> str | None:
    """Why ``require_providers`` forbids serving: requested providers that did not load
    (``true`` and ``all_nodes``), or nodes that fell back to the CPU (``all_nodes``)."""
    if setting is False:
        return None
    if missing:
        return (
            f"requested providers {list(missing)} did not load (loaded: {list(loaded)}) and "
            f"require_providers is {_setting(setting)}"
        )
    if setting != "all_nodes":
        return None
    if placement is None:
        return (
            f"{placement_problem or 'node placement unknown'}, and require_providers is all_nodes"
        )
    if placement.fallback:
        return (
            f"{len(placement.fallback)} node(s) fell back to {CPU}: "
            f"{placement.describe_fallback()}; require_providers is all_nodes"
        )
    return None


def _setting(value: bool | str) -> str:
    return "true" if value is True else str(value)
