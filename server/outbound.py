"""The delivery worker: takes due messages from the queue and sends them on.

Every node runs one. The loop claims due messages (leases in the store, see
:mod:`storage.queue`), groups their open recipients by destination domain,
and delivers each group over one connection: to the ``[routes]`` host of
the domain (or of ``"*"``, a smarthost, optionally with AUTH), else to the
domain's MX hosts in preference order (RFC 5321 §5.1; no MX: the domain's
own address; null MX, RFC 7505: permanent failure). STARTTLS is used when
offered, without certificate checks unless configured (opportunistic TLS,
RFC 3207 / RFC 7435); if its handshake fails, the message goes in plaintext
on a new connection (a route with ``tls = "required"`` defers instead), and
credentials only ever go over TLS. Results are per recipient: delivered, deferred (4xx,
retried on a Postfix-like schedule), failed (5xx: bounced at once). A
message still undelivered when it expires is bounced too. Bounces are RFC
3464 DSNs to the envelope sender, queued in the same transaction that
records the failure, so that a local sender's DSN reaches the INBOX through
the same queue; a null-sender message never bounces. With ``[queue]
delay_warning`` set, a sender whose message has waited that long is warned
once (a DSN with ``Action: delayed``); RFC 3461 NOTIFY chooses who hears of
what, and NOTIFY=SUCCESS gets a "delivered" or "relayed" report.

Leases are renewed while the node works; on drain the node finishes what it
can and releases the rest so that another node takes it at once. Cluster
throttles (connections and messages per hour per destination or MX pattern)
and the adaptive backoff after 4xx replies are store records, so they hold
across nodes. Peer ``queue_refresh`` messages and local submissions call
:meth:`OutboundWorker.refresh` to wake the loop early; without them the loop
still polls the store (DESIGN.md principle 1).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import random
import re
import secrets
import ssl
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from email.utils import formatdate, make_msgid
from datetime import datetime, timezone
from typing import Any, Protocol

import aiosmtplib

from protocols.smtp.dsn import encode_xtext

from storage import Storage
from storage.errors import RookeryError
from storage.queue import (
    DEFERRED,
    DELIVERED,
    FAILED,
    PAUSE_RECHECK,
    RETRY_MAX,
    RETRY_MIN,
    Queue,
    QueuedMessage,
    QueueStats,
    Recipient,
    ThrottleRule,
    domain_of,
    format_id,
    retry_delay,
)

log = logging.getLogger("rookery.outbound")

SKIPPED = "skipped"
#: MX hosts tried per destination and delivery round (Postfix ``smtp_mx_address_limit``-like).
MAX_MX_HOSTS = 5
#: Headers of the original message quoted in a DSN (RFC 3462 text/rfc822-headers).
DSN_HEADERS_MAX = 64 * 1024
#: Largest message a RET=FULL bounce returns whole.
DSN_FULL_MAX = 10 * 1024 * 1024
EXPIRED = "Delivery time expired"
#: Per-node counters of :attr:`OutboundWorker.counters` (``/metrics``).
COUNTERS = ("delivered", "deferred", "failed", "bounces", "delay_warnings")
_ENHANCED = re.compile(r"\b([245])\.(\d{1,3})\.(\d{1,3})\b")


# -- settings and routes --------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class OutboundSettings:
    hostname: str
    retry_min: float = RETRY_MIN
    retry_max: float = RETRY_MAX
    lease_seconds: float = 60.0
    #: Messages claimed per store transaction.
    batch: int = 20
    #: Messages one node holds at once.
    max_inflight: int = 200
    #: Concurrent outgoing connections of one node.
    max_connections: int = 20
    #: Seconds between store polls when nothing wakes the worker.
    poll_interval: float = 15.0
    connect_timeout: float = 30.0
    #: RFC 5321 §4.5.3.2: 5 min for most replies, 10 min after the data.
    command_timeout: float = 300.0
    data_timeout: float = 600.0
    #: Port of MX hosts (25; tests point it elsewhere).
    smtp_port: int = 25
    #: Verify server certificates (off: opportunistic TLS, RFC 7435).
    tls_verify: bool = False
    tls_ca_file: str = ""
    #: How long a connection slot of a throttled destination is waited for.
    slot_wait: float = 30.0
    #: Retry delay of messages that found their destination throttled.
    throttle_delay: float = 60.0
    #: Adaptive backoff of a destination after 4xx: first delay, cap.
    backoff_min: float = 60.0
    backoff_max: float = 3600.0
    #: Seconds in the queue before the sender is warned once of the delay (0: never).
    delay_warning: float = 0.0
    #: Seconds between reads of the queue size and throttle usage for ``/metrics``.
    stats_interval: float = 5.0


@dataclass(frozen=True, slots=True)
class Route:
    """Where mail for a domain goes instead of its MX (``[routes]``)."""

    host: str
    port: int = 25
    username: str = ""
    password: str = ""
    #: ``opportunistic`` (STARTTLS if offered), ``required``, ``implicit`` (port 465), ``none``.
    #: With a username, AUTH is only done over TLS, unless this is ``none``
    #: (which says plaintext credentials are wanted, e.g. for a local relay).
    tls: str = "opportunistic"
    #: Verify the certificate (default: ``[queue] tls_verify``).
    verify: bool | None = None


TLS_MODES = ("opportunistic", "required", "implicit", "none")


def parse_hostport(text: str, default_port: int = 25) -> tuple[str, int]:
    text = text.strip()
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port = rest.lstrip(":")
        return host, int(port) if port else default_port
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        return text, default_port
    return host, int(port)


#: What a ``[routes]`` table entry may hold.
ROUTE_KEYS = frozenset({"host", "port", "username", "password", "tls", "verify"})


def parse_routes(table: Mapping[str, Any] | None) -> dict[str, Route]:
    """``[routes]``: ``"domain" = "host:port"`` or ``"domain" = {host, port,
    username, password, tls, verify}``; the key ``"*"`` routes every domain."""
    routes: dict[str, Route] = {}
    for domain, spec in dict(table or {}).items():
        if isinstance(spec, str):
            host, port = parse_hostport(spec)
            routes[domain.lower()] = Route(host, port)
            continue
        if not isinstance(spec, Mapping) or "host" not in spec:
            raise ValueError(f"[routes] {domain!r} must be \"host:port\" or a table with host")
        unknown = set(spec) - ROUTE_KEYS
        if unknown:
            raise ValueError(f"[routes] {domain!r}: unknown key(s) {', '.join(sorted(unknown))} ({', '.join(sorted(ROUTE_KEYS))})")
        host, port = parse_hostport(str(spec["host"]), int(spec.get("port", 25)))
        tls = str(spec.get("tls", "opportunistic"))
        if tls not in TLS_MODES:
            raise ValueError(f"[routes] {domain!r}: tls must be one of {', '.join(TLS_MODES)}")
        verify = spec.get("verify")
        routes[domain.lower()] = Route(
            host, int(spec.get("port", port)), str(spec.get("username", "")), str(spec.get("password", "")),
            tls, None if verify is None else bool(verify),
        )
    return routes


# -- DNS ---------------------------------------------------------------------------------

class DnsError(Exception):
    def __init__(self, reply: str, permanent: bool) -> None:
        super().__init__(reply)
        self.reply = reply
        self.permanent = permanent


class MxResolver(Protocol):
    async def resolve_mx(self, domain: str) -> list[str]:
        """Hosts to try for ``domain``, best first. Raises :class:`DnsError`."""


class DnsResolver:
    """MX lookup with dnspython's asynchronous resolver (never blocks the loop).

    ``resolver`` is anything with dnspython's ``async resolve(name, rdtype,
    lifetime=...)``; tests pass a fake one.
    """

    def __init__(self, resolver: Any = None, lifetime: float = 20.0) -> None:
        self._resolver = resolver
        self.lifetime = lifetime

    def _get(self) -> Any:
        if self._resolver is None:
            import dns.asyncresolver

            self._resolver = dns.asyncresolver.Resolver()
        return self._resolver

    async def _has_address(self, domain: str) -> bool:
        import dns.exception
        import dns.resolver

        for rdtype in ("A", "AAAA"):
            try:
                await self._get().resolve(domain, rdtype, lifetime=self.lifetime)
                return True
            except (dns.resolver.NoAnswer, dns.resolver.NXDOMAIN):
                continue
            except dns.exception.DNSException as exc:
                raise DnsError(f"451 4.4.3 DNS lookup of {domain} failed: {exc.__class__.__name__}", False) from None
        return False

    async def resolve_mx(self, domain: str) -> list[str]:
        import dns.exception
        import dns.resolver

        try:
            answer = await self._get().resolve(domain, "MX", lifetime=self.lifetime)
        except dns.resolver.NXDOMAIN:
            raise DnsError(f"550 5.1.2 Domain {domain} does not exist", True) from None
        except dns.resolver.NoAnswer:
            # RFC 5321 §5.1: no MX records, the domain itself is the implicit MX.
            if await self._has_address(domain):
                return [domain]
            raise DnsError(f"550 5.1.2 Domain {domain} has no MX or address records", True) from None
        except dns.exception.DNSException as exc:
            raise DnsError(f"451 4.4.3 DNS lookup of {domain} failed: {exc.__class__.__name__}", False) from None
        records = [(int(r.preference), r.exchange.to_text(omit_final_dot=True)) for r in answer]
        # RFC 7505 §3: a single MX of "." with preference 0 says "no mail here".
        if any(host in ("", ".") for _, host in records):
            if len(records) == 1:
                raise DnsError(f"556 5.1.10 Domain {domain} accepts no mail (null MX)", True)
            records = [(p, h) for p, h in records if h not in ("", ".")]
        # Equal preferences are tried in random order (RFC 5321 §5.1).
        random.shuffle(records)
        records.sort(key=lambda r: r[0])
        return [host.lower() for _, host in records]


# -- DSN ------------------------------------------------------------------------------------

def status_of(reply: str, failed: bool = True) -> str:
    """The RFC 3463 status of a reply: its enhanced code, else its class."""
    m = _ENHANCED.search(reply)
    if m:
        cls, sub, detail = m.groups()
    else:
        cls, sub, detail = (reply[:1] if reply[:1] in "245" else "4"), "0", "0"
    if failed:
        cls = "5"
    return f"{cls}.{sub}.{detail}"


def build_dsn(
    hostname: str,
    msg: QueuedMessage,
    failed: Sequence[Recipient],
    original: bytes,
    now: float,
    delayed: Sequence[Recipient] = (),
    succeeded: Sequence[Recipient] = (),
    *,
    full: bool = False,
) -> bytes:
    """A delivery status notification (RFC 3464 multipart/report,
    report-type=delivery-status): recipients that ``failed`` (a bounce),
    recipients still being retried (``delayed``: a delay warning), and
    recipients delivered whose sender asked to hear it (``succeeded``, RFC
    3461 NOTIFY=SUCCESS: "delivered" here, "relayed" to a server that could
    not pass the request on).

    ``original`` is the message's header section, or with ``full`` (RET=FULL
    on a bounce) the whole message, returned as message/rfc822.
    """
    boundary = f"{secrets.token_hex(12)}={hostname}"
    date = formatdate(now, localtime=False)
    # The human-readable part: one paragraph per kind of report.
    sections: list[list[str]] = []
    if failed:
        sections.append(["Your message could not be delivered to one or more recipients.",
                         f"It is attached below{'' if full else ' (headers only)'}.", ""]
                        + [f"<{r.address}>: {r.reply or 'delivery failed'}" for r in failed])
    if delayed:
        until = formatdate(msg.expires, localtime=False)
        sections.append(["Your message could not be delivered yet to the recipients below.",
                         f"Delivery will be retried until {until}; you need not send it again.", ""]
                        + [f"<{r.address}>: {r.reply or 'delivery delayed'}" for r in delayed])
    if succeeded:
        sections.append(["Your message was delivered to the recipients below, as you asked to be told.", ""]
                        + [f"<{r.address}>: {'delivered to the mailbox' if r.local is not None else 'relayed: ' + r.reply}"
                           for r in succeeded])
    human = [f"This is the mail system at host {hostname}.", ""]
    for i, section in enumerate(sections):
        human += ([""] if i else []) + section
    per_message = [f"Reporting-MTA: dns; {hostname}"]
    if msg.envid:
        per_message.append(f"Original-Envelope-Id: {_one_line(msg.envid)}")  # RFC 3464 §2.2.1
    per_message += [
        f"X-Rookery-Queue-ID: {msg.qid}",
        f"Arrival-Date: {formatdate(msg.created, localtime=False)}",
    ]
    blocks = ["\r\n".join(per_message)]
    reports = [("failed", r) for r in failed] + [("delayed", r) for r in delayed]
    reports += [("delivered" if r.local is not None else "relayed", r) for r in succeeded]
    for action, r in reports:
        if action == "failed":
            status = status_of(r.reply)
        elif action == "delayed":
            status = "4" + status_of(r.reply, failed=False)[1:]
        else:
            status = "2.0.0"
        fields = [f"Original-Recipient: {_one_line(r.orcpt)}"] if r.orcpt else []
        fields += [f"Final-Recipient: rfc822; {r.address}", f"Action: {action}", f"Status: {status}"]
        if action == "delayed":
            fields.append(f"Will-Retry-Until: {formatdate(msg.expires, localtime=False)}")
        if r.remote:
            fields.append(f"Remote-MTA: dns; {r.remote}")
            fields.append(f"Diagnostic-Code: smtp; {_one_line(r.reply)}")
        elif r.reply:
            fields.append(f"Diagnostic-Code: X-Rookery; {_one_line(r.reply)}")
        if r.updated:
            fields.append(f"Last-Attempt-Date: {formatdate(r.updated, localtime=False)}")
        blocks.append("\r\n".join(fields))
    attached = original if full else original[:DSN_HEADERS_MAX]
    if not attached.endswith(b"\r\n"):
        attached += b"\r\n"
    eight_bit = not attached.isascii()
    if failed:
        subject, what = "Undelivered Mail Returned to Sender", "Undelivered"
    elif delayed:
        subject, what = "Delayed Mail (still being retried)", "Delayed"
    else:
        subject, what = "Successful Mail Delivery Report", "Delivered"
    if full:
        part_head = "Content-Type: message/rfc822\r\n" + ("Content-Transfer-Encoding: 8bit\r\n" if eight_bit else "")
        part_head += f"Content-Description: {what} Message\r\n"
    else:
        part_head = ("Content-Type: text/rfc822-headers; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n"
                     if eight_bit else "Content-Type: text/rfc822-headers\r\n")
        part_head += f"Content-Description: {what} Message Headers\r\n"
    # RFC 3461 §6.2 / RFC 3834: a DSN comes from the null sender and is auto-submitted.
    top = (
        f"From: Mail Delivery System <MAILER-DAEMON@{hostname}>\r\n"
        f"To: <{msg.sender}>\r\n"
        f"Subject: {subject}\r\n"
        f"Date: {date}\r\n"
        f"Message-ID: {make_msgid(domain=hostname)}\r\n"
        "Auto-Submitted: auto-replied\r\n"
        "MIME-Version: 1.0\r\n"
        f'Content-Type: multipart/report; report-type=delivery-status;\r\n\tboundary="{boundary}"\r\n'
        "\r\n"
        "This is a MIME-encapsulated message.\r\n"
        "\r\n"
        f"--{boundary}\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n"
        "Content-Description: Notification\r\n"
        "Content-Transfer-Encoding: 8bit\r\n"
        "\r\n"
        + "\r\n".join(human)
        + "\r\n\r\n"
        f"--{boundary}\r\n"
        "Content-Type: message/delivery-status\r\n"
        "Content-Description: Delivery report\r\n"
        "\r\n"
        + "\r\n\r\n".join(blocks)
        + "\r\n\r\n"
        f"--{boundary}\r\n"
        + part_head
        + "\r\n"
    ).encode("utf-8", "surrogateescape")
    return top + attached + f"\r\n--{boundary}--\r\n".encode()


def _one_line(text: str) -> str:
    return " ".join(text.split())[:900]


def _why(exc: BaseException) -> str:
    return _one_line(str(exc)) or exc.__class__.__name__


# -- the worker --------------------------------------------------------------------------

@dataclass(slots=True)
class Outcome:
    status: str  # DELIVERED, DEFERRED, FAILED or SKIPPED (not attempted)
    reply: str = ""
    remote: str = ""
    #: SKIPPED: when to look again; DEFERRED: not before (destination backoff).
    retry_at: float = 0.0
    #: DELIVERED to a server that took the RFC 3461 parameters: success
    #: reports, if any were asked for, are its to send.
    dsn_passed: bool = False


def reply_text(code: int, message: str) -> str:
    return _one_line(f"{code} {message}")


def classify(code: int) -> str:
    if 500 <= code < 600:
        return FAILED
    return DEFERRED


@dataclass(slots=True)
class _Group:
    domain: str
    route: Route | None
    items: list[tuple[QueuedMessage, list[int]]] = field(default_factory=list)


Results = dict[tuple[int, int], Outcome]


class OutboundWorker:
    """The node's queue runner (a node service: start, stop_accepting, drain)."""

    name = "outbound"

    def __init__(
        self,
        storage: Storage,
        queue: Queue,
        settings: OutboundSettings,
        *,
        routes: Mapping[str, Route] | None = None,
        throttles: Iterable[ThrottleRule] = (),
        resolver: MxResolver | None = None,
        clock: Callable[[], float] = time.time,
        node_id: str = "",
    ) -> None:
        self.storage = storage
        self.queue = queue
        self.settings = settings
        self.routes = dict(routes or {})
        self.throttles = sorted(throttles, key=lambda r: r.name)
        self.resolver: MxResolver = resolver or DnsResolver()
        self.clock = clock
        #: Lease owner token: unique per worker run, so a restarted node never
        #: mistakes its predecessor's leases for its own.
        self.owner = f"{node_id or 'node'}-{secrets.token_hex(6)}"
        self._held: dict[int, QueuedMessage] = {}
        self._slots: set[tuple[str, int]] = set()
        #: Per rule: slot takes and releases this node has under way in the store.
        self._trying: collections.Counter[str] = collections.Counter()
        self._releases: set[asyncio.Task[None]] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._wake = asyncio.Event()
        self._slot_freed = asyncio.Event()
        self._stopping = False
        self._loop_task: asyncio.Task[None] | None = None
        self._renew_task: asyncio.Task[None] | None = None
        self._conn_limit = asyncio.Semaphore(settings.max_connections)
        self._tls: dict[bool, ssl.SSLContext] = {}
        self._stats_task: asyncio.Task[None] | None = None
        #: This node's counts since it started (``/metrics``): recipients
        #: delivered, deferred and failed, bounces and delay warnings queued.
        self.counters: dict[str, int] = dict.fromkeys(COUNTERS, 0)
        #: The store's side, refreshed in the background (metric sources
        #: must not read the store): ``None`` until the first read.
        self.stats: QueueStats | None = None

    # -- lifecycle --

    async def start(self) -> None:
        await self._ensure_tls()
        self._loop_task = asyncio.create_task(self._run(), name="outbound")
        self._renew_task = asyncio.create_task(self._renew_loop(), name="outbound-renew")
        self._stats_task = asyncio.create_task(self._stats_loop(), name="outbound-stats")

    def refresh(self) -> None:
        """Look at the queue now (a submission, or a peer's ``queue_refresh``)."""
        self._wake.set()

    @property
    def held(self) -> int:
        """Messages this node holds (node record load)."""
        return len(self._held)

    def stop_accepting(self) -> None:
        self._stopping = True
        self._wake.set()

    async def drain(self, deadline: float) -> None:
        """Finish deliveries under way for up to ``deadline`` seconds, then
        stop them and give their messages back to the queue."""
        self.stop_accepting()
        if self._loop_task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop_task
        if self._tasks:
            _, pending = await asyncio.wait(set(self._tasks), timeout=deadline)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        now = self.clock()
        for qid in list(self._held):
            try:
                await self.queue.release(qid, self.owner, now)
            except Exception:
                log.exception("release failed", extra={"queue_id": format_id(qid)})
            self._held.pop(qid, None)
        if self._releases:
            await asyncio.gather(*self._releases, return_exceptions=True)
        for rule, n in list(self._slots):
            with contextlib.suppress(Exception):
                await self.queue.release_slot(rule, n, self.owner)
        self._slots.clear()
        for background in (self._renew_task, self._stats_task):
            if background is not None:
                background.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await background

    async def _run(self) -> None:
        settings = self.settings
        while not self._stopping:
            claimed = 0
            capacity = settings.max_inflight - len(self._held)
            if capacity > 0:
                try:
                    claimed = await self._claim_and_start(min(settings.batch, capacity))
                except Exception:
                    log.exception("queue claim failed")
            if claimed and claimed == min(settings.batch, capacity):
                continue  # more may be due
            timeout = settings.poll_interval
            with contextlib.suppress(Exception):
                due = await self.queue.next_due()
                if due is not None:
                    timeout = min(timeout, max(0.05, due - self.clock()))
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout)
            self._wake.clear()

    async def _claim_and_start(self, limit: int) -> int:
        msgs = await self.queue.claim(self.owner, self.clock(), limit, self.settings.lease_seconds)
        if not msgs:
            return 0
        for msg in msgs:
            self._held[msg.id] = msg
        task = asyncio.create_task(self._process(msgs), name="outbound-batch")
        self._tasks.add(task)
        task.add_done_callback(self._batch_done)
        return len(msgs)

    def _batch_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("delivery batch failed: %r", task.exception())
        self._wake.set()

    async def run_once(self, limit: int | None = None) -> int:
        """Claim one batch and deliver it to the end (tests, ``queue flush``)."""
        await self._ensure_tls()
        limit = limit or self.settings.batch
        msgs = await self.queue.claim(self.owner, self.clock(), limit, self.settings.lease_seconds)
        for msg in msgs:
            self._held[msg.id] = msg
        if msgs:
            await self._process(msgs)
        return len(msgs)

    async def _renew_loop(self) -> None:
        interval = max(0.05, self.settings.lease_seconds / 3)
        while True:
            await asyncio.sleep(interval)
            now = self.clock()
            held = list(self._held)
            try:
                kept = set(await self.queue.renew(held, self.owner, now, self.settings.lease_seconds))
                lost = [q for q in held if q not in kept and q in self._held]
                if lost:
                    log.warning("queue leases lost", extra={"ids": ",".join(format_id(q) for q in lost)})
                await self.queue.renew_slots(sorted(self._slots), self.owner, now, self.settings.lease_seconds)
            except Exception:
                log.exception("lease renewal failed")

    async def _stats_loop(self) -> None:
        while True:
            try:
                self.stats = await self.queue.stats(self.throttles, self.clock())
            except Exception:
                log.exception("queue statistics read failed")
            await asyncio.sleep(self.settings.stats_interval)

    async def _ensure_tls(self) -> None:
        if not self._tls:
            self._tls = await asyncio.get_running_loop().run_in_executor(None, self._make_tls)

    def _make_tls(self) -> dict[bool, ssl.SSLContext]:
        loose = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
        loose.check_hostname = False
        loose.verify_mode = ssl.CERT_NONE
        strict = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
        if self.settings.tls_ca_file:
            strict.load_verify_locations(cafile=self.settings.tls_ca_file)
        return {False: loose, True: strict}

    # -- one batch --

    def route_for(self, domain: str) -> Route | None:
        return self.routes.get(domain) or self.routes.get("*")

    async def _process(self, msgs: Sequence[QueuedMessage]) -> None:
        results: Results = {}
        now = self.clock()
        paused: set[str] = set(await self.queue.paused())
        # The whole queue paused: only expired messages are claimed, to be
        # bounced, and nothing of them is delivered.
        everything = "*" in paused
        groups: dict[str, _Group] = {}
        local: list[tuple[QueuedMessage, list[int]]] = []
        for msg in msgs:
            by_domain: dict[str, list[int]] = {}
            local_idx: list[int] = []
            for i, r in enumerate(msg.recipients):
                if not r.open:
                    continue
                if everything or (r.local is None and r.domain in paused):
                    results[(msg.id, i)] = Outcome(SKIPPED, "4.4.5 destination paused", retry_at=now + PAUSE_RECHECK)
                elif r.local is not None:
                    local_idx.append(i)
                else:
                    by_domain.setdefault(r.domain, []).append(i)
            if local_idx:
                local.append((msg, local_idx))
            for domain, idxs in by_domain.items():
                group = groups.setdefault(domain, _Group(domain, self.route_for(domain)))
                group.items.append((msg, idxs))
        jobs = [self._deliver_group(g, results) for g in groups.values()]
        if local:
            jobs.append(self._deliver_local(local, results))
        outcomes = await asyncio.gather(*jobs, return_exceptions=True)
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                log.error("delivery group failed: %r", outcome, exc_info=outcome)
        # Results of the whole batch at once: their transactions share group
        # commits instead of waiting for one another.
        await asyncio.gather(*(self._finish_one(msg, results) for msg in msgs))

    async def _finish_one(self, msg: QueuedMessage, results: Results) -> None:
        try:
            await self._finish(msg, results)
        except Exception:
            log.exception("could not record delivery results", extra={"queue_id": msg.qid})
        finally:
            self._held.pop(msg.id, None)

    async def _finish(self, msg: QueuedMessage, results: Results) -> None:
        now = self.clock()
        attempted = False
        retry_at: list[float] = []
        deferred = False
        tried: list[Recipient] = []
        for i, r in enumerate(msg.recipients):
            outcome = results.get((msg.id, i))
            if not r.open:
                continue
            if outcome is None:
                # Not reached (the group crashed): try again soon, as a deferral.
                outcome = Outcome(DEFERRED, "451 4.3.0 Delivery was interrupted")
            if outcome.status == SKIPPED:
                retry_at.append(outcome.retry_at)
                continue
            attempted = True
            tried.append(r)
            r.status, r.reply, r.remote, r.updated = outcome.status, outcome.reply, outcome.remote, now
            r.attempts += 1
            if outcome.status == DEFERRED:
                deferred = True
                if outcome.retry_at:
                    retry_at.append(outcome.retry_at)
        if attempted:
            msg.attempts += 1
        if deferred:
            retry_at.append(now + retry_delay(msg.attempts, self.settings.retry_min, self.settings.retry_max))
        if now >= msg.expires:
            for r in msg.open_recipients:
                last = f" (last reply: {r.reply})" if r.reply else ""
                r.status, r.reply, r.updated = FAILED, f"554 5.4.7 {EXPIRED}{last}", now
        if msg.open_recipients:
            # A deferred recipient waits for the later of its retry time and
            # its destination's backoff; the message is due at the earliest.
            msg.next_attempt = min(retry_at) if retry_at else now + self.settings.retry_min
        # RFC 3461 NOTIFY: who hears of what (none of it for NOTIFY=NEVER).
        failed = [r for r in msg.recipients if r.status == FAILED and not r.notified]
        counts = dict.fromkeys(COUNTERS, 0)
        counts["delivered"] = sum(r.status == DELIVERED for r in tried)
        counts["deferred"] = sum(r.status == DEFERRED for r in tried)
        counts["failed"] = len(failed)
        dsn = None
        for r in failed:
            r.notified = True
        failed = [r for r in failed if r.wants("FAILURE")]
        delayed: list[Recipient] = []
        warn_after = self.settings.delay_warning
        if warn_after > 0 and not msg.warned and msg.sender and not msg.dsn and now - msg.created >= warn_after:
            # One warning per message, for the recipients still deferred.
            delayed = [r for r in msg.open_recipients if r.status == DEFERRED]
            msg.warned = bool(delayed)
            delayed = [r for r in delayed if r.wants("DELAY")]
        succeeded = [
            r for i, r in enumerate(msg.recipients)
            if r.status == DELIVERED and r.wants("SUCCESS") and not r.notified
            and (outcome := results.get((msg.id, i))) is not None and not outcome.dsn_passed
        ]
        for r in succeeded:
            r.notified = True
        if (failed or delayed or succeeded) and msg.sender and not msg.dsn:
            dsn = await self._make_dsn(msg, failed, now, delayed, succeeded)
        if not await self.queue.finish(msg, self.owner, dsn):
            log.warning("lease lost before results were stored", extra={"queue_id": msg.qid})
            return
        # Counted once the results are committed, never for a round lost.
        if dsn is not None:
            counts["bounces"] = int(bool(failed))
            counts["delay_warnings"] = int(bool(delayed))
        for name, n in counts.items():
            self.counters[name] += n
        log.info(
            "queue round",
            extra={
                "queue_id": msg.qid,
                "delivered": sum(r.status == DELIVERED for r in msg.recipients),
                "failed": len(failed),
                "open": len(msg.open_recipients),
                "next": msg.next_attempt if msg.open_recipients else 0,
            },
        )
        if dsn is not None:
            self.refresh()

    async def _make_dsn(
        self, msg: QueuedMessage, failed: list[Recipient], now: float, delayed: Sequence[Recipient] = (),
        succeeded: Sequence[Recipient] = (),
    ) -> QueuedMessage | None:
        # RET=FULL returns the whole message with a bounce (RFC 3461 §4.3),
        # up to a size; past it, and for other reports, the headers.
        full = bool(failed) and msg.ret == "FULL" and msg.size <= DSN_FULL_MAX
        original = await (self.queue.read_body(msg) if full else self.queue.read_headers(msg, DSN_HEADERS_MAX))
        raw = build_dsn(self.settings.hostname, msg, failed, original, now, delayed, succeeded, full=full)
        local = await self.queue.local_account(msg.sender)
        if local is None and await self.queue.is_local_domain(domain_of(msg.sender)):
            log.warning("bounce dropped: unknown local sender", extra={"queue_id": msg.qid, "from": msg.sender})
            return None
        return await self.queue.prepare_dsn(raw, msg.sender, local, now)

    # -- local recipients --

    async def _deliver_local(self, items: list[tuple[QueuedMessage, list[int]]], results: Results) -> None:
        for msg, idxs in items:
            body = await self.queue.read_body(msg)
            copy = f"Return-Path: <{msg.sender}>\r\n".encode("utf-8", "surrogateescape") + body
            for i in idxs:
                acct = msg.recipients[i].local
                assert acct is not None
                try:
                    await self.storage.mail.deliver([acct], copy)
                    results[(msg.id, i)] = Outcome(DELIVERED, "250 2.0.0 Delivered to INBOX")
                except RookeryError as exc:
                    results[(msg.id, i)] = Outcome(classify(int(exc.smtp[:3])), exc.smtp)
                except Exception as exc:
                    log.exception("local delivery failed", extra={"queue_id": msg.qid})
                    reply = f"451 4.3.0 Local delivery failed: {exc.__class__.__name__}"
                    results[(msg.id, i)] = Outcome(DEFERRED, reply)

    # -- remote recipients --

    def _settle(self, group: _Group, results: Results, outcome: Outcome) -> None:
        """Give every recipient of ``group`` without a result ``outcome``."""
        for msg, idxs in group.items:
            for i in idxs:
                results.setdefault(
                    (msg.id, i), Outcome(outcome.status, outcome.reply, outcome.remote, outcome.retry_at)
                )

    async def _deliver_group(self, group: _Group, results: Results) -> None:
        now = self.clock()
        until = await self.queue.backoff_until(group.domain)
        if until > now:
            self._settle(group, results, Outcome(SKIPPED, "4.4.1 destination backed off", retry_at=until))
            return
        route = group.route
        if route is not None:
            hosts = [(route.host, route.port)]
        else:
            try:
                mx = await self.resolver.resolve_mx(group.domain)
            except DnsError as exc:
                self._settle(group, results, Outcome(FAILED if exc.permanent else DEFERRED, exc.reply))
                return
            hosts = [(h, self.settings.smtp_port) for h in mx[:MAX_MX_HOSTS]]
        rules = [r for r in self.throttles if r.kind == "domain" and r.matches(group.domain)]
        slots: list[tuple[str, int]] = []
        try:
            if not await self._acquire(rules, slots):
                self._settle(group, results, Outcome(SKIPPED, "4.4.5 destination throttled",
                                                     retry_at=now + self.settings.throttle_delay))
                return
            last = "451 4.4.1 No mail exchanger could be reached"
            temporary = False
            async with self._conn_limit:
                for host, port in hosts:
                    mx_rules = [r for r in self.throttles if r.kind == "mx" and r.matches(group.domain, host)]
                    mx_slots: list[tuple[str, int]] = []
                    try:
                        if not await self._acquire(mx_rules, mx_slots):
                            self._settle(group, results, Outcome(SKIPPED, "4.4.5 mail exchanger throttled",
                                                                 retry_at=self.clock() + self.settings.throttle_delay))
                            return
                        connected, reply, temporary = await self._session(
                            group, host, port, route, rules + mx_rules, results
                        )
                    finally:
                        await self._release(mx_slots)
                    last = reply
                    if connected:
                        break
                else:
                    temporary = True
            if temporary:
                until = await self.queue.back_off(group.domain, self.clock(), self.settings.backoff_min,
                                                  self.settings.backoff_max)
                self._settle(group, results, Outcome(DEFERRED, last, retry_at=until))
            else:
                self._settle(group, results, Outcome(DEFERRED, last))
        finally:
            if slots:
                # Freed in the background: the batch's results need not wait
                # for it (stop() frees whatever is still held).
                task = asyncio.create_task(self._release(list(slots)), name="outbound-slot-release")
                self._releases.add(task)
                task.add_done_callback(self._releases.discard)

    async def _acquire(self, rules: Sequence[ThrottleRule], held: list[tuple[str, int]]) -> bool:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.slot_wait
        for rule in rules:
            if rule.max_connections <= 0:
                continue
            delay = 0.05
            while True:
                # If this node holds every slot of the rule, counting the
                # takes and releases it has under way, the store would refuse:
                # wait for one of ours instead of a transaction to learn that.
                mine = sum(1 for name, _ in self._slots if name == rule.name) + self._trying[rule.name]
                n = None
                if mine < rule.max_connections:
                    self._trying[rule.name] += 1
                    try:
                        n = await self.queue.acquire_slot(rule.name, rule.max_connections, self.owner, self.clock(),
                                                          self.settings.lease_seconds)
                    finally:
                        self._trying[rule.name] -= 1
                if n is not None:
                    held.append((rule.name, n))
                    self._slots.add((rule.name, n))
                    break
                if loop.time() >= deadline or self._stopping:
                    await self._release(held)
                    return False
                # A slot freed on this node wakes us at once; one freed on
                # another node is found by the next try.
                self._slot_freed.clear()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._slot_freed.wait(), delay)
                delay = min(delay * 2, 0.5)
        return True

    async def _release(self, held: list[tuple[str, int]]) -> None:
        for rule, n in held:
            self._slots.discard((rule, n))
            # Still counted as ours until the store has it free (see _acquire).
            self._trying[rule] += 1
            try:
                await self.queue.release_slot(rule, n, self.owner)
            except Exception:
                log.exception("throttle slot release failed")  # it expires on its own
            finally:
                self._trying[rule] -= 1
        if held:
            # Only now that the store has the slots free: a waiter woken
            # earlier would find them still taken and back off for longer.
            self._slot_freed.set()
        held.clear()

    async def _session(
        self, group: _Group, host: str, port: int, route: Route | None, rules: Sequence[ThrottleRule], results: Results
    ) -> tuple[bool, str, bool]:
        """Deliver the group over one connection to ``host``.

        Returns ``(connected, reply, temporary)``: ``connected`` false means
        try the next host (``reply`` says why); ``temporary`` means the
        destination answered 4xx or failed and should be backed off.
        """
        mode = route.tls if route is not None else "opportunistic"
        verify = (route.verify if route is not None and route.verify is not None else self.settings.tls_verify)
        opened, reply, temporary = await self._open(host, port, mode, verify, route)
        if opened is None:
            return False, reply, temporary
        client = opened
        try:
            temporary = False
            delivered = False
            # The hourly budget is reserved once for the whole group, not
            # one store transaction per message.
            allowed, next_window = await self._take_hourly(rules, len(group.items))
            bodies = await self.queue.read_bodies([msg for msg, _ in group.items[:allowed]])
            for n, (msg, idxs) in enumerate(group.items):
                if not client.is_connected:
                    break
                if n >= allowed:
                    self._settle(_Group(group.domain, route, [(msg, idxs)]), results,
                                 Outcome(SKIPPED, "4.4.5 destination hourly limit reached", retry_at=next_window))
                    continue
                try:
                    sent, temp = await self._send(client, host, msg, idxs, results, bodies.pop(msg.id, None))
                    delivered |= sent
                    temporary |= temp
                except (aiosmtplib.SMTPException, OSError, asyncio.TimeoutError) as exc:
                    reply = f"451 4.4.2 Connection to {host} lost: {_why(exc)}"
                    for i in idxs:
                        results.setdefault((msg.id, i), Outcome(DEFERRED, reply, host))
                    temporary = True
                    break
            if client.is_connected:
                with contextlib.suppress(aiosmtplib.SMTPException, OSError, asyncio.TimeoutError):
                    await client.quit(timeout=10)
            if delivered and not temporary:
                await self.queue.clear_backoff(group.domain)
            return True, f"451 4.4.2 Connection to {host} closed early", temporary
        finally:
            client.close()

    async def _open(
        self, host: str, port: int, mode: str, verify: bool, route: Route | None
    ) -> tuple[aiosmtplib.SMTP | None, str, bool]:
        """Connect to ``host`` and say hello (STARTTLS and AUTH as ``mode``
        and ``route`` ask). Returns the client, or ``None``, the reply that
        says why, and whether that is temporary (back off).

        Opportunistic TLS whose handshake fails gives way to plaintext on a
        new connection, as Postfix's ``may`` level does (RFC 7435 §3): that is
        remembered nowhere, so the next connection tries TLS again.
        """
        starttls = mode in ("opportunistic", "required")
        while True:
            client = aiosmtplib.SMTP(
                hostname=host,
                port=port,
                local_hostname=self.settings.hostname,
                timeout=self.settings.connect_timeout,
                use_tls=mode == "implicit",
                start_tls=False,
                validate_certs=verify,
                tls_context=self._tls[verify],
            )
            try:
                await client.connect()
            except aiosmtplib.SMTPResponseException as exc:
                client.close()
                return None, reply_text(exc.code, exc.message), True
            except (aiosmtplib.SMTPException, OSError, asyncio.TimeoutError) as exc:
                client.close()
                return None, f"451 4.4.1 Connection to {host} failed: {_why(exc)}", True
            client.timeout = self.settings.command_timeout
            try:
                await self._hello(client, host, mode, verify, route, starttls)
                return client, "", False
            except _TlsFailed as exc:
                client.close()
                if mode != "opportunistic" or not starttls:
                    return None, f"454 4.7.5 TLS with {host} failed: {exc}", True
                log.warning("STARTTLS failed, delivering in plaintext", extra={"host": host, "reason": str(exc)})
                starttls = False
            except aiosmtplib.SMTPResponseException as exc:
                client.close()
                # A refused EHLO/AUTH is the host's, not the recipient's.
                return None, reply_text(exc.code, exc.message), exc.code < 500 or route is not None
            except (aiosmtplib.SMTPException, OSError, asyncio.TimeoutError, ssl.SSLError) as exc:
                client.close()
                return None, f"451 4.4.2 Session with {host} failed: {_why(exc)}", True

    async def _hello(
        self, client: aiosmtplib.SMTP, host: str, mode: str, verify: bool, route: Route | None, starttls: bool = True
    ) -> None:
        """EHLO, STARTTLS unless ``starttls`` is false (plaintext after a
        failed handshake), AUTH; raises :class:`_TlsFailed` when STARTTLS does."""
        try:
            await client.ehlo()
        except aiosmtplib.SMTPHeloError:
            await client.helo()
        secure = mode == "implicit"
        if mode in ("opportunistic", "required") and client.supports_extension("starttls"):
            if starttls:
                try:
                    await client.starttls(server_hostname=host, validate_certs=verify, tls_context=self._tls[verify])
                    await client.ehlo()
                except (aiosmtplib.SMTPException, OSError, asyncio.TimeoutError, ssl.SSLError) as exc:
                    raise _TlsFailed(_why(exc)) from exc
                secure = True
        elif mode == "required":
            raise aiosmtplib.SMTPResponseException(454, "4.7.10 TLS required but not offered by " + host)
        if route is not None and route.username:
            if not secure and mode != "none":
                # Credentials never go in cleartext unless the route says so
                # (tls = "none"), loopback or not: a deferral, not a leak.
                raise aiosmtplib.SMTPResponseException(
                    454, f"4.7.0 Not sending credentials to {host} without TLS (STARTTLS not available)"
                )
            # One mechanism, one try: a wrong password must not count twice
            # against the smarthost's failed-login limit.
            if "plain" in client.server_auth_methods or "login" not in client.server_auth_methods:
                await client.auth_plain(route.username, route.password)
            else:
                await client.auth_login(route.username, route.password)

    async def _take_hourly(self, rules: Sequence[ThrottleRule], count: int) -> tuple[int, float]:
        """How many of ``count`` messages every hourly rule allows now, and when
        the next window opens."""
        allowed, next_window = count, 0.0
        for rule in rules:
            if rule.max_per_hour > 0 and allowed > 0:
                granted, window = await self.queue.take_hourly(rule.name, rule.max_per_hour, self.clock(), allowed)
                allowed, next_window = min(allowed, granted), max(next_window, window)
        return allowed, next_window

    async def _send(
        self, client: aiosmtplib.SMTP, host: str, msg: QueuedMessage, idxs: list[int], results: Results,
        body: bytes | None = None,
    ) -> tuple[bool, bool]:
        """One message over an open connection; returns (delivered any, 4xx seen at any phase)."""
        if body is None:
            body = await self.queue.read_body(msg)
        addresses = [msg.recipients[i].address for i in idxs]
        envelope = _mail_options(client, msg, body, addresses)
        if envelope is None:
            # RFC 6531 §3.4: no SMTPUTF8 at the server, a permanent failure.
            for i in idxs:
                results[(msg.id, i)] = Outcome(FAILED, NO_SMTPUTF8, host)
            return False, False
        options, encoding = envelope
        dsn = client.supports_extension("dsn")
        try:
            await client.mail(msg.sender, options=options, encoding=encoding)
        except aiosmtplib.SMTPResponseException as exc:
            for i in idxs:
                results[(msg.id, i)] = Outcome(classify(exc.code), reply_text(exc.code, exc.message), host)
            await self._rset(client)
            return False, exc.code < 500
        accepted = []
        # A 4xx at RCPT (greylisting, 450/451/452, 421) backs the
        # destination off as a 4xx at any other phase does.
        rcpt_temp = False
        for i, address in zip(idxs, addresses):
            rcpt_options = _rcpt_options(msg.recipients[i]) if dsn else []
            try:
                await client.rcpt(address, options=rcpt_options, encoding=encoding)
                accepted.append(i)
            except aiosmtplib.SMTPRecipientRefused as exc:
                results[(msg.id, i)] = Outcome(classify(exc.code), reply_text(exc.code, exc.message), host)
                rcpt_temp |= exc.code < 500
        if not accepted:
            await self._rset(client)
            return False, rcpt_temp
        try:
            response = await client.data(body, timeout=self.settings.data_timeout)
        except aiosmtplib.SMTPDataError as exc:
            for i in accepted:
                results[(msg.id, i)] = Outcome(classify(exc.code), reply_text(exc.code, exc.message), host)
            await self._rset(client)
            return False, exc.code < 500 or rcpt_temp
        for i in accepted:
            results[(msg.id, i)] = Outcome(DELIVERED, reply_text(response.code, response.message), host, dsn_passed=dsn)
        log.info("delivered", extra={"queue_id": msg.qid, "host": host, "rcpts": len(accepted)})
        return True, rcpt_temp

    async def _rset(self, client: aiosmtplib.SMTP) -> None:
        with contextlib.suppress(aiosmtplib.SMTPException, OSError, asyncio.TimeoutError):
            await client.rset()


    # -- ``queue drain --to``: relay the whole queue --

    async def relay_all(self, host: str, port: int) -> RelayReport:
        """Relay every queued message to ``host:port`` (``queue drain --to``).

        Unlike delivery, this ignores due times, pauses, backoff and throttles
        and changes none of them: each message goes in one SMTP transaction
        with all its open recipients (local ones too, as addressed), envelope
        intact, and is removed only once the target answered 250 to its data.
        If the target refuses any part of it, nothing of it is sent and it
        stays queued as it was (no attempt counted, no bounce).
        """
        await self._ensure_tls()
        report = RelayReport()
        renew = asyncio.create_task(self._renew_loop(), name="outbound-relay-renew")
        client: aiosmtplib.SMTP | None = None
        after: int | None = None
        try:
            while True:
                qid, msg = await self.queue.claim_next(self.owner, after, self.clock(), self.settings.lease_seconds)
                if qid is None:
                    break
                after = qid
                if msg is None:
                    report.left[format_id(qid)] = "held by a node delivering it"
                    continue
                self._held[qid] = msg
                try:
                    if client is None or not client.is_connected:
                        if client is not None:
                            client.close()
                        client, reply = await self._relay_connect(host, port)
                        if client is None:
                            report.left[msg.qid] = reply
                            await self.queue.release(qid, self.owner, self.clock(), msg.next_attempt)
                            break
                    why = await self._relay_one(client, host, msg)
                    if why is None:
                        # Finished rather than deleted: a recipient appended
                        # meanwhile (Queue.add_recipients) stays queued.
                        now = self.clock()
                        for r in msg.open_recipients:
                            r.status, r.reply, r.remote, r.updated = DELIVERED, f"relayed to {host}", host, now
                        if await self.queue.finish(msg, self.owner):
                            report.relayed += 1
                            log.info("relayed", extra={"queue_id": msg.qid, "host": host})
                            continue
                    report.left[msg.qid] = why or "lease lost"
                    # Back where it was: due when it was due before.
                    await self.queue.release(qid, self.owner, self.clock(), msg.next_attempt)
                except BaseException:
                    # A store or network error mid-message: give the lease
                    # back now rather than leave it to run out.
                    with contextlib.suppress(Exception):
                        await self.queue.release(qid, self.owner, self.clock(), msg.next_attempt)
                    raise
                finally:
                    self._held.pop(qid, None)
            # What the loop did not reach (it stops at a connection failure).
            for left in await self.queue.list_messages():
                report.left.setdefault(left.qid, "not tried")
        finally:
            renew.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await renew
            if client is not None:
                if client.is_connected:
                    with contextlib.suppress(aiosmtplib.SMTPException, OSError, asyncio.TimeoutError):
                        await client.quit(timeout=10)
                client.close()
        return report

    async def _relay_connect(self, host: str, port: int) -> tuple[aiosmtplib.SMTP | None, str]:
        client, reply, _ = await self._open(host, port, "opportunistic", self.settings.tls_verify, None)
        return client, reply

    async def _relay_one(self, client: aiosmtplib.SMTP, host: str, msg: QueuedMessage) -> str | None:
        """One message in one transaction; ``None`` once the target took it,
        else why not (the transaction is reset, the connection kept if it can be)."""
        rcpts = msg.open_recipients
        if not rcpts:
            return None  # nothing left to send: done
        try:
            body = await self.queue.read_body(msg)
            envelope = _mail_options(client, msg, body, [r.address for r in rcpts])
            if envelope is None:
                return NO_SMTPUTF8
            options, encoding = envelope
            dsn = client.supports_extension("dsn")
            try:
                await client.mail(msg.sender, options=options, encoding=encoding)
            except aiosmtplib.SMTPResponseException as exc:
                await self._rset(client)
                return reply_text(exc.code, exc.message)
            refused = []
            for r in rcpts:
                try:
                    await client.rcpt(r.address, options=_rcpt_options(r) if dsn else [], encoding=encoding)
                except aiosmtplib.SMTPRecipientRefused as exc:
                    refused.append(f"<{r.address}>: {reply_text(exc.code, exc.message)}")
            if refused:
                # All or nothing: the message keeps its whole envelope.
                await self._rset(client)
                return "; ".join(refused)
            try:
                await client.data(body, timeout=self.settings.data_timeout)
            except aiosmtplib.SMTPDataError as exc:
                await self._rset(client)
                return reply_text(exc.code, exc.message)
            return None
        except (aiosmtplib.SMTPException, OSError, asyncio.TimeoutError) as exc:
            client.close()
            return f"451 4.4.2 Connection to {host} lost: {_why(exc)}"


