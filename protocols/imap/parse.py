"""IMAP command parser: bytes in, typed command objects out, no I/O.

Grammar: RFC 9051 (IMAP4rev2) and RFC 3501 (IMAP4rev1) §9, plus LITERAL+/-
(RFC 7888), SASL-IR (RFC 4959), ENABLE (RFC 5161), UIDPLUS (RFC 4315),
CONDSTORE/QRESYNC (RFC 7162), MOVE (RFC 6851), ESEARCH (RFC 4731), SEARCHRES
(RFC 5182), LIST-EXTENDED (RFC 5258), LIST-STATUS (RFC 5819), SPECIAL-USE
(RFC 6154), MULTIAPPEND (RFC 3502), BINARY (RFC 3516), SORT/THREAD (RFC 5256),
ESORT (RFC 5267), DISPLAYFROM/TO (RFC 5957), ID (RFC 2971), IDLE (RFC 2177),
WITHIN (RFC 5032), UNSELECT (RFC 3691), NAMESPACE (RFC 2342).

The server's read loop frames a command with :func:`literal_at_end` (one
line at a time, collecting announced literals) and hands the whole command,
literals inline exactly as received, to :func:`parse_command`. Whatever the
input, :class:`ParseError` is the only exception that leaves this module's
parsing functions; the server answers ``<tag> BAD <message>`` (or ``* BAD``
when the tag is unknown). Messages never echo client bytes.

The parser is a hand-written cursor over the buffer: every regular
expression is anchored at the cursor and built from single character classes
(no nested quantifiers), so hostile input cannot trigger backtracking.
"""

from __future__ import annotations

import base64
import binascii
import codecs
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date, datetime, timedelta, timezone
from typing import TypeVar

from protocols.imap.commands import (
    FETCH_MACROS,
    MAX_MODSEQ,
    MAX_UINT32,
    And,
    Append,
    AppendMessage,
    Authenticate,
    Capability,
    Check,
    Close,
    Command,
    Copy,
    Create,
    DateKey,
    Delete,
    Enable,
    Examine,
    Expunge,
    Fetch,
    FetchItem,
    HeaderKey,
    Id,
    Idle,
    KeywordKey,
    List,
    Login,
    Logout,
    Lsub,
    ModSeqKey,
    Move,
    Namespace,
    Noop,
    Not,
    NumberKey,
    Or,
    QResync,
    Rename,
    Search,
    SearchKey,
    Select,
    SeqKey,
    SequenceSet,
    Simple,
    Sort,
    SortCriterion,
    StartTLS,
    Status,
    Store,
    StoreMode,
    Subscribe,
    TextKey,
    Thread,
    UidKey,
    Unselect,
    Unsubscribe,
)

__all__ = [
    "Literal",
    "ParseError",
    "UnsupportedCharset",
    "decode_mutf7",
    "encode_mutf7",
    "literal_at_end",
    "parse_authenticate_response",
    "parse_command",
    "parse_idle_done",
    "parse_string",
    "parse_tag",
]

#: Nesting depth of search keys: parentheses, NOT and OR all recurse.
MAX_SEARCH_DEPTH = 100
#: Tokens (atoms, strings, ranges, list items) in one command: bounds the work
#: and the size of the command object whatever the line limit is.
MAX_TOKENS = 100_000
#: RFC 9051 §9 number64: at most 2^63-1, so never more than 19 digits; 20
#: leaves room to reject overflow with a clear message (and keeps ``int()``
#: far from Python's digit limit).
MAX_DIGITS = 20
#: RFC 2971 §3.3: field ≤ 30 octets, value ≤ 1024 octets, ≤ 30 pairs.
ID_MAX_FIELD, ID_MAX_VALUE, ID_MAX_PAIRS = 30, 1024, 30


class ParseError(Exception):
    """An invalid command; the server answers ``tag BAD message``.

    ``tag`` is ``None`` when no valid tag could be read (answer ``* BAD``).
    ``message`` is plain ASCII text and never contains client data.
    """

    def __init__(self, tag: bytes | None, message: str) -> None:
        super().__init__(message)
        self.tag = tag
        self.message = message
        #: A SEARCH that asked for RETURN (SAVE): RFC 5182 §2.1 has a failed
        #: one (BAD or NO) reset the saved result '$' to empty.
        self.resets_saved = False


class UnsupportedCharset(ParseError):
    """SEARCH/SORT/THREAD named a charset we cannot decode.

    RFC 9051 §6.4.4: answer ``tag NO [BADCHARSET (UTF-8 US-ASCII)]``, not BAD.
    """


@dataclass(frozen=True, slots=True)
class Literal:
    """A literal announced at the end of a line: ``{n}``, ``{n+}``, ``~{n}``, ``~{n+}``.

    ``nonsync`` is LITERAL+/LITERAL- (RFC 7888): the client does not wait for
    ``+``; under LITERAL- a non-synchronizing literal over 4096 octets must be
    refused (RFC 7888 §4) by the read loop. ``binary`` is literal8 (RFC 3516).
    """

    size: int
    nonsync: bool
    binary: bool


