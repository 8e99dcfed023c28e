"""The node keeps its threads on one CPU ([server] cpu), hashing excepted."""

from __future__ import annotations

import imaplib
import os
from pathlib import Path

import pytest

from helpers import NodeProcess, rookery
from server import cpu

ALLOWED = cpu.allowed_cpus()


def thread_cpus(pid: int) -> dict[int, frozenset[int]]:
    """Each thread of ``pid`` and the CPUs it may run on."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            out[int(tid)] = frozenset(os.sched_getaffinity(int(tid)))
        except ProcessLookupError:  # the thread ended meanwhile
            continue
    return out


def test_choose() -> None:
    four = frozenset({0, 1, 2, 3})
    assert cpu.choose("off", four, 7) is None
    assert cpu.choose("auto", four, 7) == 3
    assert cpu.choose("AUTO", four, 8) == 0
    assert cpu.choose("auto", frozenset({5}), 7) is None  # nothing to gain on one CPU
    assert cpu.choose(" 2 ", four, 7) == 2
    with pytest.raises(cpu.CpuSettingError, match="not one this process may use"):
        cpu.choose("9", four, 7)
    with pytest.raises(cpu.CpuSettingError, match="auto, off or a CPU number"):
        cpu.choose("fast", four, 7)


def test_unknown_cpu_is_refused_at_start(tmp_path: Path) -> None:
    result = rookery("serve", "--set", "listen.smtp=127.0.0.1:0", "--set", "server.cpu=4096", data=tmp_path / "data", check=False)
    assert result.returncode == 2
    assert "[server] cpu 4096" in result.stderr


def test_node_threads_share_one_cpu_and_hashing_uses_all(tmp_path: Path) -> None:
    data = tmp_path / "data"
    rookery("domain", "add", "example.org", data=data)
    rookery("account", "add", "alice@example.org", "--password", "secret", data=data)
    node = NodeProcess(data, ("imap",))
    try:
        before = thread_cpus(node.proc.pid)
        # The loop, the store's writer, syncer, checkpointer and readers, the
        # log writer: all on the one CPU the node chose (on a machine of one
        # CPU there is nothing to choose, and nothing is pinned).
        assert len(before) >= 6
        assert len(set(before.values())) == 1
        pinned = next(iter(before.values()))
        if len(ALLOWED) == 1:
            assert pinned == ALLOWED and "threads pinned" not in node.output()
        else:
            [chosen] = pinned
            assert chosen in ALLOWED
            assert f"threads pinned to cpu {chosen} of {len(ALLOWED)}" in node.output()
        imap = imaplib.IMAP4("127.0.0.1", node.ports["imap"])
        imap.login("alice@example.org", "secret")  # argon2 verify, in a hashing thread
        imap.logout()
        after = thread_cpus(node.proc.pid)
        hashing = {t for t in after if t not in before}
        assert hashing, "no hashing thread started"
        assert all(after[t] == ALLOWED for t in hashing)
        assert all(after[t] == pinned for t in before if t in after)
    finally:
        node.close()


def test_cpu_off_leaves_threads_alone(tmp_path: Path) -> None:
    node = NodeProcess(tmp_path / "data", ("smtp",), env={"ROOKERY_SERVER_CPU": "off"})
    try:
        assert set(thread_cpus(node.proc.pid).values()) == {ALLOWED}
        assert "threads pinned" not in node.output()
    finally:
        node.close()
