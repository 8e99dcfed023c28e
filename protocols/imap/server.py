"""IMAP read loop: framing of lines and literals, TLS, limits, timeouts, drain.

The loop reads one whole command (the line plus every literal it announces,
sending ``+`` for synchronizing ones), hands it to the parser, then to the
session. It never dies of one client: a parse error is ``BAD``, too many in a
row end the session, an idle client is logged out, and an unexpected error is
logged with the peer and answered generically (STYLE.md, aiosmtpd
``_handle_client``).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import ssl
from dataclasses import dataclass

from storage import Storage

from ..push import PushHub
from . import commands as c
from . import response as r
from .parse import Literal, ParseError, UnsupportedCharset, literal_at_end, parse_command, parse_tag
from .session import ImapSession, ImapSettings, LineTooLong, Logout

log = logging.getLogger("rookery.imap")

BYE_SHUTDOWN = r.untagged_status("BYE", b"UNAVAILABLE", "Server shutting down, please reconnect")
BYE_TIMEOUT = r.untagged_status("BYE", None, "Autologout; idle for too long")
BYE_BAD = r.untagged_status("BYE", None, "Too many invalid commands")
BYE_BUSY = r.untagged_status("BYE", b"UNAVAILABLE", "Too many connections, try again later")
#: An APPEND command (all its messages) may total this many APPENDLIMITs.
MULTIAPPEND_FACTOR = 4
#: Bytes of refused non-synchronizing literals read through to stay in step
#: with the client (RFC 7888 §4); past this, BYE is cheaper.
DISCARD_MAX = 100 * 1024 * 1024


@dataclass(slots=True)
class _Skip:
    """A command refused while it was being read (literal too large)."""

    response: bytes
    fatal: bool


class ImapConnection:
    """One client connection; implements the session's ``Connection``."""

    def __init__(self, listener: ImapListener, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.listener = listener
        self.reader = reader
        self.writer = writer
        peer = writer.get_extra_info("peername") or ("?", 0)
        self.peer = f"{peer[0]}:{peer[1]}"
        try:
            self.loopback = ipaddress.ip_address(str(peer[0])).is_loopback
        except ValueError:
            self.loopback = False
        self.tls = writer.get_extra_info("sslcontext") is not None
        self.busy = False
        self.closing = False
        self.mid_response = False
        #: Most output bytes ever waiting in the transport (just after a write).
        self.peak_buffered = 0

    async def write(self, data: bytes, more: bool = False) -> None:
        if not data or self.writer.is_closing():
            return
        # Whole responses per write, except a large literal streamed in
        # pieces (``more``): clients that read partial lines never see a
        # response split at an odd place, and shutdown() adds no BYE inside one.
        self.mid_response = more
        self.writer.write(data)
        buffered = self.writer.transport.get_write_buffer_size()
        if buffered > self.peak_buffered:
            self.peak_buffered = buffered
        if buffered <= self.writer.transport.get_write_buffer_limits()[0]:
            # At or below the low-water mark writing is not paused, so drain()
            # does not wait: no timer to set and cancel at every response.
            await self.writer.drain()
            return
        try:
            async with asyncio.timeout(self.listener.settings.write_timeout):
                await self.writer.drain()
        except TimeoutError:
            # The client stopped reading: drop what it did not take and end
            # the session (the read loop's cleanup runs as for a disconnect).
            log.info("imap write timeout", extra={"peer": self.peer, "buffered": buffered})
            self.writer.transport.abort()
            raise ConnectionResetError("client stopped reading") from None

    async def read_line(self, timeout: float) -> bytes | None:
        # asyncio.timeout, not wait_for: wait_for runs the read in a task of
        # its own, made and scheduled for every line a client sends.
        try:
            async with asyncio.timeout(timeout):
                return await self._read_line()
        except (asyncio.IncompleteReadError, ConnectionError, TimeoutError):
            return None

    async def _read_line(self) -> bytes:
        try:
            return await self.reader.readuntil(b"\n")
        except asyncio.LimitOverrunError:
            # Skipped here, under the caller's timeout, so that every reader
            # (command, AUTHENTICATE response, IDLE's DONE) finds the next line.
            await self._discard_line()
            raise LineTooLong() from None

    async def start_tls(self) -> None:
        assert self.listener.tls_context is not None
        # RFC 9051 §6.2.1: plaintext the client pipelined after STARTTLS is
        # dropped, never read as if it had come over TLS (the STARTTLS
        # command injection of CVE-2011-0411). Reading stops first so that
        # nothing lands between the drop and the switch.
        transport = self.writer.transport
        assert isinstance(transport, asyncio.ReadTransport)
        transport.pause_reading()
        self.reader._buffer.clear()  # type: ignore[attr-defined]  # no public way to drop it
        await self.writer.start_tls(self.listener.tls_context)
        self.tls = True

    async def _discard_line(self) -> None:
        """Skip the rest of an over-long line."""
        while True:
            try:
                await self.reader.readuntil(b"\n")
                return
            except asyncio.LimitOverrunError as exc:
                await self.reader.readexactly(exc.consumed)

    async def _discard_rest(self, lit: Literal, timeout: float) -> bool:
        """Read and drop a refused non-synchronizing literal and the rest of
        its command (RFC 7888 §4), so the session can answer it and go on.
        False when that is more than :data:`DISCARD_MAX` or the client went.
        Stops before a synchronizing literal: the client waits for ``+``,
        and the tagged answer tells it the command is over."""
        budget = DISCARD_MAX
        while True:
            if lit.size > budget:
                return False
            budget -= lit.size
            left = lit.size
            try:
                while left:
                    async with asyncio.timeout(timeout):
                        chunk = await self.reader.read(min(left, 65536))
                    if not chunk:
                        return False
                    left -= len(chunk)
                line = await self.read_line(timeout)
            except (ConnectionError, asyncio.TimeoutError, LineTooLong):
                return False
            if line is None:
                return False
            budget -= len(line)
            nxt = literal_at_end(line)
            if nxt is None or not nxt.nonsync:
                return True
            lit = nxt

    async def read_command(self, session: ImapSession) -> bytes | _Skip | None:
        settings = session.settings
        try:
            line = await self.read_line(session.timeout)
        except LineTooLong:
            return _Skip(r.untagged_status("BAD", b"TOOBIG", "Command line too long"), False)
        if line is None:
            return None
        parts = [line]
        total = 0
        verb = line.split(b" ", 2)[1].upper() if line.count(b" ") >= 1 else b""
        append = verb == b"APPEND"
        # APPENDLIMIT is per message (RFC 7889 §3), so a MULTIAPPEND (RFC
        # 3502) may carry several messages each up to it; the whole command
        # is still held in memory, so it has a cap of its own.
        limit = settings.max_append * MULTIAPPEND_FACTOR if append else settings.max_literal
        while (lit := literal_at_end(line)) is not None:
            tag = parse_tag(parts[0])
            total += lit.size
            if total > limit or (append and lit.size > settings.max_append):
                text = "Literal too large"
                if append:
                    text = "Message exceeds APPENDLIMIT" if lit.size > settings.max_append else "MULTIAPPEND too large"
                if lit.nonsync and not await self._discard_rest(lit, session.timeout):
                    # The data is on its way and too much to read through
                    # (or the client went): the session ends (RFC 7888 §4).
                    return _Skip(r.untagged_status("BYE", b"TOOBIG", "Literal too large"), True)
                if tag is None:
                    return _Skip(r.untagged_status("BAD", b"TOOBIG", text), False)
                return _Skip(r.tagged(tag, "NO" if verb == b"APPEND" else "BAD", b"TOOBIG", text), False)
            if not lit.nonsync:
                await self.write(r.continuation("Ready for literal data"))
            try:
                async with asyncio.timeout(session.timeout):
                    data = await self.reader.readexactly(lit.size)
            except (asyncio.IncompleteReadError, ConnectionError, TimeoutError):
                return None
            parts.append(data)
            try:
                line = await self.read_line(session.timeout)
            except LineTooLong:
                return _Skip(r.untagged_status("BAD", b"TOOBIG", "Command line too long"), False)
            if line is None:
                return None
            parts.append(line)
            # The lines between literals count too: without this, endless
            # empty literals each followed by a long line would grow one
            # command without bound.
            total += len(line)
        return b"".join(parts)

    async def run(self) -> None:
        listener = self.listener
        session = ImapSession(listener.storage, listener.hub, listener.settings, self)
        log.debug("imap connect", extra={"peer": self.peer, "tls": self.tls})
        try:
            await self.write(session.greeting())
            while not self.closing:
                data = await self.read_command(session)
                if data is None:
                    if not self.writer.is_closing() and not self.reader.at_eof():
                        await self.write(BYE_TIMEOUT)
                    break
                if isinstance(data, _Skip):
                    await self.write(data.response)
                    if data.fatal:
                        break
                    continue
                try:
                    cmd = parse_command(data)
                except ParseError as exc:
                    if exc.resets_saved:
                        session.saved = []
                    if isinstance(exc, UnsupportedCharset):
                        await self.write(r.tagged(exc.tag or b"*", "NO", b"BADCHARSET (UTF-8 US-ASCII)", exc.message))
                        continue
                    session.bad_commands += 1
                    if exc.tag is None:
                        await self.write(r.untagged_status("BAD", None, exc.message))
                    else:
                        await self.write(r.tagged(exc.tag, "BAD", None, exc.message))
                    if session.bad_commands >= session.settings.max_bad_commands:
                        await self.write(BYE_BAD)
                        break
                    continue
                session.bad_commands = 0
                self.busy = not isinstance(cmd, c.Idle)
                try:
                    await session.handle(cmd)
                finally:
                    self.busy = False
                if session.bad_commands >= session.settings.max_bad_commands:
                    await self.write(BYE_BAD)
                    break
        except Logout as exc:
            if exc.autologout and not self.writer.is_closing() and not self.reader.at_eof():
                with contextlib.suppress(Exception):
                    await self.write(BYE_TIMEOUT)
        except (ConnectionError, asyncio.IncompleteReadError, ssl.SSLError):
            pass
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("imap session crashed", extra={"peer": self.peer})
            with contextlib.suppress(Exception):
                await self.write(r.untagged_status("BYE", b"SERVERBUG", "Internal error"))
        finally:
            session.close()
            with contextlib.suppress(Exception):
                self.writer.close()
            log.debug("imap disconnect", extra={"peer": self.peer})

    def shutdown(self) -> None:
        """Tell the client to go (drain) and close."""
        self.closing = True
        if not self.writer.is_closing():
            with contextlib.suppress(Exception):
                if not self.mid_response:  # BYE inside a literal would be its data
                    self.writer.write(BYE_SHUTDOWN)
                self.writer.close()


class ImapListener:
    """One IMAP listening socket (plain with STARTTLS, or implicit TLS)."""

    def __init__(
        self,
        storage: Storage,
        hub: PushHub,
        settings: ImapSettings,
        tls_context: ssl.SSLContext | None,
        *,
        implicit_tls: bool = False,
        max_connections: int = 20_000,
    ) -> None:
        self.storage = storage
        self.hub = hub
        self.settings = settings
        self.tls_context = tls_context
        self.implicit_tls = implicit_tls
        self.max_connections = max_connections
        self.connections: set[ImapConnection] = set()
        self.tasks: set[asyncio.Task[None]] = set()
        self.server: asyncio.base_events.Server | None = None

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if len(self.connections) >= self.max_connections:
            writer.write(BYE_BUSY)
            writer.close()
            return
        conn = ImapConnection(self, reader, writer)
        self.connections.add(conn)
        task = asyncio.current_task()
        if task is not None:
            self.tasks.add(task)
        try:
            await conn.run()
        finally:
            self.connections.discard(conn)
            if task is not None:
                self.tasks.discard(task)

    async def start(self, host: str, port: int) -> int:
        self.server = await asyncio.start_server(
            self._client, host, port, limit=self.settings.max_line,
            ssl=self.tls_context if self.implicit_tls else None, reuse_address=True, backlog=1024,
        )
        sockname = self.server.sockets[0].getsockname()
        log.info("imap%s listening on %s:%s", "s" if self.implicit_tls else "", sockname[0], sockname[1])
        return int(sockname[1])

    def __len__(self) -> int:
        return len(self.connections)

    def stop_accepting(self) -> None:
        if self.server is not None:
            self.server.close()

    async def drain(self, deadline: float) -> None:
        """Idle sessions (between commands or in IDLE) get BYE at once; busy
        ones finish their command within ``deadline`` seconds."""
        loop = asyncio.get_running_loop()
        end = loop.time() + deadline
        while self.connections and loop.time() < end:
            for conn in list(self.connections):
                if not conn.busy:
                    conn.shutdown()
            await asyncio.sleep(0.05)
        for conn in list(self.connections):
            conn.shutdown()
        for task in list(self.tasks):
            task.cancel()
        if self.tasks:
            await asyncio.wait(list(self.tasks), timeout=2)
