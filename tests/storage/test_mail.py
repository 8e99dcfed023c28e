"""Mail data layer: UIDs, flags, MODSEQ, expunge, copy/move, mailboxes, blobs."""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from pathlib import Path

import pytest
from helpers import make_account

from storage import MailStore, Storage, blobs, keys, mail, mime
from storage.errors import AlreadyExists, Forbidden, HasChildren, InvalidInput, MailboxNotFound, QuotaExceeded

RAW = b"From: a@b.test\r\nSubject: hi\r\nMessage-ID: <root@b.test>\r\n\r\nhello\r\n"
REPLY = b"From: c@b.test\r\nSubject: Re: hi\r\nIn-Reply-To: <root@b.test>\r\n\r\nyes\r\n"


@pytest.fixture(params=["plain", "conflicts"])
async def store(request: pytest.FixtureRequest, tmp_path: Path):
    # Every test runs twice: once with injected retryable conflicts, so each
    # transaction body is proven idempotent under retries.
    s = Storage.open("embedded", data_dir=tmp_path / "s", inject_conflicts=0.3 if request.param == "conflicts" else 0.0)
    try:
        yield s
    finally:
        await s.close()


async def test_append_allocates_increasing_uids_and_modseqs(store: Storage) -> None:
    acct = await make_account(store)
    results = await asyncio.gather(*(store.mail.append(acct, "INBOX", RAW + str(i).encode()) for i in range(20)))
    uids = sorted(uid for _, uid in results)
    assert uids == list(range(1, 21))
    snap = await store.db.read(lambda tr: mail.snapshot(tr, acct, mail.find_mailbox(tr, acct, "INBOX").id))
    assert [m.uid for m in snap.messages] == uids
    # UID order is commit order: MODSEQs rise with UIDs.
    assert [m.modseq for m in snap.messages] == sorted(m.modseq for m in snap.messages)
    assert snap.mailbox.uidnext == 21 and snap.highestmodseq == snap.messages[-1].modseq


async def test_flags_unchangedsince_and_changes(store: Storage) -> None:
    acct = await make_account(store)
    box = await store.db.read(lambda tr: mail.find_mailbox(tr, acct, "INBOX"))
    for _ in range(3):
        await store.mail.append(acct, box.id, RAW)
    before = await store.db.read(lambda tr: mail.highest_modseq(tr, acct, box.id))
    changed, failed = await store.mail.write(acct, lambda tr: mail.store_flags(tr, acct, box.id, [1, 2], "add", ["\\Seen", "$Important"]))
    assert [m.uid for m in changed] == [1, 2] and failed == []
    assert changed[0].flags == ("$Important", "\\Seen")
    _, failed = await store.mail.write(acct, lambda tr: mail.store_flags(tr, acct, box.id, [1, 3], "remove", ["\\Seen"], unchangedsince=before))
    assert failed == [1]
    delta = await store.db.read(lambda tr: mail.mailbox_changes(tr, acct, box.id, before))
    assert [m.uid for m in delta.changed] == [1, 2] and delta.expunged == []
    status = await store.db.read(lambda tr: mail.mailbox_status(tr, acct, box))
    assert (status.messages, status.unseen) == (3, 1)
    with pytest.raises(InvalidInput):
        await store.mail.write(acct, lambda tr: mail.store_flags(tr, acct, box.id, [1], "add", ["\\Bogus"]))


