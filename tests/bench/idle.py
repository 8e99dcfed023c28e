"""IDLE benchmark: 10,000 concurrent IDLE sessions on one node.

Starts one ``rookery serve`` on the embedded store, opens SESSIONS IMAP
connections spread over ACCOUNTS accounts (LOGIN, SELECT INBOX, IDLE), reads
the node's resident memory, then delivers one message over SMTP to one
account and times until every IDLE session of that account has seen its
EXISTS (and checks no other account's session was woken with one).

    .venv/bin/python tests/bench/idle.py [--sessions 10000] [--accounts 10]

Prints one summary line.
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import smtplib
import sys
import tempfile
import time
from pathlib import Path

from _common import ROOT  # noqa: F401  (sets sys.path)

from helpers import NodeProcess, rookery

PASSWORD = "idle-bench"


class Idler:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.woken = asyncio.get_running_loop().create_future()

    @classmethod
    async def open(cls, port: int, user: str) -> Idler:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=1 << 20)
        self = cls(reader, writer)
        await reader.readline()
        for tag, cmd in ((b"a", b"LOGIN %s %s" % (user.encode(), PASSWORD.encode())), (b"b", b"SELECT INBOX")):
            writer.write(tag + b" " + cmd + b"\r\n")
            while True:
                line = await reader.readline()
                if not line:
                    raise ConnectionError("closed during setup")
                if line.startswith(tag + b" "):
                    if not line.startswith(tag + b" OK"):
                        raise RuntimeError(line.decode(errors="replace"))
                    break
        writer.write(b"c IDLE\r\n")
        line = await reader.readline()
        if not line.startswith(b"+"):
            raise RuntimeError(f"IDLE refused: {line!r}")
        return self

    async def watch(self) -> None:
        while True:
            line = await self.reader.readline()
            if not line:
                return
            if line.endswith(b"EXISTS\r\n") and not self.woken.done():
                self.woken.set_result(time.perf_counter())

    def close(self) -> None:
        self.writer.close()


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


async def run(port: int, smtp_port: int, pid: int, sessions: int, accounts: int) -> str:
    users = [f"u{i}@example.com" for i in range(accounts)]
    idlers: list[tuple[str, Idler]] = []
    sem = asyncio.Semaphore(200)
    t0 = time.perf_counter()

    async def one(k: int) -> None:
        async with sem:
            user = users[k % accounts]
            idlers.append((user, await Idler.open(port, user)))

    await asyncio.gather(*(one(k) for k in range(sessions)))
    setup = time.perf_counter() - t0
    watchers = [asyncio.ensure_future(i.watch()) for _, i in idlers]
    await asyncio.sleep(2)
    rss = rss_mb(pid)
    target = users[0]
    sent = time.perf_counter()
    await asyncio.to_thread(_deliver, smtp_port, target)
    mine = [i for u, i in idlers if u == target]
    others = [i for u, i in idlers if u != target]
    done, pending = await asyncio.wait([i.woken for i in mine], timeout=60)
    wakes = sorted(f.result() - sent for f in done)
    await asyncio.sleep(1)
    stray = sum(1 for i in others if i.woken.done())
    for _, i in idlers:
        i.close()
    for w in watchers:
        w.cancel()
    p = lambda q: wakes[min(len(wakes) - 1, int(q * len(wakes)))] * 1000 if wakes else float("nan")  # noqa: E731
    return (
        f"idle sessions={sessions} accounts={accounts} setup={setup:.1f}s node_rss={rss:.0f}MB "
        f"woken={len(done)}/{len(mine)} wake_p50={p(0.5):.0f}ms wake_p100={p(1.0):.0f}ms "
        f"stray_wakes={stray} rss_goal=<1024MB"
    )


def _deliver(port: int, rcpt: str) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as s:
        s.sendmail("bench@remote.test", [rcpt], b"Subject: wake up\r\n\r\nnow\r\n")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sessions", type=int, default=10000)
    p.add_argument("--accounts", type=int, default=10)
    a = p.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if hard < a.sessions + 100:
        print(f"idle bench: open-file limit {hard} is below {a.sessions} sessions", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="rookery-bench-") as tmp:
        data = Path(tmp) / "data"
        rookery("domain", "add", "example.com", data=data)
        for i in range(a.accounts):
            rookery("account", "add", f"u{i}@example.com", "--password", PASSWORD, data=data)
        node = NodeProcess(data, ("smtp", "imap"))
        try:
            print(asyncio.run(run(node.ports["imap"], node.ports["smtp"], node.proc.pid, a.sessions, a.accounts)))
        finally:
            node.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
