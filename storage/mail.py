"""Mail: mailboxes, messages, threads, quotas and the per-account change log.

Model (Stalwart/JMAP-like): an *email* is one stored message of an account
(blob, size, parsed structure, thread); it sits in one or more *mailboxes*,
each time as a *message* with its own UID, flags and MODSEQ (IMAP's view).
Every write to an account takes the next id of the account's change counter;
that id is the MODSEQ of what it touched, a JMAP state, a DAV sync token
(DESIGN.md "Change log"). UIDs are allocated from the mailbox record in the
inserting transaction, so UID order is commit order (RFC 9051 §2.3.1.1).

Functions taking ``tr`` first are transaction bodies: idempotent, no side
effects. :class:`MailStore` wraps them in transactions and runs the after-
commit hooks (wake IDLE sessions, tell peers).
"""

from __future__ import annotations

import array
import asyncio
import bisect
import functools
import json
import logging
import struct
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, cast

from . import blobs, keys, mime, parsing
from .directory import get_account
from .errors import (
    AlreadyExists,
    Forbidden,
    HasChildren,
    InvalidInput,
    MailboxNotFound,
    NotSelectable,
    QuotaExceeded,
    TemporaryQuotaExceeded,
    UnknownUser,
)
from .kv.base import MAX_VALUE_SIZE, Database, ReadTransaction, RetryableError, Transaction, decode_counter, encode_counter

log = logging.getLogger("rookery.mail")

#: Hierarchy delimiter of mailbox names (IMAP LIST).
DELIMITER = "/"
#: RFC 6154 special-use mailboxes every new account gets.
DEFAULT_MAILBOXES = (
    ("INBOX", None),
    ("Sent", "\\Sent"),
    ("Drafts", "\\Drafts"),
    ("Trash", "\\Trash"),
    ("Junk", "\\Junk"),
    ("Archive", "\\Archive"),
)
SPECIAL_USES = {"\\All", "\\Archive", "\\Drafts", "\\Flagged", "\\Junk", "\\Sent", "\\Trash"}
SEEN = "\\Seen"
DELETED = "\\Deleted"
#: Flags a message may carry besides keywords (RFC 9051 §2.3.2; \Recent is
#: not stored: IMAP4rev2 dropped it and we report none).
SYSTEM_FLAGS = ("\\Answered", "\\Flagged", "\\Deleted", "\\Seen", "\\Draft")
MAX_MAILBOX_NAME = 1000
MAX_FLAGS = 100
MAX_FLAG_LENGTH = 250
#: Parsed structures of emails are immutable, so a cache of them is always
#: valid (ids are never reused); this bounds its size.
STRUCTURE_CACHE = 20_000
#: Emails (records and structures) read per read transaction.
EMAILS_PER_READ = 500
#: Parse in a thread above this size, so a huge message never stalls the loop.
PARSE_INLINE_MAX = 256 * 1024
#: A parsed structure this large (thousands of MIME parts) is stored once
#: beside its blob rather than once per account that has the message.
SHARED_STRUCTURE_MIN = 16 * 1024

ChangeHook = Callable[[int, int, frozenset[str]], None]
_MESSAGE = struct.Struct(">IQQqQ")
_ZONE = struct.Struct(">h")
#: Shortest record with a zone is one byte longer (no flags): NUL and zone
#: after the fixed part.
_ZONED_MIN = _MESSAGE.size + _ZONE.size
#: Messages per transaction for operations on many messages (STORE, EXPUNGE,
#: COPY, MOVE, DELETE): keeps each well inside 10 MB and 5 s.
CHUNK = 2000
#: Messages per read transaction of ``mail list`` (with their parsed structures).
LIST_PAGE = 500
#: Mailbox snapshots kept per node (validated against the store at each use).
SNAPSHOT_CACHE = 256


class BlobMissing(RetryableError):
    """A large blob was purged between its write and its link: write it again."""


@dataclass(slots=True)
class Mailbox:
    id: int
    name: str
    uidvalidity: int
    uidnext: int
    special_use: str | None = None
    created: float = 0.0
    #: A name kept only for its children (RFC 9051 §6.3.4 DELETE): no
    #: messages, cannot be selected; CREATE makes it a mailbox again.
    noselect: bool = False
    #: The "sub" flag of a record written by an older store, kept as read
    #: until the account's subscriptions are migrated (a record rewritten
    #: without it would read as subscribed again).
    legacy_sub: bool | None = None

    def to_bytes(self) -> bytes:
        # Subscriptions live apart, by name (keys.subscription).
        d = {
            "id": self.id,
            "name": self.name,
            "uv": self.uidvalidity,
            "un": self.uidnext,
            "su": self.special_use,
            "c": self.created,
            "ns": self.noselect,
        }
        if self.legacy_sub is not None:
            d["sub"] = self.legacy_sub
        raw = json.dumps(d).encode()
        _remember_mailbox(raw, (
            self.id, self.name, self.uidvalidity, self.uidnext, self.special_use, self.created, self.noselect,
            self.legacy_sub,
        ))
        return raw

    @classmethod
    def from_bytes(cls, raw: bytes) -> Mailbox:
        fields = _MAILBOX_FIELDS.get(raw)
        if fields is None:
            d = json.loads(raw)
            fields = (d["id"], d["name"], d["uv"], d["un"], d.get("su"), d.get("c", 0.0), d.get("ns", False), d.get("sub"))
            _remember_mailbox(raw, fields)
        return cls(*fields)


#: Mailbox records decoded or encoded lately, by their bytes: a delivery
#: reads the INBOX record the one before it wrote (its UIDNEXT moved), and
#: sessions read the same records over and over. Bytes are the key, so an
#: entry can never be stale; a fresh Mailbox is made from it at each read.
_MAILBOX_FIELDS: dict[bytes, tuple[Any, ...]] = {}
_MAILBOX_FIELDS_MAX = 4096


def _remember_mailbox(raw: bytes, fields: tuple[Any, ...]) -> None:
    if len(_MAILBOX_FIELDS) >= _MAILBOX_FIELDS_MAX:
        _MAILBOX_FIELDS.clear()
    _MAILBOX_FIELDS[raw] = fields


@dataclass(slots=True)
class Message:
    """A message in a mailbox (IMAP's view)."""

    uid: int
    email_id: int
    modseq: int
    flags: tuple[str, ...]
    #: Seconds since the epoch (UTC).
    internal_date: int
    size: int
    #: The internal date's zone, minutes east of UTC: an APPEND's date is
    #: given back as it was written (RFC 9051 §6.3.12), and SEARCH BEFORE/ON/
    #: SINCE compare its date in that zone (§6.4.4). Deliveries use UTC.
    zone: int = 0

    # A fixed struct, not a packed tuple: SELECT decodes every record of a
    # mailbox, and fdb.tuple.unpack costs ~7 µs where this costs ~1 µs. Flags
    # cannot contain spaces (validate_flags), so they are joined by one. A
    # zone other than UTC follows the flags after a NUL (which no flag
    # holds), so records stored before it was kept still read as UTC.
    def to_bytes(self) -> bytes:
        raw = _MESSAGE.pack(self.uid, self.email_id, self.modseq, self.internal_date, self.size) + " ".join(
            self.flags
        ).encode("utf-8")
        return raw + b"\x00" + _ZONE.pack(self.zone) if self.zone else raw

    @classmethod
    def from_bytes(cls, raw: bytes) -> Message:
        uid, email_id, modseq, internal_date, size = _MESSAGE.unpack_from(raw)
        n = len(raw)
        if n > _ZONED_MIN and not raw[-3]:  # the NUL before a zone (_ZONE.size == 2)
            flags = tuple(raw[_MESSAGE.size : -3].decode("utf-8").split(" ")) if n > _ZONED_MIN + 1 else ()
            return cls(uid, email_id, modseq, flags, internal_date, size, _ZONE.unpack_from(raw, n - 2)[0])
        flags = tuple(raw[_MESSAGE.size :].decode("utf-8").split(" ")) if n > _MESSAGE.size else ()
        return cls(uid, email_id, modseq, flags, internal_date, size)


