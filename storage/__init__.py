"""Storage: the domain API protocols use (directory, mail), over one KV store.

Protocols import from here and from :mod:`storage.errors`; never from
``storage.keys`` or ``storage.kv`` backends (DESIGN.md principle 5).
"""

from __future__ import annotations

from dataclasses import dataclass

from . import mail
from .directory import Account, Directory
from .kv import Database, ReadTransaction, open_database
from .mail import MailStore


@dataclass(slots=True)
class Storage:
    """Everything a node keeps in the store, behind its domain API."""

    db: Database
    directory: Directory
    mail: MailStore

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

    async def accept_recipient(self, address: str, size: int = 0) -> int:
        """The account that takes mail for ``address``, checked for room for
        ``size`` more bytes, in one read (SMTP RCPT). Raises the directory's
        errors or the temporary over-quota error."""
        from .directory import normalize_address, resolve_address

        normalized = normalize_address(address)

        def fn(tr: ReadTransaction) -> int:
            acct = resolve_address(tr, normalized)
            mail.check_quota(tr, acct, size, temporary=True)
            return acct

        return await self.db.read(fn)

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
