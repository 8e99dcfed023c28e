"""IMAP session: state, and one ``do_<VERB>`` per command (RFC 9051, RFC 3501).

The session checks each command's legal states once (STYLE.md), calls only
storage's domain API, and writes whole responses through its connection.
After commands in the selected state it folds in what changed in the store
(other sessions, other nodes) and reports it as EXISTS / FETCH / EXPUNGE or
VANISHED where the RFC allows.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import re
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from storage import Storage
from storage.directory import Account
from storage.errors import AuthenticationFailed, InvalidInput, MailboxNotFound, RookeryError
from storage.mail import Email, Mailbox, Message

from ..push import PushHub, Subscription
from . import commands as c
from . import response as r
from . import search as searching
from .fetch import SIMPLE_ITEMS, FetchError, RawReader, RawStreamer, Renderer, needs_email, render_record, sets_seen
from .output import BrokenResponse, Output
from .parse import ParseError, decode_mutf7, encode_mutf7, parse_authenticate_response
from .selected import InvalidSequence, MailboxGone, Selected

log = logging.getLogger("rookery.imap")

DELIMITER = "/"
SERVER_ID = (("name", "Rookery"), ("vendor", "Rookery"), ("version", "0.1.0"))
ENABLABLE = ("CONDSTORE", "QRESYNC", "UTF8=ACCEPT", "IMAP4REV2")
#: Commands during which EXPUNGE must not be sent (RFC 9051 §7.5.1).
NO_EXPUNGE = ("FETCH", "STORE", "SEARCH", "SORT", "THREAD")
#: Seconds an IDLE session waits for a notification before it looks at the
#: store anyway (the node's push watch normally wakes it much sooner).
IDLE_RECHECK = 60.0
#: The context of IDLE's wake-up callbacks: they read no context variable,
#: and copying the session's context for each would be one more object per
#: idle session.
_NO_CONTEXT = contextvars.Context()
#: Messages whose emails a FETCH holds at once (see do_FETCH).
FETCH_PAGE = 500
#: Memo key of a snapshot's ``UID FETCH 1:* (FLAGS)`` answer, and the
#: pieces it is written in.
FLAGS_MEMO = "imap-flags"
FLAGS_PIECE = 256 * 1024


@dataclass(frozen=True, slots=True)
class ImapSettings:
    hostname: str = "localhost"
    allow_plaintext_auth: bool = False
    #: Longest command line (not counting literals) we read.
    max_line: int = 64 * 1024
    #: APPENDLIMIT (RFC 7889): largest message APPEND takes.
    max_append: int = 50 * 1024 * 1024
    #: Largest literal in any other command.
    max_literal: int = 1024 * 1024
    max_bad_commands: int = 20
    #: RFC 9051 §5.4: at least 30 minutes once authenticated; shorter before.
    #: The config enforces the minimum (server/config.py); tests build
    #: settings with short timers directly.
    preauth_timeout: float = 60.0
    autologout: float = 1800.0
    #: Seconds one write may wait for the client to read (a client that
    #: stops reading would otherwise hold its session and output forever).
    write_timeout: float = 120.0


class Connection(Protocol):
    """What the session needs from the read loop."""

    peer: str
    tls: bool
    loopback: bool

    async def write(self, data: bytes, more: bool = False) -> None:
        """Send ``data``; ``more``: it ends inside a response (a literal being
        streamed), so nothing else may be sent before the rest."""
        ...

    async def read_line(self, timeout: float) -> bytes | None:
        """One line with its CRLF; None when the client is gone or silent for
        ``timeout`` seconds. Raises :class:`LineTooLong` (the line is skipped)."""
        ...

    async def start_tls(self) -> None: ...


class Logout(Exception):
    """End the connection after the current response.

    ``autologout``: the client went silent (or away) in the middle of a
    command; the read loop says ``* BYE`` first if it is still there
    (RFC 9051 §7.1.5: BYE before a server-initiated close).
    """

    def __init__(self, autologout: bool = False) -> None:
        super().__init__()
        self.autologout = autologout


class LineTooLong(Exception):
    """A client line over the limit; the connection has skipped it."""


TOOBIG_LINE = "Line too long"


def _pattern(pattern: str) -> re.Pattern[str]:
    """LIST wildcards: ``*`` any, ``%`` any but the delimiter (RFC 9051 §6.3.9)."""
    out = []
    for ch in pattern:
        if ch == "*":
            out.append(".*")
        elif ch == "%":
            out.append(f"[^{re.escape(DELIMITER)}]*")
        else:
            out.append(re.escape(ch))
    return re.compile("".join(out) + r"\Z", re.DOTALL)


def _attributes(box: Mailbox, names: set[str]) -> list[str]:
    """A mailbox's LIST attributes (RFC 9051 §7.3.1, RFC 6154): children and
    special use; ``names`` are all the account's mailboxes."""
    prefix = box.name + DELIMITER
    attrs = ["\\HasChildren" if any(n.startswith(prefix) for n in names) else "\\HasNoChildren"]
    if box.noselect:
        attrs.insert(0, "\\Noselect")
    if box.special_use:
        attrs.append(box.special_use)
    return attrs


def _ancestors(name: str) -> list[str]:
    """``a/b/c`` -> ``["a", "a/b"]``."""
    parts = name.split(DELIMITER)
    return [DELIMITER.join(parts[:i]) for i in range(1, len(parts))]


def _inbox_ci(name: str) -> str:
    head, sep, rest = name.partition(DELIMITER)
    return "INBOX" + sep + rest if head.upper() == "INBOX" else name


class _Source:
    """Message content for SEARCH/SORT/THREAD, loaded lazily and once."""

    def __init__(self, session: ImapSession) -> None:
        self.session = session
        self.emails: dict[int, Email] = {}

    async def _email(self, msg: Message) -> Email:
        email = self.emails.get(msg.email_id)
        if email is None:
            assert self.session.account is not None
            found = await self.session.storage.mail.emails(self.session.account.id, [msg.email_id])
            email = found.get(msg.email_id)
            if email is None:
                raise FetchError("EXPUNGEISSUED", "message was expunged")
            self.emails[msg.email_id] = email
        return email

    async def structure(self, msg: Message) -> object:
        email = await self._email(msg)
        return email.structure

    async def raw(self, msg: Message, end: int | None = None) -> bytes:
        email = await self._email(msg)
        return await self.session.storage.mail.read_blob(email.digest, 0, end)