# --- lexical classes (RFC 9051 §9) -----------------------------------------
# atom-specials: ( ) { SP CTL % * " \ ]  ; 8-bit is not CHAR.
_ATOM = re.compile(rb'[^\x00-\x20\x7f-\xff(){%*"\\\]]+')
# ASTRING-CHAR = ATOM-CHAR / resp-specials ("]").
_ASTRING_ATOM = re.compile(rb'[^\x00-\x20\x7f-\xff(){%*"\\]+')
# list-char = ATOM-CHAR / list-wildcards / resp-specials.
_LIST_CHARS = re.compile(rb'[^\x00-\x20\x7f-\xff(){"\\]+')
# tag = 1*<any ASTRING-CHAR except "+">.
_TAG = re.compile(rb'[^\x00-\x20\x7f-\xff(){%*"\\+]+')
# Unrolled-loop form: linear, no ambiguity. QUOTED-CHAR excludes CR, LF and
# NUL; 8-bit is accepted (UTF8-2/3/4 in RFC 9051).
_QUOTED = re.compile(rb'"([^"\\\r\n\x00]*(?:\\["\\][^"\\\r\n\x00]*)*)"')
_UNESCAPE = re.compile(rb"\\(.)")
_LITERAL = re.compile(rb"\{([0-9]{1,20})(\+?)\}\r?\n")
_LITERAL8 = re.compile(rb"~\{([0-9]{1,20})(\+?)\}\r?\n")
_LITERAL_END = re.compile(rb"(~?)\{([0-9]{1,20})(\+?)\}\r?\n\Z")
_DIGITS = re.compile(rb"[0-9]+")
_SEQSET = re.compile(rb"[0-9:,*]+|\$")
_FETCH_NAME = re.compile(rb"[A-Za-z0-9.]+")
_SECTION_TEXT = re.compile(rb"[A-Za-z][A-Za-z.]*")
_BASE64 = re.compile(rb"[A-Za-z0-9+/]*={0,2}")
_DATE = re.compile(rb"([0-9]{1,2})-([A-Za-z]{3})-([0-9]{4})")
_DATE_TIME = re.compile(
    rb"( [0-9]|[0-9]{1,2})-([A-Za-z]{3})-([0-9]{4}) ([0-9]{2}):([0-9]{2}):([0-9]{2}) ([+-])([0-9]{2})([0-9]{2})"
)

_MONTHS = {
    m: i + 1
    for i, m in enumerate(
        (b"JAN", b"FEB", b"MAR", b"APR", b"MAY", b"JUN", b"JUL", b"AUG", b"SEP", b"OCT", b"NOV", b"DEC")
    )
}
_SYSTEM_FLAGS = {f.upper(): f for f in ("\\Answered", "\\Flagged", "\\Deleted", "\\Seen", "\\Draft", "\\Recent")}
_SPECIAL_USE = {f.upper(): f for f in ("\\All", "\\Archive", "\\Drafts", "\\Flagged", "\\Junk", "\\Sent", "\\Trash")}
_STATUS_ITEMS = frozenset(
    {
        b"MESSAGES",
        b"RECENT",
        b"UIDNEXT",
        b"UIDVALIDITY",
        b"UNSEEN",
        b"DELETED",
        b"SIZE",
        b"HIGHESTMODSEQ",
        b"APPENDLIMIT",
    }
)
_SEARCH_RETURN = frozenset({b"MIN", b"MAX", b"ALL", b"COUNT", b"SAVE"})
_LIST_SELECT = frozenset({b"SUBSCRIBED", b"REMOTE", b"RECURSIVEMATCH", b"SPECIAL-USE"})
_LIST_RETURN = frozenset({b"SUBSCRIBED", b"CHILDREN", b"SPECIAL-USE", b"STATUS"})
_SORT_KEYS = frozenset({b"ARRIVAL", b"CC", b"DATE", b"FROM", b"SIZE", b"SUBJECT", b"TO", b"DISPLAYFROM", b"DISPLAYTO"})
_THREAD_ALGORITHMS = frozenset({b"ORDEREDSUBJECT", b"REFERENCES"})
# Items without section share one immutable instance each.
_SIMPLE_FETCH = {
    name: FetchItem(name.decode("ascii"))
    for name in (
        b"ENVELOPE",
        b"FLAGS",
        b"INTERNALDATE",
        b"RFC822",
        b"RFC822.HEADER",
        b"RFC822.SIZE",
        b"RFC822.TEXT",
        b"BODYSTRUCTURE",
        b"UID",
        b"MODSEQ",
    )
}
_SEARCH_SIMPLE = frozenset(
    {
        b"ALL",
        b"ANSWERED",
        b"DELETED",
        b"DRAFT",
        b"FLAGGED",
        b"NEW",
        b"OLD",
        b"RECENT",
        b"SEEN",
        b"UNANSWERED",
        b"UNDELETED",
        b"UNDRAFT",
        b"UNFLAGGED",
        b"UNSEEN",
    }
)
_SEARCH_TEXT = frozenset({b"BCC", b"BODY", b"CC", b"FROM", b"SUBJECT", b"TEXT", b"TO"})
_SEARCH_DATE = frozenset({b"BEFORE", b"ON", b"SINCE", b"SENTBEFORE", b"SENTON", b"SENTSINCE"})
# Python codecs that are not mail charsets (escape or transform codecs).
_NOT_CHARSETS = frozenset({"unicode-escape", "raw-unicode-escape", "idna", "punycode", "undefined", "charmap"})

T = TypeVar("T")


