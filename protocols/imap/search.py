"""SEARCH, SORT and THREAD evaluation (RFC 9051 §6.4.4, RFC 5256, RFC 5957,
RFC 5032, RFC 5182, RFC 7162 §3.1.5) and their response lines (RFC 4731).

The session resolves the selected mailbox into :class:`Candidate` records
(sequence number + message record) and hands them over with a
:class:`MessageSource` that reads the stored structure and raw bytes. Keys on
flags, UIDs, sizes, dates and mod-sequences are answered from the record
alone; :func:`needs_content` tells the caller whether anything else will be
read at all. Message content is read lazily, per candidate, and at most once:
the structure once, the header block once (only while the full message has
not been read) and the full message once.
"""

from __future__ import annotations

import email.utils
import re
import unicodedata
from collections.abc import Awaitable, Callable, Collection, Sequence
from dataclasses import dataclass, field
from datetime import date
from typing import Protocol

from storage import mime
from storage.mail import Message

from .commands import (
    And,
    DateKey,
    HeaderKey,
    KeywordKey,
    ModSeqKey,
    Not,
    NumberKey,
    Or,
    SearchKey,
    SeqKey,
    Simple,
    SortCriterion,
    TextKey,
    UidKey,
)
from .response import encode_seqset, quoted

__all__ = [
    "Candidate",
    "MessageSource",
    "ThreadNode",
    "needs_content",
    "render_esearch",
    "render_search",
    "render_thread",
    "result_modseq",
    "saved_result",
    "search",
    "sort",
    "thread",
    "uses_modseq",
]


@dataclass(slots=True)
class Candidate:
    """A message of the selected mailbox as the session sees it.

    ``seq`` is its message sequence number in this session (RFC 9051 §2.3.1.2);
    ``msg`` the stored record (UID, flags, internal date, size, mod-sequence).
    """

    seq: int
    msg: Message


class MessageSource(Protocol):
    """Read access to message content for SEARCH/SORT/THREAD."""

    async def structure(self, msg: Message) -> mime.Message:
        """The parsed MIME structure stored at ingest (cheap: cached)."""
        ...

    async def raw(self, msg: Message, end: int | None = None) -> bytes:
        """The raw message bytes, or only the first ``end`` bytes.

        ``end=structure.headers_end`` reads just the header block.
        """
        ...


@dataclass(slots=True)
class ThreadNode:
    """One node of a THREAD result (RFC 5256 §4).

    ``candidate`` is None for a dummy (a missing parent that groups siblings,
    RFC 5256 §2.2 steps 3 and 5), rendered as a nested list without a number.
    """

    candidate: Candidate | None
    children: list[ThreadNode] = field(default_factory=list)


# ---------------------------------------------------------------------------
# Key compilation
#
# A key is compiled once per command into a tree of predicates. Predicates of
# cost 0 look only at the message record and run synchronously; costlier ones
# are coroutines over a per-candidate _Context that loads content on demand.
# And/Or evaluate cheaper operands first so content is read only for
# candidates that survive the cheap tests.

_FREE = 0  # the message record only
_STRUCTURE = 1  # the parsed structure (SENT* dates)
_HEADER = 2  # the header block
_BODY = 3  # the whole message (BODY, TEXT)

#: System flags for the flag keys of RFC 9051 §6.4.4: (flag, wanted).
_FLAG_KEYS: dict[str, tuple[str, bool]] = {
    "ANSWERED": ("\\answered", True),
    "DELETED": ("\\deleted", True),
    "DRAFT": ("\\draft", True),
    "FLAGGED": ("\\flagged", True),
    "SEEN": ("\\seen", True),
    "UNANSWERED": ("\\answered", False),
    "UNDELETED": ("\\deleted", False),
    "UNDRAFT": ("\\draft", False),
    "UNFLAGGED": ("\\flagged", False),
    "UNSEEN": ("\\seen", False),
}
_HEADER_TEXT_KEYS = {"FROM": "From", "TO": "To", "CC": "Cc", "BCC": "Bcc", "SUBJECT": "Subject"}
_EPOCH_DAY = date(1970, 1, 1).toordinal()
_SECONDS_PER_DAY = 86_400


def _cost(key: SearchKey) -> int:
    if isinstance(key, And):
        return max((_cost(k) for k in key.keys), default=_FREE)
    if isinstance(key, Or):
        return max(_cost(key.left), _cost(key.right))
    if isinstance(key, Not):
        return _cost(key.key)
    if isinstance(key, DateKey):
        return _STRUCTURE if key.name.startswith("SENT") else _FREE
    if isinstance(key, TextKey):
        return _BODY if key.name in ("BODY", "TEXT") else _HEADER
    if isinstance(key, HeaderKey):
        return _HEADER
    return _FREE


