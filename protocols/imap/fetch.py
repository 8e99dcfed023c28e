"""FETCH data items (RFC 9051 §6.4.5, §7.5.2; RFC 3516 BINARY; RFC 7162 MODSEQ).

Everything comes from what ingest stored: flags and sizes from the message
record, ENVELOPE and BODYSTRUCTURE from the parsed structure, and body bytes
from the blob, reading only the byte range a section or partial needs.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass

from storage import mime
from storage.mail import Email, Message

from . import response as r
from .commands import FetchItem

RawReader = Callable[[Email, int, int | None], Awaitable[bytes]]
#: ``(email, start, length, step)``: the bytes of a range in pieces of at most ``step``.
RawStreamer = Callable[[Email, int, int, int], AsyncIterator[bytes]]

#: A literal larger than this is sent as it is read (in pieces of
#: :data:`STREAM_STEP`), not read whole first: ``FETCH 1:* BODY.PEEK[]``
#: needs bounded memory, not the mailbox's size.
STREAM_MIN = 256 * 1024
#: Bytes read per transaction when streaming: two blob chunks.
STREAM_STEP = 192 * 1024


@dataclass(slots=True)
class Streamed:
    """A FETCH item whose literal is sent as it is produced: ``head`` (the
    item's label and a space), ``{length}`` (``~{length}``, literal8, when
    ``literal8``), then the bytes :attr:`pieces` yields, ``length`` in all."""

    head: bytes
    length: int
    literal8: bool
    pieces: Callable[[], AsyncIterator[bytes]]


#: One piece of a FETCH response: bytes, or a literal streamed in place.
Piece = bytes | Streamed

_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


def internal_date(ts: int, zone: int = 0) -> bytes:
    """``"17-Jul-1996 02:44:25 -0700"`` (RFC 9051 §9 date-time), in the zone
    ``zone`` (minutes east of UTC) the date was given in."""
    t = time.gmtime(ts + zone * 60)
    sign, off = (b"-", -zone) if zone < 0 else (b"+", zone)
    return b'"%02d-%s-%04d %02d:%02d:%02d %s%02d%02d"' % (
        t.tm_mday, _MONTHS[t.tm_mon - 1].encode(), t.tm_year, t.tm_hour, t.tm_min, t.tm_sec, sign, off // 60, off % 60,
    )


class FetchError(Exception):
    """A section that does not exist or cannot be decoded (BINARY: RFC 3516 §4.2
    answers ``NO [UNKNOWN-CTE]``)."""

    def __init__(self, code: str, text: str) -> None:
        super().__init__(text)
        self.code = code
        self.text = text


def needs_structure(items: Sequence[FetchItem]) -> bool:
    return any(i.name in ("ENVELOPE", "BODYSTRUCTURE", "BINARY", "BINARY.SIZE", "RFC822.HEADER", "RFC822.TEXT")
               or (i.name == "BODY" and (i.section is None or i.section or i.text)) for i in items)


def needs_email(items: Sequence[FetchItem]) -> bool:
    return any(i.name not in ("UID", "FLAGS", "INTERNALDATE", "RFC822.SIZE", "MODSEQ") for i in items)


def sets_seen(items: Sequence[FetchItem]) -> bool:
    """RFC 9051 §6.4.5: BODY[...] without .PEEK, BINARY[...] and RFC822(.TEXT) set \\Seen."""
    return any(
        (i.name in ("BODY", "BINARY") and i.section is not None and not i.peek) or i.name in ("RFC822", "RFC822.TEXT")
        for i in items
    )


@dataclass(slots=True)
class _Range:
    start: int
    end: int


def _section_range(structure: mime.Message, item: FetchItem) -> _Range:
    """Byte range of a BODY[section] (without partial) in the raw message."""
    section = list(item.section or ())
    total = structure.root.end
    if not section:
        msg: mime.Message | None = structure
        part = structure.root
    else:
        found = mime.find_part(structure, section)
        if found is None:
            raise FetchError("NONEXISTENT", "no such body section")
        part = found
        msg = part.message if part.type == "message" and part.message is not None else None
    text = item.text
    if text is None:
        if not section:
            return _Range(0, total)
        return _Range(part.body_start, part.end)
    if text == "MIME":
        return _Range(part.header_start, part.body_start)
    # HEADER, HEADER.FIELDS[.NOT], TEXT of the message or of a message/rfc822 part.
    if msg is None:
        raise FetchError("NONEXISTENT", "section is not a message")
    if text == "TEXT":
        return _Range(msg.root.body_start, msg.root.end)
    return _Range(msg.root.header_start, msg.root.body_start)


def _text_literal(data: bytes) -> bytes:
    """A literal for BODY[...]/RFC822 data. RFC 9051 §4.3: a literal cannot
    hold NUL (only BINARY's literal8 can), so NUL goes out as 0x80, as Dovecot
    does; the stored message is untouched and BINARY[] returns it exactly."""
    if b"\x00" in data:
        data = data.replace(b"\x00", b"\x80")
    return r.literal(data)


def _partial(data: bytes, item: FetchItem) -> bytes:
    if item.partial is None:
        return data
    start, length = item.partial
    return data[start : start + length]


def _simple(msg: Message, name: str) -> bytes | None:
    """Items answered from the message record alone, without awaiting: the
    common ``UID FETCH 1:* (FLAGS)`` renders thousands of these."""
    if name == "UID":
        return b"UID %d" % msg.uid
    if name == "FLAGS":
        return b"FLAGS " + r.encode_flags(msg.flags)
    if name == "INTERNALDATE":
        return b"INTERNALDATE " + internal_date(msg.internal_date, msg.zone)
    if name == "RFC822.SIZE":
        return b"RFC822.SIZE %d" % msg.size
    if name == "MODSEQ":
        return b"MODSEQ (%d)" % msg.modseq
    return None


SIMPLE_ITEMS = frozenset({"UID", "FLAGS", "INTERNALDATE", "RFC822.SIZE", "MODSEQ"})


def render_record(
    seq: int,
    msg: Message,
    items: Sequence[FetchItem],
    *,
    with_uid: bool,
    with_modseq: bool,
    flags_changed: bool = False,
) -> bytes:
    """One FETCH response from the message record alone (all items in
    :data:`SIMPLE_ITEMS`), with no await per message."""
    out: list[bytes] = []
    names: set[str] = set()
    if with_uid:
        out.append(b"UID %d" % msg.uid)
        names.add("UID")
    for item in items:
        if item.name in names:
            continue
        names.add(item.name)
        out.append(_simple(msg, item.name) or b"")
    if flags_changed and "FLAGS" not in names:
        out.append(b"FLAGS " + r.encode_flags(msg.flags))
    if with_modseq and "MODSEQ" not in names:
        out.append(b"MODSEQ (%d)" % msg.modseq)
    return b"* %d FETCH (" % seq + b" ".join(out) + b")\r\n"


class Renderer:
    """Renders the FETCH items of one message."""

    def __init__(self, read_raw: RawReader, stream_raw: RawStreamer, utf8: bool) -> None:
        self.read_raw = read_raw
        self.stream_raw = stream_raw
        self.utf8 = utf8

    def check(self, email: Email | None, items: Sequence[FetchItem]) -> None:
        """Raise the :class:`FetchError` that rendering ``items`` would, from
        the structure alone (no body read). FETCH checks every message
        before it sets \\Seen or sends anything, so that a failing one
        changes nothing (RFC 9051 §6.4.5), and then streams the content."""
        structure: mime.Message | None = None
        for item in items:
            name = item.name
            if name in SIMPLE_ITEMS:
                continue
            if email is None or email.encoded is None:
                raise FetchError("UNAVAILABLE", "message content is not available")
            # Only a numbered part can be missing (or not decodable); the
            # structure is decoded for it alone, as :meth:`content` decodes
            # it again (headers-only fetches of many messages stay cheap).
            if item.section and name in ("BODY", "BINARY", "BINARY.SIZE"):
                if structure is None:
                    structure = email.structure
                    assert structure is not None
                if name == "BODY":
                    _section_range(structure, item)
                else:
                    _binary_part(structure, item)

    async def content(self, msg: Message, email: Email | None, items: Sequence[FetchItem]) -> dict[int, Piece]:
        """The items that come from the message's content (everything but
        :data:`SIMPLE_ITEMS`), by their index in ``items``; large literals
        as :class:`Streamed`. Raises :class:`FetchError` (see :meth:`check`)."""
        out: dict[int, Piece] = {}
        for i, item in enumerate(items):
            if item.name not in SIMPLE_ITEMS:
                out[i] = await self._item(msg, email, item)
        return out

    @staticmethod
    def assemble(
        seq: int,
        msg: Message,
        items: Sequence[FetchItem],
        content: dict[int, Piece],
        *,
        with_uid: bool,
        with_modseq: bool,
        flags_changed: bool = False,
    ) -> list[Piece]:
        """One FETCH response: ``content`` from :meth:`content`, the record
        items (FLAGS, MODSEQ...) from ``msg`` as it is now. Bytes, with any
        streamed literal in its place."""
        if not content:
            return [render_record(seq, msg, items, with_uid=with_uid, with_modseq=with_modseq, flags_changed=flags_changed)]
        out: list[bytes] = []
        pieces: list[Piece] = []
        names: set[str] = set()
        if with_uid:
            out.append(b"UID %d" % msg.uid)
            names.add("UID")
        for i, item in enumerate(items):
            if item.name in ("UID", "FLAGS", "MODSEQ") and item.name in names:
                continue
            names.add(item.name)
            simple = _simple(msg, item.name)
            value = simple if simple is not None else content[i]
            if isinstance(value, Streamed):
                # The text so far, the literal, and the rest after it.
                pieces.append(b"* %d FETCH (" % seq + b" ".join(out) + (b" " if out else b"") if not pieces
                              else b" " + b" ".join(out) + (b" " if out else b""))
                pieces.append(value)
                out = []
            else:
                out.append(value)
        if flags_changed and "FLAGS" not in names:
            out.append(b"FLAGS " + r.encode_flags(msg.flags))
        if with_modseq and "MODSEQ" not in names:
            out.append(b"MODSEQ (%d)" % msg.modseq)
        if not pieces:
            return [b"* %d FETCH (" % seq + b" ".join(out) + b")\r\n"]
        pieces.append((b" " + b" ".join(out) if out else b"") + b")\r\n")
        return pieces

    async def _item(self, msg: Message, email: Email | None, item: FetchItem) -> Piece:
        name = item.name
        if email is None or email.encoded is None:
            raise FetchError("UNAVAILABLE", "message content is not available")
        if name in ("ENVELOPE", "BODYSTRUCTURE") or (name == "BODY" and item.section is None):
            # Renderings of the immutable structure, kept with the cached email.
            key = f"imap-{name}-{item.section is None}-{self.utf8}"
            rendered = email.rendered.get(key)
            if rendered is None:
                rendered = email.rendered[key] = self._structure_item(email, name)
            return rendered
        structure = email.structure
        assert structure is not None
        if name == "RFC822":
            return await self._text(b"RFC822 ", email, 0, structure.root.end)
        if name == "RFC822.HEADER":
            return b"RFC822.HEADER " + _text_literal(await self.read_raw(email, 0, structure.root.body_start))
        if name == "RFC822.TEXT":
            start = structure.root.body_start
            return await self._text(b"RFC822.TEXT ", email, start, structure.root.end - start)
        if name == "BODY":
            return await self._body_section(email, structure, item)
        if name == "BINARY.SIZE":
            return item.label() + b" %d" % await self._binary_size(email, structure, item)
        if name == "BINARY":
            return await self._binary(email, structure, item)
        raise FetchError("CLIENTBUG", f"unknown fetch item {name}")

    async def _text(self, head: bytes, email: Email, start: int, length: int) -> Piece:
        """A literal of the raw message's bytes ``start..start+length``."""
        if length <= STREAM_MIN:
            return head + _text_literal(await self.read_raw(email, start, length))

        async def pieces() -> AsyncIterator[bytes]:
            async for data in self.stream_raw(email, start, length, STREAM_STEP):
                yield data.replace(b"\x00", b"\x80")  # as _text_literal

        return Streamed(head, length, False, pieces)

    def _structure_item(self, email: Email, name: str) -> bytes:
        structure = email.structure
        assert structure is not None
        if name == "ENVELOPE":
            return b"ENVELOPE " + r.render_envelope(structure.envelope, utf8=self.utf8)
        if name == "BODYSTRUCTURE":
            return b"BODYSTRUCTURE " + r.render_bodystructure(structure.root, True, utf8=self.utf8)
        return b"BODY " + r.render_bodystructure(structure.root, False, utf8=self.utf8)

    async def _body_section(self, email: Email, structure: mime.Message, item: FetchItem) -> Piece:
        head = item.label() + b" "
        rng = _section_range(structure, item)
        if item.text in ("HEADER.FIELDS", "HEADER.FIELDS.NOT"):
            header = await self.read_raw(email, rng.start, rng.end - rng.start)
            fields = mime.header_fields(header, list(item.headers), item.text == "HEADER.FIELDS.NOT")
            return head + _text_literal(_partial(fields, item))
        if item.partial is not None:
            start, length = item.partial
            if start >= rng.end - rng.start:
                return head + _text_literal(b"")
            # Only the bytes asked for are read from the blob chunks.
            return await self._text(head, email, rng.start + start, min(length, rng.end - rng.start - start))
        return await self._text(head, email, rng.start, rng.end - rng.start)

    # -- BINARY (RFC 3516) ------------------------------------------------------------

    async def _binary(self, email: Email, structure: mime.Message, item: FetchItem) -> Piece:
        head = item.label() + b" "
        part = _binary_part(structure, item)
        if part is None or part.encoding not in ("base64", "quoted-printable"):
            # Nothing to decode: the stored bytes, as BODY[] but literal8.
            base, size = (0, structure.root.end) if part is None else (part.body_start, part.end - part.body_start)
            start, length = (0, size) if item.partial is None else (min(item.partial[0], size), item.partial[1])
            length = min(length, size - start)
            if length <= STREAM_MIN:
                return head + r.binary(await self.read_raw(email, base + start, length) if length else b"")
            return Streamed(head, length, True, lambda: self.stream_raw(email, base + start, length, STREAM_STEP))
        if item.partial is not None:
            start, length = item.partial
            if length <= STREAM_MIN:
                return head + r.binary(await self._decoded_bytes(email, part, start, length))
        else:
            start, length = 0, -1
        if part.end - part.body_start <= STREAM_MIN:
            # Small: decoding it whole gives its size and its bytes in one read.
            data = await self._decoded_whole(email, part)
            data = data[start:] if length < 0 else data[start : start + length]
            return head + r.binary(data)
        # The literal's length first: it comes before the data.
        size = await self._decoded_size(email, part)
        length = max(0, min(size - start, size if length < 0 else length))
        if length <= STREAM_MIN:
            return head + r.binary(await self._decoded_bytes(email, part, start, length))
        return Streamed(head, length, True, lambda: self._decoded(email, part, start, length))

    async def _binary_size(self, email: Email, structure: mime.Message, item: FetchItem) -> int:
        part = _binary_part(structure, item)
        if part is None:
            return structure.root.end
        return await self._decoded_size(email, part)

    async def _decoded_size(self, email: Email, part: mime.Part) -> int:
        """Size of a part's decoded body, counted piece by piece (base64 is
        not even decoded: its size follows from its length) and kept with
        the cached email, which never changes."""
        encoded = part.end - part.body_start
        if part.encoding not in ("base64", "quoted-printable"):
            return encoded
        key = f"binary-size-{part.body_start}"
        known = email.rendered.get(key)
        if known is not None:
            return int(known)
        size = 0
        decoder = mime.Decoder(part.encoding, count_only=True)
        try:
            async for data in self.stream_raw(email, part.body_start, encoded, STREAM_STEP):
                size += len(decoder.feed(data))
            size += len(decoder.end())
        except mime.TooIrregular:
            email.rendered[f"binary-whole-{part.body_start}"] = b"1"
            size = len(await self._decoded_whole(email, part))
        email.rendered[key] = b"%d" % size
        return size

    async def _decoded_whole(self, email: Email, part: mime.Part) -> bytes:
        raw = await self.read_raw(email, part.body_start, part.end - part.body_start)
        return mime.decode_body(raw, mime.Part(0, 0, len(raw), encoding=part.encoding))

    async def _decoded_bytes(self, email: Email, part: mime.Part, start: int, length: int) -> bytes:
        try:
            return b"".join([d async for d in self._decoded(email, part, start, length)])
        except mime.TooIrregular:
            return (await self._decoded_whole(email, part))[start : start + length]

    async def _decoded(self, email: Email, part: mime.Part, start: int, length: int) -> AsyncIterator[bytes]:
        """Bytes ``start..start+length`` of a part's decoded body, decoding
        from the part's start and stopping once they are out. Raises
        :class:`mime.TooIrregular` unless :meth:`_decoded_size` found the
        part to need decoding whole (then it is)."""
        end = start + length
        if f"binary-whole-{part.body_start}" in email.rendered:
            yield (await self._decoded_whole(email, part))[start:end]
            return
        pos = 0  # decoded bytes produced so far
        decoder = mime.Decoder(part.encoding)
        async for data in self.stream_raw(email, part.body_start, part.end - part.body_start, STREAM_STEP):
            out = decoder.feed(data)
            if pos + len(out) > start and pos < end:
                yield out[max(0, start - pos) : end - pos]
            pos += len(out)
            if pos >= end:
                return
        out = decoder.end()
        if pos + len(out) > start and pos < end:
            yield out[max(0, start - pos) : end - pos]


def _binary_part(structure: mime.Message, item: FetchItem) -> mime.Part | None:
    """The part a BINARY[...] names (None: the whole message), or the error
    RFC 3516 §4.2 asks for."""
    section = list(item.section or ())
    if not section:
        return None
    part = mime.find_part(structure, section)
    if part is None:
        raise FetchError("NONEXISTENT", "no such body section")
    if part.children or part.type == "multipart":
        raise FetchError("UNKNOWN-CTE", "BINARY of a multipart is not defined")
    if part.encoding not in ("7bit", "8bit", "binary", "base64", "quoted-printable"):
        raise FetchError("UNKNOWN-CTE", f"cannot decode {part.encoding}")
    return part