@dataclass(slots=True)
class Email:
    """A stored message of an account (content, independent of mailboxes)."""

    id: int
    digest: bytes
    size: int
    received: int
    thread_id: int
    #: The parsed structure as stored (``mime.encode``); see :attr:`structure`.
    encoded: bytes | None = field(default=None, repr=False)
    #: Protocol renderings of the immutable structure (e.g. IMAP ENVELOPE),
    #: kept with the cached email so they are computed once.
    rendered: dict[str, bytes] = field(default_factory=dict, repr=False)

    @property
    def structure(self) -> mime.Message | None:
        """The parsed structure, decoded at each use and not kept: the node's
        email cache then holds a few bytes objects per email instead of a tree
        of parts and addresses, which every full garbage collection would walk
        (tens of thousands of cached emails made pauses of 100 ms and more)."""
        return None if self.encoded is None else mime.decode(self.encoded)


@dataclass(slots=True)
class MailboxStatus:
    mailbox: Mailbox
    messages: int
    unseen: int
    deleted: int
    size: int
    highestmodseq: int


def uid_array(uids: Iterable[int] = ()) -> array.array[int]:
    """UIDs in an ``array`` of unsigned 64-bit ints: copied at C speed and,
    unlike a list, never traversed by the garbage collector (a session of a
    10,000-message mailbox would otherwise add 10,000 references to every
    young collection while it lives)."""
    return array.array("Q", uids)


def fold(base: dict[int, Message], over: dict[int, Message], gone: Iterable[int]) -> dict[int, Message]:
    """``base`` without ``gone``, with ``over`` laid on top: changed messages
    keep their place, new ones (higher UIDs) come last, so UID order holds."""
    out = dict(base)
    for uid in gone:
        out.pop(uid, None)
    out.update(over)
    return out


class Snapshot:
    """What SELECT needs: the mailbox, its messages in UID order, HIGHESTMODSEQ.

    A snapshot is shared by every session that selects it and never changed:
    :meth:`apply` makes a new one. The messages are a big map (``base``,
    shared from snapshot to snapshot) with the changes since it was built
    beside it (``over``: changed or new messages; ``gone``: expunged UIDs),
    folded into a new map only once they grow past :attr:`OVERLAY_MAX`, so a
    change to a 10,000-message mailbox does not copy 10,000 entries. Dicts
    keep insertion order and new UIDs are always the highest, so ``by_uid``
    is in UID order.
    """

    __slots__ = ("mailbox", "base", "over", "gone", "highestmodseq", "_keywords", "_uids", "_folded", "memo")

    #: Changes kept beside the shared map before they are folded into a copy.
    OVERLAY_MAX = 512

    def __init__(
        self,
        mailbox: Mailbox,
        base: dict[int, Message],
        highestmodseq: int,
        keywords: frozenset[str] | None = None,
        uids: array.array[int] | None = None,
        over: dict[int, Message] | None = None,
        gone: frozenset[int] = frozenset(),
    ) -> None:
        self.mailbox = mailbox
        self.base = base
        self.over: dict[int, Message] = over if over is not None else {}
        self.gone = gone
        self.highestmodseq = highestmodseq
        self._keywords = keywords
        self._uids = uids
        self._folded: dict[int, Message] | None = None
        #: What protocols derive from these messages alone (a rendering of
        #: all their flags, say), kept with the snapshot that it describes.
        self.memo: dict[str, bytes] = {}

    @classmethod
    def of(cls, mailbox: Mailbox, messages: Iterable[Message], highestmodseq: int) -> Snapshot:
        return cls(mailbox, {m.uid: m for m in messages}, highestmodseq)

    def but(self, mailbox: Mailbox | None = None, highestmodseq: int | None = None) -> Snapshot:
        """The same messages with a fresher mailbox record or HIGHESTMODSEQ."""
        fresher = Snapshot(
            mailbox or self.mailbox,
            self.base,
            self.highestmodseq if highestmodseq is None else highestmodseq,
            self._keywords,
            self._uids,
            self.over,
            self.gone,
        )
        fresher.memo = self.memo  # same messages, same renderings
        return fresher

    @property
    def by_uid(self) -> dict[int, Message]:
        """UID -> message, in UID order (the overlay folded in, once)."""
        if not self.over and not self.gone:
            return self.base
        if self._folded is None:
            self._folded = fold(self.base, self.over, self.gone)
        return self._folded

    @property
    def messages(self) -> list[Message]:
        return list(self.by_uid.values())

    @property
    def uids(self) -> array.array[int]:
        if self._uids is None:
            self._uids = uid_array(self.by_uid)
        return self._uids

    @property
    def keywords(self) -> frozenset[str]:
        """Keywords in use in the mailbox (for the FLAGS response)."""
        if self._keywords is None:
            self._keywords = frozenset(f for m in self.by_uid.values() for f in m.flags if not f.startswith("\\"))
        return self._keywords

    def apply(self, delta: MailboxChanges) -> Snapshot:
        """A new snapshot with ``delta`` folded in (the old one is shared, never changed).

        The overlay and the UID array are carried over by copying (small,
        or a memcpy) rather than rebuilt. Keywords are only ever added, as
        Dovecot keeps them: FLAGS may name one no message carries any more.
        """
        base = self.base
        over = dict(self.over)
        gone = set(self.gone)
        last = max(next(reversed(base), 0), max(over, default=0))
        for uid in delta.expunged:
            over.pop(uid, None)
            if uid in base:
                gone.add(uid)
        fresh: list[int] = []
        ordered = True
        for m in delta.changed:  # in UID order
            if m.uid not in over and (m.uid not in base or m.uid in gone):
                if m.uid > last:
                    fresh.append(m.uid)
                    last = m.uid
                else:
                    ordered = False  # UIDs only go up; keep UID order anyway
                gone.discard(m.uid)
            over[m.uid] = m
        if not ordered or len(over) + len(gone) > self.OVERLAY_MAX:
            base = fold(base, over, gone)
            if not ordered:
                base = dict(sorted(base.items()))
            over, gone = {}, set()
        uids = None  # rebuilt from the map when first asked for
        if ordered and self._uids is not None and len(delta.expunged) < 256:
            uids = uid_array(self._uids)  # a memcpy; a few deletions move the tail
            for uid in delta.expunged:
                i = bisect.bisect_left(uids, uid)
                if i < len(uids) and uids[i] == uid:
                    del uids[i]
            uids.extend(fresh)
        keywords = self.keywords | {f for m in delta.changed for f in m.flags if not f.startswith("\\")}
        return Snapshot(
            self.mailbox, base, max(self.highestmodseq, delta.highestmodseq), keywords, uids, over, frozenset(gone)
        )


@dataclass(slots=True)
class MailboxChanges:
    """Changes in a mailbox after a MODSEQ (IDLE, NOOP, QRESYNC)."""

    changed: list[Message]  # new or flag-changed, in UID order
    expunged: list[int]  # UIDs
    highestmodseq: int
    exists: bool = True  # False: the mailbox was deleted or renamed away


@dataclass(slots=True)
class Delivery:
    """One email stored for one account by :meth:`MailStore.deliver`."""

    account: int
    mailbox: int
    uid: int
    email_id: int
    change_id: int
    thread_id: int = 0


# -- small helpers -----------------------------------------------------------

def _counter(tr: ReadTransaction, key: bytes) -> int:
    return decode_counter(tr.get(key))


def _next_seq(tr: Transaction, acct: int, name: str) -> int:
    key = keys.account_seq(acct, name)
    value = _counter(tr, key) + 1
    # Read anyway (the value is needed), so a plain set costs one statement
    # less than an atomic add and conflicts no more.
    tr.set(key, encode_counter(value))
    return value


def record_change(tr: Transaction, acct: int, kinds: Iterable[str], mailboxes: Iterable[int] = ()) -> int:
    """Take the account's next change id and log what it touched."""
    key = keys.change_counter(acct)
    change_id = _counter(tr, key) + 1
    tr.set(key, encode_counter(change_id))
    tr.set(keys.change(acct, change_id), json.dumps({"k": sorted(set(kinds)), "b": sorted(set(mailboxes))}).encode())
    return change_id


