"""The embedded backend's group commit: pending writes kept in Python, the
writer's read cache, and their edges (several bodies in one batch, a body
that must be undone after its writes reached SQLite, another connection
writing the same file)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from storage.keys import pack, prefix_range
from storage.kv.base import Transaction, decode_counter
from storage.kv.embedded import EmbeddedDatabase

COUNTER = pack(("t", "counter"))
ITEMS = ("t", "item")


class Boom(Exception):
    pass


@pytest.fixture
async def db(tmp_path: Path) -> EmbeddedDatabase:
    store = EmbeddedDatabase(tmp_path / "data")
    yield store
    await store.close()


async def test_bodies_of_one_batch_see_each_other_in_order(db: EmbeddedDatabase) -> None:
    def body(tr: Transaction) -> tuple[int, int]:
        seen = decode_counter(tr.get(COUNTER))
        tr.add(COUNTER, 1)
        tr.set(pack(ITEMS + (seen,)), b"%d" % seen)
        # A range read over keys other bodies of the batch wrote.
        listed = len(tr.get_range(*prefix_range(ITEMS)))
        return seen, listed

    results = await asyncio.gather(*(db.transact(body) for _ in range(60)))
    assert db.batches < 60  # they did share batches
    assert sorted(seen for seen, _ in results) == list(range(60))
    assert all(listed == seen + 1 for seen, listed in results)
    assert await db.read(lambda tr: decode_counter(tr.get(COUNTER))) == 60
    assert len(await db.read(lambda tr: tr.get_range(*prefix_range(ITEMS)))) == 60


async def test_clear_range_then_set_in_one_body(db: EmbeddedDatabase) -> None:
    await db.transact(lambda tr: [tr.set(pack(ITEMS + (i,)), b"old") for i in range(5)])

    def body(tr: Transaction) -> list[tuple[bytes, bytes]]:
        tr.clear_range(*prefix_range(ITEMS))
        tr.set(pack(ITEMS + (2,)), b"new")
        assert tr.get(pack(ITEMS + (1,))) is None
        return tr.get_range(*prefix_range(ITEMS))

    assert await db.transact(body) == [(pack(ITEMS + (2,)), b"new")]
    assert await db.read(lambda tr: tr.get_range(*prefix_range(ITEMS))) == [(pack(ITEMS + (2,)), b"new")]


async def test_failed_body_leaves_nothing_even_after_its_writes_reached_sqlite(db: EmbeddedDatabase) -> None:
    await db.transact(lambda tr: tr.set(COUNTER, b"before"))
    assert await db.transact(lambda tr: tr.get(COUNTER)) == b"before"  # now in the writer's cache

    def body(tr: Transaction) -> None:
        tr.set(COUNTER, b"during")
        tr.set(pack(ITEMS + (1,)), b"x")
        tr.get_range(*prefix_range(ITEMS))  # puts the body's writes into SQLite, under a savepoint
        raise Boom()

    async def good(tr_value: bytes) -> None:
        await db.transact(lambda tr: tr.set(pack(("t", "other")), tr_value))

    with pytest.raises(Boom):
        await asyncio.gather(db.transact(body), good(b"1"), good(b"2"))
    assert await db.transact(lambda tr: tr.get(COUNTER)) == b"before"
    assert await db.read(lambda tr: tr.get(COUNTER)) == b"before"
    assert await db.read(lambda tr: tr.get_range(*prefix_range(ITEMS))) == []
    assert await db.read(lambda tr: tr.get(pack(("t", "other")))) in (b"1", b"2")


async def test_writer_cache_sees_what_another_connection_committed(tmp_path: Path) -> None:
    a = EmbeddedDatabase(tmp_path / "data")
    b = EmbeddedDatabase(tmp_path / "data")  # another process, as far as SQLite knows
    try:
        await a.transact(lambda tr: tr.set(COUNTER, b"a"))
        assert await a.transact(lambda tr: tr.get(COUNTER)) == b"a"  # cached by a's writer
        await b.transact(lambda tr: tr.set(COUNTER, b"b"))
        assert await a.transact(lambda tr: tr.get(COUNTER)) == b"b"
        for _ in range(10):
            await a.transact(lambda tr: tr.add(pack(("t", "n")), 1))
            await b.transact(lambda tr: tr.add(pack(("t", "n")), 1))
        assert await a.transact(lambda tr: decode_counter(tr.get(pack(("t", "n"))))) == 20
    finally:
        await a.close()
        await b.close()


async def test_big_batches_are_flushed_as_they_grow(db: EmbeddedDatabase) -> None:
    value = b"v" * 90_000

    def body(i: int):  # type: ignore[no-untyped-def]
        def fn(tr: Transaction) -> None:
            for j in range(40):
                tr.set(pack(ITEMS + (i, j)), value)

        return fn

    await asyncio.gather(*(db.transact(body(i)) for i in range(6)))  # ~21 MB in all
    rows = await db.read(lambda tr: tr.get_range(*prefix_range(ITEMS)))
    assert len(rows) == 240 and all(v == value for _, v in rows)


async def test_wal_is_checkpointed_off_the_writer(tmp_path: Path) -> None:
    db = EmbeddedDatabase(tmp_path / "data")
    try:
        value = b"w" * 10_000
        for i in range(200):  # 200 batches: the checkpointer is asked several times
            await db.transact(lambda tr, i=i: tr.set(pack(ITEMS + (i,)), value))
        main_file = Path(db.path)
        deadline = asyncio.get_running_loop().time() + 10
        # The writer's own automatic checkpoint is far above 2 MB, so only the
        # checkpoint thread can have copied the rows into the main file.
        while main_file.stat().st_size < 1_500_000:
            assert asyncio.get_running_loop().time() < deadline, "no checkpoint ran"
            await asyncio.sleep(0.05)
    finally:
        await db.close()


@pytest.mark.parametrize("busy", [True, False])
async def test_a_failed_checkpoint_is_a_warning_unless_another_process_was_at_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, busy: bool
) -> None:
    import logging
    import sqlite3
    import threading

    import storage.kv.embedded as embedded

    real_connect = embedded._connect

    class Failing:
        """The checkpointer's connection: every checkpoint fails."""

        def __init__(self, conn: sqlite3.Connection) -> None:
            self.conn = conn

        def execute(self, sql: str, *args: object) -> sqlite3.Cursor:
            if "wal_checkpoint" in sql:
                exc = sqlite3.OperationalError("database is locked" if busy else "disk I/O error")
                exc.sqlite_errorcode = sqlite3.SQLITE_BUSY if busy else sqlite3.SQLITE_IOERR  # type: ignore[attr-defined]
                raise exc
            return self.conn.execute(sql, *args)

        def close(self) -> None:
            self.conn.close()

    def connect(path: str) -> object:
        conn = real_connect(path)
        return Failing(conn) if threading.current_thread().name == "rookery-kv-checkpoint" else conn

    monkeypatch.setattr(embedded, "_connect", connect)
    caplog.set_level(logging.DEBUG, logger="storage.kv.embedded")
    db = EmbeddedDatabase(tmp_path / "data")
    try:
        for i in range(2 * embedded.CHECKPOINT_EVERY):  # asks the checkpointer
            await db.transact(lambda tr, i=i: tr.set(pack(ITEMS + (i,)), b"v"))
        deadline = asyncio.get_running_loop().time() + 10
        while not any("checkpoint skipped" in r.getMessage() for r in caplog.records):
            assert asyncio.get_running_loop().time() < deadline, "the checkpointer never tried"
            await asyncio.sleep(0.05)
        assert await db.read(lambda tr: tr.get(pack(ITEMS + (0,)))) == b"v"  # the store goes on
    finally:
        await db.close()
    levels = {r.levelno for r in caplog.records if "checkpoint skipped" in r.getMessage()}
    assert levels == ({logging.DEBUG} if busy else {logging.WARNING})