class _Reader:
    """A cursor over one command; every method raises ParseError on mismatch."""

    __slots__ = ("budget", "buf", "charset", "end", "pos", "tag")

    def __init__(self, buf: bytes, pos: int, end: int, tag: bytes | None = None) -> None:
        self.buf = buf
        self.pos = pos
        self.end = end
        self.tag = tag
        self.budget = MAX_TOKENS
        self.charset = "utf-8"

    def error(self, message: str) -> ParseError:
        return ParseError(self.tag, message)

    def tick(self) -> None:
        self.budget -= 1
        if self.budget < 0:
            raise self.error("Too many arguments")

    def peek(self) -> int:
        return self.buf[self.pos] if self.pos < self.end else -1

    def at_end(self) -> bool:
        return self.pos >= self.end

    def sp(self) -> None:
        if self.pos < self.end and self.buf[self.pos] == 0x20:
            self.pos += 1
        else:
            raise self.error("Expected a space" if self.pos < self.end else "Missing arguments")

    def try_sp(self) -> bool:
        if self.pos < self.end and self.buf[self.pos] == 0x20:
            self.pos += 1
            return True
        return False

    def expect(self, ch: int, message: str) -> None:
        if self.pos < self.end and self.buf[self.pos] == ch:
            self.pos += 1
        else:
            raise self.error(message)

    def try_char(self, ch: int) -> bool:
        if self.pos < self.end and self.buf[self.pos] == ch:
            self.pos += 1
            return True
        return False

    def eol(self) -> None:
        if self.pos != self.end:
            raise self.error("Unexpected extra arguments")

    def match(self, pattern: re.Pattern[bytes]) -> bytes | None:
        m = pattern.match(self.buf, self.pos, self.end)
        if m is None:
            return None
        self.pos = m.end()
        return m.group()

    # --- tokens ------------------------------------------------------------

    def atom(self, what: str = "Expected an atom") -> bytes:
        self.tick()
        m = _ATOM.match(self.buf, self.pos, self.end)
        if m is None:
            raise self.error(what)
        self.pos = m.end()
        return m.group()

    def keyword(self) -> bytes:
        """An atom, upper-cased (command names, options, item names)."""
        return self.atom().upper()

    def peek_keyword(self) -> bytes | None:
        m = _ATOM.match(self.buf, self.pos, self.end)
        return None if m is None else m.group().upper()

    def string(self) -> bytes:
        """quoted / literal (RFC 9051 §9 ``string``)."""
        self.tick()
        c = self.peek()
        if c == 0x22:  # '"'
            m = _QUOTED.match(self.buf, self.pos, self.end)
            if m is None:
                raise self.error("Invalid quoted string")
            self.pos = m.end()
            s = m.group(1)
            return _UNESCAPE.sub(rb"\1", s) if b"\\" in s else s
        if c == 0x7B:  # '{'
            m = _LITERAL.match(self.buf, self.pos, self.end)
            if m is None:
                raise self.error("Invalid literal")
            return self._literal_data(m)
        raise self.error("Expected a string")

    def _literal_data(self, m: re.Match[bytes]) -> bytes:
        start = m.end()
        stop = start + int(m.group(1))
        if stop > self.end:
            raise self.error("Literal is truncated")
        self.pos = stop
        return self.buf[start:stop]

    def astring(self) -> bytes:
        c = self.peek()
        if c == 0x22 or c == 0x7B:
            return self.string()
        self.tick()
        m = _ASTRING_ATOM.match(self.buf, self.pos, self.end)
        if m is None:
            raise self.error("Expected a string")
        self.pos = m.end()
        return m.group()

    def is_nil(self) -> bool:
        """Consume ``NIL`` (as an atom, not a prefix of a longer atom)."""
        m = _ATOM.match(self.buf, self.pos, self.end)
        if m is not None and m.end() - self.pos == 3 and m.group().upper() == b"NIL":
            self.pos = m.end()
            return True
        return False

    def utf8(self, data: bytes, what: str) -> str:
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            raise self.error(f"Invalid UTF-8 in {what}") from None

    def mailbox(self) -> str:
        name = self.utf8(self.astring(), "mailbox name")
        # RFC 9051 §5.1: INBOX is case-insensitive.
        return "INBOX" if len(name) == 5 and name.upper() == "INBOX" else name

    def list_mailbox(self) -> str:
        c = self.peek()
        if c == 0x22 or c == 0x7B:
            return self.utf8(self.string(), "mailbox pattern")
        self.tick()
        m = _LIST_CHARS.match(self.buf, self.pos, self.end)
        if m is None:
            raise self.error("Expected a mailbox pattern")
        self.pos = m.end()
        return m.group().decode("ascii")

    def number(self, maximum: int = MAX_MODSEQ) -> int:
        self.tick()
        m = _DIGITS.match(self.buf, self.pos, self.end)
        if m is None:
            raise self.error("Expected a number")
        digits = m.group()
        if len(digits) > MAX_DIGITS or int(digits) > maximum:
            raise self.error("Number out of range")
        self.pos = m.end()
        return int(digits)

    def nz_number(self, maximum: int = MAX_UINT32) -> int:
        n = self.number(maximum)
        if n == 0:
            raise self.error("Number must not be zero")
        return n

    def seqset(self, allow_saved: bool = True, allow_star: bool = True) -> SequenceSet:
        m = _SEQSET.match(self.buf, self.pos, self.end)
        if m is None:
            raise self.error("Expected a sequence set")
        self.pos = m.end()
        text = m.group()
        if text == b"$":
            if not allow_saved:
                raise self.error("'$' is not allowed here")
            self.tick()
            return SequenceSet(saved=True)
        ranges: list[tuple[int | None, int | None]] = []
        for piece in text.split(b","):
            self.tick()
            if b":" in piece:
                a, _, b = piece.partition(b":")
                ranges.append((self._seq_bound(a, allow_star), self._seq_bound(b, allow_star)))
            else:
                n = self._seq_bound(piece, allow_star)
                ranges.append((n, n))
        return SequenceSet(tuple(ranges))

    def _seq_bound(self, b: bytes, allow_star: bool) -> int | None:
        if b == b"*":
            if not allow_star:
                raise self.error("'*' is not allowed here")
            return None
        # Empty, stray '*' or ':' inside, leading zero is tolerated.
        if not b or not b.isdigit() or len(b) > MAX_DIGITS:
            raise self.error("Invalid sequence set")
        n = int(b)
        if not 0 < n <= MAX_UINT32:
            raise self.error("Invalid sequence number")
        return n

    def flag(self) -> str:
        """flag (RFC 9051 §9): ``\\`` atom (system flag or extension) or keyword."""
        if self.try_char(0x5C):  # '\'
            name = "\\" + self.atom("Invalid flag").decode("ascii")
            return _SYSTEM_FLAGS.get(name.upper(), name)
        return self.atom("Invalid flag").decode("ascii")

    def flag_list(self) -> tuple[str, ...]:
        self.expect(0x28, "Expected a flag list")
        if self.try_char(0x29):
            return ()
        flags = [self.flag()]
        while self.try_sp():
            flags.append(self.flag())
        self.expect(0x29, "Expected ')' after flags")
        return tuple(flags)

    def paren_list(self, item: Callable[[], T], allow_empty: bool = False) -> list[T]:
        self.expect(0x28, "Expected '('")
        if self.try_char(0x29):
            if allow_empty:
                return []
            raise self.error("Empty list")
        items = [item()]
        while self.try_sp():
            items.append(item())
        self.expect(0x29, "Expected ')'")
        return items

    def decode(self, data: bytes) -> str:
        """A search string, in the command's CHARSET (UTF-8 by default)."""
        try:
            return data.decode(self.charset)
        except (UnicodeDecodeError, ValueError, LookupError):
            raise self.error("String is not valid in the given charset") from None


# ---------------------------------------------------------------------------
# Public entry points