async def test_expunge_copy_move_and_vanished(store: Storage) -> None:
    acct = await make_account(store)
    inbox = await store.db.read(lambda tr: mail.find_mailbox(tr, acct, "INBOX"))
    archive = await store.db.read(lambda tr: mail.find_mailbox(tr, acct, "Archive"))
    for i in range(4):
        await store.mail.append(acct, "INBOX", RAW + bytes([65 + i]))
    uv, pairs = await store.mail.write(acct, lambda tr: mail.copy_messages(tr, acct, inbox.id, [1, 2], archive.id))
    assert uv == archive.uidvalidity and pairs == [(1, 1), (2, 2)]
    mark = await store.db.read(lambda tr: mail.highest_modseq(tr, acct, inbox.id))
    await store.mail.write(acct, lambda tr: mail.store_flags(tr, acct, inbox.id, [1, 3], "add", ["\\Deleted"]))
    assert await store.mail.write(acct, lambda tr: mail.expunge(tr, acct, inbox.id, [3])) == [3]
    assert await store.mail.write(acct, lambda tr: mail.expunge(tr, acct, inbox.id)) == [1]
    _, moved = await store.mail.write(acct, lambda tr: mail.move_messages(tr, acct, inbox.id, [4], archive.id))
    assert moved == [(4, 3)]
    delta = await store.db.read(lambda tr: mail.mailbox_changes(tr, acct, inbox.id, mark))
    assert delta.expunged == [1, 3, 4]
    left = await store.db.read(lambda tr: mail.get_messages(tr, acct, inbox.id))
    assert [m.uid for m in left] == [2]
    # Copies share the email; the content survives expunge of one copy.
    in_archive = await store.db.read(lambda tr: mail.get_messages(tr, acct, archive.id))
    assert [m.uid for m in in_archive] == [1, 2, 3]
    email = await store.mail.email(acct, in_archive[0].email_id)
    assert email is not None and (await store.mail.read_blob(email.digest)).endswith(b"A")


async def test_mailbox_create_rename_delete(store: Storage) -> None:
    acct = await make_account(store)
    await store.mail.write(acct, lambda tr: mail.create_mailbox(tr, acct, "Projects/2026/Q1"))
    names = [b.name for b in await store.db.read(lambda tr: mail.list_mailboxes(tr, acct))]
    assert {"Projects", "Projects/2026", "Projects/2026/Q1"} <= set(names)
    with pytest.raises(AlreadyExists):
        await store.mail.write(acct, lambda tr: mail.create_mailbox(tr, acct, "Projects"))
    await store.mail.write(acct, lambda tr: mail.rename_mailbox(tr, acct, "Projects", "Work"))
    names = [b.name for b in await store.db.read(lambda tr: mail.list_mailboxes(tr, acct))]
    assert "Work/2026/Q1" in names and not any(n.startswith("Projects") for n in names)
    # RFC 9051 §6.3.4: with children, DELETE leaves a \Noselect name; a
    # second DELETE of it, children still there, is refused.
    await store.mail.write(acct, lambda tr: mail.delete_mailbox(tr, acct, "Work"))
    work = await store.mail.mailbox(acct, "Work", selectable=False)
    assert work.noselect
    with pytest.raises(HasChildren):
        await store.mail.write(acct, lambda tr: mail.delete_mailbox(tr, acct, "Work"))
    with pytest.raises(Forbidden):
        await store.mail.write(acct, lambda tr: mail.delete_mailbox(tr, acct, "inbox"))
    await store.mail.append(acct, "INBOX", RAW)
    await store.mail.rename_mailbox(acct, "INBOX", "Old")
    old = await store.mail.list_messages(acct, "Old")
    assert len(old) == 1 and await store.mail.list_messages(acct, "INBOX") == []
    await store.mail.write(acct, lambda tr: mail.delete_mailbox(tr, acct, "Old"))
    with pytest.raises(MailboxNotFound):
        await store.mail.list_messages(acct, "Old")


async def test_threads_join_on_references(store: Storage) -> None:
    acct = await make_account(store)
    await store.mail.append(acct, "INBOX", RAW)
    await store.mail.append(acct, "INBOX", REPLY)
    await store.mail.append(acct, "INBOX", b"Subject: other\r\n\r\nx\r\n")
    msgs = await store.mail.list_messages(acct, "INBOX")
    threads = [e.thread_id for _, e in msgs if e is not None]
    assert threads[0] == threads[1] != threads[2]


async def test_a_message_joins_the_thread_of_a_reply_delivered_before_it(store: Storage) -> None:
    acct = await make_account(store)
    await store.mail.append(acct, "INBOX", REPLY)
    await store.mail.append(acct, "INBOX", RAW)  # the message REPLY answers
    msgs = await store.mail.list_messages(acct, "INBOX")
    threads = [e.thread_id for _, e in msgs if e is not None]
    assert len(threads) == 2 and threads[0] == threads[1]


