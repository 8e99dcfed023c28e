"""Three real ``rookery serve`` processes on one embedded store, on loopback,
talking over the peer channel (DESIGN.md: the store is the truth, the peer
channel is a hint).

Each test starts its own trio with static peers, a fast heartbeat
(``cluster.heartbeat=0.2``, ``cluster.timeout=1.0``) and, unless the test is
about the fallback, ``imap.poll_interval=30``: then only a peer message can
explain a push that arrives within a second or two.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import re
import signal
import smtplib
import socket
import struct
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import pytest
from imapclient import IMAPClient

from helpers import NodeProcess, make_account, node_config, rookery, running_node
from server.cluster.channel import make_body, seal
from server.metrics import Sample
from server.tls import ensure_self_signed
from storage import Storage
from storage.nodes import Nodes

pytestmark = pytest.mark.slow

SECRET = "cluster-test-secret"
USER = "alice@example.org"
PASSWORD = "pw"
LISTEN = ("smtp", "imap", "http")
T = TypeVar("T")


# -- a cluster -------------------------------------------------------------------

def free_ports(n: int) -> list[int]:
    """Ports for the cluster listeners, which every node must know before any
    starts. Taken outside the kernel's ephemeral range: a port that a bind to
    port 0 gave and that was let go again can be given to the next such bind,
    and the nodes starting beside each other bind all their other listeners
    that way (a node then fails to start: address already in use)."""
    try:
        low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    except OSError:
        low, high = 32768, 60999
    candidates = range(high + 1, 65536) if high < 64511 else range(1024, low)
    ports: list[int] = []
    while len(ports) < n:
        port = random.choice(candidates)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue  # in use by something else
        if port not in ports:
            ports.append(port)
    return ports


def in_store(data: Path, fn: Callable[[Storage], Any]) -> Any:
    """Run ``await fn(storage)`` on the shared store from the test process."""

    async def run() -> Any:
        storage = Storage.open("embedded", data_dir=data, failed_login_delay=0.0)
        try:
            return await fn(storage)
        finally:
            await storage.close()

    return asyncio.run(run())


def start_cluster(
    tmp_path: Path,
    node_processes: list[NodeProcess],
    *,
    poll: float = 30.0,
    secrets: tuple[str, ...] = (SECRET, SECRET, SECRET),
    first: int | None = None,
    mesh: bool = True,
    extra: dict[str, str] | None = None,
) -> tuple[Path, list[NodeProcess]]:
    """A store with alice, and three nodes on it. ``first``: start that node
    alone before the others (it takes the singleton leases). ``mesh``: wait
    until every node hears from the two others. ``extra``: more ``--set`` options."""
    data = tmp_path / "data"
    in_store(data, lambda s: make_account(s, USER, PASSWORD))
    # Made once up front: nodes starting at the same instant on one data
    # directory race in ensure_self_signed (one can read a cert not yet written).
    ensure_self_signed(data, "mx.test")
    ports = free_ports(len(secrets))
    peers = ",".join(f"127.0.0.1:{p}" for p in ports)

    def args(i: int) -> list[str]:
        options = {
            "listen.cluster": f"127.0.0.1:{ports[i]}",
            "cluster.secret": secrets[i],
            "cluster.peers": peers,
            "cluster.heartbeat": "0.2",
            "cluster.timeout": "1.0",
            "imap.poll_interval": str(poll),
            "security.failed_login_delay": "0.05",
            **(extra or {}),
        }
        return [a for k, v in options.items() for a in ("--set", f"{k}={v}")]

    order = list(range(len(secrets)))
    nodes: dict[int, NodeProcess] = {}
    try:
        if first is not None:
            order.remove(first)
            nodes[first] = NodeProcess(data, LISTEN, *args(first))
        with ThreadPoolExecutor(len(order)) as pool:
            futures = {i: pool.submit(NodeProcess, data, LISTEN, *args(i)) for i in order}
        errors = []
        for i, future in futures.items():
            try:
                nodes[i] = future.result()
            except Exception as exc:  # noqa: PERF203
                errors.append(exc)
        if errors:
            raise errors[0]
    finally:
        node_processes.extend(nodes.values())
    trio = [nodes[i] for i in range(len(secrets))]
    if mesh:
        until(lambda: all(metrics(n).get("rookery_peer_members_alive") == 2 for n in trio), 10, "a full mesh")
    return data, trio


def lease_owner(data: Path, name: str) -> str | None:
    lease = in_store(data, lambda s: Nodes(s.db).lease(name))
    return None if lease is None else str(lease.owner)


def node_id(node: NodeProcess) -> str:
    m = re.search(r"node ready node=(\w+)", node.output())
    assert m, node.output()
    return m.group(1)


def metrics(node: NodeProcess) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{node.ports['http']}/metrics", timeout=5) as r:
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/plain")
        text = r.read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out


def status(data: Path) -> dict[str, dict[str, Any]]:
    return {r["id"]: r for r in json.loads(rookery("cluster", "status", "--json", data=data).stdout)}


def until(predicate: Callable[[], T], timeout: float, what: str) -> T:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)


# -- clients ---------------------------------------------------------------------

def message(tag: str) -> bytes:
    return f"From: bob@remote.test\r\nTo: {USER}\r\nSubject: {tag}\r\nMessage-ID: <{tag}@remote.test>\r\n\r\nbody {tag}\r\n".encode()


def deliver(node: NodeProcess, tag: str) -> None:
    """Send one message over SMTP; returns after the 250 (committed)."""
    with smtplib.SMTP("127.0.0.1", node.ports["smtp"], timeout=10) as s:
        s.sendmail("bob@remote.test", [USER], message(tag))


@contextmanager
def imap(node: NodeProcess, password: str = PASSWORD, select: bool = True) -> Iterator[IMAPClient]:
    client = IMAPClient("127.0.0.1", port=node.ports["imap"], ssl=False, timeout=10)
    try:
        client.login(USER, password)
        if select:
            client.select_folder("INBOX")
        yield client
    finally:
        try:
            client.logout()
        except Exception:
            client.shutdown()


def can_login(node: NodeProcess, password: str) -> bool:
    client = IMAPClient("127.0.0.1", port=node.ports["imap"], ssl=False, timeout=10)
    try:
        client.login(USER, password)
    except IMAPClient.Error:
        return False
    else:
        return True
    finally:
        try:
            client.logout()
        except Exception:
            client.shutdown()


def idle_until(client: IMAPClient, want: Callable[[tuple[Any, ...]], bool], timeout: float) -> float:
    """In IDLE: seconds until a response ``want`` accepts arrives."""
    start = time.monotonic()
    while (left := timeout - (time.monotonic() - start)) > 0:
        for response in client.idle_check(timeout=left):
            if want(response):
                return time.monotonic() - start
    raise AssertionError(f"no matching untagged response within {timeout} s")


def is_exists(response: tuple[Any, ...]) -> bool:
    return len(response) >= 2 and response[1] == b"EXISTS"


def has_flag(flag: bytes) -> Callable[[tuple[Any, ...]], bool]:
    def check(response: tuple[Any, ...]) -> bool:
        return len(response) >= 3 and response[1] == b"FETCH" and flag in repr(response[2]).encode()
    return check


def subjects(data: Path) -> list[str]:
    async def fn(s: Storage) -> list[str]:
        account = await s.directory.get(USER)
        out = []
        for _, em in await s.mail.list_messages(account.id, "INBOX"):
            assert em is not None
            raw = await s.mail.read_blob(em.digest)
            out.append(raw.split(b"Subject: ", 1)[1].split(b"\r\n", 1)[0].decode())
        return out

    return in_store(data, fn)


# -- tests -------------------------------------------------------------------------

def test_metrics_endpoint(tmp_path: Path, node_processes: list[NodeProcess]) -> None:
    _, (one, two, _) = start_cluster(tmp_path, node_processes)
    with imap(two):
        m = metrics(two)
    assert m['rookery_node_phase{phase="ready"}'] == 1 and m['rookery_node_phase{phase="draining"}'] == 0
    assert m['rookery_open_connections{listener="imap"}'] == 1
    assert m['rookery_open_connections{listener="smtp"}'] == 0
    assert m["rookery_push_subscriptions"] == 1
    assert m["rookery_peer_members_alive"] == 2
    assert m["rookery_peer_received_total"] > 0 and m["rookery_peer_dropped_auth_total"] == 0
    before = metrics(one)["rookery_store_commits_total"]
    deliver(one, "counted")
    assert metrics(one)["rookery_store_commits_total"] > before
    assert metrics(one)["rookery_store_group_commits_total"] >= 1
    assert 1 <= metrics(one)["rookery_store_syncs_total"] <= metrics(one)["rookery_store_group_commits_total"]


async def test_metric_sources_are_read_at_scrape_time(tmp_path: Path) -> None:
    """In process: what a component appends to ``metric_sources`` is read at
    each scrape; a source that raises costs only its own samples."""
    depth = [3]

    def broken() -> list[Sample]:
        raise RuntimeError("boom")

    async def scrape(port: int) -> str:
        def get() -> str:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
                return str(r.read().decode())
        return await asyncio.get_running_loop().run_in_executor(None, get)

    async with running_node(node_config(tmp_path / "data", ("smtp", "http"))) as state:
        state.metric_sources.append(broken)
        state.metric_sources.append(lambda: [
            Sample("rookery_test_depth", "Test gauge.", "gauge", depth[0], {"queue": "a"}),
            Sample("rookery_test_done", "Test counter.", "counter", 5),
        ])
        text = await scrape(state.ports["http"])
        assert 'rookery_test_depth{queue="a"} 3.0' in text and "rookery_test_done_total 5.0" in text
        assert "# TYPE rookery_test_done_total counter" in text
        assert 'rookery_node_phase{phase="ready"} 1.0' in text
        assert "rookery_peer_" not in text  # no [listen] cluster, no channel metrics
        depth[0] = 7
        assert 'rookery_test_depth{queue="a"} 7.0' in await scrape(state.ports["http"])


def test_delivery_on_one_node_wakes_idle_on_another(tmp_path: Path, node_processes: list[NodeProcess]) -> None:
    data, (one, two, three) = start_cluster(tmp_path, node_processes)
    with imap(two) as watcher:
        watcher.idle()
        latencies = []
        for i, via in enumerate((one, three, one)):
            deliver(via, f"push-{i}")
            latencies.append(idle_until(watcher, is_exists, timeout=2.0))
        watcher.idle_done()
        assert len(watcher.search("ALL")) == 3
    # poll_interval is 30 s: only the peer channel explains these.
    assert max(latencies) < 2.0, latencies
    print(f"cross-node IDLE wake: {', '.join(f'{x * 1000:.0f} ms' for x in latencies)}")
    assert subjects(data) == ["push-0", "push-1", "push-2"]


def test_flags_set_on_one_node_reach_a_session_on_another(tmp_path: Path, node_processes: list[NodeProcess]) -> None:
    _, (one, two, three) = start_cluster(tmp_path, node_processes)
    deliver(one, "flag-me")
    with imap(two) as watcher, imap(three) as setter:
        (uid,) = setter.search("ALL")
        # In IDLE: pushed through the channel.
        watcher.idle()
        setter.add_flags([uid], [b"\\Flagged"])
        took = idle_until(watcher, has_flag(b"\\\\Flagged"), timeout=1.0)
        watcher.idle_done()
        # On NOOP: the store is read whatever the channel says.
        setter.add_flags([uid], [b"$Important"])
        start = time.monotonic()
        seen = until(lambda: any(has_flag(b"$Important")(r) for r in watcher.noop()[1]), 1.0, "FETCH on NOOP")
        assert seen and time.monotonic() - start < 1.0
        assert set(watcher.get_flags([uid])[uid]) >= {b"\\Flagged", b"$Important"}
    print(f"cross-node flag push: {took * 1000:.0f} ms")


def test_password_change_takes_effect_on_every_node(tmp_path: Path, node_processes: list[NodeProcess]) -> None:
    _, trio = start_cluster(tmp_path, node_processes, mesh=False)
    # Each node has verified (and cached) the old password.
    assert all(can_login(n, PASSWORD) for n in trio)
    rookery("account", "passwd", USER, "--password-stdin", data=tmp_path / "data", stdin="new-pw\n")
    for n in trio:
        assert not can_login(n, PASSWORD)
        assert can_login(n, "new-pw")


ALIAS = "info@example.org"


def rcpt(node: NodeProcess, address: str) -> int:
    """The reply code RCPT TO gets on ``node``."""
    with smtplib.SMTP("127.0.0.1", node.ports["smtp"], timeout=10) as s:
        s.ehlo("client.test")
        s.mail("bob@remote.test")
        code, _ = s.rcpt(address)
        return int(code)


def test_cli_directory_changes_reach_every_node_by_the_channel(tmp_path: Path, node_processes: list[NodeProcess]) -> None:
    """The store check runs every 30 s here and RCPT answers live 30 s: only
    the CLI's invalidate explains a refusal within a second or two."""
    data, trio = start_cluster(tmp_path, node_processes, extra={"cluster.directory_check": "30"})
    hint = ("--set", f"cluster.secret={SECRET}")
    rookery("alias", "add", ALIAS, USER, *hint, data=data)
    rookery("account", "add", "bob@example.org", "--password-stdin", *hint, data=data, stdin="pw\n")
    # Each node answers (and caches) both.
    assert all(rcpt(n, a) == 250 for n in trio for a in (ALIAS, "bob@example.org"))
    for command in (("alias", "remove", ALIAS), ("account", "remove", "bob@example.org")):
        start = time.monotonic()
        rookery(*command, *hint, data=data)
        address = command[2]
        until(lambda address=address: all(rcpt(n, address) >= 500 for n in trio), 2.0, f"{address} refused")
        took = time.monotonic() - start
        assert took < 2.0 + 1.0, took  # a CLI process start included
        print(f"{' '.join(command[:2])}: refused on every node {took * 1000:.0f} ms after the command began")
    assert rcpt(trio[1], USER) == 250
    # The CLI sent as a one-shot sender: no node took it for a member.
    assert all(metrics(n)["rookery_peer_members_alive"] == 2 for n in trio)
    assert all(metrics(n)["rookery_peer_dropped_auth_total"] == 0 for n in trio)