def parse_command(line: bytes | bytearray) -> Command:
    """Parse one complete command (RFC 9051 §2.2.1, §9 ``command``).

    ``line`` is the command as received: the command line with every
    literal's announcement, CRLF and data inline, optionally ending in CRLF.
    Command names and keywords are case-insensitive; the tag is kept as is.

    Raises:
        ParseError: the command is invalid (``UnsupportedCharset`` for an
            unknown SEARCH/SORT/THREAD charset, answered with NO).
    """
    buf = line if type(line) is bytes else bytes(line)
    end = len(buf)
    if buf.endswith(b"\r\n"):
        end -= 2
    elif buf.endswith(b"\n"):
        end -= 1
    m = _TAG.match(buf, 0, end)
    if m is None:
        raise ParseError(None, "Missing or invalid tag")
    r = _Reader(buf, m.end(), end, m.group())
    if not r.try_sp():
        raise r.error("Missing command")
    m = _ATOM.match(buf, r.pos, end)
    if m is None:
        raise r.error("Missing command")
    r.pos = m.end()
    verb = m.group().upper()
    if verb == b"UID":
        r.sp()
        sub = r.keyword()
        uid_parser = _UID_COMMANDS.get(sub)
        if uid_parser is None:
            raise r.error("Unknown UID command")
        return uid_parser(r, True)
    parser = _COMMANDS.get(verb)
    if parser is None:
        if verb in _UID_COMMANDS:
            return _UID_COMMANDS[verb](r, False)
        raise r.error("Unknown command")
    return parser(r)


def parse_tag(line: bytes) -> bytes | None:
    """The tag at the start of ``line``, if valid: for ``tag BAD`` answers
    given before the command is complete (literal too large, line too long)."""
    m = _TAG.match(line)
    if m is None or m.end() >= len(line) or line[m.end()] != 0x20:
        return None
    return m.group()


def literal_at_end(line: bytes) -> Literal | None:
    """The literal announced at the end of one CRLF-terminated line, if any.

    ``line`` is one line as read from the socket (after any earlier literal
    data). The read loop then sends ``+ ...`` unless ``nonsync``, reads
    ``size`` octets and the next line, and repeats until a line has no
    literal. The size is not bounded here: the read loop enforces its limits
    (RFC 7888 §4 for LITERAL-, APPENDLIMIT, line length).
    """
    # The announcement is at most 26 octets; look only at the tail.
    m = _LITERAL_END.search(line, max(0, len(line) - 32))
    if m is None:
        return None
    return Literal(int(m.group(2)), m.group(3) == b"+", m.group(1) == b"~")


def parse_idle_done(line: bytes) -> bool:
    """Whether ``line`` is the ``DONE`` that ends IDLE (RFC 2177 §3)."""
    return line.rstrip(b"\r\n").upper() == b"DONE"


def parse_authenticate_response(line: bytes) -> bytes | None:
    """Decode one client line of an AUTHENTICATE exchange (RFC 9051 §6.2.2).

    Returns the decoded response (an empty line is an empty response), or
    ``None`` when the client cancels with ``*``.

    Raises:
        ParseError: not base64 (tag ``None``: the read loop knows the tag).
    """
    data = line[:-2] if line.endswith(b"\r\n") else line.rstrip(b"\n")
    if data == b"*":
        return None
    return _base64(data, None)


def parse_string(data: bytes) -> bytes:
    """Parse exactly one astring (atom, quoted string or literal) from ``data``.

    For tests and tools: the inverse of the response encoder's strings.
    """
    r = _Reader(data, 0, len(data))
    value = r.astring()
    r.eol()
    return value


def _base64(data: bytes, tag: bytes | None) -> bytes:
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise ParseError(tag, "Invalid base64") from None


# ---------------------------------------------------------------------------
# Commands without arguments


def _no_args(cls: type[Command]) -> Callable[[_Reader], Command]:
    def parse(r: _Reader) -> Command:
        r.eol()
        assert r.tag is not None
        return cls(r.tag)

    return parse


def _tag(r: _Reader) -> bytes:
    assert r.tag is not None
    return r.tag


# ---------------------------------------------------------------------------
# Not authenticated


def _authenticate(r: _Reader) -> Command:
    r.sp()
    mech = r.keyword().decode("ascii")
    initial = None
    if r.try_sp():
        # RFC 4959: base64 or "=" for an empty initial response.
        data = r.match(_BASE64)
        if not data:
            raise r.error("Invalid initial response")
        initial = b"" if data == b"=" else _base64(data, r.tag)
    r.eol()
    return Authenticate(_tag(r), mech, initial)


def _login(r: _Reader) -> Command:
    r.sp()
    user = r.astring()
    r.sp()
    password = r.astring()
    r.eol()
    return Login(_tag(r), user, password)


def _id(r: _Reader) -> Command:
    r.sp()
    if r.is_nil():
        r.eol()
        return Id(_tag(r), None)
    r.expect(0x28, "Expected '(' or NIL")
    params: list[tuple[str, str | None]] = []
    if not r.try_char(0x29):
        while True:
            # Lenient: astring for the field, NIL or astring for the value.
            field = r.astring()
            r.sp()
            value = None if r.is_nil() else r.astring()
            if len(field) > ID_MAX_FIELD or (value is not None and len(value) > ID_MAX_VALUE):
                raise r.error("ID field or value too long")
            params.append(
                (
                    field.decode("utf-8", "replace"),
                    None if value is None else value.decode("utf-8", "replace"),
                )
            )
            if len(params) > ID_MAX_PAIRS:
                raise r.error("Too many ID fields")
            if r.try_char(0x29):
                break
            r.sp()
    r.eol()
    return Id(_tag(r), tuple(params))


# ---------------------------------------------------------------------------
# Authenticated


def _enable(r: _Reader) -> Command:
    caps = []
    r.sp()
    caps.append(r.keyword().decode("ascii"))
    while r.try_sp():
        caps.append(r.keyword().decode("ascii"))
    r.eol()
    return Enable(_tag(r), tuple(caps))


