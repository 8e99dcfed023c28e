"""Submission (RFC 6409 STARTTLS, RFC 8314 implicit TLS) over loopback sockets.

The listeners are built directly from protocols.smtp.submission in the test
loop; aiosmtplib is the client.
"""

from __future__ import annotations

import base64
import contextlib
import ssl
from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Any

import aiosmtplib
import pytest
import trustme
from helpers import make_account

from protocols.smtp.server import SmtpListener
from protocols.smtp.session import InboundHandler, SmtpLimits
from protocols.smtp.submission import (
    ENCRYPTION_REQUIRED,
    SubmissionHandler,
    SubmissionSettings,
    submission_listener,
)
from server.outbound import format_message
from storage import Storage
from storage.queue import Queue

LIMITS = SmtpLimits(max_message_size=1_000_000, max_recipients=10, command_timeout=30)


def message(sender: str = "alice@example.org", to: str = "carol@remote.test", subject: str = "Hi") -> bytes:
    return (
        f"From: Alice <{sender}>\r\nTo: {to}\r\nSubject: {subject}\r\n\r\nHello\r\n.leading dot\r\n"
    ).encode()


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def server_tls(ca: trustme.CA) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost", "127.0.0.1").configure_cert(ctx)
    return ctx


@pytest.fixture
def client_tls(ca: trustme.CA) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    return ctx


@pytest.fixture
async def env(storage: Storage) -> SimpleNamespace:
    alice = await make_account(storage, "alice@example.org")
    bob = await make_account(storage, "bob@example.org")
    await storage.directory.add_alias("sales@example.org", "alice@example.org")
    return SimpleNamespace(storage=storage, queue=Queue(storage.db), alice=alice, bob=bob)


@contextlib.asynccontextmanager
async def listening(
    env: SimpleNamespace, tls: ssl.SSLContext, *, implicit: bool = False, **kw: Any
) -> AsyncIterator[int]:
    settings = kw.pop("settings", SubmissionSettings())
    listener = submission_listener(
        env.storage, env.queue, "mx.test", LIMITS, settings, tls, implicit_tls=implicit, **kw
    )
    port = await listener.start("127.0.0.1", 0)
    try:
        yield port
    finally:
        listener.stop_accepting()
        await listener.drain(1.0)
        assert listener.server is not None
        await listener.server.wait_closed()


@contextlib.asynccontextmanager
async def connect(
    port: int, tls: ssl.SSLContext, *, implicit: bool = False, starttls: bool = True
) -> AsyncIterator[aiosmtplib.SMTP]:
    client = aiosmtplib.SMTP(
        hostname="127.0.0.1", port=port, use_tls=implicit, start_tls=False, tls_context=tls, timeout=10,
        local_hostname="client.test",
    )
    await client.connect()
    try:
        await client.ehlo()
        if starttls and not implicit:
            await client.starttls()
            await client.ehlo()
        yield client
    finally:
        if client.is_connected:
            with contextlib.suppress(aiosmtplib.SMTPException):
                await client.quit()
        client.close()


async def inbox(storage: Storage, acct: int) -> list[bytes]:
    return [await storage.mail.read_blob(em.digest) for _, em in await storage.mail.list_messages(acct, "INBOX") if em]


async def test_starttls_auth_plain_delivers_local_and_queues_remote(env: SimpleNamespace, server_tls: ssl.SSLContext,
                                                                     client_tls: ssl.SSLContext) -> None:
    woken: list[int] = []
    async with listening(env, server_tls, on_queued=lambda: woken.append(1)) as port:
        async with connect(port, client_tls) as client:
            assert "starttls" not in client.esmtp_extensions  # already on TLS
            assert set(client.server_auth_methods) >= {"plain", "login"}
            response = await client.auth_plain("alice@example.org", "secret")
            assert response.code == 235
            errors, reply = await client.sendmail(
                "alice@example.org",
                ["bob@example.org", "carol@remote.test", "Carol@REMOTE.test"],
                message(to="bob@example.org, carol@remote.test"),
            )
            assert errors == {} and reply.startswith("2.0.0 OK queued as ")
    [local] = await inbox(env.storage, env.bob)
    assert local.startswith(b"Return-Path: <alice@example.org>\r\nReceived: from client.test ([127.0.0.1])")
    assert b"with ESMTPSA id " in local
    assert b"\r\nMessage-ID: <" in local and b"\r\nDate: " in local  # added for the MUA (RFC 6409 §8)
    assert local.endswith(b"Hello\r\n.leading dot\r\n")
    [queued] = await env.queue.list_messages()
    assert queued.sender == "alice@example.org"
    assert [r.address for r in queued.recipients] == ["carol@remote.test"]
    assert reply.endswith(queued.qid)
    body = await env.queue.read_body(queued)
    assert body.startswith(b"Received: ") and b"Return-Path" not in body
    assert woken == [1]


