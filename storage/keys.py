"""All key layout, in one place (STYLE.md: FoundationDB style).

Every key is a tuple packed with ``fdb.tuple``, so both backends order keys
identically. The first element names the subspace; keep the names short, they
are repeated in every key. Nothing outside ``storage/`` imports this module.

Subspaces (``acct`` is an account id, an int; ``mbox`` a mailbox id, an int):

====================  ====================================================
``("d", "dom", domain)``            domain record (JSON)
``("d", "acct", acct)``             account record (JSON, password hash)
``("d", "addr", address)``          address or alias -> account id
``("d", "catchall", domain)``       account id receiving unknown locals
``("d", "seq")``                    account id allocator (counter)
``("d", "ver")``                    directory version (counter; cache check)
``("b", sha256, i)``                blob chunk ``i`` (≤ 100 kB)
``("bm", sha256)``                  blob metadata: size, chunk count
``("br", sha256, acct, email)``     blob reference (who links the blob)
``("bs", sha256, i)``               a large parsed structure of the blob, chunk ``i``
``("bo", time, sha256)``            blob possibly orphaned since ``time``
``("m", acct, "box", mbox)``        mailbox record (JSON)
``("m", acct, "boxname", name)``    mailbox name -> id
``("m", acct, "seq", name)``        per-account id allocators (counters)
``("m", acct, "sub", name)``        subscribed mailbox name (RFC 9051 §6.3.7:
                                    by name, outliving the mailbox)
``("m", acct, "subv")``             subscriptions moved out of the mailbox
                                    records (marker; absent: read those too)
``("m", acct, "msg", mbox, uid)``   message-in-mailbox record (packed)
``("m", acct, "mod", mbox, modseq, uid)``  index: last change of a message
``("m", acct, "gone", mbox, modseq, uid)`` expunged UIDs (QRESYNC VANISHED)
``("m", acct, "email", email)``     email record: blob, size, dates, thread
``("m", acct, "email", email, i)``  parsed structure, chunk ``i`` (none
                                    when it is shared, see ``"bs"``)
``("m", acct, "in", email, mbox, uid)``  where an email is (mailboxes, UIDs)
``("m", acct, "cnt", mbox, name)``  mailbox counters: n, unseen, deleted, size
``("m", acct, "ref", msgid_hash)``  thread lookup: Message-ID -> thread id
``("m", acct, "quota")``            bytes used (counter)
``("m", acct, "count")``            messages stored (counter)
``("c", acct)``                     change counter (last change id)
``("c", acct, "log", change_id)``   change log entry: kinds changed
``("q", ...)``                      outbound queue (storage.queue)
``("n", ...)``                      node leases and cluster state
``("x", hour, token)``              commit marker of one write transaction
                                    (FoundationDB: commit_unknown_result)
====================  ====================================================
"""

from __future__ import annotations

import functools
import struct

import fdb.tuple as fdbtuple

from .kv.base import VERSIONSTAMP_SIZE, range_of

unpack = fdbtuple.unpack

_INT_ZERO = 0x14
_NUL_ESCAPED = b"\x00\xff"


def _encode(value: object) -> bytes | None:
    if type(value) is str:
        return b"\x02" + value.encode("utf-8").replace(b"\x00", _NUL_ESCAPED) + b"\x00"
    if type(value) is int:
        if value == 0:
            return b"\x14"
        if 0 < value < 1 << 64:
            n = (value.bit_length() + 7) // 8
            return bytes([_INT_ZERO + n]) + value.to_bytes(n, "big")
        return None
    if type(value) is bytes:
        return b"\x01" + value.replace(b"\x00", _NUL_ESCAPED) + b"\x00"
    return None


#: Encodings of the short strings keys are made of ("m", "msg", "INBOX"...):
#: a dict lookup instead of encode, replace and two concatenations. Bounded:
#: user-given strings (addresses, mailbox names) could otherwise fill it.
_STR_CACHE: dict[str, bytes] = {}
_STR_CACHE_MAX = 4096


