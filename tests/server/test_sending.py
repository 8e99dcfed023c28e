"""Sending through a whole node: submission, the queue worker, the CLI."""

from __future__ import annotations

import asyncio
import smtplib
import ssl
from pathlib import Path

from aiosmtpd.smtp import SMTP as SinkSMTP
from aiosmtpd.smtp import Envelope, Session
from helpers import make_account, node_config, rookery, running_node

from server.node import ServerState


class Sink:
    """The remote world: an SMTP server that keeps what it receives."""

    def __init__(self) -> None:
        self.received: list[tuple[str, list[str], bytes]] = []
        self.arrived = asyncio.Event()

    async def handle_DATA(self, server: SinkSMTP, session: Session, envelope: Envelope) -> str:
        content = envelope.original_content or b""
        assert isinstance(content, bytes)
        self.received.append((envelope.mail_from or "", list(envelope.rcpt_tos), content))
        self.arrived.set()
        return "250 2.0.0 OK"

    async def start(self) -> tuple[asyncio.base_events.Server, int]:
        server = await asyncio.get_running_loop().create_server(lambda: SinkSMTP(self), "127.0.0.1", 0)
        return server, server.sockets[0].getsockname()[1]


async def inbox_subjects(state: ServerState, email: str) -> list[str]:
    acct = (await state.storage.directory.get(email)).id
    out = []
    for _, em in await state.storage.mail.list_messages(acct, "INBOX"):
        assert em is not None and em.structure is not None
        out.append(em.structure.envelope.subject or "")
    return out


async def test_submission_delivers_locally_and_queues_remote(tmp_path: Path) -> None:
    sink = Sink()
    server, port = await sink.start()
    try:
        cfg = node_config(
            tmp_path / "data", ("smtp", "submission", "submissions"),
            **{"routes__remote.test": f"127.0.0.1:{port}", "queue__poll_interval": 0.5},
        )
        async with running_node(cfg) as state:
            await make_account(state.storage, "alice@example.org", "pw")
            await make_account(state.storage, "carol@example.org", "pw")
            msg = b"From: alice@example.org\r\nTo: carol@example.org, bob@remote.test\r\nSubject: hello both\r\n\r\nhi\r\n"

            def submit() -> dict[str, tuple[int, bytes]]:
                ctx = ssl.create_default_context()
                ctx.check_hostname = False
                ctx.verify_mode = ssl.CERT_NONE
                with smtplib.SMTP_SSL("127.0.0.1", state.ports["submissions"], context=ctx, timeout=10) as s:
                    s.login("alice@example.org", "pw")
                    return s.sendmail("alice@example.org", ["carol@example.org", "bob@remote.test"], msg)

            assert await asyncio.to_thread(submit) == {}
            assert await inbox_subjects(state, "carol@example.org") == ["hello both"]
            await asyncio.wait_for(sink.arrived.wait(), 10)
            [(sender, rcpts, content)] = sink.received
            assert sender == "alice@example.org" and rcpts == ["bob@remote.test"]
            assert b"Subject: hello both" in content

            def forged() -> int:
                with smtplib.SMTP("127.0.0.1", state.ports["submission"], timeout=10) as s:
                    s.starttls(context=ssl._create_unverified_context())
                    s.login("alice@example.org", "pw")
                    try:
                        s.sendmail("carol@example.org", ["bob@remote.test"], b"From: carol@example.org\r\n\r\nx\r\n")
                    except smtplib.SMTPSenderRefused as exc:
                        return exc.smtp_code
                    return 250

            assert await asyncio.to_thread(forged) == 553
            listing = rookery("queue", "list", data=tmp_path / "data")
            assert listing.returncode == 0
    finally:
        server.close()
        await server.wait_closed()


async def test_queue_drain_moves_a_whole_queue_to_another_store(tmp_path: Path) -> None:
    # Store A queues mail for remote.test with delivery paused; store B hosts
    # remote.test behind its own node. `queue drain --to` moves everything.
    a_data, b_data = tmp_path / "a", tmp_path / "b"
    async with running_node(node_config(b_data, ("smtp",))) as b:
        await make_account(b.storage, "bob@remote.test", "pw")
        async with running_node(node_config(a_data, ("submission",))) as a:
            await make_account(a.storage, "alice@example.org", "pw")
            rookery("queue", "pause", data=a_data)

            def submit(n: int) -> None:
                with smtplib.SMTP("127.0.0.1", a.ports["submission"], timeout=10) as s:
                    s.login("alice@example.org", "pw")
                    s.sendmail("alice@example.org", ["bob@remote.test"], f"From: alice@example.org\r\nSubject: m{n}\r\n\r\nx\r\n".encode())

            for n in range(5):
                await asyncio.to_thread(submit, n)
        # Node A is stopped; its queue is in store A.
        assert len(rookery("queue", "list", data=a_data).stdout.strip().splitlines()) >= 5
        result = await asyncio.to_thread(rookery, "queue", "drain", "--to", f"127.0.0.1:{b.ports['smtp']}", data=a_data, check=False)
        assert result.returncode == 0, result.stderr
        assert sorted(await inbox_subjects(b, "bob@remote.test")) == [f"m{n}" for n in range(5)]
        assert "m0" not in rookery("queue", "list", data=a_data).stdout


async def test_a_node_without_the_queue_worker_only_queues(tmp_path: Path) -> None:
    # Roles: a submission-only node queues remote mail; a node with the
    # worker (on the same store) delivers it.
    sink = Sink()
    server, port = await sink.start()
    try:
        data = tmp_path / "data"
        routes = {"routes__remote.test": f"127.0.0.1:{port}", "queue__poll_interval": 0.3}
        async with running_node(node_config(data, ("submission",), queue__worker=False, **routes)) as front:
            await make_account(front.storage, "alice@example.org", "pw")

            def submit() -> None:
                with smtplib.SMTP("127.0.0.1", front.ports["submission"], timeout=10) as s:
                    s.login("alice@example.org", "pw")
                    s.sendmail("alice@example.org", ["bob@remote.test"], b"From: alice@example.org\r\nSubject: r\r\n\r\nx\r\n")

            await asyncio.to_thread(submit)
            await asyncio.sleep(1.0)
            assert sink.received == []
            assert "bob@remote.test" in rookery("queue", "list", data=data).stdout
            async with running_node(node_config(data, (), **routes)):
                await asyncio.wait_for(sink.arrived.wait(), 10)
            assert [r for _, r, _ in sink.received] == [["bob@remote.test"]]
    finally:
        server.close()
        await server.wait_closed()
