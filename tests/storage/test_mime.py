"""Tests for storage.mime: bytes in, structure out."""

from __future__ import annotations

import base64
import quopri

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from storage import mime
from storage.mime import Address, Message, Part

CRLF = b"\r\n"


def msg(*lines: bytes | str, nl: bytes = CRLF) -> bytes:
    return nl.join(line.encode() if isinstance(line, str) else line for line in lines)


def body(raw: bytes, part: Part) -> bytes:
    return raw[part.body_start : part.end]


def header(raw: bytes, part: Part) -> bytes:
    return raw[part.header_start : part.body_start]


def check_part(raw: bytes, part: Part, lo: int, hi: int) -> None:
    assert lo <= part.header_start <= part.body_start <= part.end <= hi
    assert part.type == part.type.lower() and part.subtype == part.subtype.lower()
    if part.type == "multipart":
        assert part.children
    prev = part.body_start
    for child in part.children:
        assert child.header_start >= prev
        check_part(raw, child, part.body_start, part.end)
        prev = child.end
    if part.message is not None:
        assert not part.children
        root = part.message.root
        assert (root.header_start, root.end) == (part.body_start, part.end)
        check_message(raw, part.message)


def check_message(raw: bytes, m: Message) -> None:
    assert m.headers_end == m.root.body_start
    check_part(raw, m.root, 0, len(raw))


SIMPLE = msg(
    "From: Alice <alice@example.com>",
    "To: bob@example.org",
    "Subject: Hello",
    "Date: Mon, 7 Feb 1994 21:52:25 -0800",
    "Message-ID: <1@example.com>",
    "",
    "Hi Bob,",
    "how are you?",
    "",
)

MIXED = msg(
    "From: Alice <alice@example.com>",
    "To: Bob <bob@example.org>",
    "Subject: report",
    "MIME-Version: 1.0",
    'Content-Type: multipart/mixed; boundary="outer"',
    "",
    "This is the preamble.",
    "--outer",
    'Content-Type: multipart/alternative; boundary="inner"',
    "",
    "--inner",
    "Content-Type: text/plain; charset=utf-8",
    "Content-Transfer-Encoding: quoted-printable",
    "",
    "Caf=C3=A9 plain",
    "--inner",
    "Content-Type: text/html; charset=utf-8",
    "",
    "<p>Caf\xe9 <b>html</b></p>".encode(),
    "--inner--",
    "",
    "--outer",
    'Content-Type: application/pdf; name="r.pdf"',
    "Content-Transfer-Encoding: base64",
    'Content-Disposition: attachment; filename="r.pdf"',
    "Content-ID: <pdf@x>",
    "Content-Description: The report",
    "",
    base64.b64encode(b"%PDF-1.4 fake").decode(),
    "--outer--",
    "epilogue",
    "",
)

INNER = msg(
    "From: Carol <carol@example.net>",
    "Subject: inner subject",
    "Message-ID: <inner@example.net>",
    'Content-Type: multipart/mixed; boundary="b2"',
    "",
    "--b2",
    "",
    "inner text",
    "--b2",
    "Content-Type: image/gif",
    "",
    "GIF89a",
    "--b2--",
)

RFC822 = msg(
    "From: Alice <alice@example.com>",
    "Subject: Fwd: inner subject",
    'Content-Type: multipart/mixed; boundary="b1"',
    "",
    "--b1",
    "Content-Type: text/plain",
    "",
    "see attached",
    "--b1",
    "Content-Type: message/rfc822",
    "",
    INNER,
    "--b1--",
    "",
)


# ---------------------------------------------------------------------------
# Structure


def test_simple_text_message() -> None:
    m = mime.parse(SIMPLE)
    root = m.root
    assert (root.type, root.subtype, root.params) == ("text", "plain", [("charset", "us-ascii")])
    assert root.encoding == "7bit" and root.children == [] and root.message is None
    assert header(SIMPLE, root).endswith(b"Message-ID: <1@example.com>\r\n\r\n")
    assert body(SIMPLE, root) == b"Hi Bob,\r\nhow are you?\r\n"
    assert root.lines == 2 and root.size == len(b"Hi Bob,\r\nhow are you?\r\n")
    assert m.size == len(SIMPLE) and m.headers_end == root.body_start
    env = m.envelope
    assert env.subject == "Hello" and env.date == "Mon, 7 Feb 1994 21:52:25 -0800"
    assert env.from_ == [Address("Alice", None, "alice", "example.com")]
    assert env.to == [Address(None, None, "bob", "example.org")]
    assert env.message_id == "<1@example.com>" and env.in_reply_to is None
    assert m.message_id == "1@example.com"
    assert m.sent_date == 760686745.0
    assert m.base_subject == "Hello"
    assert m.preview == "Hi Bob, how are you?"
    assert not m.has_attachment
    check_message(SIMPLE, m)