def _select_like(cls: type[Select | Examine]) -> Callable[[_Reader], Command]:
    def parse(r: _Reader) -> Command:
        r.sp()
        mailbox = r.mailbox()
        condstore = False
        qresync = None
        if r.try_sp():
            # RFC 4466 select-params; "()" tolerated.
            r.expect(0x28, "Expected '('")
            if not r.try_char(0x29):
                while True:
                    param = r.keyword()
                    if param == b"CONDSTORE":
                        condstore = True
                    elif param == b"QRESYNC" and qresync is None:
                        r.sp()
                        qresync = _qresync(r)
                    else:
                        raise r.error("Unknown SELECT parameter")
                    if r.try_char(0x29):
                        break
                    r.sp()
        r.eol()
        return cls(_tag(r), mailbox, condstore, qresync)

    return parse


def _qresync(r: _Reader) -> QResync:
    # RFC 7162 §3.2.5: "(" uidvalidity SP mod-sequence-value [SP known-uids]
    # [SP seq-match-data] ")"; known-uids may not use "*".
    r.expect(0x28, "Expected '(' after QRESYNC")
    uidvalidity = r.nz_number()
    r.sp()
    modseq = r.nz_number(MAX_MODSEQ)
    known = None
    match = None
    if r.try_sp():
        if r.peek() != 0x28:
            known = r.seqset(allow_saved=False, allow_star=False)
            if r.try_sp():
                match = _seq_match(r)
        else:
            match = _seq_match(r)
    r.expect(0x29, "Expected ')' after QRESYNC parameters")
    return QResync(uidvalidity, modseq, known, match)


def _seq_match(r: _Reader) -> tuple[SequenceSet, SequenceSet]:
    r.expect(0x28, "Expected '('")
    seqs = r.seqset(allow_saved=False, allow_star=False)
    r.sp()
    uids = r.seqset(allow_saved=False, allow_star=False)
    r.expect(0x29, "Expected ')'")
    return seqs, uids


def _create(r: _Reader) -> Command:
    r.sp()
    mailbox = r.mailbox()
    uses: list[str] = []
    if r.try_sp():
        r.expect(0x28, "Expected '('")
        while True:
            if r.keyword() != b"USE":
                raise r.error("Unknown CREATE parameter")
            r.sp()
            for f in r.paren_list(r.flag, allow_empty=True):
                uses.append(_SPECIAL_USE.get(f.upper(), f))
            if r.try_char(0x29):
                break
            r.sp()
    r.eol()
    return Create(_tag(r), mailbox, tuple(uses))


def _one_mailbox(cls: type[Delete | Subscribe | Unsubscribe]) -> Callable[[_Reader], Command]:
    def parse(r: _Reader) -> Command:
        r.sp()
        mailbox = r.mailbox()
        r.eol()
        return cls(_tag(r), mailbox)

    return parse


def _rename(r: _Reader) -> Command:
    r.sp()
    old = r.mailbox()
    r.sp()
    new = r.mailbox()
    r.eol()
    return Rename(_tag(r), old, new)


def _status_items(r: _Reader) -> tuple[str, ...]:
    def item() -> str:
        name = r.keyword()
        if name not in _STATUS_ITEMS:
            raise r.error("Unknown STATUS item")
        return name.decode("ascii")

    return tuple(r.paren_list(item))


def _list(r: _Reader) -> Command:
    r.sp()
    extended = False
    selection: list[str] = []
    if r.peek() == 0x28:
        extended = True

        def select_opt() -> str:
            opt = r.keyword()
            if opt not in _LIST_SELECT:
                raise r.error("Unknown LIST selection option")  # RFC 5258 §3
            return opt.decode("ascii")

        selection = r.paren_list(select_opt, allow_empty=True)
        r.sp()
        # RFC 5258 §3: RECURSIVEMATCH needs another option to modify.
        if "RECURSIVEMATCH" in selection and not {"SUBSCRIBED", "SPECIAL-USE"} & set(selection):
            raise r.error("RECURSIVEMATCH needs another selection option")
    reference = r.mailbox()
    r.sp()
    if r.peek() == 0x28:
        extended = True
        patterns = tuple(r.paren_list(r.list_mailbox))
    else:
        patterns = (r.list_mailbox(),)
    return_opts: list[str] = []
    status_items = None
    if r.try_sp():
        if r.keyword() != b"RETURN":
            raise r.error("Expected RETURN")
        extended = True
        r.sp()

        def return_opt() -> str:
            nonlocal status_items
            opt = r.keyword()
            if opt not in _LIST_RETURN:
                raise r.error("Unknown LIST return option")
            if opt == b"STATUS":
                r.sp()
                status_items = _status_items(r)
            return opt.decode("ascii")

        return_opts = r.paren_list(return_opt, allow_empty=True)
    r.eol()
    return List(_tag(r), reference, patterns, tuple(selection), tuple(return_opts), status_items, extended)


def _lsub(r: _Reader) -> Command:
    r.sp()
    reference = r.mailbox()
    r.sp()
    pattern = r.list_mailbox()
    r.eol()
    return Lsub(_tag(r), reference, pattern)


def _status(r: _Reader) -> Command:
    r.sp()
    mailbox = r.mailbox()
    r.sp()
    items = _status_items(r)
    r.eol()
    return Status(_tag(r), mailbox, items)


def _append(r: _Reader) -> Command:
    r.sp()
    mailbox = r.mailbox()
    messages = []
    # RFC 3502: append = "APPEND" SP mailbox 1*append-message;
    # append-message = [SP flag-list] [SP date-time] SP (literal / literal8).
    while not r.at_end():
        r.sp()
        flags: tuple[str, ...] = ()
        when = None
        if r.peek() == 0x28:
            flags = r.flag_list()
            r.sp()
        if r.peek() == 0x22:
            when = _date_time(r)
            r.sp()
        r.tick()
        if r.peek_keyword() == b"UTF8":
            # RFC 6855 §4: append-data =/ "UTF8" SP "(" literal8 ")", a
            # message with UTF-8 header fields (UTF8=ACCEPT).
            r.keyword()
            r.sp()
            r.expect(0x28, "Expected ( after UTF8")
            m = _LITERAL8.match(r.buf, r.pos, r.end)
            if m is None:
                raise r.error("UTF8 needs a literal8 (~{n})")
            data = r._literal_data(m)
            r.expect(0x29, "Expected ) after the UTF8 literal")
            messages.append(AppendMessage(flags, when, data, True, utf8=True))
            continue
        c = r.peek()
        if c == 0x7B:
            m = _LITERAL.match(r.buf, r.pos, r.end)
            binary = False
        elif c == 0x7E:
            m = _LITERAL8.match(r.buf, r.pos, r.end)
            binary = True
        else:
            raise r.error("Expected a literal with the message")
        if m is None:
            raise r.error("Invalid literal")
        messages.append(AppendMessage(flags, when, r._literal_data(m), binary))
    if not messages:
        raise r.error("Missing message")
    return Append(_tag(r), mailbox, tuple(messages))


