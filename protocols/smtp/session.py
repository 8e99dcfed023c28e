"""SMTP session logic as aiosmtpd hooks: who may send what to whom.

aiosmtpd parses the protocol; these ``handle_<VERB>`` hooks decide. A message
is committed to the store before ``250`` is answered to DATA (DESIGN.md
principle 2), and all recipients of one DATA are delivered in one transaction.
"""

from __future__ import annotations

import itertools
import logging
import secrets
import time
from dataclasses import dataclass
from email.utils import formatdate
from typing import Any

from aiosmtpd.smtp import SMTP, Envelope, Session

from storage import LocalRecipient, Storage
from storage.directory import POSTMASTER, normalize_address
from storage.errors import InvalidInput, RookeryError

log = logging.getLogger("rookery.smtp")

OK_MAIL = "250 2.1.0 Sender OK"
OK_RCPT = "250 2.1.5 Recipient OK"
NEEDS_SMTPUTF8 = "553 5.6.7 Non-ASCII address needs SMTPUTF8 (RFC 6531 §3.4)"
TOO_MANY_RECIPIENTS = "452 4.5.3 Too many recipients"
TEMP_FAILURE = "451 4.3.0 Temporary failure, please try again later"
BAD_SENDER = "553 5.1.7 Bad sender address syntax"
BAD_RECIPIENT = "553 5.1.3 Bad recipient address syntax"
NO_VALID_RECIPIENTS = "554 5.5.1 No valid recipients"


@dataclass(frozen=True, slots=True)
class SmtpLimits:
    max_message_size: int = 50 * 1024 * 1024
    max_recipients: int = 100
    command_timeout: float = 300.0
    max_connections: int = 1000
    #: The whole DATA transfer, however steadily it progresses.
    data_timeout: float = 600.0
    #: Error replies (4xx/5xx) without a message accepted before the client is cut off.
    max_bad_commands: int = 20
    #: Octets of one DATA line, CRLF not counted (RFC 5321 §4.5.3.1.6).
    max_line_length: int = 998


def peer_text(session: Session) -> str:
    peer = session.peer
    if isinstance(peer, tuple) and len(peer) >= 2:
        return f"{peer[0]}:{peer[1]}"
    return str(peer)


_ID_PREFIX = secrets.token_hex(3).upper()
_ID_COUNTER = itertools.count(int(time.time() * 1000) & 0xFFFFFFFF)


def new_queue_id() -> str:
    """A short id unique to this process run, for logs and replies (no
    system call per message, unlike a random token)."""
    return f"{_ID_PREFIX}{next(_ID_COUNTER) & 0xFFFFFFFFFF:010X}"


_DATE: tuple[int, str] = (-1, "")


def received_date() -> str:
    """Now as an RFC 5322 date, made once a second (email.utils.formatdate
    costs ~10 µs, and every message received wants it)."""
    global _DATE
    now = int(time.time())
    if _DATE[0] != now:
        _DATE = (now, formatdate(now, localtime=False))
    return _DATE[1]


