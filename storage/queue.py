"""The outbound queue, cluster-wide throttles and submission rate limits, in the store.

Layout (``storage.keys``, subspace ``"q"``): one record per message with the
envelope sender, the blob of the body, times and attempts; one record per
recipient with its status (``pending``, ``deferred``, ``delivered``,
``failed``), last reply and attempts; a due-time index; a lease per message;
a count of the messages, kept by atomic adds where they are written and
removed (so it never conflicts), for ``/metrics``.

The due index holds every live message exactly once, at the time it next
needs attention: its next attempt when nobody holds it, the expiry of its
lease when a node does. A claim therefore takes messages whose time has come
(unleased and due, or leased by a node that stopped renewing) and moves them
to their new lease expiry; a node that dies leaves its messages due again
when their leases run out (DESIGN.md "Outbound queue"). Everything a claim
returns is read in the claiming transaction, after the lease is taken.

Throttles are cooperative and need nothing but the store: a rule's
concurrent connections are slots ``("q", "slot", rule, n)`` for ``n <
max``, each a small lease (owner, expiry) renewed while the connection
lives; its hourly volume is a counter per hour window. A dead node's slots
free themselves when their leases expire.

Functions taking ``tr`` first are transaction bodies: idempotent, no side
effects, ``now`` passed in. :class:`Queue` is the async API over a database.
"""

from __future__ import annotations

import fnmatch
import functools
import json
import secrets
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from . import blobs, keys
from .directory import RECIPIENT_DELIMITER, normalize_address
from .errors import InvalidInput, NotFound, RookeryError
from .kv.base import Database, ReadTransaction, Transaction, decode_counter

PENDING = "pending"
DEFERRED = "deferred"
DELIVERED = "delivered"
FAILED = "failed"
#: Statuses that still need a delivery attempt.
OPEN = (PENDING, DEFERRED)

#: Postfix-like defaults: first retry after 5 min, doubling to at most 1 h;
#: give up (and bounce) after 5 days (Postfix ``maximal_queue_lifetime``).
RETRY_MIN = 300.0
RETRY_MAX = 3600.0
LIFETIME = 5 * 86400.0
#: A message whose every open recipient is in a paused domain is looked at
#: again this much later (``resume`` makes it due at once).
PAUSE_RECHECK = 300.0
#: Replies are kept short: they only serve ``queue show`` and DSNs.
MAX_REPLY = 500
#: Blob-reference "account" of the queue: account ids start at 1.
QUEUE_REF = 0
#: Records read per transaction by listing scans (well under 5 s).
SCAN_BATCH = 500
#: A backoff record whose time ran out this long ago is purged: the
#: destination has been left alone long enough to start again from the
#: shortest delay.
BACKOFF_KEEP = 86400.0


class RateLimited(RookeryError):
    """Sending rate limit exceeded, try again later."""

    # RFC 3463 X.7.1: delivery not authorized (temporarily).
    smtp = "450 4.7.1 Sending rate limit exceeded, try again later"
    http = (429, "rateLimit")


class LeaseLost(RookeryError):
    """The message's lease is held by another owner."""


def ms(when: float) -> int:
    return int(round(when * 1000))


def domain_of(address: str) -> str:
    return address.rpartition("@")[2].lower()


def retry_delay(attempts: int, minimum: float = RETRY_MIN, maximum: float = RETRY_MAX) -> float:
    """Delay before the next try after ``attempts`` failed ones (Postfix: the
    backoff time doubles from ``minimal_backoff_time`` to ``maximal_backoff_time``)."""
    if attempts <= 0:
        return 0.0
    return float(min(maximum, minimum * 2 ** min(attempts - 1, 32)))


# -- records ---------------------------------------------------------------------

#: How many bytes of small message bodies a delivery batch reads at once.
PREFETCH_BYTES = 2 * 1024 * 1024

@dataclass(slots=True)
class Recipient:
    address: str
    status: str = PENDING
    reply: str = ""
    attempts: int = 0
    #: Account id when the recipient is local (delivered by MailStore).
    local: int | None = None
    #: A DSN has been made for this recipient's failure.
    notified: bool = False
    #: Host that gave the last reply (DSN Remote-MTA).
    remote: str = ""
    updated: float = 0.0
    #: RFC 3461 NOTIFY as the client gave it ("NEVER", or some of
    #: "SUCCESS,FAILURE,DELAY"); empty: not given (failures and delays).
    notify: str = ""
    #: RFC 3461 ORCPT, decoded: "rfc822;alice@example.org".
    orcpt: str = ""

    @property
    def open(self) -> bool:
        return self.status in OPEN

    def wants(self, event: str) -> bool:
        """Does the sender want a DSN for ``event`` (SUCCESS, FAILURE, DELAY)?
        With no NOTIFY, failures and delays are reported (RFC 3461 §4.1)."""
        if not self.notify:
            return event in ("FAILURE", "DELAY")
        return event in self.notify.split(",")

    @property
    def domain(self) -> str:
        return domain_of(self.address)


