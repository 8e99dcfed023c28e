"""IMAP end to end: imaplib, imapclient and raw sockets against a real node.

The node runs in the test's loop (``running_node``); the blocking clients run
in ``asyncio.to_thread``. Raw sockets (:class:`Wire`) are used wherever the
exact wire matters: the order of untagged lines, response codes, literals,
hostile input.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import imaplib
import re
import smtplib
import socket
import ssl
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from types import TracebackType
from typing import TypeVar

import pytest
from helpers import make_account, node_config, running_node
from imapclient import IMAPClient

from protocols.imap.server import ImapListener
from protocols.imap.session import ImapSettings
from server.node import ServerState

T = TypeVar("T")

# -- messages -------------------------------------------------------------------------

ATTACHMENT = b"\x00\x01\x02binary\xff\xfe\r\nmore"
ATTACHMENT_B64 = base64.b64encode(ATTACHMENT)
PART1_BODY = b"Hello body, line one.\r\nLine two."
INNER = b"Subject: inner\r\nFrom: Carol <carol@inner.test>\r\n\r\ninner body\r\n"
PART2_MIME = (
    b'Content-Type: application/octet-stream; name="a.bin"\r\n'
    b"Content-Transfer-Encoding: base64\r\n"
    b'Content-Disposition: attachment; filename="a.bin"\r\n'
    b"\r\n"
)
MULTIPART_HEADER = (
    b"From: Alice Example <alice@example.org>\r\n"
    b"To: Bob <bob@example.org>, carol@inner.test\r\n"
    b"Cc: Dave <dave@remote.test>\r\n"
    b"Subject: Multipart test\r\n"
    b"Date: Mon, 7 Feb 1994 21:52:25 -0800\r\n"
    b"Message-ID: <multi-1@example.org>\r\n"
    b"In-Reply-To: <parent@example.org>\r\n"
    b"MIME-Version: 1.0\r\n"
    b'Content-Type: multipart/mixed; boundary="XYZ"\r\n'
    b"\r\n"
)
MULTIPART_TEXT = (
    b"This is the preamble.\r\n"
    b"--XYZ\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"\r\n" + PART1_BODY + b"\r\n"
    b"--XYZ\r\n" + PART2_MIME + ATTACHMENT_B64 + b"\r\n"
    b"--XYZ\r\n"
    b"Content-Type: message/rfc822\r\n"
    b"\r\n" + INNER + b"\r\n"
    b"--XYZ--\r\n"
)
MULTIPART = MULTIPART_HEADER + MULTIPART_TEXT


def simple(n: int, body: bytes = b"") -> bytes:
    return (
        b"From: Sender %d <s%d@remote.test>\r\n"
        b"To: alice@example.org\r\n"
        b"Subject: Message %d\r\n"
        b"Message-ID: <n%d@remote.test>\r\n"
        b"\r\n"
        b"Body of message %d\r\n" % (n, n, n, n, n)
    ) + body


# -- a raw IMAP client ----------------------------------------------------------------

_LITERAL_END = re.compile(rb"~?\{(\d+)\}\r\n\Z")


def insecure_context() -> ssl.SSLContext:
    """The node's certificate is self-signed: no verification in tests."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


class Wire:
    """A line-level IMAP client for exact wire checks (blocking)."""

    def __init__(self, port: int, *, tls: bool = False, timeout: float = 10.0) -> None:
        sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        if tls:
            sock = insecure_context().wrap_socket(sock, server_hostname="localhost")
        self.sock: socket.socket = sock
        self.buf = b""
        self.counter = 0
        try:
            self.greeting = self.line()
        except BaseException:
            sock.close()
            raise

    def _fill(self) -> None:
        data = self.sock.recv(65536)
        if not data:
            raise EOFError("server closed the connection")
        self.buf += data

    def _exactly(self, n: int) -> bytes:
        while len(self.buf) < n:
            self._fill()
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def _raw_line(self) -> bytes:
        while b"\r\n" not in self.buf:
            self._fill()
        i = self.buf.index(b"\r\n") + 2
        out, self.buf = self.buf[:i], self.buf[i:]
        return out

    def line(self) -> bytes:
        """One response line, with the data of any literals it carries inline."""
        out = self._raw_line()
        while (m := _LITERAL_END.search(out)) is not None:
            out += self._exactly(int(m.group(1)))
            out += self._raw_line()
        return out

    def at_eof(self) -> bool:
        """True when the server closed the connection (nothing left to read)."""
        if self.buf:
            return False
        try:
            return self.sock.recv(1) == b""
        except (ConnectionResetError, BrokenPipeError):
            return True

    def until(self, tag: bytes) -> tuple[list[bytes], bytes]:
        """Untagged lines up to the tagged completion of ``tag``."""
        untagged: list[bytes] = []
        while True:
            line = self.line()
            if line.startswith(tag + b" "):
                return untagged, line
            untagged.append(line)

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def next_tag(self) -> bytes:
        self.counter += 1
        return b"t%d" % self.counter

    def cmd(self, text: bytes | str) -> tuple[list[bytes], bytes]:
        """One command without synchronizing literals: (untagged, tagged)."""
        if isinstance(text, str):
            text = text.encode()
        tag = self.next_tag()
        self.send(tag + b" " + text + b"\r\n")
        return self.until(tag)

    def ok(self, text: bytes | str) -> list[bytes]:
        untagged, tagged = self.cmd(text)
        assert tagged.split(b" ", 2)[1] == b"OK", (text, untagged, tagged)
        return untagged

    def named(self, commands: list[tuple[str, str]]) -> dict[str, list[bytes]]:
        """Run each ``(name, command)`` with ``name`` as its tag (so replies
        such as ESEARCH's ``(TAG "name")`` are predictable); each must be OK.
        Returns the untagged lines of each, by name."""
        out = {}
        for name, command in commands:
            self.send(name.encode() + b" " + command.encode() + b"\r\n")
            untagged, tagged = self.until(name.encode())
            assert status_word(tagged) == b"OK", (command, tagged)
            out[name] = untagged
        return out

    def cmd_literals(self, *pieces: bytes) -> tuple[list[bytes], bytes]:
        """``cmd_literals(b"APPEND INBOX ", data, b" ", data2, b"")``: the odd
        pieces go as synchronizing literals, each after the server's ``+``."""
        tag = self.next_tag()
        head = tag + b" " + pieces[0]
        rest = list(pieces[1:])
        while rest:
            data = rest.pop(0)
            self.send(head + b"{%d}\r\n" % len(data))
            cont = self.line()
            assert cont.startswith(b"+ "), cont
            self.send(data)
            head = rest.pop(0) if rest else b""
        self.send(head + b"\r\n")
        return self.until(tag)

    def append_plus(self, mailbox: bytes, data: bytes) -> tuple[list[bytes], bytes]:
        """APPEND with a non-synchronizing literal (LITERAL+, RFC 7888)."""
        tag = self.next_tag()
        self.send(tag + b" APPEND " + mailbox + b" {%d+}\r\n" % len(data) + data + b"\r\n")
        return self.until(tag)

    def login(self, user: str = "alice@example.org", password: str = "secret") -> None:
        self.ok(f'LOGIN "{user}" "{password}"')

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Wire:
        return self

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.close()


def code(tagged: bytes) -> bytes:
    """The response code of a tagged line: ``t1 OK [CODE x] text`` -> ``CODE x``."""
    m = re.match(rb"\S+ \S+ \[([^\]]*)\]", tagged)
    return m.group(1) if m else b""


def status_word(tagged: bytes) -> bytes:
    return tagged.split(b" ", 2)[1]


def fetch_lines(untagged: list[bytes]) -> list[bytes]:
    return [u for u in untagged if re.match(rb"\* \d+ FETCH ", u)]


# -- the node -------------------------------------------------------------------------


@dataclass
class Node:
    state: ServerState
    alice: int
    bob: int

    @property
    def port(self) -> int:
        return self.state.ports["imap"]

    async def seed(self, acct: int, *raws: bytes, mailbox: str = "INBOX", flags: tuple[str, ...] = (), when: int | None = None) -> list[int]:
        uids = []
        for raw in raws:
            _, uid = await self.state.storage.mail.append(acct, mailbox, raw, flags, when)
            uids.append(uid)
        return uids


@pytest.fixture
async def node(tmp_path: Path) -> AsyncIterator[Node]:
    cfg = node_config(
        tmp_path / "data",
        listen=("smtp", "imap", "imaps"),
        imap__max_literal=100_000,
        smtp__max_message_size=200_000,
        imap__max_bad_commands=20,
    )
    async with running_node(cfg) as state:
        alice = await make_account(state.storage, "alice@example.org", "secret")
        bob = await make_account(state.storage, "bob@example.org", "hunter2")
        yield Node(state, alice, bob)


async def run(fn: Callable[[], T]) -> T:
    return await asyncio.to_thread(fn)


def wire(node: Node, **kw: object) -> Wire:
    return Wire(node.port, **kw)  # type: ignore[arg-type]


def client(node: Node) -> IMAPClient:
    c = IMAPClient("127.0.0.1", port=node.port, ssl=False, timeout=10)
    c.normalise_times = False
    return c


# -- capabilities and authentication ------------------------------------------------------------


async def test_capability_before_and_after_login(node: Node) -> None:
    def go() -> tuple[tuple[bytes, ...], tuple[bytes, ...]]:
        with imaplib.IMAP4("127.0.0.1", node.port, timeout=10) as m:
            before = tuple(c.encode() for c in m.capabilities)
            m.login("alice@example.org", "secret")
            typ, data = m.capability()
            assert typ == "OK"
            after = tuple(data[0].split())
            return before, after

    before, after = await run(go)
    assert b"IMAP4REV1" in before and b"STARTTLS" in before and b"AUTH=PLAIN" in before
    assert b"LOGINDISABLED" not in before  # loopback is trusted as Dovecot does
    assert b"UIDPLUS" not in before  # only after login
    for cap in (b"IMAP4rev1", b"IMAP4rev2", b"UIDPLUS", b"MOVE", b"CONDSTORE", b"QRESYNC", b"IDLE", b"NAMESPACE",
                b"LIST-EXTENDED", b"SPECIAL-USE", b"BINARY", b"MULTIAPPEND", b"LITERAL+", b"ENABLE", b"UTF8=ACCEPT",
                b"APPENDLIMIT=200000"):
        assert cap in after, cap
    assert b"STARTTLS" not in after and b"AUTH=PLAIN" not in after


async def test_greeting_and_login_response_carry_capabilities(node: Node) -> None:
    def go() -> tuple[bytes, bytes]:
        with wire(node) as w:
            _, tagged = w.cmd('LOGIN alice@example.org secret')
            return w.greeting, tagged

    greeting, tagged = await run(go)
    assert greeting.startswith(b"* OK [CAPABILITY IMAP4rev1 ")
    assert tagged.startswith(b"t1 OK [CAPABILITY IMAP4rev1 ")
    assert b" UIDPLUS " in tagged


async def test_login_good_and_bad(node: Node) -> None:
    def go() -> list[bytes]:
        out = []
        with wire(node) as w:
            for creds in ('alice@example.org wrong', 'nobody@example.org secret', '"bob@example.org" "secret"'):
                out.append(w.cmd(f"LOGIN {creds}")[1])
            out.append(w.cmd("LOGIN ALICE@EXAMPLE.ORG secret")[1])
            out.append(w.cmd("LIST \"\" INBOX")[1])
        return out

    wrong, unknown, other, good, listed = await run(go)
    for tagged in (wrong, unknown, other):
        assert status_word(tagged) == b"NO" and code(tagged) == b"AUTHENTICATIONFAILED", tagged
    # Same answer for an unknown user and a wrong password (no user probing).
    assert wrong.split(b"]", 1)[1] == unknown.split(b"]", 1)[1]
    assert status_word(good) == b"OK", good
    assert status_word(listed) == b"OK"

    def with_imaplib() -> str:
        with imaplib.IMAP4("127.0.0.1", node.port, timeout=10) as m:
            with pytest.raises(imaplib.IMAP4.error) as exc:
                m.login("alice@example.org", "nope")
            return str(exc.value)

    assert "AUTHENTICATIONFAILED" in await run(with_imaplib)


async def test_authenticate_plain_sasl_ir_and_continuation(node: Node) -> None:
    good = base64.b64encode(b"\x00alice@example.org\x00secret")
    bad = base64.b64encode(b"\x00alice@example.org\x00wrong")

    def go() -> list[bytes]:
        out = []
        with wire(node) as w:  # SASL-IR (RFC 4959)
            out.append(w.cmd(b"AUTHENTICATE PLAIN " + bad)[1])
            out.append(w.cmd(b"AUTHENTICATE PLAIN " + good)[1])
            out.append(w.cmd(b"SELECT INBOX")[1])
        with wire(node) as w:  # continuation
            w.send(b"a1 AUTHENTICATE PLAIN\r\n")
            out.append(w.line())
            w.send(b"*\r\n")  # cancel
            out.append(w.until(b"a1")[1])
            w.send(b"a2 AUTHENTICATE PLAIN\r\n")
            out.append(w.line())
            w.send(good + b"\r\n")
            out.append(w.until(b"a2")[1])
            out.append(w.cmd(b"SELECT INBOX")[1])
        return out

    bad_ir, good_ir, sel1, cont1, cancelled, cont2, good_cont, sel2 = await run(go)
    assert status_word(bad_ir) == b"NO" and code(bad_ir) == b"AUTHENTICATIONFAILED"
    assert status_word(good_ir) == b"OK" and status_word(sel1) == b"OK"
    assert cont1.startswith(b"+") and cont2.startswith(b"+")
    assert status_word(cancelled) == b"BAD"
    assert status_word(good_cont) == b"OK" and status_word(sel2) == b"OK"

    def with_imaplib() -> str:
        with imaplib.IMAP4("127.0.0.1", node.port, timeout=10) as m:
            typ, _ = m.authenticate("PLAIN", lambda _: b"\x00alice@example.org\x00secret")
            return typ

    assert await run(with_imaplib) == "OK"


async def test_starttls_then_login(node: Node) -> None:
    def go() -> tuple[bool, list[str], str]:
        with imaplib.IMAP4("127.0.0.1", node.port, timeout=10) as m:
            typ, _ = m.starttls(ssl_context=insecure_context())
            assert typ == "OK"
            caps = list(m.capabilities)
            typ, _ = m.login("alice@example.org", "secret")
            return isinstance(m.sock, ssl.SSLSocket), caps, typ

    is_tls, caps, typ = await run(go)
    assert is_tls and typ == "OK"
    assert "STARTTLS" not in caps and "AUTH=PLAIN" in caps

    def twice() -> bytes:
        with wire(node) as w:
            w.send(b"a STARTTLS\r\n")
            assert status_word(w.until(b"a")[1]) == b"OK"
            w.sock = insecure_context().wrap_socket(w.sock, server_hostname="localhost")
            return w.cmd("STARTTLS")[1]

    assert status_word(await run(twice)) == b"BAD"


async def test_implicit_tls_listener(node: Node) -> None:
    port = node.state.ports["imaps"]

    def go() -> tuple[str, list[bytes], tuple[str, ...]]:
        with imaplib.IMAP4_SSL("127.0.0.1", port, ssl_context=insecure_context(), timeout=10) as m:
            caps = m.capabilities
            typ, _ = m.login("alice@example.org", "secret")
            _, data = m.select("INBOX")
            return typ, data, caps

    typ, data, caps = await run(go)
    assert typ == "OK" and data == [b"0"]
    assert "STARTTLS" not in caps and "AUTH=PLAIN" in caps


async def test_logout_gives_bye_then_ok(node: Node) -> None:
    def go() -> tuple[list[bytes], bytes, bool]:
        with wire(node) as w:
            w.login()
            untagged, tagged = w.cmd("LOGOUT")
            return untagged, tagged, w.at_eof()

    untagged, tagged, eof = await run(go)
    assert untagged == [b"* BYE Logging out\r\n"]
    assert status_word(tagged) == b"OK"
    assert eof


# -- SELECT / EXAMINE -------------------------------------------------------------------------------