async def test_implicit_tls_auth_login_with_alias(env: SimpleNamespace, server_tls: ssl.SSLContext,
                                                  client_tls: ssl.SSLContext) -> None:
    async with listening(env, server_tls, implicit=True) as port:
        async with connect(port, client_tls, implicit=True) as client:
            assert "starttls" not in client.esmtp_extensions
            assert (await client.auth_login("sales@example.org", "secret")).code == 235
            errors, _ = await client.sendmail("sales@example.org", ["dave@remote.test"], message("sales@example.org"))
            assert errors == {}
    [queued] = await env.queue.list_messages()
    assert queued.sender == "sales@example.org"


async def test_auth_refused_before_tls_for_untrusted_peer(env: SimpleNamespace, server_tls: ssl.SSLContext,
                                                          client_tls: ssl.SSLContext) -> None:
    # trust_loopback=False makes this loopback connection count as remote.
    settings = SubmissionSettings(trust_loopback=False)
    async with listening(env, server_tls, settings=settings) as port:
        async with connect(port, client_tls, starttls=False) as client:
            assert "starttls" in client.esmtp_extensions
            # No mechanism is offered (the MX's EHLO shows a bare "AUTH" after STARTTLS).
            assert not client.esmtp_extensions.get("auth", "").strip()
            token = base64.b64encode(b"\0alice@example.org\0secret").decode()
            response = await client.execute_command(b"AUTH", b"PLAIN", token.encode())
            assert (response.code, response.message[:6]) == (538, "5.7.11")
            response = await client.execute_command(b"MAIL", b"FROM:<alice@example.org>")
            assert (response.code, response.message[:5]) == (530, "5.7.0")
            await client.starttls()
            await client.ehlo()
            assert "auth" in client.esmtp_extensions
            assert (await client.auth_plain("alice@example.org", "secret")).code == 235


class _Transport:
    def __init__(self, tls: bool) -> None:
        self.tls = tls

    def get_extra_info(self, name: str) -> object:
        return object() if name == "ssl_object" and self.tls else None


def fake_server(peer: tuple[str, int], tls: bool = False) -> Any:
    return SimpleNamespace(session=SimpleNamespace(peer=peer), transport=_Transport(tls), _tls_protocol=None)


async def test_secure_connection_policy(env: SimpleNamespace) -> None:
    plain = SubmissionHandler(env.storage, env.queue, "mx.test", LIMITS)
    assert not plain.may_authenticate(fake_server(("192.0.2.7", 4000)))
    assert plain.may_authenticate(fake_server(("192.0.2.7", 4000), tls=True))
    assert plain.may_authenticate(fake_server(("127.0.0.1", 4000)))
    assert plain.may_authenticate(fake_server(("::1", 4000)))
    assert plain.may_authenticate(fake_server(("::ffff:127.0.0.1", 4000)))
    open_settings = SubmissionSettings(allow_plaintext_auth=True)
    allowed = SubmissionHandler(env.storage, env.queue, "mx.test", LIMITS, open_settings)
    assert allowed.may_authenticate(fake_server(("192.0.2.7", 4000)))
    # The mechanism itself refuses too, without asking the directory.
    token = base64.b64encode(b"\0alice@example.org\0secret").decode()
    result = await plain.auth_PLAIN(fake_server(("192.0.2.7", 4000)), ["PLAIN", token])
    assert not result.success and not result.handled and result.message == ENCRYPTION_REQUIRED


