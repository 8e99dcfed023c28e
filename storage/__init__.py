"""Storage: the domain API protocols use (directory, mail), over one KV store.

Protocols import from here and from :mod:`storage.errors`; never from
``storage.keys`` or ``storage.kv`` backends (DESIGN.md principle 5).
"""

from __future__ import annotations

from dataclasses import dataclass

from . import mail
from .directory import Account, Directory
from .kv import Database, open_database
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

    async def remove_account(self, email: str) -> None:
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
