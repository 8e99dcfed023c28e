"""The selected mailbox as one session sees it (RFC 9051 §2.3.1.2, §7.4).

Sequence numbers are per session: a message keeps its number until this
session has been told it was expunged, which may only happen outside FETCH,
STORE and SEARCH (RFC 9051 §7.5.1). The view is brought up to date from the
store's per-mailbox change index since the MODSEQ it last saw, so it never
depends on a notification arriving (DESIGN.md principle 1).
"""

from __future__ import annotations

import array
import bisect
from collections.abc import Iterable

from storage.mail import Mailbox, MailboxChanges, Message, Snapshot, fold, uid_array

from . import response as r
from .commands import SequenceSet


class InvalidSequence(Exception):
    """A message sequence number beyond the mailbox (answered BAD)."""


class MailboxGone(Exception):
    """The selected mailbox was deleted or renamed away by another session."""


class Selected:
    def __init__(self, snap: Snapshot, readonly: bool) -> None:
        self.mailbox: Mailbox = snap.mailbox
        self.readonly = readonly
        # Shared with the node's snapshot cache until this session changes
        # them: SELECT of a big mailbox copies nothing. The UID list is
        # copied on write (an array: a memcpy the collector never walks);
        # messages changed or gone since SELECT live in a small overlay
        # (``_own``, ``_gone``) over the shared map, so a flag change costs
        # one entry, not a copy of the whole mailbox.
        self.uids: array.array[int] = snap.uids
        self._base: dict[int, Message] = snap.base
        self._own: dict[int, Message] = dict(snap.over)
        self._gone: set[int] = set(snap.gone)
        self._shared_uids = True
        self.modseq = snap.highestmodseq
        self.max_uid = max(snap.mailbox.uidnext - 1, self.uids[-1] if self.uids else 0)
        self.pending_expunge: set[int] = set()
        #: (uid -> modseq) changes this session already reported itself.
        self.reported: dict[int, int] = {}
        self.keywords: set[str] = set(snap.keywords)
        #: The snapshot this view still equals, message for message and
        #: number for number (until the view first changes): renderings of
        #: the whole mailbox kept in its memo serve this session too.
        self.pristine: Snapshot | None = snap

    #: The overlay is folded into a private map once it grows past this.
    OVERLAY_MAX = 512

    def msg(self, uid: int) -> Message | None:
        """The message with ``uid`` as this session knows it, if any."""
        m = self._own.get(uid)
        if m is None and uid not in self._gone:
            m = self._base.get(uid)
        return m

    def has(self, uid: int) -> bool:
        return uid in self._own or (uid in self._base and uid not in self._gone)

    def _set(self, m: Message) -> None:
        self.pristine = None
        self._own[m.uid] = m
        if len(self._own) > self.OVERLAY_MAX:
            self._fold()

    def _drop(self, uid: int) -> None:
        self.pristine = None
        self._own.pop(uid, None)
        if uid in self._base:
            self._gone.add(uid)

    def _fold(self) -> None:
        self._base, self._own, self._gone = fold(self._base, self._own, self._gone), {}, set()

    def layers(self) -> tuple[dict[int, Message], dict[int, Message]]:
        """``(overlay, shared map)``, for loops over many UIDs of this view:
        ``own.get(uid) or base[uid]`` is the message, for every UID in
        :attr:`uids` (expunged ones leave the list as they leave the view)."""
        return self._own, self._base

    @property
    def msgs(self) -> dict[int, Message]:
        """UID -> message, the whole view: the shared map itself while
        nothing changed, else a copy with the overlay laid on it (loops over
        many UIDs use :meth:`layers` instead)."""
        return fold(self._base, self._own, self._gone) if self._own or self._gone else self._base

    def _own_uids(self) -> None:
        self.pristine = None
        if self._shared_uids:
            self.uids = uid_array(self.uids)
            self._shared_uids = False

    # -- numbering ---------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.uids)

    def seq_of(self, uid: int) -> int | None:
        i = bisect.bisect_left(self.uids, uid)
        return i + 1 if i < len(self.uids) and self.uids[i] == uid else None

    def resolve(self, seqset: SequenceSet, uid: bool) -> list[tuple[int, int]]:
        """``(seq, uid)`` pairs named by a set, ascending.

        A UID set names only UIDs that exist here (RFC 9051 §6.4.8); a
        sequence set naming a number past the end is an error.
        """
        out: list[tuple[int, int]] = []
        if uid:
            largest = self.uids[-1] if self.uids else 0
            for lo, hi in seqset.resolve(largest):
                i = bisect.bisect_left(self.uids, lo)
                j = bisect.bisect_right(self.uids, hi)
                out.extend(zip(range(i + 1, j + 1), self.uids[i:j]))
            return out
        largest = len(self.uids)
        for lo, hi in seqset.resolve(largest):
            if hi > largest or lo < 1:
                raise InvalidSequence("message sequence number out of range")
            out.extend(zip(range(lo, hi + 1), self.uids[lo - 1 : hi]))
        return out

    def resolve_uids(self, uids: Iterable[int]) -> list[tuple[int, int]]:
        pairs = []
        for uid in sorted(set(uids)):
            seq = self.seq_of(uid)
            if seq is not None:
                pairs.append((seq, uid))
        return pairs

    # -- updates -----------------------------------------------------------------

    def flags_line(self) -> bytes:
        system = ["\\Answered", "\\Flagged", "\\Deleted", "\\Seen", "\\Draft"]
        return r.untagged(b"FLAGS", r.encode_flags(system + sorted(self.keywords)))

    def note_own(self, messages: Iterable[Message]) -> None:
        """Record changes this session made and reported itself."""
        for m in messages:
            if self.has(m.uid):
                self._set(m)
                self.reported[m.uid] = m.modseq

    def apply(self, changes: MailboxChanges, *, condstore: bool, with_uid: bool) -> tuple[list[bytes], list[Message]]:
        """Fold store changes in; return FETCH lines for flag changes and the
        new messages (not yet numbered: :meth:`add_new` does that)."""
        if not changes.exists:
            raise MailboxGone("mailbox was deleted")
        lines: list[bytes] = []
        new: list[Message] = []
        keywords_before = len(self.keywords)
        for m in changes.changed:
            self.keywords.update(f for f in m.flags if not f.startswith("\\"))
            if m.uid > self.max_uid:
                new.append(m)
                continue
            old = self.msg(m.uid)
            if old is None or m.uid in self.pending_expunge:
                continue
            self._set(m)  # flags change in place; numbering waits for add_new / flush_expunges
            if self.reported.get(m.uid) == m.modseq or (old.flags == m.flags and not condstore):
                continue
            seq = self.seq_of(m.uid)
            if seq is None:
                continue
            items = [b"FLAGS " + r.encode_flags(m.flags)]
            if with_uid:
                items.insert(0, b"UID %d" % m.uid)
            if condstore:
                items.append(b"MODSEQ (%d)" % m.modseq)
            lines.append(b"* %d FETCH (" % seq + b" ".join(items) + b")\r\n")
        for uid in changes.expunged:
            if self.has(uid):
                self.pending_expunge.add(uid)
        if len(self.keywords) != keywords_before:
            lines.insert(0, self.flags_line())
        self.modseq = max(self.modseq, changes.highestmodseq)
        self.reported = {u: s for u, s in self.reported.items() if s > self.modseq}
        return lines, new

    def add_new(self, new: list[Message]) -> list[bytes]:
        if not new:
            return []
        self._own_uids()
        for m in sorted(new, key=lambda m: m.uid):
            if m.uid > self.max_uid:
                self.uids.append(m.uid)
                self._set(m)
                self.max_uid = m.uid
        return [r.untagged(len(self.uids), b"EXISTS")]

    def flush_expunges(self, vanished: bool) -> list[bytes]:
        """Tell the client about expunged messages and renumber."""
        if not self.pending_expunge:
            return []
        self._own_uids()
        gone = sorted(self.pending_expunge)
        lines: list[bytes] = []
        if vanished:
            lines.append(r.untagged(b"VANISHED", r.encode_seqset(gone)))
        else:
            # Highest first, so each number is still right when it is read.
            for uid in reversed(gone):
                seq = self.seq_of(uid)
                if seq is not None:
                    lines.append(r.untagged(seq, b"EXPUNGE"))
        if len(gone) < 64:
            for uid in gone:
                i = bisect.bisect_left(self.uids, uid)
                if i < len(self.uids) and self.uids[i] == uid:
                    del self.uids[i]
        else:
            gone_set = set(gone)
            self.uids = uid_array(u for u in self.uids if u not in gone_set)
        for uid in gone:
            self._drop(uid)
            self.reported.pop(uid, None)
        self.pending_expunge.clear()
        return lines

    def first_unseen(self) -> int | None:
        own, base = self.layers()
        for i, uid in enumerate(self.uids):
            m = own.get(uid) or base.get(uid)
            if m is not None and "\\Seen" not in m.flags:
                return i + 1
        return None
