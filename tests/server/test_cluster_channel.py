"""The peer channel (server/cluster) over real loopback sockets, and the
cluster service over the embedded store."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import socket
import struct
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from protocols.push import PushHub
from server.cluster import ClusterService, LeaseWorker, PeerChannel
from server.cluster.channel import MAX_FRAME, make_body, seal, send_once, split_address, validate
from server.cluster.status import drain_node, find_node, format_status, local_addresses, status_json
from storage.kv import Database, open_database
from storage.nodes import NodeRecord, Nodes

SECRET = b"s3cret cluster key"
HOST = "127.0.0.1"


class Inbox:
    def __init__(self) -> None:
        self.messages: list[dict[str, Any]] = []
        self.event = asyncio.Event()

    def __call__(self, msg: dict[str, Any]) -> None:
        self.messages.append(msg)
        self.event.set()

    def of(self, msg_type: str) -> list[dict[str, Any]]:
        return [m for m in self.messages if m["type"] == msg_type]


async def until(predicate: Callable[[], bool], timeout: float = 3.0, what: str = "condition") -> float:
    """Wait for ``predicate``; return how long it took."""
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.005)
    return time.monotonic() - start


def make(node_id: str, peers: tuple[str, ...] | list[str] = (), port: int = 0, **kw: Any) -> tuple[PeerChannel, Inbox]:
    inbox = Inbox()
    options: dict[str, Any] = {"heartbeat": 0.1, "timeout": 0.5, "backoff_max": 0.4, **kw}
    secret = options.pop("secret", SECRET)
    return PeerChannel(node_id, secret, (HOST, port), list(peers), on_message=inbox, **options), inbox


@contextlib.asynccontextmanager
async def running(*channels: PeerChannel) -> AsyncIterator[None]:
    started = []
    try:
        for ch in channels:
            await ch.start()
            started.append(ch)
        yield
    finally:
        for ch in started:
            await ch.stop(flush=0.1)


def connected(ch: PeerChannel, n: int) -> Callable[[], bool]:
    return lambda: sum(p.connected for p in ch.peers()) >= n


@pytest.fixture
async def trio() -> AsyncIterator[tuple[list[PeerChannel], list[Inbox]]]:
    """A started; B and C know only A, A learns them from their heartbeats,
    and they learn each other from A's messages."""
    a, ia = make("node-a")
    await a.start()
    b, ib = make("node-b", [a.address])
    c, ic = make("node-c", [a.address])
    async with running(b, c):
        try:
            for ch in (a, b, c):
                await until(connected(ch, 2), what=f"{ch.node_id} connected to both others")
            yield [a, b, c], [ia, ib, ic]
        finally:
            await a.stop(flush=0.1)


