"""Ingest parsing in worker processes (storage/parsing.py): the same answers
as parsing in the node, in order, and no message lost when a worker dies."""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import signal
import smtplib
import time
import urllib.request
from pathlib import Path

import pytest
from helpers import NodeProcess, make_account, rookery

from server import cpu
from storage import Storage, mail, mime, parsing

MESSAGES = [
    b"From: a@b.test\r\nSubject: hi\r\nMessage-ID: <root@b.test>\r\n\r\nhello\r\n",
    b"From: c@b.test\r\nSubject: Re: hi\r\nIn-Reply-To: <root@b.test>\r\nReferences: <x@y> <root@b.test>\r\n\r\nyes\r\n",
    b"",
    b"\xff\xfe\x00garbage without any header at all\r\n",
    b"Content-Type: multipart/mixed; boundary=zz\r\n\r\n--zz\r\nContent-Type: text/plain\r\n\r\none\r\n--zz\r\n"
    b"Content-Type: application/octet-stream\r\nContent-Transfer-Encoding: base64\r\n\r\nAAAA\r\n--zz--\r\n",
    b"Content-Type: multipart/mixed; boundary=never-closed\r\n\r\n--never-closed\r\nbroken",
    b"Subject: =?utf-8?q?caf=C3=A9?=\r\nFrom: \xc3\xa9 <e@x.test>\r\n\r\n" + b"8bit \xe9\xe8 body\r\n" * 1000,
]


def worker_cpus(pool: parsing.ParserPool) -> list[frozenset[int]]:
    return [frozenset(os.sched_getaffinity(pid)) for pid in pool.pids()]


async def test_answers_equal_parsing_here_whatever_the_input_and_in_order() -> None:
    pool = parsing.ParserPool(2)
    try:
        await pool.start()
        assert len(pool.pids()) == 2
        many = [m + b"%d" % i for i in range(50) for m in MESSAGES]
        answers = await asyncio.gather(*(pool.parse(m) for m in many))
        for raw, answer in zip(many, answers):
            assert answer == parsing.parse_here(raw)
            assert answer.digest == hashlib.sha256(raw).digest()
            assert mime.decode(answer.structure) == mime.parse(raw)
        big = MESSAGES[4] * 20000  # ~3 MB, larger than a pipe holds
        assert await pool.parse(big) == parsing.parse_here(big)
        assert pool.started == 2
    finally:
        await pool.close()


async def test_a_dead_worker_fails_what_it_held_and_the_next_message_starts_another() -> None:
    pool = parsing.ParserPool(1)
    try:
        await pool.start()
        [pid] = pool.pids()
        os.kill(pid, signal.SIGSTOP)  # it holds what is sent from now on
        held = [asyncio.ensure_future(pool.parse(m)) for m in MESSAGES]
        await asyncio.sleep(0.05)
        assert not any(f.done() for f in held)
        os.kill(pid, signal.SIGKILL)
        for future in held:
            with pytest.raises(parsing.WorkerFailed, match="exited"):
                await asyncio.wait_for(future, 10)
        assert pool.failures == len(held)
        assert await pool.parse(MESSAGES[0]) == parsing.parse_here(MESSAGES[0])
        assert pool.started == 2 and pool.pids() != [pid]
    finally:
        await pool.close()
    assert pool.pids() == []
    with pytest.raises(parsing.WorkerFailed, match="closed"):
        await pool.parse(MESSAGES[0])


