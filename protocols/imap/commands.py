"""Typed IMAP commands: what :func:`protocols.imap.parse.parse_command` returns.

Every command is a frozen dataclass carrying its ``tag`` and two class-level
attributes: ``name`` (the verb, used for ``do_<NAME>`` dispatch; ``UID``
variants share the verb and set ``uid=True``) and ``states``, the set of
session states in which the command is legal (RFC 9051 §3, §6). The session
checks ``session_state in cmd.states`` once, before dispatch (pymap
``parsing/command/``).

Values are immutable: sequences are tuples, so commands are hashable and can
be logged or queued without copies. Strings that are names (mailboxes, search
text, flags) are ``str``; credentials, message data and SASL responses stay
``bytes``. Mailbox names are returned as sent (UTF-8 decoded); for IMAP4rev1
clients that did not ``ENABLE UTF8=ACCEPT`` the session converts them from
modified UTF-7 with :func:`protocols.imap.parse.decode_mutf7`.
"""

from __future__ import annotations

import enum
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import date, datetime
from typing import ClassVar, TypeAlias

#: RFC 9051 §9 nz-number: a message sequence number or UID is a non-zero
#: unsigned 32-bit integer.
MAX_UINT32 = 4_294_967_295
#: RFC 7162 §7 mod-sequence-value: positive unsigned 63-bit integer.
MAX_MODSEQ = 9_223_372_036_854_775_807


class State(enum.IntFlag):
    """Session states (RFC 9051 §3). A command's ``states`` is a union."""

    NOT_AUTHENTICATED = 1
    AUTHENTICATED = 2
    SELECTED = 4


ANY_STATE = State.NOT_AUTHENTICATED | State.AUTHENTICATED | State.SELECTED
AUTHENTICATED_OR_SELECTED = State.AUTHENTICATED | State.SELECTED


# ---------------------------------------------------------------------------
# Shared value types


@dataclass(frozen=True, slots=True)
class SequenceSet:
    """A sequence set (RFC 9051 §9 ``sequence-set``) of sequence numbers or UIDs.

    ``ranges`` keeps the client's ranges in order; a bound of ``None`` is ``*``
    (the largest number in use). A single number ``n`` is ``(n, n)``. ``saved``
    is the SEARCHRES ``$`` marker (RFC 5182): the result of the last
    ``SEARCH ... RETURN (SAVE)``; the session substitutes it before resolving.
    """

    ranges: tuple[tuple[int | None, int | None], ...] = ()
    saved: bool = False

    def resolve(self, largest: int) -> list[tuple[int, int]]:
        """Sorted, merged, inclusive ``(low, high)`` ranges.

        ``largest`` replaces ``*`` (RFC 9051 §9: ``n:m`` is the same set as
        ``m:n``). In an empty mailbox (``largest == 0``) a range involving
        ``*`` names nothing. Numbers beyond ``largest`` are kept; callers
        intersect with what exists (UID sets) or reject them (sequence sets).

        Raises:
            ValueError: the set is ``$``; resolve the saved result instead.
        """
        if self.saved:
            raise ValueError("'$' must be replaced by the saved search result")
        out: list[tuple[int, int]] = []
        for a, b in self.ranges:
            if a is None or b is None:
                if largest <= 0:
                    continue
                a = largest if a is None else a
                b = largest if b is None else b
            lo, hi = (a, b) if a <= b else (b, a)
            out.append((lo, hi))
        out.sort()
        merged: list[tuple[int, int]] = []
        for lo, hi in out:
            if merged and lo <= merged[-1][1] + 1:
                if hi > merged[-1][1]:
                    merged[-1] = (merged[-1][0], hi)
            else:
                merged.append((lo, hi))
        return merged

    def iter(self, largest: int) -> Iterator[int]:
        """Every number in the set, ascending (mind huge ranges like ``1:*``)."""
        for lo, hi in self.resolve(largest):
            yield from range(lo, hi + 1)

    def contains(self, n: int, largest: int) -> bool:
        """Whether ``n`` is in the set when ``*`` means ``largest``."""
        if self.saved:
            raise ValueError("'$' must be replaced by the saved search result")
        for a, b in self.ranges:
            if a is None or b is None:
                if largest <= 0:
                    continue
                a = largest if a is None else a
                b = largest if b is None else b
            if (a <= n <= b) if a <= b else (b <= n <= a):
                return True
        return False

    def __str__(self) -> str:
        if self.saved:
            return "$"

        def bound(x: int | None) -> str:
            return "*" if x is None else str(x)

        return ",".join(bound(a) if a == b else f"{bound(a)}:{bound(b)}" for a, b in self.ranges)