def test_cli_directory_changes_reach_a_cut_off_node_through_the_store(
    tmp_path: Path, node_processes: list[NodeProcess]
) -> None:
    # Node 2 has the wrong secret: the CLI's hint cannot reach it.
    data, (one, two, three) = start_cluster(
        tmp_path, node_processes, secrets=(SECRET, "not-the-secret", SECRET), mesh=False,
        extra={"cluster.directory_check": "1.0"},
    )
    rookery("alias", "add", ALIAS, USER, data=data)
    assert rcpt(two, ALIAS) == 250 and rcpt(one, ALIAS) == 250
    start = time.monotonic()
    rookery("alias", "remove", ALIAS, "--set", f"cluster.secret={SECRET}", data=data)
    until(lambda: rcpt(two, ALIAS) >= 500, 1.0 + 2.0, "node 2 to refuse the removed alias")
    took = time.monotonic() - start
    # Within the check interval (plus the CLI's start), far below the 30 s TTL.
    assert took < 1.0 + 2.0, took
    assert rcpt(one, ALIAS) >= 500 and rcpt(three, ALIAS) >= 500
    assert metrics(two)["rookery_peer_received_total"] == 0, "node 2 must not have heard anyone"
    print(f"alias remove: refused on the cut-off node {took * 1000:.0f} ms after the command began")


