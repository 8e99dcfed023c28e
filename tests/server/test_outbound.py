"""The delivery worker against a sink SMTP server in the test loop, reached
through [routes] (or a fake MX resolver pointing at it)."""

from __future__ import annotations

import asyncio
import contextlib
import email
import email.policy
import ssl
import time
import urllib.request
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import dkim
import dns.exception
import dns.name
import dns.resolver
import pytest
import trustme
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session
from helpers import make_account, node_config, rookery, running_node

from server import dkim as dkimmod
from server.outbound import (
    DnsError,
    DnsResolver,
    OutboundSettings,
    OutboundWorker,
    Route,
    build_dsn,
    flush,
    format_list,
    format_message,
    from_config,
    parse_routes,
    relay_queue,
    status_of,
)
from storage import Storage, keys
from storage.errors import AlreadyExists, UnknownDomain
from storage.queue import DEFERRED, DELIVERED, FAILED, Queue, ThrottleRule

NOW = time.time()


def body(sender: str = "alice@example.org", to: str = "x@remote.test", subject: str = "Hello",
         mid: str = "m1") -> bytes:
    return (
        f"From: Alice <{sender}>\r\nTo: <{to}>\r\nSubject: {subject}\r\nMessage-ID: <{mid}@example.org>\r\n"
        f"Date: Mon, 1 Jan 2024 00:00:00 +0000\r\n\r\nHello there\r\n.dot line\r\n"
    ).encode()


class Clock:
    def __init__(self, now: float = NOW) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


# -- the sink ------------------------------------------------------------------------------