async def test_select_and_examine_responses(node: Node) -> None:
    await node.seed(node.alice, simple(1), simple(2), flags=("\\Seen",))
    await node.seed(node.alice, simple(3), flags=("$Important",))
    status = await node.state.storage.mail.status(node.alice, "INBOX")

    def go() -> tuple[list[bytes], bytes, list[bytes], bytes, bytes, bytes]:
        with wire(node) as w:
            w.login()
            sel, sel_tagged = w.cmd("SELECT INBOX")
            ex, ex_tagged = w.cmd("EXAMINE INBOX")
            store = w.cmd("STORE 1 +FLAGS (\\Flagged)")[1]
            expunge = w.cmd("EXPUNGE")[1]
            # A read-only mailbox: BODY[] does not set \Seen (RFC 9051 §6.3.3).
            body = w.ok("FETCH 3 (BODY[])")
            return sel, sel_tagged, ex, ex_tagged, store, expunge, body

    sel, sel_tagged, ex, ex_tagged, store, expunge, body = await run(go)
    assert b"\\Seen" not in body[0] and b"Body of message 3" in body[0]
    box = status.mailbox
    assert sel == [
        b"* FLAGS (\\Answered \\Flagged \\Deleted \\Seen \\Draft $Important)\r\n",
        b"* OK [PERMANENTFLAGS (\\Answered \\Flagged \\Deleted \\Seen \\Draft \\*)] Flags permitted\r\n",
        b"* 3 EXISTS\r\n",
        b"* 0 RECENT\r\n",
        b"* OK [UNSEEN 3] First unseen\r\n",
        b"* OK [UIDVALIDITY %d] UIDs valid\r\n" % box.uidvalidity,
        b"* OK [UIDNEXT 4] Predicted next UID\r\n",
        b"* OK [HIGHESTMODSEQ %d] Highest\r\n" % status.highestmodseq,
    ]
    assert code(sel_tagged) == b"READ-WRITE"
    # Selecting again closes the first mailbox (RFC 7162 §3.2.11 CLOSED).
    assert ex[0] == b"* OK [CLOSED] Previous mailbox closed\r\n"
    assert b"* OK [PERMANENTFLAGS ()] Flags permitted\r\n" in ex
    assert b"* 3 EXISTS\r\n" in ex
    assert code(ex_tagged) == b"READ-ONLY"
    assert status_word(store) == b"NO" and status_word(expunge) == b"NO"
    # Nothing changed.
    after = await node.state.storage.mail.status(node.alice, "INBOX")
    assert after.highestmodseq == status.highestmodseq and after.messages == 3


async def test_select_missing_mailbox_and_empty_mailbox(node: Node) -> None:
    def go() -> tuple[bytes, list[bytes], bytes, bytes]:
        with wire(node) as w:
            w.login()
            missing = w.cmd("SELECT Nonexistent")[1]
            empty = w.ok("SELECT Trash")
            # A failed SELECT leaves no mailbox selected (RFC 9051 §6.3.2).
            w.ok("SELECT INBOX")
            failed = w.cmd("SELECT Nope")[1]
            after = w.cmd("FETCH 1:* FLAGS")[1]
            return missing, empty, failed, after

    missing, empty, failed, after = await run(go)
    assert status_word(missing) == b"NO" and status_word(failed) == b"NO"
    assert code(missing) == b"NONEXISTENT"  # TRYCREATE is for APPEND/COPY/MOVE targets
    assert b"* 0 EXISTS\r\n" in empty
    assert not any(b"UNSEEN" in line for line in empty)
    # RFC 7162 §7: mod-sequence-value in HIGHESTMODSEQ is at least 1.
    [hms] = [line for line in empty if b"HIGHESTMODSEQ" in line]
    assert int(re.search(rb"HIGHESTMODSEQ (\d+)", hms).group(1)) >= 1
    assert status_word(after) == b"BAD"


# -- FETCH --------------------------------------------------------------------------------------------

WHEN = int(datetime(1996, 7, 17, 9, 44, 25, tzinfo=timezone.utc).timestamp())


async def test_fetch_metadata_envelope_bodystructure_with_imapclient(node: Node) -> None:
    [uid] = await node.seed(node.alice, MULTIPART, when=WHEN)

    def go() -> dict[bytes, object]:
        with client(node) as c:
            c.login("alice@example.org", "secret")
            c.select_folder("INBOX")
            res = c.fetch([uid], ["FLAGS", "UID", "INTERNALDATE", "RFC822.SIZE", "ENVELOPE", "BODYSTRUCTURE", "BODY"])
            return res[uid]

    data = await run(go)
    assert data[b"SEQ"] == 1 and data[b"FLAGS"] == ()  # imapclient keys the result by UID
    assert data[b"INTERNALDATE"] == datetime(1996, 7, 17, 9, 44, 25, tzinfo=timezone.utc)
    assert data[b"RFC822.SIZE"] == len(MULTIPART)
    env = data[b"ENVELOPE"]
    assert env.subject == b"Multipart test"
    assert env.date == datetime(1994, 2, 7, 21, 52, 25, tzinfo=timezone(timedelta(hours=-8)))
    assert [(a.name, a.mailbox, a.host) for a in env.from_] == [(b"Alice Example", b"alice", b"example.org")]
    assert env.sender == env.from_ and env.reply_to == env.from_  # RFC 9051 §7.5.2 defaults
    assert [(a.name, a.mailbox, a.host) for a in env.to] == [(b"Bob", b"bob", b"example.org"), (None, b"carol", b"inner.test")]
    assert [(a.name, a.mailbox, a.host) for a in env.cc] == [(b"Dave", b"dave", b"remote.test")]
    assert env.bcc is None
    assert env.in_reply_to == b"<parent@example.org>" and env.message_id == b"<multi-1@example.org>"

    bs = data[b"BODYSTRUCTURE"]
    assert bs.is_multipart
    parts, subtype = bs[0], bs[1]
    assert subtype == b"MIXED" and bs[2] == (b"BOUNDARY", b"XYZ")
    assert len(parts) == 3
    text, attach, msg = parts
    assert tuple(text[:8]) == (b"TEXT", b"PLAIN", (b"CHARSET", b"utf-8"), None, None, b"7BIT", len(PART1_BODY), 2)
    assert tuple(attach[:7]) == (b"APPLICATION", b"OCTET-STREAM", (b"NAME", b"a.bin"), None, None, b"BASE64", len(ATTACHMENT_B64))
    assert attach[8] == (b"ATTACHMENT", (b"FILENAME", b"a.bin"))
    assert tuple(msg[:7]) == (b"MESSAGE", b"RFC822", None, None, None, b"7BIT", len(INNER))
    inner_env = msg[7]
    assert inner_env[1] == b"inner"
    inner_from = inner_env[2][0]
    assert (inner_from[0], inner_from[2], inner_from[3]) == (b"Carol", b"carol", b"inner.test")
    inner_body = msg[8]
    assert tuple(inner_body[:7]) == (b"TEXT", b"PLAIN", (b"CHARSET", b"us-ascii"), None, None, b"7BIT", len(b"inner body\r\n"))
    assert msg[9] == INNER.count(b"\r\n")
    # BODY is BODYSTRUCTURE without extension data.
    body = data[b"BODY"]
    assert body.is_multipart and body[1] == b"MIXED" and len(body) == 2
    assert tuple(body[0][0]) == tuple(text[:8])


async def test_fetch_body_sections_exact_bytes(node: Node) -> None:
    [uid] = await node.seed(node.alice, MULTIPART)

    def go() -> dict[bytes, object]:
        with client(node) as c:
            c.login("alice@example.org", "secret")
            c.select_folder("INBOX")
            items = [
                "BODY.PEEK[]", "BODY.PEEK[1]", "BODY.PEEK[2]", "BODY.PEEK[2.MIME]", "BODY.PEEK[3]",
                "BODY.PEEK[3.HEADER]", "BODY.PEEK[3.TEXT]", "BODY.PEEK[3.1]",
                "BODY.PEEK[HEADER.FIELDS (Subject From)]", "BODY.PEEK[HEADER.FIELDS.NOT (Subject From To Cc Date Message-ID In-Reply-To)]",
                "BODY.PEEK[HEADER]", "BODY.PEEK[TEXT]", "BODY.PEEK[]<0.10>", "BODY.PEEK[TEXT]<5.7>",
                "BODY.PEEK[]<99999.10>",
            ]
            return c.fetch([uid], items)[uid]

    d = await run(go)
    assert d[b"BODY[]"] == MULTIPART
    assert d[b"BODY[1]"] == PART1_BODY
    assert d[b"BODY[2]"] == ATTACHMENT_B64
    assert d[b"BODY[2.MIME]"] == PART2_MIME
    assert d[b"BODY[3]"] == INNER
    assert d[b"BODY[3.HEADER]"] == INNER.split(b"\r\n\r\n")[0] + b"\r\n\r\n"
    assert d[b"BODY[3.TEXT]"] == b"inner body\r\n"
    assert d[b"BODY[3.1]"] == b"inner body\r\n"
    assert d[b"BODY[HEADER.FIELDS (SUBJECT FROM)]"] == b"From: Alice Example <alice@example.org>\r\nSubject: Multipart test\r\n\r\n"
    assert d[b"BODY[HEADER.FIELDS.NOT (SUBJECT FROM TO CC DATE MESSAGE-ID IN-REPLY-TO)]"] == (
        b'MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary="XYZ"\r\n\r\n'
    )
    assert d[b"BODY[HEADER]"] == MULTIPART_HEADER
    assert d[b"BODY[TEXT]"] == MULTIPART_TEXT
    assert d[b"BODY[]<0>"] == MULTIPART[:10]
    assert d[b"BODY[TEXT]<5>"] == MULTIPART_TEXT[5:12]
    assert d[b"BODY[]<99999>"] == b""


async def test_fetch_wire_labels_and_missing_section(node: Node) -> None:
    await node.seed(node.alice, MULTIPART)

    def go() -> tuple[list[bytes], bytes, bytes]:
        with wire(node) as w:
            w.login()
            w.ok("SELECT INBOX")
            untagged, _ = w.cmd("FETCH 1 (BODY.PEEK[HEADER.FIELDS (Subject)]<0.9> BODY.PEEK[1]<2.3>)")
            missing = w.cmd("FETCH 1 BODY.PEEK[9]")[1]
            out_of_range = w.cmd("FETCH 7 FLAGS")[1]
            return untagged, missing, out_of_range

    untagged, missing, out_of_range = await run(go)
    assert untagged[0].startswith(b"* 1 FETCH (BODY[HEADER.FIELDS (Subject)]<0> {9}\r\nSubject: ")
    assert b"BODY[1]<2> {3}\r\nllo)" in untagged[0]
    assert status_word(missing) in (b"NO", b"OK")
    assert status_word(out_of_range) == b"BAD"


async def test_peek_keeps_unseen_and_body_sets_seen(node: Node) -> None:
    [uid1, uid2, uid3] = await node.seed(node.alice, MULTIPART, simple(2), simple(3))

    def go() -> tuple[dict[int, dict[bytes, object]], ...]:
        with client(node) as c:
            c.login("alice@example.org", "secret")
            c.select_folder("INBOX")
            peek = c.fetch([uid1], ["BODY.PEEK[]"])
            flags_after_peek = c.get_flags([uid1])
            body = c.fetch([uid1], ["BODY[]"])
            flags_after_body = c.get_flags([uid1])
            again = c.fetch([uid1], ["BODY[1]"])
            rfc822 = c.fetch([uid2], ["RFC822"])
            header = c.fetch([uid3], ["RFC822.HEADER"])
            flags3 = c.get_flags([uid3])
            text = c.fetch([uid3], ["RFC822.TEXT"])
            flags_end = c.get_flags([uid1, uid2, uid3])
            return peek, flags_after_peek, body, flags_after_body, again, rfc822, header, flags3, text, flags_end

    peek, fa_peek, body, fa_body, again, rfc822, header, flags3, text, flags_end = await run(go)
    assert b"FLAGS" not in peek[uid1] and fa_peek[uid1] == ()
    assert body[uid1][b"BODY[]"] == MULTIPART
    # The FETCH that set \Seen reports the new flags in the same response.
    assert body[uid1][b"FLAGS"] == (b"\\Seen",)
    assert fa_body[uid1] == (b"\\Seen",)
    assert b"FLAGS" not in again[uid1]  # already seen: no flag change to report
    assert rfc822[uid2][b"RFC822"] == simple(2)
    assert header[uid3][b"RFC822.HEADER"] == simple(3).split(b"\r\n\r\n")[0] + b"\r\n\r\n"
    assert flags3[uid3] == ()  # RFC822.HEADER is a peek
    assert text[uid3][b"RFC822.TEXT"] == b"Body of message 3\r\n"
    assert flags_end == {uid1: (b"\\Seen",), uid2: (b"\\Seen",), uid3: (b"\\Seen",)}


async def test_fetch_binary_decodes_base64(node: Node) -> None:
    await node.seed(node.alice, MULTIPART)

    def go() -> tuple[list[bytes], list[bytes], list[bytes]]:
        with wire(node) as w:
            w.login()
            w.ok("SELECT INBOX")
            binary = w.ok("FETCH 1 (BINARY.PEEK[2] BINARY.SIZE[2])")
            flags = w.ok("FETCH 1 FLAGS")
            seen = w.ok("FETCH 1 (BINARY[1])")
            return binary, flags, seen

    binary, flags, seen = await run(go)
    # NUL in the data: a literal8 (RFC 3516 §4.2).
    assert binary == [b"* 1 FETCH (BINARY[2] ~{%d}\r\n" % len(ATTACHMENT) + ATTACHMENT + b" BINARY.SIZE[2] %d)\r\n" % len(ATTACHMENT)]
    assert flags == [b"* 1 FETCH (FLAGS ())\r\n"]
    assert seen[0].startswith(b"* 1 FETCH (BINARY[1] {%d}\r\n" % len(PART1_BODY) + PART1_BODY)
    assert b"FLAGS (\\Seen)" in seen[0]


async def test_fetch_rfc822_items_with_imaplib(node: Node) -> None:
    await node.seed(node.alice, simple(1, b"second line\r\n"), when=WHEN)

    def go() -> list[object]:
        with imaplib.IMAP4("127.0.0.1", node.port, timeout=10) as m:
            m.login("alice@example.org", "secret")
            m.select("INBOX")
            _, hdr = m.fetch("1", "(RFC822.HEADER)")
            _, txt = m.fetch("1", "(RFC822.TEXT)")
            _, full = m.fetch("1", "(RFC822 INTERNALDATE RFC822.SIZE)")
            return [hdr, txt, full]

    hdr, txt, full = await run(go)
    raw = simple(1, b"second line\r\n")
    assert hdr[0][1] == raw.split(b"\r\n\r\n")[0] + b"\r\n\r\n"
    assert txt[0][1] == b"Body of message 1\r\nsecond line\r\n"
    assert full[0][1] == raw
    assert b'INTERNALDATE "17-Jul-1996 09:44:25 +0000"' in full[0][0] + full[1]
    assert b"RFC822.SIZE %d" % len(raw) in full[0][0] + full[1]
    assert imaplib.Internaldate2tuple(b'INTERNALDATE "17-Jul-1996 09:44:25 +0000"') is not None


# -- STORE, CONDSTORE, QRESYNC ------------------------------------------------------------------------


async def test_store_flags_and_keywords(node: Node) -> None:
    uids = await node.seed(node.alice, simple(1), simple(2), simple(3))

    def go() -> list[object]:
        out: list[object] = []
        with client(node) as c:
            c.login("alice@example.org", "secret")
            c.select_folder("INBOX")
            out.append(c.add_flags(uids[:2], [b"\\Flagged", b"$Work"]))
            out.append(c.remove_flags([uids[0]], [b"\\Flagged"]))
            out.append(c.set_flags([uids[2]], [b"\\Answered", b"\\Draft"]))
            out.append(c.get_flags(uids))
            resp = c.select_folder("INBOX")
            out.append(resp[b"FLAGS"])
        return out

    added, removed, replaced, flags, sel_flags = await run(go)
    assert {k: set(v) for k, v in added.items()} == {uids[0]: {b"$Work", b"\\Flagged"}, uids[1]: {b"$Work", b"\\Flagged"}}
    assert {k: set(v) for k, v in removed.items()} == {uids[0]: {b"$Work"}}
    assert {k: set(v) for k, v in replaced.items()} == {uids[2]: {b"\\Answered", b"\\Draft"}}
    assert {k: set(v) for k, v in flags.items()} == {
        uids[0]: {b"$Work"}, uids[1]: {b"$Work", b"\\Flagged"}, uids[2]: {b"\\Answered", b"\\Draft"}}
    assert b"$Work" in sel_flags

    def wire_checks() -> list[object]:
        with wire(node) as w:
            w.login()
            w.ok("SELECT INBOX")
            silent = w.cmd("STORE 1:2 +FLAGS.SILENT (\\Seen)")
            loud = w.cmd("STORE 3 -FLAGS (\\Draft)")
            uid_store = w.cmd(f"UID STORE {uids[1]} +FLAGS.SILENT (\\Deleted)")
            bogus = w.cmd("STORE 1 +FLAGS (\\Bogus)")
            after = w.ok("FETCH 1:3 FLAGS")
            return [silent, loud, uid_store, bogus, after]

    silent, loud, uid_store, bogus, after = await run(wire_checks)
    assert silent[0] == [] and status_word(silent[1]) == b"OK"
    assert loud[0] == [b"* 3 FETCH (FLAGS (\\Answered))\r\n"]
    assert uid_store[0] == [] and status_word(uid_store[1]) == b"OK"
    assert status_word(bogus[1]) in (b"BAD", b"NO")
    assert after == [
        b"* 1 FETCH (FLAGS ($Work \\Seen))\r\n",
        b"* 2 FETCH (FLAGS ($Work \\Deleted \\Flagged \\Seen))\r\n",
        b"* 3 FETCH (FLAGS (\\Answered))\r\n",
    ]


def _modseq(line: bytes) -> int:
    return int(re.search(rb"MODSEQ \((\d+)\)", line).group(1))


