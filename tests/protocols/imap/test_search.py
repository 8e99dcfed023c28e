"""SEARCH / SORT / THREAD evaluation and (E)SEARCH / THREAD responses."""

from __future__ import annotations

import asyncio
import base64
import calendar
from datetime import date

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocols.imap import search as s
from protocols.imap.commands import (
    And,
    DateKey,
    HeaderKey,
    KeywordKey,
    ModSeqKey,
    Not,
    NumberKey,
    Or,
    Search,
    SearchKey,
    SeqKey,
    SequenceSet,
    Simple,
    SortCriterion,
    TextKey,
    UidKey,
)
from protocols.imap.parse import parse_command
from storage import mime
from storage.mail import Message


def ts(day: int, hour: int = 12, minute: int = 0) -> int:
    """A POSIX timestamp in March 2025 (UTC)."""
    return calendar.timegm((2025, 3, day, hour, minute, 0))


def crlf(text: str) -> bytes:
    return text.replace("\n", "\r\n").encode("utf-8")


B64_TEXT = base64.encodebytes("Grüße aus Köln\r\nSee you at the café.\r\n".encode()).decode()

# (raw message, flags, internal date, modseq); sequence number = index + 1.
MESSAGES: list[tuple[bytes, tuple[str, ...], int, int]] = [
    (  # 1
        crlf(
            "From: Alice Smith <alice@example.com>\n"
            "To: bob@example.org\n"
            "Subject: Hello world\n"
            "Date: Mon, 3 Mar 2025 10:00:00 +0000\n"
            "Message-ID: <1@x>\n"
            "\n"
            "The quick brown fox.\n"
        ),
        ("\\Seen",),
        ts(3, 10, 5),
        5,
    ),
    (  # 2
        crlf(
            "From: =?UTF-8?Q?J=C3=B6rg_M=C3=BCller?= <jorg@example.de>\n"
            "To: Alice <alice@example.com>\n"
            "Cc: carol@example.net\n"
            "Subject: Re: Hello world\n"
            "Date: Tue, 4 Mar 2025 09:00:00 +0100\n"
            "Message-ID: <2@x>\n"
            "In-Reply-To: <1@x>\n"
            "\n"
            "Indeed.\n"
        ),
        ("\\Seen", "\\Answered", "\\Flagged"),
        ts(4, 8, 5),
        17,
    ),
    (  # 3: multipart, base64 text part; written on 5 March, 6 March in UTC
        crlf(
            "From: Carol <carol@example.net>\n"
            "To: list@example.com\n"
            "Subject: =?ISO-8859-1?Q?Caf=E9?= menu\n"
            "Date: Wed, 5 Mar 2025 23:30:00 -0500\n"
            "Message-ID: <3@x>\n"
            "References: <1@x> <2@x>\n"
            "MIME-Version: 1.0\n"
            'Content-Type: multipart/alternative; boundary="b1"\n'
            "\n"
            "--b1\n"
            "Content-Type: text/plain; charset=utf-8\n"
            "Content-Transfer-Encoding: base64\n"
            "\n" + B64_TEXT + "--b1\n"
            "Content-Type: text/html; charset=utf-8\n"
            "\n"
            "<p>Menu <b>today</b></p>\n"
            "--b1--\n"
        ),
        (),
        ts(6, 4, 35),
        9,
    ),
    (  # 4: reply to a message that is not in the mailbox
        crlf(
            "From: dave@example.com\n"
            "To: list@example.com\n"
            "Subject: Re: Lost thread\n"
            "Date: Fri, 7 Mar 2025 12:00:00 +0000\n"
            "Message-ID: <4@x>\n"
            "References: <missing@x>\n"
            "\n"
            "First answer.\n"
        ),
        ("\\Deleted", "\\Seen"),
        ts(7, 12, 5),
        30,
    ),
    (  # 5: another reply to the missing message; quoted-printable Latin-1
        crlf(
            'From: "Zed Dave" <Dave@example.com>\n'
            "To: list@example.com\n"
            "Subject: Re: Lost thread\n"
            "Date: Sat, 8 Mar 2025 12:00:00 +0000\n"
            "Message-ID: <5@x>\n"
            "In-Reply-To: <missing@x>\n"
            "Content-Type: text/plain; charset=iso-8859-1\n"
            "Content-Transfer-Encoding: quoted-printable\n"
            "\n"
            "Caf=E9 au lait.\n"
        ),
        ("$Important",),
        ts(8, 12, 5),
        2,
    ),
    (  # 6: no Message-ID, no Date (sent date = internal date, the earliest)
        crlf(
            'From: "Bob" <bob@example.org>\n'
            "To: Team: zoe@example.com, adam@example.com;\n"
            "Subject: Lunch\n"
            "X-Priority: 1\n"
            "\n"
            "Noon?\n"
        ),
        ("\\Draft",),
        ts(2, 8, 0),
        11,
    ),
    (  # 7: same subject as 6, unrelated; arrived last
        crlf(
            "From: =?ISO-8859-1?Q?=C9mile?= <emile@example.fr>\n"
            "To: Dave <dave@example.com>\n"
            "Bcc: eve@example.com\n"
            "Subject: Lunch\n"
            "Date: Sun, 9 Mar 2025 12:00:00 +0000\n"
            "Message-ID: <7@x>\n"
            "\n"
            "Yes.\n"
        ),
        ("\\Seen",),
        ts(13, 12, 0),
        40,
    ),
    (  # 8: duplicate Message-ID of 1, a forward
        crlf(
            "From: Alice Smith <alice@example.com>\n"
            "To: carol@example.net\n"
            "Subject: Fwd: Hello world\n"
            "Date: Mon, 10 Mar 2025 12:00:00 +0000\n"
            "Message-ID: <1@x>\n"
            "\n"
            "Forwarded.\n"
        ),
        ("\\Seen", "$important"),
        ts(10, 12, 5),
        8,
    ),
    (  # 9: reply to 3 with an attached message
        crlf(
            "From: Carol <carol@example.net>\n"
            "To: list@example.com\n"
            'Cc: "Bob" <bob@example.org>\n'
            "Subject: Re: =?ISO-8859-1?Q?Caf=E9?= menu\n"
            "Date: Tue, 11 Mar 2025 12:00:00 +0000\n"
            "Message-ID: <9@x>\n"
            "References: <1@x> <2@x> <3@x>\n"
            'Content-Type: multipart/mixed; boundary="b2"\n'
            "\n"
            "--b2\n"
            "Content-Type: text/plain\n"
            "\n"
            "See attached.\n"
            "--b2\n"
            "Content-Type: message/rfc822\n"
            "\n"
            "Subject: Inner secret\n"
            "\n"
            "nested payload\n"
            "--b2--\n"
        ),
        ("\\Seen",),
        ts(11, 12, 5),
        25,
    ),
    (  # 10: no From, group without members, a large body
        crlf(
            "To: undisclosed-recipients:;\n"
            "Subject: [list] Weekly report\n"
            "Date: Wed, 12 Mar 2025 12:00:00 +0000\n"
            "Message-ID: <10@x>\n"
            "\n" + "All is well.\n" * 250
        ),
        (),
        ts(12, 12, 5),
        13,
    ),
]
NOW = float(ts(13, 13, 0))  # one hour after the youngest message (7)


