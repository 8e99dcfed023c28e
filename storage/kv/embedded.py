"""Embedded backend: one SQLite file in WAL mode, FoundationDB's limits enforced.

Writes go through one writer thread per process that runs transaction bodies
one after another inside a single SQLite write transaction, each body in its
own savepoint, then commits the whole batch with one fsync (group commit, as
Postfix and FoundationDB's commit proxies do). Bodies therefore see a
serializable order; a body that raises is rolled back to its savepoint alone.
Several processes may share the file: SQLite's write lock (``BEGIN
IMMEDIATE`` with a busy timeout) orders their batches.

Read-only transactions run on a small pool of reader connections: in WAL mode
each sees a consistent snapshot without blocking the writer.

``inject_conflicts`` (0..1) makes that fraction of successful bodies fail with
:class:`NotCommitted` before their savepoint is released, so tests exercise
every retry loop as FoundationDB would.
"""

from __future__ import annotations

import asyncio
import logging
import os
import queue
import random
import sqlite3
import struct
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
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

SCHEMA = """
CREATE TABLE IF NOT EXISTS kv (key BLOB PRIMARY KEY, value BLOB NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
INSERT OR IGNORE INTO meta VALUES ('commit_version', 0);
"""


def _connect(path: str) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=BUSY_TIMEOUT_MS / 1000)
    conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
    conn.execute("PRAGMA journal_mode=WAL")
    # Durable means on disk: the WAL is fsynced at every commit (DESIGN.md).
    conn.execute("PRAGMA synchronous=FULL")
    # Reads through the OS page cache without copying, and a bigger private
    # cache: most reads are point lookups of hot keys.
    conn.execute("PRAGMA mmap_size=1073741824")
    conn.execute("PRAGMA cache_size=-65536")
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


class _WriteTransaction(_Reads):
    def __init__(self, conn: sqlite3.Connection, started: float, stamp: bytes) -> None:
        super().__init__(conn, started)
        self._written = 0
        self._stamp = stamp

    @property
    def snapshot(self) -> ReadTransaction:
        # Bodies run serially here, so there is no read conflict to avoid.
        return self

    def _count(self, n: int) -> None:
        self._check_age()
        self._written += n
        if self._written > MAX_TRANSACTION_SIZE:
            raise LimitExceeded(f"transaction wrote more than {MAX_TRANSACTION_SIZE} bytes")

    def set(self, key: bytes, value: bytes) -> None:
        check_key(key)
        check_value(value)
        self._count(len(key) + len(value))
        self._conn.execute("INSERT OR REPLACE INTO kv VALUES (?, ?)", (key, value))

    def clear(self, key: bytes) -> None:
        check_key(key)
        self._count(len(key))
        self._conn.execute("DELETE FROM kv WHERE key = ?", (key,))

    def clear_range(self, begin: bytes, end: bytes) -> None:
        check_key(begin)
        check_key(end)
        self._count(len(begin) + len(end))
        self._conn.execute("DELETE FROM kv WHERE key >= ? AND key < ?", (begin, end))

    def add(self, key: bytes, delta: int) -> None:
        check_key(key)
        self._count(len(key) + 8)
        current = decode_counter(self.get(key))
        # Wrap like FoundationDB's 64-bit two's-complement ADD.
        total = (current + delta + 2**63) % 2**64 - 2**63
        self._conn.execute("INSERT OR REPLACE INTO kv VALUES (?, ?)", (key, encode_counter(total)))

    def set_versionstamped_key(self, key: bytes, value: bytes) -> None:
        if len(key) < 4:
            raise ValueError("versionstamped key needs a 4-byte offset suffix")
        (offset,) = struct.unpack("<I", key[-4:])
        body = key[:-4]
        if offset + VERSIONSTAMP_SIZE > len(body):
            raise ValueError("versionstamp offset out of range")
        self.set(body[:offset] + self._stamp + body[offset + VERSIONSTAMP_SIZE :], value)


@dataclass(slots=True)
class _Job:
    fn: Callable[[Any], Any]
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[Any]
    attempts: int = 0
    result: Any = field(default=None)


def _deliver(job: _Job, result: Any, error: BaseException | None) -> None:
    """Hand a result to the job's loop from the writer thread."""
    try:
        job.loop.call_soon_threadsafe(_resolve, job.future, result, error)
    except RuntimeError:
        pass  # the caller's loop is gone: nobody is waiting any more


