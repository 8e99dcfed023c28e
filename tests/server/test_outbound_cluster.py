"""The outbound queue across a cluster (DESIGN.md "Outbound queue").

Three real ``rookery serve`` processes share one embedded store full of
queued mail for ``remote.test``; every node routes it (``[routes] "*"``)
to a sink SMTP server running in the test's own loop. A ``[throttle]`` rule
allows 2 concurrent connections and R messages per hour toward it. The sink
counts its open connections (from accept to close, so it sees at least what
the nodes hold), who sent what (each node greets with its own host name),
and every copy of every message (by Message-ID).

The first test SIGKILLs the node delivering the sink's 50th message in the
middle of that DATA exchange (the sink has the message, the node never
hears the 250): its leases and its throttle slots expire after
``lease_seconds``, the other two nodes take over, every message arrives,
and the only duplicates are messages the dead node still held, sent by it
first. The second test makes the hourly limit bind: exactly R messages
arrive, the rest wait for the next hour window.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections import Counter
from collections.abc import Callable
from email.parser import BytesHeaderParser
from pathlib import Path

import pytest
from aiosmtpd.smtp import SMTP
from aiosmtpd.smtp import Envelope, Session

from helpers import NodeProcess, rookery
from server.outbound import OutboundSettings
from storage import Storage
from storage.queue import Queue

pytestmark = pytest.mark.slow

DOMAIN = "remote.test"
CONNECTIONS = 2
LEASE = 3.0
#: Messages one node claims per store transaction; one batch is one SMTP
#: session toward a single destination domain.
BATCH = OutboundSettings(hostname="x").batch
_NODE_ID = re.compile(r"node ready .*\bnode=(\S+)")


class Sink:
    """The remote world: counts connections, senders and copies of messages."""

    def __init__(self, delay: float = 0.02) -> None:
        self.delay = delay
        self.open = 0
        self.max_open = 0
        #: (Message-ID, EHLO name of the sender, arrival time), in arrival order.
        self.deliveries: list[tuple[str, str, float]] = []
        #: Called with the EHLO name of the sending node once a message is
        #: in, before the 250 reply.
        self.on_message: Callable[[str], None] | None = None
        self.changed = asyncio.Event()

    def protocol(self) -> SMTP:
        sink = self

        class CountingSMTP(SMTP):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                sink.open += 1
                sink.max_open = max(sink.max_open, sink.open)
                super().connection_made(transport)

            def connection_lost(self, error: Exception | None) -> None:
                sink.open -= 1
                super().connection_lost(error)

        return CountingSMTP(self)

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        await asyncio.sleep(self.delay)
        content = envelope.original_content or b""
        assert isinstance(content, bytes)
        msgid = str(BytesHeaderParser().parsebytes(content)["Message-ID"])
        self.deliveries.append((msgid, str(session.host_name), time.monotonic()))
        self.changed.set()
        if self.on_message is not None:
            self.on_message(str(session.host_name))
        return "250 2.0.0 OK"

    def copies(self) -> Counter[str]:
        return Counter(m for m, _, _ in self.deliveries)

    async def wait_for(self, predicate: Callable[[], bool], timeout: float) -> None:
        async with asyncio.timeout(timeout):
            while not predicate():
                self.changed.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.changed.wait(), 0.2)


def message_ids(n: int) -> list[str]:
    return [f"<m{i}.cluster@example.com>" for i in range(n)]


async def fill(data: Path, n: int) -> None:
    """``n`` messages for remote.test in a fresh store, delivery paused."""
    storage = Storage.open("embedded", data_dir=data)
    try:
        queue = Queue(storage.db)
        await queue.pause(None)
        for i, msgid in enumerate(message_ids(n)):
            raw = (
                f"From: sender@example.com\r\nTo: user{i % 10}@{DOMAIN}\r\nSubject: m{i}\r\n"
                f"Message-ID: {msgid}\r\n\r\nbody {i}\r\n"
            ).encode()
            await queue.enqueue("sender@example.com", [f"user{i % 10}@{DOMAIN}"], raw)
    finally:
        await storage.close()


async def start_nodes(
    tmp_path: Path, data: Path, port: int, per_hour: int, node_processes: list[NodeProcess], count: int = 3
) -> list[NodeProcess]:
    config = tmp_path / "node.toml"
    config.write_text(
        f'[routes]\n"*" = "127.0.0.1:{port}"\n'
        f'[throttle]\n"{DOMAIN}" = {{ connections = {CONNECTIONS}, per_hour = {per_hour} }}\n'
        f"[queue]\npoll_interval = 0.3\nlease_seconds = {LEASE}\nmax_connections = 8\n"
    )

    def start(k: int) -> NodeProcess:
        proc = NodeProcess(data, ("http",), "--config", str(config), "--set", f"server.hostname=node{k}.test")
        node_processes.append(proc)
        return proc

    return list(await asyncio.gather(*(asyncio.to_thread(start, k) for k in range(count))))


def queue_list(data: Path) -> str:
    return str(rookery("queue", "list", data=data).stdout)


def listed(text: str) -> int:
    m = re.search(r"-- (\d+) message\(s\)", text)
    assert m, text
    return int(m.group(1))


async def test_three_nodes_throttled_survive_a_sigkill(tmp_path: Path, node_processes: list[NodeProcess]) -> None:
    n, per_hour, kill_at = 150, 200, 50
    data = tmp_path / "data"
    await fill(data, n)
    sink = Sink()
    server = await asyncio.get_running_loop().create_server(sink.protocol, "127.0.0.1", 0)
    storage = Storage.open("embedded", data_dir=data)
    try:
        port = server.sockets[0].getsockname()[1]
        nodes = await start_nodes(tmp_path, data, port, per_hour, node_processes)
        by_name = {f"node{k}.test": p for k, p in enumerate(nodes)}
        victim: list[str] = []
        killed = asyncio.Event()

        def kill_mid_data(name: str) -> None:
            # Inside the DATA exchange of the 50th message: the sink has it,
            # its sender will never hear the reply.
            if len(sink.deliveries) >= kill_at and not victim:
                victim.append(name)
                by_name[name].proc.kill()
                killed.set()

        sink.on_message = kill_mid_data
        t0 = time.monotonic()
        await asyncio.to_thread(rookery, "queue", "resume", data=data)
        await asyncio.wait_for(killed.wait(), 30)
        # The dead node's leases still name it until they expire: that is
        # what it held (in flight) when it died.
        dead = by_name[victim[0]]
        m = _NODE_ID.search(dead.output())
        assert m, dead.output()
        held = {
            str(BytesHeaderParser().parsebytes(await Queue(storage.db).read_headers(msg))["Message-ID"])
            for msg in await Queue(storage.db).list_messages()
            if msg.lease_owner.startswith(m.group(1) + "-")
        }
        read_after = time.monotonic() - sink.deliveries[kill_at - 1][2]
        assert read_after < LEASE, f"store read {read_after:.1f}s after the kill: leases may have moved on"
        await asyncio.to_thread(dead.proc.wait, 10)

        expected = set(message_ids(n))
        await sink.wait_for(lambda: set(sink.copies()) >= expected, 60)
        elapsed = time.monotonic() - t0

        async def queue_empty() -> bool:
            return listed(await asyncio.to_thread(queue_list, data)) == 0

        async with asyncio.timeout(20):
            while not await queue_empty():
                await asyncio.sleep(0.3)
        await asyncio.sleep(1.0)  # late copies would show up now

        copies = sink.copies()
        dups = {msgid: c for msgid, c in copies.items() if c > 1}
        sent_by: dict[str, list[str]] = {}
        for msgid, name, _ in sink.deliveries:
            sent_by.setdefault(msgid, []).append(name)
        per_node = Counter(name for _, name, _ in sink.deliveries)
        print(
            f"\ncluster: {n} messages in {elapsed:.1f}s, max concurrent connections {sink.max_open}, "
            f"killed {victim[0]} holding {len(held)}, duplicates {sum(c - 1 for c in dups.values())} "
            f"({sorted(dups)}), deliveries per node {dict(per_node)}"
        )
        assert set(copies) == expected
        assert sink.max_open <= CONNECTIONS
        # The hourly budget is taken once per session for its whole group:
        # even with the dead node's share, the sink saw no more than R.
        assert len(sink.deliveries) <= per_hour
        # Duplicates: only messages the dead node held and had sent, each
        # sent once by it, then once by a survivor; at most what its
        # connections carried (a batch each, plus a batch being recorded).
        assert set(dups) <= held, set(dups) - held
        for msgid in dups:
            first, again = sent_by[msgid]
            assert first == victim[0] and again != victim[0], (msgid, sent_by[msgid])
        assert len(dups) <= BATCH * (CONNECTIONS + 1)
        # The message the node died on was in flight: it came again.
        assert sink.deliveries[kill_at - 1][0] in dups
    finally:
        await storage.close()
        server.close()
        await server.wait_closed()


async def test_hourly_limit_holds_across_the_cluster(tmp_path: Path, node_processes: list[NodeProcess]) -> None:
    n, per_hour = 150, 40
    # The limit is per clock hour: do not start right before the window turns.
    left = 3600 - time.time() % 3600
    if left < 40:
        await asyncio.sleep(left + 1)
    window = int(time.time() // 3600)
    data = tmp_path / "data"
    await fill(data, n)
    sink = Sink(delay=0)
    server = await asyncio.get_running_loop().create_server(sink.protocol, "127.0.0.1", 0)
    try:
        port = server.sockets[0].getsockname()[1]
        await start_nodes(tmp_path, data, port, per_hour, node_processes)
        await asyncio.to_thread(rookery, "queue", "resume", data=data)
        await sink.wait_for(lambda: len(sink.deliveries) >= per_hour, 30)

        # Every message has been looked at once: none is held, none is due.
        async with asyncio.timeout(20):
            while True:
                text = await asyncio.to_thread(queue_list, data)
                if " held " not in text and listed(text) == n - per_hour:
                    break
                await asyncio.sleep(0.3)
        await asyncio.sleep(1.0)  # a few more polls of every node
        text = await asyncio.to_thread(queue_list, data)
        assert int(time.time() // 3600) == window
        print(f"\nhourly: {len(sink.deliveries)} delivered, {listed(text)} queued, max connections {sink.max_open}")
        assert len(sink.deliveries) == per_hour
        assert len(set(sink.copies())) == per_hour
        assert sink.max_open <= CONNECTIONS
        assert listed(text) == n - per_hour
        assert " held " not in text
        # They wait for the next hour window, still open.
        next_window = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime((window + 1) * 3600))
        header_lines = [line for line in text.splitlines() if "<sender@example.com>" in line]
        assert len(header_lines) == n - per_hour
        assert all(f"next {next_window}" in line for line in header_lines), header_lines[:3]
        rcpt_lines = [line for line in text.splitlines() if line.startswith("    ")]
        assert len(rcpt_lines) == n - per_hour
        assert all(line.split()[0] in ("pending", "deferred") for line in rcpt_lines), rcpt_lines[:3]
    finally:
        server.close()
        await server.wait_closed()


async def test_drained_node_hands_back_its_queue_leases(tmp_path: Path, node_processes: list[NodeProcess]) -> None:
    """``rookery node drain`` of a node in the middle of deliveries (the sink
    holds its DATA for long): the node exits within its shutdown deadline and
    leaves no lease behind, so another node delivers everything at once
    rather than after the leases would have expired. Nothing is lost."""
    n, long_lease = 30, 120.0
    data = tmp_path / "data"
    await fill(data, n)
    sink = Sink(delay=30.0)  # every DATA hangs: the node holds its batch
    server = await asyncio.get_running_loop().create_server(sink.protocol, "127.0.0.1", 0)
    storage = Storage.open("embedded", data_dir=data)
    try:
        port = server.sockets[0].getsockname()[1]
        config = tmp_path / "drain.toml"
        config.write_text(
            f'[routes]\n"*" = "127.0.0.1:{port}"\n'
            f"[queue]\npoll_interval = 0.3\nlease_seconds = {long_lease}\nmax_connections = 2\n"
        )

        def start(name: str) -> NodeProcess:
            proc = NodeProcess(data, ("http",), "--config", str(config), "--set", f"server.hostname={name}")
            node_processes.append(proc)
            return proc

        first = await asyncio.to_thread(start, "first.test")
        m = _NODE_ID.search(first.output())
        assert m, first.output()
        await asyncio.to_thread(rookery, "queue", "resume", data=data)
        queue = Queue(storage.db)

        async def held() -> int:
            return sum(1 for msg in await queue.list_messages() if msg.lease_owner)

        async with asyncio.timeout(20):
            while sink.open == 0 or await held() == 0:
                await asyncio.sleep(0.1)
        holding = await held()
        await asyncio.to_thread(rookery, "node", "drain", m.group(1), data=data)
        code = await asyncio.to_thread(first.proc.wait, 15)
        assert code == 0, first.output()
        assert await held() == 0, "the drained node left leases behind"
        assert len(await queue.list_messages()) == n  # nothing delivered (the sink never answered), nothing lost

        sink.delay = 0.0
        t0 = time.monotonic()
        await asyncio.to_thread(start, "second.test")
        await sink.wait_for(lambda: set(sink.copies()) >= set(message_ids(n)), 30)
        took = time.monotonic() - t0
        assert took < long_lease / 4, f"took {took:.1f}s: leases were waited out, not handed back"
        assert set(sink.copies()) == set(message_ids(n))
        print(f"\ndrain: first node held {holding} leases, second delivered all {n} in {took:.1f}s")
    finally:
        await storage.close()
        server.close()
        await server.wait_closed()