#: FETCH section texts (RFC 9051 §6.4.5 ``section-text``).
SECTION_TEXTS = frozenset({"HEADER", "HEADER.FIELDS", "HEADER.FIELDS.NOT", "TEXT", "MIME"})


@dataclass(frozen=True, slots=True)
class FetchItem:
    """One FETCH data item (RFC 9051 §6.4.5, RFC 3516, RFC 7162).

    ``name`` is the item without ``.PEEK`` or section: ``ENVELOPE``,
    ``FLAGS``, ``INTERNALDATE``, ``RFC822``, ``RFC822.HEADER``,
    ``RFC822.SIZE``, ``RFC822.TEXT``, ``BODYSTRUCTURE``, ``UID``, ``MODSEQ``,
    ``BODY``, ``BINARY`` or ``BINARY.SIZE``.

    ``section`` is ``None`` when no ``[...]`` was given (plain ``BODY`` is the
    non-extensible body structure), else the part numbers (``()`` for the
    whole message: ``BODY[]``). ``text`` is the section text (``HEADER``,
    ``HEADER.FIELDS``, ``HEADER.FIELDS.NOT``, ``TEXT``, ``MIME`` or ``None``),
    ``headers`` the field names of ``HEADER.FIELDS[.NOT]``, ``partial`` the
    ``<start.length>`` suffix. ``peek`` is ``BODY.PEEK``/``BINARY.PEEK`` (do
    not set ``\\Seen``); ``binary`` marks ``BINARY``/``BINARY.SIZE``.
    """

    name: str
    section: tuple[int, ...] | None = None
    text: str | None = None
    headers: tuple[str, ...] = ()
    partial: tuple[int, int] | None = None
    peek: bool = False
    binary: bool = False

    def label(self) -> bytes:
        """The item's name in the FETCH response (RFC 9051 §7.5.2).

        ``.PEEK`` is dropped and a partial shows only its origin:
        ``BODY.PEEK[1.HEADER.FIELDS (From)]<0.100>`` answers as
        ``BODY[1.HEADER.FIELDS (From)]<0>``.
        """
        if self.section is None:
            return self.name.encode()
        spec = ".".join(str(p) for p in self.section)
        if self.text:
            spec = f"{spec}.{self.text}" if spec else self.text
            if self.headers:
                spec += " (" + " ".join(_header_name(h) for h in self.headers) + ")"
        out = f"{self.name}[{spec}]"
        if self.partial is not None:
            out += f"<{self.partial[0]}>"
        return out.encode("utf-8", "surrogateescape")


def _header_name(name: str) -> str:
    # Header field names are atoms in practice; quote anything else so the
    # echoed header-list stays parseable.
    if name and all(33 <= ord(c) < 127 and c not in '(){%*"\\]' for c in name):
        return name
    return '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'


#: FETCH macros (RFC 9051 §6.4.5); only valid alone, not inside a list.
FETCH_MACROS: dict[str, tuple[FetchItem, ...]] = {
    "ALL": (FetchItem("FLAGS"), FetchItem("INTERNALDATE"), FetchItem("RFC822.SIZE"), FetchItem("ENVELOPE")),
    "FAST": (FetchItem("FLAGS"), FetchItem("INTERNALDATE"), FetchItem("RFC822.SIZE")),
    "FULL": (
        FetchItem("FLAGS"),
        FetchItem("INTERNALDATE"),
        FetchItem("RFC822.SIZE"),
        FetchItem("ENVELOPE"),
        FetchItem("BODY"),
    ),
}


class StoreMode(enum.Enum):
    """``FLAGS`` replaces, ``+FLAGS`` adds, ``-FLAGS`` removes (RFC 9051 §6.4.6)."""

    REPLACE = ""
    ADD = "+"
    REMOVE = "-"


@dataclass(frozen=True, slots=True)
class SortCriterion:
    """One SORT key (RFC 5256 §3, RFC 5957 DISPLAYFROM/DISPLAYTO)."""

    key: str
    reverse: bool = False


@dataclass(frozen=True, slots=True)
class QResync:
    """SELECT/EXAMINE ``(QRESYNC (...))`` parameters (RFC 7162 §3.2.5).

    ``seq_match`` is ``(known sequence numbers, their UIDs)``.
    """

    uidvalidity: int
    modseq: int
    known_uids: SequenceSet | None = None
    seq_match: tuple[SequenceSet, SequenceSet] | None = None