async def test_condstore_fetch_modseq_changedsince_unchangedsince(node: Node) -> None:
    await node.seed(node.alice, simple(1), simple(2), simple(3))

    def go() -> dict[str, object]:
        out: dict[str, object] = {}
        with wire(node) as w:
            w.login()
            out["enable"] = w.ok("ENABLE CONDSTORE")
            sel = w.ok("SELECT INBOX")
            out["hms"] = int(re.search(rb"HIGHESTMODSEQ (\d+)", b"".join(sel)).group(1))
            out["modseqs"] = w.ok("FETCH 1:* (MODSEQ)")
            out["store"] = w.ok("STORE 2 +FLAGS (\\Flagged)")
            out["changed"] = w.ok(f"FETCH 1:* (FLAGS) (CHANGEDSINCE {out['hms']})")
            out["cond"] = w.cmd(f"STORE 1:3 (UNCHANGEDSINCE {out['hms']}) +FLAGS (\\Answered)")
            out["uid_cond"] = w.cmd("UID STORE 1:3 (UNCHANGEDSINCE 1) +FLAGS (\\Seen)")
            out["final"] = w.ok("FETCH 1:* (FLAGS MODSEQ)")
            out["status"] = w.ok("STATUS INBOX (HIGHESTMODSEQ)")
        return out

    o = await run(go)
    assert o["enable"] == [b"* ENABLED CONDSTORE\r\n"]
    hms = o["hms"]
    modseqs = [_modseq(line) for line in o["modseqs"]]
    assert len(modseqs) == 3 and max(modseqs) == hms and all(m >= 1 for m in modseqs)
    [store] = o["store"]
    # RFC 7162 §3.1: with CONDSTORE on, STORE's FETCH carries UID as well.
    assert store.startswith(b"* 2 FETCH (UID 2 FLAGS (\\Flagged) MODSEQ (") and _modseq(store) > hms
    [changed] = o["changed"]
    assert changed.startswith(b"* 2 FETCH (FLAGS (\\Flagged) MODSEQ (")
    untagged, tagged = o["cond"]
    # Message 2 changed after hms: it fails, the others are stored.
    assert code(tagged) == b"MODIFIED 2" and status_word(tagged) == b"OK"
    assert sorted(line.split(b" ")[1] for line in untagged) == [b"1", b"3"]
    untagged, tagged = o["uid_cond"]
    assert code(tagged) == b"MODIFIED 1:3" and untagged == []
    final = o["final"]
    assert b"FLAGS (\\Answered)" in final[0] and b"FLAGS (\\Flagged)" in final[1] and b"FLAGS (\\Answered)" in final[2]
    assert max(_modseq(line) for line in final) == int(re.search(rb"HIGHESTMODSEQ (\d+)", o["status"][0]).group(1))


async def test_condstore_with_imapclient(node: Node) -> None:
    uids = await node.seed(node.alice, simple(1), simple(2))

    def go() -> tuple[object, ...]:
        with client(node) as c:
            c.login("alice@example.org", "secret")
            enabled = c.enable("CONDSTORE")
            sel = c.select_folder("INBOX")
            hms = sel[b"HIGHESTMODSEQ"]
            c.add_flags([uids[0]], [b"\\Seen"])
            changed = c.fetch(uids, ["FLAGS"], modifiers=[f"CHANGEDSINCE {hms}"])
            return enabled, hms, changed

    enabled, hms, changed = await run(go)
    assert enabled == [b"CONDSTORE"]
    assert list(changed) == [uids[0]]
    assert changed[uids[0]][b"FLAGS"] == (b"\\Seen",) and changed[uids[0]][b"MODSEQ"][0] > hms


async def test_qresync_select_and_vanished(node: Node) -> None:
    uids = await node.seed(node.alice, simple(1), simple(2), simple(3), simple(4))
    mail = node.state.storage.mail

    def first() -> tuple[int, int]:
        with wire(node) as w:
            w.login()
            w.ok("ENABLE QRESYNC")
            sel = b"".join(w.ok("SELECT INBOX"))
            uv = int(re.search(rb"UIDVALIDITY (\d+)", sel).group(1))
            hms = int(re.search(rb"HIGHESTMODSEQ (\d+)", sel).group(1))
            return uv, hms

    uv, hms = await run(first)
    box = await mail.mailbox(node.alice, "INBOX")
    await mail.store_flags(node.alice, box.id, [uids[1]], "add", ["\\Flagged"])
    await mail.store_flags(node.alice, box.id, [uids[2]], "add", ["\\Deleted"])
    await mail.expunge(node.alice, box.id)

    def second() -> dict[str, object]:
        out: dict[str, object] = {}
        with wire(node) as w:
            w.login()
            out["noqr"] = w.cmd(f"SELECT INBOX (QRESYNC ({uv} {hms}))")[1]
            out["enable"] = w.ok("ENABLE QRESYNC")
            out["select"] = w.ok(f"SELECT INBOX (QRESYNC ({uv} {hms}))")
            out["fetch"] = w.ok(f"UID FETCH 1:* (FLAGS) (CHANGEDSINCE {hms} VANISHED)")
            out["stale"] = w.ok(f"SELECT INBOX (QRESYNC ({uv + 1} {hms}))")
            # EXPUNGE in a QRESYNC session answers VANISHED (RFC 7162 §3.2.10).
            w.ok(f"UID STORE {uids[3]} +FLAGS.SILENT (\\Deleted)")
            out["expunge"] = w.ok("EXPUNGE")
        return out

    o = await run(second)
    assert status_word(o["noqr"]) == b"BAD"  # QRESYNC not enabled yet
    sel = o["select"]
    assert b"* VANISHED (EARLIER) %d\r\n" % uids[2] in sel
    [fetch] = fetch_lines(sel)
    assert fetch.startswith(b"* 2 FETCH (UID %d FLAGS (\\Flagged) MODSEQ (" % uids[1])
    assert o["fetch"][0] == b"* VANISHED (EARLIER) %d\r\n" % uids[2]
    assert fetch_lines(o["fetch"]) == [fetch]
    # Another UIDVALIDITY: no VANISHED, no FETCH (the client must resync fully).
    assert not any(b"VANISHED" in line for line in o["stale"]) and fetch_lines(o["stale"]) == []
    assert o["expunge"] == [b"* VANISHED %d\r\n" % uids[3]]


# -- EXPUNGE, CLOSE, UNSELECT ---------------------------------------------------------------------------------


async def test_expunge_and_uid_expunge(node: Node) -> None:
    uids = await node.seed(node.alice, *(simple(i) for i in range(1, 7)))

    def go() -> dict[str, object]:
        out: dict[str, object] = {}
        with wire(node) as w:
            w.login()
            w.ok("SELECT INBOX")
            w.ok("STORE 2:5 +FLAGS.SILENT (\\Deleted)")
            out["uid_expunge"] = w.ok(f"UID EXPUNGE {uids[2]},{uids[5]}")
            out["expunge"] = w.ok("EXPUNGE")
            out["left"] = w.ok("FETCH 1:* (UID FLAGS)")
            out["again"] = w.ok("EXPUNGE")
        return out

    o = await run(go)
    # Only the named UID that is also \Deleted goes.
    assert o["uid_expunge"] == [b"* 3 EXPUNGE\r\n"]
    # The others: highest first, each number valid when it is read.
    assert o["expunge"] == [b"* 4 EXPUNGE\r\n", b"* 3 EXPUNGE\r\n", b"* 2 EXPUNGE\r\n"]
    assert o["left"] == [b"* 1 FETCH (UID %d FLAGS ())\r\n" % uids[0], b"* 2 FETCH (UID %d FLAGS ())\r\n" % uids[5]]
    assert o["again"] == []


async def test_close_expunges_silently_unselect_does_not(node: Node) -> None:
    await node.seed(node.alice, simple(1), simple(2), simple(3))
    await node.seed(node.alice, simple(4), simple(5), mailbox="Archive")

    def go() -> dict[str, object]:
        out: dict[str, object] = {}
        with wire(node) as w:
            w.login()
            w.ok("SELECT INBOX")
            w.ok("STORE 1,3 +FLAGS.SILENT (\\Deleted)")
            out["close"] = w.cmd("CLOSE")
            out["after_close"] = w.cmd("FETCH 1 FLAGS")[1]
            out["inbox"] = w.ok("STATUS INBOX (MESSAGES DELETED)")
            w.ok("SELECT Archive")
            w.ok("STORE 1 +FLAGS.SILENT (\\Deleted)")
            out["unselect"] = w.cmd("UNSELECT")
            out["archive"] = w.ok("STATUS Archive (MESSAGES DELETED)")
            w.ok("EXAMINE Archive")
            out["close_ro"] = w.cmd("CLOSE")
            out["archive2"] = w.ok("STATUS Archive (MESSAGES DELETED)")
        return out

    o = await run(go)
    assert o["close"][0] == [] and status_word(o["close"][1]) == b"OK"
    assert status_word(o["after_close"]) == b"BAD"  # back in the authenticated state
    assert o["inbox"] == [b'* STATUS "INBOX" (MESSAGES 1 DELETED 0)\r\n']
    assert o["unselect"][0] == [] and status_word(o["unselect"][1]) == b"OK"
    assert o["archive"] == [b'* STATUS "Archive" (MESSAGES 2 DELETED 1)\r\n']
    # CLOSE on a read-only mailbox does not expunge (RFC 9051 §6.4.1).
    assert status_word(o["close_ro"][1]) == b"OK"
    assert o["archive2"] == [b'* STATUS "Archive" (MESSAGES 2 DELETED 1)\r\n']


# -- COPY, MOVE, APPEND --------------------------------------------------------------------------------------


async def test_copy_and_move_with_copyuid(node: Node) -> None:
    uids = await node.seed(node.alice, simple(1), simple(2), simple(3), flags=("\\Flagged",))
    archive = await node.state.storage.mail.mailbox(node.alice, "Archive")
    trash = await node.state.storage.mail.mailbox(node.alice, "Trash")

    def go() -> dict[str, object]:
        out: dict[str, object] = {}
        with wire(node) as w:
            w.login()
            w.ok("SELECT INBOX")
            out["copy"] = w.cmd("COPY 1:2 Archive")
            out["uid_copy"] = w.cmd(f"UID COPY {uids[2]} Archive")
            out["missing"] = w.cmd("COPY 1 NoSuchBox")
            out["move"] = w.cmd("MOVE 1,3 Trash")
            out["uid_move_missing"] = w.cmd(f"UID MOVE {uids[1]} NoSuchBox")
            out["left"] = w.ok("UID FETCH 1:* (FLAGS)")
            out["status"] = w.ok("STATUS Archive (MESSAGES)") + w.ok("STATUS Trash (MESSAGES)")
            w.ok("SELECT Trash")
            out["trash"] = w.ok("FETCH 1:* (UID FLAGS BODY.PEEK[HEADER.FIELDS (Subject)])")
        return out

    o = await run(go)
    untagged, tagged = o["copy"]
    assert untagged == [] and code(tagged) == b"COPYUID %d %d:%d 1:2" % (archive.uidvalidity, uids[0], uids[1])
    assert code(o["uid_copy"][1]) == b"COPYUID %d %d 3" % (archive.uidvalidity, uids[2])
    assert status_word(o["missing"][1]) == b"NO" and code(o["missing"][1]) == b"TRYCREATE"
    untagged, tagged = o["move"]
    # RFC 6851 §4.3: COPYUID in an untagged OK before the expunges.
    assert untagged == [
        b"* OK [COPYUID %d %d,%d 1:2] Moved\r\n" % (trash.uidvalidity, uids[0], uids[2]),
        b"* 3 EXPUNGE\r\n",
        b"* 1 EXPUNGE\r\n",
    ]
    assert status_word(tagged) == b"OK"
    assert code(o["uid_move_missing"][1]) == b"TRYCREATE"
    assert o["left"] == [b"* 1 FETCH (UID %d FLAGS (\\Flagged))\r\n" % uids[1]]
    assert o["status"] == [b'* STATUS "Archive" (MESSAGES 3)\r\n', b'* STATUS "Trash" (MESSAGES 2)\r\n']
    trash_lines = o["trash"]
    assert len(trash_lines) == 2
    assert b"UID 1 FLAGS (\\Flagged)" in trash_lines[0] and b"Subject: Message 1" in trash_lines[0]
    assert b"UID 2 FLAGS (\\Flagged)" in trash_lines[1] and b"Subject: Message 3" in trash_lines[1]


async def test_append_with_flags_date_and_appenduid(node: Node) -> None:
    box = await node.state.storage.mail.mailbox(node.alice, "Drafts")
    raw = simple(1)

    def go() -> tuple[object, ...]:
        with imaplib.IMAP4("127.0.0.1", node.port, timeout=10) as m:
            m.login("alice@example.org", "secret")
            typ, data = m.append("Drafts", "(\\Draft $Pending)", '"17-Jul-1996 02:44:25 -0700"', raw)
            missing = m.append("NoSuchBox", None, None, raw)
            m.select("Drafts")
            _, fetched = m.fetch("1", "(FLAGS INTERNALDATE BODY.PEEK[])")
            return typ, data, missing, fetched

    typ, data, (mtyp, mdata), fetched = await run(go)
    assert typ == "OK" and data[0].startswith(b"[APPENDUID %d 1]" % box.uidvalidity)
    assert mtyp == "NO" and mdata[0].startswith(b"[TRYCREATE]")
    meta = fetched[0][0]
    assert b"FLAGS ($Pending \\Draft)" in meta or b"FLAGS (\\Draft $Pending)" in meta
    # The date comes back as it was given, zone and all (RFC 9051 §6.3.12).
    assert b'INTERNALDATE "17-Jul-1996 02:44:25 -0700"' in meta
    assert fetched[0][1] == raw
    names = [b.name for b in await node.state.storage.mail.mailboxes(node.alice)]
    assert "NoSuchBox" not in names


async def test_multiappend_and_literal_plus_on_raw_socket(node: Node) -> None:
    box = await node.state.storage.mail.mailbox(node.alice, "INBOX")
    m1, m2, m3 = simple(1), simple(2, b"x" * 500), simple(3)

    def go() -> dict[str, object]:
        out: dict[str, object] = {}
        with wire(node) as w:
            w.login()
            out["multi"] = w.cmd_literals(b"APPEND INBOX (\\Seen) ", m1, b' (\\Flagged) "01-Jan-2020 00:00:00 +0000" ', m2, b"")
            # LITERAL+ (RFC 7888): no continuation, data straight away.
            out["plus"] = w.append_plus(b"INBOX", m3)
            # Empty messages are refused; the session carries on.
            w.send(b"p2 APPEND INBOX {0+}\r\n\r\n")
            out["empty"] = w.until(b"p2")
            w.ok("SELECT INBOX")
            out["fetch"] = w.ok("FETCH 1:* (UID FLAGS INTERNALDATE BODY.PEEK[])")
        return out

    o = await run(go)
    untagged, tagged = o["multi"]
    assert status_word(tagged) == b"OK" and code(tagged) == b"APPENDUID %d 1:2" % box.uidvalidity
    assert code(o["plus"][1]) == b"APPENDUID %d 3" % box.uidvalidity
    assert status_word(o["empty"][1]) in (b"NO", b"BAD")
    f1, f2, f3 = o["fetch"]
    assert b"UID 1 FLAGS (\\Seen)" in f1 and f1.endswith(b"{%d}\r\n" % len(m1) + m1 + b")\r\n")
    assert b"UID 2 FLAGS (\\Flagged)" in f2 and b'INTERNALDATE "01-Jan-2020 00:00:00 +0000"' in f2
    assert f2.endswith(m2 + b")\r\n")
    assert b"UID 3 FLAGS ()" in f3 and f3.endswith(m3 + b")\r\n")


# -- mailboxes: CREATE, DELETE, RENAME, SUBSCRIBE, LIST, STATUS ----------------------------------------------


def _names(lines: list[bytes], verb: bytes = b"LIST") -> list[bytes]:
    out = []
    for line in lines:
        m = re.match(rb'\* %s \([^)]*\) "/" (.*)\r\n' % verb, line)
        if m:
            out.append(m.group(1).strip(b'"'))
    return out


def _attrs(lines: list[bytes], name: bytes) -> set[bytes]:
    for line in lines:
        m = re.match(rb'\* LIST \(([^)]*)\) "/" "?%s"?\r\n' % re.escape(name), line)
        if m:
            return set(m.group(1).split())
    raise AssertionError(f"{name!r} not listed in {lines!r}")


