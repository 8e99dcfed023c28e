"""IMAP IDLE (RFC 2177) end to end with aioimaplib.

Changes made through this node wake IDLE at once (the push hub); changes made
by another process sharing the store (here: a second node in the same loop,
with its own Storage and hub, on the same data directory) are found by the
store poll within ``imap.poll_interval`` (DESIGN.md principle 1).
"""

from __future__ import annotations

import asyncio
import imaplib
import smtplib
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aioimaplib
import pytest
from helpers import make_account, node_config, running_node

from server.node import ServerState

POLL = 0.5
MESSAGE = b"From: Bob <bob@remote.test>\r\nTo: alice@example.org\r\nSubject: ping\r\n\r\nhello\r\n"


@pytest.fixture
async def node(tmp_path: Path) -> AsyncIterator[ServerState]:
    cfg = node_config(tmp_path / "data", listen=("smtp", "imap"), imap__poll_interval=POLL)
    async with running_node(cfg) as state:
        await make_account(state.storage, "alice@example.org", "secret")
        yield state


@pytest.fixture
async def idler(node: ServerState) -> AsyncIterator[aioimaplib.IMAP4]:
    client = aioimaplib.IMAP4("127.0.0.1", node.ports["imap"], timeout=5)
    await client.wait_hello_from_server()
    assert (await client.login("alice@example.org", "secret")).result == "OK"
    assert (await client.select("INBOX")).result == "OK"
    try:
        yield client
    finally:
        if client.has_pending_idle():
            client.idle_done()
            await asyncio.sleep(0.05)
        await client.logout()


def _lines(push: object) -> list[bytes]:
    items = push if isinstance(push, list) else [push]
    return [i if isinstance(i, bytes) else str(i).encode() for i in items]


async def wait_push(client: aioimaplib.IMAP4, needle: bytes, timeout: float) -> list[bytes]:
    """Server pushes until one contains ``needle``; fails after ``timeout`` s."""
    seen: list[bytes] = []
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"no {needle!r} within {timeout}s; got {seen!r}")
        try:
            push = await client.wait_server_push(timeout=left)
        except asyncio.TimeoutError:
            raise AssertionError(f"no {needle!r} within {timeout}s; got {seen!r}") from None
        seen += _lines(push)
        if any(needle in line for line in seen):
            return seen


def send_mail(port: int) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as s:
        s.sendmail("bob@remote.test", ["alice@example.org"], MESSAGE)


async def test_delivery_wakes_idle_at_once_and_done_ends_it(node: ServerState, idler: aioimaplib.IMAP4) -> None:
    idle = await idler.idle_start(timeout=30)
    assert idler.has_pending_idle()
    await asyncio.to_thread(send_mail, node.ports["smtp"])
    t0 = time.monotonic()
    seen = await wait_push(idler, b"1 EXISTS", timeout=1.0)
    assert time.monotonic() - t0 < 1.0, seen
    idler.idle_done()
    result = await asyncio.wait_for(idle, 5)
    assert result.result == "OK"
    assert not idler.has_pending_idle()
    # The session is usable after IDLE.
    fetched = await idler.fetch("1", "(BODY.PEEK[HEADER.FIELDS (Subject)])")
    assert fetched.result == "OK" and any(b"Subject: ping" in line for line in _lines(fetched.lines))


async def test_flag_change_and_expunge_by_other_session_show_during_idle(node: ServerState, idler: aioimaplib.IMAP4) -> None:
    acct = (await node.storage.directory.get("alice@example.org")).id
    for _ in range(2):
        await node.storage.mail.append(acct, "INBOX", MESSAGE)
    # Re-select so the idler sees both messages.
    await idler.select("INBOX")
    idle = await idler.idle_start(timeout=30)

    def other_session(step: str) -> None:
        with imaplib.IMAP4("127.0.0.1", node.ports["imap"], timeout=10) as m:
            m.login("alice@example.org", "secret")
            m.select("INBOX")
            if step == "flag":
                m.store("2", "+FLAGS", "(\\Flagged)")
            else:
                m.store("1", "+FLAGS", "(\\Deleted)")
                m.expunge()

    await asyncio.to_thread(other_session, "flag")
    seen = await wait_push(idler, b"FETCH", timeout=1.0)
    assert any(b"2 FETCH (FLAGS (\\Flagged))" in line for line in seen), seen
    await asyncio.to_thread(other_session, "expunge")
    seen = await wait_push(idler, b"EXPUNGE", timeout=1.0)
    assert any(line.startswith(b"1 EXPUNGE") or b"* 1 EXPUNGE" in line for line in seen), seen
    idler.idle_done()
    assert (await asyncio.wait_for(idle, 5)).result == "OK"


async def test_change_by_another_process_is_found_by_polling(node: ServerState, idler: aioimaplib.IMAP4) -> None:
    # A second node on the same store directory: its own Storage and push
    # hub, so nothing it does reaches the first node's hub.
    cfg2 = node_config(Path(node.config.data_dir), listen=("smtp",), imap__poll_interval=POLL)
    async with running_node(cfg2) as other:
        assert other.storage is not node.storage and other.hub is not node.hub
        idle = await idler.idle_start(timeout=30)
        await asyncio.sleep(0.1)
        await asyncio.to_thread(send_mail, other.ports["smtp"])
        t0 = time.monotonic()
        await wait_push(idler, b"1 EXISTS", timeout=POLL + 1.0)
        assert time.monotonic() - t0 < POLL + 1.0
        acct = (await other.storage.directory.get("alice@example.org")).id
        box = await other.storage.mail.mailbox(acct, "INBOX")
        await other.storage.mail.store_flags(acct, box.id, [1], "add", ["\\Answered"])
        t0 = time.monotonic()
        seen = await wait_push(idler, b"FETCH", timeout=POLL + 1.0)
        assert time.monotonic() - t0 < POLL + 1.0
        assert any(b"FLAGS (\\Answered)" in line for line in seen), seen
        idler.idle_done()
        assert (await asyncio.wait_for(idle, 5)).result == "OK"