@dataclass(frozen=True, slots=True)
class AppendMessage:
    """One message of a (MULTI)APPEND (RFC 9051 §6.3.12, RFC 3502).

    ``binary`` is set when the data came as a literal8 ``~{n}`` (RFC 3516):
    it may contain NULs and any content-transfer-encoding may be undone.
    ``utf8``: it came as ``UTF8 (~{n})`` (RFC 6855 §4), which only a client
    that enabled UTF8=ACCEPT may send.
    """

    flags: tuple[str, ...]
    date_time: datetime | None
    data: bytes
    binary: bool = False
    utf8: bool = False


# ---------------------------------------------------------------------------
# Search keys (RFC 9051 §6.4.4, RFC 7162 §3.1.5, RFC 5032)


@dataclass(frozen=True, slots=True)
class And:
    """All keys match (a parenthesised list or the top-level key list)."""

    keys: tuple[SearchKey, ...]


@dataclass(frozen=True, slots=True)
class Or:
    left: SearchKey
    right: SearchKey


@dataclass(frozen=True, slots=True)
class Not:
    key: SearchKey


@dataclass(frozen=True, slots=True)
class Simple:
    """A key without argument: ``ALL``, ``SEEN``, ``UNDELETED``, ``NEW``..."""

    name: str


@dataclass(frozen=True, slots=True)
class SeqKey:
    """A bare sequence set (message sequence numbers)."""

    seqset: SequenceSet
    name: ClassVar[str] = "SEQ"


@dataclass(frozen=True, slots=True)
class UidKey:
    """``UID sequence-set``."""

    seqset: SequenceSet
    name: ClassVar[str] = "UID"


@dataclass(frozen=True, slots=True)
class DateKey:
    """``BEFORE``/``ON``/``SINCE`` (internal date) and ``SENT*`` (Date: header)."""

    name: str
    date: date


@dataclass(frozen=True, slots=True)
class NumberKey:
    """``LARGER``/``SMALLER`` (octets), ``OLDER``/``YOUNGER`` (seconds, RFC 5032)."""

    name: str
    value: int


@dataclass(frozen=True, slots=True)
class TextKey:
    """``BCC``/``BODY``/``CC``/``FROM``/``SUBJECT``/``TEXT``/``TO`` substring."""

    name: str
    value: str


@dataclass(frozen=True, slots=True)
class HeaderKey:
    """``HEADER field-name string``."""

    field: str
    value: str
    name: ClassVar[str] = "HEADER"


@dataclass(frozen=True, slots=True)
class KeywordKey:
    """``KEYWORD``/``UNKEYWORD`` flag-keyword."""

    name: str
    keyword: str


@dataclass(frozen=True, slots=True)
class ModSeqKey:
    """``MODSEQ ["/flags/<flag>" priv|shared|all] n`` (RFC 7162 §3.1.5)."""

    modseq: int
    entry: str | None = None
    entry_type: str | None = None
    name: ClassVar[str] = "MODSEQ"


SearchKey: TypeAlias = (
    And | Or | Not | Simple | SeqKey | UidKey | DateKey | NumberKey | TextKey | HeaderKey | KeywordKey | ModSeqKey
)


# ---------------------------------------------------------------------------
# Commands


@dataclass(frozen=True, slots=True)
class Command:
    """Base of every command: the client's tag, the verb and legal states."""

    tag: bytes
    name: ClassVar[str] = ""
    states: ClassVar[State] = ANY_STATE


# Any state (RFC 9051 §6.1)


@dataclass(frozen=True, slots=True)
class Capability(Command):
    name: ClassVar[str] = "CAPABILITY"
    states: ClassVar[State] = ANY_STATE


@dataclass(frozen=True, slots=True)
class Noop(Command):
    name: ClassVar[str] = "NOOP"
    states: ClassVar[State] = ANY_STATE


@dataclass(frozen=True, slots=True)
class Logout(Command):
    name: ClassVar[str] = "LOGOUT"
    states: ClassVar[State] = ANY_STATE


@dataclass(frozen=True, slots=True)
class Id(Command):
    """``ID NIL`` or ``ID ("name" "value" ...)`` (RFC 2971); ``params`` None for NIL."""

    params: tuple[tuple[str, str | None], ...] | None
    name: ClassVar[str] = "ID"
    states: ClassVar[State] = ANY_STATE


# Not authenticated (RFC 9051 §6.2)


@dataclass(frozen=True, slots=True)
class StartTLS(Command):
    name: ClassVar[str] = "STARTTLS"
    states: ClassVar[State] = State.NOT_AUTHENTICATED