def uid_of(seq: int) -> int:
    return 10 + 2 * seq


class FakeSource:
    """A MessageSource over a dict of raw messages that records every call."""

    def __init__(self, raws: dict[int, bytes]) -> None:
        self.raws = raws
        self.structures = {uid: mime.parse(raw) for uid, raw in raws.items()}
        self.calls: list[tuple[str, int, int | None]] = []

    async def structure(self, msg: Message) -> mime.Message:
        self.calls.append(("structure", msg.uid, None))
        return self.structures[msg.uid]

    async def raw(self, msg: Message, end: int | None = None) -> bytes:
        self.calls.append(("raw", msg.uid, end))
        data = self.raws[msg.uid]
        return data if end is None else data[:end]


def mailbox() -> tuple[list[s.Candidate], FakeSource]:
    cands = []
    raws = {}
    for i, (raw, flags, idate, modseq) in enumerate(MESSAGES):
        seq = i + 1
        uid = uid_of(seq)
        cands.append(s.Candidate(seq, Message(uid, seq, modseq, flags, idate, len(raw))))
        raws[uid] = raw
    return cands, FakeSource(raws)


async def run(key: SearchKey, saved: list[int] | None = None) -> list[int]:
    cands, source = mailbox()
    found = await s.search(
        key, cands, source, largest_seq=len(cands), largest_uid=uid_of(len(cands)), saved_uids=saved, now=NOW
    )
    return [c.seq for c in found]