def test_killed_node_leaves_the_others_serving_and_its_leases_move(tmp_path: Path, node_processes: list[NodeProcess]) -> None:
    # Node 2 starts first, so it takes the singleton leases.
    data, trio = start_cluster(tmp_path, node_processes, first=1)
    ids = [node_id(n) for n in trio]
    owner = lease_owner(data, "purge")
    assert owner in ids
    victim = ids.index(owner)  # node 2 unless a race gave the lease to another
    survivors = [n for i, n in enumerate(trio) if i != victim]
    with imap(survivors[1]) as watcher:
        trio[victim].kill()
        killed = time.monotonic()
        # The others keep serving.
        for i, n in enumerate(survivors):
            deliver(n, f"after-kill-{i}")
        watcher.noop()  # the session's view grows at a command boundary
        assert len(watcher.search("ALL")) == 2
        with imap(survivors[0]) as other:
            assert len(other.search("ALL")) == 2
    # The store says it is gone once its record expires (timeout 1 s) ...
    until(lambda: status(data)[ids[victim]]["state"] == "gone", 5, "the killed node to read gone")
    gone_after = time.monotonic() - killed
    assert {status(data)[i]["state"] for i in ids if i != ids[victim]} == {"ready"}
    # ... the survivors' channels drop it ...
    until(lambda: all(metrics(n)["rookery_peer_members_alive"] == 1 for n in survivors), 3, "membership to drop it")
    # ... and a survivor takes its leases within ttl (3 x timeout) + a renewal.
    for lease in ("purge", "reap-nodes", "sweep-logins"):
        new = until(lambda lease=lease: lease_owner(data, lease) not in (None, owner), 6, f"lease {lease} to move")
        assert new and lease_owner(data, lease) in ids
    moved_after = time.monotonic() - killed
    assert moved_after < 3.0 + 1.0 + 2.0
    print(f"killed node gone after {gone_after:.1f} s, leases moved after {moved_after:.1f} s")