def last_change(tr: ReadTransaction, acct: int) -> int:
    return _counter(tr, keys.change_counter(acct))


def changes_since(tr: ReadTransaction, acct: int, since: int, limit: int = 0) -> list[tuple[int, frozenset[str], list[int]]]:
    rows = tr.get_range(*keys.changes_since(acct, since), limit=limit)
    out = []
    for k, v in rows:
        d = json.loads(v)
        out.append((keys.unpack(k)[3], frozenset(d["k"]), d["b"]))
    return out


def validate_mailbox_name(name: str) -> str:
    """Normalize a mailbox name: INBOX case-insensitive, no empty levels."""
    if name == "INBOX":  # every delivery's
        return name
    if not name or len(name) > MAX_MAILBOX_NAME:
        raise InvalidInput("invalid mailbox name")
    if any(ord(c) < 0x20 or c == "\x7f" for c in name) or "*" in name or "%" in name:
        raise InvalidInput("mailbox name contains a forbidden character")
    name = name.rstrip(DELIMITER)
    parts = name.split(DELIMITER)
    if any(not p for p in parts):
        raise InvalidInput("mailbox name has an empty level")
    if parts[0].upper() == "INBOX":
        parts[0] = "INBOX"
    return DELIMITER.join(parts)


def validate_flags(flags: Iterable[str]) -> tuple[str, ...]:
    out: list[str] = []
    canon = {f.lower(): f for f in SYSTEM_FLAGS}
    for flag in flags:
        if flag.startswith("\\"):
            if flag.lower() == "\\recent":
                continue
            if flag.lower() not in canon:
                raise InvalidInput(f"unknown system flag {flag}")
            flag = canon[flag.lower()]
        elif not flag or len(flag) > MAX_FLAG_LENGTH or any(c in flag for c in '(){ %*"\\]') or not flag.isprintable():
            raise InvalidInput(f"invalid keyword {flag!r}")
        if flag not in out:
            out.append(flag)
    if len(out) > MAX_FLAGS:
        raise InvalidInput("too many flags")
    return tuple(sorted(out))


# -- mailboxes -----------------------------------------------------------------

def get_mailbox(tr: ReadTransaction, acct: int, mbox: int) -> Mailbox | None:
    raw = tr.get(keys.mailbox(acct, mbox))
    return None if raw is None else Mailbox.from_bytes(raw)


def find_mailbox(tr: ReadTransaction, acct: int, name: str, selectable: bool = True) -> Mailbox:
    """The mailbox named ``name``. Raises :class:`MailboxNotFound`, and
    :class:`NotSelectable` for a \\Noselect one unless ``selectable`` is
    False (DELETE, RENAME work on names)."""
    name = validate_mailbox_name(name)
    raw = tr.get(keys.mailbox_name(acct, name))
    box = None if raw is None else get_mailbox(tr, acct, int(raw))
    if box is None:
        raise MailboxNotFound(f"mailbox {name} does not exist")
    if selectable and box.noselect:
        raise NotSelectable(f"mailbox {name} is not selectable (\\Noselect)")
    return box


def list_mailboxes(tr: ReadTransaction, acct: int) -> list[Mailbox]:
    boxes = [Mailbox.from_bytes(v) for _, v in tr.get_range(*keys.mailboxes(acct))]
    return sorted(boxes, key=lambda b: (b.name != "INBOX", b.name))


def _new_uidvalidity(tr: Transaction, acct: int) -> int:
    # Unique per account and increasing, as RFC 9051 §2.3.1.1 wants for a
    # name re-created after deletion; seeded from the clock, 32-bit.
    key = keys.account_seq(acct, "uidvalidity")
    value = max(_counter(tr, key) + 1, int(time.time()) & 0x7FFFFFFF)
    tr.set(key, value.to_bytes(8, "little", signed=True))
    return value


def create_mailbox(tr: Transaction, acct: int, name: str, special_use: str | None = None) -> Mailbox:
    """Create ``name`` and any missing parents (RFC 9051 §6.3.4)."""
    name = validate_mailbox_name(name)
    if special_use is not None and special_use not in SPECIAL_USES:
        raise InvalidInput(f"unknown special use {special_use}")
    existing = tr.get(keys.mailbox_name(acct, name))
    if existing is not None:
        old = get_mailbox(tr, acct, int(existing))
        if old is None or not old.noselect:
            raise AlreadyExists(f"mailbox {name} already exists")
        # A \Noselect name becomes a mailbox again: a new one (new id and
        # UIDVALIDITY), as if the name had never been kept.
        _forget_mailbox(tr, acct, old)
    parts = name.split(DELIMITER)
    created = None
    for depth in range(1, len(parts) + 1):
        path = DELIMITER.join(parts[:depth])
        if tr.get(keys.mailbox_name(acct, path)) is not None:
            continue
        mbox = _next_seq(tr, acct, "mbox")
        box = Mailbox(mbox, path, _new_uidvalidity(tr, acct), 1, special_use if path == name else None, time.time())
        tr.set(keys.mailbox(acct, mbox), box.to_bytes())
        tr.set(keys.mailbox_name(acct, path), str(mbox).encode())
        # New mailboxes start subscribed, as they always have here.
        _subscribe(tr, acct, path, True)
        created = box
    assert created is not None
    record_change(tr, acct, ["Mailbox"], [created.id])
    return created


def create_default_mailboxes(tr: Transaction, acct: int) -> None:
    for name, use in DEFAULT_MAILBOXES:
        if tr.get(keys.mailbox_name(acct, name)) is None:
            create_mailbox(tr, acct, name, use)


def _children(tr: ReadTransaction, acct: int, name: str) -> list[Mailbox]:
    prefix = name + DELIMITER
    return [b for b in list_mailboxes(tr, acct) if b.name.startswith(prefix)]


def _forget_mailbox(tr: Transaction, acct: int, box: Mailbox) -> None:
    """Remove a mailbox record and all it holds (its subscription stays)."""
    messages = [Message.from_bytes(v) for k, v in tr.get_range(*keys.messages(acct, box.id))]
    _remove_messages(tr, acct, box.id, messages, modseq=None)
    for begin, end in keys.mailbox_all(acct, box.id):
        tr.clear_range(begin, end)
    tr.clear(keys.mailbox(acct, box.id))
    tr.clear(keys.mailbox_name(acct, box.name))


def delete_mailbox(tr: Transaction, acct: int, name: str) -> Mailbox:
    """DELETE (RFC 9051 §6.3.4). A mailbox with children loses its messages
    and stays as a \\Noselect name; a \\Noselect one with children is
    refused (HASCHILDREN); any other goes entirely."""
    box = find_mailbox(tr, acct, name, selectable=False)
    if box.name == "INBOX":
        raise Forbidden("INBOX cannot be deleted")
    children = bool(_children(tr, acct, box.name))
    if children and box.noselect:
        raise HasChildren(f"mailbox {box.name} has children; delete them first")
    _forget_mailbox(tr, acct, box)
    if children:
        # A new record (new id): sessions that had the mailbox selected see
        # it gone, as for any DELETE.
        mbox = _next_seq(tr, acct, "mbox")
        placeholder = Mailbox(mbox, box.name, _new_uidvalidity(tr, acct), 1, None, time.time(), noselect=True)
        tr.set(keys.mailbox(acct, mbox), placeholder.to_bytes())
        tr.set(keys.mailbox_name(acct, box.name), str(mbox).encode())
    record_change(tr, acct, ["Mailbox", "Email", "Thread"], [box.id])
    return box