class _TlsFailed(Exception):
    """STARTTLS was offered but the handshake (or the EHLO after it) failed."""


@dataclass(slots=True)
class RelayReport:
    """What ``queue drain --to`` did: messages relayed, and the ones that
    stay queued (queue id to the reason)."""

    relayed: int = 0
    left: dict[str, str] = field(default_factory=dict)


NO_SMTPUTF8 = "553 5.6.7 Destination does not support SMTPUTF8"


def _mail_options(
    client: aiosmtplib.SMTP, msg: QueuedMessage, body: bytes, addresses: Sequence[str]
) -> tuple[list[str], str] | None:
    """MAIL parameters and address encoding for ``msg`` at this server;
    ``None`` when it needs SMTPUTF8 and the server lacks it."""
    options = []
    if client.supports_extension("size"):
        options.append(f"SIZE={len(body)}")
    if client.supports_extension("8bitmime") and not body.isascii():
        options.append("BODY=8BITMIME")
    # RFC 3461 §5.2: parameters go on to a server that supports DSN.
    if client.supports_extension("dsn"):
        if msg.ret:
            options.append(f"RET={msg.ret}")
        if msg.envid:
            options.append(f"ENVID={encode_xtext(msg.envid)}")
    if msg.smtputf8 or not (msg.sender.isascii() and all(a.isascii() for a in addresses)):
        if not client.supports_extension("smtputf8"):
            return None
        options.append("SMTPUTF8")
        return options, "utf-8"
    return options, "ascii"