def seqset(text: str) -> SequenceSet:
    if text == "$":
        return SequenceSet(saved=True)
    ranges: list[tuple[int | None, int | None]] = []
    for part in text.split(","):
        a, _, b = part.partition(":")
        lo = None if a == "*" else int(a)
        hi = lo if not b else (None if b == "*" else int(b))
        ranges.append((lo, hi))
    return SequenceSet(tuple(ranges))


ALL = list(range(1, 11))


def but(*seqs: int) -> list[int]:
    return [n for n in ALL if n not in seqs]


# ---------------------------------------------------------------------------
# SEARCH keys


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("ALL", ALL),
        ("ANSWERED", [2]),
        ("UNANSWERED", but(2)),
        ("DELETED", [4]),
        ("UNDELETED", but(4)),
        ("DRAFT", [6]),
        ("UNDRAFT", but(6)),
        ("FLAGGED", [2]),
        ("UNFLAGGED", but(2)),
        ("SEEN", [1, 2, 4, 7, 8, 9]),
        ("UNSEEN", [3, 5, 6, 10]),
        ("RECENT", []),
        ("NEW", []),
        ("OLD", ALL),
    ],
)
async def test_simple_keys(name: str, expected: list[int]) -> None:
    assert await run(Simple(name)) == expected


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        (KeywordKey("KEYWORD", "$IMPORTANT"), [5, 8]),
        (KeywordKey("UNKEYWORD", "$Important"), but(5, 8)),
        (KeywordKey("KEYWORD", "$Junk"), []),
        (SeqKey(seqset("2:4,*")), [2, 3, 4, 10]),
        (SeqKey(seqset("*:9")), [9, 10]),
        (SeqKey(seqset("12:*")), [10]),  # * = 10: the range is 10:12
        (UidKey(seqset("14:18")), [2, 3, 4]),
        (UidKey(seqset("29:*")), [10]),
        (UidKey(seqset("31:*")), [10]),  # * = 30
        (UidKey(seqset("1:11")), []),
        (DateKey("BEFORE", date(2025, 3, 4)), [1, 6]),
        (DateKey("ON", date(2025, 3, 6)), [3]),  # internal date is UTC
        (DateKey("ON", date(2025, 3, 5)), []),
        (DateKey("SINCE", date(2025, 3, 10)), [7, 8, 9, 10]),
        (DateKey("SENTON", date(2025, 3, 5)), [3]),  # Date: header, timezone disregarded
        (DateKey("SENTON", date(2025, 3, 6)), []),
        (DateKey("SENTBEFORE", date(2025, 3, 4)), [1, 6]),  # 6 has no Date: internal date
        (DateKey("SENTSINCE", date(2025, 3, 11)), [9, 10]),
        (NumberKey("LARGER", 2000), [10]),
        (NumberKey("SMALLER", 2000), but(10)),
        (NumberKey("YOUNGER", 3601), [7]),
        (NumberKey("YOUNGER", 3600), []),
        (NumberKey("OLDER", 3600), ALL),
        (NumberKey("OLDER", 3601), but(7)),
        (ModSeqKey(20), [4, 7, 9]),
        (ModSeqKey(25, "/flags/\\seen", "all"), [4, 7, 9]),
    ],
)
async def test_record_keys(key: SearchKey, expected: list[int]) -> None:
    assert await run(key) == expected