def test_multipart_mixed_with_nested_alternative() -> None:
    m = mime.parse(MIXED)
    root = m.root
    assert (root.type, root.subtype) == ("multipart", "mixed")
    assert root.params == [("boundary", "outer")]
    alt, pdf = root.children
    assert (alt.type, alt.subtype) == ("multipart", "alternative")
    plain, htm = alt.children
    # RFC 2046 §5.1.1: the CRLF before a delimiter belongs to the delimiter.
    assert body(MIXED, plain) == b"Caf=C3=A9 plain"
    assert header(MIXED, plain) == b"Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n"
    assert body(MIXED, htm) == "<p>Caf\xe9 <b>html</b></p>".encode()
    assert body(MIXED, alt).startswith(b"--inner\r\n") and body(MIXED, alt).endswith(b"--inner--\r\n")
    assert plain.encoding == "quoted-printable" and plain.params == [("charset", "utf-8")]
    assert plain.lines == 1
    assert (pdf.type, pdf.subtype, pdf.params) == ("application", "pdf", [("name", "r.pdf")])
    assert pdf.disposition == ("attachment", [("filename", "r.pdf")])
    assert pdf.id == "<pdf@x>" and pdf.description == "The report" and pdf.lines == 0
    assert mime.decode_body(MIXED, pdf) == b"%PDF-1.4 fake"
    assert mime.part_text(MIXED, plain) == "Café plain"
    assert m.has_attachment
    assert m.preview == "Café plain"
    check_message(MIXED, m)


def test_message_rfc822_attachment() -> None:
    m = mime.parse(RFC822)
    text, att = m.root.children
    assert (att.type, att.subtype) == ("message", "rfc822")
    assert body(RFC822, att) == INNER
    inner = att.message
    assert inner is not None
    assert inner.envelope.subject == "inner subject"
    assert inner.envelope.from_ == [Address("Carol", None, "carol", "example.net")]
    assert inner.message_id == "inner@example.net"
    assert inner.root.header_start == att.body_start and inner.root.end == att.end
    assert att.lines == INNER.count(b"\n") + 1
    first, gif = inner.root.children
    assert body(RFC822, first) == b"inner text"
    assert header(RFC822, first) == b"\r\n"
    assert (gif.type, gif.subtype) == ("image", "gif") and body(RFC822, gif) == b"GIF89a"
    assert m.has_attachment
    # RFC 3501 §6.4.5 numbering continues inside the encapsulated message.
    assert mime.find_part(m, [1]) is text
    assert mime.find_part(m, [2]) is att
    assert mime.find_part(m, [2, 1]) is first
    assert mime.find_part(m, [2, 2]) is gif
    assert mime.find_part(m, [2, 3]) is None
    assert mime.find_part(m, [1, 1]) is None
    check_message(RFC822, m)


def test_find_part_numbering() -> None:
    simple = mime.parse(SIMPLE)
    assert mime.find_part(simple, []) is simple.root
    assert mime.find_part(simple, [1]) is simple.root  # part 1 of a non-multipart body is the body
    assert mime.find_part(simple, [2]) is None
    assert mime.find_part(simple, [1, 1]) is None
    mixed = mime.parse(MIXED)
    alt, pdf = mixed.root.children
    assert mime.find_part(mixed, [1]) is alt
    assert mime.find_part(mixed, [1, 1]) is alt.children[0]
    assert mime.find_part(mixed, [1, 2]) is alt.children[1]
    assert mime.find_part(mixed, [1, 3]) is None
    assert mime.find_part(mixed, [2]) is pdf
    assert mime.find_part(mixed, [2, 1]) is None
    assert mime.find_part(mixed, [0]) is None
    assert mime.find_part(mixed, [3]) is None
    # A top-level message/rfc822 body: 1 is the body, 1.1 the encapsulated body.
    top = mime.parse(msg("Content-Type: message/rfc822", "", "Subject: x", "", "hi"))
    assert mime.find_part(top, [1]) is top.root
    assert top.root.message is not None
    assert mime.find_part(top, [1, 1]) is top.root.message.root


def test_bare_lf_message() -> None:
    raw = MIXED.replace(b"\r\n", b"\n")
    m = mime.parse(raw)
    alt, pdf = m.root.children
    assert body(raw, alt.children[0]) == b"Caf=C3=A9 plain"
    assert header(raw, alt.children[0]).endswith(b"quoted-printable\n\n")
    assert mime.decode_body(raw, pdf) == b"%PDF-1.4 fake"
    assert m.envelope.subject == "report"
    check_message(raw, m)


def test_missing_final_boundary() -> None:
    raw = msg("Content-Type: multipart/mixed; boundary=b", "", "--b", "", "one", "--b", "", "two", "")
    m = mime.parse(raw)
    one, two = m.root.children
    assert body(raw, one) == b"one"
    assert body(raw, two) == b"two\r\n" and two.end == len(raw)


