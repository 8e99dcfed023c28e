"""IMAP session: scripted conversations over an in-memory transport.

``ImapSession.handle(parse_command(...))`` is driven directly with a fake
connection (no sockets), so the peer's address and TLS state can be anything:
a non-loopback client in clear text is what LOGINDISABLED is for.
"""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncIterator

import pytest
from helpers import make_account

from protocols.imap import commands as c
from protocols.imap.parse import parse_command
from protocols.imap.session import ImapSession, ImapSettings, LineTooLong, Logout
from protocols.push import PushHub
from storage import Storage

MESSAGE = b"From: a@remote.test\r\nSubject: hi\r\n\r\nbody\r\n"


class FakeConn:
    """The session's ``Connection`` over in-memory queues."""

    def __init__(self, *, peer: str = "192.0.2.10:50000", tls: bool = False, loopback: bool = False) -> None:
        self.peer = peer
        self.tls = tls
        self.loopback = loopback
        self.out = bytearray()
        self.incoming: asyncio.Queue[bytes | None] = asyncio.Queue()
        self.tls_started = 0
        self.wrote = asyncio.Event()

    async def write(self, data: bytes, more: bool = False) -> None:
        self.out += data
        self.wrote.set()

    async def read_line(self, timeout: float) -> bytes | None:
        try:
            return await asyncio.wait_for(self.incoming.get(), timeout)
        except asyncio.TimeoutError:
            return None

    async def start_tls(self) -> None:
        self.tls = True
        self.tls_started += 1

    def feed(self, *lines: bytes | None) -> None:
        for line in lines:
            self.incoming.put_nowait(line)

    def take(self) -> list[bytes]:
        data = bytes(self.out)
        self.out.clear()
        return [line + b"\r\n" for line in data.split(b"\r\n") if line]


class Script:
    def __init__(self, storage: Storage, hub: PushHub, conn: FakeConn, **settings: object) -> None:
        self.conn = conn
        self.session = ImapSession(storage, hub, ImapSettings(hostname="mx.test", **settings), conn)  # type: ignore[arg-type]
        self.n = 0

    async def __call__(self, text: bytes | str) -> list[bytes]:
        """Run one command; return everything the session wrote."""
        if isinstance(text, str):
            text = text.encode()
        self.n += 1
        await self.session.handle(parse_command(b"t%d " % self.n + text + b"\r\n"))
        return self.conn.take()

    @property
    def tag(self) -> bytes:
        return b"t%d" % self.n

    async def ok(self, text: bytes | str) -> list[bytes]:
        lines = await self(text)
        assert lines and lines[-1].startswith(self.tag + b" OK"), (text, lines)
        return lines[:-1]


@pytest.fixture
async def hub(storage: Storage) -> AsyncIterator[PushHub]:
    h = PushHub(poll_interval=0.5)
    storage.mail.on_change(h.publish)
    yield h


@pytest.fixture
async def alice(storage: Storage) -> int:
    return await make_account(storage, "alice@example.org", "secret")


# -- LOGINDISABLED / PRIVACYREQUIRED ----------------------------------------------------------------------------


async def test_plaintext_remote_peer_gets_logindisabled(storage: Storage, hub: PushHub, alice: int) -> None:
    conn = FakeConn()
    s = Script(storage, hub, conn)
    greeting = s.session.greeting()
    assert b"LOGINDISABLED" in greeting and b"STARTTLS" in greeting and b"AUTH=PLAIN" not in greeting
    [capline, done] = await s("CAPABILITY")
    assert b" LOGINDISABLED" in capline and b"AUTH=" not in capline and done.startswith(b"t1 OK")
    [login] = await s("LOGIN alice@example.org secret")
    assert login.startswith(b"t2 NO [PRIVACYREQUIRED]")
    ir = base64.b64encode(b"\x00alice@example.org\x00secret")
    [auth] = await s(b"AUTHENTICATE PLAIN " + ir)
    assert auth.startswith(b"t3 NO [PRIVACYREQUIRED]")
    [auth2] = await s(b"AUTHENTICATE PLAIN")  # refused before any continuation
    assert auth2.startswith(b"t4 NO [PRIVACYREQUIRED]")
    assert s.session.state == c.State.NOT_AUTHENTICATED and s.session.account is None
    [bad] = await s("SELECT INBOX")
    assert bad.startswith(b"t5 BAD")