class InboundHandler:
    """Hooks for the inbound MX: local recipients only, never a relay."""

    def __init__(self, storage: Storage, hostname: str, limits: SmtpLimits) -> None:
        self.storage = storage
        self.hostname = hostname
        self.limits = limits

    async def handle_EHLO(
        self, server: SMTP, session: Session, envelope: Envelope, hostname: str, responses: list[str]
    ) -> list[str]:
        session.host_name = hostname
        # aiosmtpd reads commands in order from a buffer, so pipelined
        # commands just work (RFC 2920); enhanced codes come from our replies
        # and from the server's push() (RFC 2034).
        return responses[:-1] + ["250-PIPELINING", "250-ENHANCEDSTATUSCODES", responses[-1]]

    async def handle_MAIL(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, mail_options: list[str]
    ) -> str:
        if address not in ("", "<>"):
            if not address.isascii() and not envelope.smtp_utf8:
                return NEEDS_SMTPUTF8
            try:
                normalize_address(address)
            except InvalidInput:
                return BAD_SENDER
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        envelope.rcpt_local = []  # type: ignore[attr-defined]
        return OK_MAIL

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, rcpt_options: list[str]
    ) -> str:
        if len(envelope.rcpt_tos) >= self.limits.max_recipients:
            return TOO_MANY_RECIPIENTS
        if not address.isascii() and not envelope.smtp_utf8:
            return NEEDS_SMTPUTF8
        if address.lower() == POSTMASTER:  # no domain needed (RFC 5321 §4.5.1)
            address = await self._postmaster()
        try:
            normalized = normalize_address(address)
        except InvalidInput:
            return BAD_RECIPIENT
        try:
            recipient = await self.storage.accept_recipient(normalized)
        except RookeryError as exc:
            log.info("rcpt refused %s: %s", normalized, exc.text, extra={"peer": peer_text(session)})
            return exc.smtp
        except Exception:  # the store failing is the server's trouble, not the address's
            log.exception("rcpt lookup failed", extra={"peer": peer_text(session)})
            return TEMP_FAILURE
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        getattr(envelope, "rcpt_local", []).append(recipient)
        return OK_RCPT

    async def _postmaster(self) -> str:
        """postmaster of this host's domain if it is hosted, else of the first
        hosted domain (``postmaster`` itself, refused, if none is)."""
        domains = await self.storage.directory.list_domains()
        labels = self.hostname.lower().split(".")
        for i in range(len(labels)):
            if ".".join(labels[i:]) in domains:
                return f"{POSTMASTER}@{'.'.join(labels[i:])}"
        return f"{POSTMASTER}@{domains[0]}" if domains else POSTMASTER

    def trace_headers(self, session: Session, envelope: Envelope, server: SMTP, queue_id: str) -> bytes:
        """Return-Path: and Received: (RFC 5321 §4.4)."""
        peer = session.peer[0] if isinstance(session.peer, tuple) else str(session.peer)
        helo = (session.host_name or "unknown").replace("\r", "").replace("\n", "")[:255]
        proto = "ESMTP" if session.extended_smtp else "SMTP"
        if getattr(server, "_tls_protocol", None) is not None:
            proto += "S"
        if session.authenticated:
            proto += "A"
        rcpt = envelope.rcpt_tos[0] if len(envelope.rcpt_tos) == 1 else None
        for_clause = f"\r\n\tfor <{rcpt}>" if rcpt else ""
        received = (
            f"Received: from {helo} ([{peer}])\r\n\tby {self.hostname} (Rookery) with {proto} id {queue_id}"
            f"{for_clause};\r\n\t{received_date()}\r\n"
        )
        sender = envelope.mail_from or ""
        return f"Return-Path: <{sender}>\r\n{received}".encode("utf-8", "surrogateescape")

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        recipients: list[LocalRecipient] = getattr(envelope, "rcpt_local", [])
        if not recipients:
            return NO_VALID_RECIPIENTS
        queue_id = new_queue_id()
        content = envelope.original_content or b""
        assert isinstance(content, bytes)
        raw = self.trace_headers(session, envelope, server, queue_id) + content
        peer = peer_text(session)
        if len(raw) > self.limits.max_message_size + 64 * 1024:
            return "552 5.3.4 Message too big"
        try:
            deliveries = await self.storage.deliver(recipients, raw)
        except RookeryError as exc:
            log.info("delivery refused: %s", exc.text, extra={"peer": peer, "id": queue_id})
            return exc.smtp
        except Exception:
            log.exception("delivery failed", extra={"peer": peer, "id": queue_id})
            return TEMP_FAILURE
        log.info(
            "delivered",
            extra={"peer": peer, "id": queue_id, "size": len(raw), "rcpts": len(deliveries), "from": envelope.mail_from},
        )
        return f"250 2.0.0 OK queued as {queue_id}"

    async def handle_PROXY(self, server: SMTP, session: Session, envelope: Envelope, proxy_data: Any) -> bool:
        # PROXY protocol is off (no proxy_protocol_timeout); refuse if reached.
        return False
