"""Per-stream state of stateful pipelines: what a recurrent model carries from one reading of
a sensor stream to the next, and which streams are remembered.

Worker-owned: only the pipeline's inference worker reads or writes a ``StreamTable``, so
nothing here takes a lock.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np

from agent.inference.codecs import Tensor, TensorSpec
from agent.inference.runplan import RunPlan

MAX_STREAMS = 10_000  # stateful streams kept; the least recently seen is forgotten first


@dataclass
class Stream:
    """One sensor stream: the state inputs of its next run, and the model version they
    came from (state from another version does not fit)."""

    version: str
    state: dict[str, Tensor]
    last_seen: float

    def advance(
        self, plan: RunPlan, specs: tuple[TensorSpec, ...], outputs: dict[str, Any]
    ) -> None:
        """Keep the state outputs of a run as the state inputs of the next one."""
        by_name = {spec.name: spec for spec in specs}
        self.state = {
            name: np.asarray(outputs[source], dtype=by_name[name].dtype)
            for name, source in plan.state.items()
        }


class StreamTable:
    """The streams of one pipeline by stream key, least recently seen first."""

    def __init__(self, reset_after_s: float, max_streams: int = MAX_STREAMS) -> None:
        self._reset_after_s = reset_after_s
        self._max_streams = max_streams
        self._streams: OrderedDict[str, Stream] = OrderedDict()

    def get(
        self,
        key: str,
        version: str,
        specs: tuple[TensorSpec, ...],
        plan: RunPlan,
        now: float,
    ) -> Stream:
        """The stream ``key`` as seen at ``now``: a fresh one (zero state) when it is new,
        silent for longer than ``reset_after_s`` or from another model version."""
        stream = self._streams.get(key)
        stale = stream is not None and (
            now - stream.last_seen > self._reset_after_s or stream.version != version
        )
        if stream is None or stale:
            stream = Stream(version, plan.zero_state(specs), now)
            self._streams[key] = stream
            while len(self._streams) > self._max_streams:
                self._streams.popitem(last=False)
        stream.last_seen = now
        self._streams.move_to_end(key)
        return stream
