"""IMAP benchmark: the command mix of the IMAP issue at 1, 10 and 50 clients.

Starts one ``rookery serve`` on the embedded store in a temporary directory,
fills INBOX to 10,000 messages with the anchors' load generator
(``../shared/anchors/imap_load.py``), times SELECT and ``UID FETCH 1:*
(FLAGS)`` on it, then runs the mix (LOGIN, SELECT, UID FETCH FLAGS ENVELOPE of
100, FETCH of a body, STORE, APPEND, STORE, UID EXPUNGE, LOGOUT) for a bounded
time per client count. ``--anchor`` does the same against Debian's Dovecot on
mdbox set up by ``dovecot_imap.sh``, in the same run.

    .venv/bin/python tests/bench/imap.py [--seconds 20] [--populate 10000] [--anchor]

Prints one summary line: commands/s, p50/p99 per command at each client count.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from _common import ANCHORS, anchor_log, json_lines

from helpers import NodeProcess, rookery

USER, PASSWORD = "alice@example.com", "anchor-Pass-1"
DOVECOT_PORT = 14143
SHORT = {"LOGIN": "login", "SELECT": "select", "FETCH_ENVELOPE_100": "env100", "FETCH_BODY": "body",
         "STORE_FLAGGED": "store", "APPEND": "append", "STORE_DELETED": "del", "UID_EXPUNGE": "expunge",
         "LOGOUT": "logout"}


def drive(target: str, populate: int, clients: list[int], seconds: float) -> dict[str, object]:
    gen = [sys.executable, str(ANCHORS / "imap_load.py"), target, "--user", USER, "--password", PASSWORD]
    results: dict[str, object] = {}
    if populate:
        json_lines(gen + ["--populate", str(populate), "--clients", "0"])
    # 21 fresh sessions rather than the generator's default 5: the median of
    # five swings by a third on this VM, for either server.
    [big] = json_lines(gen + ["--populate", "0", "--clients", "0", "--big-ops", "--big-ops-repeats", "21"])
    results["big"] = big
    for c in clients:
        results[f"c{c}"] = json_lines(gen + ["--populate", "0", "--clients", str(c), "--seconds", str(seconds)])[-1]
    return results


def bench_rookery(populate: int, clients: list[int], seconds: float) -> dict[str, object]:
    with tempfile.TemporaryDirectory(prefix="rookery-bench-") as tmp:
        data = Path(tmp) / "data"
        rookery("domain", "add", "example.com", data=data)
        rookery("account", "add", USER, "--password", PASSWORD, data=data)
        node = NodeProcess(data, ("imap",))
        try:
            return drive(f"127.0.0.1:{node.ports['imap']}", populate, clients, seconds)
        finally:
            node.close()


def bench_dovecot(populate: int, clients: list[int], seconds: float) -> dict[str, object]:
    script = ANCHORS / "dovecot_imap.sh"
    env = dict(os.environ, IMAP_USER=USER, PASSWORD=PASSWORD)
    log = anchor_log("dovecot")
    subprocess.run(["bash", str(script), "setup", str(DOVECOT_PORT)], check=True, stdout=log, stderr=log, env=env, timeout=900)
    try:
        return drive(f"127.0.0.1:{DOVECOT_PORT}", populate, clients, seconds)
    finally:
        subprocess.run(["bash", str(script), "stop"], stdout=log, stderr=log, env=env, timeout=120)


def summary(name: str, res: dict[str, object], clients: list[int]) -> str:
    big = res["big"]
    assert isinstance(big, dict)
    parts = [f"{name}: select={big['select_ms']['median']}ms fetchall={big['fetch_all_flags_ms']['median']}ms"]
    for c in clients:
        run = res[f"c{c}"]
        assert isinstance(run, dict)
        per = run["per_command"]
        p99 = " ".join(f"{SHORT.get(k, k)}={v['p50_ms']}/{v['p99_ms']}" for k, v in per.items())
        parts.append(f"c{c} {run['commands_per_s']} cmd/s err={run['errors']} p50/p99ms[{p99}]")
    return " | ".join(parts)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--populate", type=int, default=10000)
    p.add_argument("--clients", default="1,10,50")
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--anchor", action="store_true", help="also measure Dovecot (needs root; installs it)")
    a = p.parse_args()
    if not (ANCHORS / "imap_load.py").exists():
        print(f"imap bench: anchors not found at {ANCHORS}", file=sys.stderr)
        return 2
    clients = [int(c) for c in a.clients.split(",")]
    line = "imap " + summary("rookery", bench_rookery(a.populate, clients, a.seconds), clients)
    if a.anchor:
        line += " || " + summary("dovecot", bench_dovecot(a.populate, clients, a.seconds), clients)
    print(re.sub(r"\s+", " ", line))
    return 0


if __name__ == "__main__":
    sys.exit(main())