@dataclass(slots=True)
class QueuedMessage:
    id: int
    #: Envelope sender; ``""`` is the null sender (never bounced).
    sender: str
    digest: bytes
    size: int
    created: float
    next_attempt: float
    expires: float
    attempts: int = 0
    recipients: list[Recipient] = field(default_factory=list)
    #: This message is itself a delivery status notification.
    dsn: bool = False
    #: MAIL parameters to pass on (SMTPUTF8, BODY=8BITMIME).
    smtputf8: bool = False
    #: A delay warning went to the sender (at most one per message).
    warned: bool = False
    #: RFC 3461 RET ("FULL", "HDRS" or "": not given) and ENVID (decoded).
    ret: str = ""
    envid: str = ""
    #: Set by reads: the lease, if any.
    lease_owner: str = ""
    lease_expires: float = 0.0

    @property
    def open_recipients(self) -> list[Recipient]:
        return [r for r in self.recipients if r.open]

    @property
    def qid(self) -> str:
        return format_id(self.id)

    def _record(self) -> bytes:
        data = {
            "sender": self.sender,
            "digest": self.digest.hex(),
            "size": self.size,
            "created": self.created,
            "next": ms(self.next_attempt),
            "expires": self.expires,
            "attempts": self.attempts,
            "n": len(self.recipients),
            "dsn": self.dsn,
            "utf8": self.smtputf8,
            "warned": self.warned,
        }
        if self.ret:
            data["ret"] = self.ret
        if self.envid:
            data["envid"] = self.envid
        return json.dumps(data, separators=(",", ":")).encode()

    @classmethod
    def _from(cls, qid: int, raw: bytes, recipients: list[Recipient]) -> QueuedMessage:
        data = json.loads(raw)
        return cls(
            id=qid,
            sender=data["sender"],
            digest=bytes.fromhex(data["digest"]),
            size=int(data["size"]),
            created=float(data["created"]),
            next_attempt=int(data["next"]) / 1000,
            expires=float(data["expires"]),
            attempts=int(data.get("attempts", 0)),
            recipients=recipients,
            dsn=bool(data.get("dsn", False)),
            smtputf8=bool(data.get("utf8", False)),
            warned=bool(data.get("warned", False)),
            ret=str(data.get("ret", "")),
            envid=str(data.get("envid", "")),
        )


def format_id(qid: int) -> str:
    return f"{qid:016X}"


def parse_id(text: str) -> int:
    try:
        return int(text, 16)
    except ValueError:
        raise InvalidInput(f"invalid queue id {text!r}") from None


def _rcpt_value(r: Recipient) -> bytes:
    r.reply = r.reply[:MAX_REPLY]
    return json.dumps(asdict(r), separators=(",", ":")).encode()


def _rcpt_from(raw: bytes) -> Recipient:
    return Recipient(**json.loads(raw))


@dataclass(slots=True)
class Lease:
    owner: str
    expires: float

    def to_json(self) -> bytes:
        return json.dumps({"owner": self.owner, "expires": ms(self.expires)}).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> Lease:
        data = json.loads(raw)
        return cls(str(data["owner"]), int(data["expires"]) / 1000)


# -- transaction bodies: messages ---------------------------------------------------

def _get_lease(tr: ReadTransaction, qid: int) -> Lease | None:
    raw = tr.get(keys.queue_lease(qid))
    return None if raw is None else Lease.from_json(raw)


def _read(tr: ReadTransaction, qid: int, recipients: bool = True) -> tuple[QueuedMessage, Lease | None] | None:
    """A message and its lease, read once. ``recipients=False`` leaves its
    recipient list empty, for bodies that do not look at it (a removal)."""
    raw = tr.get(keys.queue_message(qid))
    if raw is None:
        return None
    rcpts = [_rcpt_from(v) for _, v in tr.get_range(*keys.queue_recipients(qid))] if recipients else []
    msg = QueuedMessage._from(qid, raw, rcpts)
    lease = _get_lease(tr, qid)
    if lease is not None:
        msg.lease_owner, msg.lease_expires = lease.owner, lease.expires
    return msg, lease


def get_message(tr: ReadTransaction, qid: int) -> QueuedMessage | None:
    found = _read(tr, qid)
    return None if found is None else found[0]


def _due_ms(msg: QueuedMessage, lease: Lease | None) -> int:
    """Where the message sits in the due index (see the module docstring)."""
    return ms(lease.expires) if lease is not None else ms(msg.next_attempt)


def new_id(tr: ReadTransaction, now: float) -> int:
    """A fresh id: milliseconds, then 20 random bits (ids sort by creation)."""
    while True:
        qid = (ms(now) << 20) | secrets.randbits(20)
        if tr.get(keys.queue_message(qid)) is None:
            return qid


def put_message(tr: Transaction, msg: QueuedMessage) -> None:
    """Write a new message (its body blob must exist) and make it due."""
    tr.set(keys.queue_message(msg.id), msg._record())
    for i, r in enumerate(msg.recipients):
        tr.set(keys.queue_recipient(msg.id, i), _rcpt_value(r))
    tr.set(keys.queue_due(ms(msg.next_attempt), msg.id), b"")
    blobs.link(tr, msg.digest, QUEUE_REF, msg.id)
    # An atomic add: every enqueue and removal can count without conflicting.
    tr.add(keys.QUEUE_SIZE, 1)


