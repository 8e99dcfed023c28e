"""SMTP listeners on aiosmtpd, inside the node's event loop.

:class:`RookerySMTP` adds to aiosmtpd what a serious MX needs: enhanced status
codes on every reply (RFC 2034), a cap on concurrent connections, and a
registry of live sessions so a draining node can let them finish, then close
them with ``421``.
"""

from __future__ import annotations

import asyncio
import logging
import re
import ssl
from typing import Any, AnyStr

from aiosmtpd.smtp import MISSING, SMTP, syntax

from .session import InboundHandler, SmtpLimits, peer_text

log = logging.getLogger("rookery.smtp")

_ENHANCED = re.compile(r"^\d{3}[ -]\d\.\d{1,3}\.\d{1,3}\b")
#: Default enhanced codes for aiosmtpd's own replies (RFC 3463).
_DEFAULT_ENHANCED = {
    "221": "2.0.0", "250": "2.0.0", "251": "2.1.5", "252": "2.5.0",
    "421": "4.3.0", "432": "4.7.12", "450": "4.2.0", "451": "4.3.0", "452": "4.3.1", "454": "4.7.0",
    "500": "5.5.2", "501": "5.5.4", "502": "5.5.1", "503": "5.5.1", "504": "5.5.4",
    "530": "5.7.0", "534": "5.7.9", "535": "5.7.8", "538": "5.7.11",
    "550": "5.0.0", "551": "5.1.6", "552": "5.3.4", "553": "5.1.3", "554": "5.0.0", "555": "5.5.4",
}
#: ``<local@domain>`` with nothing unusual in it, then the parameters: by
#: far the common MAIL/RCPT argument, parsed without the e-mail package.
_PLAIN_PATH = re.compile(r"\s*<([^<>\s\"(),:;@\\\[\]]+@[^<>\s\"(),:;@\\\[\]]+)>(.*)\Z", re.S)
SHUTTING_DOWN = "421 4.3.2 Service shutting down, try again later"
TOO_BUSY = b"421 4.7.0 Too many connections, try again later\r\n"
TIMED_OUT = b"421 4.4.2 Timeout exceeded, closing connection\r\n"
TOO_MANY_ERRORS = "421 4.7.0 Too many errors, closing connection"
LINE_TOO_LONG = "500 5.5.2 Line too long"
INTERNAL_ERROR = "421 4.3.0 Internal error, closing connection"


def has_long_line(data: bytes, limit: int) -> bool:
    """Whether a line of ``data`` has more than ``limit`` octets before its
    CRLF: a run of ``limit + 2`` octets or more without a LF. Each step looks
    back from the end of a window for its last LF (a C search, no copies),
    so the scan moves a line or more at a time: 10 kB of short lines take a
    few µs, where a regular expression trying a match at every byte took 50,
    and a 50 MB message of short lines takes milliseconds."""
    window = limit + 2
    pos, end = 0, len(data)
    while end - pos >= window:
        lf = data.rfind(b"\n", pos, pos + window)
        if lf < 0:
            return True
        pos = lf + 1
    return False