def _rcpt_options(r: Recipient) -> list[str]:
    """RFC 3461 RCPT parameters (for a server that supports DSN)."""
    out = [f"NOTIFY={r.notify}"] if r.notify else []
    addr_type, _, orcpt = r.orcpt.partition(";")
    if orcpt:
        out.append(f"ORCPT={addr_type};{encode_xtext(orcpt)}")
    return out


# -- wiring and administration (``rookery queue ...``) ----------------------------------------

def from_config(config: Any) -> tuple[OutboundSettings, dict[str, Route], list[ThrottleRule]]:
    """Settings, routes and throttles from the node's config (``[queue]``,
    ``[routes]``, ``[throttle]``)."""
    from storage.queue import parse_throttles

    q = config.queue
    settings = OutboundSettings(
        hostname=config.hostname,
        retry_min=q.retry_min,
        retry_max=q.retry_max,
        lease_seconds=q.lease_seconds,
        max_connections=q.max_connections,
        poll_interval=q.poll_interval,
        connect_timeout=q.connect_timeout,
        smtp_port=q.smtp_port,
        tls_verify=q.tls_verify,
        tls_ca_file=q.tls_ca_file,
        delay_warning=q.delay_warning,
        backoff_min=q.backoff_min,
        backoff_max=q.backoff_max,
        # Metrics as fresh as the queue polls, and at least every 5 s.
        stats_interval=min(5.0, q.poll_interval),
    )
    return settings, parse_routes(config.extra.get("routes")), parse_throttles(config.extra.get("throttle"))