async def test_larger_smaller_are_strict() -> None:
    size = len(MESSAGES[0][0])
    assert 1 not in await run(NumberKey("LARGER", size))
    assert 1 not in await run(NumberKey("SMALLER", size))
    assert 1 in await run(NumberKey("LARGER", size - 1))


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        (TextKey("FROM", "alice"), [1, 8]),
        (TextKey("FROM", "MÜLLER"), [2]),  # encoded-word decoded, case-folded
        (TextKey("FROM", "example.de"), [2]),
        (TextKey("FROM", "émile"), [7]),
        (TextKey("FROM", ""), but(10)),  # the field must exist
        (TextKey("TO", "alice"), [2]),
        (TextKey("TO", "undisclosed"), [10]),
        (TextKey("TO", "adam@"), [6]),
        (TextKey("CC", "carol"), [2]),
        (TextKey("CC", "bob"), [9]),
        (TextKey("BCC", "eve"), [7]),
        (TextKey("SUBJECT", "café"), [3, 9]),
        (TextKey("SUBJECT", "hello"), [1, 2, 8]),
        (TextKey("SUBJECT", "re"), [2, 4, 5, 9, 10]),
        (TextKey("SUBJECT", "inner"), []),
        (TextKey("BODY", "GRÜSSE"), [3]),  # base64 UTF-8, "ß" folds to "ss"
        (TextKey("BODY", "köln"), [3]),
        (TextKey("BODY", "today"), [3]),  # the text/html part
        (TextKey("BODY", "café au lait"), [5]),  # quoted-printable Latin-1
        (TextKey("BODY", "quick brown"), [1]),
        (TextKey("BODY", "nested payload"), [9]),  # inside message/rfc822
        (TextKey("BODY", "inner secret"), [9]),
        (TextKey("BODY", "hello world"), []),  # only in headers
        (TextKey("TEXT", "hello world"), [1, 2, 8]),
        (TextKey("TEXT", "jörg"), [2]),
        (TextKey("TEXT", "brown fox"), [1]),
        (TextKey("TEXT", "x-priority"), [6]),
        (HeaderKey("X-Priority", ""), [6]),
        (HeaderKey("x-priority", "1"), [6]),
        (HeaderKey("X-Priority", "2"), []),
        (HeaderKey("Message-ID", "1@x"), [1, 8]),
        (HeaderKey("Message-ID", ""), but(6)),
        (HeaderKey("Received", ""), []),
        (HeaderKey("Subject", "CAFÉ"), [3, 9]),
    ],
)
async def test_content_keys(key: SearchKey, expected: list[int]) -> None:
    assert await run(key) == expected


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        (Or(Simple("DRAFT"), Simple("DELETED")), [4, 6]),
        (Not(Or(Simple("SEEN"), Simple("DRAFT"))), [3, 5, 10]),
        (And((Simple("SEEN"), Not(TextKey("FROM", "alice")))), [2, 4, 7, 9]),
        (And((Or(TextKey("SUBJECT", "lunch"), Simple("FLAGGED")), UidKey(seqset("1:22")))), [2, 6]),
        (Or(Not(Simple("ALL")), And((KeywordKey("KEYWORD", "$important"), Not(Simple("SEEN"))))), [5]),
        (Not(Not(TextKey("BODY", "fox"))), [1]),
        (And(()), ALL),
    ],
)
async def test_boolean_keys(key: SearchKey, expected: list[int]) -> None:
    assert await run(key) == expected


async def test_saved_result() -> None:
    assert await run(SeqKey(SequenceSet(saved=True)), saved=[12, 20, 99]) == [1, 5]
    assert await run(UidKey(SequenceSet(saved=True)), saved=[30]) == [10]
    assert await run(SeqKey(SequenceSet(saved=True)), saved=None) == []
    assert await run(Not(SeqKey(SequenceSet(saved=True))), saved=[]) == ALL


async def test_end_to_end_parse_and_search() -> None:
    cmd = parse_command(b'a UID SEARCH OR FROM "alice" SUBJECT "re" NOT SEEN\r\n')
    assert isinstance(cmd, Search) and cmd.uid
    cands, source = mailbox()
    found = await s.search(cmd.key, cands, source, largest_seq=10, largest_uid=30, saved_uids=None, now=NOW)
    # OR: 1, 2, 4, 5, 8, 9, 10; NOT SEEN: 3, 5, 6, 10.
    assert [c.msg.uid for c in found] == [uid_of(5), uid_of(10)]
    assert s.render_search([c.msg.uid for c in found], None) == b"* SEARCH 20 30"


# ---------------------------------------------------------------------------
# Laziness: what the source is asked for


@pytest.mark.parametrize(
    "key",
    [
        Simple("SEEN"),
        And((Simple("UNDELETED"), UidKey(seqset("1:*")), SeqKey(seqset("$")))),
        Or(NumberKey("LARGER", 10), Not(KeywordKey("KEYWORD", "x"))),
        DateKey("SINCE", date(2025, 1, 1)),
        NumberKey("OLDER", 5),
        ModSeqKey(3),
    ],
)
async def test_record_only_keys_read_nothing(key: SearchKey) -> None:
    assert not s.needs_content(key)
    cands, source = mailbox()
    await s.search(key, cands, source, largest_seq=10, largest_uid=30, saved_uids=[12], now=NOW)
    assert source.calls == []