@dataclass(frozen=True, slots=True)
class Authenticate(Command):
    """``AUTHENTICATE mech [initial-response]`` (RFC 4959 SASL-IR).

    ``mechanism`` is upper-cased; ``initial_response`` is decoded base64
    (``=`` gives ``b""``) or ``None`` when absent.
    """

    mechanism: str
    initial_response: bytes | None = None
    name: ClassVar[str] = "AUTHENTICATE"
    states: ClassVar[State] = State.NOT_AUTHENTICATED


@dataclass(frozen=True, slots=True)
class Login(Command):
    username: bytes
    password: bytes
    name: ClassVar[str] = "LOGIN"
    states: ClassVar[State] = State.NOT_AUTHENTICATED


# Authenticated (RFC 9051 §6.3)


@dataclass(frozen=True, slots=True)
class Enable(Command):
    """``ENABLE cap...`` (RFC 5161: authenticated state only); upper-cased."""

    capabilities: tuple[str, ...]
    name: ClassVar[str] = "ENABLE"
    states: ClassVar[State] = State.AUTHENTICATED


@dataclass(frozen=True, slots=True)
class Select(Command):
    """``SELECT mailbox [(CONDSTORE) | (QRESYNC (...))]`` (RFC 7162 §3.1.8, §3.2.5)."""

    mailbox: str
    condstore: bool = False
    qresync: QResync | None = None
    name: ClassVar[str] = "SELECT"
    states: ClassVar[State] = AUTHENTICATED_OR_SELECTED


@dataclass(frozen=True, slots=True)
class Examine(Command):
    """Read-only SELECT; same parameters."""

    mailbox: str
    condstore: bool = False
    qresync: QResync | None = None
    name: ClassVar[str] = "EXAMINE"
    states: ClassVar[State] = AUTHENTICATED_OR_SELECTED


@dataclass(frozen=True, slots=True)
class Create(Command):
    """``CREATE mailbox [(USE (\\Drafts ...))]`` (RFC 6154 §3)."""

    mailbox: str
    special_use: tuple[str, ...] = ()
    name: ClassVar[str] = "CREATE"
    states: ClassVar[State] = AUTHENTICATED_OR_SELECTED


@dataclass(frozen=True, slots=True)
class Delete(Command):
    mailbox: str
    name: ClassVar[str] = "DELETE"
    states: ClassVar[State] = AUTHENTICATED_OR_SELECTED


@dataclass(frozen=True, slots=True)
class Rename(Command):
    mailbox: str
    new_name: str
    name: ClassVar[str] = "RENAME"
    states: ClassVar[State] = AUTHENTICATED_OR_SELECTED


@dataclass(frozen=True, slots=True)
class Subscribe(Command):
    mailbox: str
    name: ClassVar[str] = "SUBSCRIBE"
    states: ClassVar[State] = AUTHENTICATED_OR_SELECTED


@dataclass(frozen=True, slots=True)
class Unsubscribe(Command):
    mailbox: str
    name: ClassVar[str] = "UNSUBSCRIBE"
    states: ClassVar[State] = AUTHENTICATED_OR_SELECTED


@dataclass(frozen=True, slots=True)
class List(Command):
    """``LIST`` with LIST-EXTENDED (RFC 5258), SPECIAL-USE (RFC 6154), LIST-STATUS (RFC 5819).

    ``selection`` and ``return_opts`` are upper-cased option names;
    ``status_items`` is set when ``RETURN (STATUS (...))`` was given.
    ``extended`` is true when the extended syntax was used (selection
    options, a parenthesised pattern list or RETURN), which changes what the
    server must answer (RFC 5258 §3).
    """

    reference: str
    patterns: tuple[str, ...]
    selection: tuple[str, ...] = ()
    return_opts: tuple[str, ...] = ()
    status_items: tuple[str, ...] | None = None
    extended: bool = False
    name: ClassVar[str] = "LIST"
    states: ClassVar[State] = AUTHENTICATED_OR_SELECTED


@dataclass(frozen=True, slots=True)
class Lsub(Command):
    reference: str
    pattern: str
    name: ClassVar[str] = "LSUB"
    states: ClassVar[State] = AUTHENTICATED_OR_SELECTED


@dataclass(frozen=True, slots=True)
class Namespace(Command):
    name: ClassVar[str] = "NAMESPACE"
    states: ClassVar[State] = AUTHENTICATED_OR_SELECTED


@dataclass(frozen=True, slots=True)
class Status(Command):
    """``STATUS mailbox (items)``; items upper-cased (RFC 9051 §6.3.11, RFC 7889, RFC 7162)."""

    mailbox: str
    items: tuple[str, ...]
    name: ClassVar[str] = "STATUS"
    states: ClassVar[State] = AUTHENTICATED_OR_SELECTED


