"""The durable outbox: results that cannot be published now, kept in order until they can.

SQLite in WAL mode in ``state_dir``: a commit survives the process being killed (the
reading it came from is acknowledged only after that commit), readers never block the
writer, and the file is one well-understood format an operator can inspect with the
``sqlite3`` shell. The same database keeps each pipeline's ``seq`` counter.

Bounded by ``outbox.max_mb`` for the database, its write-ahead log and index together (the
pages in use are measured, not estimated) and by ``outbox.max_age_s``; beyond either, the
oldest results are dropped and counted. Thread-safe: the pipelines' workers append,
the flusher reads and deletes, the main thread asks for statistics.
"""

from __future__ import annotations

import contextlib
import errno
import os
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import structlog

from agent.errors import EdgeAgentError, SeqReserveError
from agent.transport.results import PendingResult

log = structlog.get_logger(__name__)

DB_FILE = "outbox.sqlite3"
DB_SHARE = 0.7  # of max_mb for the database file, less the WAL's share
WAL_SHARE = 0.1  # of max_mb for the write-ahead log (checkpointed and truncated at it)
ROW_OVERHEAD = 48  # bytes per row besides topic and payload (ids, times), for stats
PAGE_SIZE = 4096
FULL_LOG_EVERY_S = 10.0
SEQ_BLOCK = 1000  # seq numbers reserved per write: a restart skips at most this many

_SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    pipeline TEXT NOT NULL,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    qos INTEGER NOT NULL,
    correlation BLOB,
    created REAL NOT NULL,
    created_boot REAL,
    size INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS seq (pipeline TEXT PRIMARY KEY, next INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""
# (wall-clock seconds, seconds since boot): ages are measured on the boot clock, which no
# NTP step or operator's `date -s` moves; across a reboot only the wall clock is left.
Clock = Callable[[], tuple[float, float]]
BOOT_ID_FILE = Path("/proc/sys/kernel/random/boot_id")


def system_clock() -> tuple[float, float]:
    """The wall clock and CLOCK_BOOTTIME (which keeps counting through a suspend)."""
    return time.time(), time.clock_gettime(time.CLOCK_BOOTTIME)


def current_boot_id(path: Path = BOOT_ID_FILE) -> str:
    """This boot's id (a boot clock reading means nothing in another boot)."""
    try:
        return path.read_text().strip()
    except OSError:
        return "unknown"


@dataclass(frozen=True)
class OutboxRow:
    """One stored result."""

    id: int
    pipeline: str
    topic: str
    payload: bytes
    qos: int
    correlation: bytes | None
    created: float


class Outbox:
    """A bounded, durable FIFO of results in one SQLite file."""

    def __init__(
        self,
        folder: Path,
        max_mb: float,
        max_age_s: float,
        *,
        clock: Clock = system_clock,
        boot_id: str | None = None,
    ) -> None:
        self.path = folder / DB_FILE
        self._clock = clock
        self._lock = threading.Lock()
        self._wal_bytes, self._budget = _bounds(max_mb)
        self._max_age_s = max_age_s
        self._full_logged = 0.0
        try:
            folder.mkdir(parents=True, exist_ok=True)
            self._db = _open(self.path, self._wal_bytes)
            _adopt_boot(self._db, current_boot_id() if boot_id is None else boot_id)
            row = self._db.execute("SELECT COUNT(*), COALESCE(SUM(size), 0) FROM outbox").fetchone()
        except sqlite3.Error as exc:
            raise EdgeAgentError(f"cannot open the outbox {self.path}: {exc}") from exc
        self._count, self._bytes = int(row[0]), int(row[1])
        self.dropped = 0  # dropped for the size bound since start, never sent
        self.expired = 0  # dropped for the age bound since start
        # The highest id the flusher has taken to send: a row at or below it that the size
        # bound deletes is still on its way (in the flusher's hands or paho's) and is not a
        # drop. Written by the flusher, read by the appending workers, under ``_lock``.
        self._handed_through = 0
        if self._count:
            log.info(
                "outbox_resumed",
                results=self._count,
                bytes=self._bytes,
                oldest_age_s=_oldest_age_s(self._db, self._clock),
            )

    def set_bounds(self, max_mb: float, max_age_s: float) -> None:
        """Adopt ``outbox.max_mb`` and ``max_age_s`` (at start and on a config reload; the
        next append or expiry enforces them)."""
        with self._lock:
            self._wal_bytes, self._budget = _bounds(max_mb)
            self._max_age_s = max_age_s
            _limit_journal(self._db, self._wal_bytes)

    # -- results -------------------------------------------------------------------------------

    def __len__(self) -> int:
        return self._count

    def append(self, results: list[PendingResult]) -> None:
        """Store results durably (one transaction), dropping the oldest beyond the bound."""
        now, boot = self._clock()
        rows = [
            (
                r.pipeline,
                r.topic,
                r.payload,
                r.qos,
                r.correlation,
                now,
                boot,
                len(r.payload) + len(r.topic) + ROW_OVERHEAD,
            )
            for r in results
        ]
        added = sum(row[-1] for row in rows)
        with self._lock:
            self._db.execute("BEGIN")
            try:
                self._db.executemany(
                    "INSERT INTO outbox (pipeline, topic, payload, qos, correlation, created, "
                    "created_boot, size) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    rows,
                )
                self._count += len(rows)
                self._bytes += added
                dropped = self._drop_oldest_beyond_budget()
                self._db.execute("COMMIT")
            except BaseException:
                _roll_back(self._db)
                self._recount()
                raise
            self._limit_wal()
        if dropped:
            self.dropped += dropped
            if time.monotonic() - self._full_logged >= FULL_LOG_EVERY_S:
                self._full_logged = time.monotonic()
                log.warning(
                    "outbox_full",
                    dropped_total=self.dropped,
                    kept=self._count,
                    reason="outbox.max_mb reached: the oldest results are dropped",
                )

    def _drop_oldest_beyond_budget(self) -> int:
        dropped = 0
        while self._count:
            used = self._used_bytes()
            if used <= self._budget:
                break
            # Rows sit in id order on the pages, so deleting the oldest frees whole pages.
            per_row = max(1, used // self._count)
            cut = min(self._count, max(1, -(-(used - self._budget) // per_row)))
            last_id, freed, never_sent = self._db.execute(
                "SELECT MAX(id), SUM(size), SUM(id > ?) FROM (SELECT id, size FROM outbox "
                "ORDER BY id LIMIT ?)",
                (self._handed_through, cut),
            ).fetchone()
            self._db.execute("DELETE FROM outbox WHERE id <= ?", (last_id,))
            self._count -= cut
            self._bytes -= int(freed)
            dropped += int(never_sent)
        return dropped

    def forget_handed(self) -> None:
        """The connection the rows were handed to is gone (the broker settings changed):
        they will be sent again from the table, so deleting them now is a drop again."""
        with self._lock:
            self._handed_through = 0

    def _limit_wal(self) -> None:
        """Fold the write-ahead log into the database once it outgrows its share (SQLite's
        automatic checkpoints reuse the log but do not shrink a log one big burst grew)."""
        try:
            size = self.path.with_name(DB_FILE + "-wal").stat().st_size
        except FileNotFoundError:
            return
        if size > self._wal_bytes:
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    def _used_bytes(self) -> int:
        pages = self._db.execute("PRAGMA page_count").fetchone()[0]
        free = self._db.execute("PRAGMA freelist_count").fetchone()[0]
        return int(pages - free) * PAGE_SIZE

    def after(self, last_id: int, limit: int) -> list[OutboxRow]:
        """Up to ``limit`` stored results with ids above ``last_id``, oldest first."""
        with self._lock:
            return self._rows_after(last_id, limit)

    def take(self, last_id: int, limit: int) -> list[OutboxRow]:
        """Like ``after``, for the flusher, which sends every row it takes: from now on the
        size bound deleting one of them is not a drop (it is on its way all the same)."""
        with self._lock:
            rows = self._rows_after(last_id, limit)
            if rows:
                self._handed_through = max(self._handed_through, rows[-1].id)
            return rows

    def _rows_after(self, last_id: int, limit: int) -> list[OutboxRow]:
        rows = self._db.execute(
            "SELECT id, pipeline, topic, payload, qos, correlation, created FROM outbox "
            "WHERE id > ? ORDER BY id LIMIT ?",
            (last_id, limit),
        ).fetchall()
        return [OutboxRow(*row) for row in rows]

    def delete(self, ids: list[int]) -> None:
        """Forget delivered results (ids already gone are ignored)."""
        if not ids:
            return
        wanted = set(ids)
        with self._lock:
            self._db.execute("BEGIN")
            try:
                # Acknowledged ids are nearly contiguous: one range scan finds their sizes.
                found = [
                    (row_id, size)
                    for row_id, size in self._db.execute(
                        "SELECT id, size FROM outbox WHERE id BETWEEN ? AND ?", (min(ids), max(ids))
                    )
                    if row_id in wanted
                ]
                self._db.executemany(
                    "DELETE FROM outbox WHERE id = ?", [(row_id,) for row_id, _ in found]
                )
                self._db.execute("COMMIT")
            except BaseException:
                _roll_back(self._db)
                raise
            self._count -= len(found)
            self._bytes -= sum(size for _, size in found)

    def expire(self) -> int:
        """Drop results older than ``max_age_s``; returns how many. Ages run on the boot
        clock, so a wall clock stepped a day forward expires nothing early and one stepped
        back keeps nothing longer; results from before a reboot fall back to the wall clock."""
        wall, boot = self._clock()
        with self._lock:
            cursor = self._db.execute(
                "DELETE FROM outbox WHERE (created_boot IS NOT NULL AND created_boot < ?) "
                "OR (created_boot IS NULL AND created < ?)",
                (boot - self._max_age_s, wall - self._max_age_s),
            )
            count = cursor.rowcount
            if count:
                self._recount()
        if count:
            self.expired += count
            log.warning("outbox_expired", dropped=count, max_age_s=self._max_age_s)
        return count

    def stats(self) -> dict[str, float | int | None]:
        """Depth, stored bytes, the oldest result's age, and drops since start (for health)."""
        with self._lock:
            oldest = _oldest_age_s(self._db, self._clock)
            count, size = self._count, self._bytes
        return {
            "depth": count,
            "bytes": size,
            "oldest_age_s": oldest,
            "dropped": self.dropped,
            "expired": self.expired,
        }

    def _recount(self) -> None:
        row = self._db.execute("SELECT COUNT(*), COALESCE(SUM(size), 0) FROM outbox").fetchone()
        self._count, self._bytes = int(row[0]), int(row[1])

    # -- seq -----------------------------------------------------------------------------------

    def reserve_seq(self, pipeline: str, at_least: int = 1) -> tuple[int, int]:
        """A block ``[start, end)`` of seq numbers for ``pipeline``, never handed out before
        and starting at ``at_least`` or above (persisted before use, so a restart continues
        above it). Raises SeqReserveError when the database cannot be written."""
        with self._lock:
            try:
                return _reserve_seq(self._db, pipeline, at_least)
            except sqlite3.Error as exc:
                raise SeqReserveError(
                    f"cannot persist the seq numbers of pipeline {pipeline!r} in {self.path}: "
                    f"{explain(exc, self.path)}"
                ) from exc

    def close(self) -> None:
        """Checkpoint the WAL into the database and close. A checkpoint that cannot be
        written (a full or read-only disk) is logged, not raised: every committed result is
        in the WAL, which the next start reads."""
        with self._lock:
            _checkpoint_and_close(self._db, self.path)


def _checkpoint_and_close(db: sqlite3.Connection, path: Path) -> None:
    try:
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    except sqlite3.Error as exc:
        log.warning(
            "outbox_checkpoint_failed",
            error=explain(exc, path),
            action="stored results stay in the write-ahead log; the next start reads it",
        )
    finally:
        db.close()


def _open(path: Path, wal_bytes: int) -> sqlite3.Connection:
    """The outbox database, in WAL mode, its tables created (raises ``sqlite3.Error``)."""
    db = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=10.0)
    db.execute(f"PRAGMA page_size = {PAGE_SIZE}")
    db.execute("PRAGMA journal_mode = WAL")
    # NORMAL in WAL mode: a commit survives the process being killed; only a power cut
    # may lose the last commits. FULL would fsync every commit (slow on SD cards).
    db.execute("PRAGMA synchronous = NORMAL")
    _limit_journal(db, wal_bytes)
    db.executescript(_SCHEMA)
    return db


def _oldest_age_s(db: sqlite3.Connection, clock: Clock) -> float | None:
    """The oldest stored result's age: on the boot clock, or the wall clock for rows
    stored before this boot (the caller holds the outbox's lock)."""
    wall, boot = clock()
    this_boot, earlier = db.execute(
        "SELECT MIN(created_boot), MIN(CASE WHEN created_boot IS NULL THEN created END) FROM outbox"
    ).fetchone()
    ages = [boot - this_boot if this_boot is not None else None]
    ages.append(wall - earlier if earlier is not None else None)
    known = [a for a in ages if a is not None]
    return round(max(known), 1) if known else None


def _reserve_seq(db: sqlite3.Connection, pipeline: str, at_least: int) -> tuple[int, int]:
    """Persist and return the next block of ``pipeline``'s seq numbers, from ``at_least`` or
    above (the caller holds the outbox's lock)."""
    db.execute("BEGIN IMMEDIATE")
    try:
        row = db.execute("SELECT next FROM seq WHERE pipeline = ?", (pipeline,)).fetchone()
        start = max(int(row[0]) if row else 1, at_least)
        db.execute(
            "INSERT INTO seq (pipeline, next) VALUES (?, ?) ON CONFLICT"
            "(pipeline) DO UPDATE SET next = excluded.next",
            (pipeline, start + SEQ_BLOCK),
        )
        db.execute("COMMIT")
    except BaseException:
        _roll_back(db)
        raise
    return start, start + SEQ_BLOCK


def _adopt_boot(db: sqlite3.Connection, boot_id: str) -> None:
    """Add the boot-clock column to an outbox from an earlier version, and after a reboot
    forget the boot-clock times of stored rows (they counted from another boot)."""
    columns = {row[1] for row in db.execute("PRAGMA table_info(outbox)")}
    if "created_boot" not in columns:
        db.execute("ALTER TABLE outbox ADD COLUMN created_boot REAL")
    row = db.execute("SELECT value FROM meta WHERE key = 'boot_id'").fetchone()
    if row is None or row[0] != boot_id:
        db.execute("BEGIN IMMEDIATE")
        try:
            db.execute("UPDATE outbox SET created_boot = NULL")
            db.execute(
                "INSERT INTO meta (key, value) VALUES ('boot_id', ?) ON CONFLICT(key) "
                "DO UPDATE SET value = excluded.value",
                (boot_id,),
            )
            db.execute("COMMIT")
        except BaseException:
            _roll_back(db)
            raise


def explain(exc: sqlite3.Error, database: Path) -> str:
    """``exc`` from the outbox at ``database`` as the operator needs it: SQLite reports a
    write refused by a read-only file system, or one that found no space, as a generic "disk
    I/O error", so name the error code and what the file system says now."""
    text = str(exc)
    code = getattr(exc, "sqlite_errorname", None)
    if code and code not in text:
        text = f"{text} ({code})"
    cause = _write_probe(database.parent)
    return f"{text}; {cause}" if cause else text


def _write_probe(folder: Path) -> str | None:
    """Why a new file cannot be written in ``folder`` now, or None if it can. Asking the
    file system beats reading its flags: ext4 after an error (``errors=remount-ro``) refuses
    writes while its mount options still say ``rw``."""
    probe = folder / f".write-probe-{os.getpid()}"
    try:
        handle = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except OSError as exc:
        return _write_failure(folder, exc)
    try:
        os.write(handle, b"\0" * 4096)
    except OSError as exc:
        return _write_failure(folder, exc)
    finally:
        os.close(handle)
        with contextlib.suppress(OSError):
            os.unlink(probe)
    return None


def _write_failure(folder: Path, exc: OSError) -> str:
    if exc.errno == errno.EROFS:
        return f"the file system of {folder} is read-only"
    if exc.errno in {errno.ENOSPC, errno.EDQUOT}:
        return f"the file system of {folder} is full"
    return f"{folder}: {exc.strerror}"


def _roll_back(db: sqlite3.Connection) -> None:
    """Roll back the transaction a failed statement left open. SQLite has often rolled it
    back by itself already (SQLITE_FULL on COMMIT, an I/O error, a read-only remount), and a
    failing ROLLBACK must not replace the error that caused it: the caller re-raises that
    one, which is what the operator needs to read."""
    if db.in_transaction:
        with contextlib.suppress(sqlite3.Error):
            db.execute("ROLLBACK")


def _limit_journal(db: sqlite3.Connection, wal_bytes: int) -> None:
    """Checkpoint the write-ahead log at ``wal_bytes`` and truncate it back to that size."""
    db.execute(f"PRAGMA wal_autocheckpoint = {wal_bytes // PAGE_SIZE}")
    db.execute(f"PRAGMA journal_size_limit = {wal_bytes}")


def _bounds(max_mb: float) -> tuple[int, int]:
    """(the write-ahead log's share, the database's budget) of ``max_mb``, in bytes."""
    max_bytes = int(max_mb * 1024 * 1024)
    wal = min(4 * 1024 * 1024, max(64 * 1024, int(max_bytes * WAL_SHARE)))
    return wal, int(max_bytes * DB_SHARE) - wal
