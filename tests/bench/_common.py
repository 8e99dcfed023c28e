"""Shared by the benchmarks: paths, JSON lines from the anchors' generators."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ANCHORS = ROOT.parent / "shared" / "anchors"
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]


def json_lines(cmd: list[str], timeout: float = 1800) -> list[dict[str, object]]:
    """Run a load generator; return the JSON objects it printed, one per line."""
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    lines = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    if not lines:
        raise RuntimeError(f"{' '.join(cmd[:3])} failed: {out.stderr[-2000:] or out.stdout[-2000:]}")
    return lines


def anchor_log(name: str):  # noqa: ANN201 - a file object
    """Where an anchor script's own output goes. Not a pipe: the daemons it
    starts inherit the descriptors and would keep a pipe open forever."""
    return open(Path(tempfile.gettempdir()) / f"rookery-anchor-{name}.log", "ab")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of one process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def idle_jiffies() -> tuple[int, int]:
    """The machine's idle and total CPU jiffies so far (Linux /proc/stat)."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return values[3] + values[4], sum(values)


def with_children(pids: list[int]) -> list[int]:
    """``pids`` and their child processes (a node's parser workers)."""
    out = list(pids)
    for pid in pids:
        for task in Path(f"/proc/{pid}/task").iterdir():
            try:
                out += [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                continue
    return out


class Usage:
    """CPU processes spent, their children (a node's parser workers) with them,
    and the machine's idle share, over a stretch of time: a figure that falls
    short is CPU-bound only if the machine had none left."""

    def __init__(self, pids: list[int]) -> None:
        self.pids = pids
        self.cpu0 = {p: cpu_seconds(p) for p in with_children(pids)}
        self.idle0, self.total0 = idle_jiffies()

    def stop(self, units: int) -> tuple[float, float]:
        """(CPU ms per unit of work, idle share of the machine 0..1)."""
        cpu = 0.0
        for pid in with_children(self.pids):
            try:
                cpu += cpu_seconds(pid) - self.cpu0.get(pid, 0.0)
            except OSError:  # ended meanwhile
                continue
        idle, total = idle_jiffies()
        return 1000 * cpu / max(units, 1), (idle - self.idle0) / max(total - self.total0, 1)