@dataclass(frozen=True, slots=True)
class Append(Command):
    """``APPEND mailbox`` with one or more messages (RFC 3502 MULTIAPPEND)."""

    mailbox: str
    messages: tuple[AppendMessage, ...]
    name: ClassVar[str] = "APPEND"
    states: ClassVar[State] = AUTHENTICATED_OR_SELECTED


@dataclass(frozen=True, slots=True)
class Idle(Command):
    """``IDLE`` (RFC 2177); the server reads ``DONE`` with ``parse_idle_done``."""

    name: ClassVar[str] = "IDLE"
    states: ClassVar[State] = AUTHENTICATED_OR_SELECTED


# Selected (RFC 9051 §6.4)


@dataclass(frozen=True, slots=True)
class Check(Command):
    name: ClassVar[str] = "CHECK"
    states: ClassVar[State] = State.SELECTED


@dataclass(frozen=True, slots=True)
class Close(Command):
    name: ClassVar[str] = "CLOSE"
    states: ClassVar[State] = State.SELECTED


@dataclass(frozen=True, slots=True)
class Unselect(Command):
    name: ClassVar[str] = "UNSELECT"
    states: ClassVar[State] = State.SELECTED


@dataclass(frozen=True, slots=True)
class Expunge(Command):
    """``EXPUNGE``, or ``UID EXPUNGE uid-set`` (RFC 4315) with ``uid`` set."""

    uid: bool = False
    seqset: SequenceSet | None = None
    name: ClassVar[str] = "EXPUNGE"
    states: ClassVar[State] = State.SELECTED


@dataclass(frozen=True, slots=True)
class Search(Command):
    """``[UID] SEARCH [RETURN (...)] [CHARSET c] keys`` (RFC 9051 §6.4.4, RFC 4731, RFC 5182).

    ``key`` is the whole program (several top-level keys become an
    :class:`And`); text arguments are decoded with ``charset``.
    ``return_opts`` is ``None`` without RETURN (answer ``* SEARCH``), else the
    upper-cased options; ``RETURN ()`` is normalised to ``("ALL",)``.
    """

    uid: bool
    charset: str | None
    key: SearchKey
    return_opts: tuple[str, ...] | None = None
    name: ClassVar[str] = "SEARCH"
    states: ClassVar[State] = State.SELECTED


@dataclass(frozen=True, slots=True)
class Fetch(Command):
    """``[UID] FETCH set items [(CHANGEDSINCE n [VANISHED])]`` (RFC 9051 §6.4.5, RFC 7162).

    Macros (ALL, FAST, FULL) are expanded. For UID FETCH the response must
    include UID even when not asked for; that is left to the session.
    """

    uid: bool
    seqset: SequenceSet
    items: tuple[FetchItem, ...]
    changedsince: int | None = None
    vanished: bool = False
    name: ClassVar[str] = "FETCH"
    states: ClassVar[State] = State.SELECTED


@dataclass(frozen=True, slots=True)
class Store(Command):
    """``[UID] STORE set [(UNCHANGEDSINCE n)] [+|-]FLAGS[.SILENT] flags`` (RFC 7162 §3.1.3)."""

    uid: bool
    seqset: SequenceSet
    mode: StoreMode
    silent: bool
    flags: tuple[str, ...]
    unchangedsince: int | None = None
    name: ClassVar[str] = "STORE"
    states: ClassVar[State] = State.SELECTED


@dataclass(frozen=True, slots=True)
class Copy(Command):
    uid: bool
    seqset: SequenceSet
    mailbox: str
    name: ClassVar[str] = "COPY"
    states: ClassVar[State] = State.SELECTED


@dataclass(frozen=True, slots=True)
class Move(Command):
    """``[UID] MOVE set mailbox`` (RFC 6851)."""

    uid: bool
    seqset: SequenceSet
    mailbox: str
    name: ClassVar[str] = "MOVE"
    states: ClassVar[State] = State.SELECTED


@dataclass(frozen=True, slots=True)
class Sort(Command):
    """``[UID] SORT [RETURN (...)] (criteria) charset keys`` (RFC 5256 §3, RFC 5267 ESORT)."""

    uid: bool
    criteria: tuple[SortCriterion, ...]
    charset: str
    key: SearchKey
    return_opts: tuple[str, ...] | None = None
    name: ClassVar[str] = "SORT"
    states: ClassVar[State] = State.SELECTED


@dataclass(frozen=True, slots=True)
class Thread(Command):
    """``[UID] THREAD algorithm charset keys`` (RFC 5256 §3)."""

    uid: bool
    algorithm: str
    charset: str
    key: SearchKey
    name: ClassVar[str] = "THREAD"
    states: ClassVar[State] = State.SELECTED