def _date_time(r: _Reader) -> datetime:
    # RFC 9051 §9 date-time: DQUOTE date-day-fixed "-" date-month "-"
    # date-year SP time SP zone DQUOTE; a 1-digit day is tolerated.
    m = _QUOTED.match(r.buf, r.pos, r.end)
    if m is None:
        raise r.error("Invalid date-time")
    r.pos = m.end()
    d = _DATE_TIME.fullmatch(m.group(1))
    month = _MONTHS.get(d.group(2).upper(), 0) if d else 0
    if d is None or not month or int(d.group(9)) >= 60:
        raise r.error("Invalid date-time")
    offset = timedelta(hours=int(d.group(8)), minutes=int(d.group(9)))
    try:
        return datetime(
            int(d.group(3)),
            month,
            int(d.group(1)),
            int(d.group(4)),
            int(d.group(5)),
            int(d.group(6)),
            tzinfo=timezone(-offset if d.group(7) == b"-" else offset),
        )
    except ValueError:
        raise r.error("Invalid date-time") from None


# ---------------------------------------------------------------------------
# Selected


def _expunge(r: _Reader, uid: bool) -> Command:
    seqset = None
    if uid:  # RFC 4315 §2.1: UID EXPUNGE sequence-set
        r.sp()
        seqset = r.seqset()
    r.eol()
    return Expunge(_tag(r), uid, seqset)


def _copy_like(cls: type[Copy | Move]) -> Callable[[_Reader, bool], Command]:
    def parse(r: _Reader, uid: bool) -> Command:
        r.sp()
        seqset = r.seqset()
        r.sp()
        mailbox = r.mailbox()
        r.eol()
        return cls(_tag(r), uid, seqset, mailbox)

    return parse


def _fetch(r: _Reader, uid: bool) -> Command:
    r.sp()
    seqset = r.seqset()
    r.sp()
    items: tuple[FetchItem, ...]
    if r.peek() == 0x28:
        # Lenient: "()" is accepted (useful with CHANGEDSINCE).
        items = tuple(r.paren_list(lambda: _fetch_att(r), allow_empty=True))
    else:
        save = r.pos
        name = r.match(_FETCH_NAME)
        macro = FETCH_MACROS.get(name.upper().decode("ascii")) if name else None
        if macro is not None and r.peek() != 0x5B:
            items = macro
        else:
            r.pos = save
            items = (_fetch_att(r),)
    changedsince = None
    vanished = False
    if r.try_sp():
        r.expect(0x28, "Expected '(' before FETCH modifiers")
        while True:
            mod = r.keyword()
            if mod == b"CHANGEDSINCE" and changedsince is None:
                r.sp()
                changedsince = r.number()  # 0 tolerated
            elif mod == b"VANISHED" and not vanished:
                vanished = True
            else:
                raise r.error("Unknown FETCH modifier")
            if r.try_char(0x29):
                break
            r.sp()
    r.eol()
    # RFC 7162 §3.2.6: VANISHED only in UID FETCH and only with CHANGEDSINCE.
    if vanished and (not uid or changedsince is None):
        raise r.error("VANISHED needs UID FETCH and CHANGEDSINCE")
    return Fetch(_tag(r), uid, seqset, items, changedsince, vanished)


def _fetch_att(r: _Reader) -> FetchItem:
    r.tick()
    raw = r.match(_FETCH_NAME)
    if raw is None:
        raise r.error("Expected a FETCH item")
    name = raw.upper()
    simple = _SIMPLE_FETCH.get(name)
    if simple is not None:
        return simple
    if name == b"BODY" or name == b"BODY.PEEK":
        peek = name == b"BODY.PEEK"
        if r.peek() != 0x5B:
            if peek:
                raise r.error("BODY.PEEK needs a section")
            return FetchItem("BODY")
        section, text, headers = _section(r)
        return FetchItem("BODY", section, text, headers, _partial(r), peek)
    if name in (b"BINARY", b"BINARY.PEEK", b"BINARY.SIZE"):
        # RFC 3516 §4.2: section-binary = "[" [section-part] "]".
        r.expect(0x5B, "BINARY needs a section")
        parts: list[int] = []
        if not r.try_char(0x5D):
            parts.append(r.nz_number())
            while r.try_char(0x2E):
                parts.append(r.nz_number())
            r.expect(0x5D, "Invalid BINARY section")
        if name == b"BINARY.SIZE":
            return FetchItem("BINARY.SIZE", tuple(parts), binary=True)
        return FetchItem("BINARY", tuple(parts), partial=_partial(r), peek=name == b"BINARY.PEEK", binary=True)
    raise r.error("Unknown FETCH item")


def _section(r: _Reader) -> tuple[tuple[int, ...], str | None, tuple[str, ...]]:
    # RFC 9051 §9: section-spec = section-msgtext / (section-part ["." section-text])
    r.expect(0x5B, "Expected '['")
    parts: list[int] = []
    text = None
    headers: tuple[str, ...] = ()
    if not r.try_char(0x5D):
        while True:
            if 0x30 <= r.peek() <= 0x39:
                parts.append(r.nz_number())
                if r.try_char(0x2E):
                    continue
                break
            raw = r.match(_SECTION_TEXT)
            if raw is None:
                raise r.error("Invalid section")
            text = raw.upper().decode("ascii")
            if text not in ("HEADER", "HEADER.FIELDS", "HEADER.FIELDS.NOT", "TEXT", "MIME") or (
                text == "MIME" and not parts
            ):
                raise r.error("Invalid section")
            if text.startswith("HEADER.FIELDS"):
                r.sp()
                headers = tuple(r.utf8(h, "header name") for h in r.paren_list(r.astring))
            break
        r.expect(0x5D, "Expected ']' after section")
    return tuple(parts), text, headers


