"""Authenticated message submission: RFC 6409 (``submission``, STARTTLS) and
RFC 8314 (``submissions``, implicit TLS).

Policy, in the order a client meets it:

* AUTH PLAIN / LOGIN (RFC 4954) only on a secure connection: TLS, a loopback
  peer (as Dovecot allows), or ``[security] allow_plaintext_auth``;
  otherwise AUTH is not advertised and answers ``538 5.7.11``. Credentials go
  to :meth:`Directory.login`, the one login policy (failure delay, per-IP
  limit); a failure answers ``535 5.7.8``.
* MAIL, RCPT, DATA need an authenticated session (``530 5.7.0``).
* The envelope sender and every From: address must be the account's own
  address or an alias of it (``553 5.7.1``); the null sender is refused.
* A per-account hourly sending limit, counted in the store so that it holds
  across every node (``450 4.7.1``).
* Local recipients are delivered at once (MailStore.deliver), remote ones
  queued (storage.queue); ``250`` only after both are committed (DESIGN.md
  principle 2). If the local delivery fails after the remote part was
  queued, the local recipients are added to the queued message, which
  delivers them later, so the client never resends the remote part.
* DSN (RFC 3461): NOTIFY and ORCPT on RCPT, RET and ENVID on MAIL are kept
  with the queued message. A local recipient with ``NOTIFY=SUCCESS`` goes
  through the queue too, which sends the "delivered" report.

aiosmtpd's ``authenticator`` callable is synchronous (``SMTP._authenticate``
does not await it) and cannot wait for the directory, so this handler
implements the PLAIN and LOGIN mechanisms itself as async ``auth_*`` methods,
which aiosmtpd prefers to its built-ins. A failed :class:`AuthResult` must
carry ``handled=False`` and a message, or aiosmtpd answers nothing at all.
"""

from __future__ import annotations

import asyncio
import binascii
import ipaddress
import logging
import ssl
from base64 import b64decode
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from email.parser import BytesHeaderParser
from email.policy import compat32
from email.utils import getaddresses, make_msgid
from typing import Any, TypeVar

from aiosmtpd.smtp import MISSING, SMTP, AuthResult, Envelope, Session

from storage import LocalRecipient, Storage
from storage.directory import Account, normalize_address
from storage.errors import AuthenticationFailed, InvalidInput, RookeryError, UnknownDomain
from storage.queue import Queue, RateLimited
from storage.queue import Recipient as QueueRecipient

from .dsn import DsnParamError, MailParams, RcptParams, take_mail_params, take_rcpt_params
from .server import RookerySMTP, SmtpListener
from .session import (
    BAD_RECIPIENT,
    BAD_SENDER,
    OK_MAIL,
    OK_RCPT,
    TEMP_FAILURE,
    TOO_MANY_RECIPIENTS,
    InboundHandler,
    SmtpLimits,
    new_queue_id,
    peer_text,
    received_date,
)

_P = TypeVar("_P", MailParams, RcptParams)
log = logging.getLogger("rookery.submission")

AUTH_OK = "235 2.7.0 Authentication successful"
AUTH_INVALID = "535 5.7.8 Authentication credentials invalid"
# RFC 4954 §6: a temporary failure of the authentication machinery.
AUTH_TEMPFAIL = "454 4.7.0 Temporary authentication failure"
# RFC 4954 §6: 538 when the mechanism needs an encrypted connection.
ENCRYPTION_REQUIRED = "538 5.7.11 Encryption required for requested authentication mechanism"
AUTH_REQUIRED = "530 5.7.0 Authentication required"
BAD_AUTH_DATA = "501 5.5.2 Cannot decode response"
# RFC 6409 §6.1: the MSA may refuse a sender the user is not authorised for.
SENDER_NOT_OWNED = "553 5.7.1 Sender address not owned by the authenticated user"
FROM_NOT_OWNED = "553 5.7.1 From: address not owned by the authenticated user"
NO_FROM = "550 5.6.0 Message has no From: header"


@dataclass(frozen=True, slots=True)
class SubmissionSettings:
    allow_plaintext_auth: bool = False
    #: Loopback peers count as secure (a local webmail or MUA, as in Dovecot).
    trust_loopback: bool = True
    #: Recipients an account may send to per hour, all nodes together (a
    #: message to 100 recipients uses 100; 0: no limit). The name is the
    #: config key's, kept from when messages were counted.
    max_messages_per_hour: int = 0


