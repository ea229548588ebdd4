"""``edge-agent model capture``: real readings of a pipeline as a golden set's sample inputs.

Each reading is decoded exactly as the daemon decodes it (the pipeline's input config, the
model's run plan), so a golden set made from the capture feeds the model what it sees in
service. The pipeline's constants, and a stream's state (zeros: the first reading of a
stream), become input arrays of their own, one row per reading, so the set feeds every
model input.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import numpy as np
import paho.mqtt.client as paho

from agent.config.schema import PipelineConfig
from agent.errors import ModelToolError, PayloadError
from agent.inference.codecs import Tensor, TensorSpec, decode_payload
from agent.inference.golden import INPUT_PREFIX
from agent.inference.runplan import RunPlan

# What the captured rows may hold in memory together (a capture of long audio readings).
MAX_CAPTURE_BYTES = 256 * 1024 * 1024


class ReadingCollector:
    """The first ``count`` readings that decode, as rows per model input; the others
    counted with the first reason.

    ``on_message`` runs on paho's network thread and writes under the lock; the main
    thread waits in ``wait`` and reads the results after the client stopped."""

    def __init__(
        self,
        pipeline: PipelineConfig,
        plan: RunPlan,
        specs: tuple[TensorSpec, ...],
        count: int,
    ) -> None:
        self._pipeline = pipeline
        self._plan = plan
        self._count = count
        self._fixed = _fixed_rows(plan, specs)
        self._lock = threading.Lock()
        self._done = threading.Event()
        self._rows: list[dict[str, Tensor]] = []
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._bytes = 0
        self.skipped = 0
        self.first_problem: str | None = None
        self.full = False  # stopped at MAX_CAPTURE_BYTES

    @property
    def kept(self) -> int:
        """Readings kept so far."""
        with self._lock:
            return len(self._rows)

    # Runs on paho's network thread: short, and it never raises.
    def on_message(self, client: paho.Client, userdata: Any, message: paho.MQTTMessage) -> None:
        """Decode one reading and keep it, or count why not."""
        if self._done.is_set():
            return
        try:
            tensors, _ = decode_payload(message.payload, self._pipeline.input, self._plan.payload)
            problem = None
        except PayloadError as exc:
            tensors, problem = {}, str(exc)
        with self._lock:
            if self._done.is_set():
                return
            problem = problem or self._shape_problem(tensors)
            if problem is not None:
                self.skipped += 1
                if self.first_problem is None:
                    self.first_problem = f"{message.topic}: {problem}"
                return
            self._bytes += sum(tensor.nbytes for tensor in tensors.values())
            self._rows.append(tensors)
            if self._bytes > MAX_CAPTURE_BYTES:
                self.full = True
            if len(self._rows) >= self._count or self.full:
                self._done.set()

    def _shape_problem(self, tensors: dict[str, Tensor]) -> str | None:
        """A golden set holds one shape per input: the first reading's (under the lock)."""
        if not self._shapes:
            self._shapes = {name: tensor.shape for name, tensor in tensors.items()}
            return None
        for name, tensor in tensors.items():
            first = self._shapes[name]
            if tensor.shape != first:
                return (
                    f"input {name!r} has shape {list(tensor.shape)}, the first reading's was "
                    f"{list(first)}: a golden set holds one shape per input"
                )
        return None

    def wait(self, timeout_s: float, tick: Callable[[int, int], None] | None = None) -> bool:
        """Wait until ``count`` readings were kept or ``timeout_s`` passed; ``tick`` gets
        (kept, skipped) about twice a second. Returns whether the count was reached."""
        waited = 0.0
        while waited < timeout_s:
            step = min(0.5, timeout_s - waited)
            if self._done.wait(step):
                break
            waited += step
            if tick is not None:
                with self._lock:
                    kept, skipped = len(self._rows), self.skipped
                tick(kept, skipped)
        self._done.set()  # later messages are ignored
        return self.kept >= self._count

    def arrays(self) -> dict[str, np.ndarray]:
        """``input:<name>`` arrays, one row per kept reading (call after ``wait``)."""
        with self._lock:
            rows = list(self._rows)
        if not rows:
            raise ModelToolError("no reading was captured")
        arrays = {
            f"{INPUT_PREFIX}{name}": np.stack([row[name] for row in rows]) for name in rows[0]
        }
        for name, value in self._fixed.items():
            arrays[f"{INPUT_PREFIX}{name}"] = np.repeat(value[None], len(rows), axis=0)
        return arrays

    def fixed_inputs(self) -> dict[str, str]:
        """The inputs that do not come from the payload, and what fills them."""
        return {
            name: "stream state: zeros (a stream's first reading)"
            if name in self._plan.state
            else "the pipeline's constant"
            for name in self._fixed
        }


def _fixed_rows(plan: RunPlan, specs: tuple[TensorSpec, ...]) -> dict[str, Tensor]:
    """One sample's value of each constant and state input, as a golden set row: the item
    itself for an input with a batch axis, the whole value for one without."""
    by_name = {spec.name: spec for spec in specs}
    rows: dict[str, Tensor] = {}
    for name, value in plan.constants.items():
        spec = by_name[name]
        if not spec.batched or name in plan.repeated:
            rows[name] = value
        elif value.ndim >= 1 and value.shape[0] == 1:
            rows[name] = value[0]  # given with its batch axis of one
        else:
            raise ModelToolError(
                f"constant {name!r} has shape {list(value.shape)}: a golden set needs one "
                f"sample of it (shape {spec.describe_shape()})"
            )
    for name, value in plan.zero_state(specs).items():
        rows[name] = value[0] if by_name[name].batched else value
    return rows