async def test_starttls_lifts_logindisabled(storage: Storage, hub: PushHub, alice: int) -> None:
    conn = FakeConn()
    s = Script(storage, hub, conn)
    [started] = await s("STARTTLS")
    assert started.startswith(b"t1 OK") and conn.tls_started == 1
    [capline, _] = await s("CAPABILITY")
    assert b"AUTH=PLAIN" in capline and b"STARTTLS" not in capline and b"LOGINDISABLED" not in capline
    [again] = await s("STARTTLS")
    assert again.startswith(b"t3 BAD") and conn.tls_started == 1
    [login] = await s("LOGIN alice@example.org secret")
    assert login.startswith(b"t4 OK [CAPABILITY ")
    assert s.session.state == c.State.AUTHENTICATED


async def test_allow_plaintext_auth_lifts_it(storage: Storage, hub: PushHub, alice: int) -> None:
    conn = FakeConn()
    s = Script(storage, hub, conn, allow_plaintext_auth=True)
    greeting = s.session.greeting()
    assert b"AUTH=PLAIN" in greeting and b"LOGINDISABLED" not in greeting
    [login] = await s("LOGIN alice@example.org secret")
    assert login.startswith(b"t1 OK")


async def test_loopback_peer_may_log_in_without_tls(storage: Storage, hub: PushHub, alice: int) -> None:
    s = Script(storage, hub, FakeConn(peer="127.0.0.1:4000", loopback=True))
    assert b"AUTH=PLAIN" in s.session.greeting()
    ir = base64.b64encode(b"\x00alice@example.org\x00secret")
    [auth] = await s(b"AUTHENTICATE PLAIN " + ir)
    assert auth.startswith(b"t1 OK")


async def test_tls_peer_login_and_failure(storage: Storage, hub: PushHub, alice: int) -> None:
    s = Script(storage, hub, FakeConn(tls=True))
    assert b"STARTTLS" not in s.session.greeting()
    [bad] = await s("LOGIN alice@example.org wrong")
    assert bad.startswith(b"t1 NO [AUTHENTICATIONFAILED]")
    [good] = await s('LOGIN "Alice@Example.org" "secret"')
    assert good.startswith(b"t2 OK")


# -- AUTHENTICATE exchanges ------------------------------------------------------------------------------------


async def test_authenticate_continuations(storage: Storage, hub: PushHub, alice: int) -> None:
    conn = FakeConn(tls=True)
    s = Script(storage, hub, conn)
    conn.feed(b"*\r\n")
    out = await s("AUTHENTICATE PLAIN")
    assert out[0].startswith(b"+") and out[1].startswith(b"t1 BAD")
    conn.feed(b"!!!not base64!!!\r\n")
    out = await s("AUTHENTICATE PLAIN")
    assert out[0].startswith(b"+") and out[1].startswith(b"t2 BAD")
    conn.feed(base64.b64encode(b"only-two\x00parts") + b"\r\n")
    out = await s("AUTHENTICATE PLAIN")
    assert out[1].startswith(b"t3 BAD")
    [unsupported] = await s("AUTHENTICATE CRAM-MD5")
    assert unsupported.startswith(b"t4 NO")
    conn.feed(base64.b64encode(b"\x00alice@example.org\x00secret") + b"\r\n")
    out = await s("AUTHENTICATE PLAIN")
    assert out[0].startswith(b"+") and out[1].startswith(b"t5 OK")
    assert s.session.account is not None and s.session.account.email == "alice@example.org"


async def test_overlong_authenticate_response_is_bad(storage: Storage, hub: PushHub, alice: int) -> None:
    class Overlong(FakeConn):
        async def read_line(self, timeout: float) -> bytes | None:
            raise LineTooLong()

    conn = Overlong(tls=True)
    s = Script(storage, hub, conn)
    out = await s("AUTHENTICATE PLAIN")
    assert out[0].startswith(b"+") and out[1].startswith(b"t1 BAD [TOOBIG]")
    assert s.session.account is None


async def test_authenticate_client_gone_mid_exchange(storage: Storage, hub: PushHub, alice: int) -> None:
    conn = FakeConn(tls=True)
    s = Script(storage, hub, conn)
    conn.feed(None)
    with pytest.raises(Logout):
        await s("AUTHENTICATE PLAIN")


async def test_logout(storage: Storage, hub: PushHub) -> None:
    conn = FakeConn()
    s = Script(storage, hub, conn)
    with pytest.raises(Logout):
        await s("LOGOUT")
    assert conn.take() == [b"* BYE Logging out\r\n", b"t1 OK LOGOUT completed\r\n"]


