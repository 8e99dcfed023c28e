"""Real ``rookery serve`` processes: SIGKILL durability, two nodes on one store."""

from __future__ import annotations

import asyncio
import random
import smtplib
import threading
import time
import urllib.request
from pathlib import Path

from helpers import NodeProcess, rookery

from storage import Storage


def body(tag: str) -> bytes:
    return (
        f"From: load@remote.test\r\nTo: alice@example.org\r\nSubject: {tag}\r\nMessage-ID: <{tag}@remote.test>\r\n\r\n"
        + f"payload {tag}\r\n" * 50
    ).encode()


def setup_store(data: Path) -> None:
    rookery("domain", "add", "example.org", data=data)
    rookery("account", "add", "alice@example.org", "--password-stdin", data=data, stdin="pw\n")


async def stored_subjects(data: Path) -> list[bytes]:
    storage = Storage.open("embedded", data_dir=data)
    try:
        account = await storage.directory.get("alice@example.org")
        out = []
        for _, em in await storage.mail.list_messages(account.id, "INBOX"):
            assert em is not None
            out.append(await storage.mail.read_blob(em.digest))
        return out
    finally:
        await storage.close()


def test_sigkill_during_burst_loses_no_acknowledged_mail(tmp_path: Path, node_processes: list[NodeProcess]) -> None:
    data = tmp_path / "data"
    setup_store(data)
    node = NodeProcess(data, ("smtp",))
    node_processes.append(node)
    port = node.ports["smtp"]
    acked: list[str] = []
    lock = threading.Lock()
    stop = threading.Event()

    def sender(worker: int) -> None:
        n = 0
        while not stop.is_set() and n < 400:
            tag = f"w{worker}-{n}"
            n += 1
            try:
                with smtplib.SMTP("127.0.0.1", port, timeout=5) as s:
                    s.sendmail("load@remote.test", ["alice@example.org"], body(tag))
            except (OSError, smtplib.SMTPException):
                return  # the node is gone: this message was never acknowledged
            with lock:
                acked.append(tag)

    threads = [threading.Thread(target=sender, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    time.sleep(random.uniform(0.5, 1.5))
    node.kill()
    stop.set()
    for t in threads:
        t.join(30)
    assert acked, "no message was acknowledged before the kill"

    stored = asyncio.run(stored_subjects(data))
    tags = []
    for raw in stored:
        subject = raw.split(b"Subject: ", 1)[1].split(b"\r\n", 1)[0].decode()
        assert raw.endswith(body(subject)), f"message {subject} is not intact"
        tags.append(subject)
    assert len(tags) == len(set(tags)), "a message was stored twice"
    missing = set(acked) - set(tags)
    assert not missing, f"{len(missing)} acknowledged messages lost: {sorted(missing)[:5]}"

    # The store opens cleanly after the kill and a new node serves it.
    again = NodeProcess(data, ("smtp",))
    node_processes.append(again)
    with smtplib.SMTP("127.0.0.1", again.ports["smtp"], timeout=10) as s:
        s.sendmail("load@remote.test", ["alice@example.org"], body("after-restart"))
    assert len(asyncio.run(stored_subjects(data))) == len(tags) + 1


def test_two_processes_share_one_store(tmp_path: Path, node_processes: list[NodeProcess]) -> None:
    data = tmp_path / "data"
    setup_store(data)
    one = NodeProcess(data, ("smtp", "http"))
    two = NodeProcess(data, ("smtp", "http"))
    node_processes.extend([one, two])
    for i, node in enumerate((one, two, one, two)):
        with smtplib.SMTP("127.0.0.1", node.ports["smtp"], timeout=10) as s:
            s.sendmail("load@remote.test", ["alice@example.org"], body(f"via-{i}"))
    listing = rookery("mail", "list", "alice@example.org", data=data).stdout.splitlines()
    assert [line.split("\t")[0] for line in listing] == ["1", "2", "3", "4"]
    assert [line.split("\t")[4] for line in listing] == ["via-0", "via-1", "via-2", "via-3"]
    # An account added while both run is served by both at once.
    rookery("account", "add", "carol@example.org", "--password", "pw", data=data)
    for node in (one, two):
        with smtplib.SMTP("127.0.0.1", node.ports["smtp"], timeout=10) as s:
            s.sendmail("load@remote.test", ["carol@example.org"], body("to-carol"))
        with urllib.request.urlopen(f"http://127.0.0.1:{node.ports['http']}/healthz/ready", timeout=5) as r:
            assert r.status == 200
    assert len(rookery("mail", "list", "carol@example.org", data=data).stdout.splitlines()) == 2


def test_sigterm_drains_and_exits_cleanly(tmp_path: Path, node_processes: list[NodeProcess]) -> None:
    data = tmp_path / "data"
    setup_store(data)
    node = NodeProcess(data, ("smtp", "http"))
    node_processes.append(node)
    idle = smtplib.SMTP("127.0.0.1", node.ports["smtp"], timeout=10)
    idle.ehlo("idle.test")
    assert node.terminate() == 0
    # The idle session was told why it is closed.
    try:
        code = idle.noop()[0]
    except smtplib.SMTPServerDisconnected:
        code = 421
    finally:
        idle.close()
    assert code == 421
    assert "node stopped" in node.output()
