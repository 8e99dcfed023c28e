"""The outbound queue in the store: records, leases, schedule, throttles, admin."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
from helpers import make_account

from storage import Storage, blobs, keys
from storage.errors import NotFound
from storage.queue import (
    DELIVERED,
    FAILED,
    OPEN,
    PENDING,
    Queue,
    RateLimited,
    ThrottleRule,
    parse_throttles,
    retry_delay,
)

RAW = b"From: a@example.org\r\nTo: x@remote.test\r\nSubject: hi\r\n\r\nbody\r\n"
T0 = 1_700_000_000.0


@pytest.fixture
def queue(storage: Storage) -> Queue:
    return Queue(storage.db, lifetime=1000)


async def refs(storage: Storage, digest: bytes) -> int:
    return len(await storage.db.read(lambda tr: tr.get_range(*keys.blob_refs(digest))))


async def test_enqueue_show_list_and_body(storage: Storage, queue: Queue) -> None:
    msg = await queue.enqueue("a@example.org", ["x@remote.test", ("b@example.org", 7)], RAW, now=T0)
    shown = await queue.show(msg.qid)
    assert shown.sender == "a@example.org" and shown.size == len(RAW)
    assert [r.address for r in shown.recipients] == ["x@remote.test", "b@example.org"]
    assert shown.recipients[1].local == 7 and all(r.status in OPEN for r in shown.recipients)
    assert shown.next_attempt == T0 and shown.expires == T0 + 1000
    assert await queue.read_body(shown) == RAW
    assert (await queue.read_headers(shown)).endswith(b"Subject: hi\r\n")
    assert await refs(storage, msg.digest) == 1
    assert [m.id for m in await queue.list_messages()] == [msg.id]
    assert [m.id for m in await queue.list_messages("remote.test")] == [msg.id]
    assert await queue.list_messages("other.test") == []
    assert await queue.next_due() == T0


async def test_claim_lease_expiry_release_and_owner_checks(queue: Queue) -> None:
    msg = await queue.enqueue("a@example.org", ["x@remote.test"], RAW, now=T0)
    assert await queue.claim("A", T0 - 1, 10, 60) == []  # not yet due
    [got] = await queue.claim("A", T0, 10, 60)
    assert got.id == msg.id and got.lease_owner == "A" and got.lease_expires == T0 + 60
    # Held: nobody else gets it, not even just before the lease expires.
    assert await queue.claim("B", T0 + 59, 10, 60) == []
    assert await queue.next_due() == T0 + 60
    # A renews: the lease (and the message's place in the index) moves on.
    assert await queue.renew([msg.id], "A", T0 + 50, 60) == [msg.id]
    assert await queue.renew([msg.id], "B", T0 + 50, 60) == []
    assert await queue.claim("B", T0 + 100, 10, 60) == []
    # A dies: after its lease expires, B takes the message, and A can no
    # longer write its results.
    [taken] = await queue.claim("B", T0 + 111, 10, 60)
    assert taken.lease_owner == "B"
    assert not await queue.release(msg.id, "A", T0 + 112)
    assert not await queue.finish(taken, "A")
    assert await queue.release(msg.id, "B", T0 + 112)
    [again] = await queue.claim("A", T0 + 112, 10, 60)
    assert again.lease_owner == "A"


async def test_two_claimers_on_two_stores_never_share(tmp_path: Path) -> None:
    one = Storage.open("embedded", data_dir=tmp_path / "s")
    two = Storage.open("embedded", data_dir=tmp_path / "s")
    try:
        q1, q2 = Queue(one.db), Queue(two.db)
        ids = {(await q1.enqueue("a@example.org", [f"x{i}@remote.test"], RAW, now=T0)).id for i in range(30)}
        got: list[list[int]] = [[], []]

        async def claimer(q: Queue, owner: str, out: list[int]) -> None:
            while True:
                batch = await q.claim(owner, T0, 3, 60)
                if not batch:
                    return
                out.extend(m.id for m in batch)

        await asyncio.gather(claimer(q1, "A", got[0]), claimer(q2, "B", got[1]))
        assert not set(got[0]) & set(got[1])
        assert set(got[0]) | set(got[1]) == ids
        assert len(got[0]) + len(got[1]) == 30
    finally:
        await one.close()
        await two.close()


async def test_finish_defers_then_completes_and_unlinks(storage: Storage, queue: Queue) -> None:
    msg = await queue.enqueue("a@example.org", ["x@remote.test", "y@remote.test"], RAW, now=T0)
    [m] = await queue.claim("A", T0, 1, 60)
    m.recipients[0].status, m.recipients[0].reply = DELIVERED, "250 ok"
    m.recipients[1].status, m.recipients[1].reply = "deferred", "451 later"
    m.attempts = 1
    m.next_attempt = T0 + retry_delay(1)
    assert await queue.finish(m, "A")
    shown = await queue.show(msg.id)
    assert [r.status for r in shown.recipients] == [DELIVERED, "deferred"]
    assert shown.recipients[1].reply == "451 later" and shown.attempts == 1 and not shown.lease_owner
    assert await queue.claim("A", T0 + 299, 1, 60) == []
    [m] = await queue.claim("A", T0 + 300, 1, 60)
    m.recipients[1].status = FAILED
    assert await queue.finish(m, "A")
    with pytest.raises(NotFound):
        await queue.show(msg.id)
    assert await refs(storage, msg.digest) == 0
    # The body is only marked orphaned: the purger takes it after the grace period.
    assert await storage.db.read(lambda tr: blobs.exists(tr, msg.digest))
    assert await storage.db.read(lambda tr: tr.get_range(*keys.BLOB_ORPHANS))
    assert await queue.next_due() is None


async def test_recipients_appended_while_a_worker_holds_the_message_are_not_lost(storage: Storage, queue: Queue) -> None:
    """A submission whose local part failed hands it to the queue
    (``add_recipients``) after the message was committed: a worker may have
    claimed it already. Its finish must keep what it did not know of."""
    msg = await queue.enqueue("a@example.org", ["x@remote.test"], RAW, now=T0)
    [m] = await queue.claim("A", T0, 1, 60)
    await queue.add_recipients(msg.id, [("bob@example.org", 7)])
    m.recipients[0].status = DELIVERED
    m.next_attempt = T0 + 900
    assert await queue.finish(m, "A")  # every recipient the worker knew of is done
    shown = await queue.show(msg.id)
    assert [(r.address, r.status, r.local) for r in shown.recipients] == [
        ("x@remote.test", DELIVERED, None), ("bob@example.org", PENDING, 7)
    ]
    [again] = await queue.claim("B", T0 + 1, 1, 60)  # due when it was first, not after the retry delay
    assert [r.address for r in again.open_recipients] == ["bob@example.org"]
    # The same when the worker still has recipients open: both kinds are kept.
    msg2 = await queue.enqueue("a@example.org", ["y@remote.test"], RAW, now=T0)
    [m2] = await queue.claim("A", T0, 1, 60)
    await queue.add_recipients(msg2.id, [("carol@example.org", 8)])
    m2.recipients[0].status = "deferred"
    m2.next_attempt = T0 + 900
    assert await queue.finish(m2, "A")
    shown2 = await queue.show(msg2.id)
    assert [(r.address, r.status) for r in shown2.recipients][0] == ("y@remote.test", "deferred")
    assert [r.address for r in shown2.open_recipients] == ["y@remote.test", "carol@example.org"]
    assert shown2.next_attempt == T0


async def test_finish_queues_dsn_in_the_same_transaction(queue: Queue) -> None:
    await queue.enqueue("a@example.org", ["x@remote.test"], RAW, now=T0)
    [m] = await queue.claim("A", T0, 1, 60)
    m.recipients[0].status = FAILED
    dsn = await queue.prepare_dsn(b"Subject: bounce\r\n\r\nx\r\n", "a@example.org", 3, T0)
    assert await queue.finish(m, "A", dsn)
    [left] = await queue.list_messages()
    assert left.dsn and left.sender == "" and left.recipients[0].local == 3


async def test_defer_and_finish_compare_the_owner(storage: Storage, queue: Queue) -> None:
    from storage import queue as q

    a = await queue.enqueue("a@example.org", ["x@remote.test"], RAW, now=T0)
    b = await queue.enqueue("a@example.org", ["y@remote.test"], RAW, now=T0)
    held = {m.id: m for m in await queue.claim("A", T0, 10, 60)}
    assert await storage.db.transact(lambda tr: q.defer(tr, a.id, "A", T0 + 500))
    assert (await queue.show(a.id)).next_attempt == T0 + 500
    mb = held[b.id]
    mb.recipients[0].status = FAILED
    assert not await queue.finish(mb, "B")  # not B's to finish
    assert (await queue.show(b.id)).recipients[0].status == PENDING
    assert await queue.finish(mb, "A")  # given up on, no DSN: gone
    [left] = await queue.list_messages()
    assert left.id == a.id
    [m] = await queue.claim("A", T0 + 500, 10, 60)
    m.recipients[0].status = DELIVERED
    assert await queue.finish(m, "A")
    assert await queue.list_messages() == []


async def test_retry_delete_pause_resume(queue: Queue) -> None:
    a = await queue.enqueue("a@example.org", ["x@slow.test"], RAW, now=T0)
    b = await queue.enqueue("a@example.org", ["y@other.test"], RAW, now=T0)
    [m] = await queue.claim("A", T0, 1, 60)
    m.next_attempt = T0 + 3000
    await queue.finish(m, "A")
    assert await queue.retry(m.id, now=T0 + 1) == 1
    assert (await queue.show(m.id)).next_attempt == T0 + 1

    await queue.pause("slow.test")
    assert await queue.paused() == ["slow.test"]
    claimed = await queue.claim("A", T0 + 2, 10, 60)
    assert [c.id for c in claimed] == [b.id]  # the paused domain's message is put off
    assert (await queue.show(a.id)).next_attempt > T0 + 2
    assert await queue.resume("slow.test", now=T0 + 3) == 1
    assert (await queue.show(a.id)).next_attempt == T0 + 3

    await queue.pause()
    assert await queue.claim("A", T0 + 900, 10, 60) == []
    assert await queue.resume(now=T0 + 900) == 2  # due at once
    assert sorted(c.id for c in await queue.claim("A", T0 + 900, 10, 60)) == sorted([a.id, b.id])
    # Paused mail still expires (lifetime 1000): it is taken, to be bounced.
    await queue.pause()
    assert await queue.claim("A", T0 + 999, 10, 60) == []
    assert sorted(c.id for c in await queue.claim("A", T0 + 1000, 10, 60)) == sorted([a.id, b.id])

    await queue.delete(a.qid)
    with pytest.raises(NotFound):
        await queue.delete(a.qid)
    assert [m.id for m in await queue.list_messages()] == [b.id]
    assert await queue.retry(now=T0) == 0  # b is leased: left alone


async def test_connection_slots_hourly_counter_and_backoff(queue: Queue) -> None:
    assert await queue.acquire_slot("domain:*", 2, "A", T0, 30) == 0
    assert await queue.acquire_slot("domain:*", 2, "B", T0, 30) == 1
    assert await queue.acquire_slot("domain:*", 2, "B", T0, 30) is None
    assert not await queue.release_slot("domain:*", 0, "B")  # compare-owner
    assert await queue.release_slot("domain:*", 0, "A")
    assert await queue.acquire_slot("domain:*", 2, "C", T0, 30) == 0
    # A dead holder's slot frees itself when its lease runs out, unless renewed.
    await queue.renew_slots([("domain:*", 1)], "B", T0 + 20, 30)
    assert await queue.acquire_slot("domain:*", 2, "D", T0 + 31, 30) == 0
    assert await queue.acquire_slot("domain:*", 2, "D", T0 + 31, 30) is None

    hour = T0 - T0 % 3600
    assert await queue.take_hourly("r", 2, hour + 1) == (1, hour + 3600)
    assert await queue.take_hourly("r", 2, hour + 2) == (1, hour + 3600)
    assert await queue.take_hourly("r", 2, hour + 3) == (0, hour + 3600)
    assert await queue.take_hourly("r", 2, hour + 3600) == (1, hour + 7200)
    # Several at once: never more than the window has left.
    assert await queue.take_hourly("r2", 5, hour + 1, count=3) == (3, hour + 3600)
    assert await queue.take_hourly("r2", 5, hour + 2, count=3) == (2, hour + 3600)
    assert await queue.take_hourly("r2", 5, hour + 3, count=3) == (0, hour + 3600)

    assert await queue.backoff_until("d.test") == 0
    assert await queue.back_off("d.test", T0, 60, 600) == T0 + 60
    assert await queue.back_off("d.test", T0, 60, 600) == T0 + 120
    await queue.clear_backoff("d.test")
    assert await queue.backoff_until("d.test") == 0


async def test_sender_ownership_and_rate_limit(storage: Storage, queue: Queue) -> None:
    alice = await make_account(storage, "alice@example.org")
    bob = await make_account(storage, "bob@example.org")
    await storage.directory.add_alias("sales@example.org", "alice@example.org")
    await storage.directory.add_catchall("example.org", "bob@example.org")
    assert await queue.sender_owned(alice, "alice@example.org")
    assert await queue.sender_owned(alice, "Alice+news@Example.ORG")
    assert await queue.sender_owned(alice, "sales@example.org")
    assert not await queue.sender_owned(bob, "sales@example.org")
    assert not await queue.sender_owned(bob, "nobody@example.org")  # catch-all is no licence
    assert not await queue.sender_owned(alice, "alice@remote.test")
    assert not await queue.sender_owned(alice, "not an address")

    await queue.reserve_send(alice, 2, now=T0)
    await queue.reserve_send(alice, 2, now=T0)
    with pytest.raises(RateLimited) as exc:
        await queue.reserve_send(alice, 2, now=T0)
    assert exc.value.smtp.startswith("450 4.7.1")
    with pytest.raises(RateLimited):
        await queue.check_rate(alice, 2, now=T0)
    await queue.check_rate(bob, 2, now=T0)
    await queue.reserve_send(alice, 2, now=T0 + 3600)  # the next hour
    # Recipients are counted: a message to 3 uses 3 of the hour, all or none.
    with pytest.raises(RateLimited):
        await queue.reserve_send(bob, 5, now=T0, count=6)
    assert await queue.rate_used(bob, now=T0) == 0
    await queue.reserve_send(bob, 5, now=T0, count=3)
    with pytest.raises(RateLimited):
        await queue.reserve_send(bob, 5, now=T0, count=3)
    await queue.reserve_send(bob, 5, now=T0, count=2)
    assert await queue.rate_used(bob, now=T0) == 5


def test_retry_schedule_and_throttle_rules() -> None:
    assert [retry_delay(n) for n in range(1, 7)] == [300, 600, 1200, 2400, 3600, 3600]
    assert retry_delay(3, 60, 200) == 200
    rules = parse_throttles({"*.example.com": {"connections": 2}, "mx:*.google.com": {"per_hour": 100}})
    assert rules[0] == ThrottleRule("*.example.com", "domain", 2, 0)
    assert rules[0].matches("mail.example.com") and not rules[0].matches("example.org")
    assert rules[1].kind == "mx" and rules[1].matches("gmail.com", "alt1.aspmx.l.google.com.")
    assert not rules[1].matches("gmail.com", None)
    with pytest.raises(ValueError):
        parse_throttles({"x": 3})
    with pytest.raises(ValueError, match="per_hours"):
        parse_throttles({"x": {"per_hours": 10}})  # a typo must not leave it unthrottled


async def test_read_bodies_reads_small_messages_at_once_within_a_budget(queue: Queue) -> None:
    small = [await queue.enqueue("a@example.org", ["x@remote.test"], RAW + b"%d\r\n" % i, now=T0) for i in range(3)]
    large_raw = RAW + b"y" * (blobs.CHUNK_SIZE + 10)
    large = await queue.enqueue("a@example.org", ["x@remote.test"], large_raw, now=T0)
    bodies = await queue.read_bodies([*small, large])
    assert bodies == {m.id: RAW + b"%d\r\n" % i for i, m in enumerate(small)}  # the large one is read on its own
    assert await queue.read_body(large) == large_raw
    assert list(await queue.read_bodies(small, budget=2 * len(RAW) + 7)) == [small[0].id, small[1].id]


async def test_queue_size_counter_and_throttle_usage_stats(storage: Storage, queue: Queue) -> None:
    a = await queue.enqueue("a@example.org", ["x@remote.test"], RAW, now=T0)
    b = await queue.enqueue("a@example.org", ["y@remote.test"], RAW, now=T0)
    assert (await queue.stats(now=T0)).messages == 2
    [m, _] = await queue.claim("A", T0, 10, 60)
    m.recipients[0].status = FAILED
    dsn = await queue.prepare_dsn(b"Subject: bounce\r\n\r\nx\r\n", "a@example.org", 3, T0)
    assert await queue.finish(m, "A", dsn)  # one removed, its DSN added
    assert (await queue.stats(now=T0)).messages == 2
    [o] = [x for x in await queue.claim("A", T0 + 120, 10, 60) if x.id == (b.id if m.id == a.id else a.id)]
    o.recipients[0].status = DELIVERED
    assert await queue.finish(o, "A")
    await queue.delete(dsn.id)
    assert (await queue.stats(now=T0)).messages == 0

    rules = [ThrottleRule("d.test", max_connections=3, max_per_hour=10), ThrottleRule("e.test")]
    assert await queue.acquire_slot("domain:d.test", 3, "A", T0, 30) == 0
    assert await queue.acquire_slot("domain:d.test", 3, "B", T0 - 60, 30) == 1  # expired by T0
    await queue.take_hourly("domain:d.test", 10, T0, 4)
    stats = await queue.stats(rules, T0)
    assert stats.throttles == {"domain:d.test": (1, 4), "domain:e.test": (0, 0)}


async def test_expired_backoff_records_are_purged(queue: Queue) -> None:
    from server.outbound import with_queue_purge

    await queue.back_off("old.test", T0 - 3 * 86400, 60, 600)
    await queue.back_off("recent.test", T0 - 3600, 60, 600)  # ran out an hour ago: kept a while
    await queue.back_off("live.test", T0, 60, 600)
    assert await queue.purge_backoffs(T0) == 1
    assert await queue.backoff_until("old.test") == 0
    assert await queue.backoff_until("recent.test") == T0 - 3600 + 60
    assert await queue.backoff_until("live.test") == T0 + 60
    # The cluster's purge singleton runs it after its own work.
    now = time.time()  # the singleton purges as of now
    await queue.back_off("old2.test", now - 3 * 86400, 60, 600)
    await queue.back_off("live2.test", now, 60, 600)
    ran = []

    async def mail_purge() -> int:
        ran.append("mail")
        return 0

    await with_queue_purge(mail_purge, queue)()
    assert ran == ["mail"] and await queue.backoff_until("old2.test") == 0
    assert await queue.backoff_until("live2.test") == now + 60
