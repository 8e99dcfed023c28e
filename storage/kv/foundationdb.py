"""FoundationDB backend: the official ``foundationdb`` binding behind the KV contract.

The binding blocks, so every transaction runs in a worker thread of a
:class:`~concurrent.futures.ThreadPoolExecutor` (DESIGN.md principle 6), inside
the retry loop the FoundationDB developer guide prescribes: run the body,
commit, and on an :class:`fdb.FDBError` hand the error to ``tr.on_error``,
which backs off and resets the transaction if the error is retryable
(``not_committed``, ``transaction_too_old``, ``commit_unknown_result``...) or
raises it again otherwise. The retry limit and the timeout are database
options, so they hold for every transaction. Every write carries a commit
marker, so that a retry after ``commit_unknown_result`` does not apply a
body a second time when the first attempt did land (see ``_run``).

Errors leave as the contract's: a body that outlives 5 s ->
:class:`TransactionTooOld`; too large -> :class:`LimitExceeded`; retries used up
-> :class:`RetryLimitReached`; cluster unreachable or timed out ->
:class:`StoreUnavailable`.

Only the constructor imports ``fdb`` and selects the API version, so this
module imports on machines without the client library (``libfdb_c``).
"""

from __future__ import annotations

import asyncio
import functools
import os
import random
import struct
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from .. import keys
from .base import (
    MAX_TRANSACTION_SECONDS,
    MAX_TRANSACTION_SIZE,
    VERSIONSTAMP_SIZE,
    KeyValue,
    KVError,
    LimitExceeded,
    ReadTransaction,
    RetryLimitReached,
    StoreUnavailable,
    Transaction,
    TransactionTooOld,
    check_key,
    check_value,
    encode_counter,
)

T = TypeVar("T")

# FoundationDB error codes: https://apple.github.io/foundationdb/api-error-codes.html
TRANSACTION_TOO_OLD = 1007
NOT_COMMITTED = 1020
COMMIT_UNKNOWN_RESULT = 1021
TRANSACTION_TIMED_OUT = 1031
TOO_LARGE = frozenset({2101, 2102, 2103})  # transaction_too_large, key_too_large, value_too_large
UNAVAILABLE = frozenset(
    {
        1004,  # timed_out
        1031,  # transaction_timed_out: how an unreachable cluster shows with a timeout set
        1038,  # database_locked
        1510,  # io_error
        1511,  # file_not_found
        1513,  # file_not_readable
        1515,  # no_cluster_file_found
        2008,  # network_not_setup
        2100,  # incompatible_protocol_version
        2104,  # connection_string_invalid
        2107,  # tls_error
    }
)

#: Commit markers are swept by one write in this many, and kept this long.
MARKER_SWEEP_EVERY = 1000
MARKER_KEEP_HOURS = 2

#: Versionstamp offsets became four bytes at 520; database-wide timeouts need 610.
MIN_API_VERSION = 610

_api_lock = threading.Lock()


def _load_fdb(api_version: int) -> Any:
    """Import ``fdb`` and select ``api_version``, once per process."""
    with _api_lock:
        try:
            import fdb
        except ImportError as exc:
            raise StoreUnavailable(f"the foundationdb package is not installed: {exc}") from exc
        if fdb.is_api_version_selected():
            # The API version is process-wide and can be chosen only once.
            selected = fdb.get_api_version()
            if selected != api_version:
                raise ValueError(f"FoundationDB API version {selected} already selected in this process, not {api_version}")
            return fdb
        try:
            fdb.api_version(api_version)
        except Exception as exc:  # the binding raises a bare Exception when libfdb_c is missing
            raise StoreUnavailable(f"FoundationDB client library unusable: {exc}") from exc
        return fdb