async def test_wrong_password_gets_535_5_7_8(env: SimpleNamespace, server_tls: ssl.SSLContext,
                                              client_tls: ssl.SSLContext) -> None:
    async with listening(env, server_tls) as port:
        async with connect(port, client_tls) as client:
            for attempt in (client.auth_plain, client.auth_login):
                with pytest.raises(aiosmtplib.SMTPAuthenticationError) as exc:
                    await attempt("alice@example.org", "wrong")
                assert exc.value.code == 535 and exc.value.message.startswith("5.7.8")
            with pytest.raises(aiosmtplib.SMTPAuthenticationError) as exc:
                await client.auth_plain("nobody@example.org", "secret")
            assert exc.value.code == 535
            # The session goes on: a right password still works.
            assert (await client.auth_plain("alice@example.org", "secret")).code == 235


async def test_sender_must_belong_to_the_account(env: SimpleNamespace, server_tls: ssl.SSLContext,
                                                 client_tls: ssl.SSLContext) -> None:
    async with listening(env, server_tls) as port:
        async with connect(port, client_tls) as client:
            await client.auth_plain("alice@example.org", "secret")
            for sender in ("bob@example.org", "alice@remote.test", ""):
                with pytest.raises(aiosmtplib.SMTPSenderRefused) as exc:
                    await client.mail(sender)
                assert exc.value.code == 553 and exc.value.message.startswith("5.7.1")
            # Envelope fine, From: someone else's: refused at the end of DATA.
            with pytest.raises(aiosmtplib.SMTPDataError) as data_exc:
                await client.sendmail("alice@example.org", ["carol@remote.test"], message(sender="bob@example.org"))
            assert data_exc.value.code == 553 and data_exc.value.message.startswith("5.7.1")
            await client.rset()
            with pytest.raises(aiosmtplib.SMTPDataError) as data_exc:
                await client.sendmail("alice@example.org", ["carol@remote.test"], b"Subject: no from\r\n\r\nx\r\n")
            assert data_exc.value.code == 550
    assert await env.queue.list_messages() == []


async def test_rate_limit_per_account(env: SimpleNamespace, server_tls: ssl.SSLContext,
                                      client_tls: ssl.SSLContext) -> None:
    settings = SubmissionSettings(max_messages_per_hour=1)
    async with listening(env, server_tls, settings=settings) as port:
        async with connect(port, client_tls) as client:
            await client.auth_plain("alice@example.org", "secret")
            await client.sendmail("alice@example.org", ["carol@remote.test"], message())
            with pytest.raises(aiosmtplib.SMTPSenderRefused) as exc:
                await client.mail("alice@example.org")
            assert exc.value.code == 450 and exc.value.message.startswith("4.7.1")
        # Another account is not affected.
        async with connect(port, client_tls) as client:
            await client.auth_plain("bob@example.org", "secret")
            await client.sendmail("bob@example.org", ["carol@remote.test"], message("bob@example.org"))
    assert len(await env.queue.list_messages()) == 2


async def test_rate_limit_counts_recipients(env: SimpleNamespace, server_tls: ssl.SSLContext,
                                           client_tls: ssl.SSLContext) -> None:
    settings = SubmissionSettings(max_messages_per_hour=3)
    async with listening(env, server_tls, settings=settings) as port:
        async with connect(port, client_tls) as client:
            await client.auth_plain("alice@example.org", "secret")
            await client.sendmail("alice@example.org", ["a@remote.test", "b@remote.test"], message())
            # One recipient of the hour is left: the second RCPT is refused.
            await client.mail("alice@example.org")
            await client.rcpt("c@remote.test")
            with pytest.raises(aiosmtplib.SMTPRecipientRefused) as exc:
                await client.rcpt("d@remote.test")
            assert exc.value.code == 450 and exc.value.message.startswith("4.7.1")
            await client.data(message())
            with pytest.raises(aiosmtplib.SMTPSenderRefused):
                await client.mail("alice@example.org")
    queued = await env.queue.list_messages()
    assert sorted(r.address for m in queued for r in m.recipients) == ["a@remote.test", "b@remote.test", "c@remote.test"]


