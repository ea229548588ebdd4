"""Who runs a pipeline's readings: the network loop's thread (inline) or the pipeline's worker.

For a cheap model, handing a reading to a worker thread costs more than running it: a lock,
a wake-up, and a result published from another thread, which must wake the network loop
again to be written. So a pipeline starts inline: after each read, the network loop takes
the readings that turn queued and runs them as one batch in its own thread, and their
results and acknowledgements leave in the same turn, as in a hand-written loop. Readings
that arrive during a run join the next batch; nothing waits to form one.

A model that is not cheap must not hold the network loop (keepalive, the other pipelines,
the next readings): ``STRIKES`` batches that run longer than ``INLINE_RUN_LIMIT_S`` move the
pipeline to its worker for good (until the pipeline is restarted by a reload), with a log
line. The bound is per batch, not per reading: it is how long the loop is held that matters,
and a device slower than the one a model was measured on holds it longer. A batch that turns
out to run for seconds (a model slow for some inputs) holds only the thread it started on:
the network loop goes on on its standby thread after ``RESCUE_AFTER_S``, and the pipeline
moves to its worker when the batch ends.
"""

from __future__ import annotations

import threading

import structlog

from agent.transport.network_loop import RESCUE_AFTER_S

INLINE_RUN_LIMIT_S = 0.005
STRIKES = 3  # batches over the limit before the move: one can be a pause of the machine's


class InlineGate:
    """The pipeline's choice between inline and worker, and the lock that lets only one of
    them process at a time, in queue order.

    ``judge`` runs on the network loop's thread; ``to_worker`` on it or on the main thread
    (a stop); ``wait_for_worker`` on the worker's.
    """

    def __init__(self, log: structlog.stdlib.BoundLogger, *, inline: bool = True) -> None:
        self._log = log
        self.lock = threading.Lock()  # held while a batch is taken and processed
        self._worker_turn = threading.Event()
        self.inline = inline
        if not inline:
            self._worker_turn.set()
        self._strikes = 0

    def judge(self, seconds: float, readings: int) -> None:
        """Account one inline batch; move to the worker after ``STRIKES`` slow ones, or at
        once after one so long that the network loop was handed to its standby thread."""
        if seconds <= INLINE_RUN_LIMIT_S:
            return
        self._strikes += 1
        if seconds > RESCUE_AFTER_S:
            self.to_worker(
                f"a batch of {readings} reading(s) ran {seconds:.1f} s in the network loop, "
                "which went on on its standby thread meanwhile"
            )
        elif self._strikes >= STRIKES:
            self.to_worker(
                f"{STRIKES} batches ran longer than {INLINE_RUN_LIMIT_S * 1000:g} ms in the "
                f"network loop, the last {readings} reading(s) in {seconds * 1000:.1f} ms"
            )

    def to_worker(self, reason: str) -> None:
        """From now on the worker takes the batches."""
        if not self.inline:
            return
        self.inline = False
        self._worker_turn.set()
        self._log.info("pipeline_moved_to_worker", reason=reason)

    def release(self) -> None:
        """Hand the queue to the worker without a word: the pipeline is stopping, and its
        worker drains what is left (main thread)."""
        self.inline = False
        self._worker_turn.set()

    def wait_for_worker(self) -> None:
        """Block the worker while the readings run inline (the worker's thread)."""
        self._worker_turn.wait()