def rename_mailbox(tr: Transaction, acct: int, old: str, new: str) -> Mailbox:
    """RENAME (RFC 9051 §6.3.6): children move along. Renaming INBOX creates
    the new mailbox only and returns it: :meth:`MailStore.rename_mailbox`
    then moves INBOX's messages into it, CHUNK per transaction."""
    box = find_mailbox(tr, acct, old, selectable=False)
    new = validate_mailbox_name(new)
    if tr.get(keys.mailbox_name(acct, new)) is not None:
        raise AlreadyExists(f"mailbox {new} already exists")
    if new == box.name or new.startswith(box.name + DELIMITER):
        raise InvalidInput("cannot rename a mailbox into itself")
    if box.name == "INBOX":
        return create_mailbox(tr, acct, new)
    # Parents of the new name are created as CREATE would.
    parent = new.rpartition(DELIMITER)[0]
    if parent and tr.get(keys.mailbox_name(acct, parent)) is None:
        create_mailbox(tr, acct, parent)
    old_name = box.name
    moved = [box] + _children(tr, acct, old_name)
    for b in moved:
        tr.clear(keys.mailbox_name(acct, b.name))
    # Subscriptions follow the mailboxes (as Dovecot and Cyrus do): the
    # client that subscribed to a mailbox goes on seeing it after RENAME.
    subscribed = subscriptions(tr, acct)
    for b in moved:
        was_subscribed = b.name in subscribed
        if was_subscribed:
            _subscribe(tr, acct, b.name, False)
        b.name = new + b.name[len(old_name) :]
        tr.set(keys.mailbox(acct, b.id), b.to_bytes())
        tr.set(keys.mailbox_name(acct, b.name), str(b.id).encode())
        if was_subscribed:
            _subscribe(tr, acct, b.name, True)
    record_change(tr, acct, ["Mailbox"], [b.id for b in moved])
    return box


# -- subscriptions (RFC 9051 §6.3.7, §6.3.8) ---------------------------------
# Kept by name, apart from the mailboxes: a subscription outlives its mailbox
# (DELETE must not drop it) and may name one that does not exist yet.


def _legacy_subscribed(tr: ReadTransaction, acct: int) -> set[str]:
    """Names older stores marked subscribed on the mailbox record itself."""
    out = set()
    for _, raw in tr.get_range(*keys.mailboxes(acct)):
        d = json.loads(raw)
        if d.get("sub", True):
            out.add(d["name"])
    return out


def _migrate_subscriptions(tr: Transaction, acct: int) -> None:
    """Before the first write, move older stores' flags to the name keys."""
    if tr.get(keys.subscriptions_migrated(acct)) is not None:
        return
    for name in _legacy_subscribed(tr, acct):
        tr.set(keys.subscription(acct, name), b"")
    tr.set(keys.subscriptions_migrated(acct), b"")


def _subscribe(tr: Transaction, acct: int, name: str, subscribed: bool) -> None:
    _migrate_subscriptions(tr, acct)
    if subscribed:
        tr.set(keys.subscription(acct, name), b"")
    else:
        tr.clear(keys.subscription(acct, name))


def subscriptions(tr: ReadTransaction, acct: int) -> set[str]:
    """The names the account is subscribed to, existing or not."""
    names = {keys.unpack(k)[-1] for k, _ in tr.get_range(*keys.subscriptions(acct))}
    if tr.get(keys.subscriptions_migrated(acct)) is None:
        names |= _legacy_subscribed(tr, acct)
    return names


def set_subscribed(tr: Transaction, acct: int, name: str, subscribed: bool) -> None:
    """SUBSCRIBE / UNSUBSCRIBE. Any valid name may be subscribed, whether a
    mailbox has it or not (RFC 9051 §6.3.7 only allows a server to check)."""
    name = validate_mailbox_name(name)
    _subscribe(tr, acct, name, subscribed)
    record_change(tr, acct, ["Mailbox"])


def highest_modseq(tr: ReadTransaction, acct: int, mbox: int) -> int:
    top = 0
    for rng in (keys.modseq_since(acct, mbox, 0), keys.expunged_since(acct, mbox, 0)):
        rows = tr.get_range(*rng, limit=1, reverse=True)
        if rows:
            top = max(top, keys.unpack(rows[0][0])[4])
    return top


def mailbox_status(tr: ReadTransaction, acct: int, box: Mailbox) -> MailboxStatus:
    counts = {keys.unpack(k)[-1]: decode_counter(v) for k, v in tr.get_range(*keys.mailbox_counters(acct, box.id))}
    return MailboxStatus(
        box, counts.get("n", 0), counts.get("unseen", 0), counts.get("deleted", 0), counts.get("size", 0),
        highest_modseq(tr, acct, box.id),
    )


def _count(tr: Transaction, acct: int, mbox: int, msg: Message, sign: int) -> None:
    tr.add(keys.mailbox_counter(acct, mbox, "n"), sign)
    tr.add(keys.mailbox_counter(acct, mbox, "size"), sign * msg.size)
    if SEEN not in msg.flags:
        tr.add(keys.mailbox_counter(acct, mbox, "unseen"), sign)
    if DELETED in msg.flags:
        tr.add(keys.mailbox_counter(acct, mbox, "deleted"), sign)


# -- messages ----------------------------------------------------------------------

def _put_message(tr: Transaction, acct: int, mbox: int, msg: Message, old_modseq: int | None) -> None:
    if old_modseq is not None:
        tr.clear(keys.modseq_index(acct, mbox, old_modseq, msg.uid))
    tr.set(keys.message(acct, mbox, msg.uid), msg.to_bytes())
    tr.set(keys.modseq_index(acct, mbox, msg.modseq, msg.uid), b"")


def _when(now: int, date: int | datetime | None) -> tuple[int, int]:
    """(seconds, zone minutes) of an internal date; UTC unless a datetime with
    a zone is given."""
    if date is None:
        return now, 0
    if isinstance(date, datetime):
        offset = date.utcoffset()
        zone = 0 if offset is None else int(offset.total_seconds()) // 60
        # RFC 9051 zone: ±HHMM, so within a day either way.
        return int(date.timestamp()), zone if -1440 < zone < 1440 else 0
    return date, 0


def _insert(
    tr: Transaction, acct: int, box: Mailbox, email_id: int, flags: tuple[str, ...], internal_date: int, size: int,
    modseq: int, zone: int = 0,
) -> Message:
    uid = box.uidnext
    box.uidnext += 1
    tr.set(keys.mailbox(acct, box.id), box.to_bytes())
    msg = Message(uid, email_id, modseq, flags, internal_date, size, zone)
    _put_message(tr, acct, box.id, msg, None)
    tr.set(keys.location(acct, email_id, box.id, uid), b"")
    _count(tr, acct, box.id, msg, +1)
    return msg


def get_messages(tr: ReadTransaction, acct: int, mbox: int, first: int = 1, last: int | None = None) -> list[Message]:
    return [Message.from_bytes(v) for k, v in tr.get_range(*keys.messages(acct, mbox, first, last))]


def _message_page(tr: ReadTransaction, acct: int, mbox: int, after: int, limit: int) -> list[tuple[Message, Email | None]]:
    """Up to ``limit`` messages with UIDs past ``after``, with their emails (``mail list``)."""
    msgs = [Message.from_bytes(v) for _, v in tr.get_range(*keys.messages(acct, mbox, after + 1), limit=limit)]
    emails = {e.id: e for e in get_emails(tr, acct, sorted({m.email_id for m in msgs}))}
    return [(m, emails.get(m.email_id)) for m in msgs]


def get_message(tr: ReadTransaction, acct: int, mbox: int, uid: int) -> Message | None:
    raw = tr.get(keys.message(acct, mbox, uid))
    return None if raw is None else Message.from_bytes(raw)


def snapshot(tr: ReadTransaction, acct: int, mbox: int) -> Snapshot:
    box = get_mailbox(tr, acct, mbox)
    if box is None:
        raise MailboxNotFound("mailbox does not exist")
    return Snapshot.of(box, get_messages(tr, acct, mbox), highest_modseq(tr, acct, mbox))


