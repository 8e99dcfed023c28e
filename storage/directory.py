"""Directory: hosted domains, accounts, aliases, catch-alls, and the login policy.

Passwords are stored only as argon2id hashes. Hashing and verifying block for
tens of milliseconds, so they run in a worker thread, never on the loop.
:meth:`Directory.login` is the one final method every protocol calls: it
applies the per-IP failure limit and the failure delay (STYLE.md, Radicale
``auth.login``).
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import hmac
import json
import os
import re
import time
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass

import argon2

from . import keys
from .errors import (
    AlreadyExists,
    AuthenticationFailed,
    InvalidInput,
    LoginsLocked,
    NotFound,
    UnknownDomain,
    UnknownUser,
)
from .kv.base import Database, ReadTransaction, Transaction, decode_counter

#: RFC 5321 §4.5.3.1: local part ≤ 64 octets, domain ≤ 255, path ≤ 256.
MAX_LOCAL_PART = 64
MAX_DOMAIN = 255
#: Dovecot's ``recipient_delimiter`` default: user+tag@example.com reaches user.
RECIPIENT_DELIMITER = "+"
#: Failed logins count per client address over this many seconds, in steps
#: of FAILED_LOGIN_STEP seconds (the window is FAILED_LOGIN_WINDOW plus the
#: part of the current step gone by). The counters live in the store, so
#: every node sees every node's failures.
FAILED_LOGIN_WINDOW = 300.0
FAILED_LOGIN_STEP = 60.0
_STEPS = int(FAILED_LOGIN_WINDOW // FAILED_LOGIN_STEP)

_DOMAIN_RE = re.compile(r"^(?=.{1,255}$)([a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?)(\.[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?)*$")
_LOCAL_RE = re.compile(r"^[A-Za-z0-9!#$%&'*+/=?^_`{|}~.\-\u0080-\U0010ffff]{1,64}$")

_hasher = argon2.PasswordHasher()


def normalize_domain(name: str) -> str:
    """Lower-case, IDNA-encode and validate a domain name."""
    name = name.strip().rstrip(".").lower()
    try:
        ascii_name = name.encode("idna").decode("ascii") if not name.isascii() else name
    except UnicodeError:
        raise InvalidInput(f"invalid domain name {name!r}") from None
    if not _DOMAIN_RE.match(ascii_name):
        raise InvalidInput(f"invalid domain name {name!r}")
    return ascii_name


def normalize_address(address: str) -> str:
    """Validate ``local@domain`` and return it lower-cased with an ASCII domain."""
    address = address.strip()
    if address.startswith("<") and address.endswith(">"):
        address = address[1:-1]
    local, sep, domain_name = address.rpartition("@")
    if not sep or not local or not _LOCAL_RE.match(local) or len(local.encode()) > MAX_LOCAL_PART:
        raise InvalidInput(f"invalid address {address!r}")
    if local.startswith(".") or local.endswith(".") or ".." in local:
        raise InvalidInput(f"invalid address {address!r}")
    return f"{local.lower()}@{normalize_domain(domain_name)}"


@dataclass(frozen=True, slots=True)
class Account:
    id: int
    email: str
    quota: int  # bytes, 0 = unlimited
    created: float

    @property
    def domain(self) -> str:
        return self.email.rpartition("@")[2]


@functools.lru_cache(maxsize=4096)
def _account_from(raw: bytes) -> tuple[Account, str]:
    # Cached by the stored bytes (an Account is immutable): every delivery
    # reads its recipients' records, and decoding the JSON each time cost
    # more than the rest of the quota check.
    rec = json.loads(raw)
    return Account(rec["id"], rec["email"], rec.get("quota", 0), rec.get("created", 0.0)), rec["hash"]


def _account_value(account: Account, password_hash: str) -> bytes:
    return json.dumps(
        {"id": account.id, "email": account.email, "quota": account.quota, "created": account.created, "hash": password_hash}
    ).encode()


# -- transactional functions (transaction first; STYLE.md) -----------------

def get_account(tr: ReadTransaction, acct: int) -> Account | None:
    raw = tr.get(keys.account(acct))
    return None if raw is None else _account_from(raw)[0]


#: The reserved local part every domain must take mail for (RFC 5321 §4.5.1).
POSTMASTER = "postmaster"

def resolve_address(tr: ReadTransaction, address: str) -> int:
    """The account that receives mail for ``address`` (normalized).

    Raises :class:`UnknownDomain` (not hosted: relay refused) or
    :class:`UnknownUser`.
    """
    local, _, domain_name = address.rpartition("@")
    if tr.get(keys.domain(domain_name)) is None:
        raise UnknownDomain(f"domain {domain_name} is not hosted here")
    candidates = [address]
    if RECIPIENT_DELIMITER in local:
        candidates.append(f"{local.split(RECIPIENT_DELIMITER, 1)[0]}@{domain_name}")
    for candidate in candidates:
        raw = tr.get(keys.address(candidate))
        if raw is not None:
            return int(raw)
    raw = tr.get(keys.catchall(domain_name))
    if raw is not None:
        return int(raw)
    raise UnknownUser(f"no such user {address}")


def _bump(tr: Transaction) -> None:
    tr.add(keys.DIRECTORY_VERSION, 1)


def _login_step(now: float) -> int:
    return int(now // FAILED_LOGIN_STEP)


def recent_failures(tr: ReadTransaction, remote: str, now: float) -> int:
    """Failed logins from ``remote`` in the last five minutes, all nodes."""
    step = _login_step(now)
    return sum(decode_counter(tr.get(keys.login_failures(s, remote))) for s in range(step - _STEPS, step + 1))


def count_failure(tr: Transaction, remote: str, now: float) -> None:
    """One more failed login from ``remote``; steps out of every window go.
    An atomic add: failures from many nodes at once never conflict."""
    step = _login_step(now)
    tr.add(keys.login_failures(step, remote), 1)
    tr.clear_range(*keys.login_failures_before(step - _STEPS))


class Directory:
    """Directory operations over a store. Safe to share across sessions."""

    def __init__(
        self,
        db: Database,
        *,
        failed_login_delay: float = 1.0,
        max_failed_logins: int = 10,
        on_account_created: Callable[[Transaction, Account], None] | None = None,
    ) -> None:
        self.db = db
        #: Threads for password hashing (None: the loop's default executor);
        #: the node gives it threads free to use every CPU (server/cpu.py).
        self.hash_executor: Executor | None = None
        self.failed_login_delay = failed_login_delay
        self.max_failed_logins = max_failed_logins
        #: Called inside the creating transaction (mail uses it to make the
        #: default mailboxes, so an account never exists without them).
        self.on_account_created = on_account_created
        # Verified (hash, HMAC of password) per account: skips argon2 on
        # repeat logins, and is checked against the stored hash every time,
        # so a password change anywhere takes effect at once (principle 1).
        self._verified: dict[int, tuple[str, bytes]] = {}
        self._secret = os.urandom(32)

    def forget_credentials(self) -> None:
        """Drop the verified-password cache (it checks itself against the
        stored hash anyway; this frees what a directory change made stale)."""
        self._verified.clear()

    # -- domains ------------------------------------------------------------

    async def add_domain(self, name: str) -> str:
        name = normalize_domain(name)

        def fn(tr: Transaction) -> None:
            if tr.get(keys.domain(name)) is not None:
                raise AlreadyExists(f"domain {name} already exists")
            tr.set(keys.domain(name), json.dumps({"name": name, "created": time.time()}).encode())
            _bump(tr)

        await self.db.transact(fn)
        return name

    async def list_domains(self) -> list[str]:
        rows = await self.db.read(lambda tr: tr.get_range(*keys.DOMAINS))
        return [keys.unpack(k)[2] for k, _ in rows]

    async def remove_domain(self, name: str) -> None:
        name = normalize_domain(name)

        def fn(tr: Transaction) -> None:
            if tr.get(keys.domain(name)) is None:
                raise NotFound(f"no domain {name}")
            for k, _ in tr.get_range(*keys.ADDRESSES):
                if keys.unpack(k)[2].endswith("@" + name):
                    raise InvalidInput(f"domain {name} still has accounts or aliases; remove them first")
            # A catch-all (whose account may live in another domain) counts as
            # an alias: it goes by `alias remove @domain`, never silently.
            if tr.get(keys.catchall(name)) is not None:
                raise InvalidInput(f"domain {name} still has a catch-all; remove it first (alias remove @{name})")
            tr.clear(keys.domain(name))
            _bump(tr)

        await self.db.transact(fn)

    # -- accounts -----------------------------------------------------------

    async def add_account(self, email: str, password: str, quota: int = 0) -> Account:
        email = normalize_address(email)
        if not password:
            raise InvalidInput("password must not be empty")
        password_hash = await asyncio.get_running_loop().run_in_executor(self.hash_executor, _hasher.hash, password)
        domain_name = email.rpartition("@")[2]
        created = time.time()

        def fn(tr: Transaction) -> Account:
            if tr.get(keys.domain(domain_name)) is None:
                raise UnknownDomain(f"domain {domain_name} is not hosted here; add it first")
            if tr.get(keys.address(email)) is not None:
                raise AlreadyExists(f"address {email} already exists")
            acct = decode_counter(tr.get(keys.ACCOUNT_SEQ)) + 1
            tr.add(keys.ACCOUNT_SEQ, 1)
            account = Account(acct, email, quota, created)
            tr.set(keys.account(acct), _account_value(account, password_hash))
            tr.set(keys.address(email), str(acct).encode())
            # RFC 5321 §4.5.1: every domain takes mail for postmaster. Its
            # first account gets it as a plain alias, which the admin sees
            # in ``alias list`` and may point elsewhere.
            postmaster = keys.address(f"{POSTMASTER}@{domain_name}")
            if tr.get(postmaster) is None:
                tr.set(postmaster, str(acct).encode())
            _bump(tr)
            if self.on_account_created is not None:
                self.on_account_created(tr, account)
            return account

        return await self.db.transact(fn)

    async def get(self, email: str) -> Account:
        email = normalize_address(email)

        def fn(tr: ReadTransaction) -> Account:
            raw = tr.get(keys.address(email))
            account = None if raw is None else get_account(tr, int(raw))
            if account is None or account.email != email:
                raise UnknownUser(f"no account {email}")
            return account

        return await self.db.read(fn)

    async def account(self, acct: int) -> Account:
        account = await self.db.read(lambda tr: get_account(tr, acct))
        if account is None:
            raise UnknownUser(f"no account {acct}")
        return account

    async def list_accounts(self, domain_name: str | None = None) -> list[Account]:
        rows = await self.db.read(lambda tr: tr.get_range(*keys.ACCOUNTS))
        accounts = [_account_from(v)[0] for _, v in rows]
        if domain_name is not None:
            domain_name = normalize_domain(domain_name)
            accounts = [a for a in accounts if a.domain == domain_name]
        return accounts

    async def set_password(self, email: str, password: str) -> None:
        if not password:
            raise InvalidInput("password must not be empty")
        account = await self.get(email)
        password_hash = await asyncio.get_running_loop().run_in_executor(self.hash_executor, _hasher.hash, password)

        def fn(tr: Transaction) -> None:
            raw = tr.get(keys.account(account.id))
            if raw is None:
                raise UnknownUser(f"no account {email}")
            tr.set(keys.account(account.id), _account_value(_account_from(raw)[0], password_hash))
            _bump(tr)

        await self.db.transact(fn)

    async def set_quota(self, email: str, quota: int) -> None:
        account = await self.get(email)

        def fn(tr: Transaction) -> None:
            raw = tr.get(keys.account(account.id))
            if raw is None:
                raise UnknownUser(f"no account {email}")
            current, password_hash = _account_from(raw)
            updated = Account(current.id, current.email, quota, current.created)
            tr.set(keys.account(account.id), _account_value(updated, password_hash))
            _bump(tr)

        await self.db.transact(fn)

    async def remove_account(self, email: str, on_remove: Callable[[Transaction, int], None] | None = None) -> None:
        """Remove an account, its addresses and (through ``on_remove``) its data."""
        account = await self.get(email)

        domain_name = account.email.rpartition("@")[2]
        postmaster = keys.address(f"{POSTMASTER}@{domain_name}")

        def fn(tr: Transaction) -> None:
            others: list[int] = []
            for k, v in tr.get_range(*keys.ADDRESSES):
                if int(v) == account.id:
                    tr.clear(k)
                elif keys.unpack(k)[2].endswith("@" + domain_name):
                    others.append(int(v))
            if tr.get(postmaster) is None and others:
                tr.set(postmaster, str(min(others)).encode())  # postmaster moves on (RFC 5321 §4.5.1)
            for k, v in tr.get_range(*keys.prefix_range(("d", "catchall"))):
                if int(v) == account.id:
                    tr.clear(k)
            tr.clear(keys.account(account.id))
            _bump(tr)
            if on_remove is not None:
                on_remove(tr, account.id)

        await self.db.transact(fn)

    # -- aliases ------------------------------------------------------------

    async def add_alias(self, alias: str, target: str) -> None:
        alias = normalize_address(alias)
        account = await self.get(target)
        domain_name = alias.rpartition("@")[2]

        def fn(tr: Transaction) -> None:
            if tr.get(keys.domain(domain_name)) is None:
                raise UnknownDomain(f"domain {domain_name} is not hosted here; add it first")
            if tr.get(keys.address(alias)) is not None:
                raise AlreadyExists(f"address {alias} already exists")
            if get_account(tr, account.id) is None:
                raise UnknownUser(f"no account {target}")
            tr.set(keys.address(alias), str(account.id).encode())
            _bump(tr)

        await self.db.transact(fn)

    async def remove_alias(self, alias: str) -> None:
        alias = normalize_address(alias)

        def fn(tr: Transaction) -> None:
            raw = tr.get(keys.address(alias))
            if raw is None:
                raise NotFound(f"no alias {alias}")
            account = get_account(tr, int(raw))
            if account is not None and account.email == alias:
                raise InvalidInput(f"{alias} is an account's own address, not an alias")
            tr.clear(keys.address(alias))
            _bump(tr)

        await self.db.transact(fn)

    async def list_aliases(self) -> list[tuple[str, str]]:
        """``(alias, account email)`` pairs, aliases and catch-alls (``@domain``)."""

        def fn(tr: ReadTransaction) -> list[tuple[str, str]]:
            emails = {a.id: a.email for a in (_account_from(v)[0] for _, v in tr.get_range(*keys.ACCOUNTS))}
            out = []
            for k, v in tr.get_range(*keys.ADDRESSES):
                addr = keys.unpack(k)[2]
                target = emails.get(int(v), "?")
                if addr != target:
                    out.append((addr, target))
            for k, v in tr.get_range(*keys.prefix_range(("d", "catchall"))):
                out.append(("@" + keys.unpack(k)[2], emails.get(int(v), "?")))
            return out

        return await self.db.read(fn)

    async def add_catchall(self, domain_name: str, target: str) -> None:
        """Deliver mail for unknown addresses of ``domain_name`` to account
        ``target``. Like an alias, a domain has at most one: raises
        :class:`AlreadyExists` while it has one (remove it first)."""
        domain_name = normalize_domain(domain_name)
        account = await self.get(target)

        def fn(tr: Transaction) -> None:
            if tr.get(keys.domain(domain_name)) is None:
                raise UnknownDomain(f"domain {domain_name} is not hosted here")
            current = tr.get(keys.catchall(domain_name))
            if current is not None:
                holder = get_account(tr, int(current))
                to = f" (to {holder.email})" if holder is not None else ""
                raise AlreadyExists(f"catch-all @{domain_name} already exists{to}; remove it first")
            if get_account(tr, account.id) is None:
                raise UnknownUser(f"no account {target}")
            tr.set(keys.catchall(domain_name), str(account.id).encode())
            _bump(tr)

        await self.db.transact(fn)

    async def remove_catchall(self, domain_name: str) -> None:
        """Remove the catch-all of ``domain_name``; :class:`NotFound` if it has none."""
        domain_name = normalize_domain(domain_name)

        def fn(tr: Transaction) -> None:
            if tr.get(keys.domain(domain_name)) is None:
                raise UnknownDomain(f"domain {domain_name} is not hosted here")
            if tr.get(keys.catchall(domain_name)) is None:
                raise NotFound(f"no catch-all @{domain_name}")
            tr.clear(keys.catchall(domain_name))
            _bump(tr)

        await self.db.transact(fn)

    async def resolve(self, address: str) -> int:
        """Account id receiving mail for ``address``; see :func:`resolve_address`."""
        address = normalize_address(address)
        return await self.db.read(lambda tr: resolve_address(tr, address))

    # -- login policy ---------------------------------------------------------

    def _fingerprint(self, password: str) -> bytes:
        return hmac.new(self._secret, password.encode("utf-8", "surrogateescape"), hashlib.sha256).digest()

    async def login(self, username: str, password: str, remote: str) -> Account:
        """Check a user name (address or alias) and password.

        The one place every protocol authenticates. Raises
        :class:`AuthenticationFailed` after ``failed_login_delay`` seconds for a
        wrong or unknown user or password, and :class:`LoginsLocked` (after
        the same delay, without checking the password) when ``remote`` has
        had ``max_failed_logins`` failures in the last five minutes on any node.

        Cost: the read that finds the account also reads the failure count; a
        failure adds one transaction, a success none.
        """
        try:
            address: str | None = normalize_address(username)
        except InvalidInput:
            address = None
        now = time.time()

        def fn(tr: ReadTransaction) -> tuple[tuple[Account, str] | None, int]:
            failures = recent_failures(tr, remote, now)
            raw = tr.get(keys.address(address)) if address is not None else None
            rec = tr.get(keys.account(int(raw))) if raw is not None else None
            return (None if rec is None else _account_from(rec)), failures

        found, failures = await self.db.read(fn)
        if failures >= self.max_failed_logins:
            await asyncio.sleep(self.failed_login_delay)
            raise LoginsLocked("too many failed logins; try again later")
        account = await self._check(found, password)
        if account is None:
            await self.db.transact(lambda tr: count_failure(tr, remote, now))
            await asyncio.sleep(self.failed_login_delay)
            raise AuthenticationFailed("invalid user name or password")
        return account

    async def sweep_login_failures(self, now: float | None = None) -> None:
        """Clear failure counters of steps out of every window (a failure
        clears them too; this catches a cluster where failures stopped).
        Cluster-wide work: one node at a time runs it, under a lease."""
        step = _login_step(time.time() if now is None else now)
        await self.db.transact(lambda tr: tr.clear_range(*keys.login_failures_before(step - _STEPS)))

    async def _check(self, found: tuple[Account, str] | None, password: str) -> Account | None:
        if found is None:
            # Spend the time a real check takes, so timing tells nothing.
            await asyncio.get_running_loop().run_in_executor(self.hash_executor, _verify, _DUMMY_HASH, password)
            return None
        account, password_hash = found
        fingerprint = self._fingerprint(password)
        cached = self._verified.get(account.id)
        if cached is not None and cached[0] == password_hash and hmac.compare_digest(cached[1], fingerprint):
            return account
        ok = await asyncio.get_running_loop().run_in_executor(self.hash_executor, _verify, password_hash, password)
        if not ok:
            return None
        self._verified[account.id] = (password_hash, fingerprint)
        return account


def _verify(password_hash: str, password: str) -> bool:
    try:
        return _hasher.verify(password_hash, password)
    except (argon2.exceptions.VerificationError, argon2.exceptions.InvalidHashError):
        return False


_DUMMY_HASH = _hasher.hash("rookery-timing-equalizer")

