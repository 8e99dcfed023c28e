"""A command's pending output, written in bounded pieces as it is produced.

A FETCH of a whole mailbox must not need memory equal to the mailbox: its
responses are written whenever the pending bytes pass :data:`FLUSH_AT`, and
a large literal is sent from the blob as it is read. Many small responses
(the flags of 10,000 messages) still go out in a few writes. Nothing else
writes to the connection while a command runs, so responses never
interleave.
"""

from __future__ import annotations

from typing import Protocol

from .fetch import Piece, Streamed

#: Pending bytes that trigger a write.
FLUSH_AT = 256 * 1024


class Writer(Protocol):
    async def write(self, data: bytes, more: bool = False) -> None: ...


class BrokenResponse(Exception):
    """A streamed literal came out shorter than announced: the client cannot
    be kept in step, so the connection ends."""


class Output:
    def __init__(self, conn: Writer) -> None:
        self.conn = conn
        self.parts: list[bytes] = []
        self.size = 0

    def add(self, data: bytes) -> bool:
        """Queue ``data``; True when it is time to :meth:`flush`."""
        self.parts.append(data)
        self.size += len(data)
        return self.size >= FLUSH_AT

    async def flush(self, more: bool = False) -> None:
        """Write what is pending; ``more``: the response written is not
        finished (a literal is being streamed)."""
        if self.parts:
            data = b"".join(self.parts)
            self.parts.clear()
            self.size = 0
            await self.conn.write(data, more)

    async def response(self, pieces: list[Piece]) -> None:
        """Queue one response, streaming its large literals."""
        last = len(pieces) - 1
        for i, piece in enumerate(pieces):
            if isinstance(piece, Streamed):
                await self._stream(piece)
            elif self.add(piece) and i == last:
                await self.flush()

    async def _stream(self, lit: Streamed) -> None:
        self.add(lit.head + (b"~{%d}\r\n" if lit.literal8 else b"{%d}\r\n") % lit.length)
        left = lit.length
        async for data in lit.pieces():
            if len(data) > left:
                data = data[:left]
            left -= len(data)
            if data and self.add(data):
                await self.flush(more=True)
        if left:
            raise BrokenResponse(f"literal {left} bytes short of {lit.length}")

    def rest(self) -> list[bytes]:
        """What is still pending, to go out with the command's last lines."""
        out, self.parts, self.size = self.parts, [], 0
        return out
