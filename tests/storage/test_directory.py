"""Directory: domains, accounts, aliases and the login policy."""

from __future__ import annotations

import asyncio
import time

import pytest
from helpers import make_account

from storage import Storage, keys
from storage.errors import AlreadyExists, AuthenticationFailed, InvalidInput, UnknownDomain, UnknownUser


async def test_passwords_are_stored_only_as_argon2_hashes(storage: Storage) -> None:
    acct = await make_account(storage, "alice@example.org", "correct horse")
    raw = await storage.db.read(lambda tr: tr.get(keys.account(acct)))
    assert raw is not None and b"correct horse" not in raw and b"$argon2id$" in raw


async def test_login_checks_password_and_follows_changes(storage: Storage) -> None:
    await make_account(storage, "alice@example.org", "one")
    assert (await storage.directory.login("Alice@Example.org", "one", "1.2.3.4")).email == "alice@example.org"
    await storage.directory.set_password("alice@example.org", "two")
    with pytest.raises(AuthenticationFailed):
        await storage.directory.login("alice@example.org", "one", "1.2.3.4")
    assert (await storage.directory.login("alice@example.org", "two", "1.2.3.4")).email == "alice@example.org"
    with pytest.raises(AuthenticationFailed):
        await storage.directory.login("nobody@example.org", "two", "1.2.3.4")


async def test_failed_logins_are_limited_per_ip(storage: Storage) -> None:
    storage.directory.max_failed_logins = 3
    await make_account(storage, "alice@example.org", "pw")
    for _ in range(3):
        with pytest.raises(AuthenticationFailed):
            await storage.directory.login("alice@example.org", "wrong", "10.0.0.9")
    with pytest.raises(AuthenticationFailed, match="too many"):
        await storage.directory.login("alice@example.org", "pw", "10.0.0.9")
    # Another address is not punished for it.
    await storage.directory.login("alice@example.org", "pw", "10.0.0.10")


async def test_resolution_of_aliases_catchall_and_subaddress(storage: Storage) -> None:
    alice = await make_account(storage, "alice@example.org")
    bob = await make_account(storage, "bob@example.org")
    await storage.directory.add_alias("info@example.org", "alice@example.org")
    assert await storage.directory.resolve("info@example.org") == alice
    # postmaster (RFC 5321 §4.5.1) came with the domain's first account, as an alias that can be moved.
    assert await storage.directory.resolve("postmaster@example.org") == alice
    await storage.directory.remove_alias("postmaster@example.org")
    await storage.directory.add_alias("postmaster@example.org", "bob@example.org")
    assert await storage.directory.resolve("postmaster@example.org") == bob
    assert await storage.directory.resolve("bob+news@example.org") == bob
    with pytest.raises(UnknownUser):
        await storage.directory.resolve("carol@example.org")
    with pytest.raises(UnknownDomain):
        await storage.directory.resolve("carol@elsewhere.test")
    await storage.directory.add_catchall("example.org", "bob@example.org")
    assert await storage.directory.resolve("carol@example.org") == bob
    with pytest.raises(AlreadyExists):
        await storage.directory.add_alias("bob@example.org", "alice@example.org")
    with pytest.raises(InvalidInput):
        await storage.directory.remove_alias("bob@example.org")


async def test_new_accounts_get_special_use_mailboxes(storage: Storage) -> None:
    from storage import mail

    acct = await make_account(storage)
    boxes = await storage.db.read(lambda tr: mail.list_mailboxes(tr, acct))
    assert [(b.name, b.special_use) for b in boxes] == [
        ("INBOX", None), ("Archive", "\\Archive"), ("Drafts", "\\Drafts"), ("Junk", "\\Junk"), ("Sent", "\\Sent"), ("Trash", "\\Trash"),
    ]


async def test_concurrent_account_creation_gives_distinct_ids(storage: Storage) -> None:
    await storage.directory.add_domain("example.org")
    accounts = await asyncio.gather(*(storage.directory.add_account(f"u{i}@example.org", "pw") for i in range(10)))
    assert len({a.id for a in accounts}) == 10


@pytest.mark.parametrize("bad", ["", "plain", "a@", "@b.org", "a b@c.org", "a..b@c.org", "x@-bad-.org", "x" * 65 + "@c.org"])
async def test_invalid_addresses_are_refused(storage: Storage, bad: str) -> None:
    await storage.directory.add_domain("c.org")
    with pytest.raises(InvalidInput):
        await storage.directory.add_account(bad, "pw")


