"""The ordered-KV contract (storage/kv/base.py), one suite run on every backend.

Backends: ``embedded`` (SQLite), ``embedded-conflicts`` (SQLite failing 30 % of
bodies with NotCommitted, so every retry path runs) and ``foundationdb`` (only
when ``ROOKERY_FDB_CLUSTER_FILE`` names a cluster; its keys live under one test
subspace, cleared before and after each test).
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest

from storage.keys import pack, prefix_range, versionstamp_key
from storage.kv import open_database
from storage.kv.base import (
    MAX_KEY_SIZE,
    MAX_VALUE_SIZE,
    Database,
    LimitExceeded,
    ReadTransaction,
    StoreUnavailable,
    Transaction,
    TransactionTooOld,
    decode_counter,
    encode_counter,
)
from storage.kv.embedded import EmbeddedDatabase
from storage.kv.foundationdb import FoundationDBDatabase
from storage.kv.scan import scan_range

T = TypeVar("T")

FDB_CLUSTER_FILE_ENV = "ROOKERY_FDB_CLUSTER_FILE"
SPACE = ("test", "kv")
BEGIN, END = prefix_range(SPACE)


def k(*parts: object) -> bytes:
    """A key in the test subspace."""
    return pack((*SPACE, *parts))


def padded_key(size: int) -> bytes:
    """A test-subspace key of exactly ``size`` bytes (a bytes element costs 2 bytes of framing)."""
    filler = size - len(k()) - 2
    key = k(b"x" * filler)
    assert len(key) == size
    return key


@dataclass
class Store:
    name: str
    db: Database
    opener: Callable[[], Database]
    handles: list[Database] = field(default_factory=list)

    def open(self) -> Database:
        """Another handle on the same store, as a second node process would have."""
        db = self.opener()
        self.handles.append(db)
        return db


async def clear_space(db: Database) -> None:
    await db.transact(lambda tr: tr.clear_range(BEGIN, END))


async def all_pairs(db: Database) -> list[tuple[bytes, bytes]]:
    return await db.read(lambda tr: tr.get_range(BEGIN, END))


@pytest.fixture(params=["embedded", "embedded-conflicts", "foundationdb"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    opener: Callable[[], Database]
    if request.param == "foundationdb":
        cluster_file = os.environ.get(FDB_CLUSTER_FILE_ENV)
        if not cluster_file:
            pytest.skip("ROOKERY_FDB_CLUSTER_FILE not set: no FoundationDB cluster to test against")
        opener = lambda: FoundationDBDatabase(cluster_file)  # noqa: E731
    elif request.param == "embedded":
        opener = lambda: EmbeddedDatabase(tmp_path / "data")  # noqa: E731
    else:
        opener = lambda: EmbeddedDatabase(tmp_path / "data", inject_conflicts=0.3, seed=20240601)  # noqa: E731

    db = opener()
    s = Store(request.param, db, opener, [db])
    await clear_space(db)
    try:
        yield s
    finally:
        cleaner = opener()  # the test may have closed its handles
        try:
            await clear_space(cleaner)
        finally:
            await cleaner.close()
            for handle in s.handles:
                await handle.close()


# -- single keys ------------------------------------------------------------


async def test_get_set_clear(store: Store) -> None:
    db = store.db
    await db.transact(lambda tr: tr.set(k("a"), b"one"))
    assert await db.read(lambda tr: tr.get(k("a"))) == b"one"
    assert await db.read(lambda tr: tr.get(k("missing"))) is None

    await db.transact(lambda tr: tr.set(k("a"), b"two"))
    assert await db.read(lambda tr: tr.get(k("a"))) == b"two"

    await db.transact(lambda tr: tr.set(k("empty"), b""))
    assert await db.read(lambda tr: tr.get(k("empty"))) == b""

    await db.transact(lambda tr: tr.clear(k("a")))
    await db.transact(lambda tr: tr.clear(k("never-written")))
    assert await db.read(lambda tr: tr.get(k("a"))) is None
    assert await all_pairs(db) == [(k("empty"), b"")]


async def test_transact_returns_body_result(store: Store) -> None:
    def body(tr: Transaction) -> str:
        tr.set(k("r"), b"1")
        return "done"

    assert await store.db.transact(body) == "done"


# -- ranges -----------------------------------------------------------------


async def fill(db: Database, n: int) -> list[bytes]:
    keys = [k(i) for i in range(n)]

    def body(tr: Transaction) -> None:
        for i, key in enumerate(keys):
            tr.set(key, str(i).encode())

    await db.transact(body)
    return keys


async def test_get_range_forward_reverse_limit_bounds(store: Store) -> None:
    db = store.db
    keys = await fill(db, 10)

    def get(begin: bytes, end: bytes, limit: int = 0, reverse: bool = False) -> Any:
        return db.read(lambda tr: tr.get_range(begin, end, limit=limit, reverse=reverse))

    everything = await get(BEGIN, END)
    assert [key for key, _ in everything] == keys
    assert [value for _, value in everything] == [str(i).encode() for i in range(10)]

    # begin inclusive, end exclusive
    assert [key for key, _ in await get(keys[2], keys[5])] == keys[2:5]
    assert [key for key, _ in await get(keys[2], keys[2])] == []
    assert [key for key, _ in await get(keys[5], keys[2])] == []
    # limit applies from the start, or from the end when reversed
    assert [key for key, _ in await get(BEGIN, END, limit=3)] == keys[:3]
    assert [key for key, _ in await get(BEGIN, END, reverse=True)] == keys[::-1]
    assert [key for key, _ in await get(BEGIN, END, limit=3, reverse=True)] == keys[:-4:-1]
    assert [key for key, _ in await get(keys[2], keys[5], reverse=True)] == keys[4:1:-1]
    assert [key for key, _ in await get(keys[2], keys[5], limit=2, reverse=True)] == [keys[4], keys[3]]
    assert [key for key, _ in await get(BEGIN, END, limit=100)] == keys


async def test_keys_order_as_unsigned_bytes(store: Store) -> None:
    keys = [k(b""), k(b"\x00"), k(b"\x00\x00"), k(b"\x01"), k(b"\xfe"), k(b"\xff"), k(-1), k(0), k(2**40), k("z")]

    def body(tr: Transaction) -> None:
        for key in keys:
            tr.set(key, b"v")

    await store.db.transact(body)
    assert [key for key, _ in await all_pairs(store.db)] == sorted(keys)


async def test_clear_range(store: Store) -> None:
    db = store.db
    keys = await fill(db, 10)
    await db.transact(lambda tr: tr.clear_range(keys[3], keys[7]))
    assert [key for key, _ in await all_pairs(db)] == keys[:3] + keys[7:]
    # an empty or inverted range clears nothing
    await db.transact(lambda tr: tr.clear_range(keys[8], keys[8]))
    await db.transact(lambda tr: tr.clear_range(keys[9], keys[0]))
    assert [key for key, _ in await all_pairs(db)] == keys[:3] + keys[7:]


# -- atomic add ---------------------------------------------------------------


async def read_counter(db: Database, key: bytes) -> int:
    return decode_counter(await db.read(lambda tr: tr.get(key)))


async def test_atomic_add(store: Store) -> None:
    db = store.db
    counter = k("counter")
    assert await read_counter(db, counter) == 0
    await db.transact(lambda tr: tr.add(counter, 5))
    assert await read_counter(db, counter) == 5
    await db.transact(lambda tr: tr.add(counter, -7))
    assert await read_counter(db, counter) == -2
    assert await db.read(lambda tr: tr.get(counter)) == encode_counter(-2)

    # 64-bit two's-complement wrap, as FoundationDB's ADD
    top = k("top")
    await db.transact(lambda tr: tr.add(top, 2**63 - 1))
    await db.transact(lambda tr: tr.add(top, 1))
    assert await read_counter(db, top) == -(2**63)


async def test_concurrent_adds(store: Store) -> None:
    counter = k("counter")
    await asyncio.gather(*(store.db.transact(lambda tr: tr.add(counter, 1)) for _ in range(100)))
    assert await read_counter(store.db, counter) == 100


# -- transactions -------------------------------------------------------------


async def test_read_your_writes(store: Store) -> None:
    await store.db.transact(lambda tr: tr.set(k("old"), b"old"))

    def body(tr: Transaction) -> list[Any]:
        seen: list[Any] = []
        tr.set(k("new"), b"new")
        seen.append(tr.get(k("new")))
        tr.clear(k("old"))
        seen.append(tr.get(k("old")))
        seen.append(tr.get_range(BEGIN, END))
        tr.add(k("n"), 3)
        seen.append(decode_counter(tr.get(k("n"))))
        tr.set(k("new"), b"newer")
        seen.append(tr.get(k("new")))
        return seen

    assert await store.db.transact(body) == [b"new", None, [(k("new"), b"new")], 3, b"newer"]
    assert await all_pairs(store.db) == [(k("n"), encode_counter(3)), (k("new"), b"newer")]


async def test_snapshot_reads(store: Store) -> None:
    await store.db.transact(lambda tr: tr.set(k("a"), b"1"))

    def body(tr: Transaction) -> tuple[Any, ...]:
        snap = tr.snapshot
        before = snap.get(k("a"))
        tr.set(k("b"), b"2")
        return before, snap.get(k("b")), snap.get(k("missing")), snap.get_range(BEGIN, END)

    before, written, missing, pairs = await store.db.transact(body)
    assert before == b"1"
    assert written == b"2"  # snapshot reads still see the transaction's own writes
    assert missing is None
    assert pairs == [(k("a"), b"1"), (k("b"), b"2")]


class BodyFailed(Exception):
    pass


async def test_exception_in_body_commits_nothing(store: Store) -> None:
    db = store.db

    def failing(tr: Transaction) -> None:
        tr.set(k("a"), b"1")
        tr.add(k("n"), 1)
        tr.clear_range(BEGIN, END)
        tr.set(k("b"), b"2")
        raise BodyFailed()

    await db.transact(lambda tr: tr.set(k("kept"), b"yes"))
    results = await asyncio.gather(
        db.transact(failing),
        db.transact(lambda tr: tr.set(k("other"), b"ok")),
        return_exceptions=True,
    )
    assert isinstance(results[0], BodyFailed)
    assert results[1] is None
    assert await all_pairs(db) == [(k("kept"), b"yes"), (k("other"), b"ok")]


async def test_read_modify_write_is_serializable(store: Store) -> None:
    counter = k("rmw")

    def increment(tr: Transaction) -> int:
        value = decode_counter(tr.get(counter)) + 1
        tr.set(counter, encode_counter(value))
        return value

    results = await asyncio.gather(*(store.db.transact(increment) for _ in range(50)))
    assert await read_counter(store.db, counter) == 50
    # each committed body saw a distinct predecessor
    assert sorted(results) == list(range(1, 51))


async def test_retried_body_takes_effect_once(store: Store) -> None:
    counter = k("once")
    runs: list[int] = []

    def body(tr: Transaction) -> None:
        runs.append(1)  # observation only; real bodies have no side effects
        tr.add(counter, 1)
        tr.set(k("marker"), b"x")

    await asyncio.gather(*(store.db.transact(body) for _ in range(20)))
    assert await read_counter(store.db, counter) == 20
    assert len(runs) >= 20
    if store.name == "embedded-conflicts":
        assert len(runs) > 20


# -- versionstamps --------------------------------------------------------------

STAMPS = prefix_range((*SPACE, "vs"))


def stamped(tr: Transaction, value: bytes) -> None:
    tr.set_versionstamped_key(versionstamp_key((*SPACE, "vs")), value)


async def stamped_pairs(db: Database) -> list[tuple[bytes, bytes]]:
    return await db.read(lambda tr: tr.get_range(*STAMPS))


async def test_versionstamps_increase_in_commit_order(store: Store) -> None:
    db = store.db
    template = versionstamp_key((*SPACE, "vs"))
    for i in range(5):
        await db.transact(lambda tr, i=i: stamped(tr, b"%d" % i))
    pairs = await stamped_pairs(db)
    assert [value for _, value in pairs] == [b"0", b"1", b"2", b"3", b"4"]
    for key, _ in pairs:
        assert len(key) == len(template) - 4
        assert key[: len(k("vs"))] == k("vs")
        assert key != template[:-4]  # the placeholder was filled in


async def test_versionstamps_unique_and_ordered_under_concurrency(store: Store) -> None:
    counter = k("order")

    def body(tr: Transaction) -> None:
        # The serializable counter gives the commit order; the stamps must agree.
        n = decode_counter(tr.get(counter)) + 1
        tr.set(counter, encode_counter(n))
        stamped(tr, encode_counter(n))

    await asyncio.gather(*(store.db.transact(body) for _ in range(30)))
    pairs = await stamped_pairs(store.db)
    assert len({key for key, _ in pairs}) == 30
    assert [decode_counter(value) for _, value in pairs] == list(range(1, 31))


# -- limits ---------------------------------------------------------------------


async def test_key_and_value_size_limits(store: Store) -> None:
    db = store.db
    await db.transact(lambda tr: tr.set(padded_key(MAX_KEY_SIZE), b"max key"))
    await db.transact(lambda tr: tr.set(k("max value"), b"v" * MAX_VALUE_SIZE))

    def partial_then(op: Callable[[Transaction], None]) -> Callable[[Transaction], None]:
        def body(tr: Transaction) -> None:
            tr.set(k("partial"), b"must not commit")
            op(tr)

        return body

    too_long = padded_key(MAX_KEY_SIZE + 1)
    too_big = b"v" * (MAX_VALUE_SIZE + 1)
    for op in (
        lambda tr: tr.set(too_long, b"v"),
        lambda tr: tr.set(k("big"), too_big),
        lambda tr: tr.add(too_long, 1),
        lambda tr: tr.clear(too_long),
        lambda tr: tr.set_versionstamped_key(versionstamp_key((*SPACE, "vs")), too_big),
    ):
        with pytest.raises(LimitExceeded):
            await db.transact(partial_then(op))

    assert await db.read(lambda tr: tr.get(k("partial"))) is None
    assert await db.read(lambda tr: tr.get(padded_key(MAX_KEY_SIZE))) == b"max key"
    assert await db.read(lambda tr: tr.get(k("max value"))) == b"v" * MAX_VALUE_SIZE


async def test_transaction_size_limit(store: Store) -> None:
    value = b"v" * MAX_VALUE_SIZE

    def body(tr: Transaction) -> None:
        for i in range(101):  # 10.1 MB of values alone
            tr.set(k("bulk", i), value)

    with pytest.raises(LimitExceeded):
        await store.db.transact(body)
    assert await all_pairs(store.db) == []


async def test_transaction_older_than_5_seconds(store: Store) -> None:
    db = store.db

    def slow_write(tr: Transaction) -> None:
        tr.set(k("slow"), b"must not commit")
        time.sleep(5.2)

    def slow_read(tr: ReadTransaction) -> bytes | None:
        time.sleep(5.2)
        return tr.get(k("slow"))

    # Concurrent, so the test costs one 5 s wait, not two.
    results = await asyncio.gather(db.transact(slow_write), db.read(slow_read), return_exceptions=True)
    assert isinstance(results[0], TransactionTooOld), results[0]
    assert isinstance(results[1], TransactionTooOld), results[1]
    assert isinstance(results[0], LimitExceeded)  # not retryable: the body must change
    assert await db.read(lambda tr: tr.get(k("slow"))) is None


# -- long scans -------------------------------------------------------------------


class CountingReads:
    """Wraps a database, counts read transactions, and can fail one with TransactionTooOld."""

    def __init__(self, db: Database, fail_on: int | None = None) -> None:
        self.db = db
        self.reads = 0
        self.fail_on = fail_on

    async def transact(self, fn: Callable[[Transaction], T]) -> T:
        return await self.db.transact(fn)

    async def read(self, fn: Callable[[ReadTransaction], T]) -> T:
        self.reads += 1
        if self.reads == self.fail_on:
            raise TransactionTooOld("injected by the test")
        return await self.db.read(fn)

    async def close(self) -> None:
        await self.db.close()


async def fill_many(db: Database, n: int, per_transaction: int = 500) -> list[bytes]:
    keys = [k("scan", i) for i in range(n)]
    for start in range(0, n, per_transaction):

        def body(tr: Transaction, chunk: list[bytes] = keys[start : start + per_transaction]) -> None:
            for key in chunk:
                tr.set(key, key[-4:])

        await db.transact(body)
    return keys


async def test_scan_range_resumes_across_batches(store: Store) -> None:
    keys = await fill_many(store.db, 2500)
    counting = CountingReads(store.db)
    pairs = [pair async for pair in scan_range(counting, BEGIN, END, batch_size=100)]
    assert [key for key, _ in pairs] == keys
    assert all(value == key[-4:] for key, value in pairs)
    assert counting.reads >= 25  # one read transaction per batch

    # end is exclusive, and a scan may start mid-range
    middle = [key async for key, _ in scan_range(store.db, keys[10], keys[1234], batch_size=7)]
    assert middle == keys[10:1234]
    assert [pair async for pair in scan_range(store.db, keys[5], keys[5])] == []

    with pytest.raises(ValueError):
        [pair async for pair in scan_range(store.db, BEGIN, END, batch_size=0)]

    if isinstance(store.db, FoundationDBDatabase):
        assert [key async for key, _ in store.db.scan(BEGIN, END, batch_size=100)] == keys


async def test_scan_range_retries_a_batch_that_got_too_old(store: Store) -> None:
    keys = await fill_many(store.db, 450)
    flaky = CountingReads(store.db, fail_on=3)
    scanned = [key async for key, _ in scan_range(flaky, BEGIN, END, batch_size=100)]
    assert scanned == keys  # nothing lost, nothing repeated


# -- several handles, restarts ----------------------------------------------------


async def test_two_handles_share_the_store(store: Store) -> None:
    first, second = store.db, store.open()
    await first.transact(lambda tr: tr.set(k("from-first"), b"1"))
    assert await second.read(lambda tr: tr.get(k("from-first"))) == b"1"
    await second.transact(lambda tr: tr.set(k("from-second"), b"2"))
    assert await first.read(lambda tr: tr.get(k("from-second"))) == b"2"

    counter = k("shared-counter")

    def increment(tr: Transaction) -> None:
        tr.set(counter, encode_counter(decode_counter(tr.get(counter)) + 1))

    await asyncio.gather(*(db.transact(increment) for db in (first, second) for _ in range(25)))
    assert await read_counter(first, counter) == 50

    # versionstamps stay ordered when commits alternate between handles
    for i in range(6):
        await (first, second)[i % 2].transact(lambda tr, i=i: stamped(tr, b"%d" % i))
    assert [value for _, value in await stamped_pairs(second)] == [b"%d" % i for i in range(6)]


async def test_data_survives_close_and_reopen(store: Store) -> None:
    await store.db.transact(lambda tr: tr.set(k("durable"), b"yes"))
    await store.db.transact(lambda tr: tr.add(k("n"), 7))
    await store.db.close()
    await store.db.close()  # closing twice is harmless

    with pytest.raises(StoreUnavailable):
        await store.db.transact(lambda tr: tr.set(k("late"), b"no"))
    with pytest.raises(StoreUnavailable):
        await store.db.read(lambda tr: tr.get(k("durable")))

    reopened = store.open()
    assert await reopened.read(lambda tr: tr.get(k("durable"))) == b"yes"
    assert await read_counter(reopened, k("n")) == 7
    assert await reopened.read(lambda tr: tr.get(k("late"))) is None


# -- open_database ---------------------------------------------------------------


async def test_open_database_by_name_and_by_path(tmp_path: Path) -> None:
    by_name = open_database("embedded", data_dir=tmp_path / "a")
    try:
        assert isinstance(by_name, EmbeddedDatabase)
        await by_name.transact(lambda tr: tr.set(k("x"), b"1"))
        assert await by_name.read(lambda tr: tr.get(k("x"))) == b"1"
    finally:
        await by_name.close()

    by_path = open_database("storage.kv.embedded:EmbeddedDatabase", data_dir=tmp_path / "b", seed=1)
    try:
        assert isinstance(by_path, EmbeddedDatabase)
        assert await by_path.read(lambda tr: tr.get(k("x"))) is None
    finally:
        await by_path.close()


def test_open_database_unknown_backend() -> None:
    with pytest.raises(ValueError):
        open_database("nosuchstore")


def test_open_foundationdb_without_cluster_file(tmp_path: Path) -> None:
    # Importable and failing cleanly whether or not libfdb_c is installed.
    with pytest.raises(StoreUnavailable):
        open_database("foundationdb", cluster_file=str(tmp_path / "missing.cluster"))
