"""The `edge-agent status` table from retained documents (pure formatting)."""

from __future__ import annotations

from agent.fleet_status import DeviceView, table


def test_table_shows_the_outbox_backlog_and_drops() -> None:
    """A device with stored results shows how many, and drops when there were any."""
    now = 1_000.0
    devices = {
        "gw-a": DeviceView("gw-a", "online", {"ts": now - 5, "pipelines": {}, "delivery": {
            "outbox": {"depth": 120, "dropped": 3, "expired": 0}}}),
        "gw-b": DeviceView("gw-b", "offline", {"ts": now - 400, "pipelines": {}, "delivery": {
            "outbox": {"depth": 0, "dropped": 0, "expired": 0}}}),
    }
    lines = table(devices, now=now).splitlines()
    assert "OUTBOX" in lines[0]
    assert "120 (3 dropped)" in lines[1]
    assert lines[1].startswith("gw-a")
    assert lines[2].split()[:2] == ["gw-b", "NO"]
    assert "7m ago" in lines[2]