async def test_wrong_state_is_bad_and_counted(storage: Storage, hub: PushHub, alice: int) -> None:
    s = Script(storage, hub, FakeConn(loopback=True))
    for cmd in ("SELECT INBOX", "FETCH 1 FLAGS", "LIST \"\" *", "IDLE"):
        [line] = await s(cmd)
        assert line.startswith(s.tag + b" BAD"), line
    assert s.session.bad_commands == 4
    await s.ok("LOGIN alice@example.org secret")
    for cmd in ("LOGIN a b", "STARTTLS", "FETCH 1 FLAGS", "EXPUNGE", "CLOSE"):
        [line] = await s(cmd)
        assert line.startswith(s.tag + b" BAD"), line


# -- selected state across sessions ----------------------------------------------------------------------------


async def logged_in(storage: Storage, hub: PushHub) -> tuple[Script, FakeConn]:
    conn = FakeConn(loopback=True)
    s = Script(storage, hub, conn)
    await s.ok("LOGIN alice@example.org secret")
    return s, conn


async def test_missing_mailbox_codes(storage: Storage, hub: PushHub, alice: int) -> None:
    s, _ = await logged_in(storage, hub)
    [sel] = await s("SELECT Nope")
    assert sel.startswith(b"t2 NO [NONEXISTENT]")
    [status] = await s("STATUS Nope (MESSAGES)")
    assert status.startswith(b"t3 NO [NONEXISTENT]")
    [append] = await s(b"APPEND Nope {%d+}\r\n" % len(MESSAGE) + MESSAGE)
    assert append.startswith(b"t4 NO [TRYCREATE]")
    await s.ok("SELECT INBOX")
    [copy] = await s("COPY 1:* Nope")
    assert copy.startswith(b"t6 NO [TRYCREATE]") or copy.startswith(b"t6 OK")


async def test_other_session_changes_reach_noop_not_fetch(storage: Storage, hub: PushHub, alice: int) -> None:
    for i in range(4):
        await storage.mail.append(alice, "INBOX", MESSAGE + b"%d\r\n" % i)
    a, _ = await logged_in(storage, hub)
    b, _ = await logged_in(storage, hub)
    await a.ok("SELECT INBOX")
    await b.ok("SELECT INBOX")
    await a.ok("STORE 1 +FLAGS (\\Answered)")
    await a.ok("STORE 3 +FLAGS.SILENT (\\Deleted)")
    assert await a.ok("EXPUNGE") == [b"* 3 EXPUNGE\r\n"]
    await storage.mail.append(alice, "INBOX", MESSAGE)
    fetched = await b.ok("FETCH 1:4 (UID)")
    # FLAGS changes and new messages may come during FETCH; EXPUNGE may not.
    assert not any(b"EXPUNGE" in line for line in fetched)
    assert [line for line in fetched if b"(UID" in line] == [b"* %d FETCH (UID %d)\r\n" % (i, i) for i in range(1, 5)]
    assert b"* 1 FETCH (FLAGS (\\Answered))\r\n" in fetched and b"* 5 EXISTS\r\n" in fetched
    assert await b.ok("NOOP") == [b"* 3 EXPUNGE\r\n"]
    assert await b.ok("FETCH 1:* (UID)") == [b"* 1 FETCH (UID 1)\r\n", b"* 2 FETCH (UID 2)\r\n",
                                           b"* 3 FETCH (UID 4)\r\n", b"* 4 FETCH (UID 5)\r\n"]


async def test_idle_reports_changes_and_ends_on_done(storage: Storage, hub: PushHub, alice: int) -> None:
    await storage.mail.append(alice, "INBOX", MESSAGE)
    s, conn = await logged_in(storage, hub)
    await s.ok("SELECT INBOX")
    s.n += 1
    task = asyncio.create_task(s.session.handle(parse_command(b"t%d IDLE\r\n" % s.n)))

    async def wait_for(text: bytes) -> None:
        while text not in conn.out:
            conn.wrote.clear()
            await asyncio.wait_for(conn.wrote.wait(), 2)

    await wait_for(b"+ idling")
    box = await storage.mail.mailbox(alice, "INBOX")
    await storage.mail.append(alice, "INBOX", MESSAGE)
    await wait_for(b"* 2 EXISTS\r\n")
    await storage.mail.store_flags(alice, box.id, [1], "add", ["\\Flagged"])
    await wait_for(b"* 1 FETCH (FLAGS (\\Flagged))\r\n")
    conn.feed(b"DONE\r\n")
    await asyncio.wait_for(task, 2)
    assert conn.take()[-1] == b"t%d OK IDLE terminated\r\n" % s.n