async def test_create_delete_rename_subscribe(node: Node) -> None:
    await node.seed(node.alice, simple(1), simple(2))
    inbox_before = await node.state.storage.mail.mailbox(node.alice, "INBOX")

    def go() -> dict[str, object]:
        out: dict[str, object] = {}
        with wire(node) as w:
            w.login()
            w.ok("CREATE Projects/2024/Q1")
            out["dup"] = w.cmd("CREATE Projects/2024")[1]
            w.ok("CREATE MyDrafts (USE (\\Drafts))")
            out["badcreate"] = w.cmd("CREATE Bad/*name")[1]
            out["all"] = w.ok('LIST "" *')
            out["top"] = w.ok('LIST "" %')
            out["level2"] = w.ok('LIST "" Projects/%')
            out["ref"] = w.ok("LIST Projects/ %")
            w.ok("RENAME Projects Work")
            out["renamed"] = w.ok('LIST "" Work*')
            out["gone"] = w.ok('LIST "" Projects*')
            out["rename_exists"] = w.cmd("RENAME Work Archive")[1]
            out["rename_missing"] = w.cmd("RENAME Nope Other")[1]
            w.ok("RENAME INBOX Old/Inbox")
            out["old"] = w.ok("STATUS Old/Inbox (MESSAGES)")
            out["inbox"] = w.ok("STATUS INBOX (MESSAGES UIDVALIDITY)")
            out["del_inbox"] = w.cmd("DELETE INBOX")[1]
            out["del_missing"] = w.cmd("DELETE Nope")[1]
            # RFC 9051 §6.3.4: a mailbox with children becomes \Noselect;
            # DELETE of a \Noselect one with children is refused.
            out["del_parent"] = w.cmd("DELETE Work/2024")[1]
            out["del_noselect"] = w.cmd("DELETE Work/2024")[1]
            w.ok("DELETE Work/2024/Q1")
            out["after_delete"] = w.ok('LIST "" Work*')
            w.ok("UNSUBSCRIBE Junk")
            w.ok("UNSUBSCRIBE Work")
            out["lsub"] = w.ok('LSUB "" *')
            w.ok("SUBSCRIBE Work")
            out["lsub2"] = w.ok('LSUB "" W%')
            out["inbox_ci"] = w.ok('LIST "" inbox')
        return out

    o = await run(go)
    assert status_word(o["dup"]) == b"NO" and code(o["dup"]) == b"ALREADYEXISTS"
    assert status_word(o["del_parent"]) == b"OK"
    assert status_word(o["del_noselect"]) == b"NO" and code(o["del_noselect"]) == b"HASCHILDREN"
    assert status_word(o["badcreate"]) in (b"NO", b"BAD")
    assert _names(o["all"]) == [b"INBOX", b"Archive", b"Drafts", b"Junk", b"MyDrafts", b"Projects", b"Projects/2024",
                                b"Projects/2024/Q1", b"Sent", b"Trash"]
    assert _attrs(o["all"], b"Projects") >= {b"\\HasChildren"}
    assert _attrs(o["all"], b"Projects/2024/Q1") >= {b"\\HasNoChildren"}
    assert _attrs(o["all"], b"MyDrafts") >= {b"\\Drafts"}
    assert _names(o["top"]) == [b"INBOX", b"Archive", b"Drafts", b"Junk", b"MyDrafts", b"Projects", b"Sent", b"Trash"]
    assert _names(o["level2"]) == [b"Projects/2024"]
    assert _names(o["ref"]) == [b"Projects/2024"]
    assert _names(o["renamed"]) == [b"Work", b"Work/2024", b"Work/2024/Q1"]
    assert _names(o["gone"]) == []
    assert code(o["rename_exists"]) == b"ALREADYEXISTS"
    assert status_word(o["rename_missing"]) == b"NO" and code(o["rename_missing"]) == b"NONEXISTENT"
    assert o["old"] == [b'* STATUS "Old/Inbox" (MESSAGES 2)\r\n']
    # INBOX stays, empty (RFC 9051 §6.3.6).
    assert o["inbox"][0].startswith(b'* STATUS "INBOX" (MESSAGES 0 ')
    assert status_word(o["del_inbox"]) == b"NO" and status_word(o["del_missing"]) == b"NO"
    assert _names(o["after_delete"]) == [b"Work", b"Work/2024"]
    assert _attrs(o["after_delete"], b"Work/2024") == {b"\\Noselect", b"\\HasNoChildren"}
    lsub = _names(o["lsub"], b"LSUB")
    assert b"Junk" not in lsub and b"Work" not in lsub and b"INBOX" in lsub and b"Work/2024" in lsub
    assert _names(o["lsub2"], b"LSUB") == [b"Work"]
    assert _names(o["inbox_ci"]) == [b"INBOX"]
    assert inbox_before.id == (await node.state.storage.mail.mailbox(node.alice, "INBOX")).id


async def test_list_extended_special_use_and_status(node: Node) -> None:
    await node.seed(node.alice, simple(1), simple(2), flags=("\\Seen",))
    await node.seed(node.alice, simple(3))
    await node.seed(node.alice, simple(4), mailbox="Sent")

    def go() -> dict[str, object]:
        out: dict[str, object] = {}
        with wire(node) as w:
            w.login()
            w.ok("CREATE Lists/Python")
            w.ok("UNSUBSCRIBE Lists")
            out["root"] = w.ok('LIST "" ""')
            out["subscribed"] = w.ok('LIST (SUBSCRIBED) "" *')
            out["recursive"] = w.ok('LIST (SUBSCRIBED RECURSIVEMATCH) "" %')
            out["recursive_alone"] = w.cmd('LIST (RECURSIVEMATCH) "" %')[1]
            out["return"] = w.ok('LIST "" % RETURN (CHILDREN SPECIAL-USE STATUS (MESSAGES UNSEEN))')
            out["special"] = w.ok('LIST (SPECIAL-USE) "" *')
            out["multi"] = w.ok('LIST "" (INBOX Sent)')
            out["status"] = w.ok("STATUS INBOX (MESSAGES UIDNEXT UIDVALIDITY UNSEEN SIZE HIGHESTMODSEQ DELETED)")
            out["status_missing"] = w.cmd("STATUS Nope (MESSAGES)")[1]
        return out

    o = await run(go)
    assert o["root"] == [b'* LIST (\\Noselect) "/" ""\r\n']
    sub = o["subscribed"]
    assert b"Lists" not in _names(sub) and b"Lists/Python" in _names(sub)
    assert all(b"\\Subscribed" in line for line in sub)
    # RFC 5258 §3.5: the unsubscribed parent of a subscribed child.
    assert b'* LIST (\\HasChildren) "/" "Lists" ("CHILDINFO" ("SUBSCRIBED"))\r\n' in o["recursive"]
    assert b"Lists/Python" not in b"".join(o["recursive"])
    assert status_word(o["recursive_alone"]) == b"BAD"
    ret = o["return"]
    listed = _names(ret)
    assert listed == [b"INBOX", b"Archive", b"Drafts", b"Junk", b"Lists", b"Sent", b"Trash"]
    assert _attrs(ret, b"Lists") >= {b"\\HasChildren"} and _attrs(ret, b"Sent") >= {b"\\Sent", b"\\HasNoChildren"}
    statuses = [line for line in ret if line.startswith(b"* STATUS")]
    assert b'* STATUS "INBOX" (MESSAGES 3 UNSEEN 1)\r\n' in statuses
    assert b'* STATUS "Sent" (MESSAGES 1 UNSEEN 1)\r\n' in statuses
    assert len(statuses) == len(listed)
    # Each STATUS follows its LIST line (RFC 5819 §2).
    i = ret.index(next(line for line in ret if line.startswith(b"* LIST") and line.endswith(b'"INBOX"\r\n')))
    assert ret[i + 1].startswith(b'* STATUS "INBOX"')
    special = o["special"]
    assert _names(special) == [b"Archive", b"Drafts", b"Junk", b"Sent", b"Trash"]
    assert _names(o["multi"]) == [b"INBOX", b"Sent"]
    inbox = await node.state.storage.mail.status(node.alice, "INBOX")
    size = len(simple(1)) + len(simple(2)) + len(simple(3))
    assert o["status"] == [
        b'* STATUS "INBOX" (MESSAGES 3 UIDNEXT 4 UIDVALIDITY %d UNSEEN 1 SIZE %d HIGHESTMODSEQ %d DELETED 0)\r\n'
        % (inbox.mailbox.uidvalidity, size, inbox.highestmodseq)
    ]
    assert status_word(o["status_missing"]) == b"NO"


async def test_namespace_and_id(node: Node) -> None:
    def go() -> tuple[list[bytes], list[bytes], list[bytes]]:
        with wire(node) as w:
            before = w.ok('ID ("name" "test-client" "version" "1.0")')
            w.login()
            return before, w.ok("ID NIL"), w.ok("NAMESPACE")

    id_before, id_after, ns = await run(go)
    assert id_before == id_after
    assert id_before[0].startswith(b'* ID ("name" "Rookery"')
    assert ns == [b'* NAMESPACE (("" "/")) NIL NIL\r\n']


async def test_utf8_accept_and_modified_utf7_names(node: Node) -> None:
    def go() -> dict[str, object]:
        out: dict[str, object] = {}
        with wire(node) as w8, wire(node) as w7:
            w8.login()
            w7.login()
            out["enabled"] = w8.ok("ENABLE UTF8=ACCEPT")
            w8.ok('CREATE "Entwürfe"'.encode())
            w8.ok('CREATE "Отправленные/Ящик"'.encode())
            out["list8"] = w8.ok('LIST "" *')
            out["list7"] = w7.ok('LIST "" *')
            out["select7"] = w7.cmd("SELECT Entw&APw-rfe")[1]
            w7.ok("CREATE Br&APY-tchen")
            out["list8b"] = w8.ok('LIST "" Br*')
            out["bad7"] = w7.cmd("CREATE &Jjo")[1]
            w7.ok("CREATE Entw&APw-rfe/Sub")
            out["ref7"] = w7.ok('LIST "Entw&APw-rfe/" %')
            out["lsub7"] = w7.ok('LSUB "Entw&APw-rfe/" *')
            out["status8"] = w8.ok('STATUS "Entwürfe" (MESSAGES)'.encode())
        with client(node) as c:
            c.login("alice@example.org", "secret")
            out["imapclient"] = [name for _, _, name in c.list_folders()]
            c.select_folder("Entwürfe")
            c.append("Entwürfe", simple(1))
            out["count"] = c.folder_status("Entwürfe", ["MESSAGES"])
        return out

    o = await run(go)
    assert o["enabled"] == [b"* ENABLED UTF8=ACCEPT\r\n"]
    assert "Entwürfe".encode() in _names(o["list8"])
    assert "Отправленные/Ящик".encode() in _names(o["list8"])
    names7 = _names(o["list7"])
    assert b"Entw&APw-rfe" in names7
    assert all(n.isascii() for n in names7)
    assert status_word(o["select7"]) == b"OK"
    assert _names(o["list8b"]) == ["Brötchen".encode()]
    assert status_word(o["bad7"]) in (b"NO", b"BAD")
    # A non-ASCII reference (sent in modified UTF-7) works too.
    assert o["ref7"] == [b'* LIST (\\HasNoChildren) "/" "Entw&APw-rfe/Sub"\r\n']
    assert o["lsub7"] == [b'* LSUB () "/" "Entw&APw-rfe/Sub"\r\n']
    assert o["status8"] == ['* STATUS "Entwürfe" (MESSAGES 0)\r\n'.encode()]
    assert "Entwürfe" in o["imapclient"] and "Отправленные/Ящик" in o["imapclient"] and "Brötchen" in o["imapclient"]
    assert o["count"][b"MESSAGES"] == 1


async def test_imap4rev1_and_imap4rev2_differences(node: Node) -> None:
    await node.seed(node.alice, simple(1), simple(2), flags=("\\Seen",))
    await node.seed(node.alice, simple(3))

    def go() -> dict[str, object]:
        out: dict[str, object] = {}
        with wire(node) as w:
            w.login()
            out["sel1"] = w.ok("SELECT INBOX")
            w.send(b"s1 SEARCH ALL\r\n")
            out["search1"] = w.until(b"s1")[0]
            # ENABLE is for the authenticated state only (RFC 5161 §3.1).
            out["enable_selected"] = w.cmd("ENABLE IMAP4rev2")[1]
            w.ok("UNSELECT")
            out["enable"] = w.ok("ENABLE IMAP4rev2")
            out["sel2"] = w.ok("SELECT INBOX")
            w.send(b"s2 SEARCH ALL\r\n")
            out["search2"] = w.until(b"s2")[0]
            w.send(b"s3 UID SEARCH UNSEEN\r\n")
            out["search3"] = w.until(b"s3")[0]
        return out

    o = await run(go)
    assert b"* 0 RECENT\r\n" in o["sel1"] and b"* OK [UNSEEN 3] First unseen\r\n" in o["sel1"]
    assert o["search1"] == [b"* SEARCH 1 2 3\r\n"]
    assert status_word(o["enable_selected"]) == b"BAD"
    assert o["enable"] == [b"* ENABLED IMAP4rev2\r\n"]
    assert not any(b"RECENT" in line or b"[UNSEEN" in line for line in o["sel2"])
    assert b"* 3 EXISTS\r\n" in o["sel2"]
    assert o["search2"] == [b'* ESEARCH (TAG "s2") ALL 1:3\r\n']
    assert o["search3"] == [b'* ESEARCH (TAG "s3") UID ALL 3\r\n']


# -- several sessions on one mailbox ---------------------------------------------------------------------------------


async def test_flag_change_by_other_session_seen_on_noop(node: Node) -> None:
    uids = await node.seed(node.alice, simple(1), simple(2))

    def go() -> dict[str, object]:
        out: dict[str, object] = {}
        with wire(node) as a, wire(node) as b:
            a.login()
            b.login()
            a.ok("SELECT INBOX")
            b.ok("SELECT INBOX")
            a.ok("STORE 2 +FLAGS (\\Flagged)")
            out["noop"] = b.ok("NOOP")
            out["noop2"] = b.ok("NOOP")  # reported once
            a.ok("STORE 1 +FLAGS (NewKeyword)")
            out["keyword"] = b.ok("NOOP")
            # A session does not hear its own changes a second time.
            out["own"] = a.ok("NOOP")
        return out

    o = await run(go)
    assert o["noop"] == [b"* 2 FETCH (FLAGS (\\Flagged))\r\n"]
    assert o["noop2"] == []
    # A new keyword: FLAGS first, then the FETCH (RFC 9051 §7.3.5).
    assert o["keyword"][0].startswith(b"* FLAGS (") and b"NewKeyword" in o["keyword"][0]
    assert o["keyword"][1:] == [b"* 1 FETCH (FLAGS (NewKeyword))\r\n"]
    assert o["own"] == []
    assert uids == [1, 2]


async def test_expunge_by_other_session_not_during_fetch(node: Node) -> None:
    uids = await node.seed(node.alice, *(simple(i) for i in range(1, 6)))

    def go() -> dict[str, object]:
        out: dict[str, object] = {}
        with wire(node) as a, wire(node) as b:
            a.login()
            b.login()
            a.ok("SELECT INBOX")
            b.ok("SELECT INBOX")
            a.ok("STORE 2,4 +FLAGS.SILENT (\\Deleted)")
            out["a_expunge"] = a.ok("EXPUNGE")
            # B still numbers 1..5: a FETCH must not carry EXPUNGE
            # (RFC 9051 §7.5.1), and sequence numbers must not shift under it.
            out["fetch"] = b.ok("FETCH 1:5 (UID)")
            out["store"] = b.ok("STORE 5 +FLAGS (\\Seen)")
            out["search"] = b.ok("SEARCH ALL")
            out["noop"] = b.ok("NOOP")
            out["after"] = b.ok("FETCH 1:* (UID)")
            out["toofar"] = b.cmd("FETCH 4 (UID)")[1]
        return out

    o = await run(go)
    assert o["a_expunge"] == [b"* 4 EXPUNGE\r\n", b"* 2 EXPUNGE\r\n"]
    fetched = o["fetch"]
    assert not any(b"EXPUNGE" in line for line in fetched)
    # Every FETCH line still uses B's old numbering: seq n is UID n.
    for line in fetched:
        seq, uid = re.match(rb"\* (\d+) FETCH \(.*UID (\d+)", line).groups()
        assert seq == uid
    assert not any(b"EXPUNGE" in line for line in o["store"] + o["search"])
    assert o["store"] == [b"* 5 FETCH (FLAGS (\\Seen))\r\n"]
    assert o["noop"] == [b"* 4 EXPUNGE\r\n", b"* 2 EXPUNGE\r\n"]
    assert o["after"] == [b"* 1 FETCH (UID 1)\r\n", b"* 2 FETCH (UID 3)\r\n", b"* 3 FETCH (UID 5)\r\n"]
    assert status_word(o["toofar"]) == b"BAD"
    assert uids == [1, 2, 3, 4, 5]


async def test_uid_fetch_may_carry_expunge_and_exists(node: Node) -> None:
    await node.seed(node.alice, simple(1), simple(2))

    def go() -> tuple[list[bytes], list[bytes]]:
        with wire(node) as a, wire(node) as b:
            a.login()
            b.login()
            a.ok("SELECT INBOX")
            b.ok("SELECT INBOX")
            a.ok("STORE 1 +FLAGS.SILENT (\\Deleted)")
            a.ok("EXPUNGE")
            a.append_plus(b"INBOX", simple(3))
            uid_fetch = b.ok("UID FETCH 1:* (FLAGS)")
            after = b.ok("FETCH 1:* (UID)")
            return uid_fetch, after

    uid_fetch, after = await run(go)
    assert b"* 1 EXPUNGE\r\n" in uid_fetch and b"* 2 EXISTS\r\n" in uid_fetch
    assert after == [b"* 1 FETCH (UID 2)\r\n", b"* 2 FETCH (UID 3)\r\n"]


