"""The errors topic gets every error; the log gets a bounded number per pipeline."""

from __future__ import annotations

import json

from agent import reporting
from agent.reporting import ErrorReporter


def test_every_error_is_published_but_the_log_is_rate_limited() -> None:
    """Past the burst, errors are still published but not logged, and the mute is counted."""
    published: list[tuple[str, bytes]] = []
    reporter = ErrorReporter(lambda topic, payload: published.append((topic, payload)),
                             "edge/d/errors")
    logged = [reporter._take_budget("p")[0] for _ in range(reporting.LOG_BURST + 5)]
    assert logged.count(True) == reporting.LOG_BURST
    for _ in range(3):
        reporter.report("p", "s/1", "bad")
    assert len(published) == 3
    body = json.loads(published[0][1])
    assert body["pipeline"] == "p"
    assert body["topic"] == "s/1"
    assert body["reason"] == "bad"
    assert body["ts"] > 0
    assert published[0][0] == "edge/d/errors"