async def test_local_failure_after_remote_queued_goes_to_the_queue(env: SimpleNamespace, server_tls: ssl.SSLContext,
                                                                   client_tls: ssl.SSLContext) -> None:
    await env.storage.directory.set_quota("bob@example.org", 10)  # any message is too big now
    async with listening(env, server_tls) as port:
        async with connect(port, client_tls) as client:
            await client.auth_plain("alice@example.org", "secret")
            # Local only: the client is told to retry.
            with pytest.raises(aiosmtplib.SMTPDataError) as exc:
                await client.sendmail("alice@example.org", ["bob@example.org"], message(to="bob@example.org"))
            assert exc.value.code == 452
            await client.rset()
            # Local and remote: the remote part is committed, so the queue takes both.
            errors, _ = await client.sendmail("alice@example.org", ["bob@example.org", "carol@remote.test"], message())
            assert errors == {}
    [queued] = await env.queue.list_messages()
    assert [(r.address, r.local) for r in queued.recipients] == [
        ("carol@remote.test", None), ("bob@example.org", env.bob)
    ]
    assert await inbox(env.storage, env.bob) == []


async def test_signer_signs_what_is_queued_and_delivered(env: SimpleNamespace, server_tls: ssl.SSLContext,
                                                         client_tls: ssl.SSLContext) -> None:
    async def signer(raw: bytes) -> bytes:
        assert raw.startswith(b"Date: ") or b"\r\nDate: " in raw  # signed after Date/Message-ID are added
        return b"DKIM-Signature: v=1; test\r\n" + raw

    async with listening(env, server_tls, signer=signer) as port:
        async with connect(port, client_tls) as client:
            await client.auth_plain("alice@example.org", "secret")
            await client.sendmail("alice@example.org", ["bob@example.org", "carol@remote.test"], message())
    [queued] = await env.queue.list_messages()
    body = await env.queue.read_body(queued)
    assert body.split(b"\r\n")[3].startswith(b"DKIM-Signature: v=1; test")  # right after Received:
    [local] = await inbox(env.storage, env.bob)
    assert b"\r\nDKIM-Signature: v=1; test\r\n" in local


async def test_mx_still_refuses_relay(env: SimpleNamespace, server_tls: ssl.SSLContext,
                                      client_tls: ssl.SSLContext) -> None:
    listener = SmtpListener(InboundHandler(env.storage, "mx.test", LIMITS), "mx.test", LIMITS, server_tls)
    port = await listener.start("127.0.0.1", 0)
    try:
        async with connect(port, client_tls) as client:
            # No mechanism is offered (the MX's EHLO shows a bare "AUTH" after STARTTLS).
            assert not client.esmtp_extensions.get("auth", "").strip()
            token = base64.b64encode(b"\0alice@example.org\0secret").decode()
            response = await client.execute_command(b"AUTH", b"PLAIN", token.encode())
            assert response.code >= 500
            await client.mail("alice@example.org")
            with pytest.raises(aiosmtplib.SMTPRecipientRefused) as exc:
                await client.rcpt("carol@remote.test")
            assert exc.value.code == 550 and exc.value.message.startswith("5.7.1")
    finally:
        listener.stop_accepting()
        await listener.drain(1.0)
        assert listener.server is not None
        await listener.server.wait_closed()
    assert await env.queue.list_messages() == []