def mailbox_changes(tr: ReadTransaction, acct: int, mbox: int, since: int, box: Mailbox | None = None) -> MailboxChanges:
    """Messages changed and UIDs expunged after MODSEQ ``since``.

    ``box``: the mailbox's record when the caller just read it. The new
    HIGHESTMODSEQ is the highest MODSEQ of the index entries read here, as
    every entry above ``since`` is among them (nothing above: ``since``).
    """
    if box is None and get_mailbox(tr, acct, mbox) is None:
        return MailboxChanges([], [], since, exists=False)
    top = since
    uids: set[int] = set()
    for k, _ in tr.get_range(*keys.modseq_since(acct, mbox, since)):
        entry = keys.unpack(k)
        uids.add(entry[5])
        top = max(top, entry[4])
    changed = [m for m in (get_message(tr, acct, mbox, uid) for uid in sorted(uids)) if m is not None]
    gone: set[int] = set()
    for k, _ in tr.get_range(*keys.expunged_since(acct, mbox, since)):
        entry = keys.unpack(k)
        gone.add(entry[5])
        top = max(top, entry[4])
    return MailboxChanges(changed, sorted(gone), top)


def store_flags(
    tr: Transaction,
    acct: int,
    mbox: int,
    uids: Sequence[int],
    mode: str,
    flags: Iterable[str],
    unchangedsince: int | None = None,
) -> tuple[list[Message], list[int]]:
    """STORE (RFC 9051 §6.4.6; UNCHANGEDSINCE RFC 7162 §3.1.3).

    ``mode`` is ``"add"``, ``"remove"`` or ``"replace"``. Returns the messages
    whose flags changed (with their new MODSEQ) and the UIDs that failed the
    UNCHANGEDSINCE test.
    """
    wanted = set(validate_flags(flags))
    changed: list[Message] = []
    failed: list[int] = []
    modseq = 0
    for uid in uids:
        msg = get_message(tr, acct, mbox, uid)
        if msg is None:
            continue
        if unchangedsince is not None and msg.modseq > unchangedsince:
            failed.append(uid)
            continue
        current = set(msg.flags)
        new = current | wanted if mode == "add" else current - wanted if mode == "remove" else wanted
        if new == current:
            continue
        if not modseq:
            modseq = record_change(tr, acct, ["Email"], [mbox])
        _count(tr, acct, mbox, msg, -1)
        old_modseq = msg.modseq
        msg.flags = tuple(sorted(new))
        msg.modseq = modseq
        _count(tr, acct, mbox, msg, +1)
        _put_message(tr, acct, mbox, msg, old_modseq)
        changed.append(msg)
    return changed, failed


def _remove_messages(tr: Transaction, acct: int, mbox: int, messages: Sequence[Message], modseq: int | None) -> None:
    for msg in messages:
        tr.clear(keys.message(acct, mbox, msg.uid))
        tr.clear(keys.modseq_index(acct, mbox, msg.modseq, msg.uid))
        tr.clear(keys.location(acct, msg.email_id, mbox, msg.uid))
        if modseq is not None:
            tr.set(keys.expunged(acct, mbox, modseq, msg.uid), b"")
            _count(tr, acct, mbox, msg, -1)
        if not tr.get_range(*keys.locations(acct, msg.email_id), limit=1):
            _destroy_email(tr, acct, msg.email_id)


def _destroy_email(tr: Transaction, acct: int, email_id: int) -> None:
    raw = tr.get(keys.email(acct, email_id))
    if raw is None:
        return
    digest, size = keys.unpack(raw)[:2]
    tr.clear(keys.email(acct, email_id))
    tr.clear_range(*keys.email_structs(acct, email_id))
    tr.add(keys.quota_used(acct), -size)
    tr.add(keys.message_count(acct), -1)
    blobs.unlink(tr, digest, acct, email_id)


def _to_mailbox(
    tr: Transaction, *, op: Callable[..., tuple[int, list[tuple[int, int]]]], acct: int, src: int,
    uids: Sequence[int], dst: str,
) -> tuple[int, list[tuple[int, int]]]:
    return op(tr, acct, src, uids, find_mailbox(tr, acct, dst).id)


def _first_uids(tr: ReadTransaction, acct: int, mbox: int, last: int | None) -> list[int]:
    """The first CHUNK UIDs of a mailbox (up to ``last``), reading only those:
    a big mailbox is worked through in many transactions, each of which
    must stay well inside FoundationDB's 5 s."""
    return [keys.unpack(k)[-1] for k, _ in tr.get_range(*keys.messages(acct, mbox, 1, last), limit=CHUNK)]


def _move_chunk(tr: Transaction, *, acct: int, src: int, uids: Sequence[int], dst: int) -> None:
    move_messages(tr, acct, src, uids, dst)


def _chunks(items: Sequence[int]) -> list[Sequence[int]]:
    return [items[i : i + CHUNK] for i in range(0, len(items), CHUNK)]


def _drop_messages(tr: Transaction, *, acct: int, mbox: int, uids: Sequence[int]) -> None:
    """Remove messages from a mailbox that is being deleted (no EXPUNGE record:
    the whole mailbox goes)."""
    msgs = [m for m in (get_message(tr, acct, mbox, u) for u in uids) if m is not None]
    for m in msgs:
        _count(tr, acct, mbox, m, -1)
    _remove_messages(tr, acct, mbox, msgs, modseq=None)
    if msgs:
        record_change(tr, acct, ["Email", "Thread"], [mbox])


def expunge(tr: Transaction, acct: int, mbox: int, uids: Sequence[int] | None = None) -> list[int]:
    """Remove messages flagged \\Deleted (only those in ``uids`` if given:
    UID EXPUNGE, RFC 4315 §2.1). Returns the expunged UIDs."""
    if uids is None:
        candidates = get_messages(tr, acct, mbox)
    else:
        candidates = [m for m in (get_message(tr, acct, mbox, u) for u in uids) if m is not None]
    doomed = [m for m in candidates if DELETED in m.flags]
    if not doomed:
        return []
    modseq = record_change(tr, acct, ["Email", "Thread"], [mbox])
    _remove_messages(tr, acct, mbox, doomed, modseq)
    return [m.uid for m in doomed]


def copy_messages(tr: Transaction, acct: int, src: int, uids: Sequence[int], dst: int) -> tuple[int, list[tuple[int, int]]]:
    """COPY (RFC 9051 §6.4.7): returns the target UIDVALIDITY and (source UID,
    new UID) pairs, for COPYUID (RFC 4315)."""
    target = get_mailbox(tr, acct, dst)
    if target is None:
        raise MailboxNotFound("target mailbox does not exist")
    pairs: list[tuple[int, int]] = []
    modseq = 0
    for uid in uids:
        msg = get_message(tr, acct, src, uid)
        if msg is None:
            continue
        if not modseq:
            modseq = record_change(tr, acct, ["Email"], [dst])
        new = _insert(tr, acct, target, msg.email_id, msg.flags, msg.internal_date, msg.size, modseq, msg.zone)
        pairs.append((uid, new.uid))
    return target.uidvalidity, pairs


def move_messages(tr: Transaction, acct: int, src: int, uids: Sequence[int], dst: int) -> tuple[int, list[tuple[int, int]]]:
    """MOVE (RFC 6851): copy then expunge the sources, atomically."""
    uidvalidity, pairs = copy_messages(tr, acct, src, uids, dst)
    if pairs:
        moved = [m for m in (get_message(tr, acct, src, s) for s, _ in pairs) if m is not None]
        modseq = record_change(tr, acct, ["Email"], [src])
        for msg in moved:
            tr.clear(keys.message(acct, src, msg.uid))
            tr.clear(keys.modseq_index(acct, src, msg.modseq, msg.uid))
            tr.clear(keys.location(acct, msg.email_id, src, msg.uid))
            tr.set(keys.expunged(acct, src, modseq, msg.uid), b"")
            _count(tr, acct, src, msg, -1)
    return uidvalidity, pairs


# -- emails ------------------------------------------------------------------------------

def _join_thread(tr: Transaction, acct: int, parsed: parsing.Parsed, email_id: int) -> int:
    """Join the thread of any message this one refers to, or of one that
    referred to it (a reply delivered before it), or start one; then point
    every id it names that has no thread yet at that thread."""
    refs = dict.fromkeys(parsed.references + ((parsed.message_id,) if parsed.message_id else ()))
    found = {key: tr.get(key) for key in (keys.thread_ref(acct, blobs.digest_of(ref.encode())[:16]) for ref in refs)}
    thread_id = next((int(raw) for raw in found.values() if raw is not None), email_id)
    for key, raw in found.items():
        if raw is None:
            tr.set(key, str(thread_id).encode())
    return thread_id