def needs_content(key: SearchKey) -> bool:
    """Whether evaluating ``key`` reads message structure or bytes.

    False for keys on flags, sequence numbers, UIDs, sizes, internal dates and
    mod-sequences: the caller then needs no :class:`MessageSource` reads at
    all. True when any text, HEADER or SENT* date key occurs (RFC 9051 §6.4.4).
    """
    return _cost(key) > _FREE


def uses_modseq(key: SearchKey) -> bool:
    """Whether ``key`` contains a MODSEQ key.

    RFC 7162 §3.1.5: only then does the (E)SEARCH response carry the highest
    mod-sequence of the returned messages.
    """
    stack: list[SearchKey] = [key]
    while stack:
        k = stack.pop()
        if isinstance(k, ModSeqKey):
            return True
        if isinstance(k, And):
            stack.extend(k.keys)
        elif isinstance(k, Or):
            stack.extend((k.left, k.right))
        elif isinstance(k, Not):
            stack.append(k.key)
    return False


class _Context:
    """One candidate during one search: content loaded at most once."""

    __slots__ = ("cand", "_source", "_structure", "_header", "_raw", "_header_text", "_body_text")

    def __init__(self, cand: Candidate, source: MessageSource) -> None:
        self.cand = cand
        self._source = source
        self._structure: mime.Message | None = None
        self._header: bytes | None = None
        self._raw: bytes | None = None
        self._header_text: str | None = None
        self._body_text: str | None = None

    async def structure(self) -> mime.Message:
        if self._structure is None:
            self._structure = await self._source.structure(self.cand.msg)
        return self._structure

    async def header(self) -> bytes:
        if self._header is None:
            st = await self.structure()
            if self._raw is not None:
                self._header = self._raw[: st.headers_end]
            else:
                self._header = await self._source.raw(self.cand.msg, st.headers_end)
        return self._header

    async def raw(self) -> bytes:
        if self._raw is None:
            self._raw = await self._source.raw(self.cand.msg)
        return self._raw

    async def header_text(self) -> str:
        """The whole header block, unfolded, encoded-words decoded, case-folded."""
        if self._header_text is None:
            self._header_text = _decoded_header_block(await self.header()).casefold()
        return self._header_text

    async def body_text(self) -> str:
        """Decoded text of every text/* part, case-folded (RFC 9051 §6.4.4 BODY)."""
        if self._body_text is None:
            self._body_text = _body_text(await self.raw(), await self.structure()).casefold()
        return self._body_text


_SyncPred = Callable[[Candidate], bool]
_AsyncPred = Callable[[_Context], Awaitable[bool]]


@dataclass(slots=True)
class _Plan:
    """A compiled key: ``sync`` is set when the cost is free, ``run`` always."""

    cost: int
    run: _AsyncPred
    sync: _SyncPred | None = None


def _free(pred: _SyncPred) -> _Plan:
    async def run(ctx: _Context) -> bool:
        return pred(ctx.cand)

    return _Plan(_FREE, run, pred)


@dataclass(slots=True)
class _Env:
    largest_seq: int
    largest_uid: int
    saved_uids: frozenset[int]
    now: float


def _compile(key: SearchKey, env: _Env) -> _Plan:
    if isinstance(key, And):
        return _compile_and([_compile(k, env) for k in key.keys])
    if isinstance(key, Or):
        return _compile_or(_compile(key.left, env), _compile(key.right, env))
    if isinstance(key, Not):
        return _compile_not(_compile(key.key, env))
    if isinstance(key, Simple):
        return _free(_simple(key.name))
    if isinstance(key, (SeqKey, UidKey)):
        return _free(_set_pred(key, env))
    if isinstance(key, KeywordKey):
        kw = key.keyword.casefold()
        want = key.name == "KEYWORD"
        return _free(lambda c: any(f.casefold() == kw for f in c.msg.flags) == want)
    if isinstance(key, NumberKey):
        return _free(_number_pred(key, env))
    if isinstance(key, ModSeqKey):
        # RFC 7162 §3.1.5: without per-flag mod-sequences, the message's
        # mod-sequence stands for every entry.
        ms = key.modseq
        return _free(lambda c: c.msg.modseq >= ms)
    if isinstance(key, DateKey):
        return _date_plan(key)
    if isinstance(key, TextKey):
        return _text_plan(key)
    if isinstance(key, HeaderKey):
        return _header_plan(key.field, key.value)
    raise TypeError(f"unknown search key {key!r}")