def test_missing_boundary_parameter() -> None:
    raw = msg("Content-Type: multipart/mixed", "", "--b", "", "text", "--b--")
    m = mime.parse(raw)
    assert (m.root.type, m.root.subtype, m.root.params) == ("text", "plain", [("charset", "us-ascii")])
    assert m.root.children == [] and body(raw, m.root) == b"--b\r\n\r\ntext\r\n--b--"
    # A boundary that never occurs is treated the same way.
    m = mime.parse(msg("Content-Type: multipart/mixed; boundary=zz", "", "--b", "text"))
    assert (m.root.type, m.root.subtype, m.root.children) == ("text", "plain", [])


def test_boundary_rules() -> None:
    # Transport padding after the delimiter is allowed; a longer boundary that
    # starts with ours is not a delimiter (nested parts with prefix boundaries).
    raw = msg(
        "Content-Type: multipart/mixed; boundary=ab",
        "",
        "--ab  \t",
        "Content-Type: multipart/mixed; boundary=ab-1",
        "",
        "--ab-1",
        "",
        "x --ab",
        "--ab-1--",
        "--ab--  ",
    )
    m = mime.parse(raw)
    (outer,) = m.root.children
    (inner,) = outer.children
    assert body(raw, inner) == b"x --ab"
    # The empty line before a delimiter: CRLF belongs to the delimiter, the body is CRLF.
    raw = msg("Content-Type: multipart/mixed; boundary=b", "", "--b", "", "", "--b--")
    (only,) = mime.parse(raw).root.children
    assert body(raw, only) == b"" and only.body_start == only.end
    raw = msg("Content-Type: multipart/mixed; boundary=b", "", "--b", "", "", "", "--b--")
    (only,) = mime.parse(raw).root.children
    assert body(raw, only) == CRLF


def test_digest_default_type() -> None:
    raw = msg(
        "Content-Type: multipart/digest; boundary=d",
        "",
        "--d",
        "",
        "Subject: one",
        "",
        "body one",
        "--d",
        "Content-Type: text/plain",
        "",
        "plain",
        "--d--",
    )
    m = mime.parse(raw)
    first, second = m.root.children
    assert (first.type, first.subtype, first.params) == ("message", "rfc822", [])  # RFC 2046 §5.1.5
    assert first.message is not None and first.message.envelope.subject == "one"
    assert (second.type, second.subtype) == ("text", "plain")


def test_header_without_body() -> None:
    raw = b"Subject: only a header\r\nFrom: a@b"
    m = mime.parse(raw)
    assert m.envelope.subject == "only a header"
    assert m.envelope.from_ == [Address(None, None, "a", "b")]
    assert m.root.body_start == m.root.end == len(raw) and m.root.lines == 0


def test_no_header() -> None:
    raw = b"just some text\nwithout header\n"
    m = mime.parse(raw)
    assert m.root.header_start == m.root.body_start == 0 and body(raw, m.root) == raw
    assert m.envelope == mime.Envelope()
    raw = b"\r\nbody after empty header"
    m = mime.parse(raw)
    assert (m.root.body_start, body(raw, m.root)) == (2, b"body after empty header")
    # A non-field line ends the header and starts the body.
    raw = b"Subject: s\r\nnot a header line\r\nmore"
    m = mime.parse(raw)
    assert m.envelope.subject == "s" and body(raw, m.root) == b"not a header line\r\nmore"
    # An mbox "From " line is skipped when fields follow it, else it is body.
    raw = b"From MAILER-DAEMON Fri Apr 06 16:46:09 2001\nSubject: s\n\nbody"
    m = mime.parse(raw)
    assert m.envelope.subject == "s" and body(raw, m.root) == b"body" and m.root.header_start == 0
    raw = b"From here on: text\nmore text\n"
    assert mime.parse(raw).root.body_start == 0


def test_empty_input() -> None:
    m = mime.parse(b"")
    assert (m.root.header_start, m.root.body_start, m.root.end) == (0, 0, 0)
    assert (m.root.type, m.root.subtype) == ("text", "plain")
    assert m.envelope == mime.Envelope() and m.preview == "" and m.base_subject == ""
    assert mime.decode(mime.encode(m)) == m


def test_garbage_and_nul_bytes() -> None:
    raw = b"\x00\xff\xfe:\r\n\x00--\r\n\x80" * 50
    m = mime.parse(raw)
    check_message(raw, m)
    raw = b"Subject: caf\xe9 \x00nul\r\nContent-Type: text/plain; charset=x-unknown\r\n\r\nb\xe9\x00dy"
    m = mime.parse(raw)
    assert m.envelope.subject == "caf\udce9 \x00nul"
    assert m.envelope.subject.encode("utf-8", "surrogateescape") == b"caf\xe9 \x00nul"
    assert m.base_subject == "caf\xe9 \x00nul"
    assert mime.part_text(raw, m.root) == "b\xe9\x00dy"
    assert mime.decode(mime.encode(m)) == m


