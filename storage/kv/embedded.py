"""Embedded backend: one SQLite file in WAL mode, FoundationDB's limits enforced.

Writes go through one writer thread per process that runs transaction bodies
one after another inside a single SQLite write transaction, then commits the
whole batch with one fsync (group commit, as Postfix and FoundationDB's commit
proxies do). Bodies therefore see a serializable order; a body that raises is
undone alone. A body's writes are kept in Python until it succeeds and reach
SQLite with the batch, in a few multi-row statements: every SQLite call lets
go of the GIL and must take it back, so a writer making one call per key
would spend its time queueing behind the protocol thread. Several processes
may share the file: they take turns through a blocking ``flock`` on a lock
file beside it, then SQLite's write lock (``BEGIN IMMEDIATE``).

The fsync is pipelined, as a database's log writer does it: the writer
commits a batch into the WAL without syncing (``synchronous=NORMAL``) and
goes on with the next batch, while a syncer thread syncs the WAL
(``fdatasync``) and only then hands the batch's results back, so nobody
learns that a commit succeeded before it is on disk. Readers may see a batch
a fraction of a millisecond before it is durable; an OS crash in that window
loses it, and with it every later batch (WAL frames carry chained checksums:
recovery stops at the first frame missing), never part of one. A failed
fsync stops the store: every later call raises :class:`StoreUnavailable`, as
nothing written since can be trusted to be on disk.

Read-only transactions run on a small pool of reader connections: in WAL mode
each sees a consistent snapshot without blocking the writer. WAL checkpoints
run in a thread of their own, so commits never wait behind one.

``inject_conflicts`` (0..1) makes that fraction of successful bodies fail with
:class:`NotCommitted` after running, their writes undone, so tests exercise
every retry loop as FoundationDB would.
"""

from __future__ import annotations

import asyncio
import bisect
import fcntl
import logging
import os
import queue
import random
import sqlite3
import struct
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from .base import (
    MAX_TRANSACTION_SECONDS,
    MAX_TRANSACTION_SIZE,
    VERSIONSTAMP_SIZE,
    KeyValue,
    LimitExceeded,
    NotCommitted,
    ReadTransaction,
    RetryableError,
    RetryLimitReached,
    StoreUnavailable,
    Transaction,
    TransactionTooOld,
    check_key,
    check_value,
    decode_counter,
    encode_counter,
)

log = logging.getLogger(__name__)

T = TypeVar("T")

DB_FILENAME = "rookery.sqlite3"
#: Bodies per group commit; bounded so one batch stays well under 5 s.
MAX_BATCH = 256
BUSY_TIMEOUT_MS = 10_000
READER_THREADS = 4
# WAL checkpoints run in a thread of their own (PASSIVE: they never block
# the writer or readers), asked for every CHECKPOINT_EVERY batches and at
# least every CHECKPOINT_IDLE seconds. The writer's own automatic checkpoint
# stays as a backstop at WRITER_AUTOCHECKPOINT pages, and the WAL file is cut
# back to JOURNAL_SIZE_LIMIT after it was reset.
CHECKPOINT_EVERY = 32
CHECKPOINT_IDLE = 2.0
WRITER_AUTOCHECKPOINT = 20_000
JOURNAL_SIZE_LIMIT = 64 * 1024 * 1024

SCHEMA = """
CREATE TABLE IF NOT EXISTS kv (key BLOB PRIMARY KEY, value BLOB NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
INSERT OR IGNORE INTO meta VALUES ('commit_version', 0);
"""

#: Where a few development builds kept the commit version instead of
#: ``meta``; a store opened finds it there at most once and moves it back.
_STRAY_VERSION_KEY = b"\xff\xff/rookery/commit_version"