async def test_smtp_delivery_gives_exists(node: Node) -> None:
    await node.seed(node.alice, simple(1))

    def go() -> tuple[list[bytes], list[bytes], list[bytes]]:
        with wire(node) as w:
            w.login()
            w.ok("SELECT INBOX")
            with smtplib.SMTP("127.0.0.1", node.state.ports["smtp"], timeout=10) as s:
                s.sendmail("carol@remote.test", ["alice@example.org"], simple(2))
            noop = w.ok("NOOP")
            fetch = w.ok("FETCH 2 (UID FLAGS BODY.PEEK[HEADER.FIELDS (Subject)])")
            again = w.ok("NOOP")
            return noop, fetch, again

    noop, fetch, again = await run(go)
    assert noop == [b"* 2 EXISTS\r\n"]
    assert fetch[0].startswith(b"* 2 FETCH (UID 2 FLAGS () BODY[HEADER.FIELDS (Subject)] {")
    assert b"Subject: Message 2\r\n" in fetch[0]
    assert again == []


async def test_mailbox_deleted_under_selected_session(node: Node) -> None:
    def go() -> list[bytes]:
        with wire(node) as a, wire(node) as b:
            a.login()
            b.login()
            a.ok("CREATE Doomed")
            b.ok("SELECT Doomed")
            a.ok("DELETE Doomed")
            b.send(b"n NOOP\r\n")
            lines = []
            try:
                while True:
                    lines.append(b.line())
            except EOFError:
                return lines

    lines = await run(go)
    # The session cannot go on in a mailbox that is gone (RFC 9051 §7.1.5).
    assert len(lines) == 1 and lines[0].startswith(b"* BYE ")


# -- hostile input ------------------------------------------------------------------------------------------------------


async def test_garbage_and_8bit_junk_get_bad_and_session_continues(node: Node) -> None:
    def go() -> list[bytes]:
        out = []
        with wire(node) as w:
            for junk in (b"\x00\x01\x02\xff\xfe\r\n", b"a1 \xe9\xe8\xff\x80 junk\r\n", b"\r\n", b"a2\r\n",
                         b"a3 FROBNICATE\r\n", b"a4 LOGIN\r\n", b'a5 LOGIN "unterminated\r\n', b"a6 LOGIN {x}\r\n",
                         b"\x1b[2J\x07\r\n", b"a7 NOOP extra args\r\n", b"a8 FETCH 1 BODY[\r\n"):
                w.send(junk)
                out.append(w.line())
            w.login()
            w.send(b"a9 SELECT \xc3\x28\r\n")  # invalid UTF-8
            out.append(w.line())
            w.send(b'a10 SELECT "INBOX\xff"\r\n')
            out.append(w.line())
            out.append(w.cmd("NOOP")[1])
        return out

    out = await run(go)
    *bad, sel_bad, sel_bad2, noop = out
    for line in bad:
        assert line.split(b" ")[1] == b"BAD", line
    assert bad[1].startswith(b"a1 BAD") or bad[1].startswith(b"* BAD")
    assert bad[4].startswith(b"a3 BAD") and bad[5].startswith(b"a4 BAD")
    assert status_word(sel_bad) in (b"BAD", b"NO") and status_word(sel_bad2) in (b"BAD", b"NO")
    assert status_word(noop) == b"OK"


async def test_line_and_literal_limits(node: Node) -> None:
    def go() -> dict[str, object]:
        out: dict[str, object] = {}
        with wire(node) as w:
            w.login()
            # A line over the 64 KiB limit.
            w.send(b"l1 LIST \"\" " + b"x" * 70_000 + b"\r\n")
            out["line"] = w.line()
            out["after_line"] = w.cmd("NOOP")[1]
            # A synchronizing literal over max_literal: refused before any data.
            w.send(b"l2 LOGIN {150000}\r\n")
            out["literal"] = w.line()
            out["after_literal"] = w.cmd("NOOP")[1]
            # An APPEND over APPENDLIMIT (RFC 7889): NO [TOOBIG], no "+".
            w.send(b"l3 APPEND INBOX {250000}\r\n")
            out["append"] = w.line()
            out["after_append"] = w.cmd("NOOP")[1]
            # A literal that fits max_literal outside APPEND is read fine.
            out["small"] = w.cmd_literals(b"CREATE ", b"Literal/Name", b"")[1]
            # Many empty literals, each followed by a long line: the whole
            # command is bounded, not just each literal.
            w.send(b"l5 LOGIN {0}\r\n")
            for i in range(40):
                reply = w.line()
                if not reply.startswith(b"+"):
                    break
                w.send(b"x" * 60_000 + b" {0}\r\n")
            out["many"] = (i, reply)
            out["after_many"] = w.cmd("NOOP")[1]
            # Non-synchronizing literals over the limit: the data is read
            # and dropped, with the rest of the command (here a second
            # message), and the command refused (RFC 7888 §4).
            w.send(b"l4 APPEND INBOX {300000+}\r\n" + b"x" * 300_000 + b" {5+}\r\nhello\r\n")
            out["nonsync"] = w.line()
            out["after_nonsync"] = w.cmd("NOOP")[1]
            w.send(b"l6 LOGIN {150000+}\r\n" + b"y" * 150_000 + b" pw\r\n")
            out["nonsync_other"] = w.line()
            out["after_other"] = w.cmd("NOOP")[1]
            out["count"] = w.ok("STATUS INBOX (MESSAGES)")
            # Past what is worth reading through: BYE, and the session ends.
            w.send(b"l7 APPEND INBOX {999999999+}\r\n")
            lines = []
            try:
                while True:
                    lines.append(w.line())
            except (EOFError, ConnectionResetError):
                pass
            out["huge"] = lines
        return out

    o = await run(go)
    line = o["line"]
    assert b"BAD" in line.split(b" ")[1] and b"TOOBIG" in line
    assert status_word(o["after_line"]) == b"OK"
    assert o["literal"].startswith(b"l2 BAD [TOOBIG]") or o["literal"].startswith(b"l2 NO [TOOBIG]")
    assert status_word(o["after_literal"]) == b"OK"
    assert o["append"].startswith(b"l3 NO [TOOBIG]")
    assert status_word(o["after_append"]) == b"OK"
    assert status_word(o["small"]) == b"OK"
    rounds, reply = o["many"]
    assert rounds <= 3 and reply.startswith(b"l5 BAD [TOOBIG]"), o["many"]
    assert status_word(o["after_many"]) == b"OK"
    assert o["nonsync"].startswith(b"l4 NO [TOOBIG]")
    assert status_word(o["after_nonsync"]) == b"OK"
    assert o["nonsync_other"].startswith(b"l6 BAD [TOOBIG]")
    assert status_word(o["after_other"]) == b"OK"
    assert o["count"] == [b'* STATUS "INBOX" (MESSAGES 0)\r\n']  # nothing of it was appended
    assert len(o["huge"]) == 1 and o["huge"][0].startswith(b"* BYE [TOOBIG]")


async def test_overlong_lines_inside_authenticate_and_idle(node: Node) -> None:
    def go() -> list[bytes]:
        out = []
        with wire(node) as w:
            w.send(b"a AUTHENTICATE PLAIN\r\n")
            out.append(w.line())
            w.send(b"A" * 70_000 + b"\r\n")
            out.append(w.until(b"a")[1])
            w.login()
            w.ok("SELECT INBOX")
            w.send(b"i IDLE\r\n")
            out.append(w.line())
            w.send(b"D" * 70_000 + b"\r\n")
            out.append(w.until(b"i")[1])
            out.append(w.cmd("NOOP")[1])
        return out

    cont, auth, idling, idle_end, noop = await run(go)
    assert cont.startswith(b"+") and idling.startswith(b"+ ")
    assert auth.startswith(b"a BAD [TOOBIG]") and idle_end.startswith(b"i BAD [TOOBIG]")
    assert status_word(noop) == b"OK"


async def test_twenty_bad_commands_get_bye(node: Node) -> None:
    def go() -> tuple[list[bytes], bool]:
        lines = []
        with wire(node) as w:
            w.send(b"".join(b"b%d !!garbage!!\r\n" % i for i in range(25)))
            try:
                while True:
                    lines.append(w.line())
            except (EOFError, ConnectionResetError):
                pass
            return lines, True

    lines, _ = await run(go)
    assert len(lines) == 21, lines
    assert all(b" BAD " in line for line in lines[:20])
    assert lines[20].startswith(b"* BYE")


async def test_good_command_resets_bad_count(node: Node) -> None:
    def go() -> list[bytes]:
        with wire(node) as w:
            for _ in range(3):
                for i in range(15):
                    w.send(b"b%d !!garbage!!\r\n" % i)
                    w.line()
                w.ok("NOOP")
            return [w.cmd("NOOP")[1]]

    assert status_word((await run(go))[0]) == b"OK"


async def test_commands_in_wrong_state(node: Node) -> None:
    def go() -> dict[str, bytes]:
        out = {}
        with wire(node) as w:
            for cmd in ("SELECT INBOX", "LIST \"\" *", "FETCH 1 FLAGS", "ENABLE CONDSTORE", "IDLE", "CLOSE",
                        "UID FETCH 1 FLAGS", "STATUS INBOX (MESSAGES)", "NAMESPACE"):
                out["pre " + cmd] = w.cmd(cmd)[1]
            out["pre APPEND"] = w.append_plus(b"INBOX", simple(1))[1]
            w.login()
            for cmd in ("LOGIN alice@example.org secret", "AUTHENTICATE PLAIN", "STARTTLS", "FETCH 1 FLAGS",
                        "STORE 1 +FLAGS (\\Seen)", "EXPUNGE", "CLOSE", "UNSELECT", "COPY 1 Trash", "SEARCH ALL"):
                out["auth " + cmd] = w.cmd(cmd)[1]
            w.ok("SELECT INBOX")
            out["sel LOGIN"] = w.cmd("LOGIN a b")[1]
            out["sel ENABLE"] = w.cmd("ENABLE CONDSTORE")[1]
            out["still"] = w.cmd("NOOP")[1]
        return out

    o = await run(go)
    still = o.pop("still")
    assert status_word(still) == b"OK"
    for name, tagged in o.items():
        assert tagged.split(b" ")[1] == b"BAD", (name, tagged)


# -- isolation between accounts ---------------------------------------------------------------------------------------------


async def test_no_access_to_another_accounts_mail(node: Node) -> None:
    secret = b"From: x@y.z\r\nSubject: Bob's secret\r\n\r\nTOP SECRET BOB DATA\r\n"
    await node.seed(node.bob, secret, secret, secret)
    await node.seed(node.bob, secret, mailbox="Archive")
    await node.seed(node.alice, simple(1))
    bob_before = await node.state.storage.mail.status(node.bob, "INBOX")
    names = ["bob@example.org/INBOX", "bob@example.org", "../bob@example.org/INBOX", "#shared/bob/INBOX",
             "user/bob/INBOX", "~bob/INBOX", "/INBOX", "//INBOX", "Other Users/bob/INBOX", "#users/bob",
             "bob/INBOX", "INBOX/../bob", "2", "%", "*"]

    def go() -> dict[str, object]:
        out: dict[str, object] = {}
        with wire(node) as w:
            w.login()
            results = []
            for name in names:
                quoted = '"' + name + '"'
                results.append(("SELECT", name, w.cmd(f"SELECT {quoted}")[1]))
                results.append(("EXAMINE", name, w.cmd(f"EXAMINE {quoted}")[1]))
                results.append(("STATUS", name, w.cmd(f"STATUS {quoted} (MESSAGES)")[1]))
                results.append(("APPEND", name, w.append_plus(quoted.encode(), simple(9))[1]))
            out["results"] = results
            w.ok("SELECT INBOX")
            copies = []
            for name in names:
                copies.append((name, w.cmd(f'COPY 1 "{name}"')[1]))
                copies.append((name, w.cmd(f'UID MOVE 9999 "{name}"')[1]))
            out["copies"] = copies
            out["uid_fetch"] = w.ok("UID FETCH 1:* (UID BODY.PEEK[])")
            out["uid_fetch_bob"] = w.ok("UID FETCH 2:4 (UID BODY.PEEK[])")
            out["list"] = w.ok('LIST "" *')
            out["list_other"] = w.ok('LIST "bob@example.org/" *')
        return out

    o = await run(go)
    for verb, name, tagged in o["results"]:
        assert status_word(tagged) in (b"NO", b"BAD"), (verb, name, tagged)
    for name, tagged in o["copies"]:
        word = status_word(tagged)
        # UID MOVE of a UID that does not exist is a no-op OK only if no
        # mailbox was touched; COPY of a real message must fail.
        assert word in (b"NO", b"BAD") or b"COPYUID" not in tagged, (name, tagged)
    copies_ok = [t for _, t in o["copies"] if status_word(t) == b"OK" and b"COPY " in t]
    assert copies_ok == []
    joined = b"".join(o["uid_fetch"] + o["uid_fetch_bob"] + o["list"] + o["list_other"])
    assert b"TOP SECRET" not in joined and b"bob" not in joined.lower()
    assert len(o["uid_fetch"]) == 1 and o["uid_fetch_bob"] == []
    # Bob's data is untouched, and Alice got no new mailboxes.
    bob_after = await node.state.storage.mail.status(node.bob, "INBOX")
    assert (bob_after.messages, bob_after.highestmodseq) == (bob_before.messages, bob_before.highestmodseq)
    alice_names = sorted(b.name for b in await node.state.storage.mail.mailboxes(node.alice))
    assert alice_names == ["Archive", "Drafts", "INBOX", "Junk", "Sent", "Trash"]
    alice_inbox = await node.state.storage.mail.status(node.alice, "INBOX")
    assert alice_inbox.messages == 1

    def bob_login() -> list[bytes]:
        with wire(node) as w:
            w.login("bob@example.org", "hunter2")
            return w.ok("STATUS INBOX (MESSAGES)")

    # After all of that the node still serves a new login.
    assert await run(bob_login) == [b'* STATUS "INBOX" (MESSAGES 3)\r\n']


# -- more edges ---------------------------------------------------------------------------------------------------------------


async def test_starttls_discards_pipelined_plaintext(node: Node) -> None:
    """Commands sent in clear after STARTTLS must not run inside TLS
    (the STARTTLS command-injection attack, CVE-2011-0411 and kin)."""

    def go() -> tuple[bytes, bytes]:
        with wire(node) as w:
            w.send(b"a STARTTLS\r\nb LOGIN alice@example.org secret\r\n")
            started = w.until(b"a")[1]
            w.sock = insecure_context().wrap_socket(w.sock, server_hostname="localhost")
            w.buf = b""
            w.send(b"c CAPABILITY\r\n")
            return started, w.line()

    started, first = await run(go)
    assert status_word(started) == b"OK"
    # The first thing said inside TLS answers "c", and "b" was never run.
    assert first.startswith(b"* CAPABILITY") and b"AUTH=PLAIN" in first


async def test_large_message_across_blob_chunks(node: Node) -> None:
    body = b"".join(b"line %06d of a large message............................\r\n" % i for i in range(3000))
    raw = b"Subject: large\r\nFrom: a@b.c\r\n\r\n" + body
    assert 150_000 < len(raw) < 200_000

    def go() -> tuple[bytes, dict[bytes, object]]:
        with wire(node) as w:
            w.login()
            _, tagged = w.cmd_literals(b"APPEND INBOX ", raw, b"")
        with client(node) as c:
            c.login("alice@example.org", "secret")
            c.select_folder("INBOX")
            return tagged, c.fetch([1], ["BODY.PEEK[]", "BODY.PEEK[]<99990.20>", "BODY.PEEK[TEXT]<150000.100000>", "RFC822.SIZE"])[1]

    tagged, d = await run(go)
    assert status_word(tagged) == b"OK"
    assert d[b"BODY[]"] == raw and d[b"RFC822.SIZE"] == len(raw)
    assert d[b"BODY[]<99990>"] == raw[99990:100010]
    text_start = raw.index(b"\r\n\r\n") + 4
    assert d[b"BODY[TEXT]<150000>"] == raw[text_start + 150000 :]


async def test_append_and_copy_into_selected_mailbox_report_exists(node: Node) -> None:
    await node.seed(node.alice, simple(1))

    def go() -> tuple[list[bytes], list[bytes], list[bytes]]:
        with wire(node) as w:
            w.login()
            w.ok("SELECT INBOX")
            appended = w.append_plus(b"INBOX", simple(2))[0]
            copied = w.ok("COPY 1:2 INBOX")
            return appended, copied, w.ok("FETCH 1:* (UID)")

    appended, copied, fetched = await run(go)
    assert appended == [b"* 2 EXISTS\r\n"]
    assert copied == [b"* 4 EXISTS\r\n"]
    assert fetched == [b"* %d FETCH (UID %d)\r\n" % (i, i) for i in range(1, 5)]


async def test_recreated_mailbox_gets_new_uidvalidity(node: Node) -> None:
    def go() -> tuple[list[bytes], list[bytes]]:
        with wire(node) as w:
            w.login()
            w.ok("CREATE Temp")
            first = w.ok("STATUS Temp (UIDVALIDITY)")
            w.ok("DELETE Temp")
            w.ok("CREATE Temp")
            return first, w.ok("STATUS Temp (UIDVALIDITY)")

    first, second = await run(go)
    v1 = int(re.search(rb"UIDVALIDITY (\d+)", first[0]).group(1))
    v2 = int(re.search(rb"UIDVALIDITY (\d+)", second[0]).group(1))
    assert v2 > v1  # RFC 9051 §2.3.1.1


