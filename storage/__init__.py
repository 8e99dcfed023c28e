"""Storage: the domain API protocols use (directory, mail), over one KV store.

Protocols import from here and from :mod:`storage.errors`; never from
``storage.keys`` or ``storage.kv`` backends (DESIGN.md principle 5).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from . import keys, mail
from .directory import Account, Directory, normalize_address, resolve_address
from .errors import NotFound, RecipientChanged
from .kv import Database, ReadTransaction, Transaction, open_database
from .kv.base import decode_counter
from .mail import Delivery, MailStore

#: How long an RCPT answer is reused without asking the store (seconds), and
#: how many are kept. Every delivery checks the answer against the store.
RECIPIENT_CACHE_TTL = 30.0
RECIPIENT_CACHE_SIZE = 10_000


@dataclass(frozen=True, slots=True)
class LocalRecipient:
    """A local recipient as RCPT found it.

    ``version`` is the directory's version when ``account`` was read; the
    delivering transaction compares it with the store's and resolves the
    address again if the directory changed since (DESIGN.md principle 1).
    """

    address: str
    account: int
    version: int


@dataclass(slots=True)
class RecipientCache:
    """RCPT answers of this node, for accounts with no quota.

    An account with a quota is asked every time: whether one more message
    fits depends on mail that any node or protocol may have stored since.
    An unknown address is never cached, so a new account takes mail at once.
    The cache is a hint only: :meth:`Storage.deliver` checks each answer
    against the store in the transaction that commits the message.
    """

    ttl: float = RECIPIENT_CACHE_TTL
    size: int = RECIPIENT_CACHE_SIZE
    entries: dict[str, tuple[LocalRecipient, float]] = field(default_factory=dict)
    #: Answers read at an older directory version than this are not kept: an
    #: RCPT whose read began before a change must not refill the cache with
    #: what the change just invalidated.
    floor: int = 0

    def get(self, address: str) -> LocalRecipient | None:
        hit = self.entries.get(address)
        if hit is None:
            return None
        if hit[1] < time.monotonic():
            del self.entries[address]
            return None
        return hit[0]

    def put(self, recipient: LocalRecipient) -> None:
        if recipient.version < self.floor:
            return
        if len(self.entries) >= self.size:
            self.entries.clear()
        self.entries[recipient.address] = (recipient, time.monotonic() + self.ttl)

    def clear(self) -> None:
        self.entries.clear()

    def expire_before(self, version: int) -> bool:
        """The directory is at ``version`` now (read from the store): drop
        answers read before it, and refuse them from now on. True if
        ``version`` is newer than any seen before."""
        if version <= self.floor:
            return False
        self.floor = version
        for address in [a for a, (r, _) in self.entries.items() if r.version < version]:
            del self.entries[address]
        return True


@dataclass(slots=True)
class Storage:
    """Everything a node keeps in the store, behind its domain API."""

    db: Database
    directory: Directory
    mail: MailStore
    recipients: RecipientCache = field(default_factory=RecipientCache)
    #: The directory version this node's caches were last checked against
    #: (:meth:`check_directory`); ``None`` before the first check.
    directory_version: int | None = None

    @classmethod
    def open(
        cls,
        backend: str = "embedded",
        *,
        failed_login_delay: float = 1.0,
        max_failed_logins: int = 10,
        **options: object,
    ) -> Storage:
        db = open_database(backend, **options)
        return cls.over(db, failed_login_delay=failed_login_delay, max_failed_logins=max_failed_logins)

    @classmethod
    def over(cls, db: Database, *, failed_login_delay: float = 1.0, max_failed_logins: int = 10) -> Storage:
        directory = Directory(
            db,
            failed_login_delay=failed_login_delay,
            max_failed_logins=max_failed_logins,
            on_account_created=lambda tr, account: mail.create_default_mailboxes(tr, account.id),
        )
        return cls(db, directory, MailStore(db))

    async def accept_recipient(self, address: str, size: int = 0) -> LocalRecipient:
        """The account that takes mail for ``address``, checked for room for
        ``size`` more bytes, in one read (SMTP RCPT). Raises the directory's
        errors or the temporary over-quota error.

        The answer may come from this node's :class:`RecipientCache`; hand it
        to :meth:`deliver`, which checks it against the store.
        """
        normalized = normalize_address(address)
        cached = self.recipients.get(normalized)
        if cached is not None:
            return cached

        def fn(tr: ReadTransaction) -> tuple[LocalRecipient, int]:
            version = decode_counter(tr.get(keys.DIRECTORY_VERSION))
            acct = resolve_address(tr, normalized)
            quota = mail.check_quota(tr, acct, size, temporary=True)
            return LocalRecipient(normalized, acct, version), quota

        recipient, quota = await self.db.read(fn)
        if not quota:
            self.recipients.put(recipient)
        return recipient

    async def deliver(self, recipients: Sequence[LocalRecipient], raw: bytes) -> list[Delivery]:
        """Deliver ``raw`` to the INBOX of each recipient RCPT accepted, all or
        none, once.

        In the committing transaction, an answer older than the directory is
        resolved again: the message goes where the store says now. An address
        that no longer takes mail raises :class:`RecipientChanged` (4xx: the
        client sends again and RCPT gets the new answer).
        """
        stale: list[bool] = [False]

        def accounts(tr: Transaction) -> list[int]:
            version = decode_counter(tr.get(keys.DIRECTORY_VERSION))
            stale[0] = any(r.version != version for r in recipients)
            if not stale[0]:
                return [r.account for r in recipients]
            try:
                return [resolve_address(tr, r.address) for r in recipients]
            except NotFound as exc:
                raise RecipientChanged(f"{exc.text} (changed since RCPT)") from exc

        try:
            return await self.mail.deliver(accounts, raw)
        finally:
            if stale[0]:
                self.recipients.clear()

    def invalidate(self, scope: str = "directory") -> None:
        """Drop this node's cached directory answers (a peer's ``invalidate``
        hint). ``scope``: ``recipients`` (RCPT answers), ``credentials`` or
        ``credentials:ADDRESS`` (verified passwords), anything else all."""
        kind = scope.partition(":")[0]
        if kind != "credentials":
            self.recipients.clear()
        if kind != "recipients":
            self.directory.forget_credentials()

    async def check_directory(self) -> bool:
        """Read the store's directory version; if it moved since the last
        check, drop the caches (the store-truth fallback for a lost
        ``invalidate``). True when it moved (False at the first check,
        which only drops RCPT answers older than the version it reads)."""
        version = decode_counter(await self.db.read(lambda tr: tr.get(keys.DIRECTORY_VERSION)))
        self.recipients.expire_before(version)
        previous, self.directory_version = self.directory_version, version
        if previous is None or version == previous:
            return False
        self.directory.forget_credentials()
        return True

    async def remove_account(self, email: str) -> None:
        """Remove an account and all its mail: messages first, in chunked
        transactions, then the account and what is left, in one."""
        account = await self.directory.get(email)
        for box in await self.mail.mailboxes(account.id):
            await self.mail.empty_mailbox(account.id, box.id)
        await self.directory.remove_account(email, on_remove=mail.remove_account_data)

    async def ping(self) -> bool:
        """True when the store answers a read (readiness)."""
        try:
            await self.db.read(lambda tr: tr.get(b"\x00ping"))
        except Exception:
            return False
        return True

    async def close(self) -> None:
        await self.db.close()


__all__ = ["Account", "Directory", "MailStore", "Storage"]