def remove_message(tr: Transaction, qid: int) -> bool:
    """Delete a message, its index entry and lease; unlink its body."""
    found = _read(tr, qid, recipients=False)
    if found is None:
        return False
    _remove(tr, *found)
    return True


def _remove(tr: Transaction, msg: QueuedMessage, lease: Lease | None) -> None:
    """Delete ``msg`` as just read with its ``lease``."""
    tr.clear(keys.queue_due(_due_ms(msg, lease), msg.id))
    tr.clear(keys.queue_lease(msg.id))
    tr.clear(keys.queue_message(msg.id))
    tr.clear_range(*keys.queue_recipients(msg.id))
    blobs.unlink(tr, msg.digest, QUEUE_REF, msg.id)
    tr.add(keys.QUEUE_SIZE, -1)


def _check_owner(tr: ReadTransaction, qid: int, owner: str, recipients: bool = True) -> tuple[QueuedMessage, Lease]:
    found = _read(tr, qid, recipients)
    lease = None if found is None else found[1]
    if found is None or lease is None or lease.owner != owner:
        raise LeaseLost(f"lease of {format_id(qid)} is not held by {owner}")
    return found[0], lease


def paused_domains(tr: ReadTransaction) -> set[str]:
    return {keys.unpack(k)[2] for k, _ in tr.get_range(*keys.QUEUE_PAUSES)}


def claim_due(tr: Transaction, owner: str, now: float, limit: int, lease_seconds: float) -> list[QueuedMessage]:
    """Lease up to ``limit`` due messages to ``owner`` and return them as read
    after the lease was taken.

    Takes messages whose index time has passed: unleased ones due for an
    attempt, and leased ones whose owner let the lease expire. Messages
    whose every open recipient is paused (its domain, or the whole queue)
    are put off, until they expire: then they are taken all the same, so
    that the worker bounces them (a pause does not make mail immortal).
    """
    paused = paused_domains(tr)
    everything = "*" in paused
    out: list[QueuedMessage] = []
    rows = tr.get_range(*keys.queue_due_until(ms(now)), limit=max(limit * 4, 16))
    for key, _ in rows:
        if len(out) >= limit:
            break
        _, _, due, qid = keys.unpack(key)
        found = _read(tr, qid)
        if found is None:
            tr.clear(key)  # stale index entry
            continue
        msg, lease = found
        if lease is not None and lease.expires > now and lease.owner != owner:
            continue  # held (its index entry is its expiry; should not be here)
        open_rcpts = msg.open_recipients
        held_back = everything or (paused and all(r.domain in paused for r in open_rcpts))
        if open_rcpts and held_back and now < msg.expires:
            tr.clear(key)
            msg.next_attempt = min(now + PAUSE_RECHECK, msg.expires)
            tr.set(keys.queue_message(qid), msg._record())
            tr.clear(keys.queue_lease(qid))
            tr.set(keys.queue_due(ms(msg.next_attempt), qid), b"")
            continue
        new = Lease(owner, now + lease_seconds)
        tr.clear(key)
        tr.set(keys.queue_lease(qid), new.to_json())
        tr.set(keys.queue_due(ms(new.expires), qid), b"")
        msg.lease_owner, msg.lease_expires = new.owner, new.expires
        out.append(msg)
    return out


def claim_next(
    tr: Transaction, owner: str, after: int | None, now: float, lease_seconds: float
) -> tuple[int | None, QueuedMessage | None]:
    """``queue drain``: lease the first message with an id above ``after``,
    whatever its due time and whatever is paused, without changing anything
    else of it (its next attempt stays, so :func:`release` can put it back).

    Returns ``(id, message as read after the lease was taken)``; ``(id,
    None)`` when another owner holds it; ``(None, None)`` past the last one.
    """
    begin, end = keys.QUEUE_MESSAGES
    if after is not None:
        begin = keys.queue_message(after) + b"\x00"
    rows = tr.get_range(begin, end, limit=1)
    if not rows:
        return None, None
    qid = keys.unpack(rows[0][0])[2]
    found = _read(tr, qid)
    if found is None:
        return qid, None
    msg, lease = found
    if lease is not None and lease.expires > now and lease.owner != owner:
        return qid, None
    new = Lease(owner, now + lease_seconds)
    tr.clear(keys.queue_due(_due_ms(msg, lease), qid))
    tr.set(keys.queue_lease(qid), new.to_json())
    tr.set(keys.queue_due(ms(new.expires), qid), b"")
    msg.lease_owner, msg.lease_expires = new.owner, new.expires
    return qid, msg


def renew(tr: Transaction, qids: Iterable[int], owner: str, now: float, lease_seconds: float) -> list[int]:
    """Extend ``owner``'s leases; return the ids still held."""
    held = []
    for qid in qids:
        lease = _get_lease(tr, qid)
        if lease is None or lease.owner != owner or tr.get(keys.queue_message(qid)) is None:
            continue
        tr.clear(keys.queue_due(ms(lease.expires), qid))
        new = Lease(owner, now + lease_seconds)
        tr.set(keys.queue_lease(qid), new.to_json())
        tr.set(keys.queue_due(ms(new.expires), qid), b"")
        held.append(qid)
    return held