def test_blocked_channel_costs_latency_only(tmp_path: Path, node_processes: list[NodeProcess]) -> None:
    # Node 2 has the wrong secret: it neither hears nor is heard.
    data, (one, two, three) = start_cluster(
        tmp_path, node_processes, poll=1.0, secrets=(SECRET, "not-the-secret", SECRET), mesh=False,
    )
    until(lambda: metrics(two)["rookery_peer_dropped_auth_total"] > 0, 5, "node 2 to reject its peers")
    until(lambda: metrics(one)["rookery_peer_dropped_auth_total"] > 0, 5, "node 1 to reject node 2")
    assert metrics(two)["rookery_peer_members_alive"] == 0
    with imap(two) as watcher, imap(three) as setter:
        watcher.idle()
        deliver(one, "via-poll")
        took = idle_until(watcher, is_exists, timeout=1.0 + 1.0)
        watcher.idle_done()
        (uid,) = watcher.search("ALL")
        setter.noop()  # the setter's session learns of the message first
        setter.add_flags([uid], [b"\\Flagged"])
        assert any(has_flag(b"\\\\Flagged")(r) for r in watcher.noop()[1])
        watcher.idle()
        setter.remove_flags([uid], [b"\\Flagged"])
        idle_until(watcher, lambda r: r[1:2] == (b"FETCH",) and b"Flagged" not in repr(r).encode(), 2.0)
        watcher.idle_done()
    assert metrics(two)["rookery_peer_members_alive"] == 0
    assert subjects(data) == ["via-poll"]
    print(f"IDLE wake by polling (poll_interval 1 s): {took * 1000:.0f} ms")


