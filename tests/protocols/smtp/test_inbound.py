"""Inbound SMTP end to end: smtplib and raw sockets against a real node."""

from __future__ import annotations

import asyncio
import smtplib
import socket
import ssl
from pathlib import Path

import pytest
from helpers import make_account, node_config, running_node

from server.node import ServerState
from storage import keys

MESSAGE = (
    b"From: Bob <bob@remote.test>\r\n"
    b"To: Alice <alice@example.org>\r\n"
    b"Subject: Hello there\r\n"
    b"Message-ID: <m1@remote.test>\r\n"
    b"\r\n"
    b"Body line one\r\n"
    b"..leading dot line\r\n"
)


@pytest.fixture
async def node(tmp_path: Path):
    cfg = node_config(tmp_path / "data", smtp__max_recipients=5, smtp__max_message_size=200_000)
    async with running_node(cfg) as state:
        await make_account(state.storage, "alice@example.org")
        await make_account(state.storage, "bob@example.org")
        yield state


def client(state: ServerState) -> smtplib.SMTP:
    return smtplib.SMTP("127.0.0.1", state.ports["smtp"], timeout=10)


async def inbox(state: ServerState, email: str) -> list[bytes]:
    account = await state.storage.directory.get(email)
    out = []
    for _, em in await state.storage.mail.list_messages(account.id, "INBOX"):
        assert em is not None
        out.append(await state.storage.mail.read_blob(em.digest))
    return out


async def test_ehlo_advertises_extensions(node: ServerState) -> None:
    def run() -> tuple[int, bytes]:
        with client(node) as s:
            return s.ehlo("client.test")

    code, text = await asyncio.to_thread(run)
    assert code == 250
    for ext in (b"SIZE 200000", b"8BITMIME", b"SMTPUTF8", b"PIPELINING", b"ENHANCEDSTATUSCODES", b"STARTTLS"):
        assert ext in text
    assert b"AUTH" not in text  # the MX takes no authentication


async def test_delivery_stores_exact_bytes_with_trace_headers(node: ServerState) -> None:
    def run() -> dict[str, tuple[int, bytes]]:
        with client(node) as s:
            return s.sendmail("bob@remote.test", ["alice@example.org"], MESSAGE)

    assert await asyncio.to_thread(run) == {}
    [raw] = await inbox(node, "alice@example.org")
    assert raw.startswith(b"Return-Path: <bob@remote.test>\r\nReceived: from ")
    assert b"by mx.test (Rookery) with ESMTP id " in raw
    # Stored exactly as sent after the trace headers (smtplib dot-stuffs the
    # wire copy; the server un-stuffs it).
    assert raw.endswith(MESSAGE)


async def test_relay_and_unknown_users_refused(node: ServerState) -> None:
    def run() -> tuple[tuple[int, bytes], tuple[int, bytes]]:
        with client(node) as s:
            s.ehlo("client.test")
            s.mail("bob@remote.test")
            relay = s.rcpt("victim@elsewhere.test")
            unknown = s.rcpt("nobody@example.org")
            return relay, unknown

    relay, unknown = await asyncio.to_thread(run)
    assert relay[0] == 550 and relay[1].startswith(b"5.7.1")
    assert unknown[0] == 550 and unknown[1].startswith(b"5.1.1")
    assert await inbox(node, "alice@example.org") == []


async def test_several_recipients_share_one_blob(node: ServerState) -> None:
    def run() -> dict[str, tuple[int, bytes]]:
        with client(node) as s:
            return s.sendmail("x@remote.test", ["alice@example.org", "bob@example.org", "ghost@example.org"], MESSAGE)

    refused = await asyncio.to_thread(run)
    assert list(refused) == ["ghost@example.org"]
    a, b = await inbox(node, "alice@example.org"), await inbox(node, "bob@example.org")
    assert len(a) == len(b) == 1 and a == b
    blobs = await node.storage.db.read(lambda tr: tr.get_range(*keys.prefix_range(("bm",))))
    assert len(blobs) == 1


