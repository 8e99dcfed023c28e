"""Inbound SMTP end to end: smtplib and raw sockets against a real node."""

from __future__ import annotations

import asyncio
import smtplib
import socket
import ssl
import time
from pathlib import Path

import pytest
from helpers import make_account, node_config, rookery, running_node

from server.node import ServerState
from storage import keys, mail

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
    # The directory check would drop cached RCPT answers on its own clock;
    # the cache tests below decide when the cache is stale.
    cfg = node_config(
        tmp_path / "data", smtp__max_recipients=5, smtp__max_message_size=200_000, cluster__directory_check=3600,
    )
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
    await node.storage.directory.add_catchall("example.org", "bob@example.org")
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


async def _usage(state: ServerState, email: str) -> tuple[int, int]:
    acct = (await state.storage.directory.get(email)).id
    return await state.storage.db.read(lambda tr: mail.quota_usage(tr, acct))


async def test_one_recipient_over_quota_at_data_stores_the_message_for_none(node: ServerState) -> None:
    await make_account(node.storage, "tiny@example.org", quota=1000)
    big = MESSAGE + (b"x" * 78 + b"\r\n") * 25  # fits tiny's empty box at RCPT, not at DATA

    def send(rcpts: list[str]) -> dict[str, tuple[int, bytes]]:
        with client(node) as s:
            return s.sendmail("x@remote.test", rcpts, big)

    with pytest.raises(smtplib.SMTPDataError) as err:
        await asyncio.to_thread(send, ["alice@example.org", "tiny@example.org"])
    assert err.value.smtp_code == 452
    assert await inbox(node, "alice@example.org") == [] and await inbox(node, "tiny@example.org") == []
    assert await _usage(node, "alice@example.org") == (0, 0) and await _usage(node, "tiny@example.org") == (0, 0)
    # Without the full mailbox, the same message goes through, once.
    assert await asyncio.to_thread(send, ["alice@example.org"]) == {}
    [stored] = await inbox(node, "alice@example.org")
    assert stored.endswith(big)


async def test_an_account_removed_between_rcpt_and_data_stores_the_message_for_none(
    node: ServerState, tmp_path: Path
) -> None:
    s = await asyncio.to_thread(client, node)
    try:
        def envelope() -> None:
            s.ehlo("client.test")
            assert s.mail("x@remote.test")[0] == 250
            assert s.rcpt("alice@example.org")[0] == 250
            assert s.rcpt("bob@example.org")[0] == 250

        await asyncio.to_thread(envelope)
        # Another process removes bob while the transaction is open.
        await asyncio.to_thread(rookery, "account", "remove", "bob@example.org", data=tmp_path / "data")
        code, reply = await asyncio.to_thread(s.data, MESSAGE)
        assert (code, reply[:5]) == (451, b"4.1.0"), (code, reply)
        # The session goes on; the client's retry gets the new answer at RCPT.
        await asyncio.to_thread(s.rset)
        with pytest.raises(smtplib.SMTPRecipientsRefused) as refused:
            await asyncio.to_thread(s.sendmail, "x@remote.test", ["bob@example.org"], MESSAGE)
        assert refused.value.recipients["bob@example.org"][0] == 550
    finally:
        await asyncio.to_thread(s.close)
    assert await inbox(node, "alice@example.org") == []
    assert await _usage(node, "alice@example.org") == (0, 0)


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
    await node.storage.directory.add_catchall("example.org", "alice@example.org")

    def run() -> list[int]:
        with client(node) as s:
            s.ehlo("c")
            s.mail("x@remote.test")
            codes = [s.rcpt(f"u{i}@example.org")[0] for i in range(30)]
            return codes + [s.noop()[0]]

    codes = await asyncio.to_thread(run)
    # 25 refusals past the limit are flow control, not errors: the session
    # outlives max_bad_commands (20).
    assert codes == [250] * 5 + [452] * 25 + [250]


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
            assert not s.has_extn("auth")  # not even a bare AUTH line once under TLS
            return s.sendmail("jösé@remote.test", ["jösé@example.org"], body, mail_options=["SMTPUTF8"])

    assert await asyncio.to_thread(run) == {}
    [raw] = await inbox(node, "alice@example.org")
    assert raw.endswith(body)
    assert b"with ESMTPS id" in raw


@pytest.fixture
async def strict_node(tmp_path: Path):
    cfg = node_config(
        tmp_path / "data", smtp__command_timeout=0.5, smtp__data_timeout=1.5, smtp__max_bad_commands=3,
    )
    async with running_node(cfg) as state:
        await make_account(state.storage, "alice@example.org")
        yield state