async def test_the_node_cache_holds_each_email_as_the_store_does(store: Storage) -> None:
    """Delivered and appended emails are cached at once, with their thread,
    exactly as a node that has to read them from the store sees them."""
    acct = await make_account(store)
    [d] = await store.mail.deliver([acct], RAW)
    await store.mail.append(acct, "INBOX", REPLY)
    ids = [e.id for _, e in await store.mail.list_messages(acct, "INBOX") if e is not None]
    cached = await store.mail.emails(acct, ids)
    cold = await MailStore(store.db).emails(acct, ids)  # another node: nothing cached
    assert d.thread_id == d.email_id
    for i in ids:
        mine, theirs = cached[i], cold[i]
        assert (mine.digest, mine.size, mine.received, mine.thread_id, mine.encoded) == (
            theirs.digest, theirs.size, theirs.received, theirs.thread_id, theirs.encoded
        )
    assert cached[ids[0]].thread_id == cached[ids[1]].thread_id
    assert set(ids) <= {key[1] for key in store.mail._emails}


async def test_the_same_bytes_delivered_again_share_one_blob(store: Storage) -> None:
    acct = await make_account(store)
    await store.mail.append(acct, "INBOX", RAW)
    await store.mail.append(acct, "INBOX", RAW)
    (first, e1), (second, e2) = await store.mail.list_messages(acct, "INBOX")
    assert e1 is not None and e2 is not None and e1.digest == e2.digest
    chunks = await store.db.read(lambda tr: tr.get_range(*keys.blob_chunks(e1.digest)))
    assert [v for _, v in chunks] == [RAW]
    refs = await store.db.read(lambda tr: tr.get_range(*keys.blob_refs(e1.digest)))
    assert len(refs) == 2 and first.email_id != second.email_id


async def test_quota_and_usage(store: Storage) -> None:
    acct = await make_account(store, quota=300)
    await store.mail.append(acct, "INBOX", RAW)
    with pytest.raises(QuotaExceeded):
        await store.mail.append(acct, "INBOX", RAW * 5)
    used, count = await store.db.read(lambda tr: mail.quota_usage(tr, acct))
    assert (used, count) == (len(RAW), 1)


async def test_large_blob_is_chunked_and_purged_only_when_unreferenced(store: Storage) -> None:
    acct = await make_account(store)
    big = RAW + b"x" * (blobs.INLINE_MAX + 3 * blobs.CHUNK_SIZE + 17)
    _, uid = await store.mail.append(acct, "INBOX", big)
    [(msg, email)] = await store.mail.list_messages(acct, "INBOX")
    assert email is not None
    assert await store.mail.read_blob(email.digest) == big
    assert await store.mail.read_blob(email.digest, 5, 10) == big[5:15]
    chunks = await store.db.read(lambda tr: tr.get_range(*keys.blob_chunks(email.digest)))
    assert len(chunks) == blobs.chunk_count(len(big)) and all(len(v) <= 100_000 for _, v in chunks)
    # Referenced: the purger leaves it alone even long after.
    await store.mail.purge(now=time.time() + 10 * blobs.GRACE_SECONDS)
    assert await store.mail.read_blob(email.digest) == big
    inbox = await store.db.read(lambda tr: mail.find_mailbox(tr, acct, "INBOX"))
    await store.mail.write(acct, lambda tr: mail.store_flags(tr, acct, inbox.id, [uid], "add", ["\\Deleted"]))
    await store.mail.write(acct, lambda tr: mail.expunge(tr, acct, inbox.id))
    # Within the grace period nothing goes; after it the blob does.
    await store.mail.purge()
    assert await store.db.read(lambda tr: blobs.exists(tr, email.digest))
    await store.mail.purge(now=time.time() + 2 * blobs.GRACE_SECONDS)
    assert not await store.db.read(lambda tr: blobs.exists(tr, email.digest))
    assert await store.db.read(lambda tr: tr.get_range(*keys.blob_chunks(email.digest))) == []