def read_until(sock: socket.socket, marker: bytes) -> bytes:
    """Read a raw connection until ``marker`` (or EOF) has been received."""
    data = b""
    while marker not in data:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


def read_hello(sock: socket.socket) -> bytes:
    header = sock.recv(4, socket.MSG_WAITALL)
    (length,) = struct.unpack(">I", header)
    return sock.recv(length, socket.MSG_WAITALL)


def test_forged_and_replayed_frames_are_dropped(tmp_path: Path, node_processes: list[NodeProcess]) -> None:
    data, (one, two, _) = start_cluster(tmp_path, node_processes)
    alice = in_store(data, lambda s: s.directory.get(USER)).id
    port = int(re.search(r"address=127\.0\.0\.1:(\d+)", two.output()).group(1))  # type: ignore[union-attr]
    before = metrics(two)
    with imap(two) as watcher:
        watcher.idle()
        # A frame MACed with the wrong key: dropped, connection closed, no wake.
        forged = seal(b"guessed", make_body("intruder", "", "changed", account=alice, change_id=7, kinds=["Email"]))
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            read_hello(s)
            s.sendall(forged)
            assert s.recv(1) == b""
        assert watcher.idle_check(timeout=0.5) == []
        # A genuine frame, captured and sent again: the copies are dropped.
        # (For an account nobody watches: a hint's change id sticks in the hub.)
        genuine = seal(SECRET.encode(), make_body("intruder", "", "changed", account=424242, change_id=7, kinds=["Email"]))
        for _ in range(2):
            with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                read_hello(s)
                s.sendall(genuine + genuine)
                s.shutdown(socket.SHUT_WR)
                s.recv(1)
        watcher.idle_done()
    after = until(
        lambda: (lambda m: m if m["rookery_peer_dropped_replay_total"] >= before["rookery_peer_dropped_replay_total"] + 3 else None)(
            metrics(two)
        ),
        2, "replays to be counted",
    )
    assert after["rookery_peer_dropped_auth_total"] == before["rookery_peer_dropped_auth_total"] + 1
    assert after["rookery_peer_dropped_replay_total"] == before["rookery_peer_dropped_replay_total"] + 3
    # The genuine frame itself was received once; the cluster still works.
    assert after["rookery_peer_received_total"] > before["rookery_peer_received_total"]
    assert metrics(one)["rookery_peer_dropped_auth_total"] == 0
    with imap(two) as watcher:
        watcher.idle()
        deliver(one, "still-fine")
        idle_until(watcher, is_exists, timeout=2.0)
        watcher.idle_done()


