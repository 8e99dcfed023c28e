"""IMAP response encoding: strings, lists, response lines, ENVELOPE, BODYSTRUCTURE.

Pure functions from values to wire bytes (RFC 9051 §7, §9; RFC 3501 §7).
ENVELOPE and BODYSTRUCTURE are rendered from a duck-typed model (the storage
MIME parser's dataclasses) described by :class:`AddressLike`,
:class:`EnvelopeLike`, :class:`PartLike` and :class:`MessageLike`; nothing
from ``storage`` is imported.

String choice: a value goes out quoted when it is short and safe (no NUL,
CR, LF; 7-bit, or valid UTF-8 when the client enabled ``UTF8=ACCEPT``,
RFC 6855 §3), else as a literal ``{n}``. ``literal8`` ``~{n}`` is only for
BINARY fetch data that contains NUL (RFC 3516 §4.2).
"""

from __future__ import annotations

import re
import urllib.parse
from collections.abc import Iterable, Sequence
from typing import Protocol

__all__ = [
    "QUOTED_MAX",
    "astring",
    "binary",
    "code_appenduid",
    "code_copyuid",
    "code_highestmodseq",
    "code_permanentflags",
    "continuation",
    "encode_flags",
    "encode_seqset",
    "literal",
    "nstring",
    "paren",
    "quoted",
    "render_address_list",
    "render_bodystructure",
    "render_envelope",
    "response_code",
    "string",
    "tagged",
    "untagged",
    "untagged_status",
]

#: Longer strings go out as literals: keeps lines short for clients with
#: line-length limits and avoids scanning large values for quoting.
QUOTED_MAX = 1024

_UNSAFE_7BIT = re.compile(rb"[\x00\r\n\x80-\xff]")
_UNSAFE_UTF8 = re.compile(rb"[\x00\r\n]")
_ESCAPE = re.compile(rb'(["\\])')
_CRLF = re.compile(rb"[\r\n]+")
# RFC 5322 §2.2.3 unfolding: CRLF followed by WSP.
_FOLD = re.compile(r"\r?\n(?=[ \t])")
# RFC 2231 §7 attribute-char beyond what urllib.parse.quote always keeps.
_RFC2231_SAFE = "!#$&+^`{|}"


# --- the structural model (implemented by storage/mime.py) ------------------


class AddressLike(Protocol):
    """RFC 9051 §9 ``address``. A group start has ``host`` None and the group
    name in ``mailbox``; a group end has both ``mailbox`` and ``host`` None."""

    @property
    def name(self) -> str | None: ...
    @property
    def adl(self) -> str | None: ...
    @property
    def mailbox(self) -> str | None: ...
    @property
    def host(self) -> str | None: ...


class EnvelopeLike(Protocol):
    """Raw header values (unfolded here) and parsed address lists."""

    @property
    def date(self) -> str | None: ...
    @property
    def subject(self) -> str | None: ...
    @property
    def from_(self) -> Sequence[AddressLike] | None: ...
    @property
    def sender(self) -> Sequence[AddressLike] | None: ...
    @property
    def reply_to(self) -> Sequence[AddressLike] | None: ...
    @property
    def to(self) -> Sequence[AddressLike] | None: ...
    @property
    def cc(self) -> Sequence[AddressLike] | None: ...
    @property
    def bcc(self) -> Sequence[AddressLike] | None: ...
    @property
    def in_reply_to(self) -> str | None: ...
    @property
    def message_id(self) -> str | None: ...


class MessageLike(Protocol):
    """An encapsulated message (message/rfc822 or message/global)."""

    @property
    def envelope(self) -> EnvelopeLike: ...

    @property
    def root(self) -> PartLike: ...


class PartLike(Protocol):
    """One MIME part. ``size`` is the body's octet count, ``lines`` its line count."""

    @property
    def type(self) -> str: ...
    @property
    def subtype(self) -> str: ...
    @property
    def params(self) -> Sequence[tuple[str, str]]: ...
    @property
    def id(self) -> str | None: ...
    @property
    def description(self) -> str | None: ...
    @property
    def encoding(self) -> str | None: ...
    @property
    def md5(self) -> str | None: ...
    @property
    def disposition(self) -> tuple[str, Sequence[tuple[str, str]]] | None: ...
    @property
    def language(self) -> Sequence[str] | None: ...
    @property
    def location(self) -> str | None: ...
    @property
    def lines(self) -> int: ...
    @property
    def children(self) -> Sequence[PartLike]: ...
    @property
    def message(self) -> MessageLike | None: ...

    @property
    def size(self) -> int: ...


