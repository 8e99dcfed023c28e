"""Domain errors, one module, each knowing how it renders per protocol.

Connection loops catch :class:`RookeryError` once and answer with
``exc.smtp`` / ``exc.imap`` / ``exc.http`` (STYLE.md, pymap ``exceptions.py``).
"""

from __future__ import annotations


class RookeryError(Exception):
    """Base of every expected, user-facing failure."""

    #: SMTP reply (code, enhanced status + text).
    smtp = "451 4.3.0 Temporary server error"
    #: IMAP response condition and optional response code, e.g. ("NO", "TRYCREATE").
    imap: tuple[str, str | None] = ("NO", None)
    #: HTTP status and JMAP error type.
    http: tuple[int, str] = (500, "serverFail")

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or self.__class__.__doc__ or self.__class__.__name__)

    @property
    def text(self) -> str:
        return str(self.args[0])


class InvalidInput(RookeryError):
    """Invalid input."""

    smtp = "501 5.5.4 Invalid arguments"
    imap = ("BAD", None)
    http = (400, "invalidArguments")


class HasChildren(RookeryError):
    """The mailbox has child mailboxes; delete them first."""

    smtp = "550 5.2.0 Mailbox has children"
    # RFC 9051 §6.3.4 and §7.1: a refused DELETE says why with HASCHILDREN.
    imap = ("NO", "HASCHILDREN")
    http = (409, "mailboxHasChild")


class NotFound(RookeryError):
    """No such object."""

    smtp = "550 5.1.1 No such object"
    imap = ("NO", "NONEXISTENT")
    http = (404, "notFound")


class AlreadyExists(RookeryError):
    """Already exists."""

    smtp = "550 5.1.0 Already exists"
    imap = ("NO", "ALREADYEXISTS")
    http = (409, "alreadyExists")


class UnknownDomain(NotFound):
    """Domain is not hosted here."""

    smtp = "550 5.7.1 Relaying denied"


class UnknownUser(NotFound):
    """No such user here."""

    smtp = "550 5.1.1 No such user here"


class RecipientChanged(RookeryError):
    """A recipient's address changed owner or went away after RCPT; send again."""

    smtp = "451 4.1.0 Recipient changed since RCPT, please try again"


class MailboxNotFound(NotFound):
    """Mailbox does not exist."""

    imap = ("NO", "TRYCREATE")


class NotSelectable(MailboxNotFound):
    """The name is a \\Noselect mailbox: it only holds children (RFC 9051
    §6.3.4). CREATE makes it a mailbox again, so APPEND/COPY say TRYCREATE."""


class QuotaExceeded(RookeryError):
    """Quota exceeded."""

    smtp = "552 5.2.2 Mailbox full"
    imap = ("NO", "OVERQUOTA")
    http = (403, "overQuota")


class TemporaryQuotaExceeded(QuotaExceeded):
    """Mailbox temporarily over quota."""

    smtp = "452 4.2.2 Mailbox full"


class MessageTooLarge(RookeryError):
    """Message exceeds the size limit."""

    smtp = "552 5.3.4 Message too big"
    imap = ("NO", "TOOBIG")
    http = (413, "tooLarge")


class AuthenticationFailed(RookeryError):
    """Authentication failed."""

    smtp = "535 5.7.8 Authentication credentials invalid"
    imap = ("NO", "AUTHENTICATIONFAILED")
    http = (401, "unauthorized")


class LoginsLocked(AuthenticationFailed):
    """Refused without checking the password: too many failed logins from
    this address lately. Temporary, so IMAP says UNAVAILABLE (RFC 5530 §3)
    rather than that the credentials were wrong."""

    smtp = "454 4.7.0 Temporary authentication failure"
    imap = ("NO", "UNAVAILABLE")


class Forbidden(RookeryError):
    """Not permitted."""

    smtp = "550 5.7.1 Not permitted"
    imap = ("NO", "NOPERM")
    http = (403, "forbidden")


class Unavailable(RookeryError):
    """Service temporarily unavailable."""

    smtp = "451 4.3.0 Temporary server failure, try again later"
    imap = ("NO", "UNAVAILABLE")
    http = (503, "serverUnavailable")
