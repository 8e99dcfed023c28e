"""Node records and singleton leases (storage/nodes.py) on the embedded store."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from storage import keys
from storage.kv import Database, open_database
from storage.nodes import Lease, NodeRecord, Nodes, reap, status_fields

T0 = 1_700_000_000.0


@pytest.fixture
async def db(tmp_path: Path) -> AsyncIterator[Database]:
    database = open_database("embedded", data_dir=tmp_path)
    try:
        yield database
    finally:
        await database.close()


def record(node_id: str, state: str = "joining", address: str = "10.0.0.1:7000", at: float = T0) -> NodeRecord:
    return NodeRecord(node_id, address, state, started=at, heartbeat=at, expires=at + 5, version="0.1.0")


async def test_claim_renew_and_list(db: Database) -> None:
    nodes = Nodes(db)
    await nodes.claim(record("a"))
    await nodes.claim(record("b", address="10.0.0.2:7000"))
    renewed = await nodes.renew(record("a", state="ready", at=T0 + 100), timeout=5, now=T0 + 3)
    # ``started`` is the first claim's, not the renewing copy's.
    assert (renewed.started, renewed.heartbeat, renewed.expires, renewed.state) == (T0, T0 + 3, T0 + 8, "ready")

    listed = {r.id: r for r in await nodes.list(now=T0 + 4)}
    assert listed["a"].state == "ready" and listed["b"].state == "joining"
    # b did not renew: once its expiry passes it reads as gone, without a write.
    listed = {r.id: r for r in await nodes.list(now=T0 + 6)}
    assert listed["a"].state == "ready" and listed["b"].state == "gone"
    assert listed["b"].uptime(T0 + 6) == 0 and listed["a"].uptime(T0 + 6) == 6
    raw = await db.read(lambda tr: tr.get(keys.node("b")))
    assert raw is not None and NodeRecord.from_json(raw).state == "joining"
    assert (await nodes.get("b", now=T0 + 6)).state == "gone"  # type: ignore[union-attr]


async def test_renew_is_idempotent_and_recreates_a_reaped_record(db: Database) -> None:
    nodes = Nodes(db)
    first = await nodes.renew(record("a", state="ready"), timeout=5, now=T0 + 1)
    again = await nodes.renew(record("a", state="ready"), timeout=5, now=T0 + 1)
    assert first == again
    await nodes.release("a", delete=True)
    assert await nodes.get("a") is None
    back = await nodes.renew(record("a", state="ready"), timeout=5, now=T0 + 2)
    assert back.expires == T0 + 7 and await nodes.get("a", now=T0 + 2) == back


async def test_states_drain_and_release(db: Database) -> None:
    nodes = Nodes(db)
    await nodes.claim(record("a"))
    assert (await nodes.set_state("a", "ready")).state == "ready"  # type: ignore[union-attr]
    assert await nodes.set_state("nobody", "ready") is None
    with pytest.raises(ValueError):
        await nodes.set_state("a", "sleeping")

    # The operator's drain flag survives the node's own renewals.
    assert (await nodes.request_drain("a")).drain  # type: ignore[union-attr]
    assert await nodes.request_drain("nobody") is None
    renewed = await nodes.renew(record("a", state="ready"), timeout=5, now=T0 + 1)
    assert renewed.drain
    await nodes.set_state("a", "draining")

    await nodes.release("a", now=T0 + 2)
    gone = await nodes.get("a", now=T0 + 2)
    assert gone is not None and gone.state == "gone" and gone.expires <= T0 + 2
    assert status_fields(gone, T0 + 2)["state"] == "gone"


async def test_reap_removes_records_and_leases_gone_for_an_hour(db: Database) -> None:
    nodes = Nodes(db)
    await nodes.claim(record("old"))  # expires T0 + 5
    await nodes.renew(record("live"), timeout=5, now=T0 + 3600)
    await nodes.try_acquire("purge", "old", ttl=10, now=T0)
    await db.transact(lambda tr: tr.set(keys.node("junk"), b"not json"))
    assert await nodes.reap(now=T0 + 3000) == 1  # only the undecodable record
    assert {r.id for r in await nodes.list(now=T0 + 3000)} == {"old", "live"}
    assert await nodes.reap(now=T0 + 3600 + 11) == 2
    assert [r.id for r in await nodes.list(now=T0 + 3700)] == ["live"]
    assert await nodes.leases() == []
    # Reaping in small batches gets through everything too.
    for i in range(5):
        await nodes.claim(record(f"n{i}"))
    assert await db.transact(lambda tr: reap(tr, T0 + 7200, limit=2)) == 2
    assert await nodes.reap(now=T0 + 7200) == 3


async def test_singleton_lease_failover(db: Database) -> None:
    nodes = Nodes(db)
    assert await nodes.try_acquire("purge", "A", ttl=10, now=T0)
    assert not await nodes.try_acquire("purge", "B", ttl=10, now=T0 + 1)
    # The owner renews.
    assert await nodes.try_acquire("purge", "A", ttl=10, now=T0 + 8)
    assert await nodes.lease("purge") == Lease("purge", "A", T0 + 18)
    assert not await nodes.try_acquire("purge", "B", ttl=10, now=T0 + 17)

    # A dies: its lease expires and B takes over.
    assert await nodes.try_acquire("purge", "B", ttl=10, now=T0 + 19)
    assert await nodes.lease("purge") == Lease("purge", "B", T0 + 29)
    # A comes back: it can neither take nor release B's lease.
    assert not await nodes.try_acquire("purge", "A", ttl=10, now=T0 + 20)
    assert not await nodes.release_lease("purge", "A")
    assert (await nodes.lease("purge")).owner == "B"  # type: ignore[union-attr]

    assert await nodes.release_lease("purge", "B")
    assert await nodes.lease("purge") is None
    assert not await nodes.release_lease("purge", "B")
    # Released: free for anyone at once.
    assert await nodes.try_acquire("purge", "A", ttl=10, now=T0 + 21)


async def test_concurrent_acquirers_get_one_owner(db: Database) -> None:
    nodes = Nodes(db)
    results = await asyncio.gather(*(nodes.try_acquire("reaper", f"n{i}", ttl=30) for i in range(8)))
    assert sum(results) == 1
    lease = await nodes.lease("reaper")
    assert lease is not None and lease.owner == f"n{results.index(True)}"
    assert [x.name for x in await nodes.leases()] == ["reaper"]