class _Reads:
    """Contract reads over an ``fdb`` transaction or its ``snapshot``."""

    __slots__ = ("_tr", "_started", "_want_all")

    def __init__(self, tr: Any, started: float, want_all: Any) -> None:
        self._tr = tr
        self._started = started
        self._want_all = want_all

    def _check_age(self) -> None:
        # FoundationDB would fail this transaction anyway (1007 or the 5 s
        # timeout); failing here gives the same error as the embedded store,
        # and leaves FoundationDB's 1031 to mean "the cluster did not answer".
        if time.monotonic() - self._started > MAX_TRANSACTION_SECONDS:
            raise TransactionTooOld("transaction older than 5 seconds")

    def get(self, key: bytes) -> bytes | None:
        self._check_age()
        value = self._tr.get(key).wait()
        return bytes(value) if value.present() else None

    def get_range(self, begin: bytes, end: bytes, limit: int = 0, reverse: bool = False) -> list[KeyValue]:
        self._check_age()
        if begin >= end:
            return []
        # want_all: the contract returns a list, so fetch it in as few round trips as possible.
        kvs = self._tr.get_range(begin, end, limit=limit, reverse=reverse, streaming_mode=self._want_all)
        return [(kv.key, kv.value) for kv in kvs]


class _Transaction(_Reads):
    """The contract's read-write transaction over an ``fdb`` transaction."""

    __slots__ = ("_written",)

    def __init__(self, tr: Any, started: float, want_all: Any) -> None:
        super().__init__(tr, started, want_all)
        self._written = 0

    @property
    def snapshot(self) -> ReadTransaction:
        return _Reads(self._tr.snapshot, self._started, self._want_all)

    def _count(self, n: int) -> None:
        # Counted as the embedded store counts, so a body that passes there
        # passes here; FoundationDB's own 2101 still maps to LimitExceeded.
        self._check_age()
        self._written += n
        if self._written > MAX_TRANSACTION_SIZE:
            raise LimitExceeded(f"transaction wrote more than {MAX_TRANSACTION_SIZE} bytes")

    def set(self, key: bytes, value: bytes) -> None:
        check_key(key)
        check_value(value)
        self._count(len(key) + len(value))
        self._tr.set(key, value)

    def clear(self, key: bytes) -> None:
        check_key(key)
        self._count(len(key))
        self._tr.clear(key)

    def clear_range(self, begin: bytes, end: bytes) -> None:
        check_key(begin)
        check_key(end)
        self._count(len(begin) + len(end))
        if begin >= end:
            return  # FoundationDB raises inverted_range (2005); the contract clears nothing
        self._tr.clear_range(begin, end)

    def add(self, key: bytes, delta: int) -> None:
        check_key(key)
        self._count(len(key) + 8)
        # Two's-complement wrap, so any Python int becomes FoundationDB's 64-bit ADD operand.
        self._tr.add(key, encode_counter((delta + 2**63) % 2**64 - 2**63))

    def set_versionstamped_key(self, key: bytes, value: bytes) -> None:
        if len(key) < 4:
            raise ValueError("versionstamped key needs a 4-byte offset suffix")
        (offset,) = struct.unpack("<I", key[-4:])
        if offset + VERSIONSTAMP_SIZE > len(key) - 4:
            raise ValueError("versionstamp offset out of range")
        # The stored key is the key without its offset suffix.
        check_key(key[:-4])
        check_value(value)
        self._count(len(key) - 4 + len(value))
        self._tr.set_versionstamped_key(key, value)


class _ScanCursor:
    """State of one :meth:`FoundationDBDatabase.scan`: its transaction and position."""

    __slots__ = ("tr", "after", "fresh")

    def __init__(self, begin: bytes) -> None:
        self.tr: Any = None
        self.after = begin
        self.fresh = True


#: The cluster file a FoundationDB client uses when none is named (Linux).
DEFAULT_CLUSTER_FILE = "/etc/foundationdb/fdb.cluster"