def test_parse_never_raises_on_internal_error(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*args: object) -> Message:
        raise RuntimeError("bug")

    monkeypatch.setattr(mime, "_parse_message", boom)
    m = mime.parse(SIMPLE)
    assert (m.root.header_start, m.root.body_start, m.root.end) == (0, 0, len(SIMPLE))
    assert (m.root.type, m.root.subtype) == ("text", "plain")


def test_limits() -> None:
    depth = 100
    raw = b"".join(b"Content-Type: multipart/mixed; boundary=b%d\r\n\r\n--b%d\r\n" % (i, i) for i in range(depth)) + b"\r\nleaf"
    m = mime.parse(raw)
    check_message(raw, m)
    part, levels = m.root, 0
    while part.children:
        part, levels = part.children[0], levels + 1
    assert levels == mime.MAX_DEPTH
    assert (part.type, part.subtype) == ("application", "octet-stream")

    many = b"Content-Type: multipart/mixed; boundary=b\r\n\r\n" + b"--b\r\n\r\nx\r\n" * 5000 + b"--b--\r\n"
    m = mime.parse(many)
    check_message(many, m)
    assert len(m.root.children) == mime.MAX_PARTS  # root + 1998 + the remainder
    assert m.root.children[-1].end == len(many) and body(many, m.root.children[-1]).endswith(b"--b--\r\n")

    nested_msgs = b"Content-Type: message/rfc822\r\n\r\n" * 200 + b"hi"
    m = mime.parse(nested_msgs)
    check_message(nested_msgs, m)

    raw = b"To: " + b"a@b, " * 1500 + b"\r\nCc: Group: " + b"c@d, " * 1500 + b";\r\n\r\n"
    env = mime.parse(raw).envelope
    assert env.to is not None and len(env.to) == mime.MAX_ADDRESSES
    assert env.cc is not None and len(env.cc) == mime.MAX_ADDRESSES + 1  # the group stays closed
    assert env.cc[-1] == Address(None, None, None, None)

    # The header budget is shared by all parts: later parts get default fields.
    fat = b"X: " + b"y" * 100_000 + b"\r\n"
    raw = (fat + b"Content-Type: message/rfc822\r\n\r\n") * 60 + b"Subject: deep\r\n\r\n"
    m = mime.parse(raw)
    check_message(raw, m)
    depth = 0
    part = m.root
    while part.message is not None:
        part, depth = part.message.root, depth + 1
    assert depth < 60 and depth * len(fat) <= mime.MAX_TOTAL_HEADER_BYTES


def test_hostile_inputs_are_bounded() -> None:
    # Enormous header without an empty line.
    raw = b"X-Long: " + b"a" * (2 * mime.MAX_HEADER_BYTES) + b"\r\nSubject: late\r\n\r\nbody"
    m = mime.parse(raw)
    assert body(raw, m.root) == b"body" and m.envelope.subject is None
    raw = b"Subject: s\r\n" + b"X: y\r\n" * 200_000
    m = mime.parse(raw)
    assert m.envelope.subject == "s" and m.root.end == len(raw)
    # Many lines that look like delimiters but are not.
    raw = b"Content-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\n\r\n" + b"--bx\r\n" * 50_000 + b"--b--"
    m = mime.parse(raw)
    check_message(raw, m)
    # Long subject made of blobs, long comments and quotes in addresses.
    raw = b"Subject: " + b"[a]" * 20_000 + b"\r\nTo: " + b"(" * 50_000 + b'\r\nCc: "' + b"\\" * 50_000 + b"\r\n\r\n"
    m = mime.parse(raw)
    check_message(raw, m)


# ---------------------------------------------------------------------------
# Header values


def test_rfc2231_params() -> None:
    raw = msg(
        "Content-Type: application/x-stuff;",
        " title*0*=us-ascii'en'This%20is%20even%20more%20;",
        " title*1*=%2A%2A%2Afun%2A%2A%2A%20;",
        ' title*2="isn\'t it!"',
        "Content-Disposition: attachment; filename=\"fallback.txt\";",
        " filename*=utf-8''%E2%82%AC%20rates.txt",
        "Content-Language: en, fr (French)",
        "",
        "x",
    )
    root = mime.parse(raw).root
    assert root.params == [("title", "This is even more ***fun*** isn't it!")]  # RFC 2231 §4 example
    assert root.disposition == ("attachment", [("filename", "€ rates.txt")])
    assert root.language == ["en", "fr"]


