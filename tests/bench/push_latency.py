"""Push latency across nodes: delivery on node A to IDLE wake-up on node B.

Starts two ``rookery serve`` processes on one embedded store, an IDLE session
on node B, then delivers MESSAGES messages over SMTP to node A one after
another and times each until B's session reports EXISTS. Runs twice: with the
peer channel (the fast path), and with the channel cut (each node only lists
a dead peer), where the wake-up must come from the store poll, within
``[imap] poll_interval`` + 100 ms.

    .venv/bin/python tests/bench/push_latency.py [--messages 200] [--poll 1.0]

Prints one summary line.
"""

from __future__ import annotations

import argparse
import asyncio
import smtplib
import socket
import sys
import tempfile
import time
from pathlib import Path

from _common import ROOT  # noqa: F401  (sets sys.path)

from helpers import NodeProcess, rookery


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def idle_session(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    await reader.readline()
    for tag, cmd in ((b"a", b"LOGIN alice@example.com pw"), (b"b", b"SELECT INBOX")):
        writer.write(tag + b" " + cmd + b"\r\n")
        while not (await reader.readline()).startswith(tag + b" "):
            pass
    writer.write(b"c IDLE\r\n")
    await reader.readline()
    return reader, writer


async def measure(a_smtp: int, b_imap: int, messages: int) -> list[float]:
    reader, writer = await idle_session(b_imap)
    lat = []
    smtp = await asyncio.to_thread(smtplib.SMTP, "127.0.0.1", a_smtp, timeout=30)
    try:
        for i in range(messages):
            t0 = time.perf_counter()
            await asyncio.to_thread(smtp.sendmail, "bench@remote.test", ["alice@example.com"], b"Subject: %d\r\n\r\nx\r\n" % i)
            while True:
                line = await asyncio.wait_for(reader.readline(), 30)
                if line.endswith(b"EXISTS\r\n"):
                    break
            lat.append(time.perf_counter() - t0)
    finally:
        await asyncio.to_thread(smtp.quit)
        writer.close()
    return sorted(lat)


def run(messages: int, poll: float, channel: bool) -> list[float]:
    with tempfile.TemporaryDirectory(prefix="rookery-bench-") as tmp:
        data = Path(tmp) / "data"
        rookery("domain", "add", "example.com", data=data)
        rookery("account", "add", "alice@example.com", "--password", "pw", data=data)
        ports = [free_port(), free_port()]
        dead = free_port()
        peers = ",".join(f"127.0.0.1:{p}" for p in ports) if channel else f"127.0.0.1:{dead}"
        common = ["--set", f"imap.poll_interval={poll}", "--set", "cluster.secret=bench-secret", "--set", f"cluster.peers={peers}"]
        a = NodeProcess(data, ("smtp",), *common, "--set", f"listen.cluster=127.0.0.1:{ports[0]}")
        b = NodeProcess(data, ("imap",), *common, "--set", f"listen.cluster=127.0.0.1:{ports[1]}")
        try:
            time.sleep(2 * 1.0)  # heartbeats: let the nodes find each other
            return asyncio.run(measure(a.ports["smtp"], b.ports["imap"], messages))
        finally:
            a.close()
            b.close()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--messages", type=int, default=200)
    p.add_argument("--poll", type=float, default=1.0, help="[imap] poll_interval of the nodes (default 1.0 s)")
    a = p.parse_args()

    def pct(v: list[float], q: float) -> float:
        return v[min(len(v) - 1, int(q * len(v)))] * 1000

    fast = run(a.messages, a.poll, channel=True)
    slow = run(min(a.messages, 50), a.poll, channel=False)
    print(
        f"push_latency node A delivery -> node B IDLE: channel p50={pct(fast, .5):.1f}ms p99={pct(fast, .99):.1f}ms "
        f"(goal p99<100ms, n={len(fast)}) | no channel p50={pct(slow, .5):.0f}ms p99={pct(slow, .99):.0f}ms "
        f"max={slow[-1] * 1000:.0f}ms (goal <= poll {a.poll * 1000:.0f}ms + 100ms, n={len(slow)})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