#: ``signer(raw) -> raw with a DKIM-Signature`` (server.dkim.DkimSigner.sign).
Signer = Callable[[bytes], Awaitable[bytes]]


def is_loopback(peer: Any) -> bool:
    if not isinstance(peer, tuple) or not peer:
        return False
    try:
        ip = ipaddress.ip_address(str(peer[0]).split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


def connection_secure(server: SMTP) -> bool:
    """TLS is on: after STARTTLS, or from the first byte (implicit TLS)."""
    if getattr(server, "_tls_protocol", None) is not None:
        return True
    transport = server.transport
    return transport is not None and transport.get_extra_info("ssl_object") is not None


def header_section(content: bytes) -> bytes:
    for sep in (b"\r\n\r\n", b"\n\n"):
        end = content.find(sep)
        if end >= 0:
            return content[: end + len(sep) // 2]
    return content


def from_addresses(header: bytes) -> list[str]:
    parsed = BytesHeaderParser(policy=compat32).parsebytes(header)
    values = [str(v) for v in parsed.get_all("From", [])]
    return [addr for _, addr in getaddresses(values) if addr]


def has_header(header: bytes, name: bytes) -> bool:
    lowered = b"\n" + header.lower()
    return b"\n" + name.lower() + b":" in lowered


class SubmissionHandler:
    """aiosmtpd hooks and AUTH mechanisms of the submission listeners."""

    def __init__(
        self,
        storage: Storage,
        queue: Queue,
        hostname: str,
        limits: SmtpLimits,
        settings: SubmissionSettings = SubmissionSettings(),
        *,
        signer: Signer | None = None,
        on_queued: Callable[[], None] | None = None,
    ) -> None:
        self.storage = storage
        self.queue = queue
        self.hostname = hostname
        self.limits = limits
        self.settings = settings
        self.signer = signer
        #: Called after a message was queued (wake the worker, tell peers).
        self.on_queued = on_queued

    # -- authentication ---------------------------------------------------------

    def may_authenticate(self, server: SMTP) -> bool:
        """May this connection use AUTH (DESIGN.md "Security")?"""
        if self.settings.allow_plaintext_auth or connection_secure(server):
            return True
        session = server.session
        return self.settings.trust_loopback and session is not None and is_loopback(session.peer)

    def authenticator(
        self, server: SMTP, session: Session, envelope: Envelope, mechanism: str, data: Any
    ) -> AuthResult:
        """aiosmtpd's synchronous hook; never reached (``auth_PLAIN`` and
        ``auth_LOGIN`` below replace the built-ins), and fails closed."""
        return AuthResult(success=False, handled=False, message=AUTH_INVALID)

    async def auth_PLAIN(self, server: SMTP, args: list[str]) -> AuthResult:
        """RFC 4616: ``[authzid] NUL authcid NUL passwd``, initial response
        or after an empty challenge."""
        if not self.may_authenticate(server):
            return AuthResult(success=False, handled=False, message=ENCRYPTION_REQUIRED)
        if len(args) == 1:
            response = await server.challenge_auth("")
            if response is MISSING:
                return AuthResult(success=False, handled=True)  # challenge_auth answered
            assert isinstance(response, bytes)
            blob = response
        else:
            try:
                # RFC 4954 §4: "=" is an empty initial response.
                blob = b"" if args[1] == "=" else b64decode(args[1], validate=True)
            except (binascii.Error, ValueError):
                return AuthResult(success=False, handled=False, message=BAD_AUTH_DATA)
        parts = blob.split(b"\x00")
        if len(parts) != 3:
            return AuthResult(success=False, handled=False, message=BAD_AUTH_DATA)
        authzid, login, password = parts
        if authzid and authzid != login:
            # No proxy authorisation: acting as another user is not offered.
            return AuthResult(success=False, handled=False, message=AUTH_INVALID)
        return await self._login(server, login, password)

    async def auth_LOGIN(self, server: SMTP, args: list[str]) -> AuthResult:
        """The LOGIN mechanism (draft-murchison-sasl-login): user, then password."""
        if not self.may_authenticate(server):
            return AuthResult(success=False, handled=False, message=ENCRYPTION_REQUIRED)
        if len(args) == 1:
            login = await server.challenge_auth(server.AuthLoginUsernameChallenge)
            if login is MISSING:
                return AuthResult(success=False, handled=True)
        else:
            try:
                login = b64decode(args[1], validate=True)
            except (binascii.Error, ValueError):
                return AuthResult(success=False, handled=False, message=BAD_AUTH_DATA)
        password = await server.challenge_auth(server.AuthLoginPasswordChallenge)
        if password is MISSING:
            return AuthResult(success=False, handled=True)
        assert isinstance(login, bytes) and isinstance(password, bytes)
        return await self._login(server, login, password)

    async def _login(self, server: SMTP, login: bytes, password: bytes) -> AuthResult:
        session = server.session
        assert session is not None
        remote = session.peer[0] if isinstance(session.peer, tuple) else str(session.peer)
        try:
            username = login.decode("utf-8")
            secret = password.decode("utf-8")
        except UnicodeDecodeError:
            username, secret = "", ""
        try:
            account = await self.storage.directory.login(username, secret, str(remote))
        except AuthenticationFailed as exc:
            log.info("submission auth failed: %s", exc.text, extra={"peer": peer_text(session), "user": username[:100]})
            return AuthResult(success=False, handled=False, message=AUTH_INVALID)
        except Exception:
            log.exception("submission auth error", extra={"peer": peer_text(session)})
            return AuthResult(success=False, handled=False, message=AUTH_TEMPFAIL)
        log.info("submission auth ok", extra={"peer": peer_text(session), "user": account.email})
        return AuthResult(success=True, handled=False, message=AUTH_OK, auth_data=account)

    # -- envelope -------------------------------------------------------------------

    async def handle_EHLO(
        self, server: SMTP, session: Session, envelope: Envelope, hostname: str, responses: list[str]
    ) -> list[str]:
        responses = await InboundHandler.handle_EHLO(self, server, session, envelope, hostname, responses)  # type: ignore[arg-type]
        # RFC 3461: NOTIFY / ORCPT / RET / ENVID (see SubmissionSMTP).
        return responses[:-1] + ["250-DSN", responses[-1]]

    async def handle_MAIL(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, mail_options: list[str]
    ) -> str:
        account = session.auth_data
        if not session.authenticated or not isinstance(account, Account):
            return AUTH_REQUIRED
        if address in ("", "<>"):
            return SENDER_NOT_OWNED
        try:
            normalized = normalize_address(address)
        except InvalidInput:
            return BAD_SENDER
        if not await self.queue.sender_owned(account.id, normalized):
            log.info("sender not owned", extra={"peer": peer_text(session), "user": account.email, "from": normalized})
            return SENDER_NOT_OWNED
        limit = self.settings.max_messages_per_hour
        used = 0
        if limit:
            try:
                used = await self.queue.check_rate(account.id, limit)
            except RateLimited as exc:
                return exc.smtp
        envelope.mail_from = address
        # The hour's use as of MAIL: RCPT refuses recipients past the limit
        # early; DATA counts them for good (reserve_send, cluster-wide).
        envelope.rate_used = used
        envelope.mail_options.extend(mail_options)
        envelope.rcpt_targets = []
        envelope.dsn_mail = getattr(server, "dsn_mail", None) or MailParams()
        return OK_MAIL

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, rcpt_options: list[str]
    ) -> str:
        if len(envelope.rcpt_tos) >= self.limits.max_recipients:
            return TOO_MANY_RECIPIENTS
        try:
            normalized = normalize_address(address)
        except InvalidInput:
            return BAD_RECIPIENT
        targets = getattr(envelope, "rcpt_targets", [])
        seen = {a.lower() for a, _, _ in targets}
        if normalized in seen:
            return OK_RCPT  # named twice: delivered once
        limit = self.settings.max_messages_per_hour
        if limit and getattr(envelope, "rate_used", 0) + len(targets) + 1 > limit:
            return RateLimited.smtp
        target = normalized
        try:
            rcpt: LocalRecipient | None = await self.storage.accept_recipient(normalized)
        except UnknownDomain:
            # Not hosted here: relay it, the sender is authenticated. A remote
            # local part may be case-sensitive (RFC 5321 §2.4): keep it.
            rcpt = None
            local = address.strip().strip("<>").rpartition("@")[0]
            target = f"{local}@{normalized.rpartition('@')[2]}"
        except RookeryError as exc:
            return exc.smtp
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        targets.append((target, rcpt, getattr(server, "dsn_rcpt", None) or RcptParams()))
        return OK_RCPT

    # -- message ------------------------------------------------------------------------

    def trace_header(self, session: Session, server: SMTP, queue_id: str) -> bytes:
        peer = session.peer[0] if isinstance(session.peer, tuple) else str(session.peer)
        helo = (session.host_name or "unknown").replace("\r", "").replace("\n", "")[:255]
        # RFC 3848: ESMTPSA = ESMTP with STARTTLS/TLS and AUTH.
        proto = "ESMTP" + ("S" if connection_secure(server) else "") + "A"
        received = (
            f"Received: from {helo} ([{peer}])\r\n\tby {self.hostname} (Rookery) with {proto} id {queue_id};"
            f"\r\n\t{received_date()}\r\n"
        )
        return received.encode("utf-8", "surrogateescape")

    def missing_headers(self, header: bytes) -> bytes:
        """Date: and Message-ID: an MUA left out (RFC 6409 §8.2, §8.3)."""
        extra = b""
        if not has_header(header, b"date"):
            extra += f"Date: {received_date()}\r\n".encode()
        if not has_header(header, b"message-id"):
            extra += f"Message-ID: {make_msgid(domain=self.hostname)}\r\n".encode()
        return extra

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        account = session.auth_data
        if not session.authenticated or not isinstance(account, Account):
            return AUTH_REQUIRED
        targets: list[tuple[str, LocalRecipient | None, RcptParams]] = getattr(envelope, "rcpt_targets", [])
        if not targets:
            return "554 5.5.1 No valid recipients"
        content = envelope.original_content or b""
        assert isinstance(content, bytes)
        peer = peer_text(session)
        header = header_section(content)
        senders = from_addresses(header)
        if not senders:
            return NO_FROM
        for address in senders:
            if not await self.queue.sender_owned(account.id, address):
                log.info("From: not owned", extra={"peer": peer, "user": account.email, "from": address[:200]})
                return FROM_NOT_OWNED
        queue_id = new_queue_id()
        body = self.missing_headers(header) + content
        if self.signer is not None:
            try:
                body = await self.signer(body)
            except Exception:
                # An unsigned message is better than a refused one; say so loudly.
                log.exception("DKIM signing failed", extra={"peer": peer, "id": queue_id})
        raw = self.trace_header(session, server, queue_id) + body
        if len(raw) > self.limits.max_message_size + 64 * 1024:
            return "552 5.3.4 Message too big"
        limit = self.settings.max_messages_per_hour
        sender = envelope.mail_from or ""
        # Remote recipients go to the queue, and so do local ones whose sender
        # asked to hear of success (NOTIFY=SUCCESS): the queue delivers them
        # and sends the "delivered" DSN. Other local ones are delivered now.
        mail_params: MailParams = getattr(envelope, "dsn_mail", None) or MailParams()
        to_queue = [
            QueueRecipient(a, local=rcpt.account if rcpt else None, notify=p.notify, orcpt=p.orcpt)
            for a, rcpt, p in targets
            if rcpt is None or "SUCCESS" in p.notify.split(",")
        ]
        local = [rcpt for _, rcpt, p in targets if rcpt is not None and "SUCCESS" not in p.notify.split(",")]
        try:
            if limit:
                await self.queue.reserve_send(account.id, limit, count=len(targets))
            queued = (
                await self.queue.enqueue(
                    sender, to_queue, raw, smtputf8=bool(envelope.smtp_utf8), ret=mail_params.ret, envid=mail_params.envid
                )
                if to_queue
                else None
            )
        except RookeryError as exc:
            log.info("submission refused: %s", exc.text, extra={"peer": peer, "id": queue_id})
            return exc.smtp
        except Exception:
            log.exception("queueing failed", extra={"peer": peer, "id": queue_id})
            return TEMP_FAILURE
        if local:
            copy = f"Return-Path: <{sender}>\r\n".encode("utf-8", "surrogateescape") + raw
            try:
                await self.storage.deliver(local, copy)
            except Exception as exc:
                if queued is None:
                    if isinstance(exc, RookeryError):
                        return exc.smtp
                    log.exception("local delivery failed", extra={"peer": peer, "id": queue_id})
                    return TEMP_FAILURE
                # The remote part is committed: a 4xx now would make the
                # client send it twice. The queue takes the local part.
                log.warning("local delivery deferred to the queue: %r", exc, extra={"peer": peer, "id": queue_id})
                try:
                    await self.queue.add_recipients(queued.id, [(r.address, r.account) for r in local])
                except Exception:
                    log.exception("local delivery lost", extra={"peer": peer, "id": queue_id})
                    return TEMP_FAILURE
        if queued is not None and self.on_queued is not None:
            self.on_queued()
        log.info(
            "submitted",
            extra={
                "peer": peer, "id": queue_id, "user": account.email, "size": len(raw),
                "local": len(local), "queued": len(to_queue), "queue": queued.qid if queued else "",
            },
        )
        return f"250 2.0.0 OK queued as {queued.qid if queued else queue_id}"

    async def handle_PROXY(self, server: SMTP, session: Session, envelope: Envelope, proxy_data: Any) -> bool:
        return False


class SubmissionSMTP(RookerySMTP):
    """RookerySMTP whose "AUTH needs TLS" rule is the handler's policy, and
    which takes the RFC 3461 DSN parameters of MAIL and RCPT."""

    event_handler: SubmissionHandler
    #: DSN parameters of the MAIL / RCPT command being handled, for the hooks.
    dsn_mail: MailParams | None = None
    dsn_rcpt: RcptParams | None = None

    async def _take_dsn(self, arg: str, take: Callable[[str], tuple[str, _P]]) -> tuple[str, _P | None] | None:
        """``arg`` without its DSN parameters, and those parameters; None
        once a malformed one was answered with 501."""
        if not (arg and self.session is not None and self.session.extended_smtp):
            return arg, None
        try:
            return take(arg)
        except DsnParamError as exc:
            await self.push(str(exc))
            return None

    async def smtp_MAIL(self, arg: str) -> None:
        taken = await self._take_dsn(arg, take_mail_params)
        self.dsn_mail = taken[1] if taken else None
        if taken is not None:
            await super().smtp_MAIL(taken[0])

    async def smtp_RCPT(self, arg: str) -> None:
        taken = await self._take_dsn(arg, take_rcpt_params)
        self.dsn_rcpt = taken[1] if taken else None
        if taken is not None:
            await super().smtp_RCPT(taken[0])

    # aiosmtpd reads ``_auth_require_tls`` in EHLO (advertise AUTH?) and AUTH
    # (538?) and only knows STARTTLS; implicit TLS and loopback peers count
    # as secure too, so the answer is asked of the handler each time.
    @property
    def _auth_require_tls(self) -> bool:
        return not self.event_handler.may_authenticate(self)

    @_auth_require_tls.setter
    def _auth_require_tls(self, value: bool) -> None:
        pass


class SubmissionListener(SmtpListener):
    """One submission socket: STARTTLS (port 587) or implicit TLS (port 465)."""

    def __init__(
        self,
        handler: SubmissionHandler,
        hostname: str,
        limits: SmtpLimits,
        tls_context: ssl.SSLContext | None,
        *,
        implicit_tls: bool = False,
    ) -> None:
        super().__init__(handler, hostname, limits, tls_context)  # type: ignore[arg-type]
        self.implicit_tls = implicit_tls
        if implicit_tls and tls_context is None:
            raise ValueError("implicit TLS needs a TLS context")

    protocol = SubmissionSMTP

    @property
    def kind(self) -> str:  # type: ignore[override]
        return "submissions" if self.implicit_tls else "submission"

    def _options(self) -> dict[str, Any]:
        options = super()._options()
        del options["auth_exclude_mechanism"]
        options.update(
            # Implicit TLS is set up by the server socket; no STARTTLS on top.
            tls_context=None if self.implicit_tls else self.tls_context,
            auth_required=True,
            authenticator=self.handler.authenticator,  # type: ignore[attr-defined]
        )
        return options

    def _server_ssl(self) -> ssl.SSLContext | None:
        return self.tls_context if self.implicit_tls else None


def submission_listener(
    storage: Storage,
    queue: Queue,
    hostname: str,
    limits: SmtpLimits,
    settings: SubmissionSettings,
    tls_context: ssl.SSLContext,
    *,
    implicit_tls: bool,
    signer: Signer | None = None,
    on_queued: Callable[[], None] | None = None,
) -> SubmissionListener:
    """The listener the node runs for ``[listen] submission`` / ``submissions``."""
    handler = SubmissionHandler(storage, queue, hostname, limits, settings, signer=signer, on_queued=on_queued)
    return SubmissionListener(handler, hostname, limits, tls_context, implicit_tls=implicit_tls)
