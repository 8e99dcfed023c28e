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