def pack(items: tuple[object, ...]) -> bytes:
    """``fdb.tuple.pack``, byte for byte, faster for the str, bytes and
    non-negative int elements every key here is made of (the binding's pure
    Python packer costs several µs per key; a delivery packs dozens)."""
    out = []
    for item in items:
        encoded: bytes | None
        if isinstance(item, str):
            encoded = _STR_CACHE.get(item)
            if encoded is None:
                encoded = _encode(item)
                assert encoded is not None
                if len(_STR_CACHE) < _STR_CACHE_MAX and len(item) <= 32:
                    _STR_CACHE[item] = encoded
        elif type(item) is int and 0 < item < 256:
            encoded = _SMALL_INTS[item]
        else:
            encoded = _encode(item)
            if encoded is None:
                return bytes(fdbtuple.pack(items))
        out.append(encoded)
    return b"".join(out)


_SMALL_INTS = [_encode(n) or b"" for n in range(256)]

#: Type code of a 96-bit versionstamp in the tuple encoding.
_VERSIONSTAMP_CODE = 0x33


def versionstamp_key(prefix: tuple[object, ...], user_version: int = 0) -> bytes:
    """A key for ``Transaction.set_versionstamped_key``: ``prefix`` + one
    incomplete versionstamp, in the bytes ``fdb.tuple.pack_with_versionstamp``
    gives (which itself needs the FoundationDB client library to run)."""
    head = pack(prefix) + bytes([_VERSIONSTAMP_CODE])
    return head + b"\xff" * VERSIONSTAMP_SIZE + struct.pack(">H", user_version) + struct.pack("<I", len(head))


def prefix_range(prefix: tuple[object, ...]) -> tuple[bytes, bytes]:
    return range_of(pack(prefix))


#: Keys every delivery and flag change packs again (an account's counters,
#: its mailbox records) are kept packed: a cache hit costs a tenth of a pack.
_hot = functools.lru_cache(maxsize=32768)


# -- directory -------------------------------------------------------------

def domain(name: str) -> bytes:
    return pack(("d", "dom", name))


DOMAINS = prefix_range(("d", "dom"))


@_hot
def account(acct: int) -> bytes:
    return pack(("d", "acct", acct))


ACCOUNTS = prefix_range(("d", "acct"))


def address(addr: str) -> bytes:
    return pack(("d", "addr", addr))


ADDRESSES = prefix_range(("d", "addr"))


def catchall(domain_name: str) -> bytes:
    return pack(("d", "catchall", domain_name))


ACCOUNT_SEQ = pack(("d", "seq"))
DIRECTORY_VERSION = pack(("d", "ver"))


# -- blobs -----------------------------------------------------------------

def blob_chunk(digest: bytes, index: int) -> bytes:
    return pack(("b", digest, index))


def blob_chunks(digest: bytes) -> tuple[bytes, bytes]:
    return prefix_range(("b", digest))


def blob_meta(digest: bytes) -> bytes:
    return pack(("bm", digest))


def blob_ref(digest: bytes, acct: int, email: int) -> bytes:
    return pack(("br", digest, acct, email))


def blob_refs(digest: bytes) -> tuple[bytes, bytes]:
    return prefix_range(("br", digest))


def blob_structure(digest: bytes, index: int) -> bytes:
    return pack(("bs", digest, index))


def blob_structures(digest: bytes) -> tuple[bytes, bytes]:
    return prefix_range(("bs", digest))


def blob_orphan(when: int, digest: bytes) -> bytes:
    return pack(("bo", when, digest))


BLOB_ORPHANS = prefix_range(("bo",))


def blob_orphans_before(when: int) -> tuple[bytes, bytes]:
    return pack(("bo",)) + b"\x00", pack(("bo", when))


# -- mail ------------------------------------------------------------------

@_hot
def mailbox(acct: int, mbox: int) -> bytes:
    return pack(("m", acct, "box", mbox))


def mailboxes(acct: int) -> tuple[bytes, bytes]:
    return prefix_range(("m", acct, "box"))


@_hot
def mailbox_name(acct: int, name: str) -> bytes:
    return pack(("m", acct, "boxname", name))


def mailbox_names(acct: int) -> tuple[bytes, bytes]:
    return prefix_range(("m", acct, "boxname"))


def subscription(acct: int, name: str) -> bytes:
    return pack(("m", acct, "sub", name))


def subscriptions(acct: int) -> tuple[bytes, bytes]:
    return prefix_range(("m", acct, "sub"))


def subscriptions_migrated(acct: int) -> bytes:
    return pack(("m", acct, "subv"))