class Sink:
    """Scripted receiving MTA: ``temp*`` recipients get 451, ``perm*`` 550."""

    def __init__(self) -> None:
        self.messages: list[SimpleNamespace] = []
        self.connections = 0
        self.active = 0
        self.max_active = 0
        self.accept_temp = False
        self.mail_reply: str | None = None
        self.data_delay = 0.0
        self.rcpt_delay = 0.0
        self.logins: list[bytes] = []

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        if self.rcpt_delay:
            await asyncio.sleep(self.rcpt_delay)
        local = address.partition("@")[0]
        if local.startswith("temp") and not self.accept_temp:
            return "451 4.2.1 Mailbox busy, try later"
        if local.startswith("perm"):
            return "550 5.1.1 No such user here"
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_MAIL(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        if self.mail_reply:
            return self.mail_reply
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return "250 2.1.0 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        if self.data_delay:
            await asyncio.sleep(self.data_delay)
        self.messages.append(
            SimpleNamespace(
                sender=envelope.mail_from, rcpts=list(envelope.rcpt_tos), data=envelope.original_content,
                tls=session.ssl is not None, options=list(envelope.mail_options),
            )
        )
        return "250 2.0.0 Stored"

    def authenticate(self, server: SMTP, session: Session, envelope: Envelope, mechanism: str, data: Any) -> AuthResult:
        assert isinstance(data, LoginPassword)
        self.logins.append(data.login)
        ok = (data.login, data.password) == (b"relay", b"pw")
        return AuthResult(success=ok, handled=False)

    def data_of(self) -> list[bytes]:
        return [m.data for m in self.messages]


class SinkSMTP(SMTP):
    sink: Sink

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self._original_transport is None:  # not the STARTTLS re-entry
            self.sink.connections += 1
            self.sink.active += 1
            self.sink.max_active = max(self.sink.max_active, self.sink.active)
        super().connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.sink.active -= 1
        super().connection_lost(exc)


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@contextlib.asynccontextmanager
async def sink_server(
    ca: trustme.CA, *, auth: bool = False, sink: Sink | None = None, protocol: type[SinkSMTP] | None = None,
    starttls: bool = True,
) -> AsyncIterator[tuple[Any, int]]:
    """The sink on a loopback port, with STARTTLS (unless told not to) and
    AUTH if asked; ``sink`` and ``protocol`` swap in a sink of another kind."""
    sink = Sink() if sink is None else sink
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost", "127.0.0.1").configure_cert(ctx)

    def factory() -> SMTP:
        proto = (protocol or SinkSMTP)(
            sink, hostname="sink.test", tls_context=ctx if starttls else None, decode_data=False, enable_SMTPUTF8=True,
            authenticator=sink.authenticate if auth else None, auth_required=auth and starttls,
            auth_require_tls=starttls,
        )
        proto.sink = sink
        return proto

    server = await asyncio.get_running_loop().create_server(factory, "127.0.0.1", 0)
    try:
        yield sink, server.sockets[0].getsockname()[1]
    finally:
        server.close()
        await server.wait_closed()


@pytest.fixture
async def sink(ca: trustme.CA) -> AsyncIterator[tuple[Sink, int]]:
    async with sink_server(ca) as pair:
        yield pair


@pytest.fixture
async def env(storage: Storage) -> SimpleNamespace:
    alice = await make_account(storage, "alice@example.org")
    return SimpleNamespace(storage=storage, queue=Queue(storage.db, lifetime=5 * 86400), alice=alice, clock=Clock())


def worker(storage: Storage, queue: Queue, port: int, clock: Callable[[], float] = time.time, *,
           routes: dict[str, Route] | None = None, throttles: tuple[ThrottleRule, ...] = (), resolver: Any = None,
           **settings: Any) -> OutboundWorker:
    options: dict[str, Any] = {"hostname": "mx.test", "lease_seconds": 30.0, "poll_interval": 0.5, "slot_wait": 10.0}
    options.update(settings)
    return OutboundWorker(
        storage, queue, OutboundSettings(**options),
        routes={"*": Route("127.0.0.1", port)} if routes is None else routes,
        throttles=throttles, resolver=resolver, clock=clock,
    )


async def inbox(storage: Storage, acct: int) -> list[bytes]:
    return [await storage.mail.read_blob(em.digest) for _, em in await storage.mail.list_messages(acct, "INBOX") if em]


def parse_dsn(raw: bytes) -> tuple[email.message.Message, list[email.message.Message], str]:
    """(the report, its per-recipient blocks, the returned headers)."""
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"
    parts = list(msg.iter_parts())
    assert [p.get_content_type() for p in parts] == ["text/plain", "message/delivery-status", "text/rfc822-headers"]
    blocks = parts[1].get_payload()
    assert isinstance(blocks, list) and blocks[0]["Reporting-MTA"] == "dns; mx.test"
    return msg, blocks[1:], parts[2].get_content()


async def wait_for(predicate: Callable[[], Any], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.05)


# -- tests ----------------------------------------------------------------------------------

async def test_delivers_over_starttls_on_one_connection(env: SimpleNamespace, sink: tuple[Sink, int]) -> None:
    box, port = sink
    msgs = [await env.queue.enqueue("alice@example.org", [f"x{i}@remote.test"], body(mid=f"m{i}")) for i in range(3)]
    w = worker(env.storage, env.queue, port)
    assert await w.run_once() == 3
    assert box.connections == 1  # one connection for the three messages
    assert sorted(m.rcpts[0] for m in box.messages) == ["x0@remote.test", "x1@remote.test", "x2@remote.test"]
    assert all(m.tls for m in box.messages)  # opportunistic STARTTLS, unverified
    assert all(any(o.startswith("SIZE=") for o in m.options) for m in box.messages)
    assert box.messages[0].data.endswith(b"Hello there\r\n.dot line\r\n")  # dot-stuffing undone by the sink
    assert await env.queue.list_messages() == []
    for m in msgs:
        assert not await env.storage.db.read(lambda tr, d=m.digest: tr.get_range(*keys.blob_refs(d)))
    assert await w.run_once() == 0


async def test_per_recipient_results_retry_schedule_and_dsn(env: SimpleNamespace, sink: tuple[Sink, int]) -> None:
    box, port = sink
    clock = env.clock
    rcpts = ["ok@remote.test", "temp@remote.test", "perm@remote.test"]
    msg = await env.queue.enqueue("alice@example.org", rcpts, body(subject="Quarterly"), now=clock())
    w = worker(env.storage, env.queue, port, clock)
    assert await w.run_once() == 1
    assert [m.rcpts for m in box.messages] == [["ok@remote.test"]]
    shown = await env.queue.show(msg.id)
    assert [r.status for r in shown.recipients] == [DELIVERED, DEFERRED, FAILED]
    assert shown.recipients[1].reply.startswith("451 4.2.1") and shown.recipients[2].reply.startswith("550 5.1.1")
    assert shown.recipients[1].remote == "127.0.0.1"
    assert shown.attempts == 1 and shown.next_attempt == pytest.approx(clock() + 300)
    text = format_message(shown)
    assert "temp@remote.test" in text and "451 4.2.1" in text
    assert "perm@remote.test" not in format_list([shown])  # only open recipients are listed

    # The permanent failure bounced at once: the DSN reaches alice's INBOX.
    assert await w.run_once() == 1
    [dsn] = await inbox(env.storage, env.alice)
    assert dsn.startswith(b"Return-Path: <>\r\n")
    report, blocks, headers = parse_dsn(dsn)
    assert report["To"] == "alice@example.org" and report["Auto-Submitted"] == "auto-replied"
    [block] = blocks
    assert block["Final-Recipient"] == "rfc822; perm@remote.test"
    assert block["Action"] == "failed" and block["Status"] == "5.1.1"
    assert block["Remote-MTA"] == "dns; 127.0.0.1"
    assert block["Diagnostic-Code"].startswith("smtp; 550 5.1.1")
    assert "Subject: Quarterly" in headers and "Hello there" not in headers

    # The deferred recipient is retried on schedule, not before.
    clock.advance(299)
    assert await w.run_once() == 0
    clock.advance(1)
    box.accept_temp = True
    assert await w.run_once() == 1
    assert [m.rcpts for m in box.messages] == [["ok@remote.test"], ["temp@remote.test"]]
    assert await env.queue.list_messages() == []
    assert len(await inbox(env.storage, env.alice)) == 1  # no second DSN


async def test_retry_schedule_doubles(env: SimpleNamespace, sink: tuple[Sink, int]) -> None:
    _, port = sink
    clock = env.clock
    msg = await env.queue.enqueue("alice@example.org", ["temp@remote.test"], body(), now=clock())
    w = worker(env.storage, env.queue, port, clock, retry_min=100, retry_max=350)
    delays = []
    for _ in range(4):
        before = clock()
        assert await w.run_once() == 1
        shown = await env.queue.show(msg.id)
        delays.append(round(shown.next_attempt - before))
        clock.now = shown.next_attempt
    assert delays == [100, 200, 350, 350]


async def test_expiry_bounces_with_5_4_7(env: SimpleNamespace, sink: tuple[Sink, int]) -> None:
    _, port = sink
    clock = env.clock
    queue = Queue(env.storage.db, lifetime=1000)
    await queue.enqueue("alice@example.org", ["temp@remote.test"], body(), now=clock())
    w = worker(env.storage, queue, port, clock)
    assert await w.run_once() == 1
    clock.advance(1000)
    assert await w.run_once() == 1  # last try, then given up
    assert await w.run_once() == 1  # the DSN, delivered locally
    assert await queue.list_messages() == []
    [dsn] = await inbox(env.storage, env.alice)
    _, [block], _ = parse_dsn(dsn)
    assert block["Action"] == "failed" and block["Status"] == "5.4.7"
    assert "451 4.2.1" in block["Diagnostic-Code"]


async def test_null_sender_never_bounces_and_remote_sender_gets_queued_dsn(env: SimpleNamespace,
                                                                            sink: tuple[Sink, int]) -> None:
    box, port = sink
    w = worker(env.storage, env.queue, port, env.clock)
    await env.queue.enqueue("", ["perm@remote.test"], body(), now=env.clock())
    assert await w.run_once() == 1
    assert await env.queue.list_messages() == []

    await env.queue.enqueue("carol@remote.test", ["perm@remote.test"], body("carol@remote.test"), now=env.clock())
    assert await w.run_once() == 1
    [dsn] = await env.queue.list_messages()
    assert dsn.dsn and dsn.sender == "" and [r.address for r in dsn.recipients] == ["carol@remote.test"]
    assert await w.run_once() == 1
    [sent] = box.messages
    assert sent.sender in ("", "<>") and sent.rcpts == ["carol@remote.test"]
    parse_dsn(sent.data)
    assert await inbox(env.storage, env.alice) == []


class FakeDns:
    def __init__(self, answers: dict[tuple[str, str], Any]) -> None:
        self.answers = answers

    async def resolve(self, name: str, rdtype: str, lifetime: float = 0) -> Any:
        answer = self.answers.get((name, rdtype), dns.resolver.NoAnswer())
        if isinstance(answer, Exception):
            raise answer
        return answer


def mx(preference: int, host: str) -> SimpleNamespace:
    return SimpleNamespace(preference=preference, exchange=dns.name.from_text(host))


async def test_mx_resolution_rules() -> None:
    resolver = DnsResolver(FakeDns({
        ("a.test", "MX"): [mx(20, "mx3.a.test."), mx(10, "MX2.a.test."), mx(5, "mx1.a.test.")],
        ("null.test", "MX"): [mx(0, ".")],
        ("gone.test", "MX"): dns.resolver.NXDOMAIN(),
        ("implicit.test", "A"): ["192.0.2.1"],
        ("slow.test", "MX"): dns.exception.Timeout(),
    }))
    assert await resolver.resolve_mx("a.test") == ["mx1.a.test", "mx2.a.test", "mx3.a.test"]
    assert await resolver.resolve_mx("implicit.test") == ["implicit.test"]  # RFC 5321 §5.1
    for domain, permanent, code in (("null.test", True, "5.1.10"), ("gone.test", True, "5.1.2"),
                                    ("nothing.test", True, "5.1.2"), ("slow.test", False, "4.4.3")):
        with pytest.raises(DnsError) as exc:
            await resolver.resolve_mx(domain)
        assert exc.value.permanent is permanent and code in exc.value.reply


async def test_worker_follows_mx_and_bounces_null_mx(env: SimpleNamespace, sink: tuple[Sink, int]) -> None:
    box, port = sink
    resolver = DnsResolver(FakeDns({("good.test", "MX"): [mx(10, "localhost.")], ("null.test", "MX"): [mx(0, ".")]}))
    w = worker(env.storage, env.queue, port, env.clock, routes={}, resolver=resolver, smtp_port=port)
    await env.queue.enqueue("alice@example.org", ["a@good.test", "b@null.test"], body(), now=env.clock())
    assert await w.run_once() == 1
    assert [m.rcpts for m in box.messages] == [["a@good.test"]]
    assert await w.run_once() == 1
    [dsn] = await inbox(env.storage, env.alice)
    _, [block], _ = parse_dsn(dsn)
    assert block["Final-Recipient"] == "rfc822; b@null.test" and block["Status"] == "5.1.10"
    assert "Remote-MTA" not in block


async def test_dkim_signature_verifies_at_the_sink(env: SimpleNamespace, sink: tuple[Sink, int]) -> None:
    box, port = sink
    record = await dkimmod.generate(env.queue, "example.org", "s1", bits=1024)
    assert record.startswith("s1._domainkey.example.org. IN TXT")
    assert await dkimmod.show(env.queue, "example.org") == record
    with pytest.raises(AlreadyExists):
        await dkimmod.generate(env.queue, "example.org")
    with pytest.raises(UnknownDomain):
        await dkimmod.generate(env.queue, "remote.test")
    txt = "".join(part.strip('"') for part in record.split("(")[1].rstrip(" )").split('" "')).strip('" ')
    signed = await dkimmod.DkimSigner(env.queue).sign(body())
    assert signed.startswith(b"DKIM-Signature: ")
    assert await dkimmod.DkimSigner(env.queue).sign(body("carol@remote.test")) == body("carol@remote.test")
    await env.queue.enqueue("alice@example.org", ["x@remote.test"], b"Received: by mx.test\r\n" + signed)
    assert await worker(env.storage, env.queue, port).run_once() == 1
    [received] = box.data_of()

    def dnsfunc(name: bytes, timeout: int = 5) -> bytes:
        assert name == b"s1._domainkey.example.org."
        return txt.encode()

    assert dkim.verify(received, dnsfunc=dnsfunc, minkey=1024)
    assert not dkim.verify(received.replace(b"Hello there", b"Hello thar"), dnsfunc=dnsfunc, minkey=1024)


async def test_two_workers_never_deliver_twice_and_take_over_dead_leases(tmp_path: Path, ca: trustme.CA) -> None:
    one = Storage.open("embedded", data_dir=tmp_path / "store")
    two = Storage.open("embedded", data_dir=tmp_path / "store")
    q1, q2 = Queue(one.db), Queue(two.db)
    async with sink_server(ca) as (box, port):
        box.data_delay = 0.01
        workers = [worker(one, q1, port, lease_seconds=2.0, poll_interval=0.1, batch=3, max_inflight=3),
                   worker(two, q2, port, lease_seconds=2.0, poll_interval=0.1, batch=3, max_inflight=3)]
        claimed = count_claims(workers)
        try:
            for w in workers:
                await w.start()
            for i in range(12):
                await q1.enqueue("alice@example.org", [f"r{i}@d{i % 3}.test"], body(mid=f"two{i}"))
            for w in workers:
                w.refresh()
            await wait_for(lambda: len(box.messages) >= 12)
            await wait_for(_empty(q2))
            ids = sorted(m.data.split(b"Message-ID: <")[1].split(b"@")[0] for m in box.messages)
            assert ids == sorted(f"two{i}".encode() for i in range(12))  # each exactly once
            assert all(claimed) and sum(claimed) == 12  # both nodes worked

            # A node takes three messages and dies without a word: once its
            # leases expire, the live workers deliver them, once. The
            # messages fall due half a second from now and the dead node
            # claims them as of then, so the live workers, polling every
            # 0.1 s, cannot take one first.
            due = time.time() + 0.5
            for i in range(3):
                await q1.enqueue("alice@example.org", [f"z{i}@dead.test"], body(mid=f"dead{i}"), now=due)
            dead = await q1.claim("dead-node", due, 10, 1.0)
            assert len(dead) == 3
            await wait_for(lambda: len(box.messages) >= 15, timeout=8)
            await wait_for(_empty(q2))
            assert len(box.messages) == 15
            assert sum(m.rcpts[0].endswith("@dead.test") for m in box.messages) == 3
        finally:
            for w in workers:
                w.stop_accepting()
            for w in workers:
                await w.drain(1.0)
            await one.close()
            await two.close()


def count_claims(workers: list[OutboundWorker]) -> list[int]:
    """How many messages each worker claimed (wraps its queue's claim)."""
    counts = [0] * len(workers)
    for n, w in enumerate(workers):
        original = w.queue.claim

        async def claim(*args: Any, _n: int = n, _original: Any = original) -> Any:
            got = await _original(*args)
            counts[_n] += len(got)
            return got

        w.queue.claim = claim  # type: ignore[method-assign]
    return counts


def _empty(queue: Queue) -> Callable[[], Any]:
    async def check() -> bool:
        return await queue.list_messages() == []

    return check


async def test_throttle_holds_across_two_workers(tmp_path: Path, ca: trustme.CA) -> None:
    one = Storage.open("embedded", data_dir=tmp_path / "store")
    two = Storage.open("embedded", data_dir=tmp_path / "store")
    q1, q2 = Queue(one.db), Queue(two.db)
    rule = ThrottleRule("*.test", "domain", max_connections=2)
    async with sink_server(ca) as (box, port):
        box.data_delay = 0.15
        workers = [worker(one, q1, port, throttles=(rule,), poll_interval=0.1, batch=2, max_inflight=4),
                   worker(two, q2, port, throttles=(rule,), poll_interval=0.1, batch=2, max_inflight=4)]
        claimed = count_claims(workers)
        try:
            for i in range(8):
                await q1.enqueue("alice@example.org", [f"x@d{i}.test"], body(mid=f"t{i}"))
            for w in workers:
                await w.start()
            await wait_for(lambda: len(box.messages) >= 8, timeout=20)
            assert box.connections == 8  # one per destination domain
            assert box.max_active == 2
            assert all(claimed)  # both nodes held messages: the limit is cluster-wide
            await wait_for(_empty(q1))
            # Every slot is given back.
            assert not await one.db.read(lambda tr: tr.get_range(*keys.queue_slots(rule.name)))
        finally:
            for w in workers:
                w.stop_accepting()
            for w in workers:
                await w.drain(1.0)
            await one.close()
            await two.close()


async def test_a_worker_holding_every_slot_waits_without_asking_the_store(tmp_path: Path, ca: trustme.CA) -> None:
    """Batches of one node queued behind its own connections learn nothing
    from a slot transaction that must fail: they wait for a local release."""
    store = Storage.open("embedded", data_dir=tmp_path / "store")
    q = Queue(store.db)
    rule = ThrottleRule("*.test", "domain", max_connections=1)
    async with sink_server(ca) as (box, port):
        box.data_delay = 0.1
        w = worker(store, q, port, throttles=(rule,), poll_interval=0.1, batch=1, max_inflight=6)
        answers: list[int | None] = []
        original = q.acquire_slot

        async def acquire_slot(*args: Any, **kwargs: Any) -> int | None:
            got = await original(*args, **kwargs)
            answers.append(got)
            return got

        q.acquire_slot = acquire_slot  # type: ignore[method-assign]
        try:
            for i in range(6):
                await q.enqueue("alice@example.org", [f"x@d{i}.test"], body(mid=f"s{i}"))
            await w.start()
            await wait_for(lambda: len(box.messages) >= 6, timeout=20)
            await wait_for(_empty(q))
            assert box.max_active == 1  # the limit held
            assert len(answers) == 6 and None not in answers  # one transaction per slot taken, none refused
            assert not await store.db.read(lambda tr: tr.get_range(*keys.queue_slots(rule.name)))
        finally:
            w.stop_accepting()
            await w.drain(1.0)
            await store.close()


async def test_hourly_throttle_defers_without_an_attempt(env: SimpleNamespace, sink: tuple[Sink, int]) -> None:
    box, port = sink
    rule = ThrottleRule("remote.test", "domain", max_per_hour=1)
    w = worker(env.storage, env.queue, port, env.clock, throttles=(rule,))
    a = await env.queue.enqueue("alice@example.org", ["a@remote.test"], body(), now=env.clock())
    b = await env.queue.enqueue("alice@example.org", ["b@remote.test"], body(), now=env.clock())
    assert await w.run_once() == 2
    assert len(box.messages) == 1
    [left] = await env.queue.list_messages()
    assert left.id in (a.id, b.id) and left.attempts == 0
    assert left.next_attempt == (env.clock() // 3600 + 1) * 3600


async def test_paused_domain_waits_until_resumed(env: SimpleNamespace, sink: tuple[Sink, int]) -> None:
    box, port = sink
    w = worker(env.storage, env.queue, port, env.clock)
    await env.queue.pause("remote.test")
    await env.queue.enqueue("alice@example.org", ["x@remote.test", "y@other.test"], body(), now=env.clock())
    assert await w.run_once() == 1
    assert [m.rcpts for m in box.messages] == [["y@other.test"]]
    [left] = await env.queue.list_messages()
    assert left.attempts == 1 and [r.status for r in left.recipients] == ["pending", DELIVERED]
    assert await w.run_once() == 0  # all open recipients paused: put off
    await env.queue.resume("remote.test", now=env.clock())
    assert await w.run_once() == 1
    assert [m.rcpts for m in box.messages] == [["y@other.test"], ["x@remote.test"]]


async def test_paused_mail_still_expires_and_bounces(env: SimpleNamespace, sink: tuple[Sink, int]) -> None:
    box, port = sink
    clock = env.clock
    queue = Queue(env.storage.db, lifetime=1000)
    w = worker(env.storage, queue, port, clock)
    await queue.pause("remote.test")
    domain_paused = await queue.enqueue("alice@example.org", ["x@remote.test"], body(subject="Paused"), now=clock())
    assert await w.run_once() == 0  # put off
    clock.advance(999)
    assert await w.run_once() == 0
    # Looked at again by its expiry (kept in ms), not a full recheck later.
    assert (await queue.show(domain_paused.id)).next_attempt == pytest.approx(domain_paused.expires, abs=0.001)
    clock.advance(1)
    assert await w.run_once() == 1  # expired: taken to be bounced, not delivered
    assert await w.run_once() == 1  # the DSN, delivered locally
    assert box.messages == [] and await queue.list_messages() == []
    [dsn] = await inbox(env.storage, env.alice)
    _, [block], headers = parse_dsn(dsn)
    assert block["Final-Recipient"] == "rfc822; x@remote.test" and block["Status"] == "5.4.7"
    assert "Subject: Paused" in headers

    # The whole queue paused: the same, and the bounce waits for the resume.
    await queue.pause()
    everything = await queue.enqueue("alice@example.org", ["y@remote.test", "z@other.test"], body(), now=clock())
    assert await w.run_once() == 0
    clock.advance(1000)
    assert await w.run_once() == 1
    assert box.messages == []
    [bounce] = await queue.list_messages()
    assert bounce.dsn and bounce.id != everything.id and [r.address for r in bounce.recipients] == ["alice@example.org"]
    assert await w.run_once() == 0  # paused: the bounce waits
    assert await queue.resume(now=clock()) == 1  # due at once
    assert await w.run_once() == 1
    assert len(await inbox(env.storage, env.alice)) == 2


async def test_4xx_backs_the_destination_off(env: SimpleNamespace, sink: tuple[Sink, int]) -> None:
    box, port = sink
    box.mail_reply = "451 4.3.2 System busy"
    w = worker(env.storage, env.queue, port, env.clock, backoff_min=120)
    await env.queue.enqueue("alice@example.org", ["x@remote.test"], body(), now=env.clock())
    assert await w.run_once() == 1
    assert await env.queue.backoff_until("remote.test") == pytest.approx(env.clock() + 120)
    second = await env.queue.enqueue("alice@example.org", ["y@remote.test"], body(), now=env.clock())
    connections = box.connections
    assert await w.run_once() == 1
    assert box.connections == connections  # not even tried
    shown = await env.queue.show(second.id)
    assert shown.attempts == 0 and shown.next_attempt == pytest.approx(env.clock() + 120)
    # Once it answers again, the backoff goes.
    box.mail_reply = None
    env.clock.advance(300)
    assert await w.run_once() == 2
    assert await env.queue.backoff_until("remote.test") == 0
    assert await env.queue.list_messages() == []


async def test_4xx_at_rcpt_backs_the_destination_off_too(env: SimpleNamespace, sink: tuple[Sink, int]) -> None:
    box, port = sink
    w = worker(env.storage, env.queue, port, env.clock, backoff_min=90, backoff_max=150)
    await env.queue.enqueue("alice@example.org", ["ok@remote.test", "temp@remote.test"], body(), now=env.clock())
    assert await w.run_once() == 1
    assert [m.rcpts for m in box.messages] == [["ok@remote.test"]]
    # Greylisted at RCPT: the destination waits, though another recipient got through.
    assert await env.queue.backoff_until("remote.test") == pytest.approx(env.clock() + 90)
    connections = box.connections
    other = await env.queue.enqueue("alice@example.org", ["y@remote.test"], body(), now=env.clock())
    assert await w.run_once() == 1
    assert box.connections == connections and (await env.queue.show(other.id)).attempts == 0
    env.clock.advance(300)
    assert await w.run_once() == 2  # both due: greylisted again, so the delay doubles
    assert await env.queue.backoff_until("remote.test") == pytest.approx(env.clock() + 150)  # capped


async def test_smarthost_with_auth(env: SimpleNamespace, ca: trustme.CA) -> None:
    async with sink_server(ca, auth=True) as (box, port):
        good = {"*": Route("127.0.0.1", port, "relay", "pw")}
        bad = {"*": Route("127.0.0.1", port, "relay", "nope")}
        await env.queue.enqueue("alice@example.org", ["x@remote.test"], body(), now=env.clock())
        assert await worker(env.storage, env.queue, port, env.clock, routes=bad).run_once() == 1
        [left] = await env.queue.list_messages()
        assert left.recipients[0].status == DEFERRED and left.recipients[0].reply.startswith("535")
        env.clock.advance(3600)
        await env.queue.clear_backoff("remote.test")
        assert await worker(env.storage, env.queue, port, env.clock, routes=good).run_once() == 1
        assert [m.rcpts for m in box.messages] == [["x@remote.test"]] and box.messages[0].tls
        assert box.logins == [b"relay", b"relay"]


async def test_no_auth_over_plaintext_unless_the_route_says_tls_none(env: SimpleNamespace, ca: trustme.CA) -> None:
    async with sink_server(ca, auth=True, starttls=False) as (box, port):
        msg = await env.queue.enqueue("alice@example.org", ["x@remote.test"], body(), now=env.clock())
        opportunistic = {"*": Route("127.0.0.1", port, "relay", "pw")}
        assert await worker(env.storage, env.queue, port, env.clock, routes=opportunistic).run_once() == 1
        shown = await env.queue.show(msg.id)
        assert shown.recipients[0].status == DEFERRED
        assert shown.recipients[0].reply.startswith("454 4.7.0 Not sending credentials")
        assert box.logins == [] and box.messages == []  # the password never went out
        # tls = "none" is the explicit way to send credentials in cleartext.
        env.clock.advance(3600)
        await env.queue.clear_backoff("remote.test")
        plain = {"*": Route("127.0.0.1", port, "relay", "pw", tls="none")}
        assert await worker(env.storage, env.queue, port, env.clock, routes=plain).run_once() == 1
        assert box.logins == [b"relay"]
        assert [m.rcpts for m in box.messages] == [["x@remote.test"]] and not box.messages[0].tls
        assert await env.queue.list_messages() == []


class BrokenTlsSMTP(SinkSMTP):
    """Offers STARTTLS, says go ahead, then answers the handshake with junk."""

    async def smtp_STARTTLS(self, arg: str) -> None:
        await self.push("220 2.0.0 Ready to start TLS")
        assert self.transport is not None
        self.transport.write(b"this is not TLS\r\n" * 4)
        self.transport.close()


async def test_failed_starttls_falls_back_to_plaintext_unless_tls_is_required(
    env: SimpleNamespace, ca: trustme.CA
) -> None:
    async with sink_server(ca, protocol=BrokenTlsSMTP) as (box, port):
        msg = await env.queue.enqueue("alice@example.org", ["x@remote.test"], body(), now=env.clock())
        required = {"*": Route("127.0.0.1", port, tls="required")}
        assert await worker(env.storage, env.queue, port, env.clock, routes=required).run_once() == 1
        shown = await env.queue.show(msg.id)
        assert shown.recipients[0].status == DEFERRED and shown.recipients[0].reply.startswith("454 4.7.5")
        assert box.messages == [] and box.connections == 1
        env.clock.advance(3600)
        await env.queue.clear_backoff("remote.test")
        # Opportunistic (the default): a new connection, in plaintext.
        w = worker(env.storage, env.queue, port, env.clock)
        assert await w.run_once() == 1
        assert [m.rcpts for m in box.messages] == [["x@remote.test"]] and not box.messages[0].tls
        assert box.connections == 3
        assert await env.queue.list_messages() == []
        # Nothing was remembered: the next delivery tries STARTTLS again.
        await env.queue.enqueue("alice@example.org", ["y@remote.test"], body(), now=env.clock())
        assert await w.run_once() == 1
        assert box.connections == 5 and len(box.messages) == 2


async def test_drain_releases_what_it_holds(env: SimpleNamespace, sink: tuple[Sink, int]) -> None:
    box, port = sink
    box.rcpt_delay = 5.0
    w = worker(env.storage, env.queue, port, poll_interval=0.1)
    await w.start()
    msg = await env.queue.enqueue("alice@example.org", ["x@remote.test"], body())
    w.refresh()
    await wait_for(lambda: box.active == 1 and w.held == 1)
    await asyncio.sleep(0.1)
    await w.drain(0.1)
    shown = await env.queue.show(msg.id)
    assert not shown.lease_owner and shown.next_attempt <= time.time()
    box.rcpt_delay = 0
    assert await worker(env.storage, env.queue, port).run_once() == 1
    assert [m.rcpts for m in box.messages] == [["x@remote.test"]]


def test_routes_dsn_status_helpers() -> None:
    routes = parse_routes({
        "example.com": "relay.example.net:2525",
        "*": {"host": "[2001:db8::1]:587", "username": "u", "password": "p", "tls": "required"},
    })
    assert routes["example.com"] == Route("relay.example.net", 2525)
    assert routes["*"] == Route("2001:db8::1", 587, "u", "p", "required")
    with pytest.raises(ValueError):
        parse_routes({"x": {"host": "h", "tls": "sometimes"}})
    with pytest.raises(ValueError, match="user"):
        parse_routes({"x": {"host": "h", "user": "u"}})  # a typo for username
    assert status_of("550 5.1.1 no") == "5.1.1"
    assert status_of("451 4.2.1 busy") == "5.2.1"  # a failed recipient's status is permanent
    assert status_of("554 no code") == "5.0.0"
    from storage.queue import QueuedMessage, Recipient

    msg = QueuedMessage(1, "a@example.org", b"", 1, NOW, NOW, NOW)
    raw = build_dsn("mx.test", msg, [Recipient("b@x.test", reply="550 5.1.1 gone", remote="mx.x.test")],
                    "Subject: Ünïcode\r\n".encode(), NOW)
    _, [block], headers = parse_dsn(raw)
    assert block["Status"] == "5.1.1" and "Ünïcode" in headers


async def test_flush_and_drain_to_another_server(env: SimpleNamespace, sink: tuple[Sink, int]) -> None:
    box, port = sink
    clock = env.clock
    await env.queue.enqueue("alice@example.org", ["temp@far.test"], body(), now=clock())
    await env.queue.enqueue("alice@example.org", ["y@far.test", "z@other.test"], body(), now=clock())
    first = worker(env.storage, env.queue, port, clock)
    assert await first.run_once() == 2
    box.accept_temp = True
    # `queue drain --to HOST`: everything, due or not, to one server.
    report = await relay_queue(env.storage, env.queue, OutboundSettings(hostname="mx.test"), f"127.0.0.1:{port}",
                               clock=clock)
    assert report.relayed == 1 and report.left == {}
    assert await env.queue.list_messages() == []
    assert sorted(r for m in box.messages for r in m.rcpts) == [
        "temp@far.test", "y@far.test", "z@other.test"
    ]


async def test_drain_to_an_unreachable_server_leaves_the_queue_as_it_was(env: SimpleNamespace) -> None:
    import socket

    with socket.socket() as probe:  # a port with nobody listening
        probe.bind(("127.0.0.1", 0))
        dead = probe.getsockname()[1]
    a = await env.queue.enqueue("alice@example.org", ["x@a.test"], body(), now=env.clock() + 60)
    b = await env.queue.enqueue("alice@example.org", ["y@b.test"], body(), now=env.clock())
    report = await relay_queue(env.storage, env.queue, OutboundSettings(hostname="mx.test"), f"127.0.0.1:{dead}",
                               clock=env.clock)
    assert report.relayed == 0 and set(report.left) == {a.qid, b.qid}
    assert any(why.startswith("451 4.4.1") for why in report.left.values())
    for before in (a, b):
        after = await env.queue.show(before.id)
        assert not after.lease_owner and after.attempts == 0
        assert after.next_attempt == pytest.approx(before.next_attempt, abs=0.001)


async def test_drain_relays_whole_messages_and_leaves_queue_state_alone(
    env: SimpleNamespace, sink: tuple[Sink, int], tmp_path: Path
) -> None:
    box, port = sink
    clock = env.clock
    bob = await make_account(env.storage, "bob@example.org")
    await env.queue.pause()
    await env.queue.pause("b.test")
    backoff = await env.queue.back_off("a.test", clock(), 600, 600)
    multi = await env.queue.enqueue(
        "alice@example.org", ["x@a.test", "y@b.test", ("bob@example.org", bob)], body(mid="multi"), now=clock())
    greylisted = await env.queue.enqueue("alice@example.org", ["ok@a.test", "temp@a.test"], body(mid="g"), now=clock())
    refused = await env.queue.enqueue("alice@example.org", ["perm@c.test"], body(mid="r"), now=clock() + 50)
    null = await env.queue.enqueue("", ["z@d.test"], body(mid="n"), now=clock())
    settings = OutboundSettings(hostname="mx.test", backoff_min=1, backoff_max=1)
    report = await relay_queue(env.storage, env.queue, settings, f"127.0.0.1:{port}", clock=clock)

    # One transaction per message, all its recipients (the local one too),
    # envelope intact; refused messages are not sent at all.
    assert report.relayed == 2
    assert sorted((m.sender, tuple(m.rcpts)) for m in box.messages) == [
        ("<>", ("z@d.test",)), ("alice@example.org", ("x@a.test", "y@b.test", "bob@example.org")),
    ]
    assert set(report.left) == {greylisted.qid, refused.qid}
    assert "451 4.2.1" in report.left[greylisted.qid] and "550 5.1.1" in report.left[refused.qid]
    # The rest stays exactly as it was: no attempt, no bounce, same due time,
    # pauses and backoff untouched, nothing delivered into this store.
    left = {m.id: m for m in await env.queue.list_messages()}
    assert set(left) == {greylisted.id, refused.id}
    for before in (greylisted, refused):
        after = left[before.id]
        assert after.attempts == 0 and not after.lease_owner
        assert after.next_attempt == pytest.approx(before.next_attempt, abs=0.001)  # kept in ms
        assert [r.status for r in after.recipients] == ["pending"] * len(before.recipients)
    assert await env.queue.paused() == ["*", "b.test"]
    assert await env.queue.backoff_until("a.test") == backoff
    assert await inbox(env.storage, bob) == [] and await inbox(env.storage, env.alice) == []
    assert multi.id not in left and null.id not in left

    # The command reports what stays and exits non-zero; once the target
    # takes the rest, it exits 0 with the queue empty.
    store = tmp_path / "store"
    result = await asyncio.to_thread(rookery, "queue", "drain", "--to", f"127.0.0.1:{port}", data=store, check=False)
    assert result.returncode == 1
    assert greylisted.qid in result.stderr and refused.qid in result.stderr and "2 message(s)" in result.stderr
    box.accept_temp = True
    await env.queue.delete(refused.id)
    result = await asyncio.to_thread(rookery, "queue", "drain", "--to", f"127.0.0.1:{port}", data=store, check=False)
    assert result.returncode == 0 and "1 message(s) relayed" in result.stdout
    assert await env.queue.list_messages() == []
    assert box.messages[-1].rcpts == ["ok@a.test", "temp@a.test"]
    assert await env.queue.paused() == ["*", "b.test"]


def test_settings_from_config() -> None:
    queue = SimpleNamespace(
        retry_min=60.0, retry_max=600.0, lease_seconds=45.0, max_connections=7, poll_interval=5.0,
        connect_timeout=10.0, smtp_port=2525, tls_verify=True, tls_ca_file="", delay_warning=14400.0,
        backoff_min=30.0, backoff_max=900.0,
    )
    config = SimpleNamespace(
        hostname="mx.test", queue=queue,
        extra={"routes": {"*": "smart.test:587"}, "throttle": {"mx:*.big.test": {"connections": 3}}},
    )
    settings, routes, throttles = from_config(config)
    assert settings.retry_min == 60 and settings.smtp_port == 2525 and settings.tls_verify
    assert settings.delay_warning == 14400
    assert (settings.backoff_min, settings.backoff_max) == (30, 900)
    from server import config as configmod

    q = configmod.load(None, environ={"ROOKERY_QUEUE_BACKOFF_MAX": "7200"}, overrides={"queue.backoff_min": "15"}).queue
    assert (q.backoff_min, q.backoff_max) == (15, 7200)
    defaults, _, _ = from_config(configmod.load(None, environ={}))
    assert (defaults.backoff_min, defaults.backoff_max) == (60, 3600)
    assert routes == {"*": Route("smart.test", 587)}
    assert throttles == [ThrottleRule("*.big.test", "mx", 3, 0)]


async def test_delay_warning_once_then_delivery_goes_on(env: SimpleNamespace, sink: tuple[Sink, int]) -> None:
    box, port = sink
    clock = env.clock
    msg = await env.queue.enqueue("alice@example.org", ["temp@remote.test", "temp2@remote.test"],
                                  body(subject="Slow one"), now=clock())
    w = worker(env.storage, env.queue, port, clock, delay_warning=600.0)
    assert await w.run_once() == 1  # deferred, too young for a warning
    assert len(await env.queue.list_messages()) == 1
    clock.advance(1000)
    assert await w.run_once() == 1  # deferred again, now past the warning time
    waiting = await env.queue.list_messages()
    assert len(waiting) == 2 and {m.dsn for m in waiting} == {False, True}
    assert await w.run_once() == 1  # the warning, delivered locally
    [warning] = await inbox(env.storage, env.alice)
    report, blocks, headers = parse_dsn(warning)
    assert report["Subject"] == "Delayed Mail (still being retried)"
    assert [b["Action"] for b in blocks] == ["delayed", "delayed"]
    assert {b["Final-Recipient"] for b in blocks} == {"rfc822; temp@remote.test", "rfc822; temp2@remote.test"}
    assert all(b["Status"] == "4.2.1" and b["Will-Retry-Until"] for b in blocks)
    assert "Slow one" in headers
    # Still queued, warned once only: later rounds send no second warning.
    clock.advance(5000)
    assert await w.run_once() == 1
    [shown] = await env.queue.list_messages()
    assert shown.id == msg.id and shown.warned
    assert len(await inbox(env.storage, env.alice)) == 1
    box.accept_temp = True
    clock.advance(5000)
    assert await w.run_once() == 1
    assert await env.queue.list_messages() == []
    assert sorted(r for m in box.messages for r in m.rcpts) == ["temp2@remote.test", "temp@remote.test"]


async def test_no_delay_warning_by_default_or_for_null_sender(env: SimpleNamespace, sink: tuple[Sink, int]) -> None:
    _, port = sink
    clock = env.clock
    await env.queue.enqueue("alice@example.org", ["temp@remote.test"], body(), now=clock())
    await env.queue.enqueue("", ["temp@remote.test"], body(), now=clock())
    plain = worker(env.storage, env.queue, port, clock)
    for _ in range(3):
        clock.advance(4000)
        await plain.run_once()
    assert not any(m.dsn for m in await env.queue.list_messages())  # off by default
    warning = worker(env.storage, env.queue, port, clock, delay_warning=1.0)
    for _ in range(3):
        clock.advance(4000)
        await warning.run_once()
    # Alice got one warning; the null sender's message none.
    assert len(await inbox(env.storage, env.alice)) == 1
    assert sorted(m.warned for m in await env.queue.list_messages() if not m.dsn) == [False, True]


# -- RFC 3461: NOTIFY, ORCPT, RET, ENVID ----------------------------------------------------

class DsnSinkSMTP(SinkSMTP):
    """A sink that supports DSN: it advertises it and records the parameters."""

    async def smtp_MAIL(self, arg: str) -> None:
        from protocols.smtp.dsn import take_mail_params

        arg, params = take_mail_params(arg)
        self.sink.dsn_mail.append(params)
        await super().smtp_MAIL(arg)

    async def smtp_RCPT(self, arg: str) -> None:
        from protocols.smtp.dsn import take_rcpt_params

        arg, params = take_rcpt_params(arg)
        self.sink.dsn_rcpt.append(params)
        await super().smtp_RCPT(arg)


class DsnSink(Sink):
    def __init__(self) -> None:
        super().__init__()
        self.dsn_mail: list[Any] = []
        self.dsn_rcpt: list[Any] = []

    async def handle_EHLO(
        self, server: SMTP, session: Session, envelope: Envelope, hostname: str, responses: list[str]
    ) -> list[str]:
        session.host_name = hostname
        return responses[:-1] + ["250-DSN", responses[-1]]


def dsn_parts(raw: bytes) -> tuple[email.message.Message, list[email.message.Message], list[email.message.Message]]:
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    assert msg.get_content_type() == "multipart/report"
    parts = list(msg.iter_parts())
    blocks = parts[1].get_payload()
    assert isinstance(blocks, list)
    return msg, blocks, parts


async def test_notify_never_and_failure_choose_who_gets_a_bounce(env: SimpleNamespace, sink: tuple[Sink, int]) -> None:
    from storage.queue import Recipient as QR

    _, port = sink
    w = worker(env.storage, env.queue, port)
    await env.queue.enqueue("alice@example.org", [QR("perm1@remote.test", notify="NEVER")], body(), now=NOW)
    assert await w.run_once() == 1
    assert await env.queue.list_messages() == []  # NOTIFY=NEVER: no bounce queued
    await env.queue.enqueue(
        "alice@example.org",
        [QR("perm2@remote.test", notify="NEVER"), QR("perm3@remote.test", notify="FAILURE", orcpt="rfc822;Perm3@Remote.Test")],
        body(), now=NOW, envid="Env-42",
    )
    assert await w.run_once() == 1
    assert await w.run_once() == 1  # the bounce, to alice's INBOX
    [dsn] = await inbox(env.storage, env.alice)
    report, blocks, _ = dsn_parts(dsn)
    assert blocks[0]["Original-Envelope-Id"] == "Env-42"
    [block] = blocks[1:]  # only the recipient that asked
    assert block["Final-Recipient"] == "rfc822; perm3@remote.test"
    assert block["Original-Recipient"] == "rfc822;Perm3@Remote.Test"
    assert block["Action"] == "failed"


async def test_ret_full_returns_the_whole_message_with_a_bounce(env: SimpleNamespace, sink: tuple[Sink, int]) -> None:
    _, port = sink
    w = worker(env.storage, env.queue, port)
    await env.queue.enqueue("alice@example.org", ["perm@remote.test"], body(subject="Whole"), now=NOW, ret="FULL")
    assert await w.run_once() == 1
    assert await w.run_once() == 1  # the bounce
    [dsn] = await inbox(env.storage, env.alice)
    _, _, parts = dsn_parts(dsn)
    assert [p.get_content_type() for p in parts] == ["text/plain", "message/delivery-status", "message/rfc822"]
    returned = parts[2].get_payload()[0]
    assert returned["Subject"] == "Whole" and "Hello there" in returned.get_content()


async def test_notify_success_relayed_when_the_next_hop_has_no_dsn(env: SimpleNamespace, sink: tuple[Sink, int]) -> None:
    from storage.queue import Recipient as QR

    box, port = sink
    w = worker(env.storage, env.queue, port)
    await env.queue.enqueue(
        "alice@example.org",
        [QR("ok@remote.test", notify="SUCCESS,FAILURE", orcpt="rfc822;ok@remote.test"), QR("other@remote.test")],
        body(subject="Tell me"), now=NOW, envid="E1",
    )
    assert await w.run_once() == 1
    assert sorted(box.messages[0].rcpts) == ["ok@remote.test", "other@remote.test"]
    assert await w.run_once() == 1  # the report
    [dsn] = await inbox(env.storage, env.alice)
    report, blocks, parts = dsn_parts(dsn)
    assert report["Subject"] == "Successful Mail Delivery Report"
    assert blocks[0]["Original-Envelope-Id"] == "E1"
    [block] = blocks[1:]  # "other" asked nothing: no success report for it
    assert block["Final-Recipient"] == "rfc822; ok@remote.test"
    assert (block["Action"], block["Status"]) == ("relayed", "2.0.0")
    assert parts[2].get_content_type() == "text/rfc822-headers"


async def test_dsn_parameters_go_on_to_a_next_hop_that_supports_dsn(env: SimpleNamespace, ca: trustme.CA) -> None:
    from storage.queue import Recipient as QR

    async with sink_server(ca, sink=DsnSink(), protocol=DsnSinkSMTP) as (box, port):
        w = worker(env.storage, env.queue, port)
        await env.queue.enqueue(
            "alice@example.org",
            [QR("ok@remote.test", notify="SUCCESS,DELAY", orcpt="rfc822;Ok+Box@Remote.Test")],
            body(), now=NOW, ret="HDRS", envid="Id with space+plus",
        )
        assert await w.run_once() == 1
        assert [m.rcpts for m in box.messages] == [["ok@remote.test"]]
        [mail] = box.dsn_mail
        assert (mail.ret, mail.envid) == ("HDRS", "Id with space+plus")  # xtext there and back
        [rcpt] = box.dsn_rcpt
        assert (rcpt.notify, rcpt.orcpt) == ("SUCCESS,DELAY", "rfc822;Ok+Box@Remote.Test")
    assert await env.queue.list_messages() == []  # the next hop reports success, not us


async def test_notify_success_for_a_local_recipient_reports_delivered(env: SimpleNamespace, sink: tuple[Sink, int]) -> None:
    from storage.queue import Recipient as QR

    _, port = sink
    bob = await make_account(env.storage, "bob@example.org")
    w = worker(env.storage, env.queue, port)
    await env.queue.enqueue("alice@example.org", [QR("bob@example.org", local=bob, notify="SUCCESS")], body(), now=NOW)
    assert await w.run_once() == 1
    assert len(await inbox(env.storage, bob)) == 1
    assert await w.run_once() == 1  # the report itself, to alice
    [dsn] = await inbox(env.storage, env.alice)
    _, blocks, _ = dsn_parts(dsn)
    assert (blocks[1]["Action"], blocks[1]["Status"]) == ("delivered", "2.0.0")


# -- /metrics -------------------------------------------------------------------------------

def scrape(port: int) -> dict[str, float]:
    """``GET /metrics`` of a node: sample line (name and labels) to value."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


async def test_queue_metrics_of_a_node_over_http(tmp_path: Path, ca: trustme.CA) -> None:
    async with sink_server(ca) as (box, port):
        cfg = node_config(
            tmp_path / "data", ("http",),
            **{"routes__*": f"127.0.0.1:{port}", "throttle__*.test": {"connections": 2, "per_hour": 50},
               "queue__poll_interval": 0.3, "queue__delay_warning": 0.01},
        )
        async with running_node(cfg) as state:
            await make_account(state.storage, "alice@example.org")
            queue = Queue(state.storage.db)
            http = state.ports["http"]
            # One message: delivered, deferred (451) and failed (550) recipients.
            await queue.enqueue("alice@example.org", ["ok@remote.test", "temp@remote.test", "perm@remote.test"], body())

            def settled() -> bool:
                m = scrape(http)
                # The original stays (deferred); its DSN was delivered to
                # alice's INBOX; the store's side is read every poll interval.
                return (m.get("rookery_queue_delivered_recipients_total") == 2 and m.get("rookery_queue_messages") == 1
                        and m.get('rookery_throttle_hourly{rule="domain:*.test"}') == 1)

            await wait_for(lambda: asyncio.to_thread(settled))
            m = await asyncio.to_thread(scrape, http)
            assert [m[f"rookery_queue_{n}_total"] for n in
                    ("delivered_recipients", "deferred_recipients", "failed_recipients", "bounces", "delay_warnings")
                    ] == [2, 1, 1, 1, 1]
            assert m["rookery_queue_held_messages"] == 0
            assert m['rookery_throttle_connections{rule="domain:*.test"}'] == 0
            assert m['rookery_throttle_connections_limit{rule="domain:*.test"}'] == 2
            assert m['rookery_throttle_hourly{rule="domain:*.test"}'] == 1
            assert m['rookery_throttle_hourly_limit{rule="domain:*.test"}'] == 50
            assert [mm.rcpts for mm in box.messages] == [["ok@remote.test"]]

            # A held message shows while its delivery is under way (to
            # another domain: remote.test is backed off after its 451).
            box.rcpt_delay = 1.5
            await queue.enqueue("alice@example.org", ["slow@other.test"], body())
            await wait_for(lambda: asyncio.to_thread(lambda: scrape(http)["rookery_queue_held_messages"] == 1))
            await wait_for(lambda: asyncio.to_thread(
                lambda: scrape(http)['rookery_throttle_connections{rule="domain:*.test"}'] == 1))
            await wait_for(lambda: asyncio.to_thread(
                lambda: scrape(http)["rookery_queue_delivered_recipients_total"] == 3))
            assert (await asyncio.to_thread(scrape, http))["rookery_queue_held_messages"] == 0


async def test_queue_size_metric_never_goes_below_zero(storage: Storage) -> None:
    """A store whose queue held mail before the size counter existed counts
    those messages out but never in: the counter can go negative there."""
    from server.metrics import outbound_samples
    from storage.queue import read_stats

    queue = Queue(storage.db)
    await queue.enqueue("a@example.org", ["b@remote.test"], b"Subject: x\r\n\r\nx\r\n")

    async def size_metric() -> int:
        stats = await storage.db.read(lambda tr: read_stats(tr, [], time.time()))
        worker = SimpleNamespace(counters={}, held=0, stats=stats, throttles=[])
        [value] = [s.value for s in outbound_samples(worker) if s.name == "rookery_queue_messages"]
        return int(value)

    assert await size_metric() == 1
    await storage.db.transact(lambda tr: tr.add(keys.QUEUE_SIZE, -3))  # as if 3 uncounted messages had gone
    assert await size_metric() == 0
