"""The errors topic gets every error; the log gets a bounded number per pipeline."""

from __future__ import annotations

import json
import time

import pytest
import structlog
from structlog.testing import capture_logs

from agent.inference import reporting
from agent.inference.reporting import ErrorReporter


class FakeClock:
    """Stands in for the ``time`` module in ``agent.reporting``: monotonic time only moves
    when the test says so; wall-clock time is the real one (it is only a timestamp)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now

    def time(self) -> float:
        return time.time()


def test_every_error_is_published_but_the_log_is_rate_limited(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Every error is published. A pipeline's log goes quiet after LOG_BURST errors in a
    window while other pipelines still log; the first error of the next window is logged
    again, preceded by ``errors_muted`` counting what the quiet window left out."""
    clock = FakeClock()
    # ErrorReporter reads time.monotonic() itself and takes no clock: swap the module's
    # ``time`` for one the test moves.
    monkeypatch.setattr(reporting, "time", clock)
    published: list[tuple[str, bytes]] = []
    reporter = ErrorReporter(
        lambda topic, payload: published.append((topic, payload)), "edge/d/errors"
    )
    burst, muted = reporting.LOG_BURST, 5
    with capture_logs() as logs:
        # A logger made now logs into the capture, whatever an earlier test cached.
        monkeypatch.setattr(reporting, "log", structlog.get_logger(reporting.__name__))
        for index in range(burst + muted):
            reporter.report("p", "s/1", f"bad {index}")
        in_burst = list(logs)
        reporter.report("q", "s/2", "other pipeline")
        other = logs[len(in_burst) :]
        clock.now += reporting.LOG_WINDOW_S
        reporter.report("p", "s/1", "next window")
        next_window = logs[len(in_burst) + len(other) :]

    assert len(published) == burst + muted + 2
    assert [e["event"] for e in in_burst] == ["input_rejected"] * burst
    assert [e["reason"] for e in in_burst] == [f"bad {i}" for i in range(burst)]
    assert [(e["event"], e["pipeline"]) for e in other] == [("input_rejected", "q")]
    assert [e["event"] for e in next_window] == ["errors_muted", "input_rejected"]
    assert next_window[0]["pipeline"] == "p"
    assert next_window[0]["muted"] == muted
    assert next_window[0]["hint"] == "every error is on edge/d/errors"
    assert next_window[1]["reason"] == "next window"

    body = json.loads(published[0][1])
    assert body["pipeline"] == "p"
    assert body["topic"] == "s/1"
    assert body["reason"] == "bad 0"
    assert body["ts"] > 0
    assert {topic for topic, _ in published} == {"edge/d/errors"}
    assert [json.loads(payload)["reason"] for _, payload in published[burst : burst + muted]] == [
        f"bad {i}" for i in range(burst, burst + muted)
    ]