def _store_email(
    tr: Transaction,
    acct: int,
    digest: bytes,
    size: int,
    received: int,
    parsed: parsing.Parsed,
) -> Email:
    """Store an email's record and structure; returns it as :func:`get_email` reads it."""
    email_id = _next_seq(tr, acct, "email")
    thread_id = _join_thread(tr, acct, parsed, email_id)
    structure = parsed.structure
    if len(structure) >= SHARED_STRUCTURE_MIN:
        # Kept once beside the blob, not once per recipient: a message of
        # thousands of parts to a hundred local recipients must still fit the
        # 10 MB a transaction may write. Chunk count 0 marks it.
        blobs.put_structure(tr, digest, structure)
        chunks = []
    else:
        chunks = [structure[i : i + MAX_VALUE_SIZE] for i in range(0, len(structure), MAX_VALUE_SIZE)] or [b""]
    tr.set(keys.email(acct, email_id), keys.pack((digest, size, received, thread_id, len(chunks))))
    for index, chunk in enumerate(chunks):
        tr.set(keys.email_struct(acct, email_id, index), chunk)
    blobs.link(tr, digest, acct, email_id)
    tr.add(keys.quota_used(acct), size)
    tr.add(keys.message_count(acct), 1)
    return Email(email_id, digest, size, received, thread_id, structure)


def get_email(tr: ReadTransaction, acct: int, email_id: int, with_structure: bool = True) -> Email | None:
    raw = tr.get(keys.email(acct, email_id))
    if raw is None:
        return None
    digest, size, received, thread_id, chunks = keys.unpack(raw)
    email = Email(email_id, digest, size, received, thread_id)
    if with_structure:
        if chunks:
            email.encoded = b"".join(v for _, v in tr.get_range(*keys.email_structs(acct, email_id)))
        else:
            email.encoded = blobs.get_structure(tr, digest)
    return email


def get_emails(tr: ReadTransaction, acct: int, email_ids: list[int]) -> list[Email]:
    """Several emails with their structures. Ids close together (a FETCH of a
    UID range, mostly) are read in one range read rather than two reads each."""
    if not email_ids:
        return []
    first, last = min(email_ids), max(email_ids)
    if last - first + 1 > 2 * len(email_ids) + 16:
        return [e for e in (get_email(tr, acct, i) for i in email_ids) if e is not None]
    wanted = {keys.email(acct, i): i for i in email_ids}
    found: dict[int, Email] = {}
    chunks: dict[int, list[bytes]] = {}
    record = b""
    current: int | None = None
    for key, value in tr.get_range(*keys.emails_span(acct, first, last)):
        if record and key.startswith(record) and key != record:
            if current is not None:
                chunks[current].append(value)  # a structure chunk of the current email
            continue
        record, current = key, wanted.get(key)
        if current is not None:
            digest, size, received, thread_id, count = keys.unpack(value)
            found[current] = Email(current, digest, size, received, thread_id)
            chunks[current] = [] if count else [blobs.get_structure(tr, digest)]
    for email_id, email in found.items():
        email.encoded = b"".join(chunks[email_id])
    return [found[i] for i in email_ids if i in found]


def check_quota(tr: ReadTransaction, acct: int, size: int, temporary: bool) -> int:
    """Raise if ``size`` more bytes do not fit; return the account's quota (0: none)."""
    account = get_account(tr, acct)
    if account is None:
        raise UnknownUser("account no longer exists")
    if account.quota and _counter(tr, keys.quota_used(acct)) + size > account.quota:
        raise (TemporaryQuotaExceeded if temporary else QuotaExceeded)(f"{account.email} is over quota")
    return account.quota


def quota_usage(tr: ReadTransaction, acct: int) -> tuple[int, int]:
    """(bytes used, message count)."""
    return _counter(tr, keys.quota_used(acct)), _counter(tr, keys.message_count(acct))


@dataclass(slots=True)
class _Prepared:
    raw: bytes
    parsed: parsing.Parsed
    inline: bool

    @property
    def digest(self) -> bytes:
        return self.parsed.digest