def with_queue_purge(purge: Callable[[], Awaitable[object]], queue: Queue) -> Callable[[], Awaitable[None]]:
    """The cluster's ``purge`` singleton work, followed by the queue's own
    (expired backoff records)."""

    async def work() -> None:
        try:
            await purge()
        finally:
            await queue.purge_backoffs()

    return work


async def flush(worker: OutboundWorker, *, retry: bool = True, rounds: int = 1000) -> int:
    """Deliver everything now (``queue flush``): make every message due, then
    run rounds until nothing is due. Returns the messages handled."""
    if retry:
        await worker.queue.retry(now=worker.clock())
    total = 0
    for _ in range(rounds):
        n = await worker.run_once()
        if not n:
            break
        total += n
    return total


async def relay_queue(
    storage: Storage, queue: Queue, settings: OutboundSettings, target: str, *, clock: Callable[[], float] = time.time
) -> RelayReport:
    """``queue drain --to HOST:PORT``: relay every queued message to ``target``
    (see :meth:`OutboundWorker.relay_all`)."""
    host, port = parse_hostport(target)
    return await OutboundWorker(storage, queue, settings, clock=clock, node_id="drain").relay_all(host, port)


def _when(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


def format_list(msgs: Sequence[QueuedMessage]) -> str:
    """``rookery queue list``: one line per message, then its open recipients."""
    lines = []
    for m in msgs:
        state = "held" if m.lease_owner and m.lease_expires > time.time() else "queued"
        lines.append(
            f"{m.qid}  {m.size:>9}  {_when(m.created)}  next {_when(m.next_attempt)}  "
            f"tries {m.attempts}  {state}  <{m.sender}>"
        )
        for r in m.open_recipients:
            lines.append(f"    {r.status:<9} {r.address}" + (f"  ({r.reply})" if r.reply else ""))
    lines.append(f"-- {len(msgs)} message(s)")
    return "\n".join(lines)


def format_message(m: QueuedMessage) -> str:
    """``rookery queue show ID``."""
    lines = [
        f"id:        {m.qid}",
        f"sender:    <{m.sender}>" + ("  (DSN)" if m.dsn else ""),
        f"size:      {m.size}",
        f"created:   {_when(m.created)}",
        f"next:      {_when(m.next_attempt)}",
        f"expires:   {_when(m.expires)}",
        f"attempts:  {m.attempts}" + ("  (sender warned of the delay)" if m.warned else ""),
    ]
    if m.lease_owner:
        lines.append(f"lease:     {m.lease_owner} until {_when(m.lease_expires)}")
    if m.ret or m.envid:
        lines.append(f"dsn:       ret {m.ret or '-'}  envid {m.envid or '-'}")
    lines.append("recipients:")
    for r in m.recipients:
        where = " (local)" if r.local is not None else ""
        notify = f"  notify {r.notify}" if r.notify else ""
        orcpt = f"  orcpt {r.orcpt}" if r.orcpt else ""
        lines.append(f"  {r.status:<9} {r.address}{where}  tries {r.attempts}{notify}{orcpt}")
        if r.reply:
            lines.append(f"            {r.remote + ': ' if r.remote else ''}{r.reply}")
    return "\n".join(lines)


__all__ = [
    "DnsError", "DnsResolver", "MxResolver", "OutboundSettings", "OutboundWorker", "Route", "build_dsn", "flush",
    "format_list", "format_message", "from_config", "parse_routes", "relay_queue", "RelayReport", "status_of",
    "with_queue_purge",
]
