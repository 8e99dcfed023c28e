"""IMAP response encoder: strings, response lines, ENVELOPE, BODY/BODYSTRUCTURE."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
from hypothesis import given
from hypothesis import strategies as st
from imapclient.response_parser import parse_fetch_response

from protocols.imap.parse import parse_string
from protocols.imap.response import (
    binary,
    code_appenduid,
    code_copyuid,
    code_highestmodseq,
    code_permanentflags,
    continuation,
    encode_flags,
    encode_seqset,
    literal,
    nstring,
    paren,
    quoted,
    render_bodystructure,
    render_envelope,
    response_code,
    string,
    tagged,
    untagged,
    untagged_status,
)

# --- a stand-in for storage/mime.py's model (structural, duck-typed) ---------


@dataclass(frozen=True)
class Address:
    name: str | None
    adl: str | None
    mailbox: str | None
    host: str | None


@dataclass(frozen=True)
class Envelope:
    date: str | None = None
    subject: str | None = None
    from_: list[Address] | None = None
    sender: list[Address] | None = None
    reply_to: list[Address] | None = None
    to: list[Address] | None = None
    cc: list[Address] | None = None
    bcc: list[Address] | None = None
    in_reply_to: str | None = None
    message_id: str | None = None


@dataclass(frozen=True)
class Message:
    envelope: Envelope
    root: Part


@dataclass(frozen=True)
class Part:
    type: str = "text"
    subtype: str = "plain"
    params: list[tuple[str, str]] = field(default_factory=list)
    id: str | None = None
    description: str | None = None
    encoding: str | None = None
    md5: str | None = None
    disposition: tuple[str, list[tuple[str, str]]] | None = None
    language: list[str] | None = None
    location: str | None = None
    lines: int = 0
    children: list[Part] = field(default_factory=list)
    message: Message | None = None
    header_start: int = 0
    body_start: int = 0
    end: int = 0

    @property
    def size(self) -> int:
        return self.end - self.body_start


# --- strings ------------------------------------------------------------------


def test_quoted() -> None:
    assert quoted(b'a"b\\c') == b'"a\\"b\\\\c"'
    assert quoted("caf\u00e9") == b'"caf\xc3\xa9"'
    for bad in (b"a\r\nb", b"a\0"):
        with pytest.raises(ValueError):
            quoted(bad)


def test_literal_and_binary() -> None:
    assert literal(b"abc") == b"{3}\r\nabc"
    assert literal(b"") == b"{0}\r\n"
    assert literal(b"a\0", binary=True) == b"~{2}\r\na\0"
    assert binary(b"a\0b") == b"~{3}\r\na\0b"
    assert binary(b"abc") == b"{3}\r\nabc"


def test_string_chooses_quoted_or_literal() -> None:
    assert string(b"hello world") == b'"hello world"'
    assert string("NIL") == b'"NIL"'
    assert string(b"") == b'""'
    assert string(b"a\r\nb") == b"{4}\r\na\r\nb"
    assert string("caf\u00e9") == b"{5}\r\ncaf\xc3\xa9"
    assert string("caf\u00e9", utf8=True) == b'"caf\xc3\xa9"'
    assert string(b"\xff", utf8=True) == b"{1}\r\n\xff"
    assert string(b"x" * 2000).startswith(b"{2000}\r\n")
    # surrogateescape'd header octets come back raw
    assert string(b"\xe9t\xe9".decode("utf-8", "surrogateescape")) == b"{3}\r\n\xe9t\xe9"
    assert nstring(None) == b"NIL"
    assert nstring(b"x") == b'"x"'


def test_lists_flags_seqsets() -> None:
    assert paren([b"a", b"b"]) == b"(a b)"
    assert paren([]) == b"()"
    assert encode_flags(["\\Seen", "$Forwarded"]) == b"(\\Seen $Forwarded)"
    assert encode_flags([]) == b"()"
    assert encode_seqset([10, 9, 7, 5, 4, 3, 2, 1, 2]) == b"1:5,7,9:10"
    assert encode_seqset([4294967295]) == b"4294967295"
    with pytest.raises(ValueError):
        encode_seqset([])
    with pytest.raises(ValueError):
        encode_seqset([0, 1])


def test_response_lines() -> None:
    assert untagged(3, b"EXISTS") == b"* 3 EXISTS\r\n"
    assert untagged("CAPABILITY", b"IMAP4rev2", b"IMAP4rev1") == b"* CAPABILITY IMAP4rev2 IMAP4rev1\r\n"
    assert untagged(b"FLAGS", encode_flags(["\\Seen"])) == b"* FLAGS (\\Seen)\r\n"
    assert untagged_status("OK", response_code("UIDVALIDITY", 3857529045), "UIDs valid") == (
        b"* OK [UIDVALIDITY 3857529045] UIDs valid\r\n"
    )
    assert untagged_status("BYE", None, "Logging out") == b"* BYE Logging out\r\n"
    assert tagged(b"A003", "OK", code_appenduid(38505, [3955]), "APPEND completed") == (
        b"A003 OK [APPENDUID 38505 3955] APPEND completed\r\n"
    )
    assert tagged(b"A004", "OK", code_appenduid(38505, [3955, 3956, 3957, 3960]), "done") == (
        b"A004 OK [APPENDUID 38505 3955:3957,3960] done\r\n"
    )
    assert tagged(b"a", "OK", code_copyuid(38505, [304, 319, 320], [3956, 3957, 3958]), "Done") == (
        b"a OK [COPYUID 38505 304,319:320 3956:3958] Done\r\n"
    )
    assert code_highestmodseq(715194045007) == b"HIGHESTMODSEQ 715194045007"
    assert code_permanentflags(["\\Deleted", "\\Seen", "\\*"]) == b"PERMANENTFLAGS (\\Deleted \\Seen \\*)"
    assert tagged(b"a", "BAD", None, "evil\r\n* OK injected") == b"a BAD evil * OK injected\r\n"
    assert tagged(b"a", "OK", None, "") == b"a OK done\r\n"
    assert continuation() == b"+ \r\n"
    assert continuation("Ready for literal") == b"+ Ready for literal\r\n"


# --- ENVELOPE -------------------------------------------------------------------

GRAY = Address("Terry Gray", None, "gray", "cac.washington.edu")

RFC_ENVELOPE = Envelope(
    date="Wed, 17 Jul 1996 02:23:25 -0700 (PDT)",
    subject="IMAP4rev1 WG mtg summary and minutes",
    from_=[GRAY],
    to=[Address(None, None, "imap", "cac.washington.edu")],
    cc=[Address(None, None, "minutes", "CNRI.Reston.VA.US"), Address("John Klensin", None, "KLENSIN", "MIT.EDU")],
    message_id="<B27397-0100000@cac.washington.edu>",
)

# RFC 3501 §8, the FETCH FULL example.
RFC_ENVELOPE_WIRE = (
    b'("Wed, 17 Jul 1996 02:23:25 -0700 (PDT)" "IMAP4rev1 WG mtg summary and minutes" '
    b'(("Terry Gray" NIL "gray" "cac.washington.edu")) (("Terry Gray" NIL "gray" "cac.washington.edu")) '
    b'(("Terry Gray" NIL "gray" "cac.washington.edu")) ((NIL NIL "imap" "cac.washington.edu")) '
    b'((NIL NIL "minutes" "CNRI.Reston.VA.US")("John Klensin" NIL "KLENSIN" "MIT.EDU")) NIL NIL '
    b'"<B27397-0100000@cac.washington.edu>")'
)


def test_envelope_rfc3501_example() -> None:
    wire = render_envelope(RFC_ENVELOPE)
    assert wire == RFC_ENVELOPE_WIRE
    parsed = parse_fetch_response([b"1 (ENVELOPE " + wire + b")"])[1][b"ENVELOPE"]
    assert parsed.subject == b"IMAP4rev1 WG mtg summary and minutes"
    assert parsed.cc[1].name == b"John Klensin"


def test_envelope_empty() -> None:
    assert render_envelope(Envelope()) == b"(NIL NIL NIL NIL NIL NIL NIL NIL NIL NIL)"
    # Empty address lists are NIL too.
    assert render_envelope(Envelope(to=[])) == b"(NIL NIL NIL NIL NIL NIL NIL NIL NIL NIL)"


def test_envelope_explicit_sender_and_groups() -> None:
    env = Envelope(
        subject="Re: hi\r\n there",
        from_=[GRAY],
        sender=[Address(None, None, "list", "example.org")],
        reply_to=[Address(None, None, "list", "example.org")],
        to=[Address(None, None, "undisclosed", None), Address(None, None, None, None)],
        in_reply_to="<a@b>",
    )
    assert render_envelope(env) == (
        b'(NIL "Re: hi there" (("Terry Gray" NIL "gray" "cac.washington.edu")) '
        b'((NIL NIL "list" "example.org")) ((NIL NIL "list" "example.org")) '
        b'((NIL NIL "undisclosed" NIL)(NIL NIL NIL NIL)) NIL NIL "<a@b>" NIL)'
    )


def test_envelope_8bit_and_utf8() -> None:
    env = Envelope(subject="Gr\u00fc\u00dfe", from_=[Address("J\u00fcrgen", None, "j", "example.de")])
    wire = render_envelope(env)
    assert b"{7}\r\nGr\xc3\xbc\xc3\x9fe" in wire and b"{7}\r\nJ\xc3\xbcrgen" in wire
    wire = render_envelope(env, utf8=True)
    assert b'"Gr\xc3\xbc\xc3\x9fe"' in wire and b"{" not in wire
    # Quotes and backslashes in values are escaped.
    assert b'"say \\"hi\\" \\\\o/"' in render_envelope(Envelope(subject='say "hi" \\o/'))


# --- BODY / BODYSTRUCTURE ------------------------------------------------------

TEXT_1 = Part(params=[("charset", "US-ASCII")], lines=23, body_start=0, end=1152)
TEXT_2 = Part(
    params=[("CHARSET", "US-ASCII"), ("NAME", "cc.diff")],
    id="<960723163407.20117h@cac.washington.edu>",
    description="Compiler diff",
    encoding="base64",
    lines=73,
    body_start=0,
    end=4554,
)
MIXED = Part("multipart", "mixed", params=[("boundary", "xyz")], children=[TEXT_1, TEXT_2])


def test_body_rfc3501_example() -> None:
    # RFC 3501 §7.4.2, the BODYSTRUCTURE example (non-extensible form).
    assert render_bodystructure(MIXED, False) == (
        b'(("TEXT" "PLAIN" ("CHARSET" "US-ASCII") NIL NIL "7BIT" 1152 23)'
        b'("TEXT" "PLAIN" ("CHARSET" "US-ASCII" "NAME" "cc.diff") '
        b'"<960723163407.20117h@cac.washington.edu>" "Compiler diff" "BASE64" 4554 73) "MIXED")'
    )


def test_bodystructure_extension_data() -> None:
    assert render_bodystructure(MIXED, True) == (
        b'(("TEXT" "PLAIN" ("CHARSET" "US-ASCII") NIL NIL "7BIT" 1152 23 NIL NIL NIL NIL)'
        b'("TEXT" "PLAIN" ("CHARSET" "US-ASCII" "NAME" "cc.diff") '
        b'"<960723163407.20117h@cac.washington.edu>" "Compiler diff" "BASE64" 4554 73 NIL NIL NIL NIL) '
        b'"MIXED" ("BOUNDARY" "xyz") NIL NIL NIL)'
    )


def test_single_part_defaults_and_extensions() -> None:
    part = Part(
        "application",
        "pdf",
        params=[("name", "r\u00e9sum\u00e9.pdf")],
        encoding="BASE64",
        md5="Q2hlY2sgSW50ZWdyaXR5IQ==",
        disposition=("attachment", [("filename", "cv.pdf")]),
        language=["en", "de"],
        location="http://example.com/cv.pdf",
        body_start=10,
        end=110,
    )
    assert render_bodystructure(part, True) == (
        b'("APPLICATION" "PDF" ("NAME*" "utf-8\'\'r%C3%A9sum%C3%A9.pdf") NIL NIL "BASE64" 100 '
        b'"Q2hlY2sgSW50ZWdyaXR5IQ==" ("ATTACHMENT" ("FILENAME" "cv.pdf")) ("en" "de") '
        b'"http://example.com/cv.pdf")'
    )
    # Non-ASCII parameter values: RFC 2231 re-encoding, or UTF-8 for UTF8=ACCEPT clients.
    assert render_bodystructure(part, False) == (
        b'("APPLICATION" "PDF" ("NAME*" "utf-8\'\'r%C3%A9sum%C3%A9.pdf") NIL NIL "BASE64" 100)'
    )
    assert render_bodystructure(part, False, utf8=True) == (
        b'("APPLICATION" "PDF" ("NAME" "r\xc3\xa9sum\xc3\xa9.pdf") NIL NIL "BASE64" 100)'
    )
    # Text without charset gets the RFC 2045 default; single language is a string.
    text = Part(language=["fr"], lines=1, end=5)
    assert render_bodystructure(text, True) == (
        b'("TEXT" "PLAIN" ("CHARSET" "US-ASCII") NIL NIL "7BIT" 5 1 NIL NIL "fr" NIL)'
    )
    assert render_bodystructure(Part("image", "png", end=3), False) == b'("IMAGE" "PNG" NIL NIL NIL "7BIT" 3)'


def test_message_rfc822() -> None:
    inner = Part(params=[("charset", "utf-8")], lines=2, body_start=0, end=12)
    msg = Part(
        "message",
        "rfc822",
        lines=9,
        body_start=100,
        end=400,
        message=Message(Envelope(subject="inner", from_=[GRAY]), inner),
    )
    outer = Part("multipart", "mixed", children=[Part(lines=1, end=4), msg])
    wire = render_bodystructure(outer, False)
    assert wire == (
        b'(("TEXT" "PLAIN" ("CHARSET" "US-ASCII") NIL NIL "7BIT" 4 1)'
        b'("MESSAGE" "RFC822" NIL NIL NIL "7BIT" 300 '
        b'(NIL "inner" (("Terry Gray" NIL "gray" "cac.washington.edu")) '
        b'(("Terry Gray" NIL "gray" "cac.washington.edu")) (("Terry Gray" NIL "gray" "cac.washington.edu")) '
        b'NIL NIL NIL NIL NIL) ("TEXT" "PLAIN" ("CHARSET" "utf-8") NIL NIL "7BIT" 12 2) 9) "MIXED")'
    )
    ext = render_bodystructure(outer, True)
    parsed = parse_fetch_response([b"1 (BODYSTRUCTURE " + ext + b")"])[1][b"BODYSTRUCTURE"]
    assert parsed.is_multipart
    # message/rfc822 without a parsed message renders as a basic part.
    bare = Part("message", "rfc822", end=7)
    assert render_bodystructure(bare, False) == b'("MESSAGE" "RFC822" NIL NIL NIL "7BIT" 7)'


def test_empty_multipart_gets_placeholder_child() -> None:
    assert render_bodystructure(Part("multipart", "alternative"), False) == (
        b'(("TEXT" "PLAIN" ("CHARSET" "US-ASCII") NIL NIL "7BIT" 0 0) "ALTERNATIVE")'
    )


def test_nested_multipart_parses_with_imapclient() -> None:
    alt = Part("multipart", "alternative", children=[Part(lines=1, end=3), Part("text", "html", lines=2, end=9)])
    root = Part(
        "multipart", "related", params=[("type", "multipart/alternative")], children=[alt, Part("image", "gif", end=1)]
    )
    for ext in (False, True):
        wire = render_bodystructure(root, ext)
        parsed = parse_fetch_response([b"7 (BODYSTRUCTURE " + wire + b")"])[7][b"BODYSTRUCTURE"]
        assert parsed.is_multipart and parsed[0][0].is_multipart


def test_rendered_strings_reparse() -> None:
    for value in (b"plain", b'q"uo\\te', b"line\r\nbreak", b"\xff\xfe", b""):
        assert parse_string(string(value)) == value
        assert parse_string(nstring(value)) == value


@given(st.lists(st.integers(0, 60)), st.integers(1, 100))
def test_a_rendered_answer_is_cut_only_at_line_ends(lengths: list[int], size: int) -> None:
    from protocols.imap.session import _whole_lines

    data = b"".join(b"x" * n + b"\r\n" for n in lengths)
    pieces = list(_whole_lines(data, size))
    assert b"".join(pieces) == data
    # Every piece ends a line, and is no longer than ``size`` unless it is
    # one line that is.
    assert all(p.endswith(b"\r\n") and (len(p) <= size or p.count(b"\n") == 1) for p in pieces)