@pytest.mark.parametrize(
    "key",
    [
        TextKey("FROM", "x"),
        TextKey("BODY", "x"),
        HeaderKey("X", ""),
        DateKey("SENTON", date(2025, 3, 5)),
        Or(Simple("SEEN"), Not(TextKey("TEXT", "x"))),
        And((Simple("SEEN"), And((ModSeqKey(1), TextKey("SUBJECT", "x"))))),
    ],
)
def test_needs_content(key: SearchKey) -> None:
    assert s.needs_content(key)


async def test_cheap_keys_short_circuit_content_reads() -> None:
    cands, source = mailbox()
    key = And((TextKey("BODY", "noon"), Simple("DRAFT")))  # the cheap key is written last
    found = await s.search(key, cands, source, largest_seq=10, largest_uid=30, saved_uids=None, now=NOW)
    assert [c.seq for c in found] == [6]
    assert {uid for _, uid, _ in source.calls} == {uid_of(6)}


async def test_content_loaded_at_most_once_per_candidate() -> None:
    cands, source = mailbox()
    key = And(
        (
            TextKey("SUBJECT", "e"),
            TextKey("FROM", "a"),
            Or(TextKey("BODY", "zzz"), TextKey("TEXT", "e")),
            DateKey("SENTSINCE", date(2025, 1, 1)),
        )
    )
    await s.search(key, cands, source, largest_seq=10, largest_uid=30, saved_uids=None, now=NOW)
    for uid in {uid for _, uid, _ in source.calls}:
        calls = [c for c in source.calls if c[1] == uid]
        assert calls.count(("structure", uid, None)) == 1
        assert calls.count(("raw", uid, None)) <= 1
        headers = [c for c in calls if c[0] == "raw" and c[2] is not None]
        assert len(headers) <= 1
        assert all(end == source.structures[uid].headers_end for _, _, end in headers)


async def test_header_keys_read_only_the_header_block() -> None:
    cands, source = mailbox()
    await s.search(TextKey("TO", "list"), cands, source, largest_seq=10, largest_uid=30, saved_uids=None, now=NOW)
    raws = [c for c in source.calls if c[0] == "raw"]
    assert len(raws) == 10
    assert all(end is not None for _, _, end in raws)


async def test_text_key_reads_the_message_once() -> None:
    cands, source = mailbox()
    await s.search(TextKey("TEXT", "zzz"), cands, source, largest_seq=10, largest_uid=30, saved_uids=None, now=NOW)
    assert sorted(c for c in source.calls if c[0] == "raw") == [("raw", uid_of(n), None) for n in ALL]


def test_uses_modseq() -> None:
    assert s.uses_modseq(And((Simple("SEEN"), Not(Or(Simple("ALL"), ModSeqKey(5))))))
    assert not s.uses_modseq(And((Simple("SEEN"), TextKey("FROM", "x"))))


@settings(max_examples=60, deadline=None)
@given(
    st.recursive(
        st.sampled_from(
            [Simple("SEEN"), Simple("DRAFT"), KeywordKey("KEYWORD", "$important"), NumberKey("LARGER", 300)]
        )
        | st.builds(lambda a, b: UidKey(SequenceSet(((a, b),))), st.integers(1, 32), st.integers(1, 32)),
        lambda inner: st.builds(Not, inner)
        | st.builds(Or, inner, inner)
        | st.builds(lambda ks: And(tuple(ks)), st.lists(inner, max_size=3)),
        max_leaves=8,
    )
)
def test_not_is_the_complement(key: SearchKey) -> None:
    yes = asyncio.run(run(key))
    no = asyncio.run(run(Not(key)))
    assert sorted(yes + no) == ALL


# ---------------------------------------------------------------------------
# SORT


async def sorted_seqs(*criteria: SortCriterion) -> list[int]:
    cands, source = mailbox()
    return [c.seq for c in await s.sort(criteria, cands, source)]


R = SortCriterion