async def test_a_hung_worker_is_stopped_and_replaced(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(parsing, "TIMEOUT", 0.3)
    monkeypatch.setattr(parsing, "WATCHDOG_INTERVAL", 0.1)
    pool = parsing.ParserPool(1)
    try:
        await pool.start()
        [pid] = pool.pids()
        os.kill(pid, signal.SIGSTOP)
        with pytest.raises(parsing.WorkerFailed, match="timed out"):
            await pool.parse(MESSAGES[0])
        assert gone(pid)
        monkeypatch.setattr(parsing, "TIMEOUT", 30.0)  # a new worker takes longer than 0.3 s to start
        assert await pool.parse(MESSAGES[1]) == parsing.parse_here(MESSAGES[1])
        assert pool.started == 2
    finally:
        await pool.close()


async def test_a_worker_that_cannot_start_leaves_parsing_to_the_node(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(parsing.ParserPool, "_command", lambda self: [str(tmp_path / "no-such-python")])
    pool = parsing.ParserPool(1)
    await pool.start()  # logged, not raised: the node still starts
    with pytest.raises(parsing.WorkerFailed, match="cannot start"):
        await pool.parse(MESSAGES[0])
    await pool.close()


async def test_closing_while_a_worker_starts_stops_that_one_too() -> None:
    pool = parsing.ParserPool(1)
    first = asyncio.ensure_future(pool.parse(MESSAGES[0]))  # starts the worker
    await asyncio.sleep(0)
    first.cancel()  # the session that wanted it went away before it started
    await pool.close()
    assert pool.started == 1
    assert not [p for p in children(os.getpid()) if b"storage.parsing" in Path(f"/proc/{p}/cmdline").read_bytes()]


async def test_workers_run_on_the_cpus_given() -> None:
    allowed = cpu.allowed_cpus()
    one = frozenset({min(allowed)})
    pool = parsing.ParserPool(1, one)
    try:
        await pool.start()
        await pool.parse(MESSAGES[0])  # the worker has set its CPUs by the time it answers
        assert worker_cpus(pool) == [one]
    finally:
        await pool.close()


def test_parse_workers_setting() -> None:
    two, four = frozenset({0, 1}), frozenset({0, 1, 2, 3})
    assert cpu.parse_workers("auto", two, 1) == (1, frozenset({0}))
    assert cpu.parse_workers("auto", four, 2) == (3, frozenset({0, 1, 3}))
    assert cpu.parse_workers("auto", frozenset(range(64)), None) == (cpu.MAX_AUTO_PARSE_WORKERS, None)
    assert cpu.parse_workers("auto", frozenset({5}), None) == (0, None)  # one CPU: parse in the node
    assert cpu.parse_workers(" 2 ", frozenset({5}), 5) == (2, frozenset({5}))
    assert cpu.parse_workers("0", four, None) == (0, None)
    with pytest.raises(cpu.CpuSettingError, match="auto, 0 or a number"):
        cpu.parse_workers("many", four, None)
    with pytest.raises(cpu.CpuSettingError, match="negative"):
        cpu.parse_workers("-1", four, None)


def test_a_bad_parse_workers_setting_is_refused_at_start(tmp_path: Path) -> None:
    result = rookery("serve", "--set", "listen.smtp=127.0.0.1:0", "--set", "server.parse_workers=lots", data=tmp_path / "data", check=False)
    assert result.returncode == 2
    assert "[server] parse_workers" in result.stderr


async def test_mail_is_stored_the_same_with_workers_without_them_and_when_they_die(tmp_path: Path) -> None:
    store = Storage.open("embedded", data_dir=tmp_path / "s")
    try:
        acct = await make_account(store)
        await store.mail.deliver([acct], MESSAGES[0])  # parsed in the node
        store.mail.parser = pool = parsing.ParserPool(1)
        await pool.start()
        await store.mail.deliver([acct], MESSAGES[1])  # in the worker
        [pid] = pool.pids()
        os.kill(pid, signal.SIGSTOP)
        late = asyncio.ensure_future(store.mail.append(acct, "INBOX", MESSAGES[4]))
        await asyncio.sleep(0.05)
        os.kill(pid, signal.SIGKILL)
        await asyncio.wait_for(late, 10)  # parsed in the node after all
        await pool.close()
        await store.mail.deliver([acct], MESSAGES[6])  # a closed pool: in the node
        box = await store.db.read(lambda tr: mail.find_mailbox(tr, acct, "INBOX"))
        snap = await store.db.read(lambda tr: mail.snapshot(tr, acct, box.id))
        emails = await store.db.read(lambda tr: mail.get_emails(tr, acct, [m.email_id for m in snap.messages]))
        stored = [MESSAGES[0], MESSAGES[1], MESSAGES[4], MESSAGES[6]]
        assert [mime.decode(e.encoded) for e in emails] == [mime.parse(raw) for raw in stored]
        assert [e.digest for e in emails] == [hashlib.sha256(raw).digest() for raw in stored]
        # The reply joined its parent's thread, parsed in a worker or not.
        assert emails[0].thread_id == emails[1].thread_id != emails[2].thread_id
    finally:
        await store.close()


def metrics(node: NodeProcess) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{node.ports['http']}/metrics", timeout=10).read().decode()
    return {name: float(value) for name, value in re.findall(r"^(rookery_parser_\w+) (\S+)$", text, re.M)}


def children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(p) for p in f.read().split()]


def test_a_node_keeps_taking_mail_when_its_parser_worker_is_killed(tmp_path: Path) -> None:
    data = tmp_path / "data"
    rookery("domain", "add", "example.org", data=data)
    rookery("account", "add", "alice@example.org", "--password", "secret", data=data)
    node = NodeProcess(data, ("smtp", "http"), env={"ROOKERY_SERVER_PARSE_WORKERS": "1"})
    try:
        [worker] = children(node.proc.pid)
        assert metrics(node)["rookery_parser_workers"] == 1
        with smtplib.SMTP("127.0.0.1", node.ports["smtp"]) as smtp:
            smtp.sendmail("bob@example.net", ["alice@example.org"], b"Subject: one\r\n\r\nfirst\r\n")
            if len(cpu.allowed_cpus()) > 1:  # beside the CPU the node's threads took
                assert os.sched_getaffinity(worker) == cpu.allowed_cpus() - os.sched_getaffinity(node.proc.pid)
            os.kill(worker, signal.SIGKILL)
            smtp.sendmail("bob@example.net", ["alice@example.org"], b"Subject: two\r\n\r\nsecond\r\n")
            deadline = time.monotonic() + 10
            while worker in children(node.proc.pid) and time.monotonic() < deadline:
                time.sleep(0.02)  # until the node has seen it go
            smtp.sendmail("bob@example.net", ["alice@example.org"], b"Subject: three\r\n\r\nthird\r\n")
        [replacement] = children(node.proc.pid)
        assert replacement != worker
        seen = metrics(node)
        assert seen["rookery_parser_workers"] == 1 and seen["rookery_parser_workers_started_total"] == 2
        # "two" reached the dead worker (parsed in the node) or a new one.
        assert seen["rookery_parser_failures_total"] in (0, 1)
        listing = rookery("mail", "list", "alice@example.org", data=data).stdout
        assert all(subject in listing for subject in ("one", "two", "three"))
        assert node.terminate() == 0
    finally:
        node.close()
    assert gone(replacement)  # the node's pipe closed: the worker ended with it


def gone(pid: int) -> bool:
    deadline = time.monotonic() + 10
    while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
        time.sleep(0.02)
    return not os.path.exists(f"/proc/{pid}")