@_hot
def account_seq(acct: int, name: str) -> bytes:
    return pack(("m", acct, "seq", name))


def message(acct: int, mbox: int, uid: int) -> bytes:
    return pack(("m", acct, "msg", mbox, uid))


def messages(acct: int, mbox: int, first_uid: int = 1, last_uid: int | None = None) -> tuple[bytes, bytes]:
    """Messages of a mailbox with ``first_uid <= uid <= last_uid``."""
    begin = pack(("m", acct, "msg", mbox, first_uid))
    if last_uid is None:
        return begin, pack(("m", acct, "msg", mbox)) + b"\xff"
    return begin, pack(("m", acct, "msg", mbox, last_uid + 1))


def modseq_index(acct: int, mbox: int, modseq: int, uid: int) -> bytes:
    return pack(("m", acct, "mod", mbox, modseq, uid))


def modseq_since(acct: int, mbox: int, modseq: int) -> tuple[bytes, bytes]:
    """Index entries of messages changed after ``modseq``."""
    return pack(("m", acct, "mod", mbox, modseq + 1)), pack(("m", acct, "mod", mbox)) + b"\xff"


def expunged(acct: int, mbox: int, modseq: int, uid: int) -> bytes:
    return pack(("m", acct, "gone", mbox, modseq, uid))


def expunged_since(acct: int, mbox: int, modseq: int) -> tuple[bytes, bytes]:
    return pack(("m", acct, "gone", mbox, modseq + 1)), pack(("m", acct, "gone", mbox)) + b"\xff"


def mailbox_all(acct: int, mbox: int) -> list[tuple[bytes, bytes]]:
    """Every range holding data of one mailbox (for DELETE)."""
    return [prefix_range(("m", acct, sub, mbox)) for sub in ("msg", "mod", "gone", "cnt")]


@_hot
def mailbox_counter(acct: int, mbox: int, name: str) -> bytes:
    return pack(("m", acct, "cnt", mbox, name))


def mailbox_counters(acct: int, mbox: int) -> tuple[bytes, bytes]:
    return prefix_range(("m", acct, "cnt", mbox))


def email_struct(acct: int, email_id: int, index: int) -> bytes:
    return pack(("m", acct, "email", email_id, index))


def email_structs(acct: int, email_id: int) -> tuple[bytes, bytes]:
    return prefix_range(("m", acct, "email", email_id))


def location(acct: int, email_id: int, mbox: int, uid: int) -> bytes:
    return pack(("m", acct, "in", email_id, mbox, uid))


def locations(acct: int, email_id: int) -> tuple[bytes, bytes]:
    return prefix_range(("m", acct, "in", email_id))


def email(acct: int, email_id: int) -> bytes:
    return pack(("m", acct, "email", email_id))


def emails_span(acct: int, first: int, last: int) -> tuple[bytes, bytes]:
    """Records and structure chunks of the emails ``first`` to ``last``."""
    return email(acct, first), email_structs(acct, last)[1]


def thread_ref(acct: int, ref_hash: bytes) -> bytes:
    return pack(("m", acct, "ref", ref_hash))


@_hot
def quota_used(acct: int) -> bytes:
    return pack(("m", acct, "quota"))


@_hot
def message_count(acct: int) -> bytes:
    return pack(("m", acct, "count"))


def account_data(acct: int) -> tuple[bytes, bytes]:
    return prefix_range(("m", acct))


# -- change log ------------------------------------------------------------

@_hot
def change_counter(acct: int) -> bytes:
    return pack(("c", acct))


def change(acct: int, change_id: int) -> bytes:
    return pack(("c", acct, "log", change_id))


def changes_since(acct: int, change_id: int) -> tuple[bytes, bytes]:
    return pack(("c", acct, "log", change_id + 1)), pack(("c", acct, "log")) + b"\xff"


def change_log(acct: int) -> tuple[bytes, bytes]:
    return prefix_range(("c", acct))


# -- login throttle (storage.directory) --------------------------------------
# ``("l", "fail", step, remote)``  failed logins from one client address in one
#                                  time step (counter); steps first, so old
#                                  ones go in one range clear

def login_failures(step: int, remote: str) -> bytes:
    return pack(("l", "fail", step, remote))


def login_failures_before(step: int) -> tuple[bytes, bytes]:
    """Every failure counter of a step older than ``step``."""
    return pack(("l", "fail")), pack(("l", "fail", step))


