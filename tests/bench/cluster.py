"""Cluster benchmark: three nodes on one store against one, and channel traffic.

1. Inbound SMTP, 10 kB messages: one node driven by the anchors' load
   generator at 3×C clients, then three nodes sharing one embedded store, each
   driven by its own generator at C clients at once. The goal: the three
   together accept no less than the one (the store, not the channel, limits).
2. Peer-channel traffic: frames sent by all nodes (from ``/metrics``) per
   delivery, over a quiet spell with no IDLE session, then with SESSIONS IDLE
   sessions spread over the three nodes. Traffic must follow changes, not
   sessions: frames per delivery stay about the same.

    .venv/bin/python tests/bench/cluster.py [--messages 3000] [--sessions 10000]

Prints one summary line.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import resource
import smtplib
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from _common import ANCHORS, json_lines

from helpers import NodeProcess, rookery

SENT = re.compile(r"^rookery_peer_sent_total (\S+)$", re.M)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def store(tmp: Path, name: str) -> Path:
    data = tmp / name
    rookery("domain", "add", "example.com", data=data)
    rookery("account", "add", "alice@example.com", "--password", "pw", data=data)
    return data


def generator(port: int, clients: int, messages: int) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, str(ANCHORS / "smtp_inbound_load.py"), f"127.0.0.1:{port}", "-c", str(clients),
         "-m", str(messages), "-l", "10240", "-t", "alice@example.com"],
        stdout=subprocess.PIPE, text=True,
    )


def cluster(data: Path, listen: tuple[str, ...], *extra: str, n: int = 3) -> list[NodeProcess]:
    ports = [free_port() for _ in range(n)]
    peers = ",".join(f"127.0.0.1:{p}" for p in ports)
    return [
        NodeProcess(data, listen, "--set", f"listen.cluster=127.0.0.1:{p}", "--set", f"cluster.peers={peers}",
                    "--set", "cluster.secret=bench", *extra)
        for p in ports
    ]


def sent_frames(nodes: list[NodeProcess]) -> float:
    total = 0.0
    for node in nodes:
        with urllib.request.urlopen(f"http://127.0.0.1:{node.ports['http']}/metrics", timeout=10) as r:
            m = SENT.search(r.read().decode())
            total += float(m.group(1)) if m else 0.0
    return total


async def idle_sessions(nodes: list[NodeProcess], count: int) -> list[asyncio.StreamWriter]:
    writers = []
    sem = asyncio.Semaphore(200)

    async def one(k: int) -> None:
        async with sem:
            reader, writer = await asyncio.open_connection("127.0.0.1", nodes[k % len(nodes)].ports["imap"])
            await reader.readline()
            for tag, cmd in ((b"a", b"LOGIN alice@example.com pw"), (b"b", b"SELECT INBOX")):
                writer.write(tag + b" " + cmd + b"\r\n")
                while not (await reader.readline()).startswith(tag + b" "):
                    pass
            writer.write(b"c IDLE\r\n")
            await reader.readline()
            writers.append(writer)

    await asyncio.gather(*(one(k) for k in range(count)))
    return writers


def frames_per_delivery(nodes: list[NodeProcess], deliveries: int) -> float:
    """Peer frames sent by all nodes per delivery. The traffic cluster runs
    with heartbeats 60 s apart, so what is counted here is change traffic."""
    before = sent_frames(nodes)
    for i in range(deliveries):
        with smtplib.SMTP("127.0.0.1", nodes[i % len(nodes)].ports["smtp"], timeout=30) as s:
            s.sendmail("bench@remote.test", ["alice@example.com"], b"Subject: %d\r\n\r\nx\r\n" % i)
    time.sleep(1.0)
    return (sent_frames(nodes) - before) / deliveries


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--messages", type=int, default=3000, help="messages per SMTP run (default 3000)")
    p.add_argument("--clients", type=int, default=8, help="clients per node (default 8)")
    p.add_argument("--sessions", type=int, default=10000, help="IDLE sessions for the traffic check")
    p.add_argument("--deliveries", type=int, default=100)
    a = p.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    with tempfile.TemporaryDirectory(prefix="rookery-bench-") as tmp_name:
        tmp = Path(tmp_name)
        one = NodeProcess(store(tmp, "one"), ("smtp",))
        try:
            single = json_lines([sys.executable, str(ANCHORS / "smtp_inbound_load.py"), f"127.0.0.1:{one.ports['smtp']}",
                                 "-c", str(3 * a.clients), "-m", str(a.messages), "-l", "10240", "-t", "alice@example.com"])[-1]
        finally:
            one.close()
        nodes = cluster(store(tmp, "three"), ("smtp",))
        try:
            t0 = time.perf_counter()
            gens = [generator(n.ports["smtp"], a.clients, a.messages // 3) for n in nodes]
            outs = [g.communicate(timeout=900)[0] for g in gens]
            wall = time.perf_counter() - t0
            ok = sum(int(re.search(r'"ok": (\d+)', o).group(1)) for o in outs)  # type: ignore[union-attr]
        finally:
            for n in nodes:
                n.close()
        three = ok / wall
        nodes = cluster(store(tmp, "traffic"), ("smtp", "imap", "http"),
                        "--set", "cluster.heartbeat=60", "--set", "cluster.timeout=300")
        try:
            quiet = frames_per_delivery(nodes, a.deliveries)

            async def with_sessions() -> float:
                writers = await idle_sessions(nodes, a.sessions)
                try:
                    return await asyncio.to_thread(frames_per_delivery, nodes, a.deliveries)
                finally:
                    for w in writers:
                        w.close()

            busy = asyncio.run(with_sessions())
        finally:
            for n in nodes:
                n.close()
    print(
        f"cluster smtp msgs/s: one node ({3 * a.clients} clients)={single['msgs_per_s']} "
        f"three nodes ({a.clients} clients each)={three:.0f} (goal >= one node) | peer frames per delivery: "
        f"no IDLE sessions={quiet:.2f}, {a.sessions} IDLE sessions over 3 nodes={busy:.2f} (goal: about equal)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