def _compile_and(plans: list[_Plan]) -> _Plan:
    plans = sorted(plans, key=lambda p: p.cost)  # stable: cheap tests first
    cost = plans[-1].cost if plans else _FREE
    if cost == _FREE:
        preds = [p.sync for p in plans if p.sync is not None]
        return _free(lambda c: all(p(c) for p in preds))
    cheap = [p.sync for p in plans if p.sync is not None]
    dear = [p.run for p in plans if p.sync is None]

    async def run(ctx: _Context) -> bool:
        for p in cheap:
            if not p(ctx.cand):
                return False
        for q in dear:
            if not await q(ctx):
                return False
        return True

    return _Plan(cost, run)


def _compile_or(left: _Plan, right: _Plan) -> _Plan:
    if left.cost > right.cost:
        left, right = right, left
    if left.sync is not None and right.sync is not None:
        lp, rp = left.sync, right.sync
        return _free(lambda c: lp(c) or rp(c))
    lr, rr = left.run, right.run

    async def run(ctx: _Context) -> bool:
        return await lr(ctx) or await rr(ctx)

    return _Plan(right.cost, run)


def _compile_not(inner: _Plan) -> _Plan:
    if inner.sync is not None:
        p = inner.sync
        return _free(lambda c: not p(c))
    q = inner.run

    async def run(ctx: _Context) -> bool:
        return not await q(ctx)

    return _Plan(inner.cost, run)


def _simple(name: str) -> _SyncPred:
    name = name.upper()
    if name in ("ALL", "OLD"):
        # This server never reports \Recent (RFC 9051 removed it; RFC 3501
        # §2.3.2 allows a server to have none): every message is OLD.
        return lambda c: True
    if name in ("RECENT", "NEW"):  # NEW = RECENT UNSEEN
        return lambda c: False
    try:
        flag, want = _FLAG_KEYS[name]
    except KeyError:
        raise ValueError(f"unknown search key {name!r}") from None
    return lambda c: any(f.lower() == flag for f in c.msg.flags) == want


def _set_pred(key: SeqKey | UidKey, env: _Env) -> _SyncPred:
    if key.seqset.saved:
        # RFC 5182 §2.1: "$" is the saved result (kept as UIDs), whether it
        # appears as a sequence set or after UID.
        saved = env.saved_uids
        return lambda c: c.msg.uid in saved
    seqset = key.seqset
    if isinstance(key, UidKey):
        largest_uid = env.largest_uid
        return lambda c: seqset.contains(c.msg.uid, largest_uid)
    largest_seq = env.largest_seq
    return lambda c: seqset.contains(c.seq, largest_seq)


def _number_pred(key: NumberKey, env: _Env) -> _SyncPred:
    n = key.value
    name = key.name.upper()
    if name == "LARGER":
        return lambda c: c.msg.size > n
    if name == "SMALLER":
        return lambda c: c.msg.size < n
    # RFC 5032 §3: age is now - INTERNALDATE in seconds. OLDER includes the
    # boundary so that OLDER n and YOUNGER n partition the mailbox.
    now = env.now
    if name == "OLDER":
        return lambda c: now - c.msg.internal_date >= n
    if name == "YOUNGER":
        return lambda c: now - c.msg.internal_date < n
    raise ValueError(f"unknown search key {name!r}")


def _compare_day(name: str, day: int, wanted: int) -> bool:
    if name.endswith("BEFORE"):
        return day < wanted
    if name.endswith("ON"):
        return day == wanted
    return day >= wanted  # SINCE