async def test_dsn_parameters_are_kept_with_the_queued_message(env: SimpleNamespace, server_tls: ssl.SSLContext,
                                                                client_tls: ssl.SSLContext) -> None:
    """RFC 3461 on submission: DSN is advertised; RET and ENVID on MAIL and
    NOTIFY and ORCPT on RCPT are kept (case and all) with the queued
    message; a local recipient that asked for NOTIFY=SUCCESS is queued too
    (the queue sends the "delivered" report); bad parameters get 501."""
    async with listening(env, server_tls) as port:
        async with connect(port, client_tls) as client:
            assert "dsn" in client.esmtp_extensions
            await client.auth_plain("alice@example.org", "secret")
            assert (await client.mail("alice@example.org", options=["RET=HDRS", "ENVID=Order+2B17"])).code == 250
            assert (await client.rcpt("carol@remote.test", options=["NOTIFY=FAILURE,DELAY", "ORCPT=rfc822;Carol@Remote.Test"])).code == 250
            assert (await client.rcpt("bob@example.org", options=["NOTIFY=SUCCESS"])).code == 250
            assert (await client.rcpt("dave@remote.test", options=["notify=never"])).code == 250
            assert (await client.data(message(to="carol@remote.test"))).code == 250
            for bad in (["NOTIFY=SOMETIMES"], ["NOTIFY=NEVER,SUCCESS"], ["ORCPT=no-semicolon"], ["NOTIFY=DELAY", "NOTIFY=DELAY"]):
                await client.mail("alice@example.org")
                with pytest.raises(aiosmtplib.SMTPRecipientRefused) as err:
                    await client.rcpt("carol@remote.test", options=bad)
                assert err.value.code == 501, bad
                await client.rset()
            with pytest.raises(aiosmtplib.SMTPSenderRefused) as refused:
                await client.mail("alice@example.org", options=["RET=SOME"])
            assert refused.value.code == 501
    assert await inbox(env.storage, env.bob) == []  # queued, not delivered at once
    [queued] = await env.queue.list_messages()
    assert (queued.ret, queued.envid) == ("HDRS", "Order+17")
    by_address = {r.address: r for r in queued.recipients}
    assert (by_address["carol@remote.test"].notify, by_address["carol@remote.test"].orcpt) == (
        "FAILURE,DELAY", "rfc822;Carol@Remote.Test")
    assert (by_address["bob@example.org"].notify, by_address["bob@example.org"].local) == ("SUCCESS", env.bob)
    assert by_address["dave@remote.test"].notify == "NEVER"
    shown = format_message(queued)
    assert "ret HDRS  envid Order+17" in shown and "notify FAILURE,DELAY  orcpt rfc822;Carol@Remote.Test" in shown


async def test_every_session_log_line_names_its_peer(env: SimpleNamespace, server_tls: ssl.SSLContext,
                                                     client_tls: ssl.SSLContext, caplog: pytest.LogCaptureFixture) -> None:
    """Refused logins, refused senders, a failing signer, a local delivery
    deferred to the queue and a submission: each log record has a peer."""
    import logging

    async def broken_signer(raw: bytes) -> bytes:
        raise RuntimeError("no key")

    await env.storage.directory.set_quota("bob@example.org", 10)  # bob's copy will not fit: deferred to the queue
    async with listening(env, server_tls, signer=broken_signer) as port:
        caplog.clear()
        with caplog.at_level(logging.DEBUG, logger="rookery"):
            async with connect(port, client_tls) as client:
                local_port = client.transport.get_extra_info("sockname")[1]  # type: ignore[union-attr]
                with pytest.raises(aiosmtplib.SMTPAuthenticationError):
                    await client.auth_plain("alice@example.org", "wrong")
                await client.auth_plain("alice@example.org", "secret")
                with pytest.raises(aiosmtplib.SMTPSenderRefused):
                    await client.mail("bob@example.org")
                with pytest.raises(aiosmtplib.SMTPDataError):
                    await client.sendmail("alice@example.org", ["carol@remote.test"], message(sender="bob@example.org"))
                await client.rset()
                errors, _ = await client.sendmail("alice@example.org", ["bob@example.org", "carol@remote.test"], message())
                assert errors == {}
    records = [r for r in caplog.records if r.name.startswith("rookery")]
    messages = {r.getMessage().split(":")[0] for r in records}
    assert {"submission auth failed", "submission auth ok", "sender not owned", "From", "DKIM signing failed",
            "local delivery deferred to the queue", "submitted"} <= messages, messages
    for record in records:
        assert getattr(record, "peer", None) == f"127.0.0.1:{local_port}", (record.name, record.getMessage())