def test_content_type_variants() -> None:
    raw = msg('Content-Type: Text/HTML (comment) ; CharSet="ISO-8859-1" ; format=flowed;bad', "", "x")
    root = mime.parse(raw).root
    assert (root.type, root.subtype) == ("text", "html")
    assert root.params == [("charset", "ISO-8859-1"), ("format", "flowed")]
    root = mime.parse(msg("Content-Type: garbage", "", "x")).root
    assert (root.type, root.subtype, root.params) == ("text", "plain", [("charset", "us-ascii")])
    root = mime.parse(msg("Content-Type: text/plain", "Content-Transfer-Encoding: BASE64 (x)", "", "eA==")).root
    assert root.params == [] and root.encoding == "base64"
    raw = msg(
        "Content-Type: text/plain; name=\"a \\\"q\\\" b;c\"",
        "Content-Location: http://x/y",
        "Content-MD5: Q2hlY2sgSW50ZWdyaXR5IQ==",
        "",
        "",
    )
    root = mime.parse(raw).root
    assert root.params == [("name", 'a "q" b;c')]
    assert root.location == "http://x/y" and root.md5 == "Q2hlY2sgSW50ZWdyaXR5IQ=="


def test_group_addresses() -> None:
    raw = msg(
        "From: Alice <alice@example.com>",
        "To: A Group: Ed Jones <c@a.test>, joe@where.test, John <jdoe@one.test>;, Mary <mary@x.test>",
        "Cc: Undisclosed recipients:;",
        'Bcc: "Doe, J. \\"Q\\"" <@r1.test,@r2.test:j@d.test>, x@y (Comment Name), <>, broken',
        "",
        "",
    )
    env = mime.parse(raw).envelope
    assert env.to == [
        Address(None, None, "A Group", None),
        Address("Ed Jones", None, "c", "a.test"),
        Address(None, None, "joe", "where.test"),
        Address("John", None, "jdoe", "one.test"),
        Address(None, None, None, None),
        Address("Mary", None, "mary", "x.test"),
    ]
    assert env.cc == [Address(None, None, "Undisclosed recipients", None), Address(None, None, None, None)]
    assert env.bcc == [
        Address('Doe, J. "Q"', "@r1.test,@r2.test", "j", "d.test"),
        Address("Comment Name", None, "x", "y"),
        Address(None, None, "broken", ""),
    ]


def test_address_details() -> None:
    raw = msg(
        'From: =?utf-8?q?J=C3=B6rg?= "Q." Public <"john doe"@[192.0.2.1]>',
        "To: A <a@b, C <c@d>",
        "Reply-To:",
        "",
        "",
    )
    env = mime.parse(raw).envelope
    assert env.from_ == [Address("=?utf-8?q?J=C3=B6rg?= Q. Public", None, '"john doe"', "[192.0.2.1]")]
    assert env.to == [Address("A", None, "a", "b"), Address("C", None, "c", "d")]
    assert env.reply_to == env.from_  # present but empty: RFC 3501 default


_ADDRESS_PIECES = st.sampled_from(
    ["a", "b.c", "J.", "=?utf-8?q?J=C3=B6rg?=", "\u00e9", " ", "  ", "\t", "<", ">", "@", ",", ";", ":",
     '"', "(", ")", "[", "]", "\\", "x@y", "<a@b>", "Name", "-"]
)


@settings(max_examples=600)
@given(st.lists(_ADDRESS_PIECES, max_size=8).map("".join))
def test_simple_address_shortcut_agrees_with_the_tokenizer(text: str) -> None:
    """Values the one-match shortcut takes get the answer the tokenizer gives."""
    text = text.strip(" \t")
    m = mime._SIMPLE_ADDRESS.match(text)
    if m is not None:
        assert mime._tokenized_addresses(text, mime.MAX_ADDRESSES) == [mime._simple_address(m)]


@pytest.mark.parametrize(
    "value",
    ["<a@b.test>", "a@b.test", "Some  Name <a@b.test>", "J. Random\tHacker<x.y@z>", "=?utf-8?q?J=C3=B6rg?= <j@x>"],
)
def test_simple_address_shortcut_takes_common_forms(value: str) -> None:
    m = mime._SIMPLE_ADDRESS.match(value)
    assert m is not None
    assert mime._tokenized_addresses(value, mime.MAX_ADDRESSES) == [mime._simple_address(m)]


def test_envelope_defaults() -> None:
    env = mime.parse(SIMPLE).envelope
    assert env.sender == env.from_ and env.reply_to == env.from_
    assert env.sender is not env.from_
    assert env.cc is None and env.bcc is None
    raw = msg("From: a@b", "Sender: s@b", "Reply-To: r@b", "", "")
    env = mime.parse(raw).envelope
    assert env.sender == [Address(None, None, "s", "b")]
    assert env.reply_to == [Address(None, None, "r", "b")]
    env = mime.parse(b"Subject: x\r\n\r\n").envelope
    assert env.from_ is None and env.sender is None and env.reply_to is None