# --- strings ----------------------------------------------------------------


def _bytes(value: bytes | str) -> bytes:
    if isinstance(value, str):
        try:
            # Header values decoded with surrogateescape get their raw
            # octets back.
            return value.encode("utf-8", "surrogateescape")
        except UnicodeEncodeError:
            return value.encode("utf-8", "replace")
    return bytes(value)


def quoted(value: bytes | str) -> bytes:
    """``"..."`` with ``\\`` and ``"`` escaped (RFC 9051 §4.3).

    Raises:
        ValueError: the value contains NUL, CR or LF (use a literal).
    """
    data = _bytes(value)
    if _UNSAFE_UTF8.search(data):
        raise ValueError("NUL, CR and LF cannot be quoted")
    return b'"' + _ESCAPE.sub(rb"\\\1", data) + b'"'


def literal(value: bytes | str, *, binary: bool = False) -> bytes:
    """``{n}\\r\\n`` followed by the data; ``~{n}`` (literal8) when ``binary``."""
    data = _bytes(value)
    return b"%s{%d}\r\n%s" % (b"~" if binary else b"", len(data), data)


def string(value: bytes | str, *, utf8: bool = False) -> bytes:
    """A quoted string when safe and short, else a literal.

    ``utf8``: the client enabled UTF8=ACCEPT (or IMAP4rev2), so valid UTF-8
    may be quoted (RFC 9051 §4.3); otherwise 8-bit data goes in a literal.
    """
    data = _bytes(value)
    if len(data) <= QUOTED_MAX:
        if utf8:
            if not _UNSAFE_UTF8.search(data):
                try:
                    data.decode("utf-8")
                except UnicodeDecodeError:
                    pass
                else:
                    return b'"' + _ESCAPE.sub(rb"\\\1", data) + b'"'
        elif not _UNSAFE_7BIT.search(data):
            return b'"' + _ESCAPE.sub(rb"\\\1", data) + b'"'
    return literal(data)


def astring(value: bytes | str, *, utf8: bool = False) -> bytes:
    """An astring for responses (mailbox names, ...): always a string, never an
    atom, so a name such as ``NIL`` cannot be misread."""
    return string(value, utf8=utf8)


def nstring(value: bytes | str | None, *, utf8: bool = False) -> bytes:
    """``NIL`` for None, else :func:`string`."""
    return b"NIL" if value is None else string(value, utf8=utf8)


def binary(data: bytes) -> bytes:
    """FETCH BINARY data: literal8 when it contains NUL, else a literal (RFC 3516 §4.2)."""
    return literal(data, binary=b"\x00" in data)


def paren(items: Iterable[bytes]) -> bytes:
    """``(a b c)``."""
    return b"(" + b" ".join(items) + b")"


def encode_flags(flags: Iterable[str]) -> bytes:
    """A flag list ``(\\Seen $Forwarded)``; flags are atoms (``\\*`` allowed)."""
    return b"(" + " ".join(flags).encode("ascii") + b")"


def encode_seqset(numbers: Iterable[int]) -> bytes:
    """Compress numbers into a sequence set: ``{1,2,3,4,5,7,9,10}`` -> ``1:5,7,9:10``.

    Raises:
        ValueError: no numbers (an empty sequence set is not valid syntax),
            or a number below 1.
    """
    nums = sorted(set(numbers))
    if not nums:
        raise ValueError("empty sequence set")
    if nums[0] < 1:
        raise ValueError("sequence numbers start at 1")
    out: list[bytes] = []
    start = prev = nums[0]
    for n in nums[1:]:
        if n != prev + 1:
            out.append(b"%d" % start if start == prev else b"%d:%d" % (start, prev))
            start = n
        prev = n
    out.append(b"%d" % start if start == prev else b"%d:%d" % (start, prev))
    return b",".join(out)


# --- response lines ---------------------------------------------------------


def _part(p: bytes | str | int) -> bytes:
    if isinstance(p, int):
        return b"%d" % p
    if isinstance(p, str):
        return p.encode("utf-8")
    return p


def _text(text: str | bytes) -> bytes:
    # resp-text never contains CR or LF (RFC 9051 §9 TEXT-CHAR); never empty
    # (RFC 3501 requires at least one character).
    data = _CRLF.sub(b" ", _bytes(text)).strip()
    return data or b"done"


def untagged(*parts: bytes | str | int) -> bytes:
    """``* part part ...\\r\\n``: ``untagged(3, b"EXISTS")`` is ``* 3 EXISTS``.

    Parts are joined with spaces as given (ints in decimal); build strings
    and lists with the helpers above.
    """
    return b"* " + b" ".join(_part(p) for p in parts) + b"\r\n"