def _fsync_directory(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _connect(path: str) -> sqlite3.Connection:
    conn = sqlite3.connect(
        path, isolation_level=None, check_same_thread=False, timeout=BUSY_TIMEOUT_MS / 1000,
        cached_statements=STATEMENT_CACHE,
    )
    conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
    conn.execute("PRAGMA journal_mode=WAL")
    # Durable means on disk (DESIGN.md): the WAL is synced at every commit
    # (the writer's connection leaves that to the syncer thread), before every
    # checkpoint, and the database file after it.
    conn.execute("PRAGMA synchronous=FULL")
    # Reads through the OS page cache without copying, and a bigger private
    # cache: most reads are point lookups of hot keys.
    conn.execute("PRAGMA mmap_size=1073741824")
    conn.execute("PRAGMA cache_size=-65536")
    # Statement journals (multi-row statements inside a transaction) in memory,
    # not in a temporary file opened and closed at every commit.
    conn.execute("PRAGMA temp_store=MEMORY")
    return conn


class _Reads:
    """Reads on one connection, with the 5 s age limit."""

    def __init__(self, conn: sqlite3.Connection, started: float) -> None:
        self._conn = conn
        self._started = started

    def _check_age(self) -> None:
        if time.monotonic() - self._started > MAX_TRANSACTION_SECONDS:
            raise TransactionTooOld("transaction older than 5 seconds")

    def get(self, key: bytes) -> bytes | None:
        self._check_age()
        row = self._conn.execute("SELECT value FROM kv WHERE key = ?", (key,)).fetchone()
        return None if row is None else bytes(row[0])

    def get_range(self, begin: bytes, end: bytes, limit: int = 0, reverse: bool = False) -> list[KeyValue]:
        self._check_age()
        order = "DESC" if reverse else "ASC"
        sql = f"SELECT key, value FROM kv WHERE key >= ? AND key < ? ORDER BY key {order}"
        if limit > 0:
            rows = self._conn.execute(sql + " LIMIT ?", (begin, end, limit)).fetchall()
        else:
            rows = self._conn.execute(sql, (begin, end)).fetchall()
        return rows  # sqlite3 returns BLOBs as bytes already


class _ReadCache:
    """What the writer connection last read or wrote, for keys with small
    values: most of a body's reads are of the same hot keys (counters,
    mailbox and account records). Valid only while no other connection has
    committed: the writer checks ``PRAGMA data_version`` at every batch and
    empties the cache when another process (a second node, the CLI) wrote.
    Also emptied when a batch or a flushed body is rolled back."""

    MAX_ENTRIES = 32768
    MAX_VALUE = 1024

    def __init__(self) -> None:
        self.entries: OrderedDict[bytes, bytes | None] = OrderedDict()
        self.data_version = -1

    def lookup(self, key: bytes) -> tuple[bool, bytes | None]:
        entries = self.entries
        if key not in entries:
            return False, None
        entries.move_to_end(key)
        return True, entries[key]

    def put(self, key: bytes, value: bytes | None) -> None:
        if value is not None and len(value) > self.MAX_VALUE:
            self.entries.pop(key, None)
            return
        self.entries[key] = value
        self.entries.move_to_end(key)
        if len(self.entries) > self.MAX_ENTRIES:
            self.entries.popitem(last=False)

    def clear(self) -> None:
        self.entries.clear()


class _Layer:
    """Writes not yet in SQLite, in the order that matters: ``ranges`` were
    cleared first, then ``writes`` (key to value, ``None`` for cleared) came
    after them. ``_keys`` holds ``writes``' keys, sorted when a range check
    needs them (a body may write hundreds of thousands of small keys, and
    keeping the list sorted at every write would be quadratic)."""

    __slots__ = ("writes", "_keys", "_sorted", "ranges", "size")

    def __init__(self) -> None:
        self.writes: dict[bytes, bytes | None] = {}
        self._keys: list[bytes] = []
        self._sorted = True
        self.ranges: list[tuple[bytes, bytes]] = []
        self.size = 0

    def __bool__(self) -> bool:
        return bool(self.writes) or bool(self.ranges)

    @property
    def keys(self) -> list[bytes]:
        if not self._sorted:
            self._keys.sort()
            self._sorted = True
        return self._keys

    def put(self, key: bytes, value: bytes | None) -> None:
        if key not in self.writes:
            if self._keys and key < self._keys[-1]:
                self._sorted = False
            self._keys.append(key)
        self.writes[key] = value
        self.size += len(key) + (len(value) if value is not None else 0)

    def clear_range(self, begin: bytes, end: bytes) -> None:
        keys = self.keys
        lo = bisect.bisect_left(keys, begin)
        hi = bisect.bisect_left(keys, end)
        for key in keys[lo:hi]:
            del self.writes[key]
        del keys[lo:hi]
        self.ranges.append((begin, end))

    def lookup(self, key: bytes) -> tuple[bool, bytes | None]:
        """(known here, value): unknown keys are for the layer below."""
        if key in self.writes:
            return True, self.writes[key]
        for begin, end in self.ranges:
            if begin <= key < end:
                return True, None
        return False, None

    def touches(self, begin: bytes, end: bytes) -> bool:
        if not self.writes:
            return self.clears(begin, end)
        keys = self.keys
        lo = bisect.bisect_left(keys, begin)
        if lo < len(keys) and keys[lo] < end:
            return True
        return self.clears(begin, end)

    def clears(self, begin: bytes, end: bytes) -> bool:
        return any(b < end and begin < e for b, e in self.ranges)

    def keys_in(self, begin: bytes, end: bytes) -> list[bytes]:
        keys = self.keys
        return keys[bisect.bisect_left(keys, begin) : bisect.bisect_left(keys, end)]

    def merge(self, later: _Layer) -> None:
        """Apply ``later``'s writes, which came after this layer's (those it
        made before a range it cleared are gone from it already)."""
        for begin, end in later.ranges:
            self.clear_range(begin, end)
        writes = self.writes
        fresh = [key for key in later.writes if key not in writes]
        if fresh:
            self._keys += fresh
            self._sorted = False
        writes.update(later.writes)
        self.size += later.size

    def apply(self, conn: sqlite3.Connection, cache: _ReadCache) -> None:
        """Write this layer into SQLite's open transaction and empty it."""
        for begin, end in self.ranges:
            conn.execute("DELETE FROM kv WHERE key >= ? AND key < ?", (begin, end))
        if self.ranges:
            cache.clear()
        rows = [(k, v) for k, v in self.writes.items() if v is not None]
        gone = [k for k, v in self.writes.items() if v is None]
        _write_rows(conn, rows)
        _delete_keys(conn, gone)
        for key, value in self.writes.items():
            cache.put(key, value)
        self.writes.clear()
        self._keys.clear()
        self._sorted = True
        self.ranges.clear()
        self.size = 0


# One multi-row statement per batch of up to ROWS_PER_STATEMENT rows, of the
# exact row count: each statement drops and retakes the GIL once, and every
# retake may wait on the protocol thread, so fewer statements is what makes
# the writer fast. The connection's statement cache keeps every shape.
ROWS_PER_STATEMENT = 128
_INSERT_SQL = [""] + ["INSERT OR REPLACE INTO kv VALUES " + ",".join(["(?,?)"] * n) for n in range(1, ROWS_PER_STATEMENT + 1)]
_DELETE_SQL = [""] + ["DELETE FROM kv WHERE key IN (" + ",".join(["?"] * n) + ")" for n in range(1, ROWS_PER_STATEMENT + 1)]
STATEMENT_CACHE = 2 * ROWS_PER_STATEMENT + 64


def _write_rows(conn: sqlite3.Connection, rows: list[tuple[bytes, bytes]]) -> None:
    for pos in range(0, len(rows), ROWS_PER_STATEMENT):
        chunk = rows[pos : pos + ROWS_PER_STATEMENT]
        conn.execute(_INSERT_SQL[len(chunk)], [x for row in chunk for x in row])


def _delete_keys(conn: sqlite3.Connection, keys: list[bytes]) -> None:
    for pos in range(0, len(keys), ROWS_PER_STATEMENT):
        chunk = keys[pos : pos + ROWS_PER_STATEMENT]
        conn.execute(_DELETE_SQL[len(chunk)], chunk)


#: In-memory operations of a body between two reads of the clock (5 s limit).
AGE_CHECK_EVERY = 64

# A batch's pending writes are put into SQLite once they pass this size, so
# memory stays bounded however many bodies a batch holds.
LAYER_FLUSH_BYTES = 8 * 1024 * 1024


class _Version:
    """A batch's commit version, taken from ``meta`` when one of its bodies
    first writes a versionstamped key: most batches write none, and taking
    it anyway would cost every commit a statement and a page."""

    __slots__ = ("_conn", "_value")

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn
        self._value = 0

    def get(self) -> int:
        if not self._value:
            self._value = self._conn.execute(
                "UPDATE meta SET value = value + 1 WHERE name = 'commit_version' RETURNING value"
            ).fetchone()[0]
        return self._value

    def forget(self) -> None:
        """A rollback to a savepoint may have undone the UPDATE: take a new
        one if needed (the batch may then use two versions, both new)."""
        self._value = 0


class _WriteTransaction(_Reads):
    """One body of a group commit. Its writes stay in Python (``_body``) until
    the body succeeds; they then join the batch's pending writes (``_batch``),
    which reach SQLite at commit. Reads see body, then batch, then SQLite;
    range reads merge pending keys over SQLite's rows. Only a range read over
    a range cleared in the batch puts the pending writes into SQLite first
    (the body's under a savepoint, so a failing body can still be undone)."""

    def __init__(
        self, conn: sqlite3.Connection, started: float, version: _Version, order: int, batch: _Layer, cache: _ReadCache,
    ) -> None:
        super().__init__(conn, started)
        self._written = 0
        self._version = version
        self._order = order
        self._batch = batch
        self._cache = cache
        self._body = _Layer()
        self.savepoint = False
        self._ops = 0

    def _tick(self) -> None:
        # An operation that stays in memory takes a microsecond or so: the
        # clock is read at every AGE_CHECK_EVERYth of them, at every SQLite
        # read, and after the body, which is as good for the 5 s limit and
        # spares a clock read per key (a delivery makes some thirty).
        self._ops += 1
        if not self._ops % AGE_CHECK_EVERY:
            self._check_age()

    @property
    def snapshot(self) -> ReadTransaction:
        # Bodies run serially here, so there is no read conflict to avoid.
        return self

    def _count(self, n: int) -> None:
        self._tick()
        self._written += n
        if self._written > MAX_TRANSACTION_SIZE:
            raise LimitExceeded(f"transaction wrote more than {MAX_TRANSACTION_SIZE} bytes")

    def flush(self) -> None:
        """Put every pending write into SQLite (inside the body's savepoint)."""
        if self._batch:
            self._batch.apply(self._conn, self._cache)
        if self._body:
            if not self.savepoint:
                self._conn.execute("SAVEPOINT body")
                self.savepoint = True
            self._body.apply(self._conn, self._cache)

    def finish(self) -> None:
        """The body succeeded: its writes join the batch's."""
        self._batch.merge(self._body)
        if self.savepoint:
            self._conn.execute("RELEASE body")
        if self._batch.size > LAYER_FLUSH_BYTES:
            self._batch.apply(self._conn, self._cache)

    def undo(self) -> None:
        """The body failed: forget its writes."""
        if self.savepoint:
            self._conn.execute("ROLLBACK TO body")
            self._conn.execute("RELEASE body")
            self._version.forget()
            self._cache.clear()  # it saw the body's flushed writes

    def get(self, key: bytes) -> bytes | None:
        known, value = self._body.lookup(key)
        if known:
            self._tick()
            return value
        known, value = self._batch.lookup(key)
        if not known:
            known, value = self._cache.lookup(key)
        if known:
            self._tick()
            return value
        value = super().get(key)
        self._cache.put(key, value)
        return value

    def get_range(self, begin: bytes, end: bytes, limit: int = 0, reverse: bool = False) -> list[KeyValue]:
        body, batch = self._body, self._batch
        if not (body.touches(begin, end) or batch.touches(begin, end)):
            return super().get_range(begin, end, limit, reverse)
        if body.clears(begin, end) or batch.clears(begin, end):
            # A cleared range may hide any number of rows: let SQLite do it.
            self.flush()
            return super().get_range(begin, end, limit, reverse)
        # Pending keys in the range: merged over what SQLite has. Of the rows
        # SQLite returns, at most len(pending) are replaced or deleted, so
        # ``limit + len(pending)`` of them always cover the first ``limit``.
        pending: dict[bytes, bytes | None] = {}
        for layer in (batch, body):  # the body's writes came last
            for key in layer.keys_in(begin, end):
                pending[key] = layer.writes[key]
        merged: dict[bytes, bytes | None] = dict(super().get_range(begin, end, limit + len(pending) if limit > 0 else 0, reverse))
        merged.update(pending)
        rows = sorted(((k, v) for k, v in merged.items() if v is not None), reverse=reverse)
        return rows[:limit] if limit > 0 else rows

    def set(self, key: bytes, value: bytes) -> None:
        check_key(key)
        check_value(value)
        self._count(len(key) + len(value))
        self._put(key, bytes(value))

    def _put(self, key: bytes, value: bytes | None) -> None:
        self._body.put(key, value)
        if self._body.size > LAYER_FLUSH_BYTES:
            self.flush()

    def clear(self, key: bytes) -> None:
        check_key(key)
        self._count(len(key))
        self._put(key, None)

    def clear_range(self, begin: bytes, end: bytes) -> None:
        check_key(begin)
        check_key(end)
        self._count(len(begin) + len(end))
        if begin < end:
            self._body.clear_range(begin, end)

    def add(self, key: bytes, delta: int) -> None:
        check_key(key)
        self._count(len(key) + 8)
        current = decode_counter(self.get(key))
        # Wrap like FoundationDB's 64-bit two's-complement ADD.
        total = (current + delta + 2**63) % 2**64 - 2**63
        self._put(key, encode_counter(total))

    def set_versionstamped_key(self, key: bytes, value: bytes) -> None:
        if len(key) < 4:
            raise ValueError("versionstamped key needs a 4-byte offset suffix")
        (offset,) = struct.unpack("<I", key[-4:])
        body = key[:-4]
        if offset + VERSIONSTAMP_SIZE > len(body):
            raise ValueError("versionstamp offset out of range")
        stamp = struct.pack(">QH", self._version.get(), self._order)
        self.set(body[:offset] + stamp + body[offset + VERSIONSTAMP_SIZE :], value)


@dataclass(slots=True)
class _Job:
    fn: Callable[[Any], Any]
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[Any]
    attempts: int = 0
    result: Any = field(default=None)


#: A job with its result or its error, as the syncer hands it back.
_Answer = tuple[_Job, Any, BaseException | None]


class _HandBack:
    """Results from the store's threads to the event loops awaiting them.

    However many results arrive before a loop gets round to them cost one
    wake-up of that loop (a write to its self-pipe and a GIL hand-over),
    not one each: under load, a group commit's results and the reads that
    finished meanwhile all reach the loop together.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._waiting: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future[Any], Any, BaseException | None]]] = {}

    def put(self, loop: asyncio.AbstractEventLoop, future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
        with self._lock:
            box = self._waiting.get(loop)
            if box is not None and not loop.is_closed():
                box.append((future, result, error))
                return
            self._waiting[loop] = [(future, result, error)]
        try:
            loop.call_soon_threadsafe(self._drain, loop)
        except RuntimeError:  # the caller's loop is gone: nobody is waiting any more
            with self._lock:
                self._waiting.pop(loop, None)

    def _drain(self, loop: asyncio.AbstractEventLoop) -> None:
        with self._lock:
            box = self._waiting.pop(loop, [])
        for future, result, error in box:
            _resolve(future, result, error)


def _resolve(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


class EmbeddedDatabase:
    """The default store: see the module docstring."""

    def __init__(
        self,
        data_dir: str | os.PathLike[str],
        *,
        inject_conflicts: float = 0.0,
        retry_limit: int = 100,
        seed: int | None = None,
    ) -> None:
        os.makedirs(data_dir, exist_ok=True)
        self.path = os.path.join(os.fspath(data_dir), DB_FILENAME)
        self.inject_conflicts = inject_conflicts
        self.retry_limit = retry_limit
        self._random = random.Random(seed)
        init = _connect(self.path)
        try:
            init.executescript(SCHEMA)
            with init:
                stray = init.execute("SELECT value FROM kv WHERE key = ?", (_STRAY_VERSION_KEY,)).fetchone()
                if stray is not None:
                    init.execute(
                        "UPDATE meta SET value = max(value, ?) WHERE name = 'commit_version'",
                        (struct.unpack(">Q", stray[0])[0],),
                    )
                    init.execute("DELETE FROM kv WHERE key = ?", (_STRAY_VERSION_KEY,))
        finally:
            init.close()
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._closed = False
        self._lock_fd = os.open(self.path + "-writelock", os.O_RDWR | os.O_CREAT, 0o600)
        self._writer = threading.Thread(target=self._write_loop, name="rookery-kv-writer", daemon=True)
        self._writer.start()
        self._checkpoint_wanted = threading.Event()
        self._checkpointer = threading.Thread(target=self._checkpoint_loop, name="rookery-kv-checkpoint", daemon=True)
        self._checkpointer.start()
        self._hand_back = _HandBack()
        #: Answers of batches committed to the WAL, waiting for the syncer;
        #: ``None`` stops it.
        self._unsynced: queue.SimpleQueue[list[_Answer] | None] = queue.SimpleQueue()
        #: Why the store stopped (a failed fsync), once it has.
        self._failed: BaseException | None = None
        self._syncer = threading.Thread(target=self._sync_loop, name="rookery-kv-syncer", daemon=True)
        self._syncer.start()
        self._cache = _ReadCache()  # the writer thread's alone
        self._read_jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._readers = [
            threading.Thread(target=self._read_loop, name=f"rookery-kv-reader-{i}", daemon=True)
            for i in range(READER_THREADS)
        ]
        for thread in self._readers:
            thread.start()
        self.batches = 0  # group commits done, for benchmarks and tests
        self.syncs = 0  # WAL fsyncs done
        self.commits = 0

    # -- public contract -------------------------------------------------

    async def transact(self, fn: Callable[[Transaction], T]) -> T:
        self._check_open()
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._jobs.put(_Job(fn, loop, future))
        return await future

    async def read(self, fn: Callable[[ReadTransaction], T]) -> T:
        self._check_open()
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._read_jobs.put(_Job(fn, loop, future))
        return await future

    def _check_open(self) -> None:
        if self._failed is not None:
            raise StoreUnavailable(f"store stopped after a failed fsync: {self._failed}")
        if self._closed:
            raise StoreUnavailable("store is closed")

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._jobs.put(None)
        for _ in self._readers:
            self._read_jobs.put(None)
        self._checkpoint_wanted.set()
        loop = asyncio.get_running_loop()
        for thread in [self._writer, *self._readers, self._checkpointer]:
            await loop.run_in_executor(None, thread.join)
        self._unsynced.put(None)  # after the writer: its last batches are synced first
        await loop.run_in_executor(None, self._syncer.join)

    # -- readers ------------------------------------------------------------

    def _read_loop(self) -> None:
        conn: sqlite3.Connection | None = None
        try:
            while (job := self._read_jobs.get()) is not None:
                if conn is None:
                    conn = _connect(self.path)
                try:
                    result, error = self._run_read(conn, job.fn), None
                except BaseException as exc:  # noqa: BLE001 - delivered to the caller
                    result, error = None, exc
                self._hand_back.put(job.loop, job.future, result, error)
        finally:
            if conn is not None:
                conn.close()

    def _run_read(self, conn: sqlite3.Connection, fn: Callable[[ReadTransaction], T]) -> T:
        attempts = 0
        while True:
            conn.execute("BEGIN")
            try:
                return fn(_Reads(conn, time.monotonic()))
            except sqlite3.OperationalError as exc:
                attempts += 1
                if attempts > self.retry_limit:
                    raise RetryLimitReached(str(exc)) from exc
            finally:
                conn.execute("COMMIT")

    # -- writer -------------------------------------------------------------

    def _checkpoint_loop(self) -> None:
        """Copy the WAL back into the database file off the writer's path: a
        checkpoint in the writer (SQLite's default) stalls every commit behind
        it for the time it takes to write and fsync the database file."""
        conn: sqlite3.Connection | None = None
        try:
            while not self._closed:
                self._checkpoint_wanted.wait(CHECKPOINT_IDLE)
                self._checkpoint_wanted.clear()
                if self._closed:
                    break
                if self._failed is not None:
                    continue  # a checkpoint's sync must not stand in for the one that failed
                if conn is None:
                    conn = _connect(self.path)
                try:
                    conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
                except sqlite3.Error as exc:
                    # Busy with another process's checkpoint: next time. Any
                    # other error (I/O, a full disk) is worth an operator's eye.
                    busy = getattr(exc, "sqlite_errorcode", None) in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)
                    log.log(logging.DEBUG if busy else logging.WARNING, "checkpoint skipped: %s", exc)
        finally:
            if conn is not None:
                conn.close()

    def _sync_loop(self) -> None:
        """Make committed batches durable, then answer their callers: one
        ``fdatasync`` of the WAL for every batch committed meanwhile."""
        wal_fd = -1
        stop = False
        try:
            while not stop:
                first = self._unsynced.get()
                if first is None:
                    break
                answers = list(first)
                while True:  # every batch committed while the last sync ran
                    try:
                        more = self._unsynced.get_nowait()
                    except queue.Empty:
                        break
                    if more is None:
                        stop = True
                        break
                    answers.extend(more)
                error: BaseException | None = self._failed
                if error is None:
                    try:
                        if wal_fd < 0:
                            # The WAL exists once a batch committed, and stays
                            # the same file while the writer's connection is open.
                            wal_fd = os.open(self.path + "-wal", os.O_RDONLY)
                            _fsync_directory(os.path.dirname(self.path))
                        getattr(os, "fdatasync", os.fsync)(wal_fd)
                        self.syncs += 1
                    except BaseException as exc:  # noqa: BLE001 - the store stops, callers are told
                        log.critical("store stopped: fsync of the WAL failed: %s", exc)
                        self._failed = error = exc
                for job, result, failure in answers:
                    if error is not None:
                        failure = StoreUnavailable(f"commit not known to be durable: {error}")
                    self._deliver(job, None if failure else result, failure)
        finally:
            if wal_fd >= 0:
                os.close(wal_fd)

    def _write_loop(self) -> None:
        conn = _connect(self.path)
        # Commits reach the WAL unsynced; the syncer syncs them (module docstring).
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute(f"PRAGMA wal_autocheckpoint={WRITER_AUTOCHECKPOINT}")
        conn.execute(f"PRAGMA journal_size_limit={JOURNAL_SIZE_LIMIT}")
        pending: list[_Job] = []
        stop = False
        while not stop or pending:
            if not pending:
                job = self._jobs.get()
                if job is None:
                    break
                pending.append(job)
            # Writers of all processes on the file take turns through a
            # blocking ``flock`` on a lock file beside it: a waiting writer
            # wakes the moment the lock is free, where SQLite's busy handler
            # would poll with sleeps of up to 100 ms. The batch is taken only
            # once the lock is held, so it includes every body that arrived
            # while this process waited its turn: under contention from
            # other processes, batches grow instead of commits multiplying.
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
            batch: list[_Job] = []
            try:
                while len(pending) < MAX_BATCH and not stop:
                    try:
                        job = self._jobs.get_nowait()
                    except queue.Empty:
                        break
                    if job is None:
                        stop = True
                        break
                    pending.append(job)
                batch, pending = pending[:MAX_BATCH], pending[MAX_BATCH:]
                pending = self._run_batch_locked(conn, batch) + pending
            except BaseException as exc:  # the writer must outlive any one batch
                log.exception("store writer failed a batch")
                self._cache.clear()
                for job in batch:
                    self._deliver(job, None, StoreUnavailable(f"store writer error: {exc}"))
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
            finally:
                fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
        conn.close()
        os.close(self._lock_fd)

    def _run_batch_locked(self, conn: sqlite3.Connection, batch: list[_Job]) -> list[_Job]:
        if self._failed is not None:
            # Nothing committed from now on could be known to be durable.
            for job in batch:
                self._deliver(job, None, StoreUnavailable(f"store stopped after a failed fsync: {self._failed}"))
            return []
        retry: list[_Job] = []
        done: list[_Job] = []
        #: Bodies that raised: answered, like successes, once the batch is synced.
        failed: list[tuple[_Job, BaseException]] = []
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as exc:
            log.warning("store busy, retrying batch: %s", exc)
            return self._requeue(batch, exc)
        pending = _Layer()
        cache = self._cache
        try:
            data_version = conn.execute("PRAGMA data_version").fetchone()[0]
            if data_version != cache.data_version:
                cache.clear()  # another connection committed since our last batch
                cache.data_version = data_version
            version = _Version(conn)
            for order, job in enumerate(batch):
                tr = _WriteTransaction(conn, time.monotonic(), version, order, pending, cache)
                try:
                    job.result = job.fn(tr)
                    # A body past 5 s fails at commit on FoundationDB even if its last call was earlier.
                    tr._check_age()
                    if self.inject_conflicts and self._random.random() < self.inject_conflicts:
                        raise NotCommitted("injected conflict (test mode)")
                except BaseException as exc:  # noqa: BLE001 - delivered to the caller
                    try:
                        tr.undo()
                    except sqlite3.Error:
                        retry.append(job)  # the whole batch is retried, this body with it
                        raise
                    if isinstance(exc, RetryableError):
                        retry.append(job)
                    else:
                        failed.append((job, exc))
                    continue
                try:
                    tr.finish()
                except sqlite3.Error:
                    retry.append(job)
                    raise
                done.append(job)
            pending.apply(conn, cache)
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            log.warning("group commit failed, retrying %d bodies: %s", len(done) + len(failed), exc)
            cache.clear()
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            # A body's error may come from what the batch rolled back: run it again too.
            return self._requeue(done + [job for job, _ in failed] + retry, exc)
        self.batches += 1
        if self.batches % CHECKPOINT_EVERY == 0:
            self._checkpoint_wanted.set()
        self.commits += len(done)
        if done or failed:
            self._unsynced.put([(job, job.result, None) for job in done] + [(job, None, exc) for job, exc in failed])
        return self._requeue(retry, NotCommitted("conflict"))

    def _deliver(self, job: _Job, result: Any, error: BaseException | None) -> None:
        self._hand_back.put(job.loop, job.future, result, error)

    def _requeue(self, jobs: list[_Job], cause: BaseException) -> list[_Job]:
        again = []
        for job in jobs:
            job.attempts += 1
            if job.attempts > self.retry_limit:
                self._deliver(job, None, RetryLimitReached(f"gave up after {job.attempts} attempts: {cause}"))
            else:
                again.append(job)
        if again and not isinstance(cause, NotCommitted):
            time.sleep(0.01)
        return again