async def test_envelope_keeps_encoded_words_for_non_utf8_clients(node: Node) -> None:
    raw = (
        b"From: =?utf-8?q?J=C3=BCrgen?= <juergen@example.org>\r\n"
        b"Subject: =?utf-8?q?Gr=C3=BC=C3=9Fe?= aus\r\n"
        b"  Berlin\r\n"
        b"\r\nHallo\r\n"
    )
    await node.seed(node.alice, raw)

    def go() -> list[bytes]:
        with wire(node) as w:
            w.login()
            w.ok("SELECT INBOX")
            return w.ok("FETCH 1 ENVELOPE")

    [line] = await run(go)
    assert line.isascii()
    assert b'"=?utf-8?q?Gr=C3=BC=C3=9Fe?= aus  Berlin"' in line or b'"=?utf-8?q?Gr=C3=BC=C3=9Fe?= aus Berlin"' in line
    assert b'(("=?utf-8?q?J=C3=BCrgen?=" NIL "juergen" "example.org"))' in line


async def test_credentials_with_special_characters(node: Node) -> None:
    password = 'p@ss "wörd" \\ {3}'
    await make_account(node.state.storage, "carol@example.org", password)

    def go() -> tuple[bytes, bytes, bytes]:
        with wire(node) as w:
            literal = w.cmd_literals(b"LOGIN carol@example.org ", password.encode(), b"")[1]
        with wire(node) as w:
            data = password.encode()
            w.send(b"q LOGIN carol@example.org {%d+}\r\n" % len(data) + data + b"\r\n")
            nonsync = w.until(b"q")[1]
        authzid = base64.b64encode(b"alice@example.org\x00carol@example.org\x00" + password.encode())
        with wire(node) as w:
            other = w.cmd(b"AUTHENTICATE PLAIN " + authzid)[1]
        return literal, nonsync, other

    literal, nonsync, other = await run(go)
    assert status_word(literal) == b"OK" and status_word(nonsync) == b"OK"
    # An authzid other than the authenticated user: no proxy rights.
    assert status_word(other) == b"NO"


async def test_huge_ranges_and_deep_nesting_are_cheap(node: Node) -> None:
    await node.seed(node.alice, simple(1), simple(2))

    def go() -> dict[str, object]:
        out: dict[str, object] = {}
        with wire(node) as w:
            w.login()
            w.ok("SELECT INBOX")
            t0 = time.monotonic()
            out["seq"] = w.cmd("FETCH 1:4294967295 (FLAGS)")[1]
            out["uid"] = w.ok("UID FETCH 1:4294967295 (FLAGS)")
            out["uid_store"] = w.ok("UID STORE 2:4294967295 +FLAGS.SILENT (\\Seen)")
            out["copy"] = w.cmd("UID COPY 4294967295 Trash")[1]
            out["zero"] = w.cmd("FETCH 0 FLAGS")[1]
            out["nested"] = w.cmd("SEARCH " + "(" * 5000 + "ALL" + ")" * 5000)[1]
            out["many"] = w.cmd("FETCH " + ",".join(["1"] * 20000) + " FLAGS")[1]
            out["elapsed"] = time.monotonic() - t0
            out["after"] = w.cmd("NOOP")[1]
        return out

    o = await run(go)
    assert status_word(o["seq"]) == b"BAD"  # past the last sequence number
    assert len(o["uid"]) == 2
    assert status_word(o["copy"]) == b"OK" and b"COPYUID" not in o["copy"]  # nothing to copy
    assert status_word(o["zero"]) == b"BAD"
    assert status_word(o["nested"]) == b"BAD"
    assert status_word(o["many"]) in (b"OK", b"BAD")
    assert o["elapsed"] < 10
    assert status_word(o["after"]) == b"OK"


async def test_shutdown_says_bye_to_idle_and_idle_sessions(tmp_path: Path) -> None:
    cfg = node_config(tmp_path / "data", listen=("imap",))
    async with running_node(cfg) as state:
        await make_account(state.storage, "alice@example.org", "secret")
        port = state.ports["imap"]
        w1 = await run(lambda: Wire(port))
        w2 = await run(lambda: Wire(port))
        try:
            await run(lambda: (w1.login(), w1.ok("SELECT INBOX"), w1.send(b"i IDLE\r\n"), w1.line()))
            await run(w2.login)
            state_node = state
        except BaseException:
            w1.close()
            w2.close()
            raise
    try:
        assert state_node.phase == "stopped"

        def rest(w: Wire) -> list[bytes]:
            lines = []
            try:
                while True:
                    lines.append(w.line())
            except (EOFError, ConnectionResetError):
                return lines

        for w in (w1, w2):
            lines = await run(lambda: rest(w))
            assert lines and lines[-1].startswith(b"* BYE [UNAVAILABLE]"), lines
    finally:
        w1.close()
        w2.close()


async def test_status_counters_match_contents_after_many_operations(node: Node) -> None:
    await node.seed(node.alice, *(simple(i, b"x" * i) for i in range(1, 9)))

    def go() -> dict[str, tuple[list[bytes], list[bytes]]]:
        with wire(node) as w:
            w.login()
            w.ok("SELECT INBOX")
            w.ok("STORE 1:3 +FLAGS.SILENT (\\Seen)")
            w.ok("STORE 2,4 +FLAGS.SILENT (\\Deleted)")
            w.ok("FETCH 5 BODY[]")  # sets \Seen
            w.ok("COPY 1:4 Archive")
            w.ok("MOVE 6:7 Trash")
            w.ok("STORE 1 -FLAGS.SILENT (\\Seen)")
            w.ok("STORE 3 FLAGS.SILENT (\\Deleted \\Seen)")
            w.ok("EXPUNGE")
            w.ok("SELECT Archive")
            w.ok("STORE 1:* -FLAGS.SILENT (\\Deleted)")
            w.ok("UID EXPUNGE 1:*")
            w.ok("SELECT Trash")
            w.ok("STORE 1 +FLAGS.SILENT (\\Deleted \\Seen)")
            w.ok("CLOSE")
            w.ok("RENAME INBOX Saved")
            w.append_plus(b"INBOX", simple(20))
            out = {}
            for box in ("INBOX", "Saved", "Archive", "Trash"):
                status = w.ok(f"STATUS {box} (MESSAGES UNSEEN DELETED SIZE)")
                w.ok(f"EXAMINE {box}")
                out[box] = (status, w.ok("FETCH 1:* (FLAGS RFC822.SIZE)") if b"MESSAGES 0" not in status[0] else [])
                w.ok("UNSELECT")
            return out

    out = await run(go)
    for box, (status, fetched) in out.items():
        flags = [re.search(rb"FLAGS \(([^)]*)\)", line).group(1).split() for line in fetched]
        sizes = [int(re.search(rb"RFC822.SIZE (\d+)", line).group(1)) for line in fetched]
        expected = b'* STATUS "%s" (MESSAGES %d UNSEEN %d DELETED %d SIZE %d)\r\n' % (
            box.encode(), len(fetched), sum(b"\\Seen" not in f for f in flags), sum(b"\\Deleted" in f for f in flags), sum(sizes))
        assert status == [expected], box
    assert b"MESSAGES 1 " in out["INBOX"][0][0]


async def test_a_finished_session_is_freed_without_the_garbage_collector(node: Node) -> None:
    """A session that refers to itself through a cycle lives, with its
    selected mailbox's view, until a collection finds it, and every young
    collection until then walks that view again (at 10,000 messages those
    pauses were tens of ms). Nothing of a finished session may be cyclic."""
    import gc

    from protocols.imap.session import ImapSession

    def cycle() -> None:
        with imaplib.IMAP4("127.0.0.1", node.port, timeout=10) as m:
            m.login("alice@example.org", "secret")
            m.select("INBOX")
            m.fetch("1:*", "(FLAGS)")
            m.logout()

    await run(cycle)
    gc.collect()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        await run(cycle)
        await asyncio.sleep(0.1)
        gc.collect()
        leaked = [o for o in gc.garbage if isinstance(o, ImapSession)]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
    assert leaked == []


async def test_fetch_that_fails_part_way_sets_no_flags(node: Node) -> None:
    # Message 1 has a part 2, message 2 (one text part) has none.
    await node.seed(node.alice, MULTIPART, simple(2))

    def go() -> tuple[bytes, list[bytes], list[bytes], bytes, list[bytes]]:
        with wire(node) as w, wire(node) as other:
            w.login()
            other.login()
            w.ok("SELECT INBOX")
            other.ok("SELECT INBOX")
            _, failed = w.cmd("FETCH 1:2 (FLAGS BODY[2])")
            own = w.ok("FETCH 1:2 FLAGS")
            seen_by_other = other.ok("FETCH 1:2 FLAGS")
            _, good = w.cmd("FETCH 1 (BODY[2])")
            after = w.ok("FETCH 1:2 FLAGS")
            return failed, own, seen_by_other, good, after

    failed, own, seen_by_other, good, after = await run(go)
    assert status_word(failed) == b"NO" and code(failed) == b"NONEXISTENT"
    # Neither message was marked \Seen, for this session or any other.
    assert fetch_lines(own) == [b"* 1 FETCH (FLAGS ())\r\n", b"* 2 FETCH (FLAGS ())\r\n"]
    assert fetch_lines(seen_by_other) == [b"* 1 FETCH (FLAGS ())\r\n", b"* 2 FETCH (FLAGS ())\r\n"]
    # A FETCH that succeeds still sets it, and only on the message it read.
    assert status_word(good) == b"OK"
    assert fetch_lines(after) == [b"* 1 FETCH (FLAGS (\\Seen))\r\n", b"* 2 FETCH (FLAGS ())\r\n"]


