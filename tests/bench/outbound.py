"""Outbound benchmark: messages/s from the queue to a loopback sink.

A sink SMTP server (a lean asyncio protocol, its own process) stands for the remote world.
First the sink alone is measured with the anchors' SMTP load generator, so we
know it is not the bottleneck. Then MESSAGES messages of 10 kB are queued in a
fresh embedded store (delivery paused), one or two ``rookery serve`` nodes
are started on it with ``[routes] "*"`` pointing at the sink, delivery is
resumed, and the time until the sink has them all is measured. A third run
with one node adds a (non-binding) ``[throttle]`` rule, to price the
cluster-wide throttle check.

    .venv/bin/python tests/bench/outbound.py [--messages 3000]

Prints one summary line.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

from _common import ANCHORS, Usage, json_lines

from helpers import NodeProcess, rookery

# The sink is a lean asyncio protocol rather than aiosmtpd: on 2 cores it
# shares the CPU with the nodes it measures, and aiosmtpd's line-at-a-time
# DATA spends about 1 ms per 10 kB message (more than a node spends sending
# it). It speaks what a delivering client needs: EHLO/HELO, MAIL, RCPT,
# DATA, RSET, NOOP, QUIT, pipelined or not, and counts accepted recipients.
SINK = textwrap.dedent(
    """
    import asyncio, os, sys
    count = 0
    EHLO = b"250-sink\\r\\n250-PIPELINING\\r\\n250-8BITMIME\\r\\n250 SIZE 0\\r\\n"
    class Sink(asyncio.Protocol):
        def connection_made(self, transport):
            self.t = transport
            self.buf = b""
            self.data = False
            self.rcpts = 0
            transport.write(b"220 sink ESMTP\\r\\n")
        def data_received(self, chunk):
            global count
            self.buf += chunk
            out = []
            while True:
                if self.data:
                    end = self.buf.find(b"\\r\\n.\\r\\n")
                    if end < 0:
                        break
                    self.buf = self.buf[end + 5:]
                    self.data = False
                    count += self.rcpts
                    self.rcpts = 0
                    out.append(b"250 2.0.0 OK\\r\\n")
                    continue
                eol = self.buf.find(b"\\r\\n")
                if eol < 0:
                    break
                line, self.buf = self.buf[:eol], self.buf[eol + 2:]
                verb = line[:4].upper()
                if verb == b"EHLO":
                    out.append(EHLO)
                elif verb == b"DATA":
                    if not self.rcpts:
                        out.append(b"503 5.5.1 need RCPT\\r\\n")
                        continue
                    # a dot line right after 354 ends an empty message: keep the CRLF before it findable
                    self.buf = b"\\r\\n" + self.buf
                    self.data = True
                    out.append(b"354 go ahead\\r\\n")
                elif verb == b"RCPT":
                    self.rcpts += 1
                    out.append(b"250 2.1.5 OK\\r\\n")
                elif verb == b"RSET":
                    self.rcpts = 0
                    out.append(b"250 2.0.0 OK\\r\\n")
                elif verb == b"QUIT":
                    out.append(b"221 2.0.0 bye\\r\\n")
                    self.t.write(b"".join(out))
                    self.t.close()
                    return
                elif verb in (b"HELO", b"MAIL", b"NOOP"):
                    out.append(b"250 2.0.0 OK\\r\\n")
                else:
                    out.append(b"502 5.5.1 not here\\r\\n")
            if out:
                self.t.write(b"".join(out))
    async def main():
        srv = await asyncio.get_running_loop().create_server(Sink, "127.0.0.1", 0)
        print(srv.sockets[0].getsockname()[1], flush=True)
        path = sys.argv[1]
        while True:
            await asyncio.sleep(0.05)
            with open(path + ".tmp", "w") as f:
                f.write(str(count))
            os.replace(path + ".tmp", path)
    asyncio.run(main())
    """
)


class Sink:
    def __init__(self, tmp: Path) -> None:
        self.count_file = tmp / "sink.count"
        self.proc = subprocess.Popen([sys.executable, "-c", SINK, str(self.count_file)], stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        self.port = int(self.proc.stdout.readline())

    def count(self) -> int:
        try:
            return int(self.count_file.read_text() or 0)
        except (FileNotFoundError, ValueError):
            return 0

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()


async def fill(data: Path, messages: int) -> None:
    from storage import Storage
    from storage.queue import Queue

    storage = Storage.open("embedded", data_dir=data)
    try:
        queue = Queue(storage.db)
        await queue.pause(None)
        body = b"From: bench@example.com\r\nTo: x@remote.test\r\nSubject: out\r\n\r\n" + (b"y" * 78 + b"\r\n") * 128
        sem = asyncio.Semaphore(32)

        async def one(i: int) -> None:
            async with sem:
                await queue.enqueue("bench@example.com", [f"user{i % 50}@remote.test"], body + str(i).encode() + b"\r\n")

        await asyncio.gather(*(one(i) for i in range(messages)))
    finally:
        await storage.close()


def run(tmp: Path, sink: Sink, messages: int, nodes: int, throttle: bool) -> tuple[float, float, float]:
    """Messages/s, the nodes' CPU ms per message, and the machine's idle share while they worked."""
    data = tmp / f"data-{nodes}-{throttle}"
    rookery("domain", "add", "example.com", data=data)
    asyncio.run(fill(data, messages))
    config = tmp / f"node-{nodes}-{throttle}.toml"
    config.write_text(
        f'[routes]\n"*" = "127.0.0.1:{sink.port}"\n[queue]\npoll_interval = 0.5\nmax_connections = 8\n'
        + ('[throttle]\n"remote.test" = { connections = 8, per_hour = 10000000 }\n' if throttle else "")
    )
    before = sink.count()
    procs = [NodeProcess(data, ("http",), "--config", str(config)) for _ in range(nodes)]
    try:
        usage = Usage([p.proc.pid for p in procs])
        t0 = time.perf_counter()
        rookery("queue", "resume", data=data)
        deadline = t0 + 600
        while sink.count() - before < messages and time.perf_counter() < deadline:
            time.sleep(0.05)
        elapsed = time.perf_counter() - t0
        done = sink.count() - before
        cpu_ms, idle = usage.stop(done)
    finally:
        for p in procs:
            p.close()
    return done / elapsed, cpu_ms, idle


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--messages", type=int, default=3000)
    a = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="rookery-bench-") as tmp_name:
        tmp = Path(tmp_name)
        sink = Sink(tmp)
        try:
            alone = json_lines([sys.executable, str(ANCHORS / "smtp_inbound_load.py"), f"127.0.0.1:{sink.port}",
                                "-c", "8", "-m", str(a.messages), "-l", "10240", "-t", "x@remote.test"])[-1]
            one = run(tmp, sink, a.messages, 1, False)
            two = run(tmp, sink, a.messages, 2, False)
            throttled = run(tmp, sink, a.messages, 1, True)
        finally:
            sink.close()
    print(
        f"outbound msgs/s (10 kB, queue -> loopback sink): sink_alone={alone['msgs_per_s']} "
        f"one_node={one[0]:.0f} two_nodes={two[0]:.0f} (x{two[0] / one[0]:.2f}, goal >=1.5) "
        f"one_node_throttled={throttled[0]:.0f} (check cost {100 * (1 - throttled[0] / one[0]):.0f}%, goal <10%) "
        f"goal one_node>=300 on {os.cpu_count()} cores; node CPU ms/msg one={one[1]:.2f} two={two[1]:.2f}, "
        f"machine idle one={100 * one[2]:.0f}% two={100 * two[2]:.0f}%"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
