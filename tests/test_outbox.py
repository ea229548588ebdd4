"""The SQLite outbox on its own: order, bounds, persistence, seq blocks."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.errors import EdgeAgentError, SeqReserveError
from agent.transport.outbox import SEQ_BLOCK, Outbox
from agent.transport.results import UNPERSISTED_RETRY, PendingResult, SeqCounter


def result(index: int, size: int = 100) -> PendingResult:
    return PendingResult("p", f"out/{index}", b"x" * size, 1, None)


def test_rows_come_back_in_order_and_survive_reopening(tmp_path: Path) -> None:
    """Appended results are read back oldest first, deleted by id, and still there after
    the file is closed and opened again (a restart)."""
    box = Outbox(tmp_path, max_mb=8, max_age_s=3600)
    box.append([result(i) for i in range(5)])
    rows = box.after(0, 3)
    assert [r.topic for r in rows] == ["out/0", "out/1", "out/2"]
    box.delete([rows[0].id, rows[1].id, 999_999])
    box.close()
    again = Outbox(tmp_path, max_mb=8, max_age_s=3600)
    assert len(again) == 3
    assert [r.topic for r in again.after(0, 10)] == ["out/2", "out/3", "out/4"]
    assert again.stats()["bytes"] == 3 * (100 + len("out/2") + 48)


def test_the_size_bound_drops_the_oldest_and_counts_them(tmp_path: Path) -> None:
    """Past max_mb the oldest rows go first; the count says how many; the file stays under
    the bound."""
    box = Outbox(tmp_path, max_mb=1, max_age_s=3600)
    for start in range(0, 3000, 100):
        box.append([result(i, size=1000) for i in range(start, start + 100)])
    kept = box.after(0, 10_000)
    assert box.dropped == 3000 - len(kept) > 0
    assert [r.topic for r in kept] == [f"out/{i}" for i in range(box.dropped, 3000)]
    files = sum(p.stat().st_size for p in tmp_path.glob("outbox.sqlite3*"))
    assert files <= 1024 * 1024


def test_rows_taken_to_send_are_not_counted_as_dropped(tmp_path: Path) -> None:
    """Rows the flusher took to send are still on their way when the size bound deletes
    them: only the never-taken ones count as dropped; after the connection
    is replaced (they will be sent again from the table) deleting them is a drop again."""
    box = Outbox(tmp_path, max_mb=1, max_age_s=3600)
    box.append([result(i, size=1000) for i in range(200)])
    box.take(0, 50)
    for start in range(200, 3000, 100):
        box.append([result(i, size=1000) for i in range(start, start + 100)])
    first_kept = int(box.after(0, 1)[0].topic.split("/")[1])
    assert first_kept > 50
    assert box.dropped == first_kept - 50

    box.forget_handed()
    before = box.dropped
    kept_before = len(box)
    box.append([result(i, size=1000) for i in range(3000, 3100)])
    assert box.dropped - before == kept_before + 100 - len(box)


class Clocks:
    """A wall clock and a boot clock the test moves by hand."""

    def __init__(self) -> None:
        self.wall, self.boot = 1_800_000_000.0, 5_000.0

    def __call__(self) -> tuple[float, float]:
        return self.wall, self.boot


def test_old_results_expire(tmp_path: Path) -> None:
    """Results older than max_age_s (on the boot clock) are dropped and counted as expired."""
    clocks = Clocks()
    box = Outbox(tmp_path, max_mb=8, max_age_s=60, clock=clocks, boot_id="a")
    box.append([result(1), result(2)])
    clocks.wall += 30
    clocks.boot += 30
    assert box.expire() == 0
    assert box.stats()["oldest_age_s"] == 30.0
    clocks.boot += 31
    assert box.expire() == 2
    assert box.stats()["expired"] == 2
    assert len(box) == 0


def test_wall_clock_jumps_neither_expire_early_nor_keep_late(tmp_path: Path) -> None:
    """The wall clock stepped a day forward (a late NTP sync after a dead RTC battery)
    expires nothing stored a minute ago; stepped an hour back, results still expire when
    their time is up."""
    clocks = Clocks()
    box = Outbox(tmp_path, max_mb=8, max_age_s=3600, clock=clocks, boot_id="a")
    box.append([result(1)])
    clocks.wall += 86_400
    clocks.boot += 60
    assert box.expire() == 0
    assert box.stats()["oldest_age_s"] == 60.0
    clocks.wall -= 86_400 + 3600
    clocks.boot += 3600
    assert box.expire() == 1


def test_after_a_reboot_ages_fall_back_to_the_wall_clock(tmp_path: Path) -> None:
    """Stored rows' boot-clock times mean nothing in another boot: there the wall clock
    (written with every row) decides."""
    clocks = Clocks()
    box = Outbox(tmp_path, max_mb=8, max_age_s=3600, clock=clocks, boot_id="first")
    box.append([result(1)])
    box.close()
    clocks.boot = 10.0  # a fresh boot
    clocks.wall += 600
    again = Outbox(tmp_path, max_mb=8, max_age_s=3600, clock=clocks, boot_id="second")
    assert again.stats()["oldest_age_s"] == 600.0
    assert again.expire() == 0
    clocks.wall += 3001
    assert again.expire() == 1


def test_seq_blocks_never_repeat_across_restarts(tmp_path: Path) -> None:
    """A counter continues above every number handed out before, even after a restart
    that did not use its whole block."""
    box = Outbox(tmp_path, max_mb=8, max_age_s=60)
    counter = SeqCounter(box, "p")
    first = [counter.take() for _ in range(3)]
    assert first == [1, 2, 3]
    box.close()
    again = SeqCounter(Outbox(tmp_path, max_mb=8, max_age_s=60), "p")
    assert again.take() == 1 + SEQ_BLOCK
    assert SeqCounter(Outbox(tmp_path, max_mb=8, max_age_s=60), "q").take() == 1


class FlakySeqStore:
    """A seq store whose writes fail while ``full`` (a full state_dir), else an Outbox."""

    def __init__(self, box: Outbox) -> None:
        self.box = box
        self.full = False
        self.calls = 0

    def reserve_seq(self, pipeline: str, at_least: int = 1) -> tuple[int, int]:
        self.calls += 1
        if self.full:
            raise SeqReserveError("database or disk is full")
        return self.box.reserve_seq(pipeline, at_least)


def test_seq_goes_on_rising_while_blocks_cannot_be_persisted(tmp_path: Path) -> None:
    """A block that cannot be written does not stop the numbers: they keep rising in
    memory, persisting is retried every UNPERSISTED_RETRY numbers (not at every one), and
    the block persisted afterwards starts above every number handed out."""
    store = FlakySeqStore(Outbox(tmp_path, max_mb=8, max_age_s=60))
    counter = SeqCounter(store, "p")
    assert counter.take() == 1
    store.full = True
    taken = [counter.take() for _ in range(SEQ_BLOCK + 2 * UNPERSISTED_RETRY)]
    assert taken == list(range(2, SEQ_BLOCK + 2 * UNPERSISTED_RETRY + 2))
    assert store.calls == 1 + 3  # the first block, then one try per retry stretch
    store.full = False
    rest = [counter.take() for _ in range(UNPERSISTED_RETRY)]
    assert rest[0] == taken[-1] + 1
    assert rest == sorted(rest)
    assert store.calls == 5  # persisted again: no more tries until this block runs out
    store.box.close()
    again = SeqCounter(Outbox(tmp_path, max_mb=8, max_age_s=60), "p")
    assert again.take() > rest[-1]


def test_an_unusable_file_is_a_clear_error(tmp_path: Path) -> None:
    """A file that is not SQLite is reported with its path (the whole path, not just the
    file name) and SQLite's reason, and is left as it was."""
    path = tmp_path / "outbox.sqlite3"
    garbage = b"this is not a database" * 100
    path.write_bytes(garbage)
    with pytest.raises(EdgeAgentError) as raised:
        Outbox(tmp_path, max_mb=8, max_age_s=60)
    message = str(raised.value)
    assert message.startswith(f"cannot open the outbox {path}: "), message
    assert "file is not a database" in message
    assert path.read_bytes() == garbage