async def test_a_huge_structure_is_stored_once_for_every_recipient(store: Storage) -> None:
    """Thousands of MIME parts to ten local recipients: the parsed structure
    is kept once beside the blob, so the delivery stays within the 10 MB a
    transaction may write (per account it would be over 10 MB)."""
    name = b"a-rather-long-attachment-name-" * 8
    parts = b"".join(
        b'--b\r\nContent-Type: text/plain; name="%s%d.txt"\r\n'
        b'Content-Disposition: attachment; filename="%s%d.txt"\r\n\r\npart\r\n' % (name, i, name, i)
        for i in range(mime.MAX_PARTS)
    )
    raw = b"From: a@b.test\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n" + parts + b"--b--\r\n"
    structure = mime.encode(mime.parse(raw))
    assert len(structure) * 10 > 10_000_000
    await store.directory.add_domain("example.org")
    accounts = await asyncio.gather(*(store.directory.add_account(f"u{i}@example.org", "pw") for i in range(10)))
    deliveries = await store.mail.deliver([a.id for a in accounts], raw)
    assert len(deliveries) == 10
    digest = blobs.digest_of(raw)
    shared = await store.db.read(lambda tr: tr.get_range(*keys.blob_structures(digest)))
    assert b"".join(v for _, v in shared) == structure
    for d in (deliveries[0], deliveries[-1]):
        email = await store.mail.email(d.account, d.email_id)
        assert email is not None and email.encoded == structure
        assert (await store.mail.emails(d.account, [d.email_id]))[d.email_id].encoded == structure
        own = await store.db.read(lambda tr: tr.get_range(*keys.email_structs(d.account, d.email_id)))
        assert own == []
    # Gone with the blob, once nobody has the message.
    for d in deliveries:
        await store.mail.write(d.account, lambda tr, d=d: mail.store_flags(tr, d.account, d.mailbox, [d.uid], "add", ["\\Deleted"]))
        await store.mail.expunge(d.account, d.mailbox, [d.uid])
    await store.mail.purge(now=time.time() + 2 * blobs.GRACE_SECONDS)
    assert await store.db.read(lambda tr: tr.get_range(*keys.blob_structures(digest))) == []


async def test_change_log_and_hooks(store: Storage) -> None:
    acct = await make_account(store)
    seen: list[tuple[int, int]] = []
    store.mail.on_change(lambda a, c, kinds: seen.append((a, c)))
    start = await store.db.read(lambda tr: mail.last_change(tr, acct))
    await store.mail.deliver([acct], RAW)
    await store.mail.append(acct, "Drafts", RAW)
    log = await store.db.read(lambda tr: mail.changes_since(tr, acct, start))
    assert [c for c, _, _ in log] == [start + 1, start + 2]
    assert seen == [(acct, start + 1), (acct, start + 2)]
    assert "Email" in log[0][1]


async def test_remove_account_drops_its_data(store: Storage) -> None:
    acct = await make_account(store)
    await store.mail.append(acct, "INBOX", RAW)
    await store.remove_account("alice@example.org")
    left = await store.db.read(lambda tr: tr.get_range(*keys.account_data(acct)))
    assert left == []