async def test_fetch_reads_emails_a_page_at_a_time(node: Node, monkeypatch: pytest.MonkeyPatch) -> None:
    import protocols.imap.session as session_module
    import storage.mail as mail_module

    # Pages of 3 messages (reads of 2 emails): 8 messages take several.
    monkeypatch.setattr(session_module, "FETCH_PAGE", 3)
    monkeypatch.setattr(mail_module, "EMAILS_PER_READ", 2)
    await node.seed(node.alice, *(simple(i) for i in range(1, 8)), MULTIPART)
    node.state.storage.mail._emails.clear()  # every email comes from the store
    reads: list[int] = []
    real = mail_module.get_emails

    def get_emails(tr, acct, ids):  # type: ignore[no-untyped-def]
        reads.append(len(ids))
        return real(tr, acct, ids)

    monkeypatch.setattr(mail_module, "get_emails", get_emails)

    def go() -> tuple[list[bytes], bytes, list[bytes], list[bytes]]:
        with wire(node) as w:
            w.login()
            w.ok("SELECT INBOX")
            subjects = w.ok("FETCH 1:* (BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
            # Part 2 exists only in message 8, on the last page: the check
            # fails there, and no message of any page is marked \Seen.
            _, failed = w.cmd("FETCH 1:* (BODY[2])")
            flags = w.ok("FETCH 1:* FLAGS")
            read = w.ok("FETCH 1:* (BODY[1])")
            return subjects, failed, flags, read

    subjects, failed, flags, read = await run(go)
    got = [line for line in subjects if b"Subject:" in line]
    assert len(got) == 8 and all(b"Message %d" % i in got[i - 1] for i in range(1, 8)), subjects
    assert status_word(failed) == b"NO"
    assert fetch_lines(flags) == [b"* %d FETCH (FLAGS ())\r\n" % i for i in range(1, 9)]
    assert sum(1 for line in read if b"FETCH" in line and b"BODY[1]" in line) == 8
    assert sum(1 for line in read if b"\\Seen" in line) == 8
    assert reads and max(reads) <= 2


async def test_whole_mailbox_flag_fetch_is_right_for_every_session(node: Node) -> None:
    # Sessions that selected the same unchanged mailbox share one rendering
    # of its flags; one that changed it, or selected after a change, does not.
    await node.seed(node.alice, *(simple(i) for i in range(1, 5)))

    def go() -> list[list[bytes]]:
        with wire(node) as a, wire(node) as b:
            a.login()
            b.login()
            a.ok("SELECT INBOX")
            b.ok("SELECT INBOX")
            first = a.ok("UID FETCH 1:* (FLAGS)")
            same = b.ok("UID FETCH 1:* (FLAGS)")
            b.ok("STORE 2 +FLAGS.SILENT (\\Flagged)")
            own = b.ok("UID FETCH 1:* (FLAGS)")
            with wire(node) as c:
                c.login()
                c.ok("SELECT INBOX")
                later = c.ok("FETCH 1:* (UID FLAGS)")
            told = a.ok("UID FETCH 1:* (FLAGS)")  # the old view, then the news
            again = a.ok("UID FETCH 1:* (FLAGS)")
            return [first, same, own, later, told, again]

    first, same, own, later, told, again = await run(go)
    plain = [b"* %d FETCH (UID %d FLAGS ())\r\n" % (i, i) for i in range(1, 5)]
    flagged = plain[:1] + [b"* 2 FETCH (UID 2 FLAGS (\\Flagged))\r\n"] + plain[2:]
    assert fetch_lines(first) == fetch_lines(same) == plain
    assert fetch_lines(own) == flagged
    assert fetch_lines(later) == flagged
    assert fetch_lines(told)[:4] == plain
    [news] = fetch_lines(told)[4:]
    assert news.startswith(b"* 2 FETCH (") and b"FLAGS (\\Flagged)" in news
    assert fetch_lines(again) == flagged


async def test_searchres_saved_result_in_fetch_and_uid_expunge(node: Node) -> None:
    uids = await node.seed(node.alice, *(simple(i) for i in range(1, 6)))

    def go() -> tuple[list[bytes], list[bytes], list[bytes], bytes, list[bytes]]:
        with wire(node) as w:
            w.login()
            w.ok("SELECT INBOX")
            saved = w.ok("SEARCH RETURN (SAVE) OR SUBJECT \"Message 2\" SUBJECT \"Message 4\"")
            fetched = w.ok("FETCH $ (UID)")
            w.ok("STORE $ +FLAGS.SILENT (\\Deleted)")
            expunged = w.ok("UID EXPUNGE $")
            _, done = w.cmd("UID SEARCH ALL")
            left = w.ok("UID SEARCH ALL")
            return saved, fetched, expunged, done, left

    saved, fetched, expunged, _, left = await run(go)
    assert saved == []  # RETURN (SAVE) alone sends no ESEARCH (RFC 5182 §2.4)
    assert fetched == [b"* 2 FETCH (UID %d)\r\n" % uids[1], b"* 4 FETCH (UID %d)\r\n" % uids[3]]
    assert expunged == [b"* 4 EXPUNGE\r\n", b"* 2 EXPUNGE\r\n"]
    assert left == [b"* SEARCH %d %d %d\r\n" % (uids[0], uids[2], uids[4])]


async def test_failed_search_save_empties_the_saved_result(node: Node) -> None:
    await node.seed(node.alice, *(simple(i) for i in range(1, 4)))

    def go() -> list[tuple[bytes, list[bytes]]]:
        out = []
        with wire(node) as w:
            w.login()
            w.ok("SELECT INBOX")
            # A failure of each kind, each after a good save: a charset we
            # cannot decode (NO, raised by the parser) and a syntax error (BAD).
            for bad in ("SEARCH RETURN (SAVE) CHARSET X-NO-SUCH ALL", "SEARCH RETURN (SAVE) NOSUCHKEY"):
                w.ok("SEARCH RETURN (SAVE) ALL")
                before = w.ok("FETCH $ (FLAGS)")
                _, tagged = w.cmd(bad)
                after = w.ok("FETCH $ (FLAGS)")
                out += [(tagged, before), (tagged, after)]
        return out

    (nocharset, before1), (_, after1), (syntax, before2), (_, after2) = await run(go)
    assert status_word(nocharset) == b"NO" and code(nocharset).startswith(b"BADCHARSET")
    assert status_word(syntax) == b"BAD"
    assert len(fetch_lines(before1)) == 3 and len(fetch_lines(before2)) == 3
    assert after1 == [] and after2 == []


async def test_multiappend_limit_is_per_message(node: Node) -> None:
    # APPENDLIMIT is 200 000 here (smtp.max_message_size); RFC 7889 §3 applies
    # it to each message, not to the sum of a MULTIAPPEND.
    big = [simple(i, b"x" * 150_000) for i in range(3)]
    too_big = simple(9, b"y" * 210_000)

    def go() -> tuple[bytes, bytes, bytes, list[bytes]]:
        with wire(node) as w:
            w.login()
            _, three = w.cmd_literals(b"APPEND INBOX ", big[0], b" ", big[1], b" ", big[2], b"")
            # The second message is over the limit: refused before its data.
            w.send(b"m2 APPEND INBOX {%d}\r\n" % len(big[0]))
            assert w.line().startswith(b"+ ")
            w.send(big[0] + b" {%d}\r\n" % len(too_big))
            refused = w.line()
            _, after = w.cmd("NOOP")
            status = w.ok("STATUS INBOX (MESSAGES)")
            return three, refused, after, status

    three, refused, after, status = await run(go)
    assert status_word(three) == b"OK" and code(three).startswith(b"APPENDUID ") and code(three).endswith(b" 1:3")
    assert refused.startswith(b"m2 NO [TOOBIG]")
    assert status_word(after) == b"OK"
    assert status == [b'* STATUS "INBOX" (MESSAGES 3)\r\n']


async def test_condstore_fetch_responses_carry_uid_and_modseq(node: Node) -> None:
    uids = await node.seed(node.alice, simple(1), simple(2), simple(3))

    def go() -> tuple[list[bytes], list[bytes], list[bytes], list[bytes]]:
        with wire(node) as w, wire(node) as other:
            w.login()
            other.login()
            w.ok("ENABLE CONDSTORE")  # CONDSTORE only, not QRESYNC
            w.ok("SELECT INBOX")
            other.ok("SELECT INBOX")
            other.ok("STORE 1 +FLAGS.SILENT (\\Flagged)")
            unsolicited = w.ok("NOOP")
            stored = w.ok("STORE 3 +FLAGS (\\Answered)")
            seen = w.ok("FETCH 2 (BODY[TEXT])")
            peeked = w.ok("FETCH 2 (BODY.PEEK[TEXT])")
            return unsolicited, stored, seen, peeked

    unsolicited, stored, seen, peeked = await run(go)
    assert len(fetch_lines(unsolicited)) == 1
    assert re.fullmatch(rb"\* 1 FETCH \(UID %d FLAGS \(\\Flagged\) MODSEQ \(\d+\)\)\r\n" % uids[0], unsolicited[-1])
    assert re.fullmatch(rb"\* 3 FETCH \(UID %d FLAGS \(\\Answered\) MODSEQ \(\d+\)\)\r\n" % uids[2], stored[0])
    # The FETCH that set \Seen reports the change with UID and MODSEQ.
    [line] = seen
    assert line.startswith(b"* 2 FETCH (UID %d BODY[TEXT] {19}\r\nBody of message 2\r\n" % uids[1])
    assert re.search(rb" FLAGS \(\\Seen\) MODSEQ \(\d+\)\)\r\n\Z", line)
    # One that changed nothing is a plain answer.
    assert peeked == [b"* 2 FETCH (BODY[TEXT] {19}\r\nBody of message 2\r\n)\r\n"]


async def test_select_in_imap4rev2_sends_the_mailbox_list_response(node: Node) -> None:
    await node.state.storage.mail.create_mailbox(node.alice, "Projects/2024")

    def go() -> tuple[list[bytes], list[bytes], list[bytes], list[bytes]]:
        with wire(node) as w:
            w.login()
            rev1 = w.ok("SELECT Projects")
            w.ok("UNSELECT")
            w.ok("ENABLE IMAP4rev2")
            parent = w.ok("EXAMINE Projects")
            leaf = w.ok("SELECT Projects/2024")
            sent = w.ok("SELECT Sent")
            return rev1, parent, leaf, sent

    rev1, parent, leaf, sent = await run(go)
    assert not any(line.startswith(b"* LIST") for line in rev1)
    # RFC 9051 §6.3.2: one LIST response, with accurate attributes.
    assert [line for line in parent if line.startswith(b"* LIST")] == [b'* LIST (\\HasChildren) "/" "Projects"\r\n']
    assert [line for line in leaf if line.startswith(b"* LIST")] == [b'* LIST (\\HasNoChildren) "/" "Projects/2024"\r\n']
    [sent_list] = [line for line in sent if line.startswith(b"* LIST")]
    assert _attrs([sent_list], b"Sent") == {b"\\HasNoChildren", b"\\Sent"}


def _modseqs(lines: list[bytes]) -> dict[int, int]:
    out = {}
    for line in lines:
        m = re.match(rb"\* (\d+) FETCH \(MODSEQ \((\d+)\)\)", line)
        assert m, line
        out[int(m.group(1))] = int(m.group(2))
    return out


async def test_search_modseq_and_esearch_min_max_count_on_the_wire(node: Node) -> None:
    await node.seed(node.alice, simple(1), simple(2), simple(3), simple(4))

    def go() -> dict[str, list[bytes]]:
        out = {}
        with wire(node) as w:
            w.login()
            w.ok("ENABLE CONDSTORE")
            w.ok("SELECT INBOX")
            # Message 2 gets the highest mod-sequence, above MIN's and MAX's.
            w.ok("STORE 2 +FLAGS.SILENT (\\Flagged)")
            out["modseqs"] = w.ok("FETCH 1:4 (MODSEQ)")
            out.update(w.named([
                ("plain", "SEARCH MODSEQ 1"),
                ("min", "SEARCH RETURN (MIN) MODSEQ 1"),
                ("max", "SEARCH RETURN (MAX) MODSEQ 1"),
                ("minmax", "SEARCH RETURN (MIN MAX) MODSEQ 1"),
                ("all", "SEARCH RETURN (MAX ALL) MODSEQ 1"),
                ("count", "UID SEARCH RETURN (COUNT) MODSEQ 1"),
                ("esearch", "SEARCH RETURN (MIN MAX COUNT) UNFLAGGED"),
                ("none", "SEARCH RETURN (MIN MAX COUNT) MODSEQ 1000000"),
            ]))
        return out

    o = await run(go)
    ms = _modseqs(o["modseqs"])
    assert ms[2] > max(ms[1], ms[3], ms[4])
    assert o["plain"] == [b"* SEARCH 1 2 3 4 (MODSEQ %d)\r\n" % ms[2]]
    # RFC 4731 §3.2: MIN or MAX alone report the mod-sequence of that message.
    assert o["min"] == [b'* ESEARCH (TAG "min") MIN 1 MODSEQ %d\r\n' % ms[1]]
    assert o["max"] == [b'* ESEARCH (TAG "max") MAX 4 MODSEQ %d\r\n' % ms[4]]
    assert o["minmax"] == [b'* ESEARCH (TAG "minmax") MIN 1 MAX 4 MODSEQ %d\r\n' % max(ms[1], ms[4])]
    assert o["all"] == [b'* ESEARCH (TAG "all") MAX 4 ALL 1:4 MODSEQ %d\r\n' % ms[2]]
    assert o["count"] == [b'* ESEARCH (TAG "count") UID COUNT 4 MODSEQ %d\r\n' % ms[2]]
    assert o["esearch"] == [b'* ESEARCH (TAG "esearch") MIN 1 MAX 4 COUNT 3\r\n']
    assert o["none"] == [b'* ESEARCH (TAG "none") COUNT 0\r\n']


def _dated(subject: str, day: int, mid: str, refs: str = "") -> bytes:
    head = (
        f"From: a@remote.test\r\nTo: alice@example.org\r\nSubject: {subject}\r\n"
        f"Date: Mon, {day} Jan 2024 10:00:00 +0000\r\nMessage-ID: <{mid}>\r\n"
    )
    if refs:
        head += f"In-Reply-To: <{refs}>\r\nReferences: <{refs}>\r\n"
    return (head + "\r\nbody\r\n").encode()


async def test_sort_and_thread_through_a_session(node: Node) -> None:
    uids = await node.seed(
        node.alice,
        _dated("Zebra", 3, "z@x"),
        _dated("apple", 5, "a@x"),
        _dated("Re: Zebra", 4, "z2@x", refs="z@x"),
        _dated("Mango", 1, "m@x"),
    )

    def go() -> dict[str, list[bytes]]:
        with wire(node) as w:
            w.login()
            w.ok("SELECT INBOX")
            return w.named([
                ("subject", "SORT (SUBJECT) UTF-8 ALL"),
                ("reverse_date", "SORT (REVERSE DATE) UTF-8 ALL"),
                ("uid_subject", "UID SORT (SUBJECT ARRIVAL) UTF-8 NOT SUBJECT Mango"),
                ("references", "THREAD REFERENCES UTF-8 ALL"),
                ("ordered", "UID THREAD ORDEREDSUBJECT UTF-8 ALL"),
            ])

    o = await run(go)
    # RFC 5256 §2.1: the base subject drops "Re:" and ignores case.
    assert o["subject"] == [b"* SORT 2 4 1 3\r\n"]
    assert o["reverse_date"] == [b"* SORT 2 3 1 4\r\n"]
    assert o["uid_subject"] == [b"* SORT %d %d %d\r\n" % (uids[1], uids[0], uids[2])]
    # The reply threads under its parent; threads ordered by their first date.
    assert o["references"] == [b"* THREAD (4)(1 3)(2)\r\n"]
    assert o["ordered"] == [b"* THREAD (%d)(%d %d)(%d)\r\n" % (uids[3], uids[0], uids[2], uids[1])]


@contextlib.asynccontextmanager
async def short_timer_listener(node: Node, seconds: float) -> AsyncIterator[int]:
    """A listener on the node's store and push hub with timers far below
    what the config allows (imap.autologout has the RFC 9051 §5.4 minimum)."""
    settings = ImapSettings(hostname="mx.test", autologout=seconds, preauth_timeout=seconds)
    listener = ImapListener(node.state.storage, node.state.hub, settings, None)
    port = await listener.start("127.0.0.1", 0)
    try:
        yield port
    finally:
        listener.stop_accepting()
        await listener.drain(1.0)


async def test_timeout_inside_idle_and_authenticate_says_bye(node: Node) -> None:
    async with short_timer_listener(node, 0.5) as port:

        def go() -> tuple[bytes, list[bytes], bytes, list[bytes], list[bytes]]:
            with Wire(port) as w:
                w.login()
                w.ok("SELECT INBOX")
                w.send(b"i1 IDLE\r\n")
                cont = w.line()
                idle_rest = []
                with contextlib.suppress(EOFError, ConnectionResetError):
                    while True:
                        idle_rest.append(w.line())
            with Wire(port) as a:
                a.send(b"a1 AUTHENTICATE PLAIN\r\n")
                auth_cont = a.line()
                auth_rest = []
                with contextlib.suppress(EOFError, ConnectionResetError):
                    while True:
                        auth_rest.append(a.line())
                between = []
                with Wire(port) as b:
                    with contextlib.suppress(EOFError, ConnectionResetError):
                        while True:
                            between.append(b.line())
                return cont, idle_rest, auth_cont, auth_rest, between

        cont, idle_rest, auth_cont, auth_rest, between = await run(go)
    assert cont.startswith(b"+ ") and auth_cont.startswith(b"+")
    assert len(idle_rest) == 1 and idle_rest[0].startswith(b"* BYE ")
    assert len(auth_rest) == 1 and auth_rest[0].startswith(b"* BYE ")
    # Between commands it was already so.
    assert len(between) == 1 and between[0].startswith(b"* BYE ")


async def test_status_highestmodseq_of_an_empty_mailbox_agrees_with_select(node: Node) -> None:
    await node.state.storage.mail.create_mailbox(node.alice, "Empty")

    def go() -> tuple[list[bytes], list[bytes], list[bytes]]:
        with wire(node) as w:
            w.login()
            status = w.ok("STATUS Empty (HIGHESTMODSEQ)")
            listed = w.ok('LIST "" Empty RETURN (STATUS (HIGHESTMODSEQ))')
            selected = w.ok("SELECT Empty")
            return status, listed, selected

    status, listed, selected = await run(go)
    hms = int(re.search(rb"HIGHESTMODSEQ (\d+)", b"".join(selected)).group(1))
    assert hms >= 1  # RFC 7162 §7: the response code's value is positive
    assert status == [b'* STATUS "Empty" (HIGHESTMODSEQ %d)\r\n' % hms]
    assert b'* STATUS "Empty" (HIGHESTMODSEQ %d)\r\n' % hms in listed


async def test_subscriptions_outlive_mailboxes_and_list_them_right(node: Node) -> None:
    def go() -> dict[str, object]:
        out: dict[str, object] = {}
        with wire(node) as w:
            w.login()
            out["sub_missing"] = w.cmd("SUBSCRIBE NoSuch")[1]
            w.ok("CREATE Temp")
            w.ok("DELETE Temp")
            w.ok("CREATE Deep/Child")
            w.ok("UNSUBSCRIBE Deep")
            w.ok("SUBSCRIBE Ghost/Child")  # neither Ghost nor Ghost/Child exists
            out["list_sub"] = w.ok('LIST (SUBSCRIBED) "" *')
            out["recursive"] = w.ok('LIST (SUBSCRIBED RECURSIVEMATCH) "" %')
            out["lsub_all"] = w.ok('LSUB "" *')
            out["lsub_top"] = w.ok('LSUB "" %')
            out["plain"] = w.ok('LIST "" *')
            w.ok("CREATE Temp")
            out["recreated"] = w.ok('LIST (SUBSCRIBED) "" Temp')
            w.ok("RENAME Deep Far")
            out["renamed"] = w.ok('LSUB "" *')
            w.ok("UNSUBSCRIBE NoSuch")
            out["unsubscribed"] = w.ok('LIST (SUBSCRIBED) "" NoSuch')
        return out

    o = await run(go)
    assert status_word(o["sub_missing"]) == b"OK"
    sub = o["list_sub"]
    # RFC 5258 §3.1: subscribed names that are not mailboxes are \NonExistent.
    assert _attrs(sub, b"NoSuch") == {b"\\NonExistent", b"\\Subscribed"}
    assert _attrs(sub, b"Temp") == {b"\\NonExistent", b"\\Subscribed"}  # DELETE kept it (RFC 9051 §6.3.7)
    assert _attrs(sub, b"Ghost/Child") == {b"\\NonExistent", b"\\Subscribed"}
    assert _attrs(sub, b"Deep/Child") == {b"\\HasNoChildren", b"\\Subscribed"}
    assert b"Deep" not in _names(sub)
    rec = o["recursive"]
    assert b'* LIST (\\HasChildren) "/" "Deep" ("CHILDINFO" ("SUBSCRIBED"))\r\n' in rec
    assert b'* LIST (\\NonExistent) "/" "Ghost" ("CHILDINFO" ("SUBSCRIBED"))\r\n' in rec
    assert b'* LIST (\\NonExistent \\Subscribed) "/" "NoSuch"\r\n' in rec
    lsub_all = o["lsub_all"]
    assert b'* LSUB (\\Noselect) "/" "NoSuch"\r\n' in lsub_all and b'* LSUB () "/" "Deep/Child"\r\n' in lsub_all
    assert b"Deep" not in _names(lsub_all, b"LSUB")
    # RFC 3501 §6.3.9: with %, the unsubscribed parent of a subscribed child
    # is returned, flagged \Noselect.
    lsub_top = o["lsub_top"]
    assert b'* LSUB (\\Noselect) "/" "Deep"\r\n' in lsub_top and b'* LSUB (\\Noselect) "/" "Ghost"\r\n' in lsub_top
    assert b'* LSUB () "/" "INBOX"\r\n' in lsub_top and b"Deep/Child" not in b"".join(lsub_top)
    assert b"NoSuch" not in _names(o["plain"]) and b"Temp" not in _names(o["plain"])
    assert _attrs(o["recreated"], b"Temp") == {b"\\HasNoChildren", b"\\Subscribed"}
    renamed = _names(o["renamed"], b"LSUB")
    assert b"Far/Child" in renamed and b"Deep/Child" not in renamed
    assert o["unsubscribed"] == []


async def test_delete_with_children_leaves_a_noselect_name(node: Node) -> None:
    await node.state.storage.mail.create_mailbox(node.alice, "Parent/Child")
    await node.seed(node.alice, simple(1), simple(2), mailbox="Parent")
    old = await node.state.storage.mail.mailbox(node.alice, "Parent")

    def go() -> dict[str, object]:
        out: dict[str, object] = {}
        with wire(node) as w, wire(node) as watcher:
            w.login()
            watcher.login()
            watcher.ok("SELECT Parent")
            out["delete"] = w.cmd("DELETE Parent")[1]
            watcher.send(b"n1 NOOP\r\n")
            seen = []
            with contextlib.suppress(EOFError, ConnectionResetError):
                while not seen or not seen[-1].startswith(b"n1 "):
                    seen.append(watcher.line())
            out["watcher"] = seen
            out["list"] = w.ok('LIST "" Parent*')
            out["list_status"] = w.ok('LIST "" Parent* RETURN (STATUS (MESSAGES))')
            out["select"] = w.cmd("SELECT Parent")[1]
            out["examine"] = w.cmd("EXAMINE Parent")[1]
            out["status"] = w.cmd("STATUS Parent (MESSAGES)")[1]
            out["append"] = w.append_plus(b"Parent", simple(3))[1]
            w.ok("SELECT INBOX")
            w.ok("APPEND INBOX {%d+}\r\n" % len(simple(4)) + simple(4).decode())
            out["copy"] = w.cmd("COPY 1 Parent")[1]
            w.ok("UNSELECT")
            w.ok("CREATE Parent")
            out["recreated"] = w.ok('LIST "" Parent')
            out["reselect"] = w.ok("SELECT Parent")
        return out

    o = await run(go)
    assert status_word(o["delete"]) == b"OK"
    # A session that had it selected learns it is gone, as for any DELETE.
    assert [line for line in o["watcher"] if line.startswith(b"* BYE")]
    assert o["list"] == [b'* LIST (\\Noselect \\HasChildren) "/" "Parent"\r\n',
                         b'* LIST (\\HasNoChildren) "/" "Parent/Child"\r\n']
    # RFC 5819 §2: no STATUS for the \Noselect name.
    statuses = [line for line in o["list_status"] if line.startswith(b"* STATUS")]
    assert statuses == [b'* STATUS "Parent/Child" (MESSAGES 0)\r\n']
    for name in ("select", "examine", "status"):
        assert status_word(o[name]) == b"NO", (name, o[name])
    # CREATE would make it a mailbox again, so APPEND and COPY say TRYCREATE.
    assert status_word(o["append"]) == b"NO" and code(o["append"]) == b"TRYCREATE"
    assert status_word(o["copy"]) == b"NO" and code(o["copy"]) == b"TRYCREATE"
    assert o["recreated"] == [b'* LIST (\\HasChildren) "/" "Parent"\r\n']
    reselect = b"".join(o["reselect"])
    assert b"* 0 EXISTS\r\n" in reselect  # the old messages went with DELETE
    uidvalidity = int(re.search(rb"UIDVALIDITY (\d+)", reselect).group(1))
    assert uidvalidity != old.uidvalidity


async def test_rename_inbox_with_more_messages_than_one_chunk(node: Node, monkeypatch: pytest.MonkeyPatch) -> None:
    from storage import mail

    monkeypatch.setattr(mail, "CHUNK", 4)
    uids = await node.seed(node.alice, *(simple(i) for i in range(1, 12)))

    def go() -> tuple[list[bytes], list[bytes], list[bytes]]:
        with wire(node) as w:
            w.login()
            w.ok("RENAME INBOX Saved")
            old = w.ok("STATUS Saved (MESSAGES UIDNEXT)")
            inbox = w.ok("STATUS INBOX (MESSAGES)")
            w.ok("SELECT Saved")
            subjects = w.ok("FETCH 1:* (BODY.PEEK[HEADER.FIELDS (Subject)])")
            return old, inbox, subjects

    old, inbox, subjects = await run(go)
    assert len(uids) == 11
    assert old == [b'* STATUS "Saved" (MESSAGES 11 UIDNEXT 12)\r\n']
    assert inbox == [b'* STATUS "INBOX" (MESSAGES 0)\r\n']
    assert [re.search(rb"Subject: Message (\d+)", line).group(1) for line in subjects] == [b"%d" % i for i in range(1, 12)]


async def test_append_utf8_data_item(node: Node) -> None:
    raw = "From: José <jose@example.org>\r\nSubject: Café ☕\r\n\r\nhola\r\n".encode()
    box = await node.state.storage.mail.mailbox(node.alice, "INBOX")

    def go() -> tuple[bytes, bytes, list[bytes]]:
        with wire(node) as w:
            w.login()
            w.ok("ENABLE UTF8=ACCEPT")
            # RFC 6855 §4: APPEND mailbox UTF8 (literal8).
            w.send(b"u1 APPEND INBOX (\\Seen) UTF8 (~{%d}\r\n" % len(raw))
            cont = w.line()
            w.send(raw + b")\r\n")
            _, tagged = w.until(b"u1")
            w.ok("SELECT INBOX")
            fetched = w.ok("FETCH 1 (FLAGS BODY.PEEK[])")
            return cont, tagged, fetched

    cont, tagged, fetched = await run(go)
    assert cont.startswith(b"+ ")
    assert status_word(tagged) == b"OK" and code(tagged) == b"APPENDUID %d 1" % box.uidvalidity
    assert fetched == [b"* 1 FETCH (FLAGS (\\Seen) BODY[] {%d}\r\n" % len(raw) + raw + b")\r\n"]


def _big_message(n: int, size: int) -> bytes:
    """A message of about ``size`` bytes whose lines name it and their offset
    (a shifted or repeated piece would not compare equal), one NUL inside."""
    head = b"Subject: big %d\r\nFrom: a@b.c\r\n\r\n" % n
    lines = [b"message %d line %08d ..........................................\r\n" % (n, i) for i in range(size // 64)]
    lines[len(lines) // 2] = b"a NUL here:\x00" + lines[len(lines) // 2][12:]
    return head + b"".join(lines)


async def test_fetch_of_large_messages_streams_with_bounded_buffers(node: Node) -> None:
    sizes = (1_500_000, 2_100_000, 300_000, 1_700_000)
    raws = [_big_message(i, size) for i, size in enumerate(sizes)]
    await node.seed(node.alice, *raws)
    listener = ImapListener(node.state.storage, node.state.hub, ImapSettings(hostname="mx.test"), None)
    port = await listener.start("127.0.0.1", 0)

    def go() -> tuple[list[bytes], bytes, list[bytes], bytes]:
        with Wire(port) as w:
            w.login()
            w.ok("SELECT INBOX")
            tag = w.next_tag()
            w.send(tag + b" FETCH 1:* (UID BODY.PEEK[] RFC822.SIZE)\r\n")
            time.sleep(1.0)  # let the server fill whatever it buffers
            text, tagged = w.until(tag)
            tag = w.next_tag()
            w.send(tag + b" UID FETCH 1:* (BINARY.PEEK[] BODY.PEEK[TEXT]<100.300000> FLAGS)\r\n")
            time.sleep(1.0)
            binary, tagged2 = w.until(tag)
            return text, tagged, binary, tagged2

    try:
        task = asyncio.ensure_future(run(go))
        while not listener.connections and not task.done():
            await asyncio.sleep(0.01)
        [conn] = listener.connections
        text, tagged, binary, tagged2 = await task
    finally:
        listener.stop_accepting()
        await listener.drain(1.0)
    assert status_word(tagged) == b"OK" and status_word(tagged2) == b"OK"
    assert len(text) == len(binary) == len(raws)
    for i, raw in enumerate(raws):
        # A literal cannot carry NUL: BODY[] sends it as 0x80; BINARY[] is exact.
        assert text[i] == b"* %d FETCH (UID %d BODY[] {%d}\r\n" % (i + 1, i + 1, len(raw)) + raw.replace(b"\x00", b"\x80") \
            + b" RFC822.SIZE %d)\r\n" % len(raw)
        body = raw[raw.index(b"\r\n\r\n") + 4 :][100:300_100]
        assert binary[i] == (b"* %d FETCH (UID %d BINARY[] ~{%d}\r\n" % (i + 1, i + 1, len(raw)) + raw
                             + b" BODY[TEXT]<100> {%d}\r\n" % len(body) + body.replace(b"\x00", b"\x80") + b" FLAGS ())\r\n")
    # 5.6 MB went out each time; the server never held more than a few
    # hundred kB of it waiting for the client.
    assert 0 < conn.peak_buffered < 1_000_000, conn.peak_buffered


async def test_binary_of_large_encoded_parts_partial_and_size(node: Node, monkeypatch: pytest.MonkeyPatch) -> None:
    import quopri
    import random

    rnd = random.Random(7)
    blob = bytes(rnd.randrange(256) for _ in range(700_000))  # base64: ~950 kB, ten blob chunks
    text = b"".join(b"caf\xc3\xa9 line %06d = trailing \r\n" % i for i in range(12_000))
    qp = quopri.encodestring(text.replace(b"\r\n", b"\n")).replace(b"\n", b"\r\n")
    raw = (b"Subject: parts\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=B\r\n\r\n"
           b"--B\r\nContent-Type: application/octet-stream\r\nContent-Transfer-Encoding: base64\r\n\r\n"
           + base64.encodebytes(blob).replace(b"\n", b"\r\n")
           + b"--B\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n"
           + qp + b"\r\n--B--\r\n")
    decoded_qp = text.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    await node.seed(node.alice, raw)
    read: list[int] = []
    stream_blob = node.state.storage.mail.stream_blob

    async def counting(digest: bytes, start: int, length: int, step: int) -> AsyncIterator[bytes]:
        async for data in stream_blob(digest, start, length, step):
            read.append(len(data))
            yield data

    monkeypatch.setattr(node.state.storage.mail, "stream_blob", counting)
    # Ranges crossing 96 kB blob chunks (in the encoded data) and the end.
    ranges = [(0, 10), (71_000, 5_000), (300_000, 200_000), (699_990, 100), (800_000, 10)]

    def fetch(w: Wire, items: str) -> bytes:
        [line] = fetch_lines(w.ok(f"FETCH 1 ({items})"))
        return line

    def go() -> dict[str, bytes]:
        out = {}
        with wire(node) as w:
            w.login()
            w.ok("EXAMINE INBOX")
            out["size"] = fetch(w, "BINARY.SIZE[1] BINARY.SIZE[2]")
            for start, length in ranges:
                out[f"1<{start}>"] = fetch(w, f"BINARY.PEEK[1]<{start}.{length}>")
                out[f"2<{start}>"] = fetch(w, f"BINARY.PEEK[2]<{start}.{length}>")
            out["whole1"] = fetch(w, "BINARY.PEEK[1]")
            out["whole2"] = fetch(w, "BINARY.PEEK[2]")
            read.clear()
            out["head"] = fetch(w, "BINARY.PEEK[1]<0.1000>")
        return out

    out = await run(go)
    assert out["size"] == b"* 1 FETCH (BINARY.SIZE[1] %d BINARY.SIZE[2] %d)\r\n" % (len(blob), len(decoded_qp))
    for start, length in ranges:
        for n, data in ((1, blob), (2, decoded_qp)):
            want = data[start : start + length]
            lit = b"~{%d}\r\n" % len(want) if b"\x00" in want else b"{%d}\r\n" % len(want)
            assert out[f"{n}<{start}>"] == b"* 1 FETCH (BINARY[%d]<%d> " % (n, start) + lit + want + b")\r\n", (n, start)
    assert out["whole1"] == b"* 1 FETCH (BINARY[1] ~{%d}\r\n" % len(blob) + blob + b")\r\n"
    assert out["whole2"] == b"* 1 FETCH (BINARY[2] ~{%d}\r\n" % len(decoded_qp) + decoded_qp + b")\r\n"
    # The head of a part is decoded from the part's first chunks alone.
    assert 0 < sum(read) <= 2 * 96 * 1024, read


async def test_client_that_stops_reading_is_dropped_after_write_timeout(node: Node) -> None:
    await node.seed(node.alice, *(_big_message(i, 1_500_000) for i in range(4)))
    settings = ImapSettings(hostname="mx.test", write_timeout=0.5)
    listener = ImapListener(node.state.storage, node.state.hub, settings, None)
    port = await listener.start("127.0.0.1", 0)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
    try:

        def start() -> None:
            sock.settimeout(10)
            sock.connect(("127.0.0.1", port))
            f = sock.makefile("rb")
            f.readline()
            sock.sendall(b"a LOGIN alice@example.org secret\r\n")
            while not f.readline().startswith(b"a "):
                pass
            sock.sendall(b"b SELECT INBOX\r\n")
            while not f.readline().startswith(b"b "):
                pass
            # 6 MB to send, and the client never reads again.
            sock.sendall(b"c FETCH 1:* (BODY.PEEK[])\r\n")

        await run(start)
        assert len(listener.connections) == 1
        [conn] = listener.connections
        loop = asyncio.get_running_loop()
        began = loop.time()
        while listener.connections and loop.time() - began < 10:
            await asyncio.sleep(0.05)
        # The session ended (and was cleaned up) though the client is still
        # connected and silent: its unread output was dropped, not kept.
        assert not listener.connections
        assert conn.writer.is_closing()
        assert conn.peak_buffered < 1_000_000

        def rest() -> bytes:
            sock.settimeout(5)
            data = b""
            with contextlib.suppress(ConnectionResetError):
                while chunk := sock.recv(65536):
                    data += chunk
            return data

        # What the client finally reads is cut short (the kernel's socket
        # buffers hold a few MB on loopback), then the connection ends.
        data = await run(rest)
        assert data.startswith(b"* 1 FETCH (BODY[] {") and b"c OK" not in data
        assert len(data) < 4 * 1_500_000
    finally:
        sock.close()
        listener.stop_accepting()
        await listener.drain(1.0)


async def test_write_timeout_is_configured_under_imap(tmp_path: Path) -> None:
    cfg = node_config(tmp_path / "data", listen=("imap",), imap__write_timeout=7.5)
    assert cfg.imap.write_timeout == 7.5
    assert node_config(tmp_path / "data").imap.write_timeout == 120.0
    with pytest.raises(Exception, match="more than 0"):
        node_config(tmp_path / "data", imap__write_timeout=0)


async def test_internaldate_keeps_its_zone_and_search_uses_its_own_day(node: Node) -> None:
    # 23:44 on the 17th at -0700 is the 18th in UTC; 02:00 on 1 Jan 2020 at
    # +0530 is still 31 Dec 2019 in UTC; the first is delivered (UTC).
    await node.seed(node.alice, simple(3), when=WHEN)

    def go() -> dict[str, object]:
        out: dict[str, object] = {}
        with wire(node) as w:
            w.login()
            for date in (b"17-Jul-1996 23:44:25 -0700", b" 1-Jan-2020 02:00:00 +0530"):
                _, tagged = w.cmd_literals(b'APPEND INBOX () "' + date + b'" ', simple(1), b"")
                assert status_word(tagged) == b"OK", tagged
            w.ok("SELECT INBOX")
            out["fetch"] = fetch_lines(w.ok("FETCH 1:* (INTERNALDATE)"))
            for key in ("ON 17-Jul-1996", "ON 18-Jul-1996", "BEFORE 18-Jul-1996", "SINCE 18-Jul-1996",
                        "ON 1-Jan-2020", "ON 31-Dec-2019", "SINCE 1-Jan-2020", "BEFORE 1-Jan-2020"):
                [line] = w.ok(f"SEARCH {key}")
                out[key] = line
            w.ok("COPY 2 Drafts")
            w.ok("SELECT Drafts")
            out["copy"] = fetch_lines(w.ok("FETCH 1 (INTERNALDATE)"))
        return out

    out = await run(go)
    assert out["fetch"] == [
        b'* 1 FETCH (INTERNALDATE "17-Jul-1996 09:44:25 +0000")\r\n',
        b'* 2 FETCH (INTERNALDATE "17-Jul-1996 23:44:25 -0700")\r\n',
        b'* 3 FETCH (INTERNALDATE "01-Jan-2020 02:00:00 +0530")\r\n',
    ]
    # RFC 9051 §6.4.4: the day as written, disregarding time and zone.
    assert out["ON 17-Jul-1996"] == b"* SEARCH 1 2\r\n"
    assert out["ON 18-Jul-1996"] == b"* SEARCH\r\n"
    assert out["BEFORE 18-Jul-1996"] == b"* SEARCH 1 2\r\n"
    assert out["SINCE 18-Jul-1996"] == b"* SEARCH 3\r\n"
    assert out["ON 1-Jan-2020"] == b"* SEARCH 3\r\n"
    assert out["ON 31-Dec-2019"] == b"* SEARCH\r\n"
    assert out["SINCE 1-Jan-2020"] == b"* SEARCH 3\r\n"
    assert out["BEFORE 1-Jan-2020"] == b"* SEARCH 1 2\r\n"
    assert out["copy"] == [b'* 1 FETCH (INTERNALDATE "17-Jul-1996 23:44:25 -0700")\r\n']


async def test_locked_out_address_gets_unavailable_after_the_delay(node: Node) -> None:
    directory = node.state.storage.directory
    directory.max_failed_logins = 3
    directory.failed_login_delay = 0.3

    def go() -> list[tuple[bytes, float]]:
        out = []
        with wire(node) as w:
            for creds in ("alice@example.org wrong", "nobody@example.org x", "alice@example.org wrong",
                          "alice@example.org secret"):
                start = time.monotonic()
                out.append((w.cmd(f"LOGIN {creds}")[1], time.monotonic() - start))
            start = time.monotonic()
            tag = w.next_tag()
            w.send(tag + b" AUTHENTICATE PLAIN " + base64.b64encode(b"\0alice@example.org\0secret") + b"\r\n")
            out.append((w.until(tag)[1], time.monotonic() - start))
        return out

    answers = await run(go)
    for tagged, elapsed in answers[:3]:
        assert status_word(tagged) == b"NO" and code(tagged) == b"AUTHENTICATIONFAILED", tagged
        assert elapsed >= 0.3
    # Locked out: the right password is not even checked; RFC 5530 says
    # UNAVAILABLE (try later), not that the credentials are wrong.
    for tagged, elapsed in answers[3:]:
        assert status_word(tagged) == b"NO" and code(tagged) == b"UNAVAILABLE", tagged
        assert elapsed >= 0.3


async def test_append_utf8_data_item_needs_utf8_accept_enabled(node: Node) -> None:
    raw = "Subject: Café\r\n\r\nhola\r\n".encode()

    def append(w: Wire) -> bytes:
        tag = w.next_tag()
        w.send(tag + b" APPEND INBOX UTF8 (~{%d+}\r\n" % len(raw) + raw + b")\r\n")
        return w.until(tag)[1]

    def go() -> tuple[bytes, bytes, bytes, list[bytes]]:
        with wire(node) as w:
            w.login()
            refused = append(w)
            # IMAP4rev2 alone does not enable it either (RFC 6855 §4 names UTF8=ACCEPT).
            w.ok("ENABLE IMAP4rev2")
            still = append(w)
            w.ok("ENABLE UTF8=ACCEPT")
            taken = append(w)
            w.ok("SELECT INBOX")
            return refused, still, taken, w.ok("FETCH 1:* (BODY.PEEK[])")

    refused, still, taken, fetched = await run(go)
    assert status_word(refused) == b"BAD" and status_word(still) == b"BAD"
    assert status_word(taken) == b"OK"
    # Only the accepted APPEND stored anything, and the session went on.
    assert fetched == [b"* 1 FETCH (BODY[] {%d}\r\n" % len(raw) + raw + b")\r\n"]