def _partial(r: _Reader) -> tuple[int, int] | None:
    # "<" number "." nz-number ">"
    if not r.try_char(0x3C):
        return None
    start = r.number()
    r.expect(0x2E, "Invalid partial")
    length = r.nz_number(MAX_MODSEQ)
    r.expect(0x3E, "Invalid partial")
    return start, length


def _store(r: _Reader, uid: bool) -> Command:
    r.sp()
    seqset = r.seqset()
    r.sp()
    unchangedsince = None
    if r.peek() == 0x28:
        # RFC 7162 §3.1.3: store-modifiers precede the action.
        r.pos += 1
        while True:
            if r.keyword() != b"UNCHANGEDSINCE" or unchangedsince is not None:
                raise r.error("Unknown STORE modifier")
            r.sp()
            unchangedsince = r.number()  # mod-sequence-valzer
            if r.try_char(0x29):
                break
            r.sp()
        r.sp()
    action = r.keyword()
    silent = action.endswith(b".SILENT")
    if silent:
        action = action[:-7]
    if action == b"FLAGS":
        mode = StoreMode.REPLACE
    elif action == b"+FLAGS":
        mode = StoreMode.ADD
    elif action == b"-FLAGS":
        mode = StoreMode.REMOVE
    else:
        raise r.error("Invalid STORE action")
    r.sp()
    if r.peek() == 0x28:
        flags = r.flag_list()
    else:
        fl = [r.flag()]
        while r.try_sp():
            fl.append(r.flag())
        flags = tuple(fl)
    r.eol()
    return Store(_tag(r), uid, seqset, mode, silent, flags, unchangedsince)


def _return_opts(r: _Reader, seen: list[str] | None = None) -> tuple[str, ...]:
    """``seen`` collects the options read so far, for the caller to see
    what was asked for even when a later one is invalid."""
    # RFC 4731 §3: "RETURN ()" means "RETURN (ALL)".
    def opt() -> str:
        name = r.keyword()
        if name not in _SEARCH_RETURN:
            raise r.error("Unknown RETURN option")
        if seen is not None:
            seen.append(name.decode("ascii"))
        return name.decode("ascii")

    opts = r.paren_list(opt, allow_empty=True)
    return tuple(opts) if opts else ("ALL",)


def _set_charset(r: _Reader, raw: bytes) -> str:
    try:
        name = raw.decode("ascii").upper()
        info = codecs.lookup(name)
    except (UnicodeDecodeError, LookupError, ValueError, TypeError):
        raise UnsupportedCharset(r.tag, "Unsupported charset") from None
    if not getattr(info, "_is_text_encoding", True) or info.name in _NOT_CHARSETS:
        raise UnsupportedCharset(r.tag, "Unsupported charset")
    r.charset = info.name
    return name


def _search(r: _Reader, uid: bool) -> Command:
    r.sp()
    seen: list[str] = []
    try:
        return _search_rest(r, uid, seen)
    except ParseError as exc:
        exc.resets_saved = "SAVE" in seen
        raise


def _search_rest(r: _Reader, uid: bool, seen: list[str]) -> Command:
    return_opts = None
    if r.peek_keyword() == b"RETURN":
        r.keyword()
        r.sp()
        return_opts = _return_opts(r, seen)
        r.sp()
    charset = None
    if r.peek_keyword() == b"CHARSET":
        r.keyword()
        r.sp()
        charset = _set_charset(r, r.astring())
        r.sp()
    key = _search_program(r)
    return Search(_tag(r), uid, charset, key, return_opts)


def _search_program(r: _Reader) -> SearchKey:
    keys = [_search_key(r, 0)]
    while r.try_sp():
        keys.append(_search_key(r, 0))
    r.eol()
    return keys[0] if len(keys) == 1 else And(tuple(keys))


def _search_key(r: _Reader, depth: int) -> SearchKey:
    if depth >= MAX_SEARCH_DEPTH:
        raise r.error("Search keys nested too deeply")
    c = r.peek()
    if c == 0x28:
        r.pos += 1
        keys = [_search_key(r, depth + 1)]
        while r.try_sp():
            keys.append(_search_key(r, depth + 1))
        r.expect(0x29, "Expected ')' in search keys")
        return keys[0] if len(keys) == 1 else And(tuple(keys))
    if 0x30 <= c <= 0x39 or c == 0x2A or c == 0x24:  # digit, '*', '$'
        return SeqKey(r.seqset())
    word = r.atom("Expected a search key").upper()
    if word in _SEARCH_SIMPLE:
        return Simple(word.decode("ascii"))
    if word in _SEARCH_TEXT:
        r.sp()
        return TextKey(word.decode("ascii"), r.decode(r.astring()))
    if word in _SEARCH_DATE:
        r.sp()
        return DateKey(word.decode("ascii"), _date(r))
    if word == b"NOT":
        r.sp()
        return Not(_search_key(r, depth + 1))
    if word == b"OR":
        r.sp()
        left = _search_key(r, depth + 1)
        r.sp()
        return Or(left, _search_key(r, depth + 1))
    if word == b"UID":
        r.sp()
        return UidKey(r.seqset())
    if word == b"HEADER":
        r.sp()
        field = r.utf8(r.astring(), "header name")
        r.sp()
        return HeaderKey(field, r.decode(r.astring()))
    if word == b"KEYWORD" or word == b"UNKEYWORD":
        r.sp()
        return KeywordKey(word.decode("ascii"), r.atom("Invalid keyword").decode("ascii"))
    if word == b"LARGER" or word == b"SMALLER":
        r.sp()
        return NumberKey(word.decode("ascii"), r.number())
    if word == b"OLDER" or word == b"YOUNGER":
        r.sp()
        return NumberKey(word.decode("ascii"), r.nz_number())
    if word == b"MODSEQ":
        # RFC 7162 §3.1.5: MODSEQ [SP entry-name SP entry-type-req] SP valzer
        r.sp()
        entry = entry_type = None
        if r.peek() == 0x22:
            entry = r.utf8(r.string(), "MODSEQ entry name")
            r.sp()
            kind = r.keyword()
            if kind not in (b"PRIV", b"SHARED", b"ALL"):
                raise r.error("Invalid MODSEQ entry type")
            entry_type = kind.decode("ascii").lower()
            r.sp()
        return ModSeqKey(r.number(), entry, entry_type)
    raise r.error("Unknown search key")