class ImapSession:
    def __init__(self, storage: Storage, hub: PushHub, settings: ImapSettings, conn: Connection) -> None:
        self.storage = storage
        self.hub = hub
        self.settings = settings
        self.conn = conn
        self.state = c.State.NOT_AUTHENTICATED
        self.account: Account | None = None
        self.selected: Selected | None = None
        self.enabled: set[str] = set()
        self.saved: list[int] | None = None  # SEARCHRES (RFC 5182), UIDs
        self.sub: Subscription | None = None
        #: What an IDLE under way waits on (do_IDLE).
        self._idle_wake: asyncio.Future[None] | None = None
        self.seen_version = 0
        self.last_poll = 0.0
        self.bad_commands = 0
        # The store's reader, not a method of this session: a bound method
        # here would make session and renderer a reference cycle, which only
        # the garbage collector frees.
        self.renderer = Renderer(*_blob_reader(storage), utf8=False)

    # -- capabilities --------------------------------------------------------------

    @property
    def secure(self) -> bool:
        return self.conn.tls or self.conn.loopback or self.settings.allow_plaintext_auth

    @property
    def utf8(self) -> bool:
        return "UTF8=ACCEPT" in self.enabled or "IMAP4REV2" in self.enabled

    @property
    def condstore(self) -> bool:
        return "CONDSTORE" in self.enabled or "QRESYNC" in self.enabled

    @property
    def qresync(self) -> bool:
        return "QRESYNC" in self.enabled

    def capabilities(self) -> bytes:
        caps = ["IMAP4rev1", "IMAP4rev2", "LITERAL+", "SASL-IR", "ID", "ENABLE", "IDLE"]
        if self.state == c.State.NOT_AUTHENTICATED:
            if not self.conn.tls:
                caps.append("STARTTLS")
            caps.append("AUTH=PLAIN" if self.secure else "LOGINDISABLED")
        else:
            caps += [
                "NAMESPACE", "UIDPLUS", "MOVE", "UNSELECT", "CHILDREN", "LIST-EXTENDED", "LIST-STATUS",
                "SPECIAL-USE", "CREATE-SPECIAL-USE", "CONDSTORE", "QRESYNC", "ESEARCH", "SEARCHRES", "SORT",
                "SORT=DISPLAY", "THREAD=ORDEREDSUBJECT", "THREAD=REFERENCES", "BINARY", "MULTIAPPEND",
                f"APPENDLIMIT={self.settings.max_append}", "STATUS=SIZE", "UTF8=ACCEPT",
            ]
        return " ".join(caps).encode()

    def greeting(self) -> bytes:
        return r.untagged_status("OK", b"CAPABILITY " + self.capabilities(), "Rookery IMAP ready")

    # -- mailbox names -------------------------------------------------------------

    def name_in(self, name: str) -> str:
        if not self.utf8:
            try:
                name = decode_mutf7(name)
            except ValueError:
                raise InvalidInput("mailbox name is not valid modified UTF-7") from None
        return _inbox_ci(name)

    def name_out(self, name: str) -> bytes:
        return r.astring(name if self.utf8 else encode_mutf7(name), utf8=self.utf8)

    # -- dispatch --------------------------------------------------------------------

    @property
    def timeout(self) -> float:
        return self.settings.preauth_timeout if self.state == c.State.NOT_AUTHENTICATED else self.settings.autologout

    async def handle(self, cmd: c.Command) -> None:
        """Run one command; raises :class:`Logout` when the connection ends."""
        if not (self.state & cmd.states):
            await self.conn.write(r.tagged(cmd.tag, "BAD", None, f"{cmd.name} not allowed now"))
            self.bad_commands += 1
            return
        handler = getattr(self, f"do_{cmd.name}")
        tag = cmd.tag
        try:
            lines = await handler(cmd)
        except (Logout, asyncio.CancelledError, ConnectionError):
            raise
        except BrokenResponse:
            log.error("imap response cut short", extra={"peer": self.conn.peer, "command": cmd.name})
            raise Logout() from None
        except MailboxGone:
            await self.conn.write(r.untagged_status("BYE", None, "Selected mailbox was deleted, closing"))
            raise Logout() from None
        except InvalidSequence as exc:
            lines = [r.tagged(tag, "BAD", None, str(exc))]
        except FetchError as exc:
            lines = [r.tagged(tag, "NO", exc.code.encode(), exc.text)]
        except MailboxNotFound as exc:
            # RFC 9051 §7.1: TRYCREATE only where creating the mailbox would
            # help (the target of APPEND/COPY/MOVE); elsewhere NONEXISTENT
            # (RFC 5530 §3).
            missing = b"TRYCREATE" if cmd.name in ("APPEND", "COPY", "MOVE") else b"NONEXISTENT"
            lines = [r.tagged(tag, "NO", missing, exc.text)]
        except RookeryError as exc:
            status, code = exc.imap
            lines = [r.tagged(tag, status, code.encode() if code else None, exc.text)]
        except Exception:
            log.exception("imap command failed", extra={"peer": self.conn.peer, "command": cmd.name})
            lines = [r.tagged(tag, "NO", b"SERVERBUG", "Internal error")]
        await self.conn.write(b"".join(lines))

    async def updates(self, command: str, uid: bool) -> list[bytes]:
        """Changes to report after a command in the selected state."""
        sel = self.selected
        if sel is None or self.account is None or self.sub is None:
            return []
        now = time.monotonic()
        if self.sub.version == self.seen_version and now - self.last_poll < self.hub.poll_interval and not sel.pending_expunge:
            return []
        self.seen_version = self.sub.version
        self.last_poll = now
        changes = await self.storage.mail.changes(self.account.id, sel.mailbox.id, sel.modseq)
        # RFC 7162 §3.1: once CONDSTORE is on, every FETCH a flag change
        # causes carries UID and MODSEQ (QRESYNC implies CONDSTORE).
        lines, new = sel.apply(changes, condstore=self.condstore, with_uid=self.condstore)
        if command not in NO_EXPUNGE or uid:
            lines += sel.flush_expunges(self.qresync)
        return lines + sel.add_new(new)

    def _select_state(self) -> Selected:
        assert self.selected is not None
        return self.selected

    def _acct(self) -> int:
        assert self.account is not None
        return self.account.id

    # -- any state -------------------------------------------------------------------

    async def do_CAPABILITY(self, cmd: c.Capability) -> list[bytes]:
        return [r.untagged(b"CAPABILITY", self.capabilities()), r.tagged(cmd.tag, "OK", None, "CAPABILITY completed")]

    async def do_NOOP(self, cmd: c.Noop) -> list[bytes]:
        self.last_poll = 0.0  # NOOP always looks at the store
        return await self.updates("NOOP", False) + [r.tagged(cmd.tag, "OK", None, "NOOP completed")]

    async def do_CHECK(self, cmd: c.Check) -> list[bytes]:
        self.last_poll = 0.0
        return await self.updates("CHECK", False) + [r.tagged(cmd.tag, "OK", None, "CHECK completed")]

    async def do_LOGOUT(self, cmd: c.Logout) -> list[bytes]:
        await self.conn.write(r.untagged_status("BYE", None, "Logging out") + r.tagged(cmd.tag, "OK", None, "LOGOUT completed"))
        raise Logout()

    async def do_ID(self, cmd: c.Id) -> list[bytes]:
        fields = b" ".join(r.quoted(k) + b" " + r.quoted(v) for k, v in SERVER_ID)
        return [r.untagged(b"ID", b"(" + fields + b")"), r.tagged(cmd.tag, "OK", None, "ID completed")]

    # -- not authenticated -----------------------------------------------------------

    async def do_STARTTLS(self, cmd: c.StartTLS) -> list[bytes]:
        if self.conn.tls:
            return [r.tagged(cmd.tag, "BAD", None, "TLS is already active")]
        await self.conn.write(r.tagged(cmd.tag, "OK", None, "Begin TLS negotiation now"))
        await self.conn.start_tls()
        return []

    async def _login(self, tag: bytes, username: str, password: str) -> list[bytes]:
        if not self.secure:
            return [r.tagged(tag, "NO", b"PRIVACYREQUIRED", "Login requires TLS (use STARTTLS)")]
        try:
            account = await self.storage.directory.login(username, password, self.conn.peer.rpartition(":")[0])
        except AuthenticationFailed as exc:
            log.info("login failed", extra={"peer": self.conn.peer, "user": username[:100]})
            # AUTHENTICATIONFAILED, or UNAVAILABLE for a locked-out address.
            status, code = exc.imap
            return [r.tagged(tag, status, code.encode() if code else None, exc.text)]
        self.account = account
        self.state = c.State.AUTHENTICATED
        self.sub = self.hub.subscribe(account.id)
        log.info("login", extra={"peer": self.conn.peer, "user": account.email})
        return [r.tagged(tag, "OK", b"CAPABILITY " + self.capabilities(), "Logged in")]

    async def do_LOGIN(self, cmd: c.Login) -> list[bytes]:
        return await self._login(
            cmd.tag, cmd.username.decode("utf-8", "replace"), cmd.password.decode("utf-8", "surrogateescape")
        )

    async def do_AUTHENTICATE(self, cmd: c.Authenticate) -> list[bytes]:
        if cmd.mechanism != "PLAIN":
            return [r.tagged(cmd.tag, "NO", None, "Unsupported authentication mechanism")]
        if not self.secure:
            return [r.tagged(cmd.tag, "NO", b"PRIVACYREQUIRED", "Authentication requires TLS (use STARTTLS)")]
        data = cmd.initial_response
        if data is None:
            await self.conn.write(r.continuation())
            try:
                line = await self.conn.read_line(self.timeout)
            except LineTooLong:
                return [r.tagged(cmd.tag, "BAD", b"TOOBIG", TOOBIG_LINE)]
            if line is None:
                raise Logout(autologout=True)
            try:
                data = parse_authenticate_response(line)
            except ParseError:
                return [r.tagged(cmd.tag, "BAD", None, "Invalid base64 in response")]
            if data is None:
                return [r.tagged(cmd.tag, "BAD", None, "Authentication cancelled")]
        parts = data.split(b"\x00")
        if len(parts) != 3:
            return [r.tagged(cmd.tag, "BAD", None, "Malformed PLAIN response")]
        authzid, authcid, password = (p.decode("utf-8", "surrogateescape") for p in parts)
        if authzid and authzid.lower() != authcid.lower():
            return [r.tagged(cmd.tag, "NO", b"AUTHORIZATIONFAILED", "Cannot act as another user")]
        return await self._login(cmd.tag, authcid, password)

    # -- authenticated -----------------------------------------------------------------

    async def do_ENABLE(self, cmd: c.Enable) -> list[bytes]:
        newly = [cap for cap in cmd.capabilities if cap in ENABLABLE and cap not in self.enabled]
        self.enabled.update(newly)
        self.renderer.utf8 = self.utf8
        names = " ".join("IMAP4rev2" if n == "IMAP4REV2" else n for n in newly)
        return [r.untagged(b"ENABLED" + (b" " + names.encode() if names else b"")), r.tagged(cmd.tag, "OK", None, "ENABLE completed")]

    async def do_SELECT(self, cmd: c.Select | c.Examine) -> list[bytes]:
        readonly = isinstance(cmd, c.Examine)
        lines: list[bytes] = []
        if self.selected is not None:
            self.selected = None
            self.state = c.State.AUTHENTICATED
            lines.append(r.untagged_status("OK", b"CLOSED", "Previous mailbox closed"))
        if cmd.qresync is not None and not self.qresync:
            return lines + [r.tagged(cmd.tag, "BAD", None, "QRESYNC is not enabled")]
        if cmd.condstore:
            self.enabled.add("CONDSTORE")
        snap = await self.storage.mail.snapshot(self._acct(), self.name_in(cmd.mailbox))
        sel = Selected(snap, readonly)
        self.selected = sel
        self.state = c.State.SELECTED
        self.saved = None
        assert self.sub is not None
        self.seen_version = self.sub.version
        self.last_poll = time.monotonic()
        box = snap.mailbox
        lines.append(sel.flags_line())
        permanent = ["\\Answered", "\\Flagged", "\\Deleted", "\\Seen", "\\Draft", "\\*"] if not readonly else []
        lines.append(r.untagged_status("OK", r.code_permanentflags(permanent), "Flags permitted"))
        lines.append(r.untagged(len(sel), b"EXISTS"))
        if "IMAP4REV2" not in self.enabled:
            lines.append(r.untagged(0, b"RECENT"))
            unseen = sel.first_unseen()
            if unseen is not None:
                lines.append(r.untagged_status("OK", b"UNSEEN %d" % unseen, "First unseen"))
        lines.append(r.untagged_status("OK", b"UIDVALIDITY %d" % box.uidvalidity, "UIDs valid"))
        lines.append(r.untagged_status("OK", b"UIDNEXT %d" % box.uidnext, "Predicted next UID"))
        # RFC 7162 §7: the code's mod-sequence-value is at least 1; 0 (a
        # mailbox nothing was ever stored in) is reported as 1, below any
        # MODSEQ a message can get (account set-up already used change 1).
        lines.append(r.untagged_status("OK", r.code_highestmodseq(max(1, sel.modseq)), "Highest"))
        if "IMAP4REV2" in self.enabled:
            # RFC 9051 §6.3.2: SELECT/EXAMINE send the mailbox's LIST response,
            # its attributes accurate.
            names = {b.name for b in await self.storage.mail.mailboxes(self._acct())}
            lines.append(r.untagged(b"LIST", r.encode_flags(_attributes(box, names)), r.quoted(DELIMITER), self.name_out(box.name)))
        if cmd.qresync is not None and cmd.qresync.uidvalidity == box.uidvalidity:
            lines += await self._qresync(sel, cmd.qresync)
        mode = b"READ-ONLY" if readonly else b"READ-WRITE"
        return lines + [r.tagged(cmd.tag, "OK", mode, f"{cmd.name} completed")]

    do_EXAMINE = do_SELECT

    async def _qresync(self, sel: Selected, q: c.QResync) -> list[bytes]:
        """RFC 7162 §3.2.5.2: VANISHED (EARLIER) and FETCH for changes since."""
        changes = await self.storage.mail.changes(self._acct(), sel.mailbox.id, q.modseq)
        known_largest = sel.max_uid
        lines: list[bytes] = []
        vanished = [u for u in changes.expunged if q.known_uids is None or q.known_uids.contains(u, known_largest)]
        if vanished:
            lines.append(r.untagged(b"VANISHED (EARLIER)", r.encode_seqset(vanished)))
        for m in changes.changed:
            seq = sel.seq_of(m.uid)
            if seq is not None:
                lines.append(b"* %d FETCH (UID %d FLAGS %s MODSEQ (%d))\r\n" % (seq, m.uid, r.encode_flags(m.flags), m.modseq))
        return lines

    async def do_CREATE(self, cmd: c.Create) -> list[bytes]:
        if len(cmd.special_use) > 1:
            return [r.tagged(cmd.tag, "NO", b"USEATTR", "Only one special use per mailbox")]
        name = self.name_in(cmd.mailbox)
        await self.storage.mail.create_mailbox(self._acct(), name, cmd.special_use[0] if cmd.special_use else None)
        return [r.tagged(cmd.tag, "OK", None, "CREATE completed")]

    async def do_DELETE(self, cmd: c.Delete) -> list[bytes]:
        await self.storage.mail.delete_mailbox(self._acct(), self.name_in(cmd.mailbox))
        return [r.tagged(cmd.tag, "OK", None, "DELETE completed")]

    async def do_RENAME(self, cmd: c.Rename) -> list[bytes]:
        await self.storage.mail.rename_mailbox(self._acct(), self.name_in(cmd.mailbox), self.name_in(cmd.new_name))
        return [r.tagged(cmd.tag, "OK", None, "RENAME completed")]

    async def do_SUBSCRIBE(self, cmd: c.Subscribe) -> list[bytes]:
        await self.storage.mail.subscribe(self._acct(), self.name_in(cmd.mailbox), True)
        return [r.tagged(cmd.tag, "OK", None, "SUBSCRIBE completed")]

    async def do_UNSUBSCRIBE(self, cmd: c.Unsubscribe) -> list[bytes]:
        await self.storage.mail.subscribe(self._acct(), self.name_in(cmd.mailbox), False)
        return [r.tagged(cmd.tag, "OK", None, "UNSUBSCRIBE completed")]

    async def do_NAMESPACE(self, cmd: c.Namespace) -> list[bytes]:
        return [r.untagged(b'NAMESPACE (("" "/")) NIL NIL'), r.tagged(cmd.tag, "OK", None, "NAMESPACE completed")]

    async def do_LIST(self, cmd: c.List) -> list[bytes]:
        acct = self._acct()
        # Reference and pattern are joined first and then decoded: decoding
        # the reference alone and then the joined (already decoded) text
        # again fails on any non-ASCII reference.
        patterns = [self.name_in(cmd.reference + p) if (cmd.reference + p) else "" for p in cmd.patterns]
        if patterns == [""]:
            # RFC 9051 §6.3.9: the hierarchy delimiter and root.
            return [r.untagged(b"LIST", b"(\\Noselect)", r.quoted(DELIMITER), r.quoted("")), r.tagged(cmd.tag, "OK", None, "LIST completed")]
        boxes, subscribed = await self.storage.mail.mailboxes_and_subscriptions(acct)
        by_name = {b.name: b for b in boxes}
        names = set(by_name)
        regexes = [_pattern(p) for p in patterns if p]
        sel_subscribed = "SUBSCRIBED" in cmd.selection
        sel_special = "SPECIAL-USE" in cmd.selection
        ret_subscribed = sel_subscribed or "SUBSCRIBED" in cmd.return_opts
        # RFC 5258 §3.1, §3.5: with RECURSIVEMATCH, a name with subscribed
        # descendants is listed (even if not subscribed, or not a mailbox,
        # itself) with ("CHILDINFO" ("SUBSCRIBED")).
        recursive = sel_subscribed and "RECURSIVEMATCH" in cmd.selection
        universe = set(names)
        if sel_subscribed:
            # RFC 5258 §3.1: subscribed names are listed whether or not a
            # mailbox has them (those get \NonExistent).
            universe |= subscribed
        if recursive:
            universe |= {a for n in subscribed for a in _ancestors(n)}
        childinfo: set[str] = set()
        chosen: list[str] = []
        for name in sorted(universe, key=lambda n: (n != "INBOX", n)):
            if not any(rx.match(name) for rx in regexes):
                continue
            if recursive and any(n.startswith(name + DELIMITER) for n in subscribed):
                childinfo.add(name)
            if sel_subscribed and name not in subscribed and name not in childinfo:
                continue
            box = by_name.get(name)
            if sel_special and (box is None or not box.special_use):
                continue
            chosen.append(name)
        statuses = {}
        if cmd.status_items is not None:
            # RFC 5819 §2: no STATUS for a \Noselect (or \NonExistent) name.
            selectable = [by_name[n] for n in chosen if n in by_name and not by_name[n].noselect]
            for found in await self.storage.mail.statuses(acct, selectable):
                statuses[found.mailbox.name] = found
        lines = []
        for name in chosen:
            box = by_name.get(name)
            # RFC 5258 §3.4: \NonExistent implies \Noselect.
            attrs = _attributes(box, names) if box is not None else ["\\NonExistent"]
            if ret_subscribed and name in subscribed:
                attrs.append("\\Subscribed")
            extra = [b'("CHILDINFO" ("SUBSCRIBED"))'] if name in childinfo else []
            lines.append(r.untagged(b"LIST", r.encode_flags(attrs), r.quoted(DELIMITER), self.name_out(name), *extra))
            st = statuses.get(name)
            if st is not None and cmd.status_items is not None:
                lines.append(self._status_line(st, cmd.status_items))
        return lines + [r.tagged(cmd.tag, "OK", None, "LIST completed")]

    async def do_LSUB(self, cmd: c.Lsub) -> list[bytes]:
        pattern = self.name_in(cmd.reference + cmd.pattern) if cmd.reference + cmd.pattern else ""
        lines = []
        if pattern:
            rx = _pattern(pattern)
            boxes, subscribed = await self.storage.mail.mailboxes_and_subscriptions(self._acct())
            existing = {b.name for b in boxes if not b.noselect}
            listed: dict[str, bool] = {}  # name -> selectable
            for name in subscribed:
                if rx.match(name):
                    listed[name] = name in existing
                else:
                    # RFC 3501 §6.3.9: "foo/bar" subscribed, "foo" not, and
                    # LSUB "" %: foo is returned, flagged \Noselect.
                    for parent in _ancestors(name):
                        if parent not in subscribed and rx.match(parent):
                            listed.setdefault(parent, False)
            for name in sorted(listed, key=lambda n: (n != "INBOX", n)):
                attrs = b"()" if listed[name] else b"(\\Noselect)"
                lines.append(r.untagged(b"LSUB", attrs, r.quoted(DELIMITER), self.name_out(name)))
        return lines + [r.tagged(cmd.tag, "OK", None, "LSUB completed")]

    def _status_line(self, st: object, items: Sequence[str]) -> bytes:
        from storage.mail import MailboxStatus

        assert isinstance(st, MailboxStatus)
        values = {
            "MESSAGES": st.messages, "UIDNEXT": st.mailbox.uidnext, "UIDVALIDITY": st.mailbox.uidvalidity,
            "UNSEEN": st.unseen, "DELETED": st.deleted, "SIZE": st.size, "RECENT": 0,
            # As SELECT reports it (RFC 7162 §3.1.2.1): at least 1, so an
            # empty mailbox does not read 0 here and 1 there.
            "HIGHESTMODSEQ": max(1, st.highestmodseq), "APPENDLIMIT": self.settings.max_append,
        }
        body = b" ".join(b"%s %d" % (item.encode(), values[item]) for item in items if item in values)
        return r.untagged(b"STATUS", self.name_out(st.mailbox.name), b"(" + body + b")")

    async def do_STATUS(self, cmd: c.Status) -> list[bytes]:
        st = await self.storage.mail.status(self._acct(), self.name_in(cmd.mailbox))
        if "HIGHESTMODSEQ" in cmd.items:
            self.enabled.add("CONDSTORE")
        return [self._status_line(st, cmd.items), r.tagged(cmd.tag, "OK", None, "STATUS completed")]

    async def do_APPEND(self, cmd: c.Append) -> list[bytes]:
        items: list[tuple[bytes, tuple[str, ...], datetime | None]] = []
        if "UTF8=ACCEPT" not in self.enabled and any(m.utf8 for m in cmd.messages):
            # RFC 6855 §4: BAD for the UTF8 data item unless the client
            # enabled UTF8=ACCEPT (the data was read: the command is over).
            return [r.tagged(cmd.tag, "BAD", None, "APPEND UTF8 needs ENABLE UTF8=ACCEPT")]
        for m in cmd.messages:
            if not m.data:
                return [r.tagged(cmd.tag, "NO", None, "Cannot append an empty message")]
            if len(m.data) > self.settings.max_append:
                return [r.tagged(cmd.tag, "NO", b"TOOBIG", "Message exceeds APPENDLIMIT")]
            # The date with its zone: INTERNALDATE gives it back as written.
            items.append((m.data, m.flags, m.date_time))
        name = self.name_in(cmd.mailbox)
        uidvalidity, uids = await self.storage.mail.append_many(self._acct(), name, items)
        lines = await self.updates("APPEND", True)
        return lines + [r.tagged(cmd.tag, "OK", r.code_appenduid(uidvalidity, uids), "APPEND completed")]

    async def do_IDLE(self, cmd: c.Idle) -> list[bytes]:
        """RFC 2177: report changes as they happen until DONE."""
        await self.conn.write(r.continuation("idling"))
        if self.selected is not None:
            self.last_poll = 0.0
            pending = await self.updates("IDLE", True)
            if pending:
                await self.conn.write(b"".join(pending))
        loop = asyncio.get_running_loop()
        reader = loop.create_task(self.conn.read_line(self.settings.autologout))
        # The last notification answered: one that comes while the session
        # is busy (reading or writing the changes) ends the next wait at once.
        heard = self.seen_version if self.selected is not None else (self.sub.version if self.sub else 0)
        try:
            while True:
                # One future per wait, resolved by whichever comes first: the
                # client's line, the hub (local commits, peer messages, its
                # store watch) or the recheck timer, a last safety net. Few
                # objects per idle session (see push.Subscription).
                wake: asyncio.Future[None] = loop.create_future()
                if self.sub is not None and self.sub.version != heard:
                    wake.set_result(None)
                self._idle_wake = wake
                reader.add_done_callback(self._wake_idle, context=_NO_CONTEXT)
                timer = loop.call_later(IDLE_RECHECK, self._wake_idle, None, context=_NO_CONTEXT)
                if self.sub is not None:
                    self.sub.waiter = wake
                try:
                    await wake
                finally:
                    timer.cancel()
                    reader.remove_done_callback(self._wake_idle)
                    self._idle_wake = None
                    if self.sub is not None:
                        self.sub.waiter = None
                        heard = self.sub.version
                if reader.done():
                    try:
                        line = reader.result()
                    except LineTooLong:
                        return [r.tagged(cmd.tag, "BAD", b"TOOBIG", TOOBIG_LINE)]
                    if line is None:
                        raise Logout(autologout=True)
                    if line.rstrip(b"\r\n").upper() == b"DONE":
                        return [r.tagged(cmd.tag, "OK", None, "IDLE terminated")]
                    return [r.tagged(cmd.tag, "BAD", None, "Expected DONE")]
                if self.selected is not None:
                    self.last_poll = 0.0
                    lines = await self.updates("IDLE", True)
                    if lines:
                        await self.conn.write(b"".join(lines))
        finally:
            if not reader.done():
                reader.cancel()

    def _wake_idle(self, _: object) -> None:
        wake = self._idle_wake
        if wake is not None and not wake.done():
            wake.set_result(None)

    # -- selected --------------------------------------------------------------------

    async def do_CLOSE(self, cmd: c.Close) -> list[bytes]:
        sel = self._select_state()
        if not sel.readonly:
            await self.storage.mail.expunge(self._acct(), sel.mailbox.id)
        self.selected = None
        self.state = c.State.AUTHENTICATED
        return [r.tagged(cmd.tag, "OK", None, "CLOSE completed")]

    async def do_UNSELECT(self, cmd: c.Unselect) -> list[bytes]:
        self.selected = None
        self.state = c.State.AUTHENTICATED
        return [r.tagged(cmd.tag, "OK", None, "UNSELECT completed")]

    async def do_EXPUNGE(self, cmd: c.Expunge) -> list[bytes]:
        sel = self._select_state()
        if sel.readonly:
            return [r.tagged(cmd.tag, "NO", b"READ-ONLY", "Mailbox is read-only")]
        uids = None if cmd.seqset is None else [u for _, u in self._pairs(cmd.seqset, True)]
        gone = await self.storage.mail.expunge(self._acct(), sel.mailbox.id, uids)
        sel.pending_expunge.update(u for u in gone if sel.has(u))
        self.last_poll = 0.0
        lines = await self.updates("EXPUNGE", True)
        lines += sel.flush_expunges(self.qresync)
        return lines + [r.tagged(cmd.tag, "OK", None, "EXPUNGE completed")]

    def _pairs(self, seqset: c.SequenceSet, uid: bool) -> list[tuple[int, int]]:
        sel = self._select_state()
        if seqset.saved:
            return sel.resolve_uids(self.saved or [])
        return sel.resolve(seqset, uid)

    async def do_FETCH(self, cmd: c.Fetch) -> list[bytes]:
        sel = self._select_state()
        acct = self._acct()
        pairs = self._pairs(cmd.seqset, cmd.uid)
        lines: list[bytes] = []
        if cmd.changedsince is not None or any(i.name == "MODSEQ" for i in cmd.items):
            self.enabled.add("CONDSTORE")
        if cmd.vanished and cmd.changedsince is not None:
            if not self.qresync:
                return [r.tagged(cmd.tag, "BAD", None, "VANISHED needs QRESYNC enabled")]
            changes = await self.storage.mail.changes(acct, sel.mailbox.id, cmd.changedsince)
            saved = set(self.saved or ())
            vanished = [
                u for u in changes.expunged
                if (u in saved if cmd.seqset.saved else cmd.seqset.contains(u, sel.max_uid))
            ]
            if vanished:
                lines.append(r.untagged(b"VANISHED (EARLIER)", r.encode_seqset(vanished)))
        names = {i.name for i in cmd.items}
        out = Output(self.conn)
        for line in lines:
            out.add(line)
        if names <= {"UID", "FLAGS"} and "FLAGS" in names and (cmd.uid or "UID" in names) and cmd.changedsince is None:
            # The flag sync every client runs on every mailbox, in one format,
            # each distinct flag list encoded once; of the whole mailbox, as
            # a new session sees it, rendered once per snapshot for every
            # session that asks.
            snap = sel.pristine if len(pairs) == len(sel.uids) else None
            whole = snap.memo.get(FLAGS_MEMO) if snap is not None else None
            if whole is not None:
                for block in _whole_lines(whole, FLAGS_PIECE):
                    if out.add(block):
                        await out.flush()
            else:
                made: list[bytes] = []
                for block in _flag_lines(pairs, *sel.layers()):
                    if snap is not None:
                        made.append(block)
                    if out.add(block):
                        await out.flush()
                if snap is not None:
                    snap.memo[FLAGS_MEMO] = b"".join(made)
            return out.rest() + await self.updates("FETCH", cmd.uid) + [r.tagged(cmd.tag, "OK", None, "FETCH completed")]
        msgs = [(seq, m) for seq, uid in pairs if (m := sel.msg(uid)) is not None]
        if cmd.changedsince is not None:
            msgs = [(s, m) for s, m in msgs if m.modseq > cmd.changedsince]
        # Every message is checked before any flag changes or any content is
        # read: a FETCH that fails (a missing section, say) answers NO and
        # must leave \Seen alone, or the client would never learn of a flag
        # change it caused (RFC 9051 §6.4.5). Content is then read and
        # written message by message, in bounded pieces (output.py).
        simple = names <= SIMPLE_ITEMS
        wants_email = not simple and needs_email(cmd.items)
        # Emails (with their structures) are read a page at a time, for the
        # check and again for the content, so a FETCH of a mailbox of any
        # size holds one page of them; a FETCH of one page reads them once.
        pages = [msgs[i : i + FETCH_PAGE] for i in range(0, len(msgs), FETCH_PAGE)]
        emails: dict[int, Email] = {}
        todo: list[tuple[int, Message]] = []
        for page in pages:
            if wants_email:
                emails = await self.storage.mail.emails(acct, [m.email_id for _, m in page])
            for seq, msg in page:
                email = emails.get(msg.email_id)
                if email is None and wants_email:
                    continue  # expunged meanwhile by another session: nothing to show
                if not simple:
                    self.renderer.check(email, cmd.items)
                todo.append((seq, msg))
        seen_changed: set[int] = set()
        if sets_seen(cmd.items) and not sel.readonly:
            unseen = [m.uid for _, m in todo if "\\Seen" not in m.flags]
            if unseen:
                changed, _ = await self.storage.mail.store_flags(acct, sel.mailbox.id, unseen, "add", ["\\Seen"])
                sel.note_own(changed)
                seen_changed = {m.uid for m in changed}
                todo = [(s, sel.msg(m.uid) or m) for s, m in todo]
        with_modseq = cmd.changedsince is not None or (self.condstore and bool(seen_changed))
        # RFC 7162 §3.1: with CONDSTORE on, a FETCH that set \Seen carries
        # UID and MODSEQ for the messages it changed.
        condstore = self.condstore
        for start in range(0, len(todo), FETCH_PAGE):
            page_todo = todo[start : start + FETCH_PAGE]
            if wants_email and len(pages) > 1:
                emails = await self.storage.mail.emails(acct, [m.email_id for _, m in page_todo])
            for seq, msg in page_todo:
                with_uid = cmd.uid or (condstore and msg.uid in seen_changed)
                flags_changed = msg.uid in seen_changed
                if simple:
                    if out.add(render_record(seq, msg, cmd.items, with_uid=with_uid, with_modseq=with_modseq,
                                             flags_changed=flags_changed)):
                        await out.flush()
                    continue
                email = emails.get(msg.email_id)
                if email is None and wants_email:
                    continue  # expunged and purged since the check
                body = await self.renderer.content(msg, email, cmd.items)
                await out.response(self.renderer.assemble(seq, msg, cmd.items, body, with_uid=with_uid,
                                                          with_modseq=with_modseq, flags_changed=flags_changed))
        return out.rest() + await self.updates("FETCH", cmd.uid) + [r.tagged(cmd.tag, "OK", None, "FETCH completed")]

    async def do_STORE(self, cmd: c.Store) -> list[bytes]:
        sel = self._select_state()
        if sel.readonly:
            return [r.tagged(cmd.tag, "NO", b"READ-ONLY", "Mailbox is read-only")]
        if cmd.unchangedsince is not None:
            self.enabled.add("CONDSTORE")
        pairs = self._pairs(cmd.seqset, cmd.uid)
        mode = {c.StoreMode.ADD: "add", c.StoreMode.REMOVE: "remove", c.StoreMode.REPLACE: "replace"}[cmd.mode]
        uids = [u for _, u in pairs if sel.has(u) and u not in sel.pending_expunge]
        changed, failed = await self.storage.mail.store_flags(self._acct(), sel.mailbox.id, uids, mode, cmd.flags, cmd.unchangedsince)
        sel.note_own(changed)
        known_keywords = len(sel.keywords)
        sel.keywords.update(f for m in changed for f in m.flags if not f.startswith("\\"))
        failed_set = set(failed)
        changed_uids = {m.uid for m in changed}
        lines = []
        for seq, uid in pairs:
            msg = sel.msg(uid)
            if msg is None or uid in failed_set:
                continue
            if cmd.silent and not (self.condstore and uid in changed_uids):
                continue
            items = []
            if cmd.uid or self.condstore:
                # RFC 7162 §3.1: with CONDSTORE on, STORE's FETCH responses
                # carry UID too, not only UID STORE's.
                items.append(b"UID %d" % uid)
            if not cmd.silent:
                items.append(b"FLAGS " + r.encode_flags(msg.flags))
            if self.condstore:
                items.append(b"MODSEQ (%d)" % msg.modseq)
            lines.append(b"* %d FETCH (" % seq + b" ".join(items) + b")\r\n")
        if len(sel.keywords) != known_keywords:
            # A new keyword: the client's FLAGS list grows (RFC 9051 §7.3.5).
            lines.insert(0, sel.flags_line())
        lines += await self.updates("STORE", cmd.uid)
        if failed:
            ids = failed if cmd.uid else [seq for seq, uid in pairs if uid in failed_set]
            code = b"MODIFIED " + r.encode_seqset(ids)
            return lines + [r.tagged(cmd.tag, "OK", code, "Conditional STORE failed for some messages")]
        return lines + [r.tagged(cmd.tag, "OK", None, "STORE completed")]

    async def do_COPY(self, cmd: c.Copy | c.Move) -> list[bytes]:
        sel = self._select_state()
        is_move = isinstance(cmd, c.Move)
        if is_move and sel.readonly:
            return [r.tagged(cmd.tag, "NO", b"READ-ONLY", "Mailbox is read-only")]
        pairs = self._pairs(cmd.seqset, cmd.uid)
        uids = [u for _, u in pairs if u not in sel.pending_expunge]
        target = self.name_in(cmd.mailbox)
        op = self.storage.mail.move if is_move else self.storage.mail.copy
        try:
            uidvalidity, mapping = await op(self._acct(), sel.mailbox.id, uids, target)
        except MailboxNotFound:
            return [r.tagged(cmd.tag, "NO", b"TRYCREATE", "Target mailbox does not exist")]
        code = r.code_copyuid(uidvalidity, [s for s, _ in mapping], [d for _, d in mapping]) if mapping else None
        lines: list[bytes] = []
        if is_move:
            if code:
                lines.append(r.untagged_status("OK", code, "Moved"))
            sel.pending_expunge.update(s for s, _ in mapping if sel.has(s))
            self.last_poll = 0.0
            lines += await self.updates("MOVE", True)
            lines += sel.flush_expunges(self.qresync)
            return lines + [r.tagged(cmd.tag, "OK", None, "MOVE completed")]
        lines += await self.updates("COPY", cmd.uid)
        return lines + [r.tagged(cmd.tag, "OK", code, "COPY completed")]

    do_MOVE = do_COPY

    async def _search(self, key: c.SearchKey, source: _Source) -> list[searching.Candidate]:
        sel = self._select_state()
        own, base = sel.layers()
        candidates = [
            searching.Candidate(i + 1, m) for i, uid in enumerate(sel.uids) if (m := own.get(uid) or base.get(uid)) is not None
        ]
        return await searching.search(
            key, candidates, source,  # type: ignore[arg-type]
            largest_seq=len(sel), largest_uid=sel.uids[-1] if sel.uids else 0,
            saved_uids=self.saved, now=time.time(),
        )

    async def do_SEARCH(self, cmd: c.Search) -> list[bytes]:
        source = _Source(self)
        try:
            found = await self._search(cmd.key, source)
        except BaseException:
            if cmd.return_opts is not None and "SAVE" in cmd.return_opts:
                # RFC 5182 §2.1: a SEARCH ... RETURN (SAVE) that fails leaves
                # '$' empty, not holding an older result.
                self.saved = []
            raise
        ids = [m.msg.uid if cmd.uid else m.seq for m in found]
        modseq = searching.result_modseq(found, cmd.return_opts) if searching.uses_modseq(cmd.key) else None
        if modseq is not None:
            self.enabled.add("CONDSTORE")
        lines: list[bytes] = []
        opts = cmd.return_opts
        if opts is not None and "SAVE" in opts:
            # RFC 5182 §2.1: saved as UIDs, MIN/MAX only when those alone are asked.
            uids_found = [m.msg.uid for m in found]
            by_id = dict(zip(ids, uids_found))
            self.saved = sorted(by_id[i] for i in searching.saved_result(ids, opts))
        if opts is not None or "IMAP4REV2" in self.enabled:
            esearch = searching.render_esearch(cmd.tag, cmd.uid, ids, opts or ("ALL",), modseq)
            if esearch:  # nothing at all for RETURN (SAVE) alone
                lines.append(esearch + b"\r\n")
        else:
            lines.append(searching.render_search(ids, modseq) + b"\r\n")
        lines += await self.updates("SEARCH", cmd.uid)
        return lines + [r.tagged(cmd.tag, "OK", None, "SEARCH completed")]

    async def do_SORT(self, cmd: c.Sort) -> list[bytes]:
        source = _Source(self)
        found = await self._search(cmd.key, source)
        ordered = await searching.sort(cmd.criteria, found, source)  # type: ignore[arg-type]
        ids = [m.msg.uid if cmd.uid else m.seq for m in ordered]
        lines = [b"* SORT" + b"".join(b" %d" % i for i in ids) + b"\r\n"]
        lines += await self.updates("SORT", cmd.uid)
        return lines + [r.tagged(cmd.tag, "OK", None, "SORT completed")]

    async def do_THREAD(self, cmd: c.Thread) -> list[bytes]:
        source = _Source(self)
        found = await self._search(cmd.key, source)
        nodes = await searching.thread(cmd.algorithm, found, source)  # type: ignore[arg-type]
        payload = searching.render_thread(nodes, cmd.uid)
        lines = [b"* THREAD" + (b" " + payload if payload else b"") + b"\r\n"]
        lines += await self.updates("THREAD", cmd.uid)
        return lines + [r.tagged(cmd.tag, "OK", None, "THREAD completed")]

    def close(self) -> None:
        if self.sub is not None:
            self.sub.close()
            self.sub = None
        # Let go of the selected mailbox's view (up to one entry per message)
        # now: if anything still refers to this session through a reference
        # cycle, only the collector would free it, and every young collection
        # until then would walk that view again.
        self.selected = None