def test_drain_and_sigterm_say_bye_and_lose_nothing(tmp_path: Path, node_processes: list[NodeProcess]) -> None:
    """Operator drain of node 2 under SMTP load, SIGTERM of node 3.

    A drained node's outbound queue leases, held mid-delivery, are covered by
    ``test_outbound_cluster.py::test_drained_node_hands_back_its_queue_leases``."""
    data, (one, two, three) = start_cluster(tmp_path, node_processes)
    ids = [node_id(n) for n in (one, two, three)]
    acked: list[str] = []
    stop = threading.Event()

    def sender() -> None:
        n = 0
        while not stop.is_set():
            tag = f"to-two-{n}"
            n += 1
            try:
                deliver(two, tag)
            except (OSError, smtplib.SMTPException):
                return  # refused or 421: not acknowledged
            acked.append(tag)

    with imap(two) as a, socket.create_connection(("127.0.0.1", three.ports["imap"]), timeout=10) as b:
        a.idle()  # in IDLE on the node drained by the operator
        # A selected session between commands on the node stopped by SIGTERM.
        b.sendall(f"1 LOGIN {USER} {PASSWORD}\r\n2 SELECT INBOX\r\n".encode())
        read_until(b, b"\r\n2 OK")
        thread = threading.Thread(target=sender)
        thread.start()
        try:
            until(lambda: len(acked) >= 5, 10, "some mail accepted by node 2")
            asked = time.monotonic()
            rookery("node", "drain", ids[1], data=data)
            code = two.proc.wait(3 + 5)
            exit_after = time.monotonic() - asked
        finally:
            stop.set()
            thread.join(15)
        assert code == 0 and exit_after < 3 + 5
        idle_until(a, lambda r: r[:2] == (b"BYE", b"[UNAVAILABLE]"), timeout=2.0)
        assert three.terminate() == 0
        assert b"* BYE [UNAVAILABLE]" in read_until(b, b"\0")  # everything up to EOF
    assert "node stopped" in two.output() and "node stopped" in three.output()
    states = status(data)
    assert states[ids[1]]["state"] == "gone" and states[ids[2]]["state"] == "gone"
    assert states[ids[0]]["state"] == "ready"
    # Everything node 2 acknowledged is in the store; node 1 still serves.
    assert acked and set(acked) <= set(subjects(data))
    deliver(one, "after-drain")
    with imap(one) as c:
        assert len(c.search("ALL")) == len(subjects(data))
    print(f"drain: {len(acked)} messages accepted before, exit {exit_after:.1f} s after the request")