@pytest.mark.parametrize(
    ("criteria", "expected"),
    [
        ((R("ARRIVAL"),), [6, 1, 2, 3, 4, 5, 8, 9, 10, 7]),
        ((R("ARRIVAL", True),), [7, 10, 9, 8, 5, 4, 3, 2, 1, 6]),
        ((R("DATE"),), [6, 1, 2, 3, 4, 5, 7, 8, 9, 10]),
        ((R("DATE", True),), [10, 9, 8, 7, 5, 4, 3, 2, 1, 6]),
        ((R("FROM"),), [10, 1, 8, 6, 3, 9, 4, 5, 7, 2]),
        ((R("FROM", True),), [2, 7, 4, 5, 3, 9, 6, 1, 8, 10]),  # ties keep sequence order
        ((R("DISPLAYFROM"),), [10, 1, 8, 6, 3, 9, 4, 7, 2, 5]),
        ((R("TO"),), [10, 2, 1, 8, 7, 3, 4, 5, 9, 6]),  # group markers skipped: 6 sorts as zoe
        ((R("DISPLAYTO"),), [10, 2, 1, 8, 7, 3, 4, 5, 9, 6]),
        ((R("DISPLAYTO", True),), [6, 3, 4, 5, 9, 7, 8, 1, 2, 10]),
        ((R("CC"),), [1, 3, 4, 5, 6, 7, 8, 10, 9, 2]),
        ((R("SUBJECT"),), [3, 9, 1, 2, 8, 4, 5, 6, 7, 10]),
        ((R("SUBJECT"), R("DATE", True)), [9, 3, 8, 2, 1, 5, 4, 7, 6, 10]),
        ((R("SUBJECT", True), R("ARRIVAL")), [10, 6, 7, 4, 5, 1, 2, 8, 3, 9]),
        ((), ALL),
    ],
)
async def test_sort(criteria: tuple[SortCriterion, ...], expected: list[int]) -> None:
    assert await sorted_seqs(*criteria) == expected


async def test_sort_size() -> None:
    sizes = {i + 1: len(m[0]) for i, m in enumerate(MESSAGES)}
    assert await sorted_seqs(R("SIZE")) == sorted(ALL, key=lambda n: sizes[n])
    assert await sorted_seqs(R("SIZE", True)) == sorted(ALL, key=lambda n: -sizes[n])


async def test_sort_by_record_reads_nothing_and_structure_once() -> None:
    cands, source = mailbox()
    await s.sort([R("ARRIVAL"), R("SIZE", True)], cands, source)
    assert source.calls == []
    await s.sort([R("SUBJECT"), R("FROM"), R("DATE")], cands, source)
    assert sorted(source.calls) == [("structure", uid_of(n), None) for n in ALL]


async def test_sort_unknown_key() -> None:
    cands, source = mailbox()
    with pytest.raises(ValueError):
        await s.sort([R("COLOR")], cands, source)


# ---------------------------------------------------------------------------
# THREAD


async def threads(algorithm: str, uid: bool = False) -> bytes:
    cands, source = mailbox()
    return s.render_thread(await s.thread(algorithm, cands, source), uid)


async def test_thread_orderedsubject() -> None:
    # Groups by base subject, first message the parent of the others,
    # threads in the order of their first message's sent date.
    assert await threads("ORDEREDSUBJECT") == b"(6 7)(1 (2)(8))(3 9)(4 5)(10)"


async def test_thread_references() -> None:
    # 6 and 7 share a subject and are unrelated: a dummy holds both (step 5).
    # 8 duplicates 1's Message-ID, so it gets its own and, being a forward of
    # the same subject, becomes a child of 1 (step 5). 4 and 5 answer a
    # missing message: its dummy stays at the top with two children.
    assert await threads("references") == b"((6)(7))(1 (2 3 9)(8))((4)(5))(10)"
    assert await threads("REFERENCES", uid=True) == b"((22)(24))(12 (14 16 28)(26))((18)(20))(30)"


def make(
    seq: int,
    message_id: str | None,
    refs: list[str] | None = None,
    subject: str = "",
    day: int = 1,
) -> tuple[s.Candidate, mime.Message]:
    st_ = mime.Message(
        envelope=mime.Envelope(subject=subject or None),
        root=mime.Part(0, 0, 0),
        message_id=message_id,
        references=refs or [],
        base_subject=mime.base_subject(subject) if subject else "",
        sent_date=float(ts(day)),
    )
    return s.Candidate(seq, Message(100 + seq, seq, 1, (), ts(day), 10)), st_


class StructSource:
    def __init__(self, items: list[tuple[s.Candidate, mime.Message]]) -> None:
        self.by_uid = {c.msg.uid: m for c, m in items}

    async def structure(self, msg: Message) -> mime.Message:
        return self.by_uid[msg.uid]

    async def raw(self, msg: Message, end: int | None = None) -> bytes:
        raise AssertionError("THREAD needs no raw bytes")