async def test_idle_reports_a_change_committed_while_it_wrote_the_one_before(storage: Storage, hub: PushHub, alice: int) -> None:
    # The notification of the third message comes while the session is busy
    # writing the second's EXISTS: the next wait must end at once, not when
    # the minute-long recheck comes round.
    s, conn = await logged_in(storage, hub)
    await s.ok("SELECT INBOX")
    write = conn.write

    async def write_then_append(data: bytes, more: bool = False) -> None:
        await write(data, more)
        if b"* 2 EXISTS" in data:
            await storage.mail.append(alice, "INBOX", MESSAGE)

    conn.write = write_then_append  # type: ignore[method-assign]
    s.n += 1
    task = asyncio.create_task(s.session.handle(parse_command(b"t%d IDLE\r\n" % s.n)))
    while b"+ idling" not in conn.out:
        conn.wrote.clear()
        await asyncio.wait_for(conn.wrote.wait(), 2)
    await storage.mail.append(alice, "INBOX", MESSAGE)
    await storage.mail.append(alice, "INBOX", MESSAGE)
    while b"* 3 EXISTS\r\n" not in conn.out:
        conn.wrote.clear()
        await asyncio.wait_for(conn.wrote.wait(), 2)
    conn.feed(b"DONE\r\n")
    await asyncio.wait_for(task, 2)
    assert conn.take()[-1] == b"t%d OK IDLE terminated\r\n" % s.n


async def test_idle_without_done_is_bad(storage: Storage, hub: PushHub, alice: int) -> None:
    s, conn = await logged_in(storage, hub)
    conn.feed(b"NOOP\r\n")
    out = await s("IDLE")
    assert out[0].startswith(b"+") and out[-1].startswith(s.tag + b" BAD")


async def test_mailbox_names_in_and_out(storage: Storage, hub: PushHub, alice: int) -> None:
    s, _ = await logged_in(storage, hub)
    await s.ok("CREATE Entw&APw-rfe")
    names = [b.name for b in await storage.mail.mailboxes(alice)]
    assert "Entwürfe" in names
    assert await s.ok('LIST "" Entw*') == [b'* LIST (\\HasNoChildren) "/" "Entw&APw-rfe"\r\n']
    await s.ok("ENABLE UTF8=ACCEPT")
    assert await s.ok('LIST "" Entw*') == ['* LIST (\\HasNoChildren) "/" "Entwürfe"\r\n'.encode()]
    # With UTF8=ACCEPT, names are taken as UTF-8, not decoded from mUTF-7.
    await s.ok("CREATE Entw&APw-rfe")
    assert "Entw&APw-rfe" in [b.name for b in await storage.mail.mailboxes(alice)]


# -- NUL in literals, FLAGS after a session's own new keyword ----------------------------------------------


async def test_nul_bytes_never_go_out_in_a_plain_literal(storage: Storage, hub: PushHub, alice: int) -> None:
    raw = b"From: a@remote.test\r\nSubject: nul\r\nContent-Type: application/octet-stream\r\n" \
          b"Content-Transfer-Encoding: binary\r\n\r\nab\x00cd\r\n"
    await storage.mail.append(alice, "INBOX", raw)
    s = Script(storage, hub, FakeConn(loopback=True))
    await s.ok("LOGIN alice@example.org secret")
    await s.ok("SELECT INBOX")
    body = b"".join(await s.ok("FETCH 1 (BODY.PEEK[] RFC822.TEXT)"))
    assert b"\x00" not in body and body.count(b"ab\x80cd") == 2
    # BINARY[] carries the exact bytes, in a literal8 (RFC 3516 §4.2).
    binary = b"".join(await s.ok("FETCH 1 (BINARY.PEEK[1])"))
    assert b"~{" in binary and b"ab\x00cd" in binary


async def test_own_store_of_a_new_keyword_updates_flags(storage: Storage, hub: PushHub, alice: int) -> None:
    await storage.mail.append(alice, "INBOX", MESSAGE)
    s = Script(storage, hub, FakeConn(loopback=True))
    await s.ok("LOGIN alice@example.org secret")
    select = b"".join(await s.ok("SELECT INBOX"))
    assert b"$Project" not in select
    lines = await s.ok("STORE 1 +FLAGS ($Project)")
    assert lines[0].startswith(b"* FLAGS (") and b"$Project" in lines[0]
    # Known from now on: a second STORE of it sends no FLAGS again.
    lines = await s.ok("STORE 1 -FLAGS ($Project)")
    assert not any(line.startswith(b"* FLAGS") for line in lines)
