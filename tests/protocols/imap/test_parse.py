"""IMAP parser: bytes in, typed commands out (STYLE.md: parser tests)."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, date, datetime, timedelta, timezone

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocols.imap import response
from protocols.imap.commands import (
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
    State,
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
from protocols.imap.parse import (
    Literal,
    ParseError,
    UnsupportedCharset,
    decode_mutf7,
    encode_mutf7,
    literal_at_end,
    parse_authenticate_response,
    parse_command,
    parse_idle_done,
    parse_string,
    parse_tag,
)


def S(*ranges: int | None | tuple[int | None, int | None]) -> SequenceSet:
    """SequenceSet from numbers (n -> (n, n); None -> *) and (a, b) ranges."""
    return SequenceSet(tuple(r if isinstance(r, tuple) else (r, r) for r in ranges))


F = FetchItem
ALL_UNTIL = S((1, None))
PST = timezone(timedelta(hours=-8))

# --- every command, as real clients send it ---------------------------------

VALID: list[tuple[bytes, Command]] = [
    # any state
    (b"a1 CAPABILITY\r\n", Capability(b"a1")),
    (b"a2 noop\r\n", Noop(b"a2")),
    (b"A3 Logout", Logout(b"A3")),
    (
        b'a ID ("name" "Thunderbird" "version" "115.3.1")\r\n',
        Id(b"a", (("name", "Thunderbird"), ("version", "115.3.1"))),
    ),
    (b"a ID NIL\r\n", Id(b"a", None)),
    (b'a ID ("name" NIL)', Id(b"a", (("name", None),))),
    (b"a ID ()", Id(b"a", ())),
    # not authenticated
    (b"a STARTTLS\r\n", StartTLS(b"a")),
    (b"a AUTHENTICATE PLAIN\r\n", Authenticate(b"a", "PLAIN")),
    (b"a authenticate plain AHVzZXIAcGFzcw==\r\n", Authenticate(b"a", "PLAIN", b"\0user\0pass")),
    (b"a AUTHENTICATE XOAUTH2 =\r\n", Authenticate(b"a", "XOAUTH2", b"")),
    (b"a001 LOGIN SMITH SESAME\r\n", Login(b"a001", b"SMITH", b"SESAME")),
    (b'a LOGIN "user@example.com" "pa ss"\r\n', Login(b"a", b"user@example.com", b"pa ss")),
    (b'a LOGIN "us\\"er" "p\\\\w"\r\n', Login(b"a", b'us"er', b"p\\w")),
    (b"a1 LOGIN {4}\r\nuser {4+}\r\npass\r\n", Login(b"a1", b"user", b"pass")),
    (b'a1 LOGIN {4}\nuser {6}\r\np\r\n"ss\r\n', Login(b"a1", b"user", b'p\r\n"ss')),
    (b"a LOGIN user]x {0}\r\n\r\n", Login(b"a", b"user]x", b"")),
    # authenticated
    (b"a ENABLE CONDSTORE qresync UTF8=ACCEPT", Enable(b"a", ("CONDSTORE", "QRESYNC", "UTF8=ACCEPT"))),
    (b"a SELECT INBOX\r\n", Select(b"a", "INBOX")),
    (b'a select "inbox"\r\n', Select(b"a", "INBOX")),
    (b'a SELECT "INBOX.Sent Items"', Select(b"a", "INBOX.Sent Items")),
    (b'a SELECT "Entw\xc3\xbcrfe"', Select(b"a", "Entw\u00fcrfe")),
    (b"a SELECT INBOX (CONDSTORE)", Select(b"a", "INBOX", condstore=True)),
    (
        b"A02 SELECT INBOX (QRESYNC (67890007 90060115194045000 41:211,214:541))\r\n",
        Select(b"A02", "INBOX", qresync=QResync(67890007, 90060115194045000, S((41, 211), (214, 541)))),
    ),
    (
        (
            b"B04 SELECT INBOX (QRESYNC (67890007 90060115194045000 1:29997 "
            b"(5000,7500,9000,9990:9999 15000,22500,27000,29970,29973,29976:29979)))"
        ),
        Select(
            b"B04",
            "INBOX",
            qresync=QResync(
                67890007,
                90060115194045000,
                S((1, 29997)),
                (S(5000, 7500, 9000, (9990, 9999)), S(15000, 22500, 27000, 29970, 29973, (29976, 29979))),
            ),
        ),
    ),
    (b"a SELECT INBOX (QRESYNC (1 2))", Select(b"a", "INBOX", qresync=QResync(1, 2))),
    (b"a EXAMINE Archive (CONDSTORE)", Examine(b"a", "Archive", condstore=True)),
    (b"a CREATE owatagusiam/\r\n", Create(b"a", "owatagusiam/")),
    (b'a CREATE "Drafts" (USE (\\drafts))', Create(b"a", "Drafts", ("\\Drafts",))),
    (b"a CREATE MyTrash (USE (\\Trash \\X-Custom))", Create(b"a", "MyTrash", ("\\Trash", "\\X-Custom"))),
    (b"a DELETE blurdybloop", Delete(b"a", "blurdybloop")),
    (b'a RENAME "Old" {3}\r\nNew', Rename(b"a", "Old", "New")),
    (b"a SUBSCRIBE #news.comp.mail.mime", Subscribe(b"a", "#news.comp.mail.mime")),
    (b'a UNSUBSCRIBE "a b"', Unsubscribe(b"a", "a b")),
    (b'a LIST "" "*"\r\n', List(b"a", "", ("*",))),
    (b'a LIST "" %', List(b"a", "", ("%",))),
    (b'a LIST "" ""', List(b"a", "", ("",))),
    (b"a LIST ~/Mail/ %/foo]", List(b"a", "~/Mail/", ("%/foo]",))),
    (b'a list "" INBOX.*', List(b"a", "", ("INBOX.*",))),
    (
        b'a LIST (SUBSCRIBED) "" ("INBOX" "Drafts") RETURN (CHILDREN STATUS (MESSAGES UNSEEN))',
        List(
            b"a",
            "",
            ("INBOX", "Drafts"),
            ("SUBSCRIBED",),
            ("CHILDREN", "STATUS"),
            ("MESSAGES", "UNSEEN"),
            extended=True,
        ),
    ),
    (
        b'a LIST (SPECIAL-USE RECURSIVEMATCH) "" "*"',
        List(b"a", "", ("*",), ("SPECIAL-USE", "RECURSIVEMATCH"), extended=True),
    ),
    (
        b'a LIST "" "*" RETURN (SPECIAL-USE SUBSCRIBED)',
        List(b"a", "", ("*",), (), ("SPECIAL-USE", "SUBSCRIBED"), extended=True),
    ),
    (b'a LIST () "" %', List(b"a", "", ("%",), extended=True)),
    (b'a LIST (REMOTE) "" %', List(b"a", "", ("%",), ("REMOTE",), extended=True)),
    (b'a LSUB "#news." "comp.mail.*"', Lsub(b"a", "#news.", "comp.mail.*")),
    (b"a NAMESPACE", Namespace(b"a")),
    (
        b"a STATUS INBOX (MESSAGES RECENT UIDNEXT UIDVALIDITY UNSEEN DELETED SIZE HIGHESTMODSEQ APPENDLIMIT)",
        Status(
            b"a",
            "INBOX",
            (
                "MESSAGES",
                "RECENT",
                "UIDNEXT",
                "UIDVALIDITY",
                "UNSEEN",
                "DELETED",
                "SIZE",
                "HIGHESTMODSEQ",
                "APPENDLIMIT",
            ),
        ),
    ),
    (b'a status "blurdybloop" (uidnext messages)', Status(b"a", "blurdybloop", ("UIDNEXT", "MESSAGES"))),
    (
        b'A1 APPEND saved-messages (\\Seen) "15-Nov-2024 10:00:00 +0000" {5+}\r\nhello\r\n',
        Append(
            b"A1",
            "saved-messages",
            (AppendMessage(("\\Seen",), datetime(2024, 11, 15, 10, tzinfo=UTC), b"hello"),),
        ),
    ),
    (b"a APPEND INBOX {3}\r\nabc", Append(b"a", "INBOX", (AppendMessage((), None, b"abc"),))),
    (
        b'a APPEND "INBOX" () "01-Jan-2000 00:00:00 -0130" {2}\r\nhi\r\n',
        Append(
            b"a",
            "INBOX",
            (AppendMessage((), datetime(2000, 1, 1, tzinfo=timezone(-timedelta(hours=1, minutes=30))), b"hi"),),
        ),
    ),
    (
        # RFC 3502 §6 (MULTIAPPEND), with a space-padded day.
        b'A003 APPEND saved-messages (\\Seen) {3}\r\none (\\Seen $Work) " 7-Feb-1994 22:43:04 -0800" {3}\r\ntwo\r\n',
        Append(
            b"A003",
            "saved-messages",
            (
                AppendMessage(("\\Seen",), None, b"one"),
                AppendMessage(("\\Seen", "$Work"), datetime(1994, 2, 7, 22, 43, 4, tzinfo=PST), b"two"),
            ),
        ),
    ),
    (b"a APPEND INBOX ~{5+}\r\na\0b\0c", Append(b"a", "INBOX", (AppendMessage((), None, b"a\0b\0c", True),))),
    # RFC 6855 §4: UTF8 (literal8), alone and among other messages.
    (
        b"a APPEND INBOX (\\Seen) UTF8 (~{4+}\r\n\xc3\xa9t\xc3)",
        Append(b"a", "INBOX", (AppendMessage(("\\Seen",), None, b"\xc3\xa9t\xc3", True, utf8=True),)),
    ),
    (
        b"a APPEND INBOX {1}\r\nx UTF8 (~{1}\r\ny) {1}\r\nz",
        Append(b"a", "INBOX", (AppendMessage((), None, b"x"), AppendMessage((), None, b"y", True, utf8=True),
                                AppendMessage((), None, b"z"))),
    ),
    (b"a IDLE\r\n", Idle(b"a")),
    # selected
    (b"a CHECK", Check(b"a")),
    (b"a CLOSE", Close(b"a")),
    (b"a UNSELECT", Unselect(b"a")),
    (b"a EXPUNGE", Expunge(b"a")),
    (b"a UID EXPUNGE 3000:3002", Expunge(b"a", True, S((3000, 3002)))),
    (b"a SEARCH ALL\r\n", Search(b"a", False, None, Simple("ALL"))),
    (
        b"a UID SEARCH 1:* UNDELETED UNSEEN",
        Search(b"a", True, None, And((SeqKey(ALL_UNTIL), Simple("UNDELETED"), Simple("UNSEEN")))),
    ),
    (b"a UID SEARCH 1:* NOT DELETED", Search(b"a", True, None, And((SeqKey(ALL_UNTIL), Not(Simple("DELETED")))))),
    (
        b'A282 SEARCH FLAGGED SINCE 1-Feb-1994 NOT FROM "Smith"',
        Search(
            b"A282",
            False,
            None,
            And((Simple("FLAGGED"), DateKey("SINCE", date(1994, 2, 1)), Not(TextKey("FROM", "Smith")))),
        ),
    ),
    (
        b'a SEARCH RETURN (MIN COUNT) CHARSET UTF-8 OR (FROM "x" SUBJECT {3}\r\nabc) NOT SEEN 1:5',
        Search(
            b"a",
            False,
            "UTF-8",
            And(
                (
                    Or(And((TextKey("FROM", "x"), TextKey("SUBJECT", "abc"))), Not(Simple("SEEN"))),
                    SeqKey(S((1, 5))),
                )
            ),
            ("MIN", "COUNT"),
        ),
    ),
    (
        b"a SEARCH CHARSET UTF-8 TEXT {6}\r\nf\xc3\xbc\xc3\xbcr",
        Search(b"a", False, "UTF-8", TextKey("TEXT", "f\u00fc\u00fcr")),
    ),
    (
        b"a SEARCH CHARSET iso-8859-1 SUBJECT {4}\r\nca\xe9 ",
        Search(b"a", False, "ISO-8859-1", TextKey("SUBJECT", "ca\u00e9 ")),
    ),
    (
        b'a SEARCH HEADER Message-ID "<x@y>" BODY hello',
        Search(b"a", False, None, And((HeaderKey("Message-ID", "<x@y>"), TextKey("BODY", "hello")))),
    ),
    (
        b'a SEARCH MODSEQ "/flags/\\\\draft" all 620162338',
        Search(b"a", False, None, ModSeqKey(620162338, "/flags/\\draft", "all")),
    ),
    (b"a SEARCH MODSEQ 0", Search(b"a", False, None, ModSeqKey(0))),
    (b"a SEARCH RETURN (SAVE) FROM x", Search(b"a", False, None, TextKey("FROM", "x"), ("SAVE",))),
    (b"a SEARCH RETURN () ALL", Search(b"a", False, None, Simple("ALL"), ("ALL",))),
    (b"a SEARCH $", Search(b"a", False, None, SeqKey(SequenceSet(saved=True)))),
    (b"a UID SEARCH UID $ SEEN", Search(b"a", True, None, And((UidKey(SequenceSet(saved=True)), Simple("SEEN"))))),
    (
        b"a SEARCH LARGER 100 smaller 5000 OLDER 3600 YOUNGER 60",
        Search(
            b"a",
            False,
            None,
            And(
                (
                    NumberKey("LARGER", 100),
                    NumberKey("SMALLER", 5000),
                    NumberKey("OLDER", 3600),
                    NumberKey("YOUNGER", 60),
                )
            ),
        ),
    ),
    (
        b'a SEARCH KEYWORD $Forwarded UNKEYWORD $Junk ON "3-Mar-2003" SENTBEFORE 01-jan-2020',
        Search(
            b"a",
            False,
            None,
            And(
                (
                    KeywordKey("KEYWORD", "$Forwarded"),
                    KeywordKey("UNKEYWORD", "$Junk"),
                    DateKey("ON", date(2003, 3, 3)),
                    DateKey("SENTBEFORE", date(2020, 1, 1)),
                )
            ),
        ),
    ),
    (
        b"a SEARCH ((SEEN) (UID 1,3:5 OR NEW OLD))",
        Search(
            b"a",
            False,
            None,
            And((Simple("SEEN"), And((UidKey(S(1, (3, 5))), Or(Simple("NEW"), Simple("OLD")))))),
        ),
    ),
    (
        b"a FETCH 2:4 (FLAGS BODY[HEADER.FIELDS (DATE FROM)])",
        Fetch(
            b"a",
            False,
            S((2, 4)),
            (F("FLAGS"), F("BODY", (), "HEADER.FIELDS", ("DATE", "FROM"))),
        ),
    ),
    (
        b"a FETCH 1 ALL",
        Fetch(b"a", False, S(1), (F("FLAGS"), F("INTERNALDATE"), F("RFC822.SIZE"), F("ENVELOPE"))),
    ),
    (b"a FETCH 1 fast", Fetch(b"a", False, S(1), (F("FLAGS"), F("INTERNALDATE"), F("RFC822.SIZE")))),
    (
        b"a FETCH 1 FULL",
        Fetch(b"a", False, S(1), (F("FLAGS"), F("INTERNALDATE"), F("RFC822.SIZE"), F("ENVELOPE"), F("BODY"))),
    ),
    (b"a FETCH 1 BODY[TEXT]<0.2048>", Fetch(b"a", False, S(1), (F("BODY", (), "TEXT", partial=(0, 2048)),))),
    (
        b"a FETCH 1 (BODY.PEEK[1.MIME] BODY[4.2.TEXT] BODY[3.HEADER] BODY[2])",
        Fetch(
            b"a",
            False,
            S(1),
            (
                F("BODY", (1,), "MIME", peek=True),
                F("BODY", (4, 2), "TEXT"),
                F("BODY", (3,), "HEADER"),
                F("BODY", (2,)),
            ),
        ),
    ),
    (
        b"a FETCH 1 (BODY BODYSTRUCTURE ENVELOPE INTERNALDATE MODSEQ RFC822 RFC822.HEADER RFC822.TEXT UID BODY[])",
        Fetch(
            b"a",
            False,
            S(1),
            (
                F("BODY"),
                F("BODYSTRUCTURE"),
                F("ENVELOPE"),
                F("INTERNALDATE"),
                F("MODSEQ"),
                F("RFC822"),
                F("RFC822.HEADER"),
                F("RFC822.TEXT"),
                F("UID"),
                F("BODY", ()),
            ),
        ),
    ),
    (
        # Thunderbird's header fetch.
        (
            b"a UID fetch 1:* (UID RFC822.SIZE FLAGS BODY.PEEK[HEADER.FIELDS (From To Cc Bcc Subject Date "
            b"Message-ID Priority X-Priority References Newsgroups In-Reply-To Content-Type Reply-To)])"
        ),
        Fetch(
            b"a",
            True,
            ALL_UNTIL,
            (
                F("UID"),
                F("RFC822.SIZE"),
                F("FLAGS"),
                F(
                    "BODY",
                    (),
                    "HEADER.FIELDS",
                    (
                        "From",
                        "To",
                        "Cc",
                        "Bcc",
                        "Subject",
                        "Date",
                        "Message-ID",
                        "Priority",
                        "X-Priority",
                        "References",
                        "Newsgroups",
                        "In-Reply-To",
                        "Content-Type",
                        "Reply-To",
                    ),
                    peek=True,
                ),
            ),
        ),
    ),
    (
        b"a UID FETCH 1:* (UID FLAGS) (CHANGEDSINCE 5 VANISHED)",
        Fetch(b"a", True, ALL_UNTIL, (F("UID"), F("FLAGS")), 5, True),
    ),
    (b"s100 UID FETCH 300:500 (FLAGS) (CHANGEDSINCE 12345)", Fetch(b"s100", True, S((300, 500)), (F("FLAGS"),), 12345)),
    (
        b"a FETCH 1 (BINARY.PEEK[1]<0.10> BINARY[] BINARY.SIZE[1.2])",
        Fetch(
            b"a",
            False,
            S(1),
            (
                F("BINARY", (1,), partial=(0, 10), peek=True, binary=True),
                F("BINARY", (), binary=True),
                F("BINARY.SIZE", (1, 2), binary=True),
            ),
        ),
    ),
    (
        b'a FETCH *:4,7 BODY[HEADER.FIELDS.NOT (Received "X-Spam")]',
        Fetch(b"a", False, S((None, 4), 7), (F("BODY", (), "HEADER.FIELDS.NOT", ("Received", "X-Spam")),)),
    ),
    (b"a FETCH $ (FLAGS)", Fetch(b"a", False, SequenceSet(saved=True), (F("FLAGS"),))),
    (b"a FETCH * ()", Fetch(b"a", False, S(None), ())),
    (b"A654 FETCH 2:4 (FLAGS)", Fetch(b"A654", False, S((2, 4)), (F("FLAGS"),))),
    (
        b"A003 STORE 2:4 +FLAGS (\\Deleted)",
        Store(b"A003", False, S((2, 4)), StoreMode.ADD, False, ("\\Deleted",)),
    ),
    (
        b"a UID STORE 1 -FLAGS.SILENT (\\Seen)",
        Store(b"a", True, S(1), StoreMode.REMOVE, True, ("\\Seen",)),
    ),
    (
        b"a STORE 1 FLAGS \\Seen \\flagged $Label1",
        Store(b"a", False, S(1), StoreMode.REPLACE, False, ("\\Seen", "\\Flagged", "$Label1")),
    ),
    (b"a STORE 1 FLAGS ()", Store(b"a", False, S(1), StoreMode.REPLACE, False, ())),
    (
        b"a STORE 1:3 (UNCHANGEDSINCE 12) +FLAGS.SILENT (\\Deleted)",
        Store(b"a", False, S((1, 3)), StoreMode.ADD, True, ("\\Deleted",), 12),
    ),
    (
        b"d105 STORE 7,5,9 (UNCHANGEDSINCE 320162338) +FLAGS.SILENT (\\Deleted)",
        Store(b"d105", False, S(7, 5, 9), StoreMode.ADD, True, ("\\Deleted",), 320162338),
    ),
    (b"a STORE 1 +flags.silent (\\SEEN)", Store(b"a", False, S(1), StoreMode.ADD, True, ("\\Seen",))),
    (b"A003 COPY 2:4 MEETING", Copy(b"A003", False, S((2, 4)), "MEETING")),
    (b'a UID COPY 4827313:4828442 "Saved"', Copy(b"a", True, S((4827313, 4828442)), "Saved")),
    (b"a MOVE 1:3 Trash", Move(b"a", False, S((1, 3)), "Trash")),
    (b'a UID MOVE 42 "INBOX"', Move(b"a", True, S(42), "INBOX")),
    (
        b"A282 SORT (SUBJECT) UTF-8 SINCE 1-Feb-1994",
        Sort(b"A282", False, (SortCriterion("SUBJECT"),), "UTF-8", DateKey("SINCE", date(1994, 2, 1))),
    ),
    (
        b"a UID SORT (REVERSE ARRIVAL reverse date DISPLAYFROM) US-ASCII ALL",
        Sort(
            b"a",
            True,
            (SortCriterion("ARRIVAL", True), SortCriterion("DATE", True), SortCriterion("DISPLAYFROM")),
            "US-ASCII",
            Simple("ALL"),
        ),
    ),
    (
        b"a SORT RETURN (MIN) (DATE) UTF-8 UNDELETED",
        Sort(b"a", False, (SortCriterion("DATE"),), "UTF-8", Simple("UNDELETED"), ("MIN",)),
    ),
    (
        b"A283 THREAD ORDEREDSUBJECT UTF-8 SINCE 5-MAR-2000",
        Thread(b"A283", False, "ORDEREDSUBJECT", "UTF-8", DateKey("SINCE", date(2000, 3, 5))),
    ),
    (b"a UID THREAD references US-ASCII ALL", Thread(b"a", True, "REFERENCES", "US-ASCII", Simple("ALL"))),
]


@pytest.mark.parametrize(("line", "expected"), VALID, ids=[v[0][:48].decode("latin-1") for v in VALID])
def test_valid(line: bytes, expected: Command) -> None:
    assert parse_command(line) == expected


@pytest.mark.parametrize(("line", "expected"), VALID[:20], ids=[v[0][:48].decode("latin-1") for v in VALID[:20]])
def test_valid_bytearray(line: bytes, expected: Command) -> None:
    assert parse_command(bytearray(line)) == expected


def test_states() -> None:
    assert Login.states == State.NOT_AUTHENTICATED
    assert State.SELECTED in Fetch.states and State.AUTHENTICATED not in Fetch.states
    assert State.AUTHENTICATED in Select.states and State.SELECTED in Select.states
    assert Enable.states == State.AUTHENTICATED
    assert all(s in Noop.states for s in State)
    assert parse_command(b"a UID FETCH 1 FLAGS").name == "FETCH"
    for _, cmd in VALID:
        assert cmd.name and isinstance(cmd.states, State)


# --- errors -------------------------------------------------------------------

INVALID: list[tuple[bytes, bytes | None]] = [
    (b"", None),
    (b"\r\n", None),
    (b"+ foo\r\n", None),
    (b"(a) NOOP", None),
    (b" NOOP", None),
    (b"a", b"a"),
    (b"a ", b"a"),
    (b"a FOO", b"a"),
    (b"a UID FOO 1", b"a"),
    (b"a UID LOGIN x y", b"a"),
    (b"a NOOP extra", b"a"),
    (b"a NOOP ", b"a"),
    (b"a LOGIN user", b"a"),
    (b"a LOGIN  user pass", b"a"),
    (b"a LOGIN {5}\r\nab", b"a"),
    (b"a LOGIN {5}ab cd", b"a"),
    (b"a LOGIN {123456789012345678901}\r\nab cd", b"a"),
    (b'a LOGIN "unterminated pass', b"a"),
    (b'a LOGIN "a\x00b" c', b"a"),
    (b'a LOGIN "a\\xb" c', b"a"),
    (b'a LOGIN "a\rb" c', b"a"),
    (b"a LOGIN ~{1}\r\nx y", b"a"),
    (b"a AUTHENTICATE PLAIN !!!", b"a"),
    (b"a AUTHENTICATE PLAIN AHVzZXIAcGFzcw", b"a"),
    (b"a AUTHENTICATE", b"a"),
    (b"a ENABLE", b"a"),
    (b'a SELECT "\xff"', b"a"),
    (b"a SELECT INBOX (FOO)", b"a"),
    (b"a SELECT INBOX (QRESYNC (0 1))", b"a"),
    (b"a SELECT INBOX (QRESYNC (1 2 1:*))", b"a"),
    (b"a SELECT INBOX (QRESYNC (1 2 1:5 (1:2)))", b"a"),
    (b"a SELECT a\xc3\xa9", b"a"),
    (b"a CREATE x (FOO (\\Drafts))", b"a"),
    (b"a RENAME a", b"a"),
    (b'a LIST (RECURSIVEMATCH) "" *', b"a"),
    (b'a LIST (FOO) "" *', b"a"),
    (b'a LIST "" * RETURN (FOO)', b"a"),
    (b'a LIST "" * RETURN (STATUS ())', b"a"),
    (b'a LIST "" * FOO (CHILDREN)', b"a"),
    (b'a LIST "" ()', b"a"),
    (b"a STATUS INBOX (FOO)", b"a"),
    (b"a STATUS INBOX ()", b"a"),
    (b"a STATUS INBOX", b"a"),
    (b"a APPEND INBOX", b"a"),
    (b'a APPEND INBOX "abc"', b"a"),
    (b'a APPEND INBOX "32-Nov-2024 10:00:00 +0000" {1}\r\nx', b"a"),
    (b'a APPEND INBOX "30-Foo-2024 10:00:00 +0000" {1}\r\nx', b"a"),
    (b'a APPEND INBOX "30-Nov-2024 10:00:00 +0060" {1}\r\nx', b"a"),
    (b'a APPEND INBOX "30-Nov-2024 25:00:00 +0000" {1}\r\nx', b"a"),
    (b"a APPEND INBOX {3}\r\nab", b"a"),
    (b"a APPEND INBOX {1}\r\nab", b"a"),
    (b"a APPEND INBOX UTF8 ({1}\r\nx)", b"a"),
    (b"a APPEND INBOX UTF8 (~{1}\r\nx", b"a"),
    (b"a APPEND INBOX UTF8 ~{1}\r\nx", b"a"),
    (b"a FETCH 0 FLAGS", b"a"),
    (b"a FETCH 4294967296 FLAGS", b"a"),
    (b"a FETCH 1:2:3 FLAGS", b"a"),
    (b"a FETCH 1,,2 FLAGS", b"a"),
    (b"a FETCH 1, FLAGS", b"a"),
    (b"a FETCH 1 (FLAGS", b"a"),
    (b"a FETCH 1 (ALL)", b"a"),
    (b"a FETCH 1 FOO", b"a"),
    (b"a FETCH 1 BODY.PEEK", b"a"),
    (b"a FETCH 1 BODY[MIME]", b"a"),
    (b"a FETCH 1 BODY[1.]", b"a"),
    (b"a FETCH 1 BODY[0]", b"a"),
    (b"a FETCH 1 BODY[FOO]", b"a"),
    (b"a FETCH 1 BODY[HEADER.FIELDS]", b"a"),
    (b"a FETCH 1 BODY[HEADER.FIELDS ()]", b"a"),
    (b"a FETCH 1 BODY[]<0.0>", b"a"),
    (b"a FETCH 1 BODY[]<0>", b"a"),
    (b"a FETCH 1 BINARY[TEXT]", b"a"),
    (b"a FETCH 1 BINARY.SIZE", b"a"),
    (b"a FETCH 1 FLAGS (VANISHED)", b"a"),
    (b"a FETCH 1 FLAGS (CHANGEDSINCE 1 VANISHED)", b"a"),
    (b"a UID FETCH 1 FLAGS (VANISHED)", b"a"),
    (b"a UID FETCH 1 FLAGS (CHANGEDSINCE 1 CHANGEDSINCE 2)", b"a"),
    (b"a UID FETCH 1 FLAGS (FOO)", b"a"),
    (b"a UID FETCH 1 FLAGS (CHANGEDSINCE 99999999999999999999)", b"a"),
    (b"a STORE 1 FLAGS", b"a"),
    (b"a STORE 1 FOO (\\Seen)", b"a"),
    (b"a STORE 1 +FLAGS.SILENT (UNCHANGEDSINCE 12) (\\Deleted)", b"a"),
    (b"a STORE 1 (FOO 12) FLAGS (\\Deleted)", b"a"),
    (b"a STORE 1 +FLAGS (\\Seen", b"a"),
    (b"a STORE 1 +FLAGS (\\)", b"a"),
    (b"a COPY 1", b"a"),
    (b"a SEARCH", b"a"),
    (b"a SEARCH ", b"a"),
    (b"a SEARCH FOO", b"a"),
    (b"a SEARCH SEEN ", b"a"),
    (b"a SEARCH SEEN  UNSEEN", b"a"),
    (b"a SEARCH ()", b"a"),
    (b"a SEARCH (SEEN", b"a"),
    (b"a SEARCH SEEN)", b"a"),
    (b"a SEARCH OR SEEN", b"a"),
    (b"a SEARCH BEFORE 31-Feb-2024", b"a"),
    (b"a SEARCH BEFORE 1-Feb-24", b"a"),
    (b"a SEARCH LARGER x", b"a"),
    (b"a SEARCH OLDER 0", b"a"),
    (b'a SEARCH MODSEQ "/flags/\\\\Seen" foo 5', b"a"),
    (b"a SEARCH KEYWORD \\Seen", b"a"),
    (b"a SEARCH FROM {2}\r\n\xff\xfe", b"a"),
    (b"a SEARCH RETURN (FOO) ALL", b"a"),
    (b"a SEARCH CHARSET", b"a"),
    (b"a SORT (FOO) UTF-8 ALL", b"a"),
    (b"a SORT () UTF-8 ALL", b"a"),
    (b"a SORT (DATE) UTF-8", b"a"),
    (b"a THREAD FOO UTF-8 ALL", b"a"),
    (b'a ID ("name")', b"a"),
    (b'a ID ("' + b"x" * 31 + b'" NIL)', b"a"),
    (b"a ID (" + b'"a" "b" ' * 31 + b")", b"a"),
    (b"a SEARCH " + b"(" * 101 + b"ALL" + b")" * 101, b"a"),
    (b"a SEARCH " + b"NOT " * 200 + b"ALL", b"a"),
    (b"a SEARCH " + b"OR ALL " * 200 + b"ALL", b"a"),
]


@pytest.mark.parametrize(("line", "tag"), INVALID, ids=[v[0][:48].decode("latin-1") for v in INVALID])
def test_invalid(line: bytes, tag: bytes | None) -> None:
    with pytest.raises(ParseError) as info:
        parse_command(line)
    assert info.value.tag == tag
    assert info.type is ParseError
    assert info.value.message and info.value.message.isascii() and "\n" not in info.value.message


@pytest.mark.parametrize(
    "charset", [b"X-UNKNOWN", b"rot13", b"base64", b"unicode_escape", b'"\xc3\xa9"', b"{3}\r\na\x00b"]
)
def test_unsupported_charset_is_no_not_bad(charset: bytes) -> None:
    with pytest.raises(UnsupportedCharset) as info:
        parse_command(b"t1 SEARCH CHARSET " + charset + b" ALL")
    assert info.value.tag == b"t1"
    with pytest.raises(UnsupportedCharset):
        parse_command(b"t1 SORT (DATE) " + charset + b" ALL")


@pytest.mark.parametrize(
    ("line", "resets"),
    [
        (b"t1 SEARCH RETURN (SAVE) CHARSET X-UNKNOWN ALL", True),
        (b"t1 SEARCH RETURN (MIN SAVE) NOSUCHKEY", True),
        (b"t1 UID SEARCH RETURN (SAVE BOGUS) ALL", True),
        (b"t1 SEARCH RETURN (MIN) NOSUCHKEY", False),
        (b"t1 SEARCH NOSUCHKEY", False),
        (b"t1 FETCH $ NOSUCHITEM", False),
    ],
)
def test_failed_search_save_is_marked_to_reset_the_saved_result(line: bytes, resets: bool) -> None:
    # RFC 5182 §2.1: the session empties '$' when such a command fails.
    with pytest.raises(ParseError) as info:
        parse_command(line)
    assert info.value.resets_saved is resets


def test_search_depth_limit_allows_reasonable_nesting() -> None:
    cmd = parse_command(b"a SEARCH " + b"(" * 50 + b"SEEN" + b")" * 50)
    assert isinstance(cmd, Search) and cmd.key == Simple("SEEN")


def test_too_many_tokens() -> None:
    with pytest.raises(ParseError, match="Too many"):
        parse_command(b"a FETCH " + b"1," * 100_001 + b"2 FLAGS")


@pytest.mark.parametrize(
    "line",
    [
        b'a LOGIN "' + b"\\a" * 50_000,
        b'a LOGIN "' + b"a" * 200_000,
        b"a SEARCH " + b"(" * 100_000,
        b"a FETCH " + b"1:" * 100_000,
        b"a LIST " + b"%" * 200_000 + b" x",
        b"a SEARCH " + b"SEEN " * 20_000,
        b"a " + b"{" * 100_000,
    ],
    ids=["escapes", "long-quoted", "parens", "colons", "wildcards", "many-keys", "braces"],
)
def test_hostile_input_is_refused(line: bytes) -> None:
    # Speed on such input is measured by benchmarks, never asserted here.
    with pytest.raises(ParseError):
        parse_command(line)


# --- framing helpers ------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (b"a LOGIN {4}\r\n", Literal(4, False, False)),
        (b"a LOGIN user {11+}\r\n", Literal(11, True, False)),
        (b"a APPEND INBOX ~{310}\r\n", Literal(310, False, True)),
        (b"a APPEND INBOX (\\Seen) ~{0+}\r\n", Literal(0, True, True)),
        (b"a LOGIN {4}\n", Literal(4, False, False)),
        (b"a NOOP\r\n", None),
        (b'a LOGIN "{4}"\r\n', None),
        (b"a LOGIN {4}x\r\n", None),
        (b"a LOGIN {4}", None),
        (b"a LOGIN {-4}\r\n", None),
        (b"a LOGIN {123456789012345678901}\r\n", None),
        (b"", None),
    ],
)
def test_literal_at_end(line: bytes, expected: Literal | None) -> None:
    assert literal_at_end(line) == expected


def test_parse_tag() -> None:
    assert parse_tag(b"a1 APPEND INBOX {99999999}\r\n") == b"a1"
    assert parse_tag(b"a1") is None
    assert parse_tag(b"+ x") is None
    assert parse_tag(b"") is None


def test_idle_done() -> None:
    assert parse_idle_done(b"DONE\r\n")
    assert parse_idle_done(b"done\r\n")
    assert parse_idle_done(b"DONE")
    assert not parse_idle_done(b"DONE x\r\n")
    assert not parse_idle_done(b"a NOOP\r\n")


def test_authenticate_response() -> None:
    assert parse_authenticate_response(b"AHVzZXIAcGFzcw==\r\n") == b"\0user\0pass"
    assert parse_authenticate_response(b"\r\n") == b""
    assert parse_authenticate_response(b"*\r\n") is None
    for bad in (b"!!\r\n", b"AHVzZXIAcGFzcw\r\n", b"* \r\n"):
        with pytest.raises(ParseError) as info:
            parse_authenticate_response(bad)
        assert info.value.tag is None


# --- modified UTF-7 -------------------------------------------------------------


@pytest.mark.parametrize(
    ("encoded", "decoded"),
    [
        ("INBOX", "INBOX"),
        ("&-", "&"),
        ("a&-b", "a&b"),
        ("~peter/mail/&U,BTFw-/&ZeVnLIqe-", "~peter/mail/\u53f0\u5317/\u65e5\u672c\u8a9e"),
        ("Entw&APw-rfe", "Entw\u00fcrfe"),
        ("&2D3eAA-", "\U0001f600"),
        ("", ""),
    ],
)
def test_mutf7(encoded: str, decoded: str) -> None:
    assert decode_mutf7(encoded) == decoded
    assert encode_mutf7(decoded) == encoded


@pytest.mark.parametrize("bad", ["&Jjo", "&AGE-", "caf\u00e9", "&Jjo!-", "&A-", "&AP0", "&APx-", "&2D0-", "a\x01"])
def test_mutf7_invalid(bad: str) -> None:
    with pytest.raises(ValueError):
        decode_mutf7(bad)


@given(st.text())
def test_mutf7_round_trip(text: str) -> None:
    encoded = encode_mutf7(text)
    assert encoded.isascii()
    if not any("\ud800" <= c <= "\udfff" for c in text):
        assert decode_mutf7(encoded) == text


# --- value types -----------------------------------------------------------------


def test_sequence_set_resolve_and_contains() -> None:
    s = S((5, None), 2, (None, 3))
    assert s.resolve(10) == [(2, 10)]
    assert s.resolve(4) == [(2, 5)]
    assert s.resolve(0) == [(2, 2)]
    assert S((9, 3), 1).resolve(5) == [(1, 1), (3, 9)]
    assert list(S((1, 3), 7).iter(10)) == [1, 2, 3, 7]
    assert s.contains(7, 10) and not s.contains(11, 10) and not s.contains(1, 10)
    assert S((9, 3)).contains(5, 0)
    assert not S(None).contains(1, 0)
    assert str(S((1, 5), 7, (9, None), None)) == "1:5,7,9:*,*"
    with pytest.raises(ValueError):
        SequenceSet(saved=True).resolve(3)


def test_fetch_item_label() -> None:
    assert F("FLAGS").label() == b"FLAGS"
    assert F("BODY").label() == b"BODY"
    assert F("BODY", ()).label() == b"BODY[]"
    assert F("BODY", (1, 2), "HEADER.FIELDS", ("From", "X Y"), (0, 100), peek=True).label() == (
        b'BODY[1.2.HEADER.FIELDS (From "X Y")]<0>'
    )
    assert F("BODY", (), "TEXT").label() == b"BODY[TEXT]"
    assert F("BINARY", (1,), partial=(5, 10), peek=True, binary=True).label() == b"BINARY[1]<5>"
    assert F("BINARY.SIZE", (1,), binary=True).label() == b"BINARY.SIZE[1]"


# --- property tests -------------------------------------------------------------

VERBS = [
    b"CAPABILITY", b"LOGIN", b"AUTHENTICATE", b"ID", b"ENABLE", b"SELECT", b"EXAMINE", b"CREATE", b"LIST",
    b"STATUS", b"APPEND", b"FETCH", b"UID FETCH", b"STORE", b"UID STORE", b"SEARCH", b"UID SEARCH", b"SORT",
    b"THREAD", b"COPY", b"MOVE", b"UID EXPUNGE", b"RENAME", b"LSUB",
]  # fmt: skip
FUZZ_ALPHABET = (
    b' ()[]<>{}~+*%$:,."\\\r\n0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz\x00\xff\xc3\xa9'
)


def _check(data: bytes) -> None:
    try:
        result = parse_command(data)
    except ParseError as e:
        assert isinstance(e.message, str) and "\n" not in e.message
    else:
        assert isinstance(result, Command)


@given(st.binary(max_size=300))
def test_any_bytes_give_command_or_parse_error(data: bytes) -> None:
    _check(data)


@given(
    st.sampled_from(VERBS),
    st.lists(st.sampled_from([bytes([b]) for b in FUZZ_ALPHABET] + [b"{3}\r\n", b"~{2+}\r\n", b"NIL"]), max_size=60),
)
def test_verbs_with_random_arguments(verb: bytes, parts: list[bytes]) -> None:
    _check(b"t " + verb + b" " + b"".join(parts))


@st.composite
def mutated_valid(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(st.sampled_from(VALID))[0])
    for _ in range(draw(st.integers(1, 4))):
        pos = draw(st.integers(0, len(data)))
        op = draw(st.sampled_from(["insert", "delete", "replace"]))
        byte = draw(st.sampled_from(list(FUZZ_ALPHABET)))
        if op == "insert":
            data.insert(pos, byte)
        elif pos < len(data):
            if op == "delete":
                del data[pos]
            else:
                data[pos] = byte
    return bytes(data)


@settings(max_examples=400)
@given(mutated_valid())
def test_mutated_commands_give_command_or_parse_error(data: bytes) -> None:
    _check(data)


# Generators of valid commands together with the expected objects.

bound = st.one_of(st.none(), st.integers(1, 4_294_967_295))
seqsets = st.one_of(
    st.lists(st.tuples(bound, bound), min_size=1, max_size=6).map(lambda r: SequenceSet(tuple(r))),
    st.just(SequenceSet(saved=True)),
)
case = st.sampled_from([str.upper, str.lower, str.title])

SIMPLE_ITEMS = ["ENVELOPE", "FLAGS", "INTERNALDATE", "RFC822", "RFC822.HEADER", "RFC822.SIZE", "RFC822.TEXT",
                "BODYSTRUCTURE", "UID", "MODSEQ", "BODY"]  # fmt: skip
HEADER_NAMES = ["From", "To", "Subject", "Message-ID", "X-Spam-Flag", "References", "List-Id", "Date"]
parts = st.lists(st.integers(1, 1000), max_size=3).map(tuple)
partials = st.one_of(st.none(), st.tuples(st.integers(0, 2**40), st.integers(1, 2**40)))


@st.composite
def fetch_items(draw: st.DrawFn) -> tuple[str, FetchItem]:
    kind = draw(st.sampled_from(["simple", "body", "binary", "binary.size"]))
    if kind == "simple":
        name = draw(st.sampled_from(SIMPLE_ITEMS))
        return draw(case)(name), F(name)
    section = draw(parts)
    partial = draw(partials)
    peek = draw(st.booleans())
    spec = ".".join(map(str, section))
    if kind == "binary.size":
        return f"BINARY.SIZE[{spec}]", F("BINARY.SIZE", section, binary=True)
    tail = "" if partial is None else f"<{partial[0]}.{partial[1]}>"
    if kind == "binary":
        return (
            f"{'binary.peek' if peek else 'BINARY'}[{spec}]{tail}",
            F("BINARY", section, partial=partial, peek=peek, binary=True),
        )
    choices = ["HEADER", "HEADER.FIELDS", "HEADER.FIELDS.NOT", "TEXT", None] + (["MIME"] if section else [])
    text = draw(st.sampled_from(choices))
    headers: tuple[str, ...] = ()
    if text is not None:
        spec = f"{spec}.{text}" if spec else text
        if text.startswith("HEADER.FIELDS"):
            headers = tuple(draw(st.lists(st.sampled_from(HEADER_NAMES), min_size=1, max_size=4)))
            spec += " (" + " ".join(headers) + ")"
    return (
        f"{'BODY.PEEK' if peek else 'body'}[{spec}]{tail}",
        F("BODY", section, text, headers, partial, peek),
    )


@given(
    st.booleans(),
    seqsets,
    st.lists(fetch_items(), min_size=1, max_size=5),
    st.booleans(),
    st.one_of(st.none(), st.integers(0, 2**63 - 1)),
    st.booleans(),
)
def test_generated_fetch(
    uid: bool,
    seqset: SequenceSet,
    items: list[tuple[str, FetchItem]],
    parens: bool,
    changedsince: int | None,
    vanished: bool,
) -> None:
    vanished = vanished and uid and changedsince is not None
    wire = " ".join(w for w, _ in items)
    if parens or len(items) > 1:
        wire = f"({wire})"
    line = f"t{'1 UID' if uid else '2'} FETCH {seqset} {wire}"
    if changedsince is not None:
        line += f" (CHANGEDSINCE {changedsince}{' VANISHED' if vanished else ''})"
    expected = Fetch(b"t1" if uid else b"t2", uid, seqset, tuple(i for _, i in items), changedsince, vanished)
    assert parse_command(line.encode() + b"\r\n") == expected


atoms = st.text("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789$-_.+=&#!'", min_size=1, max_size=12)
system_flags = st.sampled_from(["\\Seen", "\\Answered", "\\Flagged", "\\Deleted", "\\Draft"])


@given(
    st.booleans(),
    seqsets,
    st.sampled_from(list(StoreMode)),
    st.booleans(),
    st.lists(st.one_of(system_flags, atoms), max_size=6),
    st.booleans(),
    st.one_of(st.none(), st.integers(0, 2**63 - 1)),
    case,
)
def test_generated_store(
    uid: bool,
    seqset: SequenceSet,
    mode: StoreMode,
    silent: bool,
    flags: list[str],
    parens: bool,
    unchangedsince: int | None,
    casing: Callable[[str], str],
) -> None:
    action = casing(f"{mode.value}FLAGS{'.SILENT' if silent else ''}")
    flag_text = " ".join(f.upper() if f.startswith("\\") else f for f in flags)
    if parens or not flags:
        flag_text = f"({flag_text})"
    mod = "" if unchangedsince is None else f" (UNCHANGEDSINCE {unchangedsince})"
    line = f"{'x UID' if uid else 'x'} STORE {seqset}{mod} {action} {flag_text}"
    expected = Store(b"x", uid, seqset, mode, silent, tuple(flags), unchangedsince)
    assert parse_command(line.encode()) == expected


MONTHS = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"]
texts = st.text(st.characters(codec="utf-8"), max_size=20)


def render_key(key: SearchKey) -> bytes:
    if isinstance(key, And):
        return b"(" + b" ".join(render_key(k) for k in key.keys) + b")"
    if isinstance(key, Or):
        return b"OR " + render_key(key.left) + b" " + render_key(key.right)
    if isinstance(key, Not):
        return b"NOT " + render_key(key.key)
    if isinstance(key, Simple):
        return key.name.encode()
    if isinstance(key, SeqKey):
        return str(key.seqset).encode()
    if isinstance(key, UidKey):
        return b"UID " + str(key.seqset).encode()
    if isinstance(key, DateKey):
        d = key.date
        return f"{key.name} {d.day}-{MONTHS[d.month - 1]}-{d.year:04d}".encode()
    if isinstance(key, NumberKey):
        return f"{key.name} {key.value}".encode()
    if isinstance(key, TextKey):
        return key.name.encode() + b" " + response.string(key.value)
    if isinstance(key, HeaderKey):
        return b"HEADER " + response.string(key.field) + b" " + response.string(key.value)
    if isinstance(key, KeywordKey):
        return f"{key.name} {key.keyword}".encode()
    assert isinstance(key, ModSeqKey)
    if key.entry is None:
        return b"MODSEQ %d" % key.modseq
    return b"MODSEQ " + response.quoted(key.entry) + f" {key.entry_type} {key.modseq}".encode()


search_leaves = st.one_of(
    st.sampled_from(
        [
            "ALL",
            "ANSWERED",
            "DELETED",
            "DRAFT",
            "FLAGGED",
            "NEW",
            "OLD",
            "RECENT",
            "SEEN",
            "UNANSWERED",
            "UNDELETED",
            "UNDRAFT",
            "UNFLAGGED",
            "UNSEEN",
        ]
    ).map(Simple),
    seqsets.map(SeqKey),
    seqsets.map(UidKey),
    st.builds(DateKey, st.sampled_from(["BEFORE", "ON", "SINCE", "SENTBEFORE", "SENTON", "SENTSINCE"]), st.dates()),
    st.builds(NumberKey, st.sampled_from(["LARGER", "SMALLER"]), st.integers(0, 2**63 - 1)),
    st.builds(NumberKey, st.sampled_from(["OLDER", "YOUNGER"]), st.integers(1, 2**32 - 1)),
    st.builds(TextKey, st.sampled_from(["BCC", "BODY", "CC", "FROM", "SUBJECT", "TEXT", "TO"]), texts),
    st.builds(HeaderKey, st.sampled_from(HEADER_NAMES), texts),
    st.builds(KeywordKey, st.sampled_from(["KEYWORD", "UNKEYWORD"]), atoms),
    st.builds(ModSeqKey, st.integers(0, 2**63 - 1)),
    st.builds(
        ModSeqKey,
        st.integers(0, 2**63 - 1),
        atoms.map(lambda a: "/flags/" + a),
        st.sampled_from(["priv", "shared", "all"]),
    ),
)
search_keys = st.recursive(
    search_leaves,
    lambda inner: st.one_of(
        inner.map(Not),
        st.builds(Or, inner, inner),
        st.lists(inner, min_size=2, max_size=4).map(lambda ks: And(tuple(ks))),
    ),
    max_leaves=12,
)


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(
    st.booleans(),
    search_keys,
    st.one_of(st.none(), st.lists(st.sampled_from(["MIN", "MAX", "ALL", "COUNT", "SAVE"]), min_size=1, max_size=3)),
    st.sampled_from([None, "UTF-8", "us-ascii"]),
)
def test_generated_search(uid: bool, key: SearchKey, return_opts: list[str] | None, charset: str | None) -> None:
    body = render_key(key)
    if charset == "us-ascii":
        try:
            body.decode("ascii")
        except UnicodeDecodeError:
            charset = "UTF-8"
    line = b"s " + (b"UID " if uid else b"") + b"SEARCH "
    if return_opts is not None:
        line += b"RETURN (" + " ".join(return_opts).encode() + b") "
    if charset is not None:
        line += b"CHARSET " + charset.encode() + b" "
    cmd = parse_command(line + body + b"\r\n")
    assert cmd == Search(
        b"s",
        uid,
        None if charset is None else charset.upper(),
        key,
        None if return_opts is None else tuple(return_opts),
    )


# --- the response encoder's strings re-parse to the same bytes ------------------


@given(st.binary(max_size=2000))
def test_string_round_trip(data: bytes) -> None:
    assert parse_string(response.string(data)) == data
    assert parse_string(response.literal(data)) == data
    assert parse_string(response.string(data, utf8=True)) == data
    if not any(b in data for b in b"\0\r\n"):
        assert parse_string(response.quoted(data)) == data


@given(texts)
def test_utf8_string_round_trip(text: str) -> None:
    encoded = response.string(text, utf8=True)
    if "\0" not in text and "\r" not in text and "\n" not in text:
        assert encoded.startswith(b'"')
    assert parse_string(encoded).decode() == text


@given(st.sets(st.one_of(st.integers(1, 200), st.integers(1, 4_294_967_295)), min_size=1, max_size=60))
def test_encode_seqset_round_trip(numbers: set[int]) -> None:
    wire = response.encode_seqset(numbers)
    cmd = parse_command(b"a UID FETCH " + wire + b" UID")
    assert isinstance(cmd, Fetch)
    got: set[int] = set()
    for lo, hi in cmd.seqset.resolve(1):
        got.update(range(lo, hi + 1))
    assert got == numbers
    # Compressed: no two adjacent ranges could be merged.
    ranges = cmd.seqset.resolve(1)
    assert len(ranges) == len(cmd.seqset.ranges)