class MailStore:
    """Mail operations over a store, with after-commit change hooks."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self._hooks: list[ChangeHook] = []
        self._emails: OrderedDict[tuple[int, int], Email] = OrderedDict()
        self._snapshots: OrderedDict[tuple[int, int], Snapshot] = OrderedDict()
        self._inflight: dict[tuple[int, int, int], asyncio.Future[MailboxChanges]] = {}
        #: Worker processes that parse what is stored (the node sets one up);
        #: without them, or when they fail, messages are parsed here.
        self.parser: parsing.ParserPool | None = None

    def on_change(self, hook: ChangeHook) -> None:
        """Call ``hook(account, change_id, kinds)`` after every committed change."""
        self._hooks.append(hook)

    def changed(self, acct: int, change_id: int, kinds: Iterable[str] = ("Email",)) -> None:
        if not change_id:
            return
        frozen = frozenset(kinds)
        for hook in self._hooks:
            hook(acct, change_id, frozen)

    async def _parse(self, raw: bytes) -> parsing.Parsed:
        if self.parser is not None:
            try:
                return await self.parser.parse(raw)
            except parsing.WorkerFailed as exc:
                log.warning("parsing a message in the node: %s", exc)
        if len(raw) > PARSE_INLINE_MAX:
            return await asyncio.get_running_loop().run_in_executor(None, parsing.parse_here, raw)
        # On the loop's thread, hashed without letting go of the GIL (blobs).
        return parsing.parse_here(raw, blobs.digest_holding_gil)

    async def _prepare(self, raw: bytes) -> _Prepared:
        parsed = await self._parse(raw)
        inline = len(raw) <= blobs.INLINE_MAX
        if not inline:
            await blobs.put_large(self.db, parsed.digest, raw)
        return _Prepared(raw, parsed, inline)

    def _put_blob(self, tr: Transaction, prep: _Prepared) -> None:
        if prep.inline:
            blobs.put_inline(tr, prep.digest, prep.raw)
        elif not blobs.exists(tr, prep.digest):
            raise BlobMissing("blob purged before it was linked")

    async def _transact_with_blob(self, prep: _Prepared, fn: Callable[[Transaction], object]) -> object:
        for _ in range(3):
            try:
                return await self.db.transact(fn)
            except BlobMissing:
                await blobs.put_large(self.db, prep.digest, prep.raw)
        return await self.db.transact(fn)

    async def deliver(
        self,
        accounts: Sequence[int] | Callable[[Transaction], Sequence[int]],
        raw: bytes,
        internal_date: int | None = None,
    ) -> list[Delivery]:
        """Store ``raw`` in the INBOX of every account, all or none, once.

        ``accounts`` is a list, or a function that gives it inside the
        delivering transaction (to check hints against the store). The bytes
        are stored exactly as given. Raises :class:`QuotaExceeded` (temporary
        form) if any account is over quota.
        """
        prep = await self._prepare(raw)
        when = int(time.time()) if internal_date is None else internal_date

        def fn(tr: Transaction) -> list[tuple[Delivery, Email]]:
            self._put_blob(tr, prep)
            out = []
            for acct in dict.fromkeys(accounts(tr) if callable(accounts) else accounts):
                check_quota(tr, acct, len(raw), temporary=True)
                box = find_mailbox(tr, acct, "INBOX")
                email = _store_email(tr, acct, prep.digest, len(raw), when, prep.parsed)
                change_id = record_change(tr, acct, ["Email", "Thread", "Mailbox"], [box.id])
                msg = _insert(tr, acct, box, email.id, (), when, len(raw), change_id)
                out.append((Delivery(acct, box.id, msg.uid, email.id, change_id, email.thread_id), email))
            return out

        stored: list[tuple[Delivery, Email]] = await self._transact_with_blob(prep, fn)  # type: ignore[assignment]
        for d, email in stored:
            self._remember(d.account, email)
            self.changed(d.account, d.change_id, ("Email", "Thread", "Mailbox"))
        return [d for d, _ in stored]

    async def append(
        self,
        acct: int,
        mailbox: str | int,
        raw: bytes,
        flags: Iterable[str] = (),
        internal_date: int | datetime | None = None,
    ) -> tuple[int, int]:
        """APPEND one message; returns (UIDVALIDITY, UID) for APPENDUID.
        ``internal_date``: seconds (UTC), or a datetime whose zone is kept."""
        uidvalidity, uids = await self.append_many(acct, mailbox, [(raw, tuple(flags), internal_date)])
        return uidvalidity, uids[0]

    async def append_many(
        self,
        acct: int,
        mailbox: str | int,
        items: Sequence[tuple[bytes, Iterable[str], int | datetime | None]],
    ) -> tuple[int, list[int]]:
        """MULTIAPPEND (RFC 3502): all messages or none, UIDs in order."""
        preps = [await self._prepare(raw) for raw, _, _ in items]
        checked = [validate_flags(f) for _, f, _ in items]
        now = int(time.time())

        def fn(tr: Transaction) -> tuple[int, int, list[int], list[Email]]:
            box = get_mailbox(tr, acct, mailbox) if isinstance(mailbox, int) else find_mailbox(tr, acct, mailbox)
            if box is None:
                raise MailboxNotFound("mailbox does not exist")
            check_quota(tr, acct, sum(len(p.raw) for p in preps), temporary=False)
            change_id = record_change(tr, acct, ["Email", "Thread", "Mailbox"], [box.id])
            uids, emails = [], []
            for prep, flags, (_, _, date) in zip(preps, checked, items):
                self._put_blob(tr, prep)
                when, zone = _when(now, date)
                email = _store_email(tr, acct, prep.digest, len(prep.raw), when, prep.parsed)
                uids.append(_insert(tr, acct, box, email.id, flags, when, len(prep.raw), change_id, zone).uid)
                emails.append(email)
            return box.uidvalidity, change_id, uids, emails

        result = None
        for _ in range(3):
            try:
                result = await self.db.transact(fn)
                break
            except BlobMissing:
                for prep in preps:
                    if not prep.inline:
                        await blobs.put_large(self.db, prep.digest, prep.raw)
        if result is None:
            result = await self.db.transact(fn)
        uidvalidity, change_id, uids, emails = result
        # Kept like a delivery's: a client that appends (a sent copy, a
        # draft) often fetches it next.
        for email in emails:
            self._remember(acct, email)
        self.changed(acct, change_id, ("Email", "Thread", "Mailbox"))
        return uidvalidity, uids

    async def write(self, acct: int, fn: Callable[[Transaction], object], kinds: Iterable[str] = ("Email",)) -> object:
        """Run a mail transaction body for ``acct`` and announce its change."""

        def body(tr: Transaction) -> tuple[object, int, int]:
            before = last_change(tr, acct)
            result = fn(tr)
            return result, before, last_change(tr, acct)

        result, before, after = await self.db.transact(body)
        if after != before:
            self.changed(acct, after, kinds)
        return result

    # -- the domain API protocols call (no transaction crosses into them) --

    async def mailboxes(self, acct: int) -> list[Mailbox]:
        return await self.db.read(lambda tr: list_mailboxes(tr, acct))

    async def mailbox(self, acct: int, name: str, selectable: bool = True) -> Mailbox:
        """Raises :class:`MailboxNotFound` (:class:`NotSelectable` for a
        \\Noselect name unless ``selectable`` is False)."""
        return await self.db.read(lambda tr: find_mailbox(tr, acct, name, selectable))

    async def status(self, acct: int, name: str) -> MailboxStatus:
        return await self.db.read(lambda tr: mailbox_status(tr, acct, find_mailbox(tr, acct, name)))

    async def statuses(self, acct: int, boxes: Sequence[Mailbox]) -> list[MailboxStatus]:
        return await self.db.read(lambda tr: [mailbox_status(tr, acct, b) for b in boxes])

    async def snapshot(self, acct: int, name: str) -> Snapshot:
        """SELECT's view of a mailbox.

        A node-wide cache keeps the last snapshot of each busy mailbox; each
        use reads only the changes since its MODSEQ from the store and folds
        them in, so the result is always what the store holds (principle 1)
        without reading every message record again.
        """

        def fn(tr: ReadTransaction) -> tuple[Snapshot, MailboxChanges | None]:
            box = find_mailbox(tr, acct, name)
            cached = self._snapshots.get((acct, box.id))
            if cached is not None and cached.mailbox.uidvalidity == box.uidvalidity:
                # The messages come from the cache; the mailbox record (UIDNEXT)
                # is always the one just read.
                fresh = cached.but(mailbox=box)
                return fresh, mailbox_changes(tr, acct, box.id, cached.highestmodseq, box)
            return snapshot(tr, acct, box.id), None

        snap, delta = await self.db.read(fn)
        if delta is not None:
            if delta.changed or delta.expunged:
                snap = snap.apply(delta)
            elif snap.highestmodseq < delta.highestmodseq:
                snap = snap.but(highestmodseq=delta.highestmodseq)
        key = (acct, snap.mailbox.id)
        self._snapshots[key] = snap
        self._snapshots.move_to_end(key)
        if len(self._snapshots) > SNAPSHOT_CACHE:
            self._snapshots.popitem(last=False)
        return snap

    async def last_changes(self, accounts: Sequence[int]) -> dict[int, int]:
        """The latest change id of each account, in one read (push watch)."""
        return await self.db.read(lambda tr: {a: last_change(tr, a) for a in accounts})

    async def changes(self, acct: int, mbox: int, since: int) -> MailboxChanges:
        """Changes in a mailbox after ``since``.

        Identical requests in flight share one read: a delivery wakes every
        IDLE session of a mailbox at once, and they all ask the same thing.
        """
        key = (acct, mbox, since)
        pending = self._inflight.get(key)
        if pending is not None:
            return await asyncio.shield(pending)
        future: asyncio.Future[MailboxChanges] = asyncio.ensure_future(
            self.db.read(lambda tr: mailbox_changes(tr, acct, mbox, since))
        )
        self._inflight[key] = future
        future.add_done_callback(lambda _: self._inflight.pop(key, None))
        return await asyncio.shield(future)

    async def create_mailbox(self, acct: int, name: str, special_use: str | None = None) -> Mailbox:
        return await self.write(acct, lambda tr: create_mailbox(tr, acct, name, special_use), ("Mailbox",))  # type: ignore[return-value]

    async def delete_mailbox(self, acct: int, name: str) -> None:
        """DELETE: the messages go first, CHUNK at a time (a big mailbox would
        not fit FoundationDB's 10 MB / 5 s), then the mailbox itself."""
        box = await self.mailbox(acct, name, selectable=False)
        if box.name == "INBOX":
            raise Forbidden("INBOX cannot be deleted")
        if not box.noselect:
            await self.empty_mailbox(acct, box.id)
        await self.write(acct, lambda tr: delete_mailbox(tr, acct, name), ("Mailbox", "Email"))

    async def empty_mailbox(self, acct: int, mbox: int) -> None:
        """Remove every message of a mailbox, CHUNK per transaction."""
        while True:
            uids = await self.db.read(lambda tr: _first_uids(tr, acct, mbox, None))
            if not uids:
                return
            await self.write(acct, functools.partial(_drop_messages, acct=acct, mbox=mbox, uids=uids))

    async def rename_mailbox(self, acct: int, old: str, new: str) -> None:
        """RENAME (RFC 9051 §6.3.6). Renaming INBOX moves every message it
        holds when the command starts to the new mailbox, CHUNK per
        transaction (FoundationDB's 10 MB / 5 s), and leaves INBOX empty of
        them; mail delivered meanwhile stays in INBOX."""
        if validate_mailbox_name(old) != "INBOX":
            await self.write(acct, lambda tr: rename_mailbox(tr, acct, old, new), ("Mailbox", "Email"))
            return
        inbox = await self.mailbox(acct, "INBOX")
        target = cast(Mailbox, await self.write(acct, lambda tr: rename_mailbox(tr, acct, old, new), ("Mailbox", "Email")))
        last = inbox.uidnext - 1  # what INBOX held when the command started
        while last >= 1 and (uids := await self.db.read(lambda tr: _first_uids(tr, acct, inbox.id, last))):
            await self.write(acct, functools.partial(_move_chunk, acct=acct, src=inbox.id, uids=uids, dst=target.id))

    async def subscribe(self, acct: int, name: str, subscribed: bool) -> None:
        """SUBSCRIBE / UNSUBSCRIBE ``name``, whether a mailbox has it or not.
        Raises :class:`InvalidInput` for a name no mailbox could have."""
        await self.write(acct, lambda tr: set_subscribed(tr, acct, name, subscribed), ("Mailbox",))

    async def mailboxes_and_subscriptions(self, acct: int) -> tuple[list[Mailbox], set[str]]:
        """The account's mailboxes and subscribed names, in one read (LIST,
        LSUB); subscribed names need not exist (RFC 9051 §6.3.7)."""
        return await self.db.read(lambda tr: (list_mailboxes(tr, acct), subscriptions(tr, acct)))

    async def store_flags(
        self, acct: int, mbox: int, uids: Sequence[int], mode: str, flags: Iterable[str], unchangedsince: int | None = None
    ) -> tuple[list[Message], list[int]]:
        """STORE, CHUNK messages per transaction (each chunk is atomic)."""
        wanted = tuple(flags)
        changed: list[Message] = []
        failed: list[int] = []
        for part in _chunks(uids):
            result = await self.write(acct, functools.partial(
                store_flags, acct=acct, mbox=mbox, uids=part, mode=mode, flags=wanted, unchangedsince=unchangedsince
            ))
            c, f = cast(tuple[list[Message], list[int]], result)
            changed += c
            failed += f
        return changed, failed

    async def expunge(self, acct: int, mbox: int, uids: Sequence[int] | None = None) -> list[int]:
        """EXPUNGE (of ``uids`` only, for UID EXPUNGE), CHUNK per transaction."""
        if uids is None:
            uids = await self.db.read(lambda tr: [m.uid for m in get_messages(tr, acct, mbox) if DELETED in m.flags])
        gone: list[int] = []
        for part in _chunks(uids):
            gone += await self.write(acct, functools.partial(expunge, acct=acct, mbox=mbox, uids=part))  # type: ignore[arg-type]
        return gone

    async def copy(self, acct: int, src: int, uids: Sequence[int], dst: str) -> tuple[int, list[tuple[int, int]]]:
        return await self._copy_or_move(copy_messages, acct, src, uids, dst)

    async def move(self, acct: int, src: int, uids: Sequence[int], dst: str) -> tuple[int, list[tuple[int, int]]]:
        return await self._copy_or_move(move_messages, acct, src, uids, dst)

    async def _copy_or_move(
        self, op: Callable[..., tuple[int, list[tuple[int, int]]]], acct: int, src: int, uids: Sequence[int], dst: str
    ) -> tuple[int, list[tuple[int, int]]]:
        """COPY/MOVE, CHUNK per transaction; UIDs stay in order across chunks."""
        target = await self.mailbox(acct, dst)
        uidvalidity, pairs = target.uidvalidity, []
        for part in _chunks(uids):
            result = await self.write(acct, functools.partial(_to_mailbox, op=op, acct=acct, src=src, uids=part, dst=dst))
            uidvalidity, got = cast(tuple[int, list[tuple[int, int]]], result)
            pairs += got
        return uidvalidity, pairs

    def _remember(self, acct: int, email: Email) -> None:
        key = (acct, email.id)
        self._emails[key] = email
        self._emails.move_to_end(key)
        while len(self._emails) > STRUCTURE_CACHE:
            self._emails.popitem(last=False)

    async def emails(self, acct: int, email_ids: Iterable[int]) -> dict[int, Email]:
        """Several emails with structures; one read for those not cached.

        Emails never change once stored and their ids are never reused, so a
        cached one is always right (principle 1 holds without a check).
        """
        out: dict[int, Email] = {}
        missing = []
        for i in dict.fromkeys(email_ids):
            email = self._emails.get((acct, i))
            if email is None:
                missing.append(i)
            else:
                out[i] = email
        # In pieces, each its own read: a FETCH of a whole large mailbox must
        # stay within a transaction's 5 s (and FoundationDB's read sizes).
        for start in range(0, len(missing), EMAILS_PER_READ):
            piece = missing[start : start + EMAILS_PER_READ]

            def fn(tr: ReadTransaction, piece: list[int] = piece) -> list[Email]:
                return get_emails(tr, acct, piece)

            for email in await self.db.read(fn):
                self._remember(acct, email)
                out[email.id] = email
        return out

    async def email(self, acct: int, email_id: int) -> Email | None:
        """An email with its parsed structure (cached: emails never change)."""
        return (await self.emails(acct, [email_id])).get(email_id)

    async def read_blob(self, digest: bytes, start: int = 0, length: int | None = None) -> bytes:
        return await blobs.read(self.db, digest, start, length)

    def stream_blob(self, digest: bytes, start: int, length: int, step: int) -> AsyncIterator[bytes]:
        """Bytes ``start..start+length`` of a blob (fewer if it is shorter),
        in pieces of at most ``step`` bytes, one read each: for sending a
        large body without holding it whole (IMAP FETCH)."""
        return blobs.stream(self.db, digest, start, start + length, step)

    async def list_messages(self, acct: int, mailbox: str) -> list[tuple[Message, Email | None]]:
        """Every message of a mailbox with its email, in UID order (read in
        pages: see :meth:`message_pages`)."""
        return [row async for page in self.message_pages(acct, mailbox) for row in page]

    async def message_pages(
        self, acct: int, mailbox: str, *, page: int = LIST_PAGE
    ) -> AsyncIterator[list[tuple[Message, Email | None]]]:
        """The messages of a mailbox with their emails, in UID order, ``page``
        per read transaction: a big mailbox read at once would pass
        FoundationDB's 5 s. Each read resumes after the last UID of the one
        before, so a page is consistent in itself, not with the others (mail
        delivered meanwhile shows at the end; an expunged message may show).

        Raises :class:`NotFound` when the mailbox does not exist.
        """
        if page < 1:
            raise ValueError("page must be at least 1")

        def first(tr: ReadTransaction) -> tuple[int, list[tuple[Message, Email | None]]]:
            box = find_mailbox(tr, acct, mailbox)
            return box.id, _message_page(tr, acct, box.id, 0, page)

        mbox, rows = await self.db.read(first)
        while rows:
            yield rows
            if len(rows) < page:
                return
            after = rows[-1][0].uid
            rows = await self.db.read(lambda tr: _message_page(tr, acct, mbox, after, page))

    async def purge(self, now: float | None = None) -> int:
        """Delete unreferenced blobs past the grace period; returns markers handled."""
        moment = time.time() if now is None else now
        total = 0
        while True:
            n = await self.db.transact(lambda tr: blobs.purge_orphans(tr, moment))
            total += n
            if n == 0:
                return total


def remove_account_data(tr: Transaction, acct: int) -> None:
    """Drop every mailbox, message and email of an account (account removal).

    Blob references go too, and orphaned blobs are marked for the purger.
    :meth:`Storage.remove_account` first empties every mailbox, CHUNK
    messages per transaction, so the emails read here are only those left in
    no mailbox; the rest are range clears (one mutation each on FoundationDB,
    whatever they cover).
    """
    for key, raw in tr.get_range(*keys.prefix_range(("m", acct, "email"))):
        k = keys.unpack(key)
        if len(k) == 4:
            blobs.unlink(tr, keys.unpack(raw)[0], acct, k[3])
    tr.clear_range(*keys.account_data(acct))
    tr.clear_range(*keys.change_log(acct))
    tr.clear(keys.change_counter(acct))