async def test_failed_logins_count_in_the_store_and_old_steps_go(
    storage: Storage, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two nodes' directories on one store share the count; every refusal,
    limited or not, waits the delay; counters of past windows are cleared."""
    from storage import directory
    from storage.directory import Directory

    clock = [1_000_000.0]
    monkeypatch.setattr(directory.time, "time", lambda: clock[0])
    await make_account(storage, "alice@example.org", "pw")
    other = Directory(storage.db, failed_login_delay=0.2, max_failed_logins=4)  # another node
    storage.directory.max_failed_logins = 4
    storage.directory.failed_login_delay = 0.2
    for node in (storage.directory, other, storage.directory, other):
        with pytest.raises(AuthenticationFailed, match="invalid"):
            await node.login("alice@example.org", "wrong", "10.1.0.1")
    for node in (storage.directory, other):
        start = asyncio.get_running_loop().time()
        with pytest.raises(AuthenticationFailed, match="too many"):
            await node.login("alice@example.org", "pw", "10.1.0.1")
        assert asyncio.get_running_loop().time() - start >= 0.2, "a limited refusal waits like any other"
    assert (await other.login("alice@example.org", "pw", "10.1.0.2")).email == "alice@example.org"

    async def counters() -> list[tuple[bytes, bytes]]:
        return list(await storage.db.read(lambda tr: tr.get_range(*keys.prefix_range(("l", "fail")))))

    assert len(await counters()) == 1
    # Five minutes and a step later the failures are forgotten ...
    clock[0] += directory.FAILED_LOGIN_WINDOW + directory.FAILED_LOGIN_STEP
    assert (await other.login("alice@example.org", "pw", "10.1.0.1")).email == "alice@example.org"
    # ... and the next failure anywhere clears their counter.
    other.failed_login_delay = 0
    with pytest.raises(AuthenticationFailed):
        await other.login("alice@example.org", "wrong", "10.9.9.9")
    rows = await counters()
    assert [keys.unpack(k)[3] for k, _ in rows] == ["10.9.9.9"]


async def test_directory_caches_follow_the_store_version(storage: Storage) -> None:
    """``check_directory`` (the node's periodic store check) drops RCPT
    answers read before a directory change, and keeps an answer whose read
    began before the change from refilling the cache after it."""
    await make_account(storage, "alice@example.org")
    await storage.directory.add_alias("info@example.org", "alice@example.org")
    assert await storage.check_directory() is False  # first look: nothing to drop
    early = await storage.accept_recipient("info@example.org")
    assert storage.recipients.get("info@example.org") == early
    assert await storage.check_directory() is False  # unchanged: kept
    assert storage.recipients.get("info@example.org") == early

    await storage.directory.remove_alias("info@example.org")
    assert await storage.check_directory() is True
    assert storage.recipients.get("info@example.org") is None
    storage.recipients.put(early)  # an RCPT that read before the change, answering late
    assert storage.recipients.get("info@example.org") is None
    with pytest.raises(UnknownUser):
        await storage.accept_recipient("info@example.org")


async def test_invalidate_scopes(storage: Storage) -> None:
    await make_account(storage, "alice@example.org")
    await storage.directory.login("alice@example.org", "secret", "192.0.2.1")
    await storage.accept_recipient("alice@example.org")
    storage.invalidate("credentials:alice@example.org")
    assert storage.recipients.get("alice@example.org") is not None and not storage.directory._verified
    await storage.directory.login("alice@example.org", "secret", "192.0.2.1")
    storage.invalidate("directory")
    assert storage.recipients.get("alice@example.org") is None and not storage.directory._verified


async def test_sweep_clears_failure_counters_out_of_every_window(storage: Storage) -> None:
    from storage import directory

    storage.directory.failed_login_delay = 0
    await make_account(storage, "alice@example.org", "pw")
    with pytest.raises(AuthenticationFailed):
        await storage.directory.login("alice@example.org", "wrong", "10.3.0.1")

    async def counters() -> int:
        return len(await storage.db.read(lambda tr: tr.get_range(*keys.prefix_range(("l", "fail")))))

    await storage.directory.sweep_login_failures()
    assert await counters() == 1  # still inside the window: kept
    later = time.time() + directory.FAILED_LOGIN_WINDOW + directory.FAILED_LOGIN_STEP
    await storage.directory.sweep_login_failures(later)
    assert await counters() == 0