def test_folded_headers_and_references() -> None:
    raw = msg(
        "Subject: a",
        "\tfolded   subject",
        "Message-ID:",
        " <id@host>",
        "In-Reply-To: <parent@host> (comment)",
        "References: <root@host>",
        "  <mid@",
        " host> junk <parent@host>",
        "",
        "",
    )
    m = mime.parse(raw)
    assert m.envelope.subject == "a\tfolded   subject"
    assert m.base_subject == "a folded subject"
    assert m.envelope.message_id == "<id@host>" and m.message_id == "id@host"
    assert m.references == ["root@host", "mid@host", "parent@host"]
    m = mime.parse(msg("In-Reply-To: <p1@h> <p2@h>", "References: junk", "", ""))
    assert m.references == ["p1@h"]  # RFC 5256 §2.2: first id of In-Reply-To
    assert mime.parse(msg("Message-ID: bare@id", "", "")).message_id == "bare@id"


@pytest.mark.parametrize(
    ("subject", "base"),
    [
        ("Hello", "Hello"),
        ("Re: Hello", "Hello"),
        ("RE: re: Re:Hello", "Hello"),
        ("Fwd: Hello", "Hello"),
        ("Fw: Hello", "Hello"),
        ("Re [list]: Hello", "Hello"),
        ("[list] Re: Hello", "Hello"),
        ("[list] Hello", "Hello"),
        ("[list]", "[list]"),
        ("[a][b] Hello", "Hello"),
        ("Hello (fwd)", "Hello"),
        ("Hello (FWD) (fwd)  ", "Hello"),
        ("[Fwd: Re: Hello]", "Hello"),
        ("Re: [Fwd: Hello (fwd)]", "Hello"),
        ("  Hello   world\t", "Hello world"),
        ("Re: =?utf-8?q?Caf=C3=A9?=", "Café"),
        ("Re:", ""),
        ("Reply: x", "Reply: x"),
    ],
)
def test_base_subject(subject: str, base: str) -> None:
    assert mime.base_subject(subject) == base


def test_decode_words() -> None:
    assert mime.decode_words("=?utf-8?q?Caf=C3=A9?= ok") == "Café ok"
    assert mime.decode_words("=?ISO-8859-1?Q?a?= =?ISO-8859-1?Q?b?=") == "ab"  # RFC 2047 §8
    assert mime.decode_words("=?ISO-8859-1?Q?a?= b") == "a b"
    assert mime.decode_words("=?utf-8?b?4oK=?= =?utf-8?b?rA==?=") == "€"  # split character
    assert mime.decode_words("=?utf-8*en?B?aGk?=") == "hi"
    assert mime.decode_words("=?bogus?Q?x_y?=") == "x y"
    assert mime.decode_words("=?utf-8?B?\udce9?=") == "=?utf-8?B?\xe9?="
    assert mime.decode_words("plain \udcff") == "plain \xff"
    assert mime.decode_words("=?punycode?q?abc?=") == "abc"


def test_sent_date() -> None:
    def date(value: str) -> float | None:
        return mime.parse(f"Date: {value}\r\n\r\n".encode()).sent_date

    assert date("Mon, 7 Feb 1994 21:52:25 -0800") == 760686745.0
    assert date("7 Feb 1994 21:52:25") == 760657945.0  # no zone: UTC
    assert date("not a date") is None
    assert date("Mon, 99 Foo 99999999999999999999 99:99:99 +9999") is None


def test_header_fields() -> None:
    raw = msg(
        "Subject: hello",
        "From: a@b",
        "X-Folded: one",
        " two",
        "subject: second",
        "",
        "",
    )
    hdr = header(raw, mime.parse(raw).root)
    assert mime.header_fields(hdr, ["SUBJECT", "x-folded"], False) == (
        b"Subject: hello\r\nX-Folded: one\r\n two\r\nsubject: second\r\n\r\n"
    )
    assert mime.header_fields(hdr, ["subject", "x-folded"], True) == b"From: a@b\r\n\r\n"
    assert mime.header_fields(hdr, ["nothing"], False) == b"\r\n"
    lf = b"Subject: a\nX: b\n c\nFrom: z"
    assert mime.header_fields(lf, ["x", "from"], False) == b"X: b\r\n c\r\nFrom: z\r\n\r\n"
    assert mime.header_value(hdr, "x-folded") == "one two"
    assert mime.header_value(hdr, "SUBJECT") == "hello"
    assert mime.header_value(hdr, "missing") is None
    assert mime.header_value(b"garbage\nSubject: s\n", "subject") == "s"