def test_new_bounds_apply_to_the_next_append(tmp_path: Path) -> None:
    """A config reload that shrinks max_mb takes effect at the next append."""
    box = Outbox(tmp_path, max_mb=16, max_age_s=3600)
    box.append([result(i, size=1000) for i in range(2000)])
    assert box.dropped == 0
    box.set_bounds(max_mb=1, max_age_s=3600)
    box.append([result(2000, size=1000)])
    assert box.dropped > 0
    assert box.after(0, 100_000)[-1].topic == "out/2000"


def test_an_outbox_from_before_the_boot_clock_is_upgraded(tmp_path: Path) -> None:
    """A file written by an earlier version (no boot-clock column) opens, keeps its rows
    and ages them on the wall clock."""
    import sqlite3  # noqa: PLC0415

    db = sqlite3.connect(tmp_path / "outbox.sqlite3")
    db.executescript(
        "CREATE TABLE outbox (id INTEGER PRIMARY KEY AUTOINCREMENT, pipeline TEXT NOT NULL, "
        "topic TEXT NOT NULL, payload BLOB NOT NULL, qos INTEGER NOT NULL, correlation BLOB, "
        "created REAL NOT NULL, size INTEGER NOT NULL);"
        "CREATE TABLE seq (pipeline TEXT PRIMARY KEY, next INTEGER NOT NULL);"
        "INSERT INTO outbox (pipeline, topic, payload, qos, created, size) "
        "VALUES ('p', 't', x'00', 1, 1799999000.0, 100);"
    )
    db.commit()
    db.close()
    clocks = Clocks()
    box = Outbox(tmp_path, max_mb=8, max_age_s=3600, clock=clocks, boot_id="a")
    assert len(box) == 1
    assert box.stats()["oldest_age_s"] == 1000.0