async def test_range_reads_merge_pending_writes_like_a_model(db: EmbeddedDatabase) -> None:
    """Random writes, clears and range reads (limits, reverse) in bodies of
    shared batches give what a plain dict model of the store gives."""
    import random

    rnd = random.Random(7)
    model: dict[bytes, bytes] = {}
    space = [pack(ITEMS + (i,)) for i in range(40)]
    await db.transact(lambda tr: [tr.set(k, b"base") for k in space[::3]])
    model.update({k: b"base" for k in space[::3]})

    def body_for(ops: list[tuple[str, int, int]]):  # type: ignore[no-untyped-def]
        def fn(tr: Transaction) -> list[object]:
            seen: list[object] = []
            for op, a, b in ops:
                if op == "set":
                    tr.set(space[a], b"v%d" % b)
                elif op == "clear":
                    tr.clear(space[a])
                elif op == "clear_range":
                    tr.clear_range(space[min(a, b)], space[max(a, b)])
                else:
                    lo, hi = space[min(a, b)], space[max(a, b)]
                    seen.append(tr.get_range(lo, hi, limit=b % 5, reverse=op == "rrange"))
            return seen

        return fn

    def run_model(ops: list[tuple[str, int, int]]) -> list[object]:
        seen: list[object] = []
        for op, a, b in ops:
            if op == "set":
                model[space[a]] = b"v%d" % b
            elif op == "clear":
                model.pop(space[a], None)
            elif op == "clear_range":
                for k in [k for k in model if space[min(a, b)] <= k < space[max(a, b)]]:
                    del model[k]
            else:
                lo, hi = space[min(a, b)], space[max(a, b)]
                rows = sorted(((k, v) for k, v in model.items() if lo <= k < hi), reverse=op == "rrange")
                seen.append(rows[: b % 5] if b % 5 else rows)
        return seen

    for _ in range(15):
        bodies = []
        for _ in range(6):
            kinds = ["set"] * 4 + ["clear"] * 2 + ["range", "rrange"] * 2 + (["clear_range"] if rnd.random() < 0.3 else [])
            bodies.append([(rnd.choice(kinds), rnd.randrange(40), rnd.randrange(40)) for _ in range(12)])
        # Bodies of one gather share batches and run in submission order.
        results = await asyncio.gather(*(db.transact(body_for(ops)) for ops in bodies))
        for ops, got in zip(bodies, results):
            assert got == run_model(ops)
    assert await db.read(lambda tr: tr.get_range(space[0], space[-1] + b"\xff")) == sorted(model.items())