def _blob_reader(storage: Storage) -> tuple[RawReader, RawStreamer]:
    async def read(email: Email, start: int, length: int | None) -> bytes:
        return await storage.mail.read_blob(email.digest, start, length)

    def stream(email: Email, start: int, length: int, step: int) -> AsyncIterator[bytes]:
        return storage.mail.stream_blob(email.digest, start, length, step)

    return read, stream


#: Messages per block of :func:`_flag_lines` (about 200 kB of text).
FLAG_BLOCK = 4096


def _whole_lines(data: bytes, size: int) -> Iterator[bytes]:
    """``data`` in pieces of about ``size`` bytes, each ending a line: a
    flush between pieces never leaves a response half written."""
    start = 0
    while start < len(data):
        end = data.rfind(b"\n", start, start + size) + 1 if len(data) - start > size else len(data)
        if end <= start:  # one line longer than size
            end = data.find(b"\n", start + size) + 1 or len(data)
        yield data[start:end]
        start = end


def _flag_lines(pairs: list[tuple[int, int]], own: dict[int, Message], base: dict[int, Message]) -> Iterator[bytes]:
    """``* n FETCH (UID u FLAGS (...))`` for every pair, the message taken
    from the session's overlay, else the shared map (:meth:`Selected.layers`),
    in blocks of :data:`FLAG_BLOCK` messages."""
    # Built as text and encoded (UTF-8) once: str formatting is the faster
    # road in CPython.
    encoded: dict[tuple[str, ...], str] = {}
    mine, shared = own.get, base.get
    for i in range(0, len(pairs), FLAG_BLOCK):
        out = []
        for seq, uid in pairs[i : i + FLAG_BLOCK]:
            msg = mine(uid) or shared(uid)
            if msg is None:
                continue
            flags = msg.flags
            tail = encoded.get(flags)
            if tail is None:
                tail = encoded[flags] = " FLAGS (" + " ".join(flags) + "))\r\n"
            out.append(f"* {seq} FETCH (UID {uid}{tail}")
        if out:
            yield "".join(out).encode()
