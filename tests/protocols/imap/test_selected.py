"""A session's view of its selected mailbox: shared with the node's snapshot,
changes kept in an overlay, sequence numbers per session."""

from __future__ import annotations

import random

from protocols.imap.selected import Selected
from storage.mail import Mailbox, MailboxChanges, Message, Snapshot


def message(uid: int, modseq: int, flags: tuple[str, ...] = ()) -> Message:
    return Message(uid, uid, modseq, flags, 0, 100)


def snapshot(n: int) -> Snapshot:
    return Snapshot.of(Mailbox(1, "INBOX", 7, n + 1), [message(u, u) for u in range(1, n + 1)], n)


def test_changes_never_touch_the_shared_snapshot() -> None:
    snap = snapshot(10)
    shared = dict(snap.by_uid)
    sel = Selected(snap, readonly=False)
    lines, new = sel.apply(MailboxChanges([message(3, 11, ("\\Seen",)), message(11, 12)], [5], 12),
                           condstore=False, with_uid=False)
    assert lines == [b"* 3 FETCH (FLAGS (\\Seen))\r\n"]
    assert sel.add_new(new) == [b"* 11 EXISTS\r\n"]
    assert sel.flush_expunges(vanished=False) == [b"* 5 EXPUNGE\r\n"]
    assert snap.by_uid == shared and list(snap.uids) == list(range(1, 11))  # the node's view is intact
    assert sel.msg(3).flags == ("\\Seen",) and sel.msg(5) is None and sel.has(11) and not sel.has(5)  # type: ignore[union-attr]
    assert list(sel.uids) == [1, 2, 3, 4, 6, 7, 8, 9, 10, 11] and sel.seq_of(11) == 10
    assert sel.msgs == {u: sel.msg(u) for u in sel.uids}  # the whole map, folded


def test_overlay_matches_a_plain_dict_under_random_changes() -> None:
    rng = random.Random(3)
    snap = snapshot(300)
    sel = Selected(snap, readonly=False)
    model = dict(snap.by_uid)
    modseq, next_uid = 300, 301
    for _ in range(400):
        modseq += 1
        known = list(model)
        changed = [message(u, modseq, (f"$k{modseq % 5}",)) for u in rng.sample(known, min(len(known), 3))]
        if rng.random() < 0.3:
            changed.append(message(next_uid, modseq))
            next_uid += 1
        gone = rng.sample(known, 1) if known and rng.random() < 0.3 else []
        changed = [m for m in changed if m.uid not in gone]
        changed.sort(key=lambda m: m.uid)
        _, new = sel.apply(MailboxChanges(changed, gone, modseq), condstore=False, with_uid=False)
        sel.add_new(new)
        sel.flush_expunges(vanished=True)
        for m in changed:
            model[m.uid] = m
        for u in gone:
            model.pop(u, None)
        assert list(sel.uids) == sorted(model)
        for u in rng.sample(sorted(model), 5):
            assert sel.msg(u) == model[u] and sel.has(u)
    assert sel.msgs == model


def test_snapshot_chain_with_overlay_matches_a_plain_dict(monkeypatch: object) -> None:
    """The node's snapshots keep changes beside a shared map and fold them in
    past a bound; every snapshot, and a session started from any of them,
    must see exactly the mailbox a plain dict would."""
    import pytest

    mp = pytest.MonkeyPatch()
    mp.setattr(Snapshot, "OVERLAY_MAX", 8)
    try:
        rng = random.Random(11)
        snap = snapshot(50)
        model = dict(snap.by_uid)
        modseq, next_uid = 50, 51
        snap.uids  # noqa: B018 - the UID array is carried forward from here on
        for step in range(200):
            modseq += 1
            known = sorted(model)
            gone = rng.sample(known, min(len(known), rng.randint(0, 2)))
            changed = [message(u, modseq, (f"$k{step % 3}",)) for u in rng.sample(known, min(len(known), 2)) if u not in gone]
            for _ in range(rng.randint(0, 2)):
                changed.append(message(next_uid, modseq))
                next_uid += 1
            changed.sort(key=lambda m: m.uid)
            snap = snap.apply(MailboxChanges(changed, gone, modseq))
            for u in gone:
                model.pop(u)
            for m in changed:
                model[m.uid] = m
            assert snap.by_uid == model and list(snap.by_uid) == sorted(model)
            assert list(snap.uids) == sorted(model)
            sel = Selected(snap, readonly=True)
            assert all(sel.msg(u) == m for u, m in model.items()) and not any(sel.has(u) for u in gone)
            assert sel.msgs == model
    finally:
        mp.undo()