async def thread_of(*items: tuple[s.Candidate, mime.Message], algorithm: str = "REFERENCES") -> bytes:
    nodes = await s.thread(algorithm, [c for c, _ in items], StructSource(list(items)))
    return s.render_thread(nodes, False)


async def test_references_rfc5256_examples() -> None:
    # A lone reply to a missing message: the dummy is replaced by its child.
    assert await thread_of(make(1, "a", ["gone"], "Re: x")) == b"(1)"
    # A missing message in the middle of a chain disappears (step 3B).
    assert await thread_of(make(1, "a", [], "x"), make(2, "c", ["a", "b"], "Re: x", 2)) == b"(1 2)"
    # References fill in a parent that arrives later; branching siblings sort by date.
    got = await thread_of(
        make(1, "c", ["a", "b"], "Re: t", 3),
        make(2, "a", [], "t", 1),
        make(3, "b", ["a"], "Re: t", 2),
        make(4, "d", ["a"], "Re: t", 4),
        make(5, "e", ["a", "b", "c"], "Re: t", 5),
    )
    assert got == b"(2 (3 1 5)(4))"


async def test_references_loops_and_self_references() -> None:
    got = await thread_of(make(1, "a", ["b"], "x", 1), make(2, "b", ["a"], "y", 2), make(3, "c", ["c"], "z", 3))
    assert got == b"(2 1)(3)"


async def test_references_subject_merge_rules() -> None:
    # Base subject "q": 1 is a reply, 2 is not, 3 is another reply. The table
    # holds the non-reply (2); replies become its children.
    got = await thread_of(make(1, "a", [], "Re: q", 1), make(2, "b", [], "q", 2), make(3, "c", [], "RE: Q", 3))
    assert got == b"(2 (1)(3))"
    # Two dummies with the same subject merge into one.
    got = await thread_of(
        make(1, "a", ["m1"], "Re: w", 1),
        make(2, "b", ["m1"], "Re: w", 2),
        make(3, "c", ["m2"], "Re: w", 3),
        make(4, "d", ["m2"], "Re: w", 4),
    )
    assert got == b"((1)(2)(3)(4))"
    # Empty subjects are never merged.
    assert await thread_of(make(1, "a", [], "", 1), make(2, "b", [], "", 2)) == b"(1)(2)"


async def test_thread_orderedsubject_small() -> None:
    got = await thread_of(
        make(1, None, [], "b", 5),
        make(2, None, [], "Re: a", 2),
        make(3, None, [], "A", 3),
        make(4, None, [], "b", 1),
        algorithm="ORDEREDSUBJECT",
    )
    assert got == b"(4 1)(2 3)"


async def test_thread_unknown_algorithm() -> None:
    with pytest.raises(ValueError):
        await thread_of(make(1, "a"), algorithm="X-ALGO")


def test_render_thread_rfc5256_example() -> None:
    def n(seq: int, *children: s.ThreadNode) -> s.ThreadNode:
        return s.ThreadNode(s.Candidate(seq, Message(seq * 10, seq, 1, (), 0, 1)), list(children))

    nodes = [n(2), n(3, n(6, n(4, n(23)), n(44, n(7, n(96)))))]
    assert s.render_thread(nodes, False) == b"(2)(3 6 (4 23)(44 7 96))"
    assert s.render_thread(nodes, True) == b"(20)(30 60 (40 230)(440 70 960))"
    dummy = s.ThreadNode(None, [n(3), n(5, n(6))])
    assert s.render_thread([dummy, s.ThreadNode(None, [])], False) == b"((3)(5 6))"
    assert s.render_thread([], False) == b""


def test_render_thread_deep_chain() -> None:
    root = node = s.ThreadNode(s.Candidate(1, Message(1, 1, 1, (), 0, 1)))
    for i in range(2, 5001):
        child = s.ThreadNode(s.Candidate(i, Message(i, i, 1, (), 0, 1)))
        node.children.append(child)
        node = child
    out = s.render_thread([root], False)
    assert out.startswith(b"(1 2 3 ") and out.endswith(b" 4999 5000)")