async def test_a_body_writing_many_small_keys_in_any_order_is_fast(db: EmbeddedDatabase) -> None:
    """FoundationDB takes 10 MB of small writes in one transaction; so must
    this backend, within its 5 s, whatever order the keys come in."""
    n = 300_000

    def body(tr: Transaction) -> int:
        for i in reversed(range(n)):  # worst order for a list kept sorted at each write
            tr.set(pack(("t", "many", i)), b"")
        return len(tr.get_range(*prefix_range(("t", "many")), limit=10))

    assert await db.transact(body) == 10
    rows = await db.read(lambda tr: tr.get_range(*prefix_range(("t", "many"))))
    assert len(rows) == n and rows[0][0] == pack(("t", "many", 0))


async def test_a_commit_is_answered_only_after_the_wal_is_synced(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    import storage.kv.embedded as embedded

    wal = str(tmp_path / "data" / embedded.DB_FILENAME) + "-wal"
    synced: list[int] = []  # WAL size at each sync
    real = os.fdatasync

    def fdatasync(fd: int) -> None:
        real(fd)
        synced.append(os.fstat(fd).st_size)

    monkeypatch.setattr(embedded.os, "fdatasync", fdatasync)
    db = EmbeddedDatabase(tmp_path / "data")
    try:
        for i in range(5):
            await db.transact(lambda tr, i=i: tr.set(pack(ITEMS + (i,)), b"x" * 5000))
            # The answer came after a sync that covered the whole WAL so far.
            assert synced and synced[-1] == os.stat(wal).st_size
        count = len(synced)
        await asyncio.gather(*(db.transact(lambda tr, i=i: tr.set(pack(ITEMS + (i,)), b"y")) for i in range(50)))
        assert len(synced) - count < 50  # batches share syncs
        assert db.syncs == len(synced) and db.syncs <= db.batches

        # A body's error, like a result, is answered once its batch is synced.
        def fails(tr: Transaction) -> None:
            tr.set(COUNTER, b"z")
            raise Boom()

        count = len(synced)
        with pytest.raises(Boom):
            await db.transact(fails)
        assert len(synced) == count + 1
        assert await db.read(lambda tr: tr.get(COUNTER)) is None
    finally:
        await db.close()


async def test_a_failed_fsync_stops_the_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import storage.kv.embedded as embedded
    from storage.kv.base import StoreUnavailable

    db = EmbeddedDatabase(tmp_path / "data")
    try:
        await db.transact(lambda tr: tr.set(COUNTER, b"1"))

        def broken(fd: int) -> None:
            raise OSError(5, "Input/output error")

        monkeypatch.setattr(embedded.os, "fdatasync", broken)
        with pytest.raises(StoreUnavailable, match="durable"):
            await db.transact(lambda tr: tr.set(COUNTER, b"2"))
        monkeypatch.undo()
        # Nothing written since can be trusted: the store refuses further work.
        with pytest.raises(StoreUnavailable, match="fsync"):
            await db.transact(lambda tr: tr.set(COUNTER, b"3"))
        with pytest.raises(StoreUnavailable, match="fsync"):
            await db.read(lambda tr: tr.get(COUNTER))
    finally:
        await db.close()


async def test_commit_versions_go_on_from_a_stray_version_row(tmp_path: Path) -> None:
    import sqlite3
    import struct

    import storage.kv.embedded as embedded
    from storage.keys import versionstamp_key

    db = EmbeddedDatabase(tmp_path / "data")
    await db.close()
    conn = sqlite3.connect(str(tmp_path / "data" / embedded.DB_FILENAME))
    with conn:  # as a development build left it: the version in a kv row
        conn.execute("INSERT INTO kv VALUES (?, ?)", (embedded._STRAY_VERSION_KEY, struct.pack(">Q", 7000)))
    conn.close()
    db = EmbeddedDatabase(tmp_path / "data")
    try:
        await db.transact(lambda tr: tr.set_versionstamped_key(versionstamp_key(("t", "vs")), b""))
        (key, _), = await db.read(lambda tr: tr.get_range(*prefix_range(("t", "vs"))))
        stamp = key[len(pack(("t", "vs"))) + 1 :][:10]
        assert int.from_bytes(stamp[:8], "big") == 7001
        assert await db.read(lambda tr: tr.get(embedded._STRAY_VERSION_KEY)) is None
    finally:
        await db.close()


async def test_versionstamps_stay_unique_when_a_body_that_took_one_is_undone(db: EmbeddedDatabase) -> None:
    """A batch takes its commit version when a body first needs one; a body
    undone after its writes reached SQLite (a savepoint) may take the version's
    increment with it, and the bodies after it must not reuse that version."""
    from storage.keys import versionstamp_key

    stamps = ("t", "vs")
    await db.transact(lambda tr: [tr.set(pack(ITEMS + (i,)), b"old") for i in range(3)])

    def undone(tr: Transaction) -> None:
        tr.clear_range(*prefix_range(ITEMS))
        tr.get_range(*prefix_range(ITEMS))  # a range read over a cleared range: into SQLite, under a savepoint
        tr.set_versionstamped_key(versionstamp_key(stamps), b"undone")
        raise Boom()

    def stamped(n: int):  # type: ignore[no-untyped-def]
        return lambda tr: tr.set_versionstamped_key(versionstamp_key(stamps), b"%d" % n)

    n = 0
    for _ in range(8):
        # The undone body first, so that it is the one taking the version
        # when both share a batch; then a batch of its own (order 0).
        results = await asyncio.gather(db.transact(undone), db.transact(stamped(n)), return_exceptions=True)
        assert isinstance(results[0], Boom) and results[1] is None
        await db.transact(stamped(n + 1))
        n += 2
    rows = await db.read(lambda tr: tr.get_range(*prefix_range(stamps)))
    # Unique, and ordered as they were committed (keys sort by stamp).
    assert [int(v) for _, v in rows] == list(range(n))
    assert await db.read(lambda tr: len(tr.get_range(*prefix_range(ITEMS)))) == 3