# -- nodes and cluster state (storage.nodes) --------------------------------
# ``("n", "node", node_id)``   node lease record (JSON): address, state, heartbeat
# ``("n", "lease", name)``     singleton / shard lease (JSON): owner, expires

def node(node_id: str) -> bytes:
    return pack(("n", "node", node_id))


NODES = prefix_range(("n", "node"))


def lease(name: str) -> bytes:
    return pack(("n", "lease", name))


LEASES = prefix_range(("n", "lease"))


# -- outbound queue (storage.queue) -----------------------------------------
# ``("q", "msg", qid)``            message record (JSON): sender, blob, times, attempts
# ``("q", "rcpt", qid, i)``        recipient ``i`` of a message (JSON): address, status, reply
# ``("q", "due", ms, qid)``        due-time index (ms since the epoch): next attempt, or lease expiry
# ``("q", "lease", qid)``          delivery lease (JSON): owner token, expiry
# ``("q", "pause", domain)``       paused destination domain (``"*"``: the whole queue)
# ``("q", "slot", rule, n)``       throttle connection slot ``n`` (JSON): owner, expiry
# ``("q", "hour", rule, window)``  throttle: messages sent in one hour window (counter)
# ``("q", "backoff", dest)``       adaptive backoff of a destination after 4xx (JSON)
# ``("q", "rate", acct, window)``  submission rate: recipients of an account's mail in one hour (counter)
# ``("q", "dkim", domain)``        DKIM signing key of a domain (JSON): selector, PEM
# ``("q", "size")``                messages in the queue (counter, atomic add: never conflicts)

QUEUE_SIZE = pack(("q", "size"))


def queue_message(qid: int) -> bytes:
    return pack(("q", "msg", qid))


QUEUE_MESSAGES = prefix_range(("q", "msg"))


def queue_recipient(qid: int, index: int) -> bytes:
    return pack(("q", "rcpt", qid, index))


def queue_recipients(qid: int) -> tuple[bytes, bytes]:
    return prefix_range(("q", "rcpt", qid))


def queue_due(when_ms: int, qid: int) -> bytes:
    return pack(("q", "due", when_ms, qid))


QUEUE_DUE = prefix_range(("q", "due"))


def queue_due_until(when_ms: int) -> tuple[bytes, bytes]:
    """Due-index entries with a time ``<= when_ms``."""
    return pack(("q", "due")) + b"\x00", pack(("q", "due", when_ms + 1))


def queue_lease(qid: int) -> bytes:
    return pack(("q", "lease", qid))


def queue_pause(domain_name: str) -> bytes:
    return pack(("q", "pause", domain_name))


QUEUE_PAUSES = prefix_range(("q", "pause"))


def queue_slot(rule: str, n: int) -> bytes:
    return pack(("q", "slot", rule, n))


def queue_slots(rule: str) -> tuple[bytes, bytes]:
    return prefix_range(("q", "slot", rule))


def queue_hour(rule: str, window: int) -> bytes:
    return pack(("q", "hour", rule, window))


def queue_hours_before(rule: str, window: int) -> tuple[bytes, bytes]:
    return pack(("q", "hour", rule)) + b"\x00", pack(("q", "hour", rule, window))


def queue_backoff(dest: str) -> bytes:
    return pack(("q", "backoff", dest))


QUEUE_BACKOFFS = prefix_range(("q", "backoff"))


def queue_rate(acct: int, window: int) -> bytes:
    return pack(("q", "rate", acct, window))


def queue_rates_before(acct: int, window: int) -> tuple[bytes, bytes]:
    return pack(("q", "rate", acct)) + b"\x00", pack(("q", "rate", acct, window))


def dkim_key(domain_name: str) -> bytes:
    return pack(("q", "dkim", domain_name))


# -- commit markers (storage.kv.foundationdb) --------------------------------
# Every write transaction on FoundationDB leaves a marker, so that a retry
# after ``commit_unknown_result`` can tell whether the first attempt landed.
# Markers are grouped by the hour they were written in and cleared in bulk.

def commit_marker(hour: int, token: bytes) -> bytes:
    return pack(("x", hour, token))


def commit_markers_before(hour: int) -> tuple[bytes, bytes]:
    return pack(("x",)), pack(("x", hour))