async def test_aliases_catchall_and_subaddress(node: ServerState) -> None:
    await node.storage.directory.add_alias("info@example.org", "alice@example.org")

    def send(rcpt: str) -> dict[str, tuple[int, bytes]]:
        with client(node) as s:
            return s.sendmail("x@remote.test", [rcpt], MESSAGE)

    assert await asyncio.to_thread(send, "info@example.org") == {}
    assert await asyncio.to_thread(send, "alice+lists@example.org") == {}
    assert await asyncio.to_thread(send, "ALICE@Example.ORG") == {}
    with pytest.raises(smtplib.SMTPRecipientsRefused):
        await asyncio.to_thread(send, "random@example.org")
    await node.storage.directory.set_catchall("example.org", "bob@example.org")
    assert await asyncio.to_thread(send, "random@example.org") == {}
    assert len(await inbox(node, "alice@example.org")) == 3
    assert len(await inbox(node, "bob@example.org")) == 1


async def test_over_quota_is_refused_at_rcpt(node: ServerState) -> None:
    await make_account(node.storage, "tiny@example.org", quota=1000)

    def send() -> dict[str, tuple[int, bytes]]:
        with client(node) as s:
            return s.sendmail("x@remote.test", ["tiny@example.org"], MESSAGE + (b"x" * 78 + b"\r\n") * 25)

    with pytest.raises(smtplib.SMTPDataError) as data_err:
        await asyncio.to_thread(send)  # fits the empty box at RCPT, not at DATA
    assert data_err.value.smtp_code == 452
    assert await inbox(node, "tiny@example.org") == []
    # Fill it past the quota, then RCPT itself answers 452.
    acct = (await node.storage.directory.get("tiny@example.org")).id
    await node.storage.mail.append(acct, "INBOX", MESSAGE + b"z" * 500)
    await node.storage.directory.set_quota("tiny@example.org", 400)
    with pytest.raises(smtplib.SMTPRecipientsRefused) as err:
        await asyncio.to_thread(send)
    assert err.value.recipients["tiny@example.org"][0] == 452


async def test_cached_rcpt_answers_are_checked_at_delivery(node: ServerState) -> None:
    """RCPT answers are reused from the node's cache; the delivering
    transaction checks them against the directory, so an alias moved to
    another account delivers to the new one, and a removed address gets a
    4xx at DATA, then 550 at RCPT when the client tries again."""
    await node.storage.directory.add_alias("info@example.org", "alice@example.org")

    def send(rcpt: str) -> dict[str, tuple[int, bytes]]:
        with client(node) as s:
            return s.sendmail("x@remote.test", [rcpt], MESSAGE)

    assert await asyncio.to_thread(send, "info@example.org") == {}
    assert node.storage.recipients.get("info@example.org") is not None
    await node.storage.directory.remove_alias("info@example.org")
    await node.storage.directory.add_alias("info@example.org", "bob@example.org")
    assert await asyncio.to_thread(send, "info@example.org") == {}  # RCPT from the cache
    assert len(await inbox(node, "alice@example.org")) == 1
    assert len(await inbox(node, "bob@example.org")) == 1
    assert node.storage.recipients.get("info@example.org") is None  # stale: dropped

    assert await asyncio.to_thread(send, "info@example.org") == {}  # cached again, at the new version
    await node.storage.directory.remove_alias("info@example.org")
    with pytest.raises(smtplib.SMTPDataError) as err:
        await asyncio.to_thread(send, "info@example.org")
    assert err.value.smtp_code == 451
    assert len(await inbox(node, "bob@example.org")) == 2
    with pytest.raises(smtplib.SMTPRecipientsRefused) as refused:
        await asyncio.to_thread(send, "info@example.org")
    assert refused.value.recipients["info@example.org"][0] == 550


async def test_rcpt_for_an_account_with_a_quota_is_never_cached(node: ServerState) -> None:
    await make_account(node.storage, "tiny@example.org", quota=100_000)

    def send() -> dict[str, tuple[int, bytes]]:
        with client(node) as s:
            return s.sendmail("x@remote.test", ["tiny@example.org"], MESSAGE)

    assert await asyncio.to_thread(send) == {}
    assert node.storage.recipients.get("tiny@example.org") is None


async def test_size_limit(node: ServerState) -> None:
    def run() -> tuple[tuple[int, bytes], int]:
        with client(node) as s:
            s.ehlo("client.test")
            declared = s.mail("x@remote.test", ["SIZE=900000"])
            s.rset()
            s.mail("x@remote.test")
            s.rcpt("alice@example.org")
            code, _ = s.data(MESSAGE + (b"y" * 998 + b"\r\n") * 300)
            return declared, code

    declared, code = await asyncio.to_thread(run)
    assert declared[0] == 552
    assert code == 552
    assert await inbox(node, "alice@example.org") == []