class SessionRegistry:
    """Live sessions of one listener, for limits and graceful shutdown."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.sessions: set[RookerySMTP] = set()

    def __len__(self) -> int:
        return len(self.sessions)


class RookerySMTP(SMTP):
    def __init__(self, handler: Any, registry: SessionRegistry, limits: SmtpLimits | None = None, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self._registry = registry
        self._limits = limits or SmtpLimits()
        self._plain_replies = False
        #: Error replies since the last accepted message (Postfix's
        #: smtpd_hard_error_limit): past the limit the client is cut off.
        self._errors = 0
        #: Loop time at which the connection times out (see _reset_timeout).
        self._timeout_at = 0.0
        #: Loop time by which a DATA transfer under way must end.
        self._data_deadline: float | None = None

    def data_received(self, data: bytes) -> None:
        # Bytes of DATA arriving restart the command timer, so a large message
        # coming slowly but steadily is not cut off; the whole transfer still
        # ends by its deadline (RFC 5321 §4.5.3.2.5-6).
        if self._data_deadline is not None:
            self._reset_timeout(max(0.001, min(self._limits.command_timeout, self._data_deadline - self.loop.time())))
        super().data_received(data)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if len(self._registry) >= self._registry.limit:
            assert isinstance(transport, asyncio.WriteTransport)
            transport.write(TOO_BUSY)
            transport.close()
            return
        self._registry.sessions.add(self)
        super().connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self._registry.sessions.discard(self)
        super().connection_lost(exc)

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        # aiosmtpd's version builds a class and runs the e-mail header parser
        # on every call; plain paths take this short road, the rest its road.
        m = _PLAIN_PATH.match(arg) if arg else None
        if m is None:
            return super()._getaddr(arg)
        address = m.group(1)
        if self.local_part_limit and len(address.rpartition("@")[0]) > self.local_part_limit:
            return None, None
        return address, m.group(2).lstrip()

    async def push(self, status: AnyStr) -> None:
        text = status.decode("utf-8", "surrogateescape") if isinstance(status, bytes) else status
        greeting = self._plain_replies and text.startswith("250")
        if greeting and text.rstrip() == "250-AUTH":
            return  # aiosmtpd's AUTH line with every mechanism excluded (the MX)
        if not greeting and len(text) >= 4 and text[3] == " " and not _ENHANCED.match(text):
            code = text[:3]
            enhanced = _DEFAULT_ENHANCED.get(code)
            if enhanced is not None:
                text = f"{code} {enhanced} {text[4:]}"
        closing = text.startswith("421")
        # "Too many recipients" is flow control (the client sends the rest in
        # another transaction, RFC 5321 §4.5.3.1.10), not a client error.
        if text[:1] in ("4", "5") and not closing and not text.startswith("452 4.5.3"):
            self._errors += 1
            if self._errors >= self._limits.max_bad_commands:
                await super().push(text)
                text, closing = TOO_MANY_ERRORS, True
        elif text.startswith("250 2.0.0 OK queued"):
            self._errors = 0
        await super().push(text)
        # A 421 closes the connection (RFC 5321 §3.8), whoever sent it.
        if closing and self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def _reset_timeout(self, duration: float | None = None) -> None:
        # aiosmtpd cancels its timer and makes a new one at every command and
        # every piece of DATA; here the deadline moves and one timer, when it
        # fires early, sets itself again for the deadline. A new timer is made
        # only when the deadline comes before the one set.
        self._timeout_at = self.loop.time() + (duration or self._timeout_duration)
        handle = self._timeout_handle
        if handle is None or handle.cancelled() or handle.when() > self._timeout_at:
            if handle is not None:
                handle.cancel()
            self._timeout_handle = self.loop.call_at(self._timeout_at, self._timeout_due)

    def _timeout_due(self) -> None:
        # asyncio may run a timer up to its clock resolution early.
        if self.loop.time() < self._timeout_at - 0.001:
            self._timeout_handle = self.loop.call_at(self._timeout_at, self._timeout_due)
        else:
            self._timeout_cb()

    def _timeout_cb(self) -> None:
        # aiosmtpd closes without a word; RFC 5321 §4.5.3.2 wants a 421 first.
        transport = self.transport
        if transport is not None and not transport.is_closing():
            assert isinstance(transport, asyncio.WriteTransport)
            transport.write(TIMED_OUT)
        super()._timeout_cb()  # type: ignore[no-untyped-call]

    async def handle_exception(self, error: Exception) -> str:
        peer = peer_text(self.session) if self.session is not None else "?"
        log.error("smtp session error: %r", error, exc_info=error, extra={"peer": peer})
        return INTERNAL_ERROR

    # EHLO/HELO success replies carry no enhanced code (RFC 2034 §3): the
    # keyword lines must stay parseable.
    async def smtp_EHLO(self, hostname: str) -> None:
        self._plain_replies = True
        try:
            await super().smtp_EHLO(hostname)
        finally:
            self._plain_replies = False

    async def smtp_HELO(self, hostname: str) -> None:
        self._plain_replies = True
        try:
            await super().smtp_HELO(hostname)
        finally:
            self._plain_replies = False

    @syntax("DATA")
    async def smtp_DATA(self, arg: str) -> None:
        """DATA, read in large pieces rather than aiosmtpd's line at a time.

        Same replies and checks as aiosmtpd's; the end is a line holding a
        single dot (RFC 5321 §4.1.1.4), leading dots are removed (§4.5.2), and
        a message over the size limit is read to its end and refused with
        552 (§4.5.3.1.10) without being kept in memory.
        """
        if await self.check_helo_needed() or await self.check_auth_needed("DATA"):
            return
        assert self.envelope is not None
        if not self.envelope.rcpt_tos:
            await self.push("503 Error: need RCPT command")
            return
        if arg:
            await self.push("501 Syntax: DATA")
            return
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        limit = self.data_size_limit or 0
        reader = self._reader
        # The stream's limit is the command-line limit; a piece of DATA runs to
        # the next ".\r\n", which may be much further away.
        saved_limit = reader._limit  # type: ignore[attr-defined]
        reader._limit = max(limit, 1 << 20) + 4096  # type: ignore[attr-defined]
        parts: list[bytes] = []
        size = 0
        too_big = False
        self._data_deadline = self.loop.time() + self._limits.data_timeout
        try:
            while True:
                try:
                    piece = await reader.readuntil(b".\r\n")
                except asyncio.LimitOverrunError as exc:
                    piece = await reader.readexactly(exc.consumed)
                    too_big = True
                    parts.clear()
                    continue
                # ".\r\n" ends the data only at the start of a line; every piece
                # ends a line, so a piece that is only ".\r\n" is one too.
                final = piece == b".\r\n" or piece.endswith(b"\r\n.\r\n")
                size += len(piece)
                if limit and size > limit + 3:
                    too_big = True
                    parts.clear()
                elif not too_big:
                    parts.append(piece)
                if final:
                    break
        finally:
            reader._limit = saved_limit  # type: ignore[attr-defined]
            self._data_deadline = None
            if self.transport is not None and not self.transport.is_closing():
                self._reset_timeout()
        if too_big:
            self._set_post_data_state()  # type: ignore[no-untyped-call]
            await self.push("552 Error: Too much mail data")
            return
        data = b"".join(parts)[:-3]
        # RFC 5321 §4.5.3.1.6: 998 octets and CRLF at most.
        line_limit = self._limits.max_line_length
        if len(data) > line_limit and has_long_line(data, line_limit):
            self._set_post_data_state()  # type: ignore[no-untyped-call]
            await self.push(LINE_TOO_LONG)
            return
        # Undo dot-stuffing: a leading dot of any line is removed (§4.5.2).
        data = data.replace(b"\r\n.", b"\r\n")
        if data.startswith(b"."):
            data = data[1:]
        self.envelope.content = data
        self.envelope.original_content = data
        status = await self._call_handler_hook("DATA")
        self._set_post_data_state()  # type: ignore[no-untyped-call]
        await self.push("250 OK" if status is MISSING else status)

    @property
    def idle(self) -> bool:
        """No mail transaction under way (between messages)."""
        return self.envelope is None or self.envelope.mail_from is None

    def close_for_shutdown(self) -> None:
        transport = self.transport
        if transport is not None and not transport.is_closing():
            assert isinstance(transport, asyncio.WriteTransport)
            transport.write((SHUTTING_DOWN + "\r\n").encode())
            transport.close()


class SmtpListener:
    """One listening socket serving inbound SMTP."""

    def __init__(
        self,
        handler: InboundHandler,
        hostname: str,
        limits: SmtpLimits,
        tls_context: ssl.SSLContext | None,
    ) -> None:
        self.handler = handler
        self.hostname = hostname
        self.limits = limits
        self.tls_context = tls_context
        self.registry = SessionRegistry(limits.max_connections)
        self.server: asyncio.base_events.Server | None = None

    #: The protocol class and the log name of this kind of listener.
    protocol: type[RookerySMTP] = RookerySMTP
    kind = "smtp"

    def _options(self) -> dict[str, Any]:
        """aiosmtpd settings of each connection; subclasses adjust them."""
        return {
            "data_size_limit": self.limits.max_message_size,
            "enable_SMTPUTF8": True,
            "decode_data": False,
            "hostname": self.hostname,
            "ident": "Rookery ESMTP",
            "tls_context": self.tls_context,
            "timeout": self.limits.command_timeout,
            # The MX takes no AUTH; submission is a different listener.
            "auth_require_tls": True,
            "auth_exclude_mechanism": ["LOGIN", "PLAIN"],
        }

    def _factory(self) -> RookerySMTP:
        return self.protocol(self.handler, self.registry, self.limits, **self._options())

    def _server_ssl(self) -> ssl.SSLContext | None:
        """TLS on the listening socket itself (implicit TLS); none for the MX."""
        return None

    async def start(self, host: str, port: int) -> int:
        self.server = await asyncio.get_running_loop().create_server(
            self._factory, host, port, reuse_address=True, ssl=self._server_ssl()
        )
        sockname = self.server.sockets[0].getsockname()
        log.info("%s listening on %s:%s", self.kind, sockname[0], sockname[1])
        return int(sockname[1])

    def __len__(self) -> int:
        return len(self.registry)

    def stop_accepting(self) -> None:
        if self.server is not None:
            self.server.close()

    async def drain(self, deadline: float) -> None:
        """Wait until sessions end or ``deadline`` seconds pass, then close the rest."""
        loop = asyncio.get_running_loop()
        end = loop.time() + deadline
        while self.registry.sessions and loop.time() < end:
            for session in list(self.registry.sessions):
                if session.idle:
                    session.close_for_shutdown()
            await asyncio.sleep(0.05)
        for session in list(self.registry.sessions):
            session.close_for_shutdown()