def test_decode_body() -> None:
    def part(encoding: str, data: bytes) -> tuple[bytes, Part]:
        raw = b"Content-Transfer-Encoding: " + encoding.encode() + b"\r\n\r\n" + data
        return raw, mime.parse(raw).root

    assert mime.decode_body(*part("base64", b"SGVs\r\nbG8g\r\nd29y\r\nbGQ=\r\n")) == b"Hello world"
    assert mime.decode_body(*part("base64", b"SGVsbG8")) == b"Hello"  # missing padding
    assert mime.decode_body(*part("base64", b"SGV*sb!G8=\r\nIHdvcmxk")) == b"Hello world"  # junk, padding mid-way
    assert mime.decode_body(*part("base64", b"%%%")) == b""
    assert mime.decode_body(*part("quoted-printable", b"a=3Db=\r\nc  \r\nd=ZZ =\ne")) == b"a=bc\r\nd=ZZ e"
    assert mime.decode_body(*part("7bit", b"as is=3D")) == b"as is=3D"
    assert mime.decode_body(*part("x-unknown", b"as is")) == b"as is"


def test_part_text_charsets() -> None:
    def text(ctype: str, data: bytes, cte: str = "8bit") -> str:
        raw = f"Content-Type: {ctype}\r\nContent-Transfer-Encoding: {cte}\r\n\r\n".encode() + data
        return mime.part_text(raw, mime.parse(raw).root)

    assert text("text/plain; charset=utf-8", "héllo".encode()) == "héllo"
    assert text("text/plain; charset=iso-8859-1", b"h\xe9llo \x80") == "héllo €"  # read as cp1252
    assert text("text/plain; charset=koi8-r", "привет".encode("koi8-r")) == "привет"
    assert text("text/plain", "héllo".encode()) == "héllo"
    assert text("text/plain; charset=us-ascii", b"h\xe9llo") == "h\xe9llo"
    assert text("text/plain; charset=rot13", b"abc") == "abc"
    assert text("text/plain; charset=utf-8", b"h\xffllo") == "h\ufffdllo"
    assert text("text/plain; charset=utf-16", "hi".encode("utf-16"), "8bit") == "hi"
    assert text("text/plain; charset=utf-8", b"Y2Fmw6k=", "base64") == "café"


def test_preview_and_attachments() -> None:
    raw = msg(
        'Content-Type: multipart/mixed; boundary="b"',
        "",
        "--b",
        "Content-Type: text/plain; name=notes.txt",
        "",
        "not the body",
        "--b",
        "Content-Type: text/html",
        "",
        "<html><head><style>p {color: red}</style><script>x()</script></head>",
        "<body><!-- c --><p>Hello&nbsp;<b>there</b> &amp; more</p></body></html>",
        "--b--",
    )
    m = mime.parse(raw)
    assert m.preview == "Hello there & more"
    assert m.has_attachment
    inline = msg(
        'Content-Type: multipart/related; boundary="b"',
        "",
        "--b",
        "Content-Type: text/plain",
        "",
        "x " * 400,
        "--b",
        "Content-Type: image/png; name=a.png",
        "Content-Disposition: inline",
        "",
        "png",
        "--b--",
    )
    m = mime.parse(inline)
    assert not m.has_attachment
    assert m.preview == ("x " * 128).strip()


# ---------------------------------------------------------------------------
# Serialization


@pytest.mark.parametrize("raw", [SIMPLE, MIXED, RFC822, b"", b"\x00garbage"])
def test_encode_decode_round_trip(raw: bytes) -> None:
    m = mime.parse(raw)
    data = mime.encode(m)
    assert isinstance(data, bytes) and data.isascii()
    assert mime.decode(data) == m
    assert mime.encode(mime.decode(data)) == data


def test_decode_rejects_bad_data() -> None:
    with pytest.raises(ValueError):
        mime.decode(b"[99, []]")
    with pytest.raises(ValueError):
        mime.decode(b"not json")
    with pytest.raises(ValueError):
        mime.decode(b"[1, 5]")


# ---------------------------------------------------------------------------
# Properties

SAMPLES = [SIMPLE, MIXED, RFC822, MIXED.replace(b"\r\n", b"\n"), INNER]
TOKENS = [
    b"\r\n",
    b"\n",
    b"\r\n\r\n",
    b"--",
    b"--outer",
    b"--inner--",
    b"--b1\r\n",
    b":",
    b";",
    b'"',
    b"\\",
    b"(",
    b"<",
    b"\x00",
    b"\xff",
    b"=?utf-8?q?",
    b"?=",
    b"Content-Type: multipart/mixed; boundary=b1\r\n",
    b"Content-Type: message/rfc822\r\n",
    b"Content-Transfer-Encoding: base64\r\n",
    b"*0*=utf-8''%",
    b"[fwd:",
]


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    raw = bytearray(draw(st.sampled_from(SAMPLES)))
    for _ in range(draw(st.integers(1, 8))):
        pos = draw(st.integers(0, len(raw)))
        op = draw(st.integers(0, 3))
        if op == 0:
            raw[pos:pos] = draw(st.sampled_from(TOKENS))
        elif op == 1:
            del raw[pos : pos + draw(st.integers(1, 20))]
        elif op == 2 and pos < len(raw):
            raw[pos] = draw(st.integers(0, 255))
        else:
            raw[pos:pos] = draw(st.binary(max_size=20))
    return bytes(raw)