def untagged_status(status: str, code: bytes | None, text: str | bytes) -> bytes:
    """``* OK [code] text`` (also NO, BAD, BYE, PREAUTH)."""
    return b"* " + _status_line(status, code, text)


def tagged(tag: bytes, status: str, code: bytes | None, text: str | bytes) -> bytes:
    """``tag OK [code] text``; ``code`` is the bracket content (see ``code_*``)."""
    return tag + b" " + _status_line(status, code, text)


def _status_line(status: str, code: bytes | None, text: str | bytes) -> bytes:
    head = status.encode("ascii")
    if code:
        head += b" [" + _CRLF.sub(b" ", code) + b"]"
    return head + b" " + _text(text) + b"\r\n"


def continuation(text: str | bytes = b"") -> bytes:
    """``+ text`` (a command continuation request, RFC 9051 §7.6)."""
    data = _CRLF.sub(b" ", _bytes(text))
    return b"+ " + data + b"\r\n" if data else b"+ \r\n"


def response_code(name: str, *args: bytes | str | int) -> bytes:
    """A response code: ``response_code("UIDNEXT", 5)`` is ``UIDNEXT 5``."""
    return b" ".join([name.encode("ascii"), *(_part(a) for a in args)])


def code_appenduid(uidvalidity: int, uids: Iterable[int]) -> bytes:
    """``APPENDUID v uid-set`` (RFC 4315 §3; a set for MULTIAPPEND)."""
    return b"APPENDUID %d %s" % (uidvalidity, encode_seqset(uids))


def code_copyuid(uidvalidity: int, source: Sequence[int], dest: Sequence[int]) -> bytes:
    """``COPYUID v source-set dest-set`` (RFC 4315 §3).

    The two sets pair up in order, so each is compressed without sorting
    when the caller passes them in matching order: pass sorted pairs.
    """
    return b"COPYUID %d %s %s" % (uidvalidity, _ordered_set(source), _ordered_set(dest))


def _ordered_set(nums: Sequence[int]) -> bytes:
    # Keeps the caller's order (pairs must line up); compresses ascending runs.
    if not nums:
        raise ValueError("empty sequence set")
    out: list[bytes] = []
    start = prev = nums[0]
    for n in nums[1:]:
        if n != prev + 1:
            out.append(b"%d" % start if start == prev else b"%d:%d" % (start, prev))
            start = n
        prev = n
    out.append(b"%d" % start if start == prev else b"%d:%d" % (start, prev))
    return b",".join(out)


def code_highestmodseq(modseq: int) -> bytes:
    """``HIGHESTMODSEQ n`` (RFC 7162 §3.1.2.1)."""
    return b"HIGHESTMODSEQ %d" % modseq


def code_permanentflags(flags: Iterable[str]) -> bytes:
    """``PERMANENTFLAGS (...)``; include ``\\*`` when keywords can be created."""
    return b"PERMANENTFLAGS " + encode_flags(flags)


# --- ENVELOPE (RFC 9051 §7.5.2, §9 envelope) --------------------------------


def _header(value: str | None, utf8: bool) -> bytes:
    if value is None:
        return b"NIL"
    return string(_FOLD.sub("", value), utf8=utf8)


def _address(a: AddressLike, utf8: bool) -> bytes:
    return b"(%s %s %s %s)" % (
        nstring(a.name, utf8=utf8),
        nstring(a.adl, utf8=utf8),
        nstring(a.mailbox, utf8=utf8),
        nstring(a.host, utf8=utf8),
    )


def render_address_list(addresses: Sequence[AddressLike] | None, *, utf8: bool = False) -> bytes:
    """``((name adl mailbox host)(...))`` or ``NIL``; addresses are not space-separated."""
    if not addresses:
        return b"NIL"
    return b"(" + b"".join(_address(a, utf8) for a in addresses) + b")"


def render_envelope(env: EnvelopeLike, *, utf8: bool = False) -> bytes:
    """The ENVELOPE structure (RFC 9051 §7.5.2).

    Sender and Reply-To default to From when absent or empty (RFC 9051
    §7.5.2); folded header values are unfolded.
    """
    sender = env.sender or env.from_
    reply_to = env.reply_to or env.from_
    return b"(%s)" % b" ".join(
        (
            _header(env.date, utf8),
            _header(env.subject, utf8),
            render_address_list(env.from_, utf8=utf8),
            render_address_list(sender, utf8=utf8),
            render_address_list(reply_to, utf8=utf8),
            render_address_list(env.to, utf8=utf8),
            render_address_list(env.cc, utf8=utf8),
            render_address_list(env.bcc, utf8=utf8),
            _header(env.in_reply_to, utf8),
            _header(env.message_id, utf8),
        )
    )


