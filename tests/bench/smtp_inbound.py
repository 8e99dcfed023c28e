"""Inbound SMTP benchmark: messages/s accepted and durable before ``250``.

Starts one ``rookery serve`` on the embedded store in a temporary directory,
then drives it with the anchors' load generator
(``../shared/anchors/smtp_inbound_load.py``, aiosmtplib, 10 kB messages,
connections reused) at 1, 8 and 32 concurrent clients. With ``--anchor`` it
also sets up Debian's Postfix through ``postfix_inbound.sh`` and measures it
with the same generator and load in the same run, and prints the ratios.

    .venv/bin/python tests/bench/smtp_inbound.py [--messages N] [--anchor]

Prints one summary line.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from _common import ANCHORS, Usage, anchor_log, json_lines

from helpers import NodeProcess, rookery

POSTFIX_PORT = 2526


def load(target: str, concurrency: int, messages: int, rcpt: str) -> dict[str, object]:
    cmd = [sys.executable, str(ANCHORS / "smtp_inbound_load.py"), target, "-c", str(concurrency), "-m", str(messages),
           "-l", "10240", "-t", rcpt, "--client", "aiosmtplib"]
    return json_lines(cmd, timeout=900)[-1]


def bench_rookery(concs: list[int], messages: int) -> dict[int, dict[str, object]]:
    with tempfile.TemporaryDirectory(prefix="rookery-bench-") as tmp:
        data = Path(tmp) / "data"
        rookery("domain", "add", "example.com", data=data)
        rookery("account", "add", "alice@example.com", "--password", "bench", data=data)
        node = NodeProcess(data, ("smtp",))
        try:
            results = {}
            for c in concs:
                usage = Usage([node.proc.pid])
                results[c] = load(f"127.0.0.1:{node.ports['smtp']}", c, messages, "alice@example.com")
                results[c]["node_cpu_ms"], results[c]["idle"] = usage.stop(int(str(results[c]["ok"])))
            return results
        finally:
            node.close()


def bench_postfix(concs: list[int], messages: int) -> dict[int, dict[str, object]]:
    script = ANCHORS / "postfix_inbound.sh"
    log = anchor_log("postfix")
    subprocess.run(["bash", str(script), "setup", str(POSTFIX_PORT)], check=True, stdout=log, stderr=log, timeout=900)
    try:
        return {c: load(f"127.0.0.1:{POSTFIX_PORT}", c, messages, "alice@example.com") for c in concs}
    finally:
        subprocess.run(["bash", str(script), "stop"], stdout=log, stderr=log, timeout=120)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--messages", type=int, default=3000, help="messages per concurrency level (default 3000)")
    p.add_argument("--concurrency", default="1,8,32", help="comma-separated client counts (default 1,8,32)")
    p.add_argument("--anchor", action="store_true", help="also measure Postfix (needs root; installs it)")
    a = p.parse_args()
    if not (ANCHORS / "smtp_inbound_load.py").exists():
        print(f"smtp_inbound: anchors not found at {ANCHORS}", file=sys.stderr)
        return 2
    concs = [int(c) for c in a.concurrency.split(",")]
    ours = bench_rookery(concs, a.messages)
    parts = [f"rookery c{c}={ours[c]['msgs_per_s']}" for c in concs]
    failed = sum(int(str(r["failed"])) for r in ours.values())
    if a.anchor:
        if os.geteuid() != 0:
            print("smtp_inbound: --anchor needs root to install and run Postfix", file=sys.stderr)
            return 2
        theirs = bench_postfix(concs, a.messages)
        parts += [f"postfix c{c}={theirs[c]['msgs_per_s']}" for c in concs]
        parts += [
            f"ratio c{c}={float(str(ours[c]['msgs_per_s'])) / float(str(theirs[c]['msgs_per_s'])):.2f}"
            for c in concs
            if theirs[c]["msgs_per_s"]
        ]
    # What limits a figure: the node's CPU per message, the load generator's,
    # and how much of the 2 cores the machine left idle while it ran.
    parts += [
        f"c{c}[node_cpu={float(str(ours[c]['node_cpu_ms'])):.2f}ms/msg "
        f"client_cpu={1000 * float(str(ours[c]['client_cpu_s'])) / max(int(str(ours[c]['ok'])), 1):.2f}ms/msg "
        f"idle={100 * float(str(ours[c]['idle'])):.0f}%]"
        for c in concs
    ]
    print(f"smtp_inbound msgs/s (10 kB, durable before 250): {' '.join(parts)} failed={failed}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