def _date(r: _Reader) -> date:
    # date = date-text / DQUOTE date-text DQUOTE
    if r.peek() == 0x22:
        m = _QUOTED.match(r.buf, r.pos, r.end)
        if m is None:
            raise r.error("Invalid date")
        r.pos = m.end()
        text = m.group(1)
    else:
        text = r.atom("Invalid date")
    d = _DATE.fullmatch(text)
    month = _MONTHS.get(d.group(2).upper(), 0) if d else 0
    if d is None or not month:
        raise r.error("Invalid date")
    try:
        return date(int(d.group(3)), month, int(d.group(1)))
    except ValueError:
        raise r.error("Invalid date") from None


def _sort(r: _Reader, uid: bool) -> Command:
    r.sp()
    return_opts = None
    if r.peek_keyword() == b"RETURN":  # RFC 5267 ESORT
        r.keyword()
        r.sp()
        return_opts = _return_opts(r)
        r.sp()

    def criterion() -> SortCriterion:
        key = r.keyword()
        reverse = key == b"REVERSE"
        if reverse:
            r.sp()
            key = r.keyword()
        if key not in _SORT_KEYS:
            raise r.error("Unknown sort key")
        return SortCriterion(key.decode("ascii"), reverse)

    criteria = tuple(r.paren_list(criterion))
    r.sp()
    charset = _set_charset(r, r.astring())
    r.sp()
    key = _search_program(r)
    return Sort(_tag(r), uid, criteria, charset, key, return_opts)


def _thread(r: _Reader, uid: bool) -> Command:
    r.sp()
    algorithm = r.keyword()
    if algorithm not in _THREAD_ALGORITHMS:
        raise r.error("Unknown THREAD algorithm")
    r.sp()
    charset = _set_charset(r, r.astring())
    r.sp()
    key = _search_program(r)
    return Thread(_tag(r), uid, algorithm.decode("ascii"), charset, key)


_COMMANDS: dict[bytes, Callable[[_Reader], Command]] = {
    b"CAPABILITY": _no_args(Capability),
    b"NOOP": _no_args(Noop),
    b"LOGOUT": _no_args(Logout),
    b"ID": _id,
    b"STARTTLS": _no_args(StartTLS),
    b"AUTHENTICATE": _authenticate,
    b"LOGIN": _login,
    b"ENABLE": _enable,
    b"SELECT": _select_like(Select),
    b"EXAMINE": _select_like(Examine),
    b"CREATE": _create,
    b"DELETE": _one_mailbox(Delete),
    b"RENAME": _rename,
    b"SUBSCRIBE": _one_mailbox(Subscribe),
    b"UNSUBSCRIBE": _one_mailbox(Unsubscribe),
    b"LIST": _list,
    b"LSUB": _lsub,
    b"NAMESPACE": _no_args(Namespace),
    b"STATUS": _status,
    b"APPEND": _append,
    b"IDLE": _no_args(Idle),
    b"CHECK": _no_args(Check),
    b"CLOSE": _no_args(Close),
    b"UNSELECT": _no_args(Unselect),
}

# Commands that also exist with a UID prefix; without it they get uid=False.
_UID_COMMANDS: dict[bytes, Callable[[_Reader, bool], Command]] = {
    b"COPY": _copy_like(Copy),
    b"MOVE": _copy_like(Move),
    b"FETCH": _fetch,
    b"STORE": _store,
    b"SEARCH": _search,
    b"SORT": _sort,
    b"THREAD": _thread,
    b"EXPUNGE": _expunge,
}


# ---------------------------------------------------------------------------
# Modified UTF-7 (RFC 3501 §5.1.3)

_B64_MUTF7 = re.compile(r"&([A-Za-z0-9+,]*)-")


def encode_mutf7(name: str) -> str:
    """Encode a mailbox name in modified UTF-7 (RFC 3501 §5.1.3)."""
    out: list[str] = []
    pending: list[str] = []

    def flush() -> None:
        if pending:
            raw = "".join(pending).encode("utf-16-be", "surrogatepass")
            out.append("&" + base64.b64encode(raw).decode("ascii").rstrip("=").replace("/", ",") + "-")
            pending.clear()

    for ch in name:
        if "\x20" <= ch <= "\x7e":
            flush()
            out.append("&-" if ch == "&" else ch)
        else:
            pending.append(ch)
    flush()
    return "".join(out)


def decode_mutf7(name: str) -> str:
    """Decode a modified UTF-7 mailbox name (RFC 3501 §5.1.3).

    Raises:
        ValueError: not valid modified UTF-7 (8-bit or control characters,
            bad base64, an encoded printable ASCII character, odd UTF-16).
    """
    out: list[str] = []
    pos = 0
    n = len(name)
    while pos < n:
        amp = name.find("&", pos)
        plain = name[pos:] if amp < 0 else name[pos:amp]
        if any(not "\x20" <= c <= "\x7e" for c in plain):
            raise ValueError("invalid character in modified UTF-7")
        out.append(plain)
        if amp < 0:
            break
        m = _B64_MUTF7.match(name, amp)
        if m is None:
            raise ValueError("unterminated modified UTF-7 shift")
        pos = m.end()
        b64 = m.group(1)
        if not b64:
            out.append("&")
            continue
        if len(b64) % 4 == 1:
            raise ValueError("invalid modified UTF-7 base64")
        try:
            raw = base64.b64decode(b64.replace(",", "/") + "=" * (-len(b64) % 4), validate=True)
            text = raw.decode("utf-16-be")
        except (binascii.Error, ValueError):
            raise ValueError("invalid modified UTF-7 base64") from None
        # The shortest encoding is the only valid one: no leftover bits.
        if base64.b64encode(raw).decode("ascii").rstrip("=").replace("/", ",") != b64:
            raise ValueError("invalid modified UTF-7 padding")
        if any("\x20" <= c <= "\x7e" for c in text):
            raise ValueError("printable ASCII must not be encoded in modified UTF-7")
        out.append(text)
    return "".join(out)