def _dialog(port: int, script: list[tuple[float, bytes]], replies: int, timeout: float = 10) -> list[bytes]:
    """Send each line after its pause, then read ``replies`` lines (or to EOF)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        f = sock.makefile("rb")
        out = [f.readline()]
        for pause, data in script:
            time.sleep(pause)
            try:
                sock.sendall(data)
            except OSError:  # closed by the server: read what it said
                break
        while len(out) < replies + 1:
            line = f.readline()
            out.append(line)
            if not line:
                break
        return out


async def test_idle_client_gets_421_before_the_close(strict_node: ServerState) -> None:
    replies = await asyncio.to_thread(_dialog, strict_node.ports["smtp"], [], 2)
    assert replies[0].startswith(b"220 ")
    assert replies[1].startswith(b"421 4.4.2"), replies
    assert replies[2] == b""  # then closed


async def test_data_that_keeps_coming_outlives_the_command_timer_but_not_its_deadline(strict_node: ServerState) -> None:
    start = [(0.0, b"HELO c\r\nMAIL FROM:<x@remote.test>\r\nRCPT TO:<alice@example.org>\r\nDATA\r\n")]
    # 1.2 s of steady lines, each gap shorter than the 0.5 s command timer.
    steady = start + [(0.3, b"line\r\n") for _ in range(4)] + [(0.0, b".\r\n")]
    replies = await asyncio.to_thread(_dialog, strict_node.ports["smtp"], steady, 5)
    assert [r[:3] for r in replies[1:6]] == [b"250", b"250", b"250", b"354", b"250"], replies
    # Steady again, but past the 1.5 s deadline of the whole transfer.
    endless = start + [(0.3, b"line\r\n") for _ in range(8)]
    replies = await asyncio.to_thread(_dialog, strict_node.ports["smtp"], endless, 6)
    assert replies[5].startswith(b"421 4.4.2"), replies
    assert len(await inbox(strict_node, "alice@example.org")) == 1


async def test_too_many_errors_end_the_session(strict_node: ServerState) -> None:
    script = [(0.0, b"HELO c\r\nMAIL FROM:<x@remote.test>\r\n")]
    script += [(0.0, f"RCPT TO:<nobody{i}@example.org>\r\n".encode()) for i in range(3)]
    replies = await asyncio.to_thread(_dialog, strict_node.ports["smtp"], script, 7)
    assert [r[:3] for r in replies[1:]] == [b"250", b"250", b"550", b"550", b"550", b"421", b""], replies


async def test_a_data_line_over_998_octets_is_refused(node: ServerState) -> None:
    def run(line_length: int) -> tuple[int, bytes]:
        with client(node) as s:
            s.ehlo("client.test")
            s.mail("x@remote.test")
            s.rcpt("alice@example.org")
            code, text = s.data(b"Subject: long\r\n\r\n" + b"a" * line_length + b"\r\n")
            # The session goes on after a refusal.
            assert s.noop()[0] == 250
            return code, text

    assert (await asyncio.to_thread(run, 998))[0] == 250
    code, text = await asyncio.to_thread(run, 999)
    assert code == 500 and text.startswith(b"5.5.2"), text
    assert len(await inbox(node, "alice@example.org")) == 1


async def test_non_ascii_addresses_need_smtputf8(node: ServerState) -> None:
    script = [(0.0, "EHLO c\r\nMAIL FROM:<jösé@remote.test>\r\nMAIL FROM:<x@remote.test>\r\n"
                    "RCPT TO:<jösé@example.org>\r\nRSET\r\nMAIL FROM:<jösé@remote.test> SMTPUTF8\r\n".encode())]

    def run() -> list[bytes]:
        with socket.create_connection(("127.0.0.1", node.ports["smtp"]), timeout=10) as sock:
            f = sock.makefile("rb")
            f.readline()
            sock.sendall(script[0][1])
            finals: list[bytes] = []
            while len(finals) < 6:
                line = f.readline()
                if line[3:4] == b" " or not line:  # skip EHLO's keyword lines
                    finals.append(line)
            return finals

    replies = await asyncio.to_thread(run)
    assert replies[1].startswith(b"553 5.6.7"), replies  # MAIL without SMTPUTF8
    assert replies[2].startswith(b"250 ")
    assert replies[3].startswith(b"553 5.6.7"), replies  # RCPT without SMTPUTF8
    assert replies[4].startswith(b"250 ") and replies[5].startswith(b"250 "), replies  # RSET; MAIL with it


async def test_a_store_failure_at_rcpt_is_temporary_and_the_session_goes_on(
    node: ServerState, monkeypatch: pytest.MonkeyPatch
) -> None:
    from storage.kv.base import StoreUnavailable

    storage_class = type(node.storage)
    real = storage_class.accept_recipient
    calls = 0

    async def failing_once(self, address: str, size: int = 0):  # type: ignore[no-untyped-def]
        nonlocal calls
        calls += 1
        if calls == 1:
            raise StoreUnavailable("store down (test)")
        return await real(self, address, size)

    monkeypatch.setattr(storage_class, "accept_recipient", failing_once)

    def run() -> tuple[tuple[int, bytes], tuple[int, bytes]]:
        with client(node) as s:
            s.ehlo("client.test")
            s.mail("x@remote.test")
            first = s.rcpt("alice@example.org")
            second = s.rcpt("alice@example.org")
            return first, second

    first, second = await asyncio.to_thread(run)
    assert first[0] == 451 and first[1].startswith(b"4.3.0"), first
    assert second[0] == 250


async def test_postmaster_is_always_taken(node: ServerState) -> None:
    """RFC 5321 §4.5.1: postmaster@ every hosted domain, and bare <Postmaster>,
    are accepted; the domain's first account has it until an admin moves it,
    and it moves on when that account goes."""

    def send(rcpt: str) -> dict[str, tuple[int, bytes]]:
        with client(node) as s:
            return s.sendmail("x@remote.test", [rcpt], MESSAGE)

    assert await asyncio.to_thread(send, "PostMaster@example.org") == {}
    assert await asyncio.to_thread(send, "Postmaster") == {}  # smtplib sends <Postmaster>
    assert len(await inbox(node, "alice@example.org")) == 2
    await node.storage.remove_account("alice@example.org")
    assert await asyncio.to_thread(send, "postmaster@example.org") == {}
    assert len(await inbox(node, "bob@example.org")) == 1