class FoundationDBDatabase:
    """The KV contract on a FoundationDB cluster.

    Arguments:
        cluster_file: path of the cluster file naming the coordinators.
        api_version: FoundationDB API version, selected once per process
            (at least 610); every instance in a process must agree.
        retry_limit: retries of one transaction before
            :class:`RetryLimitReached` (database option ``transaction_retry_limit``).
        timeout_ms: lifetime of one transaction, retries included (API >= 610
            does not reset it in ``on_error``), before it is cancelled
            (database option ``transaction_timeout``).
        executor_threads: worker threads running transaction bodies.

    Raises :class:`StoreUnavailable` if the client library or cluster file is
    missing. ``fdb.open`` caches one database handle per cluster file, so
    instances on the same file share it and its options.
    """

    def __init__(
        self,
        cluster_file: str,
        *,
        api_version: int = 730,
        retry_limit: int = 100,
        timeout_ms: int = 5000,
        executor_threads: int = 16,
    ) -> None:
        if api_version < MIN_API_VERSION:
            raise ValueError(f"FoundationDB API version must be at least {MIN_API_VERSION}")
        # Empty: where FoundationDB's own tools look (FDB_CLUSTER_FILE, then the default path).
        cluster_file = cluster_file or os.environ.get("FDB_CLUSTER_FILE") or DEFAULT_CLUSTER_FILE
        if not os.path.isfile(cluster_file):
            raise StoreUnavailable(f"FoundationDB cluster file {cluster_file!r} not found")
        self._fdb = _load_fdb(api_version)
        try:
            self._db = self._fdb.open(cluster_file)
            self._db.options.set_transaction_retry_limit(retry_limit)
            self._db.options.set_transaction_timeout(timeout_ms)
        except self._fdb.FDBError as exc:
            raise self._translate(exc) from exc
        self.cluster_file = cluster_file
        self.retry_limit = retry_limit
        self._want_all = self._fdb.StreamingMode.want_all
        self._executor = ThreadPoolExecutor(executor_threads, thread_name_prefix="rookery-fdb")
        self._closed = False

    # -- public contract -------------------------------------------------

    async def transact(self, fn: Callable[[Transaction], T]) -> T:
        return await self._submit(functools.partial(self._run, fn, True))

    async def read(self, fn: Callable[[ReadTransaction], T]) -> T:
        return await self._submit(functools.partial(self._run, fn, False))

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        # The database handle stays: fdb.open shares it per cluster file and
        # the network thread cannot be restarted once stopped.
        await asyncio.get_running_loop().run_in_executor(None, functools.partial(self._executor.shutdown, wait=True))

    async def scan(self, begin: bytes, end: bytes, batch_size: int = 1000) -> AsyncIterator[KeyValue]:
        """Yield every pair with ``begin <= key < end`` in key order, ``batch_size`` per read.

        Batches share one transaction while it lives; once it is too old
        (1007) or timed out (1031) the scan continues in a new transaction after
        the last key returned. The result is therefore not one snapshot:
        keys written during the scan may or may not appear.
        """
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        cursor = _ScanCursor(begin)
        while True:
            batch = await self._submit(functools.partial(self._scan_batch, cursor, end, batch_size))
            for pair in batch:
                yield pair
            if len(batch) < batch_size:
                return

    # -- worker threads ---------------------------------------------------

    async def _submit(self, call: Callable[[], T]) -> T:
        if self._closed:
            raise StoreUnavailable("store is closed")
        try:
            future = asyncio.get_running_loop().run_in_executor(self._executor, call)
        except RuntimeError as exc:  # the executor was shut down by a concurrent close()
            raise StoreUnavailable("store is closed") from exc
        return await future

    def _run(self, fn: Callable[[Any], T], write: bool) -> T:
        """FoundationDB's retry loop, in a worker thread.

        A write also sets a commit marker of its own (``keys.commit_marker``),
        its value the attempt number. After ``commit_unknown_result`` the
        next attempt first reads the marker, as the developer guide
        prescribes: present means an earlier attempt committed, and that
        attempt's result is returned instead of running the body again (a
        delivery must not land twice); absent means none did.
        """
        tr = self._db.create_transaction()
        retries = 0
        marker = keys.commit_marker(int(time.time()) // 3600, os.urandom(16)) if write else b""
        uncertain: dict[int, T] = {}  # attempts that ended in commit_unknown_result
        while True:
            started = time.monotonic()
            result: T | None = None
            try:
                if write:
                    if uncertain:
                        landed = tr.get(marker).wait()
                        if landed.present():
                            return uncertain[int(bytes(landed))]
                        uncertain.clear()  # none of them committed
                    result = fn(_Transaction(tr, started, self._want_all))
                    if time.monotonic() - started > MAX_TRANSACTION_SECONDS:
                        # The contract fails a body past 5 s even if its last call came
                        # earlier; retrying it would only fail the same way.
                        raise TransactionTooOld("transaction older than 5 seconds")
                    tr.set(marker, str(retries).encode())
                    self._maybe_clear_markers(tr)
                    tr.commit().wait()
                else:
                    # Snapshot reads: a transaction that never commits cannot
                    # conflict, so read conflict ranges would be wasted work.
                    result = fn(_Reads(tr.snapshot, started, self._want_all))
                return result
            except self._fdb.FDBError as exc:
                error = exc
            if error.code == COMMIT_UNKNOWN_RESULT and write:
                uncertain[retries] = result  # type: ignore[assignment]
            if error.code == TRANSACTION_TIMED_OUT and retries:
                # The timeout spans every retry (API >= 610): retrying used up
                # the time, which says nothing about the cluster being down.
                raise RetryLimitReached(f"gave up after {retries} retries: {error}") from error
            try:
                tr.on_error(error).wait()
            except self._fdb.FDBError as exc:
                raise self._translate(exc) from exc
            retries += 1

    def _maybe_clear_markers(self, tr: Any) -> None:
        """Now and then (one write in :data:`MARKER_SWEEP_EVERY`), clear the
        commit markers of hours before the last :data:`MARKER_KEEP_HOURS`."""
        if random.randrange(MARKER_SWEEP_EVERY):
            return
        tr.clear_range(*keys.commit_markers_before(int(time.time()) // 3600 - MARKER_KEEP_HOURS))

    def _scan_batch(self, cursor: _ScanCursor, end: bytes, limit: int) -> list[KeyValue]:
        restarts = 0
        while True:
            if cursor.tr is None:
                cursor.tr = self._db.create_transaction()
                cursor.fresh = True
            reads = _Reads(cursor.tr.snapshot, time.monotonic(), self._want_all)
            try:
                batch = reads.get_range(cursor.after, end, limit)
            except self._fdb.FDBError as exc:
                error = exc
            else:
                if batch:
                    # The smallest key after the last one returned.
                    cursor.after = batch[-1][0] + b"\x00"
                cursor.fresh = False
                return batch
            if error.code in (TRANSACTION_TOO_OLD, TRANSACTION_TIMED_OUT) and not cursor.fresh:
                # The scan outlived its transaction: resume after the last key in a new one.
                restarts += 1
                if restarts > self.retry_limit:
                    raise RetryLimitReached(f"scan restarted {restarts} times: {error}") from error
                cursor.tr = None
                continue
            try:
                cursor.tr.on_error(error).wait()
            except self._fdb.FDBError as exc:
                raise self._translate(exc) from exc

    def _translate(self, error: Any) -> KVError:
        """The contract's error for an ``FDBError`` that ``on_error`` gave back."""
        code: int = error.code
        if code == TRANSACTION_TOO_OLD:
            return TransactionTooOld(str(error))
        if code in TOO_LARGE:
            return LimitExceeded(str(error))
        if self._fdb.predicates.is_retryable(error):
            # on_error hands a retryable error back only once the retry limit is spent.
            return RetryLimitReached(f"gave up after {self.retry_limit} retries: {error}")
        if code in UNAVAILABLE:
            return StoreUnavailable(str(error))
        return KVError(f"FoundationDB error: {error}")