# --- BODY / BODYSTRUCTURE (RFC 9051 §7.5.2, §9 body) ------------------------


def _params(params: Sequence[tuple[str, str]] | None, utf8: bool) -> bytes:
    # body-fld-param = "(" string SP string *(SP string SP string) ")" / nil
    if not params:
        return b"NIL"
    out = []
    for k, v in params:
        name = k.upper()
        if not utf8 and not v.isascii():
            # storage/mime.py decodes RFC 2231 values to Unicode; a client
            # without UTF8=ACCEPT gets them re-encoded as RFC 2231 §4
            # extended parameters (``NAME*`` "utf-8''r%C3%A9sum%C3%A9").
            name += "*"
            v = "utf-8''" + urllib.parse.quote(_bytes(v), safe=_RFC2231_SAFE)
        out.append(string(name, utf8=utf8) + b" " + string(v, utf8=utf8))
    return paren(out)


def _disposition(dsp: tuple[str, Sequence[tuple[str, str]]] | None, utf8: bool) -> bytes:
    if dsp is None:
        return b"NIL"
    return b"(%s %s)" % (string(dsp[0].upper(), utf8=utf8), _params(dsp[1], utf8))


def _language(lang: Sequence[str] | None, utf8: bool) -> bytes:
    if not lang:
        return b"NIL"
    if len(lang) == 1:
        return string(lang[0], utf8=utf8)
    return paren(string(x, utf8=utf8) for x in lang)


def render_bodystructure(part: PartLike, extensible: bool, *, utf8: bool = False) -> bytes:
    """BODYSTRUCTURE (``extensible``) or BODY of a part (RFC 9051 §7.5.2).

    Types go out upper-case and quoted (``"TEXT" "PLAIN"``); parameter names
    upper-case, values as given. A text part without charset gets
    ``("CHARSET" "US-ASCII")`` (RFC 2045 §5.2 default). A multipart without
    children gets an empty text/plain child, since the grammar needs one.
    """
    out = bytearray()
    _body(part, extensible, utf8, out)
    return bytes(out)


_EMPTY_TEXT_CHILD = b'("TEXT" "PLAIN" ("CHARSET" "US-ASCII") NIL NIL "7BIT" 0 0)'


def _body(part: PartLike, ext: bool, utf8: bool, out: bytearray) -> None:
    mtype = part.type.upper()
    subtype = part.subtype.upper()
    out += b"("
    if mtype == "MULTIPART":
        # body-type-mpart = 1*body SP media-subtype [SP body-ext-mpart]
        if part.children:
            for child in part.children:
                _body(child, ext, utf8, out)
        else:
            out += _EMPTY_TEXT_CHILD
        out += b" " + string(subtype, utf8=utf8)
        if ext:
            out += b" " + _params(part.params, utf8)
            out += b" " + _ext_tail(part, utf8)
        out += b")"
        return
    params = part.params
    if mtype == "TEXT" and not any(k.lower() == "charset" for k, _ in params):
        params = [("CHARSET", "US-ASCII"), *params]
    # body-fields = param SP id SP desc SP enc SP octets
    out += b"%s %s %s %s %s %s %d" % (
        string(mtype, utf8=utf8),
        string(subtype, utf8=utf8),
        _params(params, utf8),
        nstring(part.id, utf8=utf8),
        nstring(part.description, utf8=utf8),
        string((part.encoding or "7BIT").upper(), utf8=utf8),
        part.size,
    )
    message = part.message
    if mtype == "MESSAGE" and subtype in ("RFC822", "GLOBAL") and message is not None:
        # body-type-msg = ... SP envelope SP body SP body-fld-lines
        out += b" " + render_envelope(message.envelope, utf8=utf8) + b" "
        _body(message.root, ext, utf8, out)
        out += b" %d" % part.lines
    elif mtype == "TEXT":
        out += b" %d" % part.lines
    if ext:
        # body-ext-1part = md5 [SP dsp [SP lang [SP loc]]]
        out += b" " + nstring(part.md5, utf8=utf8) + b" " + _ext_tail(part, utf8)
    out += b")"


def _ext_tail(part: PartLike, utf8: bool) -> bytes:
    return b"%s %s %s" % (
        _disposition(part.disposition, utf8),
        _language(part.language, utf8),
        nstring(part.location, utf8=utf8),
    )