async def test_blob_reads_across_pieces(store: Storage) -> None:
    data = bytes(range(256)) * ((blobs.WRITE_BATCH + 3 * blobs.CHUNK_SIZE) // 256 + 7)
    digest = blobs.digest_of(data)
    await blobs.put_large(store.db, digest, data)
    assert await blobs.read(store.db, digest) == data
    start = blobs.WRITE_BATCH - 5
    assert await blobs.read(store.db, digest, start, 100) == data[start : start + 100]
    assert await blobs.read(store.db, digest, 3, None) == data[3:]
    assert await blobs.read(store.db, digest, len(data) + 10, 5) == b""
    assert await blobs.read(store.db, b"\0" * 32) == b""


async def test_operations_on_many_messages_run_in_chunks(store: Storage, monkeypatch: pytest.MonkeyPatch) -> None:
    # With 3 messages per transaction, 10 messages take several; the results
    # are those of one big operation.
    monkeypatch.setattr(mail, "CHUNK", 3)
    acct = await make_account(store)
    inbox = await store.db.read(lambda tr: mail.find_mailbox(tr, acct, "INBOX"))
    await store.mail.append_many(acct, "INBOX", [(RAW + bytes([65 + i]), (), None) for i in range(10)])
    changed, failed = await store.mail.store_flags(acct, inbox.id, list(range(1, 11)), "add", ["\\Seen"])
    assert [m.uid for m in changed] == list(range(1, 11)) and failed == []
    uv, pairs = await store.mail.copy(acct, inbox.id, list(range(1, 11)), "Archive")
    assert [d for _, d in pairs] == list(range(1, 11))
    _, moved = await store.mail.move(acct, inbox.id, [1, 2, 3, 4, 5, 6, 7], "Trash")
    assert [s for s, _ in moved] == [1, 2, 3, 4, 5, 6, 7]
    await store.mail.store_flags(acct, inbox.id, [8, 9, 10], "add", ["\\Deleted"])
    assert await store.mail.expunge(acct, inbox.id) == [8, 9, 10]
    status = await store.mail.status(acct, "Archive")
    assert (status.messages, status.unseen) == (10, 0)
    await store.mail.delete_mailbox(acct, "Archive")
    await store.mail.delete_mailbox(acct, "Trash")
    assert await store.db.read(lambda tr: mail.quota_usage(tr, acct)) == (0, 0)
    await store.mail.append_many(acct, "INBOX", [(RAW + bytes([97 + i]), (), None) for i in range(7)])
    await store.remove_account("alice@example.org")
    assert await store.db.read(lambda tr: tr.get_range(*keys.account_data(acct))) == []


async def test_get_emails_reads_dense_and_sparse_ids_alike(store: Storage) -> None:
    acct = await make_account(store)
    big = b"Subject: big\r\n\r\n" + b"x" * 150_000  # structure small, blob large
    for i in range(30):
        raw = big if i == 7 else b"Subject: m%d\r\nMessage-ID: <%d@t>\r\n\r\nbody %d\r\n" % (i, i, i)
        await store.mail.append(acct, "INBOX", raw)
    ids = [m.email_id for m, _ in await store.mail.list_messages(acct, "INBOX")]

    def one_by_one(tr: object, wanted: list[int]) -> list[mail.Email]:
        return [e for e in (mail.get_email(tr, acct, i) for i in wanted) if e is not None]  # type: ignore[arg-type]

    for wanted in (ids[3:20], ids[::7], [ids[25], ids[2], ids[9]], [ids[0]], ids + [max(ids) + 5]):
        got = await store.db.read(lambda tr: mail.get_emails(tr, acct, wanted))
        expected = await store.db.read(lambda tr: one_by_one(tr, wanted))
        assert [(e.id, e.digest, e.size, e.encoded) for e in got] == [(e.id, e.digest, e.size, e.encoded) for e in expected]
        assert all(e.structure is not None for e in got)


async def test_cached_snapshot_folds_changes_like_a_fresh_read(store: Storage) -> None:
    """The node's snapshot cache folds changes into its last snapshot; after
    any mix of appends, flag changes and expunges it must equal a snapshot
    read whole from the store: same messages, UID order, UID list, MODSEQ."""
    import random

    rng = random.Random(7)
    acct = await make_account(store)
    box = await store.db.read(lambda tr: mail.find_mailbox(tr, acct, "INBOX"))
    for _ in range(5):
        await store.mail.append(acct, box.id, RAW)
    for step in range(40):
        await store.mail.snapshot(acct, "INBOX")  # cache the current view
        uids = [m.uid for m in (await store.mail.snapshot(acct, "INBOX")).messages]
        op = rng.choice(["append", "flag", "expunge", "mixed"])
        if op in ("append", "mixed"):
            for _ in range(rng.randint(1, 3)):
                await store.mail.append(acct, box.id, RAW)
        if op in ("flag", "mixed") and uids:
            await store.mail.store_flags(acct, box.id, rng.sample(uids, min(len(uids), 2)), "add", [f"$k{step % 4}"])
        if op in ("expunge", "mixed") and uids:
            await store.mail.expunge(acct, box.id, rng.sample(uids, 1))
        cached = await store.mail.snapshot(acct, "INBOX")
        fresh = await store.db.read(lambda tr: mail.snapshot(tr, acct, box.id))
        assert cached.by_uid == fresh.by_uid
        assert list(cached.by_uid) == sorted(cached.by_uid)
        assert list(cached.uids) == list(fresh.uids) == sorted(fresh.by_uid)
        assert cached.highestmodseq == fresh.highestmodseq
        assert cached.keywords >= fresh.keywords  # keywords are only ever added


async def test_subscriptions_are_kept_by_name(store: Storage) -> None:
    acct = await make_account(store)
    await store.mail.create_mailbox(acct, "Lists/Python")
    await store.mail.subscribe(acct, "NoSuch/Box", True)  # need not exist
    boxes, subs = await store.mail.mailboxes_and_subscriptions(acct)
    assert {"INBOX", "Lists", "Lists/Python", "NoSuch/Box"} <= subs
    assert "NoSuch/Box" not in {b.name for b in boxes}
    # RFC 9051 §6.3.7: DELETE leaves the subscription alone.
    await store.mail.delete_mailbox(acct, "Lists/Python")
    _, subs = await store.mail.mailboxes_and_subscriptions(acct)
    assert "Lists/Python" in subs
    # RENAME takes the subscriptions of the mailbox and its children along.
    await store.mail.create_mailbox(acct, "Lists/Rust")
    await store.mail.rename_mailbox(acct, "Lists", "Groups")
    _, subs = await store.mail.mailboxes_and_subscriptions(acct)
    assert {"Groups", "Groups/Rust"} <= subs and not {"Lists", "Lists/Rust"} & subs
    assert "Lists/Python" in subs  # not a mailbox any more: nothing moved it
    await store.mail.subscribe(acct, "NoSuch/Box", False)
    _, subs = await store.mail.mailboxes_and_subscriptions(acct)
    assert "NoSuch/Box" not in subs
    with pytest.raises(InvalidInput):
        await store.mail.subscribe(acct, "Bad/*name", True)


async def test_subscription_flags_of_older_stores_are_read_and_migrated(store: Storage) -> None:
    acct = await make_account(store)
    await store.mail.create_mailbox(acct, "Old")
    # An older store: flags on the mailbox records ("sub", absent meaning
    # subscribed), no subscription keys, no migration marker.
    def make_legacy(tr: object) -> None:
        for key, raw in tr.get_range(*keys.mailboxes(acct)):  # type: ignore[attr-defined]
            record = json.loads(raw)
            if record["name"] == "Junk":
                record["sub"] = False
            elif record["name"] == "Old":
                record["sub"] = True
            tr.set(key, json.dumps(record).encode())  # type: ignore[attr-defined]
        tr.clear_range(*keys.subscriptions(acct))  # type: ignore[attr-defined]
        tr.clear(keys.subscriptions_migrated(acct))  # type: ignore[attr-defined]

    await store.db.transact(make_legacy)
    _, subs = await store.mail.mailboxes_and_subscriptions(acct)
    assert "Junk" not in subs and {"INBOX", "Old", "Sent"} <= subs
    # Mail into Junk rewrites its record (UIDNEXT): it stays unsubscribed.
    await store.mail.append(acct, "Junk", RAW)
    _, subs = await store.mail.mailboxes_and_subscriptions(acct)
    assert "Junk" not in subs
    # The first write moves the flags to names; they are then what counts.
    await store.mail.subscribe(acct, "Sent", False)
    _, subs = await store.mail.mailboxes_and_subscriptions(acct)
    assert "Junk" not in subs and "Sent" not in subs and {"INBOX", "Old"} <= subs
    assert await store.db.read(lambda tr: tr.get(keys.subscriptions_migrated(acct))) is not None


async def test_rename_inbox_moves_its_messages_in_chunks(store: Storage, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mail, "CHUNK", 3)
    moved_per_transaction: list[int] = []
    real_move = mail.move_messages

    def counting_move(tr: object, acct: int, src: int, uids: list[int], dst: int) -> object:
        moved_per_transaction.append(len(uids))
        return real_move(tr, acct, src, uids, dst)  # type: ignore[arg-type]

    monkeypatch.setattr(mail, "move_messages", counting_move)
    acct = await make_account(store)
    inbox = await store.mail.mailbox(acct, "INBOX")
    await store.mail.append_many(acct, "INBOX", [(RAW + bytes([65 + i]), ("\\Seen",) if i % 2 else (), None) for i in range(10)])
    await store.mail.rename_mailbox(acct, "INBOX", "Old/Inbox")
    # 10 messages, 3 per transaction (a retried one counts twice: at most 3 each).
    assert sum(1 for n in moved_per_transaction if n) >= 4 and max(moved_per_transaction) <= 3
    old = await store.mail.list_messages(acct, "Old/Inbox")
    assert [m.uid for m, _ in old] == list(range(1, 11))
    assert [bool(m.flags) for m, _ in old] == [bool(i % 2) for i in range(10)]
    assert await store.mail.list_messages(acct, "INBOX") == []
    # INBOX is the same mailbox, now empty (RFC 9051 §6.3.6).
    after = await store.mail.status(acct, "INBOX")
    assert after.mailbox.id == inbox.id and after.messages == 0
    assert (await store.mail.status(acct, "Old/Inbox")).messages == 10


async def test_message_pages_read_a_page_per_transaction_resuming_after_the_last_uid(
    store: Storage, monkeypatch: pytest.MonkeyPatch
) -> None:
    acct = await make_account(store)
    for i in range(7):
        await store.mail.append(acct, "INBOX", b"Subject: m%d\r\n\r\nbody\r\n" % i)
    box = await store.mail.mailbox(acct, "INBOX")
    await store.mail.store_flags(acct, box.id, [2], "add", ["\\Deleted"])
    assert await store.mail.expunge(acct, box.id, [2]) == [2]
    reads = 0
    real_read = store.db.read

    async def counting_read(fn, *args, **kwargs):  # type: ignore[no-untyped-def]
        nonlocal reads
        reads += 1
        return await real_read(fn, *args, **kwargs)

    monkeypatch.setattr(store.db, "read", counting_read)
    pages: list[list[int]] = []
    async for page in store.mail.message_pages(acct, "INBOX", page=3):
        pages.append([m.uid for m, _ in page])
        assert all(e is not None and e.structure is not None for _, e in page)
        if len(pages) == 1:
            # Delivered while the listing runs: it comes after the last UID read, so it shows.
            monkeypatch.setattr(store.db, "read", real_read)
            await store.mail.append(acct, "INBOX", b"Subject: late\r\n\r\nx\r\n")
            monkeypatch.setattr(store.db, "read", counting_read)
    assert pages == [[1, 3, 4], [5, 6, 7], [8]]
    assert reads == 3
    subjects = [e.structure.envelope.subject for _, e in await store.mail.list_messages(acct, "INBOX") if e and e.structure]
    assert subjects == ["m0", "m2", "m3", "m4", "m5", "m6", "late"]
    # A mailbox that is a whole number of pages ends on an empty read; none yields nothing.
    assert [len(p) async for p in store.mail.message_pages(acct, "INBOX", page=7)] == [7]
    assert [p async for p in store.mail.message_pages(acct, "Trash", page=2)] == []
    with pytest.raises(MailboxNotFound):
        [p async for p in store.mail.message_pages(acct, "Nope")]


def test_message_record_keeps_a_zone_and_reads_old_records_as_utc() -> None:
    old = mail.Message(7, 9, 11, ("\\Seen", "$X"), 837_585_865, 1234)
    raw = old.to_bytes()
    # A UTC record is byte for byte what was stored before zones were kept.
    assert raw == mail._MESSAGE.pack(7, 9, 11, 837_585_865, 1234) + b"\\Seen $X"
    assert mail.Message.from_bytes(raw) == old and old.zone == 0
    for flags in ((), ("a",), ("ab",), ("\\Seen", "$X")):
        zoned = mail.Message(7, 9, 11, flags, 837_585_865, 0, -420)
        assert mail.Message.from_bytes(zoned.to_bytes()) == zoned
        plain = mail.Message(7, 9, 11, flags, 837_585_865, 0)
        assert mail.Message.from_bytes(plain.to_bytes()) == plain


@pytest.mark.parametrize("size", [0, 1, 2046, 2047, 2048, 4095, 20_000, blobs.HASH_INLINE_MAX, blobs.HASH_INLINE_MAX + 1])
async def test_blob_digest_is_sha256_whether_hashed_in_pieces_or_in_a_worker(size: int) -> None:
    data = bytes(range(256)) * (size // 256) + bytes(size % 256)
    assert await blobs.digest(data) == blobs.digest_of(data) == hashlib.sha256(data).digest()


def test_mailbox_records_read_back_as_objects_of_their_own() -> None:
    box = mail.Mailbox(7, "INBOX", 1, 5, created=1.5)
    raw = box.to_bytes()
    first = mail.Mailbox.from_bytes(raw)
    first.uidnext += 1  # as a delivery does before writing it back
    assert mail.Mailbox.from_bytes(raw) == box
    assert mail.Mailbox.from_bytes(first.to_bytes()).uidnext == 6