async def test_too_many_recipients(node: ServerState) -> None:
    await node.storage.directory.set_catchall("example.org", "alice@example.org")

    def run() -> list[int]:
        with client(node) as s:
            s.ehlo("c")
            s.mail("x@remote.test")
            return [s.rcpt(f"u{i}@example.org")[0] for i in range(7)]

    codes = await asyncio.to_thread(run)
    assert codes == [250] * 5 + [452, 452]


async def test_broken_mime_and_8bit_junk_are_delivered_intact(node: ServerState) -> None:
    junk = (
        b"Content-Type: multipart/mixed; boundary=\"never-closed\"\r\n"
        b"Subject: \xff\xfe broken \x80\r\n\r\n"
        b"--never-closed\r\nContent-Type: text/plain; charset=bogus\r\n"
        b"Content-Transfer-Encoding: base64\r\n\r\n!!!not base64\x00\x01\r\n"
    )

    def run() -> dict[str, tuple[int, bytes]]:
        with client(node) as s:
            return s.sendmail("x@remote.test", ["alice@example.org"], junk)

    assert await asyncio.to_thread(run) == {}
    [raw] = await inbox(node, "alice@example.org")
    assert raw.endswith(junk)


async def test_garbage_commands_keep_the_node_serving(node: ServerState) -> None:
    def run() -> list[bytes]:
        replies = []
        with socket.create_connection(("127.0.0.1", node.ports["smtp"]), timeout=10) as sock:
            f = sock.makefile("rb")
            replies.append(f.readline())
            for line in (b"\xff\xfe\x00garbage\r\n", b"MAIL FROM:<<<>>>\r\n", b"RCPT TO:<a@b>\r\n", b"X" * 5000 + b"\r\n", b"DATA\r\n", b"HELO\r\n"):
                sock.sendall(line)
                replies.append(f.readline())
        return replies

    replies = await asyncio.to_thread(run)
    assert replies[0].startswith(b"220 ")
    assert all(r[:1] in (b"5",) for r in replies[1:]), replies
    # Every error reply carries an enhanced status code.
    assert all(r[4:5].isdigit() and r[5:6] == b"." for r in replies[1:]), replies

    def send() -> dict[str, tuple[int, bytes]]:
        with client(node) as s:
            return s.sendmail("x@remote.test", ["alice@example.org"], MESSAGE)

    assert await asyncio.to_thread(send) == {}


async def test_pipelined_transaction(node: ServerState) -> None:
    def run() -> list[bytes]:
        with socket.create_connection(("127.0.0.1", node.ports["smtp"]), timeout=10) as sock:
            f = sock.makefile("rb")
            f.readline()
            sock.sendall(b"EHLO c\r\n")
            while not f.readline().startswith(b"250 "):
                pass
            sock.sendall(b"MAIL FROM:<x@remote.test>\r\nRCPT TO:<alice@example.org>\r\nRCPT TO:<bob@example.org>\r\nDATA\r\n")
            replies = [f.readline() for _ in range(4)]
            sock.sendall(MESSAGE + b".\r\nQUIT\r\n")
            replies += [f.readline(), f.readline()]
        return replies

    replies = await asyncio.to_thread(run)
    assert [r[:3] for r in replies] == [b"250", b"250", b"250", b"354", b"250", b"221"]
    assert len(await inbox(node, "bob@example.org")) == 1


async def test_starttls_and_smtputf8(node: ServerState) -> None:
    await node.storage.directory.add_alias("jösé@example.org", "alice@example.org")
    body = "From: jösé@remote.test\r\nSubject: ünïcode\r\n\r\nhéllo\r\n".encode()

    def run() -> dict[str, tuple[int, bytes]]:
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        with client(node) as s:
            s.starttls(context=ctx)
            s.ehlo("client.test")
            assert s.has_extn("smtputf8")
            return s.sendmail("jösé@remote.test", ["jösé@example.org"], body, mail_options=["SMTPUTF8"])

    assert await asyncio.to_thread(run) == {}
    [raw] = await inbox(node, "alice@example.org")
    assert raw.endswith(body)
    assert b"with ESMTPS id" in raw