def _date_plan(key: DateKey) -> _Plan:
    name = key.name.upper()
    wanted = key.date.toordinal() - _EPOCH_DAY
    if name not in ("BEFORE", "ON", "SINCE", "SENTBEFORE", "SENTON", "SENTSINCE"):
        raise ValueError(f"unknown search key {name!r}")
    if not name.startswith("SENT"):
        # RFC 9051 §6.4.4: the internal date's day "disregarding time and
        # timezone": the day as written, in the date's own zone.
        return _free(lambda c: _compare_day(name, (c.msg.internal_date + c.msg.zone * 60) // _SECONDS_PER_DAY, wanted))

    async def run(ctx: _Context) -> bool:
        day = _sent_day(await ctx.structure(), ctx.cand.msg)
        return _compare_day(name, day, wanted)

    return _Plan(_STRUCTURE, run)


def _sent_day(st: mime.Message, msg: Message) -> int:
    """Day number (since 1970-01-01) of the Date: header "disregarding time and
    timezone" (RFC 9051 §6.4.4 SENT*): the calendar date as written."""
    if st.envelope.date:
        try:
            t = email.utils.parsedate_tz(st.envelope.date[:256])
            if t is not None:
                return date(t[0], t[1], t[2]).toordinal() - _EPOCH_DAY
        except Exception:  # email.utils and date() raise on some garbage
            pass
    ts = st.sent_date if st.sent_date is not None else msg.internal_date
    return int(ts // _SECONDS_PER_DAY)


def _text_plan(key: TextKey) -> _Plan:
    name = key.name.upper()
    needle = key.value.casefold()
    if name == "BODY":

        async def body(ctx: _Context) -> bool:
            return needle in await ctx.body_text()

        return _Plan(_BODY, body)
    if name == "TEXT":

        async def text(ctx: _Context) -> bool:
            await ctx.raw()  # both halves are needed: one read, headers sliced from it
            return needle in await ctx.header_text() or needle in await ctx.body_text()

        return _Plan(_BODY, text)
    try:
        field_name = _HEADER_TEXT_KEYS[name]
    except KeyError:
        raise ValueError(f"unknown search key {name!r}") from None
    return _header_plan(field_name, key.value)


def _header_plan(field_name: str, value: str) -> _Plan:
    needle = value.casefold()

    async def run(ctx: _Context) -> bool:
        # RFC 9051 §6.4.4: the field must exist; an empty string matches any
        # message that has it. Every occurrence of the field counts.
        values = _field_values(await ctx.header(), field_name)
        return any(needle in v.casefold() for v in values)

    return _Plan(_HEADER, run)


_FIELD_START = re.compile(rb"\r\n(?![ \t])")
_FOLD = re.compile(r"\r?\n(?=[ \t])")


def _field_values(header: bytes, name: str) -> list[str]:
    """Every value of field ``name``, unfolded, encoded-words decoded (RFC 2047)."""
    block = mime.header_fields(header, [name], False)[:-2]  # drop the final empty line
    if not block:
        return []
    out = []
    for field_bytes in _FIELD_START.split(block):
        _, sep, value = field_bytes.partition(b":")
        if sep:
            text = value.replace(b"\r\n", b"").strip(b" \t\r\n").decode("utf-8", "surrogateescape")
            out.append(mime.decode_words(text))
    return out


def _decoded_header_block(header: bytes) -> str:
    return mime.decode_words(_FOLD.sub("", header.decode("utf-8", "surrogateescape")))


def _body_text(raw: bytes, st: mime.Message) -> str:
    """Text of all text/* leaves; encapsulated messages contribute their header
    block and their text parts (they are part of the body's text)."""
    out: list[str] = []
    stack: list[mime.Part] = [st.root]
    while stack:
        p = stack.pop()
        if p.children:
            stack.extend(reversed(p.children))
        elif p.message is not None:
            inner = p.message.root
            out.append(_decoded_header_block(raw[inner.header_start : inner.body_start]))
            stack.append(inner)
        elif p.type == "text":
            out.append(mime.part_text(raw, p))
    return "\n".join(out)


async def search(
    key: SearchKey,
    candidates: list[Candidate],
    source: MessageSource,
    *,
    largest_seq: int,
    largest_uid: int,
    saved_uids: Collection[int] | None,
    now: float,
) -> list[Candidate]:
    """The candidates matching ``key``, in the given order (RFC 9051 §6.4.4).

    Args:
        key: the search program (top-level keys are an :class:`And`).
        candidates: the messages to test, usually the whole mailbox.
        source: content reads; not called at all when
            :func:`needs_content` is False.
        largest_seq: what ``*`` means in a sequence set (the mailbox size).
        largest_uid: what ``*`` means after ``UID`` (the largest UID in use).
        saved_uids: the SEARCHRES saved result for ``$`` (RFC 5182 §2.1);
            None (nothing saved) matches no message.
        now: the current time (POSIX seconds) for OLDER/YOUNGER (RFC 5032).

    Raises:
        ValueError: a key name unknown to this module.
        Whatever ``source`` raises.
    """
    env = _Env(largest_seq, largest_uid, frozenset(saved_uids or ()), now)
    plan = _compile(key, env)
    if plan.sync is not None:
        pred = plan.sync
        return [c for c in candidates if pred(c)]
    out = []
    for c in candidates:
        if await plan.run(_Context(c, source)):
            out.append(c)
    return out


def saved_result(ids: Sequence[int], return_opts: Sequence[str]) -> list[int]:
    """What ``RETURN (SAVE ...)`` stores (RFC 5182 §2.1).

    With MIN and/or MAX beside SAVE only those are saved; otherwise the whole
    result. ``ids`` must be UIDs (the saved result survives expunges).
    """
    opts = {o.upper() for o in return_opts}
    if not ids or not opts & {"MIN", "MAX"} or "ALL" in opts or "COUNT" in opts:
        return sorted(set(ids))
    out = set()
    if "MIN" in opts:
        out.add(min(ids))
    if "MAX" in opts:
        out.add(max(ids))
    return sorted(out)


# ---------------------------------------------------------------------------
# SORT (RFC 5256 §3, RFC 5957)

_ORDERED_KEYS = frozenset({"ARRIVAL", "CC", "DATE", "FROM", "SIZE", "SUBJECT", "TO", "DISPLAYFROM", "DISPLAYTO"})


def _fold(s: str) -> str:
    # Approximates the i;unicode-casemap comparator (RFC 5051): case-folded,
    # then decomposed so accented letters sort next to their base letter.
    return unicodedata.normalize("NFKD", s.casefold())


def _first_address(addrs: list[mime.Address] | None) -> mime.Address | None:
    # Group start/end markers (RFC 3501 §7.4.2: host NIL) are not addresses.
    for a in addrs or ():
        if a.host is not None and a.mailbox is not None:
            return a
    return None


def _addr_mailbox(addrs: list[mime.Address] | None) -> str:
    """RFC 5256 §3 CC/FROM/TO: the addr-mailbox (local part) of the first address."""
    a = _first_address(addrs)
    return _fold(a.mailbox or "") if a is not None else ""


def _display(addrs: list[mime.Address] | None) -> str:
    """RFC 5957 §3: the decoded display-name of the first address, else its addr-spec."""
    a = _first_address(addrs)
    if a is None:
        return ""
    name = mime.decode_words(a.name).strip() if a.name else ""
    if not name:
        name = f"{a.mailbox}@{a.host}" if a.host else (a.mailbox or "")
    return _fold(name)


def _sent_time(st: mime.Message, msg: Message) -> float:
    """RFC 5256 §2.2 sent date: the Date: header, else the internal date."""
    return st.sent_date if st.sent_date is not None else float(msg.internal_date)


async def _structures(candidates: Sequence[Candidate], source: MessageSource) -> list[mime.Message]:
    return [await source.structure(c.msg) for c in candidates]


async def sort(
    criteria: Sequence[SortCriterion], candidates: list[Candidate], source: MessageSource
) -> list[Candidate]:
    """Order ``candidates`` by ``criteria`` (RFC 5256 §3; DISPLAYFROM/DISPLAYTO RFC 5957).

    Each criterion may be REVERSE; messages equal on every criterion keep
    ascending sequence-number order. Strings compare case-folded; a missing
    value is the empty string. The structure of each candidate is read at most
    once, and not at all for ARRIVAL/SIZE-only sorts.

    Raises:
        ValueError: an unknown sort key.
    """
    for crit in criteria:
        if crit.key.upper() not in _ORDERED_KEYS:
            raise ValueError(f"unknown sort key {crit.key!r}")
    order = sorted(range(len(candidates)), key=lambda i: candidates[i].seq)
    structural = any(crit.key.upper() not in ("ARRIVAL", "SIZE") for crit in criteria)
    sts = await _structures(candidates, source) if structural else []

    def keyfunc(name: str) -> Callable[[int], float | str]:
        if name == "ARRIVAL":
            return lambda i: candidates[i].msg.internal_date
        if name == "SIZE":
            return lambda i: candidates[i].msg.size
        if name == "DATE":
            return lambda i: _sent_time(sts[i], candidates[i].msg)
        if name == "SUBJECT":
            return lambda i: _fold(sts[i].base_subject)
        if name == "FROM":
            return lambda i: _addr_mailbox(sts[i].envelope.from_)
        if name == "TO":
            return lambda i: _addr_mailbox(sts[i].envelope.to)
        if name == "CC":
            return lambda i: _addr_mailbox(sts[i].envelope.cc)
        if name == "DISPLAYFROM":
            return lambda i: _display(sts[i].envelope.from_)
        return lambda i: _display(sts[i].envelope.to)  # DISPLAYTO

    # Stable sorts from the least significant criterion up; Python keeps equal
    # items in order even with reverse=True, so ties stay in sequence order.
    for crit in reversed(criteria):
        order.sort(key=keyfunc(crit.key.upper()), reverse=crit.reverse)
    return [candidates[i] for i in order]


# ---------------------------------------------------------------------------
# THREAD (RFC 5256 §3 THREAD=ORDEREDSUBJECT, THREAD=REFERENCES)


async def thread(algorithm: str, candidates: list[Candidate], source: MessageSource) -> list[ThreadNode]:
    """Thread ``candidates`` with ``ORDEREDSUBJECT`` or ``REFERENCES`` (RFC 5256 §3).

    Returns the top-level threads in order; render with :func:`render_thread`.

    Raises:
        ValueError: an unknown algorithm.
    """
    name = algorithm.upper()
    if name not in ("ORDEREDSUBJECT", "REFERENCES"):
        raise ValueError(f"unknown thread algorithm {algorithm!r}")
    sts = await _structures(candidates, source)
    items = [_Item(c, st) for c, st in zip(candidates, sts, strict=True)]
    if name == "ORDEREDSUBJECT":
        return _ordered_subject(items)
    return _references(items)


@dataclass(slots=True)
class _Item:
    cand: Candidate
    st: mime.Message
    sort_key: tuple[float, int] = (0.0, 0)
    subject: str = ""

    def __post_init__(self) -> None:
        self.sort_key = (_sent_time(self.st, self.cand.msg), self.cand.seq)
        self.subject = _fold(self.st.base_subject)


def _ordered_subject(items: list[_Item]) -> list[ThreadNode]:
    """RFC 5256 §3 ORDEREDSUBJECT: group by base subject, sort by sent date;
    later messages of a group are children of its first one; threads ordered
    by the sent date of their first message."""
    groups: dict[str, list[_Item]] = {}
    for it in sorted(items, key=lambda it: it.sort_key):
        groups.setdefault(it.subject, []).append(it)
    threads = sorted(groups.values(), key=lambda g: g[0].sort_key)
    return [ThreadNode(g[0].cand, [ThreadNode(it.cand) for it in g[1:]]) for g in threads]


class _Container:
    """A node of the REFERENCES algorithm: a message or a dummy (RFC 5256 §3)."""

    __slots__ = ("item", "parent", "children")

    def __init__(self, item: _Item | None = None) -> None:
        self.item = item
        self.parent: _Container | None = None
        self.children: list[_Container] = []


def _would_loop(parent: _Container, child: _Container) -> bool:
    """Whether making ``child`` a child of ``parent`` creates a cycle."""
    if parent is child:
        return True
    if not child.children:
        return False  # the common case: a fresh container has no descendants
    p: _Container | None = parent
    while p is not None:
        if p is child:
            return True
        p = p.parent
    return False


def _unlink(c: _Container) -> None:
    if c.parent is not None:
        c.parent.children.remove(c)
        c.parent = None


def _link(parent: _Container, child: _Container) -> None:
    child.parent = parent
    parent.children.append(child)


_REPLY_LEADER = re.compile(r"(?:\[[^\[\]]*\][ \t]*)*(?:re|fwd?)[ \t]*(?:\[[^\[\]]*\][ \t]*)?:", re.I)
_BLOB = re.compile(r"\[[^\[\]]*\][ \t]*")
_SPACES = re.compile(r"[ \t\r\n]+")


def _is_reply_or_forward(subject: str | None) -> bool:
    """RFC 5256 §2.1: whether extracting the base subject removed a
    ``Re:``/``Fwd:`` leader, a ``(fwd)`` trailer or a ``[fwd: ...]`` wrapper."""
    if not subject:
        return False
    s = _SPACES.sub(" ", mime.decode_words(subject)[: mime.MAX_SUBJECT_CHARS]).rstrip(" \t")
    if s[-5:].lower() == "(fwd)":  # step 2
        return True
    pos = 0
    while True:  # steps 3-5: blobs are skipped unless they are all that is left
        if s.startswith((" ", "\t"), pos):
            pos += 1
            continue
        if _REPLY_LEADER.match(s, pos):
            return True
        b = _BLOB.match(s, pos)
        if b is None or b.end() >= len(s):
            break
        pos = b.end()
    return s[pos : pos + 5].lower() == "[fwd:" and s.endswith("]")  # step 6


def _references(items: list[_Item]) -> list[ThreadNode]:
    """RFC 5256 §3 THREAD=REFERENCES, steps 1 to 6."""
    # Step 1: containers by Message-ID, linked along References.
    by_id: dict[str, _Container] = {}
    containers: list[_Container] = []
    for it in items:
        mid = it.st.message_id
        c = by_id.get(mid) if mid else None
        if c is None or c.item is not None:
            # No Message-ID, or a duplicate of one already threaded: a unique
            # id (a container not in the table).
            c = _Container(it)
            if mid and mid not in by_id:
                by_id[mid] = c
        else:
            c.item = it  # fills a dummy created by an earlier reference
        containers.append(c)
        # 1A: link the references parent -> child, never changing a link that
        # exists and never creating a loop.
        refs: list[_Container] = []
        for ref in it.st.references:
            rc = by_id.get(ref)
            if rc is None:
                rc = by_id[ref] = _Container()
            refs.append(rc)
        for parent, child in zip(refs, refs[1:]):
            if child.parent is None and not _would_loop(parent, child):
                _link(parent, child)
        # 1B: the last reference is the parent, replacing any earlier guess.
        _unlink(c)
        if refs and not _would_loop(refs[-1], c):
            _link(refs[-1], c)

    # Step 2: the root set.
    seen: set[int] = set()
    roots: list[_Container] = []
    for c in [*containers, *by_id.values()]:
        if c.parent is None and id(c) not in seen:
            seen.add(id(c))
            roots.append(c)

    roots = _prune(roots)  # step 3

    # Step 4: sort the root set by sent date; a dummy's children are sorted
    # first and it sorts as its first child. After step 3 a dummy holds
    # only messages.
    def key(c: _Container) -> tuple[float, int]:
        return c.item.sort_key if c.item is not None else key(c.children[0])

    for c in roots:
        if c.item is None:
            c.children.sort(key=key)
    roots.sort(key=key)

    roots = _merge_subjects(roots)  # step 5
    _sort_siblings(roots)  # step 6
    return _to_nodes(roots)


def _prune(roots: list[_Container]) -> list[_Container]:
    """RFC 5256 §3 step 3: drop childless dummies; replace other dummies by
    their children, except that at the top level only a single child is
    promoted. Children are pruned before their parents (iteratively: reply
    chains can be long)."""
    order: list[_Container] = []
    stack = list(roots)
    while stack:
        c = stack.pop()
        order.append(c)
        stack.extend(c.children)
    for c in reversed(order):  # every child before its parent
        kept: list[_Container] = []
        for ch in c.children:
            if ch.item is None:
                kept.extend(ch.children)  # empty when the dummy has none
            else:
                kept.append(ch)
        for ch in kept:
            ch.parent = c
        c.children = kept
    out: list[_Container] = []
    for c in roots:
        if c.item is None and len(c.children) <= 1:
            for ch in c.children:
                ch.parent = None
            out.extend(c.children)
        else:
            out.append(c)
    return out


def _merge_subjects(roots: list[_Container]) -> list[_Container]:
    """RFC 5256 §3 step 5: gather top-level threads with the same base subject."""

    def subject(c: _Container) -> str:
        it = c.item if c.item is not None else (c.children[0].item if c.children else None)
        return it.subject if it is not None else ""

    def reply(c: _Container) -> bool:
        return c.item is not None and _is_reply_or_forward(c.item.st.envelope.subject)

    table: dict[str, _Container] = {}
    for c in roots:  # 5B
        s = subject(c)
        if not s:
            continue
        old = table.get(s)
        if old is None or (old.item is not None and (c.item is None or (reply(old) and not reply(c)))):
            table[s] = c
    removed: set[int] = set()
    added: list[_Container] = []
    for c in roots:  # 5C
        if id(c) in removed:
            continue  # already placed under a new dummy as a table entry
        s = subject(c)
        if not s:
            continue
        t = table[s]
        if t is c:
            continue
        if t.item is None and c.item is None:
            for ch in c.children:
                _link(t, ch)
            c.children = []
            removed.add(id(c))
        elif t.item is None or (reply(c) and not reply(t)):
            _link(t, c)
            removed.add(id(c))
        else:
            dummy = _Container()
            _link(dummy, t)
            _link(dummy, c)
            removed.update((id(t), id(c)))
            added.append(dummy)
            table[s] = dummy
    return [c for c in roots if id(c) not in removed] + [c for c in added if id(c) not in removed]


def _sort_siblings(roots: list[_Container]) -> None:
    """RFC 5256 §3 step 6: sort every sibling set by sent date, deepest first;
    a dummy sorts as its first child."""
    order: list[_Container] = []
    stack = list(roots)
    while stack:
        c = stack.pop()
        order.append(c)
        stack.extend(c.children)
    keys: dict[int, tuple[float, int]] = {}

    def key(c: _Container) -> tuple[float, int]:
        return keys[id(c)]

    for c in reversed(order):
        c.children.sort(key=key)
        if c.item is not None:
            keys[id(c)] = c.item.sort_key
        else:
            keys[id(c)] = keys[id(c.children[0])] if c.children else (0.0, 0)
    roots.sort(key=key)


def _to_nodes(roots: list[_Container]) -> list[ThreadNode]:
    top = [ThreadNode(c.item.cand if c.item else None) for c in roots]
    stack = list(zip(roots, top))
    while stack:
        c, node = stack.pop()
        for ch in c.children:
            child = ThreadNode(ch.item.cand if ch.item else None)
            node.children.append(child)
            stack.append((ch, child))
    return top


def render_thread(nodes: list[ThreadNode], uid: bool) -> bytes:
    """The data of ``* THREAD`` (RFC 5256 §4): ``(2)(3 6 (4 23)(44 7 96))``.

    A chain of only children is one list; a node with several children is
    followed by one nested list per child. Dummies contribute no number.
    Numbers are UIDs when ``uid`` is set, else sequence numbers.
    """
    live = _live(nodes)
    out = bytearray()
    # Work items: a node to open as a thread-list, or a ")" to emit.
    stack: list[ThreadNode | None] = [n for n in reversed(nodes) if id(n) in live]
    while stack:
        node = stack.pop()
        if node is None:
            out += b")"
            continue
        out += b"("
        first = True
        while True:
            if node.candidate is not None:
                if not first:
                    out += b" "
                c = node.candidate
                out += b"%d" % (c.msg.uid if uid else c.seq)
                first = False
            kids = [k for k in node.children if id(k) in live]
            if len(kids) == 1:
                node = kids[0]
                continue
            break
        if kids and not first:
            out += b" "
        stack.append(None)
        stack.extend(reversed(kids))
    return bytes(out)


def _live(nodes: list[ThreadNode]) -> set[int]:
    """Ids of the nodes whose subtree holds a message (empty dummies are not rendered)."""
    order: list[ThreadNode] = []
    stack = list(nodes)
    while stack:
        n = stack.pop()
        order.append(n)
        stack.extend(n.children)
    live: set[int] = set()
    for n in reversed(order):  # children before parents
        if n.candidate is not None or any(id(k) in live for k in n.children):
            live.add(id(n))
    return live


# ---------------------------------------------------------------------------
# Responses


def render_search(ids: Sequence[int], modseq: int | None) -> bytes:
    """``* SEARCH 2 5 (MODSEQ 917162500)`` without CRLF (RFC 9051 §7.3.4 IMAP4rev1
    SEARCH response, RFC 7162 §3.1.5).

    ``modseq`` is the highest mod-sequence of the returned messages, given
    only when the search used a MODSEQ key; it is left out when nothing
    matched (RFC 7162 §3.1.5).
    """
    out = b"* SEARCH"
    if ids:
        out += b" " + b" ".join(b"%d" % i for i in ids)
        if modseq is not None:
            out += b" (MODSEQ %d)" % modseq
    return out


def result_modseq(found: Sequence[Candidate], return_opts: Sequence[str] | None) -> int | None:
    """The MODSEQ a SEARCH with a MODSEQ key reports (RFC 7162 §3.1.5,
    RFC 4731 §3.2): with only MIN and/or MAX asked for, that of the message(s)
    returned (the higher of the two for both); otherwise the highest of all
    found. None when nothing matched."""
    if not found:
        return None
    opts = {o.upper() for o in return_opts or ()} or {"ALL"}
    extremes = opts & {"MIN", "MAX"}
    if not extremes or opts & {"ALL", "COUNT"}:
        return max(c.msg.modseq for c in found)
    picked = []
    if "MIN" in extremes:
        picked.append(min(found, key=lambda c: c.msg.uid))
    if "MAX" in extremes:
        picked.append(max(found, key=lambda c: c.msg.uid))
    return max(c.msg.modseq for c in picked)


def render_esearch(
    tag: bytes, uid: bool, ids: Sequence[int], return_opts: Sequence[str], modseq: int | None
) -> bytes:
    """``* ESEARCH (TAG "a") UID MIN 1 MAX 9 COUNT 3 ALL 1:3,9`` without CRLF.

    RFC 4731 §3.1: MIN, MAX and ALL are left out when nothing matched; COUNT
    is always given when asked for; an empty option list means ALL. ALL is
    the compressed sequence set. ``modseq`` (RFC 7162 §3.1.5, RFC 4731 §3.2)
    is appended as ``MODSEQ n`` when given and something matched.

    Returns ``b""`` when ``SAVE`` is the only option: RFC 5182 §2.1 suppresses
    the response then, and the caller must send nothing.
    """
    opts = {o.upper() for o in return_opts} or {"ALL"}
    if opts == {"SAVE"}:
        return b""
    out = [b"* ESEARCH (TAG " + quoted(tag) + b")"]
    if uid:
        out.append(b"UID")
    if ids:
        if "MIN" in opts:
            out.append(b"MIN %d" % min(ids))
        if "MAX" in opts:
            out.append(b"MAX %d" % max(ids))
    if "COUNT" in opts:
        out.append(b"COUNT %d" % len(ids))
    if ids:
        if "ALL" in opts:
            out.append(b"ALL " + encode_seqset(ids))
        if modseq is not None:
            out.append(b"MODSEQ %d" % modseq)
    return b" ".join(out)