async def raw_connection(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection(HOST, port)
    (length,) = struct.unpack(">I", await reader.readexactly(4))
    await reader.readexactly(length)  # the listener's hello
    return reader, writer


async def close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(Exception):
        await writer.wait_closed()


# -- delivery ------------------------------------------------------------------

async def test_changed_reaches_every_node_fast(trio: tuple[list[PeerChannel], list[Inbox]]) -> None:
    (a, b, c), (ia, ib, ic) = trio
    assert a.broadcast_changed(7, 42, {"Email", "Mailbox"}) == 2
    took = await until(lambda: bool(ib.of("changed")) and bool(ic.of("changed")), timeout=1.0)
    assert took < 0.1
    for inbox in (ib, ic):
        (msg,) = inbox.of("changed")
        assert (msg["from"], msg["account"], msg["change_id"], msg["kinds"]) == ("node-a", 7, 42, ["Email", "Mailbox"])
    assert not ia.of("changed")  # never to oneself

    b.broadcast_invalidate("credentials:alice@example.org")
    c.broadcast_queue_refresh()
    await until(lambda: bool(ia.of("invalidate")) and bool(ic.of("invalidate")) and bool(ib.of("queue_refresh")))
    assert ia.of("invalidate")[0]["scope"] == "credentials:alice@example.org"
    assert a.metrics["dropped_auth"] == a.metrics["dropped_malformed"] == 0
    assert {m.node_id for m in a.members() if m.alive} == {"node-b", "node-c"}


async def test_duplicated_and_reordered_changes_are_harmless(trio: tuple[list[PeerChannel], list[Inbox]]) -> None:
    (a, b, _), _ = trio
    hub = PushHub()
    sub = hub.subscribe(7)
    service = ClusterService(Nodes(None), "node-b", hub=hub)  # type: ignore[arg-type]
    b.on_message = service.dispatch
    for change_id in (5, 5, 3, 6, 4):
        a.broadcast_changed(7, change_id, ["Email"])
    await until(lambda: sub.version == 5, what="five notifications")
    assert hub.latest[7] == 6  # the newest wins, whatever the order
    sub.close()


# -- authentication ------------------------------------------------------------

async def test_forged_stale_and_replayed_frames_are_dropped_and_counted(
    trio: tuple[list[PeerChannel], list[Inbox]],
) -> None:
    (a, b, _), (_, ib, _) = trio
    assert b.port is not None

    # Wrong secret: dropped, counted, connection closed; the listener lives on.
    reader, writer = await raw_connection(b.port)
    writer.write(seal(b"wrong secret", make_body("node-x", "", "changed", account=1, change_id=1, kinds=[])))
    assert await asyncio.wait_for(reader.read(), 2) == b""
    await close(writer)
    assert b.metrics["dropped_auth"] == 1

    # The right secret but a stale timestamp.
    reader, writer = await raw_connection(b.port)
    old = make_body("node-x", "", "changed", ts=time.time() - 120, account=1, change_id=2, kinds=[])
    writer.write(seal(SECRET, old))
    # Replay: the very same bytes twice. The first is delivered, not the second.
    frame = seal(SECRET, make_body("node-x", "", "changed", account=1, change_id=3, kinds=[]))
    writer.write(frame + frame)
    await writer.drain()
    await until(lambda: b.metrics["dropped_replay"] == 1)
    assert b.metrics["dropped_stale"] == 1
    assert [m["change_id"] for m in ib.of("changed") if m["from"] == "node-x"] == [3]
    # Replayed on another connection: still dropped.
    reader2, writer2 = await raw_connection(b.port)
    writer2.write(frame)
    await until(lambda: b.metrics["dropped_replay"] == 2)
    await close(writer)
    await close(writer2)

    # Messages pretending to come from B itself are ignored.
    reader, writer = await raw_connection(b.port)
    writer.write(seal(SECRET, make_body("node-b", "", "changed", account=1, change_id=4, kinds=[])))
    await writer.drain()
    await close(writer)

    # The real peers are not disturbed.
    a.broadcast_changed(9, 1)
    await until(lambda: any(m["account"] == 9 for m in ib.of("changed")))
    assert not any(m["change_id"] == 4 for m in ib.of("changed"))


async def test_malformed_and_oversize_frames_close_only_that_connection(
    trio: tuple[list[PeerChannel], list[Inbox]],
) -> None:
    (a, b, _), (_, ib, _) = trio
    assert b.port is not None

    # Authenticated but not a message: dropped, the connection stays.
    reader, writer = await raw_connection(b.port)
    for body in ({"v": 1, "from": "x"}, {**make_body("node-x", "", "changed"), "account": "seven"}):
        writer.write(seal(SECRET, body))
    payload = b"[not json"
    frame = hmac.new(SECRET, payload, hashlib.sha256).digest() + payload
    writer.write(struct.pack(">I", len(frame)) + frame)
    writer.write(seal(SECRET, make_body("node-x", "", "invalidate", scope="directory")))
    await writer.drain()
    await until(lambda: bool(ib.of("invalidate")))
    assert b.metrics["dropped_malformed"] == 3

    # Oversize length: the connection is closed at once, unread.
    writer.write(struct.pack(">I", MAX_FRAME + 1) + b"x" * 100)
    assert await asyncio.wait_for(reader.read(), 2) == b""
    await close(writer)
    assert b.metrics["dropped_malformed"] == 4

    # Garbage and an early close.
    reader, writer = await raw_connection(b.port)
    writer.write(b"\x00\x00\x00\x05abc")
    await close(writer)

    with pytest.raises(ValueError):
        a.broadcast_invalidate("x" * MAX_FRAME)
    a.broadcast_invalidate("config")
    await until(lambda: any(m["scope"] == "config" for m in ib.of("invalidate")))


# -- failures ------------------------------------------------------------------

async def test_dead_peer_never_blocks_and_reconnects_when_back() -> None:
    # A port with nothing behind it (yet).
    probe = await asyncio.start_server(lambda r, w: None, HOST, 0)
    port = probe.sockets[0].getsockname()[1]
    probe.close()
    await probe.wait_closed()

    a, _ = make("node-a", [f"{HOST}:{port}"], queue_size=8, backoff_max=0.3)
    async with running(a):
        start = time.monotonic()
        for i in range(100):
            a.broadcast_changed(1, i + 1)
        assert time.monotonic() - start < 0.05
        (peer,) = a.peers()
        assert peer.queued == 8 and a.metrics["queue_overflow"] == 92
        await asyncio.sleep(1.0)
        failures = a.peers()[0].failures
        # Backoff: 0.1 s doubling to 0.3 s (with jitter), not a busy loop.
        assert 3 <= failures <= 12, failures

        b, ib = make("node-b", port=port)
        async with running(b):
            await until(connected(a, 1), timeout=2.0, what="reconnection")
            # The newest queued hints arrive; the oldest were dropped.
            await until(lambda: len(ib.of("changed")) == 8)
            assert [m["change_id"] for m in ib.of("changed")] == list(range(93, 101))
        assert a.metrics["reconnects"] == 0  # first connection to that peer

        # The peer goes away and comes back with a fresh id (a restart).
        await until(lambda: not connected(a, 1)(), what="disconnect")
        b2, ib2 = make("node-b2", port=port)
        async with running(b2):
            await until(connected(a, 1), timeout=2.0, what="reconnection")
            assert a.metrics["reconnects"] == 1
            a.broadcast_changed(2, 1)
            await until(lambda: bool(ib2.of("changed")))
            assert [m.node_id for m in a.members() if m.alive] == ["node-b2"]
            # The old id at the same address is forgotten at once.
            assert [m.node_id for m in a.members()] == ["node-b2"]


async def test_membership_marks_a_silent_peer_dead(trio: tuple[list[PeerChannel], list[Inbox]]) -> None:
    (a, b, c), _ = trio
    await until(lambda: all(m.alive for m in a.members()) and len(a.members()) == 2)
    await c.stop(announce=False)  # a crash: no goodbye
    took = await until(lambda: [m.node_id for m in a.alive()] == ["node-b"], timeout=2.0, what="c not alive")
    assert took >= 0.2  # detected by silence, not by a message
    (dead,) = [m for m in a.members() if m.node_id == "node-c"]
    assert not dead.alive and dead.last_seen < time.time() - 0.4
    # Broadcasting to the dead address still returns at once.
    assert a.broadcast_changed(1, 1) == 2
    # A clean stop is seen at once through the "leaving" announcement.
    await b.stop()
    await until(lambda: not a.alive(), timeout=0.3, what="b leaving")
    assert [m.state for m in a.members() if m.node_id == "node-b"] == ["leaving"]


async def test_slow_peer_that_never_reads_is_cut_off() -> None:
    """A listener that accepts, says hello, then never reads: the sender's
    queue stays bounded and its writes time out; broadcast never waits."""
    writers: list[asyncio.StreamWriter] = []

    async def stuck(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(seal(SECRET, make_body("node-slow", "", "hello")))
        writers.append(writer)

    server = await asyncio.start_server(stuck, HOST, 0)
    port = server.sockets[0].getsockname()[1]
    a, _ = make("node-a", [f"{HOST}:{port}"], queue_size=64, timeout=0.3)
    try:
        async with running(a):
            await until(connected(a, 1))
            blob = "k" * 60
            start = time.monotonic()
            while a.peers()[0].connected:
                for i in range(200):
                    a.broadcast_changed(1, i + 1, [blob] * 60)
                    assert a.peers()[0].queued <= 64
                await asyncio.sleep(0.01)
                assert time.monotonic() - start < 3.0, "the stuck peer was never cut off"
            assert a.metrics["queue_overflow"] > 0
            assert "TimeoutError" in a.peers()[0].last_error
            # ... and it is retried.
            await until(connected(a, 1), timeout=2.0)
    finally:
        for w in writers:
            w.close()
        server.close()
        await server.wait_closed()


async def test_self_in_peer_list_is_recognised() -> None:
    a, _ = make("node-a")
    await a.start()
    try:
        # Our own listener reached through another name: the hello tells.
        a._add_peer(f"localhost:{a.port}")
        await until(lambda: any(p.source == "self" for p in a.peers()))
        assert a.broadcast_changed(1, 1) == 0
    finally:
        await a.stop()


async def test_dns_name_and_wrong_secret_peers() -> None:
    a, ia = make("node-a")
    async with running(a):
        # Found through DNS (localhost may also give ::1, where nothing listens).
        b, _ = make("node-b", dns=f"localhost:{a.port}")
        # Another cluster's node: its hello does not verify, nothing is delivered.
        x, _ = make("node-x", [a.address], secret=b"another cluster")
        async with running(b, x):
            await until(lambda: any(p.connected for p in b.peers()), what="b reaches a through dns")
            assert any(p.source == "dns" for p in b.peers())
            b.broadcast_changed(3, 1)
            x.broadcast_changed(4, 1)
            await until(lambda: bool(ia.of("changed")))
            await until(lambda: x.metrics["dropped_auth"] >= 1, what="x rejects a's hello")
            await asyncio.sleep(0.1)
            assert [m["account"] for m in ia.of("changed")] == [3]
            assert "bad MAC" in x.peers()[0].last_error
            assert [m.node_id for m in a.members()] == ["node-b"]


def test_addresses() -> None:
    assert split_address("[::1]:7000") == ("::1", 7000)
    with pytest.raises(ValueError):
        split_address("nohost")
    with pytest.raises(ValueError):
        PeerChannel("x", b"", None)


# -- the cluster service over the store -----------------------------------------

@pytest.fixture
async def db(tmp_path: Path) -> AsyncIterator[Database]:
    database = open_database("embedded", data_dir=tmp_path)
    try:
        yield database
    finally:
        await database.close()


async def test_cluster_service_records_state_relays_changes_and_drains(db: Database) -> None:
    nodes = Nodes(db)
    hub_b = PushHub()
    drained = asyncio.Event()
    ch_a, _ = make("node-a")
    svc_a = ClusterService(nodes, "node-a", channel=ch_a, heartbeat=0.1, timeout=0.5, version="0.1.0",
                           load=lambda: (3, 1), on_drain=drained.set)
    await svc_a.start()
    ch_b, _ = make("node-b", [ch_a.address])
    svc_b = ClusterService(nodes, "node-b", channel=ch_b, hub=hub_b, heartbeat=0.1, timeout=0.5)
    invalidated: list[str] = []
    svc_b.subscribe("invalidate", lambda m: invalidated.append(m["scope"]))
    await svc_b.start()
    try:
        await svc_a.set_state("ready")
        await svc_b.set_state("ready")
        await until(connected(ch_a, 1))
        await until(connected(ch_b, 1))
        records = {r.id: r for r in await nodes.list()}
        assert records["node-a"].state == "ready" and records["node-a"].address == ch_a.address
        assert (records["node-a"].connections, records["node-a"].queue_held) == (3, 1)
        table = format_status(list(records.values()))
        assert "node-a" in table and "ready" in table and "ADDRESS" in table
        assert '"queue_held": 1' in status_json(list(records.values()))

        sub = hub_b.subscribe(5)
        svc_a.local_change(5, 11, frozenset({"Email"}))
        svc_a.invalidate("directory")
        await until(lambda: sub.version == 1 and invalidated == ["directory"])
        assert hub_b.latest[5] == 11
        # Changes committed together (one group commit) go out as one frame
        # with the newest id; a later change is a frame of its own.
        for change_id, kind in ((13, "Email"), (12, "Mailbox"), (14, "Thread")):
            svc_a.local_change(5, change_id, frozenset({kind}))
        await until(lambda: sub.version >= 2)
        await asyncio.sleep(0.2)
        assert sub.version == 2 and hub_b.latest[5] == 14  # one frame, not three
        svc_a.local_change(5, 15, frozenset({"Email"}))
        await until(lambda: sub.version == 3)
        assert hub_b.latest[5] == 15
        sub.close()

        # rookery node drain node-a: seen at the next renewal.
        assert find_node(list(records.values()), ch_a.address).id == "node-a"
        assert (await drain_node(nodes, "node-a")).drain
        await asyncio.wait_for(drained.wait(), 2)
        await svc_a.set_state("draining")
        await until(lambda: any(m.state == "draining" for m in ch_b.members()))
    finally:
        await svc_a.stop()
    assert (await nodes.get("node-a")).state == "gone"  # type: ignore[union-attr]
    await until(lambda: not ch_b.alive(), timeout=0.5)
    with pytest.raises(LookupError):
        await drain_node(nodes, "node-a-prefix-that-matches-nothing")
    # Without a name: the only live node.
    assert (await drain_node(nodes, None)).id == "node-b"
    await svc_b.stop()


async def test_lease_worker_runs_on_one_node_and_fails_over(db: Database) -> None:
    nodes = Nodes(db)
    ran: list[str] = []

    def job(owner: str) -> Callable[[], Any]:
        async def work() -> None:
            ran.append(owner)
        return work

    a = LeaseWorker(nodes, "purge", "A", job("A"), interval=0.05, ttl=0.4)
    b = LeaseWorker(nodes, "purge", "B", job("B"), interval=0.05, ttl=0.4)
    await a.start()
    await until(lambda: a.runs >= 1)
    await b.start()
    await asyncio.sleep(0.3)
    assert set(ran) == {"A"} and not b.held

    # A dies without releasing: B takes over once the lease expires.
    assert a.task is not None
    a.task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await a.task
    died = time.monotonic()
    await until(lambda: b.runs >= 1, timeout=2.0)
    assert time.monotonic() - died >= 0.2
    assert (await nodes.lease("purge")).owner == "B"  # type: ignore[union-attr]
    # A clean stop hands the lease over at once.
    await b.stop()
    assert await nodes.lease("purge") is None


async def test_one_shot_sender_reaches_listeners_of_its_cluster_only() -> None:
    """The admin CLI's hint: delivered, but its sender is no member; a
    listener with another secret gets nothing; a dead address costs only
    its timeout."""
    a, ia = make("node-a")
    b, ib = make("node-b", [])
    other, io = make("node-x", [], secret=b"another cluster")
    async with running(a, b, other):
        with socket.socket() as probe:
            probe.bind((HOST, 0))
            dead = f"{HOST}:{probe.getsockname()[1]}"  # nothing listens there once closed
        took = time.monotonic()
        n = await send_once(SECRET, [a.address, b.address, other.address, dead, a.address], "invalidate",
                            scope="directory", timeout=1.0)
        took = time.monotonic() - took
        assert n == 2 and took < 1.5
        await until(lambda: bool(ia.of("invalidate")) and bool(ib.of("invalidate")), what="the hint")
        assert ia.of("invalidate")[0]["scope"] == "directory" and len(ia.of("invalidate")) == 1
        assert io.messages == [] and other.metrics["dropped_auth"] == 0  # not even sent
        assert a.members() == [] and b.members() == []
    # A one-shot sender cannot pose as a member's heartbeat.
    with pytest.raises(Exception, match="oneshot"):
        validate(make_body("x", "", "heartbeat", oneshot=True))


async def test_drain_without_a_name_finds_this_machines_node(db: Database) -> None:
    """``rookery node drain`` in a container: the config says ``[listen]
    cluster = 0.0.0.0:7946``, the records hold what each node advertised."""
    nodes = Nodes(db)
    now = time.time()
    for node_id, address in (("n1", "rookery1:7946"), ("n2", "rookery2:7946"), ("n3", "10.0.0.3:7946")):
        await nodes.claim(NodeRecord(node_id, address, "ready", now, now, now + 60))
    await nodes.claim(NodeRecord("old", "rookery2:7946", "gone", now - 99, now - 99, now - 90))

    local, hosts = local_addresses("", "0.0.0.0:7946", "rookery2")
    assert local[0] == "rookery2:7946" and hosts[0] == "rookery2"
    assert (await drain_node(nodes, None, local, hosts)).id == "n2"
    # Advertised address first (Kubernetes: the pod IP), whatever the host name.
    local, hosts = local_addresses("10.0.0.3:7946", "0.0.0.0:7946", "rookery-7d9f")
    assert (await drain_node(nodes, None, local, hosts)).id == "n3"
    # No cluster listener in this config: the host name alone, at any port.
    local, hosts = local_addresses("", "", "rookery1")
    assert local == [] and (await drain_node(nodes, None, local, hosts)).id == "n1"
    # A specific listen host is the address itself.
    assert local_addresses("", "10.0.0.3:7946", "x")[0] == ["10.0.0.3:7946"]
    assert local_addresses("", ":7946", "x")[0] == ["127.0.0.1:7946"]
    # Nothing matches and three nodes live: refuse rather than guess.
    with pytest.raises(LookupError, match="3 live nodes"):
        await drain_node(nodes, None, *local_addresses("", "0.0.0.0:7946", "elsewhere.invalid"))