def cluster_port(node: NodeProcess) -> int:
    m = re.search(r"peer channel started .*address=127\.0\.0\.1:(\d+)", node.output())
    assert m, node.output()
    return int(m.group(1))


def test_node_drain_without_a_name_drains_this_machines_node(tmp_path: Path, node_processes: list[NodeProcess]) -> None:
    """As in a container: the CLI's config listens on a wildcard, the record
    holds the advertised address (here the host name is the loopback address)."""
    data, (one, two, three) = start_cluster(tmp_path, node_processes)
    ids = [node_id(n) for n in (one, two, three)]
    wildcard = ("--set", f"listen.cluster=0.0.0.0:{cluster_port(two)}", "--set", "server.hostname=127.0.0.1")
    out = rookery("node", "drain", *wildcard, data=data).stdout
    assert ids[1] in out
    assert two.proc.wait(3 + 5) == 0
    assert {i: status(data)[i]["state"] for i in ids} == {ids[0]: "ready", ids[1]: "gone", ids[2]: "ready"}
    # Two live nodes and this config names neither: refused, nothing drained.
    refused = rookery("node", "drain", "--set", "listen.cluster=0.0.0.0:9", data=data, check=False)
    assert refused.returncode == 1 and "2 live nodes" in refused.stderr
    assert not any(r["drain_requested"] for i, r in status(data).items() if i != ids[1])
    # One live node left: it is the one, whatever the config says.
    assert three.terminate() == 0
    assert ids[0] in rookery("node", "drain", data=data).stdout
    assert one.proc.wait(3 + 5) == 0


def probe(node: NodeProcess, path: str) -> tuple[int, dict[str, Any]] | None:
    """``GET path`` on the node's HTTP listener: status and JSON body (empty
    when not JSON), or ``None`` when nothing answers."""
    url = f"http://127.0.0.1:{node.ports['http']}{path}"
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            status_code, raw = r.status, r.read()
    except urllib.error.HTTPError as exc:
        status_code, raw = exc.code, exc.read()
    except OSError:
        return None
    try:
        body = json.loads(raw)
    except ValueError:
        body = {}
    return status_code, body if isinstance(body, dict) else {}


@pytest.mark.parametrize("how", ["sigterm", "node drain"])
def test_draining_node_is_not_ready_but_live_until_it_exits(
    tmp_path: Path, node_processes: list[NodeProcess], how: str
) -> None:
    data = tmp_path / "data"
    in_store(data, lambda s: make_account(s, USER, PASSWORD))
    node = NodeProcess(data, ("smtp", "http"))
    node_processes.append(node)
    first = probe(node, "/healthz/ready")
    assert first is not None and first[0] == 200 and first[1]["phase"] == "ready"
    with smtplib.SMTP("127.0.0.1", node.ports["smtp"], timeout=10) as smtp:
        # A transaction in progress holds the drain for shutdown_timeout (3 s).
        smtp.ehlo("client.test")
        smtp.mail("bob@remote.test")
        assert smtp.rcpt(USER)[0] == 250
        if how == "sigterm":
            node.proc.send_signal(signal.SIGTERM)
        else:
            assert "drain requested" in rookery("node", "drain", data=data).stdout
        # The node sees an operator's drain at its next record renewal.
        ready = until(lambda: (lambda r: r if r and r[0] == 503 else None)(probe(node, "/healthz/ready")), 5, "503")
        assert ready[1]["phase"] == "draining" and ready[1]["ready"] is False
        not_ready_at = time.monotonic()
        answers = []
        while (answer := probe(node, "/healthz/live")) is not None:
            answers.append((time.monotonic(), answer[0]))
            assert probe(node, "/healthz/ready") in (None, ready)
            time.sleep(0.05)
        with contextlib.suppress(smtplib.SMTPException, OSError):
            smtp.quit()
    assert node.proc.wait(10) == 0
    assert {code for _, code in answers} == {200}
    # Live answered through the drain, not only at its start.
    assert answers[-1][0] - not_ready_at > 2.0, answers[-1][0] - not_ready_at