def _deliver_all(jobs: list[_Job]) -> None:
    """Hand a whole group commit's results over with one wake-up per loop,
    not one per transaction (each wake-up is a write to the loop's pipe)."""
    by_loop: dict[asyncio.AbstractEventLoop, list[_Job]] = {}
    for job in jobs:
        by_loop.setdefault(job.loop, []).append(job)
    for loop, group in by_loop.items():
        try:
            loop.call_soon_threadsafe(_resolve_many, [(j.future, j.result) for j in group])
        except RuntimeError:
            pass  # the caller's loop is gone: nobody is waiting any more


def _resolve_many(results: list[tuple[asyncio.Future[Any], Any]]) -> None:
    for future, result in results:
        _resolve(future, result, None)


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
        finally:
            init.close()
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._closed = False
        self._writer = threading.Thread(target=self._write_loop, name="rookery-kv-writer", daemon=True)
        self._writer.start()
        self._local = threading.local()
        self._readers = ThreadPoolExecutor(READER_THREADS, thread_name_prefix="rookery-kv-reader")
        self.batches = 0  # group commits done, for benchmarks and tests
        self.commits = 0

    # -- public contract -------------------------------------------------

    async def transact(self, fn: Callable[[Transaction], T]) -> T:
        if self._closed:
            raise StoreUnavailable("store is closed")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._jobs.put(_Job(fn, loop, future))
        return await future

    async def read(self, fn: Callable[[ReadTransaction], T]) -> T:
        if self._closed:
            raise StoreUnavailable("store is closed")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._readers, self._run_read, fn)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._jobs.put(None)
        await asyncio.get_running_loop().run_in_executor(None, self._writer.join)
        self._readers.shutdown(wait=True)

    # -- readers ------------------------------------------------------------

    def _run_read(self, fn: Callable[[ReadTransaction], T]) -> T:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = _connect(self.path)
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

    def _write_loop(self) -> None:
        conn = _connect(self.path)
        pending: list[_Job] = []
        stop = False
        while not stop or pending:
            if not pending:
                job = self._jobs.get()
                if job is None:
                    break
                pending.append(job)
            while len(pending) < MAX_BATCH:
                try:
                    job = self._jobs.get_nowait()
                except queue.Empty:
                    break
                if job is None:
                    stop = True
                    break
                pending.append(job)
            batch, pending = pending[:MAX_BATCH], pending[MAX_BATCH:]
            try:
                pending = self._run_batch(conn, batch) + pending
            except BaseException as exc:  # the writer must outlive any one batch
                log.exception("store writer failed a batch")
                for job in batch:
                    _deliver(job, None, StoreUnavailable(f"store writer error: {exc}"))
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
        conn.close()

    def _run_batch(self, conn: sqlite3.Connection, batch: list[_Job]) -> list[_Job]:
        """Run ``batch`` in one SQLite transaction; return the jobs to run again."""
        retry: list[_Job] = []
        done: list[_Job] = []
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as exc:
            log.warning("store busy, retrying batch: %s", exc)
            return self._requeue(batch, exc)
        try:
            version = conn.execute(
                "UPDATE meta SET value = value + 1 WHERE name = 'commit_version' RETURNING value"
            ).fetchone()[0]
            for order, job in enumerate(batch):
                stamp = struct.pack(">QH", version, order)
                conn.execute("SAVEPOINT body")
                try:
                    tr = _WriteTransaction(conn, time.monotonic(), stamp)
                    job.result = job.fn(tr)
                    # A body past 5 s fails at commit on FoundationDB even if its last call was earlier.
                    tr._check_age()
                    if self.inject_conflicts and self._random.random() < self.inject_conflicts:
                        raise NotCommitted("injected conflict (test mode)")
                except BaseException as exc:  # noqa: BLE001 - delivered to the caller
                    conn.execute("ROLLBACK TO body")
                    conn.execute("RELEASE body")
                    if isinstance(exc, RetryableError):
                        retry.append(job)
                    else:
                        _deliver(job, None, exc)
                    continue
                conn.execute("RELEASE body")
                done.append(job)
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            log.warning("group commit failed, retrying %d bodies: %s", len(done), exc)
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            return self._requeue(done + retry, exc)
        self.batches += 1
        self.commits += len(done)
        _deliver_all(done)
        return self._requeue(retry, NotCommitted("conflict"))

    def _requeue(self, jobs: list[_Job], cause: BaseException) -> list[_Job]:
        again = []
        for job in jobs:
            job.attempts += 1
            if job.attempts > self.retry_limit:
                _deliver(job, None, RetryLimitReached(f"gave up after {job.attempts} attempts: {cause}"))
            else:
                again.append(job)
        if again and not isinstance(cause, NotCommitted):
            time.sleep(0.01)
        return again