def release(tr: Transaction, qid: int, owner: str, now: float, next_time: float | None = None) -> bool:
    """Give a lease back (compare-owner); the message is due at ``next_time``
    (default: now, so another node takes it at once)."""
    try:
        msg, lease = _check_owner(tr, qid, owner)
    except LeaseLost:
        return False
    tr.clear(keys.queue_due(ms(lease.expires), qid))
    tr.clear(keys.queue_lease(qid))
    msg.next_attempt = now if next_time is None else next_time
    tr.set(keys.queue_message(qid), msg._record())
    tr.set(keys.queue_due(ms(msg.next_attempt), qid), b"")
    return True


def defer(tr: Transaction, qid: int, owner: str, next_time: float, recipients: Sequence[Recipient] | None = None,
          attempts: int | None = None, warned: bool = False) -> bool:
    """Store recipient results (if given), set the next attempt, release.
    ``warned``: the sender has now been sent a delay warning."""
    try:
        msg, lease = _check_owner(tr, qid, owner)
    except LeaseLost:
        return False
    _release(tr, msg, lease, next_time, recipients, attempts, warned)
    return True


def _release(tr: Transaction, msg: QueuedMessage, lease: Lease, next_time: float,
             recipients: Sequence[Recipient] | None, attempts: int | None, warned: bool) -> None:
    """:func:`defer` of ``msg`` as just read, recipients and all. Recipients
    stored beyond those given were appended since the caller read the message
    (:meth:`Queue.add_recipients`: a submission's local part the queue takes
    over): they are kept, and made due when the message was."""
    qid = msg.id
    if recipients is not None:
        added = msg.recipients[len(recipients):]
        for i, r in enumerate(recipients):
            tr.set(keys.queue_recipient(qid, i), _rcpt_value(r))
        msg.recipients = list(recipients) + added
        if any(r.open for r in added):
            next_time = min(next_time, msg.next_attempt)
    if attempts is not None:
        msg.attempts = attempts
    msg.warned = msg.warned or warned
    tr.clear(keys.queue_due(ms(lease.expires), qid))
    tr.clear(keys.queue_lease(qid))
    msg.next_attempt = next_time
    tr.set(keys.queue_message(qid), msg._record())
    tr.set(keys.queue_due(ms(next_time), qid), b"")


def finish(tr: Transaction, msg: QueuedMessage, owner: str, dsn: QueuedMessage | None = None) -> bool:
    """Store the outcome of a delivery round for a message held by ``owner``:
    its recipients, attempts and next attempt as set on ``msg``; queue
    ``dsn`` (its body blob already stored) in the same transaction; delete
    the message if no recipient is open (counting any appended since ``msg``
    was read), else release it until its next attempt."""
    try:
        stored, lease = _check_owner(tr, msg.id, owner)
    except LeaseLost:
        return False
    if dsn is not None:
        put_message(tr, dsn)
    if msg.open_recipients or any(r.open for r in stored.recipients[len(msg.recipients):]):
        _release(tr, stored, lease, msg.next_attempt, msg.recipients, msg.attempts, msg.warned)
    else:
        _remove(tr, stored, lease)
    return True


def retry_now(tr: Transaction, qid: int, now: float) -> bool:
    """Make an unleased message due now (``queue retry``)."""
    found = _read(tr, qid, recipients=False)
    if found is None:
        raise NotFound(f"no queued message {format_id(qid)}")
    msg, lease = found
    if lease is not None and lease.expires > now:
        return False  # being delivered right now
    tr.clear(keys.queue_due(_due_ms(msg, lease), qid))
    tr.clear(keys.queue_lease(qid))
    msg.next_attempt = now
    tr.set(keys.queue_message(qid), msg._record())
    tr.set(keys.queue_due(ms(now), qid), b"")
    return True


def scan_messages(tr: ReadTransaction, after: int | None, limit: int) -> list[QueuedMessage]:
    begin, end = keys.QUEUE_MESSAGES
    if after is not None:
        begin = keys.queue_message(after) + b"\x00"
    out = []
    for k, _ in tr.get_range(begin, end, limit=limit):
        msg = get_message(tr, keys.unpack(k)[2])
        if msg is not None:
            out.append(msg)
    return out


# -- transaction bodies: throttles ------------------------------------------------

def acquire_slot(tr: Transaction, rule: str, limit: int, owner: str, now: float, ttl: float) -> int | None:
    """Take a free (or expired) connection slot of ``rule``; ``None`` if all
    ``limit`` are held."""
    held: dict[int, Lease] = {}
    for k, v in tr.get_range(*keys.queue_slots(rule)):
        held[keys.unpack(k)[3]] = Lease.from_json(v)
    for n in range(limit):
        lease = held.get(n)
        if lease is None or lease.expires <= now:
            tr.set(keys.queue_slot(rule, n), Lease(owner, now + ttl).to_json())
            return n
    return None


def renew_slot(tr: Transaction, rule: str, n: int, owner: str, now: float, ttl: float) -> bool:
    raw = tr.get(keys.queue_slot(rule, n))
    if raw is None or Lease.from_json(raw).owner != owner:
        return False
    tr.set(keys.queue_slot(rule, n), Lease(owner, now + ttl).to_json())
    return True