async def test_references_long_chain() -> None:
    items = [make(1, "m1", [], "long", 1)]
    for i in range(2, 3001):
        refs = [f"m{j}" for j in range(max(1, i - 20), i)]
        items.append(make(i, f"m{i}", refs, "Re: long", 1))
    got = await thread_of(*items)
    assert got == b"(" + b" ".join(b"%d" % i for i in range(1, 3001)) + b")"


@settings(max_examples=80, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.none() | st.sampled_from("abcdef"),
            st.lists(st.sampled_from("abcdefgh"), max_size=4),
            st.sampled_from(["", "s", "Re: s", "t", "Fwd: t"]),
            st.integers(1, 5),
        ),
        max_size=10,
    )
)
def test_threads_contain_every_message_once(specs: list[tuple[str | None, list[str], str, int]]) -> None:
    items = [make(i + 1, mid, refs, subj, day) for i, (mid, refs, subj, day) in enumerate(specs)]
    for algorithm in ("REFERENCES", "ORDEREDSUBJECT"):
        out = asyncio.run(thread_of(*items, algorithm=algorithm))
        assert out.count(b"(") == out.count(b")")
        assert b"()" not in out
        numbers = out.replace(b"(", b" ").replace(b")", b" ").split()
        assert sorted(int(x) for x in numbers) == list(range(1, len(items) + 1))


# ---------------------------------------------------------------------------
# Responses


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        ((b"a", True, [1, 2, 3, 9], ["MIN", "MAX", "COUNT", "ALL"], None),
         b'* ESEARCH (TAG "a") UID MIN 1 MAX 9 COUNT 4 ALL 1:3,9'),
        ((b"A282", False, [2, 10, 11], ["MIN", "COUNT"], None), b'* ESEARCH (TAG "A282") MIN 2 COUNT 3'),
        ((b"t", False, [5, 3, 4], [], None), b'* ESEARCH (TAG "t") ALL 3:5'),  # RETURN () = ALL
        ((b"t", True, [], ["MIN", "MAX", "ALL", "COUNT"], None), b'* ESEARCH (TAG "t") UID COUNT 0'),
        ((b"t", True, [], ["ALL"], 9), b'* ESEARCH (TAG "t") UID'),
        ((b"t", False, [2, 5], ["ALL"], 917162500), b'* ESEARCH (TAG "t") ALL 2,5 MODSEQ 917162500'),
        ((b"t", False, [2, 5], ["max"], 12), b'* ESEARCH (TAG "t") MAX 5 MODSEQ 12'),
        ((b"t", False, [2, 5], ["SAVE"], None), b""),  # RFC 5182 §2.1: no response
        ((b"t", False, [2, 5], ["SAVE", "COUNT"], None), b'* ESEARCH (TAG "t") COUNT 2'),
    ],
)
def test_render_esearch(args: tuple[bytes, bool, list[int], list[str], int | None], expected: bytes) -> None:
    assert s.render_esearch(*args) == expected


def test_render_search() -> None:
    assert s.render_search([2, 5], 917162500) == b"* SEARCH 2 5 (MODSEQ 917162500)"
    assert s.render_search([2, 5], None) == b"* SEARCH 2 5"
    assert s.render_search([], None) == b"* SEARCH"
    assert s.render_search([], 5) == b"* SEARCH"


def test_saved_result() -> None:
    assert s.saved_result([9, 2, 5], ["SAVE"]) == [2, 5, 9]
    assert s.saved_result([9, 2, 5], ["SAVE", "MIN"]) == [2]
    assert s.saved_result([9, 2, 5], ["SAVE", "MIN", "MAX"]) == [2, 9]
    assert s.saved_result([9, 2, 5], ["SAVE", "MAX", "COUNT"]) == [2, 5, 9]
    assert s.saved_result([], ["SAVE", "MIN"]) == []


@pytest.mark.parametrize(
    ("subject", "expected"),
    [
        ("Re: s", True),
        ("  RE[2]: s", True),
        ("[list] Fw: s", True),
        ("t (fwd)", True),
        ("[fwd: s]", True),
        ("=?utf-8?q?Re=3A_x?=", True),
        ("[list] t", False),
        ("Re s", False),
        ("Subject re: x", False),
        (None, False),
    ],
)
def test_reply_or_forward(subject: str | None, expected: bool) -> None:
    # RFC 5256 §2.1: decides which of two same-subject threads is the parent (step 5).
    assert s._is_reply_or_forward(subject) is expected