def test_failed_logins_on_one_node_count_on_another(tmp_path: Path, node_processes: list[NodeProcess]) -> None:
    """The per-address limit is the cluster's, not each node's: the counter
    is in the store (no peer channel here at all)."""
    data = tmp_path / "data"
    in_store(data, lambda s: make_account(s, USER, PASSWORD))
    ensure_self_signed(data, "mx.test")
    limits = ("--set", "security.max_failed_logins=3", "--set", "security.failed_login_delay=0.3")
    one, two = (NodeProcess(data, ("imap",), *limits) for _ in range(2))
    node_processes.extend((one, two))
    for _ in range(3):
        start = time.monotonic()
        assert not can_login(one, "wrong")
        assert time.monotonic() - start >= 0.3
    start = time.monotonic()
    assert not can_login(two, PASSWORD), "node 2 must count node 1's failures"
    assert time.monotonic() - start >= 0.3, "a limited refusal waits the delay too"
    assert not can_login(one, PASSWORD)


async def test_every_singleton_lease_is_taken_and_documented(tmp_path: Path) -> None:
    """Cluster-wide periodic work runs under leases; each one a node takes is
    in the README's table of periodic work, and one node alone takes them all."""
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    table = readme.split("## Cluster", 1)[1].split("\n## ", 1)[0]
    documented = set(re.findall(r"^\| `([a-z-]+)`: .*one node at a time \(lease\)", table, re.M))
    assert {"purge", "reap-nodes", "sweep-logins"} <= documented
    async with running_node(node_config(tmp_path / "data", ("smtp",), cluster__timeout=1.0)) as state:
        nodes = Nodes(state.storage.db)

        async def held() -> dict[str, str]:
            return {lease.name: lease.owner for lease in await nodes.leases()}

        deadline = time.monotonic() + 5
        while set(await held()) != documented and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        leases = await held()
    assert set(leases) == documented, (sorted(leases), sorted(documented))
    assert set(leases.values()) == {state.node_id}


async def test_queue_retry_from_the_cli_wakes_the_workers(tmp_path: Path, node_processes: list[NodeProcess]) -> None:
    """``queue retry`` sends queue_refresh: mail due in ten minutes, made due
    now, leaves at once rather than at the worker's next scan
    ([queue] poll_interval 30 s here)."""
    from aiosmtpd.smtp import SMTP as SinkSMTP

    from storage.queue import Queue

    data = tmp_path / "data"
    storage = Storage.open("embedded", data_dir=data)
    try:
        for i in range(3):
            raw = f"From: a@example.com\r\nTo: b@remote.test\r\nSubject: q{i}\r\n\r\nbody\r\n".encode()
            await Queue(storage.db).enqueue("a@example.com", ["b@remote.test"], raw, now=time.time() + 600)
    finally:
        await storage.close()
    arrived: list[float] = []
    all_in = asyncio.Event()

    class Handler:
        async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
            arrived.append(time.monotonic())
            if len(arrived) == 3:
                all_in.set()
            return "250 2.0.0 OK"

    server = await asyncio.get_running_loop().create_server(lambda: SinkSMTP(Handler()), "127.0.0.1", 0)
    try:
        config = tmp_path / "node.toml"
        config.write_text(
            f'[routes]\n"*" = "127.0.0.1:{server.sockets[0].getsockname()[1]}"\n[queue]\npoll_interval = 30\n'
        )
        options = ("--config", str(config), "--set", f"cluster.secret={SECRET}")
        node = await asyncio.to_thread(NodeProcess, data, ("http", "cluster"), *options)
        node_processes.append(node)
        await asyncio.sleep(0.5)  # the worker's first scan: nothing due
        assert arrived == []
        start = time.monotonic()
        await asyncio.to_thread(rookery, "queue", "retry", "--all", "--set", f"cluster.secret={SECRET}", data=data)
        await asyncio.wait_for(all_in.wait(), 5)
        took = time.monotonic() - start
    finally:
        server.close()
        await server.wait_closed()
    assert took < 5, took
    print(f"queue retry: 3 messages at the sink {took * 1000:.0f} ms after the command began")