def release_slot(tr: Transaction, rule: str, n: int, owner: str) -> bool:
    raw = tr.get(keys.queue_slot(rule, n))
    if raw is None or Lease.from_json(raw).owner != owner:
        return False
    tr.clear(keys.queue_slot(rule, n))
    return True


def take_hourly(tr: Transaction, rule: str, limit: int, now: float, count: int = 1) -> tuple[int, float]:
    """Count up to ``count`` messages against ``rule``'s hourly limit in one go.

    Returns ``(granted, next window start)``: ``granted`` may be less than
    ``count`` (0 when the window is full). A caller that sends fewer than it
    was granted has only made the limit stricter, never looser.
    """
    window = int(now // 3600)
    key = keys.queue_hour(rule, window)
    granted = max(0, min(count, limit - decode_counter(tr.get(key))))
    if granted:
        tr.add(key, granted)
        tr.clear_range(*keys.queue_hours_before(rule, window))
    return granted, (window + 1) * 3600.0


def get_backoff(tr: ReadTransaction, dest: str) -> tuple[float, float]:
    """``(until, delay)`` of a destination's adaptive backoff, ``(0, 0)`` if none."""
    raw = tr.get(keys.queue_backoff(dest))
    if raw is None:
        return 0.0, 0.0
    data = json.loads(raw)
    return float(data["until"]), float(data["delay"])


def back_off(tr: Transaction, dest: str, now: float, minimum: float, maximum: float) -> float:
    """A destination answered 4xx: double its delay (within bounds); return until when."""
    _, delay = get_backoff(tr, dest)
    delay = min(maximum, max(minimum, delay * 2))
    until = now + delay
    tr.set(keys.queue_backoff(dest), json.dumps({"until": until, "delay": delay}).encode())
    return until


def clear_backoff(tr: Transaction, dest: str) -> None:
    tr.clear(keys.queue_backoff(dest))


def purge_backoffs(tr: Transaction, before: float, after: bytes | None, limit: int) -> tuple[int, bytes | None]:
    """Clear backoff records whose ``until`` is before ``before``, among up to
    ``limit`` records past key ``after``. Returns (cleared, last key read or
    ``None`` at the end)."""
    begin, end = keys.QUEUE_BACKOFFS
    if after is not None:
        begin = after + b"\x00"
    rows = tr.get_range(begin, end, limit=limit)
    cleared = 0
    for key, raw in rows:
        if float(json.loads(raw)["until"]) < before:
            tr.clear(key)
            cleared += 1
    return cleared, rows[-1][0] if len(rows) == limit else None


@dataclass(frozen=True, slots=True)
class QueueStats:
    """What ``/metrics`` shows of the queue's store records (cluster-wide)."""

    #: Messages in the queue.
    messages: int
    #: Per throttle rule name: (connection slots held now, messages counted
    #: in the current hour window).
    throttles: dict[str, tuple[int, int]] = field(default_factory=dict)


def read_stats(tr: ReadTransaction, rules: Sequence[ThrottleRule], now: float) -> QueueStats:
    """The queue size counter and the usage of each throttle rule."""
    usage: dict[str, tuple[int, int]] = {}
    window = int(now // 3600)
    for rule in rules:
        slots = 0
        if rule.max_connections > 0:
            # An expired slot is free (a dead node's), whatever the record says.
            slots = sum(1 for _, v in tr.get_range(*keys.queue_slots(rule.name)) if Lease.from_json(v).expires > now)
        hourly = decode_counter(tr.get(keys.queue_hour(rule.name, window))) if rule.max_per_hour > 0 else 0
        usage[rule.name] = (slots, hourly)
    return QueueStats(decode_counter(tr.get(keys.QUEUE_SIZE)), usage)


# -- transaction bodies: submission policy -------------------------------------------

def sender_owned(tr: ReadTransaction, acct: int, address: str) -> bool:
    """True when ``address`` (normalized) is ``acct``'s own address or an alias
    of it, with or without a ``+tag``. Catch-alls do not count: receiving a
    domain's stray mail is no licence to send as anyone there."""
    local, _, domain_name = address.rpartition("@")
    candidates = [address]
    if RECIPIENT_DELIMITER in local:
        candidates.append(f"{local.split(RECIPIENT_DELIMITER, 1)[0]}@{domain_name}")
    for candidate in candidates:
        raw = tr.get(keys.address(candidate))
        if raw is not None:
            return int(raw) == acct
    return False


def reserve_send(tr: Transaction, acct: int, now: float, limit: int, count: int = 1) -> None:
    """Count a message to ``count`` recipients against ``acct``'s hourly
    sending limit (recipients per fixed hour window, cluster-wide): a message
    to 100 recipients uses 100. Raises :class:`RateLimited` if they do not
    all fit, counting none of them."""
    window = int(now // 3600)
    key = keys.queue_rate(acct, window)
    if decode_counter(tr.get(key)) + count > limit:
        raise RateLimited(f"account {acct} would pass {limit} recipients this hour")
    tr.add(key, count)
    tr.clear_range(*keys.queue_rates_before(acct, window))


# -- throttle rules ------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class ThrottleRule:
    """Limits for destinations matching ``pattern`` (fnmatch): a destination
    domain, or an MX host name when ``kind`` is ``"mx"``."""

    pattern: str
    kind: str = "domain"  # or "mx"
    max_connections: int = 0  # 0: unlimited
    max_per_hour: int = 0  # 0: unlimited

    @property
    def name(self) -> str:
        return f"{self.kind}:{self.pattern}"

    def matches(self, domain_name: str, mx_host: str | None = None) -> bool:
        if self.kind == "mx":
            return mx_host is not None and fnmatch.fnmatchcase(mx_host.lower().rstrip("."), self.pattern)
        return fnmatch.fnmatchcase(domain_name, self.pattern)


def parse_throttles(table: Any) -> list[ThrottleRule]:
    """Rules from a ``[throttle]`` table: ``"pattern" = {connections = N,
    per_hour = M}``; a pattern starting ``mx:`` matches MX host names."""
    rules = []
    for pattern, spec in dict(table or {}).items():
        if not isinstance(spec, dict):
            raise ValueError(f"[throttle] {pattern!r} must be a table with connections / per_hour")
        unknown = set(spec) - {"connections", "per_hour"}
        if unknown:  # a typo must not leave a destination unthrottled
            raise ValueError(f"[throttle] {pattern!r}: unknown key(s) {', '.join(sorted(unknown))} (connections, per_hour)")
        kind = "domain"
        if pattern.startswith("mx:"):
            kind, pattern = "mx", pattern[3:]
        rules.append(
            ThrottleRule(
                pattern.lower(), kind, int(spec.get("connections", 0)), int(spec.get("per_hour", 0))
            )
        )
    return rules


# -- the async API -----------------------------------------------------------------

class Queue:
    """The outbound queue over a store. Safe to share across tasks."""

    def __init__(self, db: Database, *, lifetime: float = LIFETIME) -> None:
        self.db = db
        self.lifetime = lifetime

    # -- submission side --

    async def enqueue(
        self,
        sender: str,
        recipients: Sequence[str | tuple[str, int | None] | Recipient],
        raw: bytes,
        *,
        now: float | None = None,
        dsn: bool = False,
        smtputf8: bool = False,
        ret: str = "",
        envid: str = "",
    ) -> QueuedMessage:
        """Commit a message for delivery; returns it once committed.

        ``recipients`` are addresses, ``(address, account id)`` for local
        ones, or :class:`Recipient` records (with RFC 3461 NOTIFY / ORCPT).
        ``ret`` and ``envid`` are the RFC 3461 MAIL parameters. The body is
        stored once (content-addressed) and referenced by the queue until the
        message is done.
        """
        now = time.time() if now is None else now
        digest = await blobs.digest(raw)
        inline = len(raw) <= blobs.INLINE_MAX
        if not inline:
            await blobs.put_large(self.db, digest, raw)
        rcpts = [
            r if isinstance(r, Recipient) else Recipient(r) if isinstance(r, str) else Recipient(r[0], local=r[1])
            for r in recipients
        ]
        if not rcpts:
            raise InvalidInput("no recipients")

        def fn(tr: Transaction) -> QueuedMessage:
            if inline:
                blobs.put_inline(tr, digest, raw)
            elif not blobs.exists(tr, digest):
                raise InvalidInput("message body vanished before it was queued")
            msg = QueuedMessage(
                new_id(tr, now), sender, digest, len(raw), now, now, now + self.lifetime,
                recipients=[Recipient(r.address, local=r.local, notify=r.notify, orcpt=r.orcpt) for r in rcpts],
                dsn=dsn, smtputf8=smtputf8, ret=ret, envid=envid,
            )
            put_message(tr, msg)
            return msg

        return await self.db.transact(fn)

    async def add_recipients(self, qid: int, recipients: Sequence[tuple[str, int | None]]) -> None:
        """Append recipients to a queued message (submission: local deliveries
        that failed after the remote part was queued are retried by the queue)."""

        def fn(tr: Transaction) -> None:
            msg = get_message(tr, qid)
            if msg is None:
                raise NotFound(f"no queued message {format_id(qid)}")
            start = len(msg.recipients)
            for i, (address, acct) in enumerate(recipients):
                msg.recipients.append(Recipient(address, local=acct))
                tr.set(keys.queue_recipient(qid, start + i), _rcpt_value(msg.recipients[-1]))
            tr.set(keys.queue_message(qid), msg._record())

        await self.db.transact(fn)

    async def sender_owned(self, acct: int, address: str) -> bool:
        try:
            normalized = normalize_address(address)
        except InvalidInput:
            return False
        return await self.db.read(lambda tr: sender_owned(tr, acct, normalized))

    async def reserve_send(self, acct: int, limit: int, now: float | None = None, count: int = 1) -> None:
        """Count ``count`` recipients against ``acct``'s hourly limit, or raise
        :class:`RateLimited` (see :func:`reserve_send`)."""
        when = time.time() if now is None else now
        await self.db.transact(lambda tr: reserve_send(tr, acct, when, limit, count))

    async def rate_used(self, acct: int, now: float | None = None) -> int:
        """Recipients ``acct`` has sent to in the current hour window (read only)."""
        window = int((time.time() if now is None else now) // 3600)
        return await self.db.read(lambda tr: decode_counter(tr.get(keys.queue_rate(acct, window))))

    async def check_rate(self, acct: int, limit: int, now: float | None = None) -> int:
        """Raise :class:`RateLimited` if ``acct`` has used its hour, else
        return how much of it is used (read only)."""
        used = await self.rate_used(acct, now)
        if used >= limit:
            raise RateLimited(f"account {acct} sent to {limit} recipients this hour")
        return used

    # -- worker side --

    async def claim(self, owner: str, now: float, limit: int, lease_seconds: float) -> list[QueuedMessage]:
        return await self.db.transact(lambda tr: claim_due(tr, owner, now, limit, lease_seconds))

    async def renew(self, qids: Sequence[int], owner: str, now: float, lease_seconds: float) -> list[int]:
        if not qids:
            return []
        return await self.db.transact(lambda tr: renew(tr, qids, owner, now, lease_seconds))

    async def claim_next(
        self, owner: str, after: int | None, now: float, lease_seconds: float
    ) -> tuple[int | None, QueuedMessage | None]:
        return await self.db.transact(lambda tr: claim_next(tr, owner, after, now, lease_seconds))

    async def release(self, qid: int, owner: str, now: float, next_time: float | None = None) -> bool:
        return await self.db.transact(lambda tr: release(tr, qid, owner, now, next_time))

    async def finish(self, msg: QueuedMessage, owner: str, dsn: QueuedMessage | None = None) -> bool:
        return await self.db.transact(lambda tr: finish(tr, msg, owner, dsn))

    async def prepare_dsn(self, raw: bytes, recipient: str, local: int | None, now: float) -> QueuedMessage:
        """Store a DSN's body and return the record :meth:`finish` queues
        (null sender: a DSN is never bounced, RFC 3461 §6.2)."""
        digest = await blobs.digest(raw)
        await blobs.put_large(self.db, digest, raw)

        def fn(tr: ReadTransaction) -> int:
            return new_id(tr, now)

        qid = await self.db.read(fn)
        return QueuedMessage(qid, "", digest, len(raw), now, now, now + self.lifetime,
                             recipients=[Recipient(recipient, local=local)], dsn=True)

    async def read_body(self, msg: QueuedMessage) -> bytes:
        return await blobs.read(self.db, msg.digest)

    async def read_bodies(self, msgs: Sequence[QueuedMessage], budget: int = PREFETCH_BYTES) -> dict[int, bytes]:
        """Bodies of the small messages among ``msgs`` (by queue id), read in
        one transaction up to ``budget`` bytes in all: a connection that will
        carry them one after another needs them all, and one read costs far
        less than one per message. Larger ones are left to :meth:`read_body`."""
        wanted: list[QueuedMessage] = []
        total = 0
        for msg in msgs:
            if msg.size <= blobs.CHUNK_SIZE and total + msg.size <= budget:
                wanted.append(msg)
                total += msg.size
        if not wanted:
            return {}

        def fn(tr: ReadTransaction) -> dict[int, bytes]:
            out = {}
            for msg in wanted:
                size = blobs.size_of(tr, msg.digest)
                if size is not None:
                    out[msg.id] = blobs.read_range(tr, msg.digest, 0, size, size)
            return out

        return await self.db.read(fn)

    async def read_headers(self, msg: QueuedMessage, limit: int = 64 * 1024) -> bytes:
        head = await blobs.read(self.db, msg.digest, 0, limit)
        for sep in (b"\r\n\r\n", b"\n\n"):
            end = head.find(sep)
            if end >= 0:
                return head[: end + len(sep) // 2]
        return head

    async def local_account(self, address: str) -> int | None:
        """The account of a local address (for DSNs to local senders)."""
        from .directory import resolve_address

        try:
            normalized = normalize_address(address)
        except InvalidInput:
            return None

        def fn(tr: ReadTransaction) -> int | None:
            try:
                return resolve_address(tr, normalized)
            except NotFound:
                return None

        return await self.db.read(fn)

    async def is_local_domain(self, domain_name: str) -> bool:
        return await self.db.read(lambda tr: tr.get(keys.domain(domain_name)) is not None)

    async def next_due(self) -> float | None:
        """When the earliest message is due (or a lease expires)."""
        rows = await self.db.read(lambda tr: tr.get_range(*keys.QUEUE_DUE, limit=1))
        return None if not rows else keys.unpack(rows[0][0])[2] / 1000

    # -- throttles --

    async def acquire_slot(self, rule: str, limit: int, owner: str, now: float, ttl: float) -> int | None:
        return await self.db.transact(lambda tr: acquire_slot(tr, rule, limit, owner, now, ttl))

    async def renew_slots(self, slots: Sequence[tuple[str, int]], owner: str, now: float, ttl: float) -> None:
        if slots:
            await self.db.transact(lambda tr: [renew_slot(tr, r, n, owner, now, ttl) for r, n in slots])

    async def release_slot(self, rule: str, n: int, owner: str) -> bool:
        return await self.db.transact(lambda tr: release_slot(tr, rule, n, owner))

    async def take_hourly(self, rule: str, limit: int, now: float, count: int = 1) -> tuple[int, float]:
        return await self.db.transact(lambda tr: take_hourly(tr, rule, limit, now, count))

    async def backoff_until(self, dest: str) -> float:
        return (await self.db.read(lambda tr: get_backoff(tr, dest)))[0]

    async def back_off(self, dest: str, now: float, minimum: float, maximum: float) -> float:
        return await self.db.transact(lambda tr: back_off(tr, dest, now, minimum, maximum))

    async def clear_backoff(self, dest: str) -> None:
        await self.db.transact(lambda tr: clear_backoff(tr, dest))

    async def purge_backoffs(self, now: float | None = None, keep: float = BACKOFF_KEEP) -> int:
        """Delete backoff records that ran out more than ``keep`` seconds ago
        (a destination that failed and was never tried again keeps one
        forever otherwise); returns how many. Run by the ``purge`` singleton."""
        before = (time.time() if now is None else now) - keep
        total = 0
        after: bytes | None = None
        while True:
            cleared, after = await self.db.transact(functools.partial(purge_backoffs, before=before, after=after,
                                                                      limit=SCAN_BATCH))
            total += cleared
            if after is None:
                return total

    async def stats(self, rules: Sequence[ThrottleRule] = (), now: float | None = None) -> QueueStats:
        """Queue size and throttle usage, read in one (read-only) transaction."""
        when = time.time() if now is None else now
        return await self.db.read(lambda tr: read_stats(tr, rules, when))

    # -- administration (rookery queue ...) --

    async def list_messages(self, domain: str | None = None) -> list[QueuedMessage]:
        """Every queued message (optionally: with an open recipient in ``domain``)."""
        out: list[QueuedMessage] = []
        after: int | None = None
        domain = domain.lower() if domain else None
        while True:
            batch = await self.db.read(lambda tr: scan_messages(tr, after, SCAN_BATCH))
            for msg in batch:
                if domain is None or any(r.domain == domain for r in msg.open_recipients):
                    out.append(msg)
            if len(batch) < SCAN_BATCH:
                return out
            after = batch[-1].id

    async def show(self, qid: int | str) -> QueuedMessage:
        n = parse_id(qid) if isinstance(qid, str) else qid
        msg = await self.db.read(lambda tr: get_message(tr, n))
        if msg is None:
            raise NotFound(f"no queued message {format_id(n)}")
        return msg

    async def retry(self, qid: int | str | None = None, now: float | None = None) -> int:
        """Make one message (or all, ``None``) due now; returns how many."""
        when = time.time() if now is None else now
        if qid is not None:
            n = parse_id(qid) if isinstance(qid, str) else qid
            return int(await self.db.transact(lambda tr: retry_now(tr, n, when)))
        return await self._retry_all([m.id for m in await self.list_messages()], when)

    async def _retry_all(self, qids: Sequence[int], when: float) -> int:
        count = 0
        for qid in qids:
            try:
                count += int(await self.db.transact(functools.partial(retry_now, qid=qid, now=when)))
            except NotFound:
                pass
        return count

    async def delete(self, qid: int | str) -> None:
        """Drop a message without a DSN (``postsuper -d``)."""
        n = parse_id(qid) if isinstance(qid, str) else qid

        def fn(tr: Transaction) -> None:
            if not remove_message(tr, n):
                raise NotFound(f"no queued message {format_id(n)}")

        await self.db.transact(fn)

    async def pause(self, domain: str | None = None) -> None:
        """Stop deliveries to ``domain`` (``None``: the whole queue)."""
        name = "*" if not domain else domain.lower()
        await self.db.transact(lambda tr: tr.set(keys.queue_pause(name), b""))

    async def resume(self, domain: str | None = None, now: float | None = None) -> int:
        """Undo :meth:`pause`; messages for ``domain`` (every message, for the
        whole queue) become due at once."""
        name = "*" if not domain else domain.lower()
        await self.db.transact(lambda tr: tr.clear(keys.queue_pause(name)))
        when = time.time() if now is None else now
        return await self._retry_all([m.id for m in await self.list_messages(None if name == "*" else name)], when)

    async def paused(self) -> list[str]:
        return sorted(await self.db.read(paused_domains))

    # -- DKIM keys (server.dkim) --

    async def set_dkim_key(self, domain_name: str, selector: str, private_pem: str) -> None:
        value = json.dumps({"selector": selector, "key": private_pem, "created": time.time()}).encode()
        await self.db.transact(lambda tr: tr.set(keys.dkim_key(domain_name), value))

    async def dkim_key(self, domain_name: str) -> tuple[str, str] | None:
        raw = await self.db.read(lambda tr: tr.get(keys.dkim_key(domain_name)))
        if raw is None:
            return None
        data = json.loads(raw)
        return str(data["selector"]), str(data["key"])

    async def remove_dkim_key(self, domain_name: str) -> None:
        await self.db.transact(lambda tr: tr.clear(keys.dkim_key(domain_name)))
