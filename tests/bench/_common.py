"""Shared by the benchmarks: paths, JSON lines from the anchors' generators."""

from __future__ import annotations

import json
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