PROPERTY = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def check_all(raw: bytes) -> None:
    m = mime.parse(raw)
    check_message(raw, m)
    assert mime.decode(mime.encode(m)) == m
    for part in walk(m.root):
        mime.decode_body(raw, part)
        mime.part_text(raw, part)
        mime.header_fields(header(raw, part), ["subject", "content-type"], False)
        mime.header_value(header(raw, part), "content-type")


def walk(part: Part) -> list[Part]:
    out = [part]
    for child in part.children:
        out.extend(walk(child))
    if part.message is not None:
        out.extend(walk(part.message.root))
    return out


@PROPERTY
@given(st.binary(max_size=2000))
def test_property_arbitrary_bytes(raw: bytes) -> None:
    check_all(raw)


@PROPERTY
@given(mutated())
def test_property_mutated_messages(raw: bytes) -> None:
    check_all(raw)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=200))
def test_property_header_text(value: str) -> None:
    raw = b"".join(
        name + b": " + value.encode("utf-8", "surrogatepass") + b"\r\n"
        for name in (b"From", b"To", b"Subject", b"Content-Type", b"Content-Disposition", b"Date", b"References")
    )
    check_all(raw + b"\r\nbody")
    mime.decode_words(value)
    mime.base_subject(value)


# -- incremental decoding (IMAP BINARY) -------------------------------------------------

_B64_TEXT = st.one_of(
    st.binary(max_size=400).map(base64.encodebytes),
    st.lists(st.binary(max_size=40).map(base64.b64encode), max_size=5).map(b"\r\n".join),
    st.lists(st.sampled_from(list(b"AQZaz09+/= \r\n\t-!\x00")), max_size=300).map(bytes),
)
_QP_TEXT = st.one_of(
    st.binary(max_size=400).map(quopri.encodestring),
    st.lists(st.sampled_from(list(b"ab=3D= \t\r\nF0=\r\n\x80")), max_size=300).map(bytes),
)


def _pieces(decoder: mime.Decoder, data: bytes, cuts: list[int]) -> bytes:
    bounds = sorted({0, len(data), *(c % (len(data) + 1) for c in cuts)})
    return b"".join(decoder.feed(data[a:b]) for a, b in zip(bounds, bounds[1:])) + decoder.end()


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(_B64_TEXT.map(lambda d: ("base64", d)), _QP_TEXT.map(lambda d: ("quoted-printable", d)),
                 st.binary(max_size=100).map(lambda d: ("7bit", d))),
       st.lists(st.integers(min_value=0, max_value=500), max_size=8))
def test_decoder_in_pieces_equals_whole_decode(case: tuple[str, bytes], cuts: list[int]) -> None:
    encoding, data = case
    whole = mime.decode_body(data, Part(0, 0, len(data), encoding=encoding))
    try:
        assert _pieces(mime.Decoder(encoding), data, cuts) == whole
        # Counting base64 without decoding gives the same size.
        assert len(_pieces(mime.Decoder(encoding, count_only=True), data, cuts)) == len(whole)
    except mime.TooIrregular:
        assert encoding == "base64" and data.count(b"=") > 128


def test_decoder_gives_up_on_many_equals_signs() -> None:
    data = b"QQ=" * 200
    with pytest.raises(mime.TooIrregular):
        mime.Decoder("base64").feed(data)


@settings(max_examples=400, deadline=None)
@given(
    st.sampled_from(["", "Thu, ", "mon,", "Fri,  "]),
    st.integers(0, 39),
    st.sampled_from(["Jan", "feb", "MAR", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec", "Foo"]),
    st.integers(1000, 9999),
    st.integers(0, 99),
    st.integers(0, 99),
    st.one_of(st.none(), st.integers(0, 99)),
    st.sampled_from(["+", "-"]),
    st.integers(0, 9999),
    st.sampled_from(["", " ", "\t", " (UTC)"]),
)
def test_plain_dates_read_as_the_email_package_reads_them(
    dow: str, day: int, mon: str, year: int, hour: int, minute: int, second: int | None, sign: str, zone: int, tail: str
) -> None:
    import calendar
    import email.utils

    clock = f"{hour:02d}:{minute:02d}" + (f":{second:02d}" if second is not None else "")
    value = f"{dow}{day} {mon} {year} {clock} {sign}{zone:04d}{tail}"
    t = email.utils.parsedate_tz(value)
    expected = None if t is None else float(calendar.timegm((t[0], t[1], t[2], t[3], t[4], t[5], 0, 0, 0)) - (t[9] or 0))
    assert mime._sent_date(value) == expected
