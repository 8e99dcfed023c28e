"""The admin CLI as a real process against a store on disk."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from helpers import ROOT, rookery


def test_domain_account_alias_lifecycle(tmp_path: Path) -> None:
    data = tmp_path / "data"
    assert rookery("domain", "add", "Example.ORG", data=data).stdout.strip() == "added domain example.org"
    assert rookery("domain", "list", data=data).stdout.split() == ["example.org"]
    rookery("account", "add", "alice@example.org", "--password-stdin", data=data, stdin="s3cret\n")
    rookery("account", "add", "bob@example.org", "--password", "pw", "--quota", "1M", data=data)
    listing = rookery("account", "list", data=data).stdout
    assert "alice@example.org\tmessages=0" in listing and "quota=1048576" in listing
    rookery("alias", "add", "info@example.org", "alice@example.org", data=data)
    rookery("alias", "add", "@example.org", "bob@example.org", data=data)
    aliases = rookery("alias", "list", data=data).stdout
    assert "info@example.org\talice@example.org" in aliases and "@example.org\tbob@example.org" in aliases
    rookery("account", "passwd", "alice@example.org", "--password-stdin", data=data, stdin="new\n")
    rookery("alias", "remove", "info@example.org", data=data)
    rookery("alias", "remove", "@example.org", data=data)
    rookery("account", "remove", "bob@example.org", data=data)
    assert "bob@" not in rookery("account", "list", data=data).stdout
    assert rookery("mail", "list", "alice@example.org", data=data).stdout == ""


def test_a_catch_all_is_added_once_removed_once_and_holds_its_domain(tmp_path: Path) -> None:
    data = tmp_path / "data"
    for domain in ("example.org", "old.test"):
        rookery("domain", "add", domain, data=data)
    rookery("account", "add", "alice@example.org", "--password", "pw", data=data)
    rookery("account", "add", "bob@example.org", "--password", "pw", data=data)
    rookery("alias", "add", "@old.test", "alice@example.org", data=data)

    def refused(*args: str, message: str) -> None:
        result = rookery(*args, data=data, check=False)
        assert result.returncode == 1, (args, result.stdout, result.stderr)
        assert message in result.stderr and "Traceback" not in result.stderr, (args, result.stderr)
        assert result.stdout == "", (args, result.stdout)

    # As with an alias that exists: no silent replacement.
    refused("alias", "add", "@old.test", "bob@example.org",
            message="catch-all @old.test already exists (to alice@example.org); remove it first")
    assert "@old.test\talice@example.org" in rookery("alias", "list", data=data).stdout
    # The catch-all (to an account of another domain) holds its domain like an alias would.
    refused("domain", "remove", "old.test", message="domain old.test still has a catch-all; remove it first")
    assert "old.test" in rookery("domain", "list", data=data).stdout.split()

    assert rookery("alias", "remove", "@old.test", data=data).stdout.strip() == "removed alias @old.test"
    refused("alias", "remove", "@old.test", message="no catch-all @old.test")
    refused("alias", "remove", "@nowhere.test", message="domain nowhere.test is not hosted here")
    rookery("alias", "add", "@old.test", "bob@example.org", data=data)
    assert "@old.test\tbob@example.org" in rookery("alias", "list", data=data).stdout
    rookery("alias", "remove", "@old.test", data=data)
    assert rookery("domain", "remove", "old.test", data=data).stdout.strip() == "removed domain old.test"
    assert rookery("domain", "list", data=data).stdout.split() == ["example.org"]


def test_account_remove_frees_the_blobs_only_it_referenced_after_the_grace_period(tmp_path: Path) -> None:
    from storage import Storage, blobs, keys

    data = tmp_path / "data"
    rookery("domain", "add", "example.org", data=data)
    for user in ("alice", "bob"):
        rookery("account", "add", f"{user}@example.org", "--password", "pw", data=data)
    own = b"Subject: only alice\r\n\r\nmine\r\n"
    big = b"Subject: big, only alice\r\n\r\n" + b"y" * (blobs.INLINE_MAX + 2 * blobs.CHUNK_SIZE)  # chunked
    shared = b"Subject: both\r\n\r\nours\r\n"

    async def setup() -> None:
        s = Storage.open("embedded", data_dir=data)
        try:
            alice, bob = [(await s.directory.get(f"{u}@example.org")).id for u in ("alice", "bob")]
            for raw in (own, big, shared):
                await s.mail.append(alice, "INBOX", raw)
            await s.mail.append(bob, "Archive", shared)
        finally:
            await s.close()

    async def state(now: float | None) -> dict[str, Any]:
        s = Storage.open("embedded", data_dir=data)
        try:
            if now is not None:
                await s.mail.purge(now=now)

            def read(tr: Any) -> dict[str, Any]:
                return {
                    name: (blobs.exists(tr, blobs.digest_of(raw)),
                           len(tr.get_range(*keys.blob_chunks(blobs.digest_of(raw)))))
                    for name, raw in (("own", own), ("big", big), ("shared", shared))
                }

            found = await s.db.read(read)
            bob = (await s.directory.get("bob@example.org")).id
            found["bob"] = [await s.mail.read_blob(e.digest) for _, e in await s.mail.list_messages(bob, "Archive") if e]
            return found
        finally:
            await s.close()

    asyncio.run(setup())
    before = asyncio.run(state(None))
    assert before["own"][0] and before["shared"][0] and before["big"][0] and before["big"][1] > 1
    assert rookery("account", "remove", "alice@example.org", data=data).stdout.strip() == "removed account alice@example.org"
    # Within the grace period a purge takes nothing.
    assert asyncio.run(state(time.time())) == before
    after = asyncio.run(state(time.time() + blobs.GRACE_SECONDS + 60))
    assert after["own"] == (False, 0) and after["big"] == (False, 0)
    assert after["shared"] == before["shared"] and after["bob"] == [shared]


def test_bad_input_gives_clear_errors_and_nonzero_exit(tmp_path: Path) -> None:
    data = tmp_path / "data"
    rookery("domain", "add", "example.org", data=data)
    rookery("account", "add", "alice@example.org", "--password", "pw", data=data)
    cases = [
        (("domain", "add", "example.org"), "already exists"),
        (("domain", "add", "not a domain"), "invalid domain"),
        (("account", "add", "carol@unknown.test", "--password", "pw"), "not hosted"),
        (("account", "add", "alice@example.org", "--password", "pw"), "already exists"),
        (("account", "add", "no-at-sign", "--password", "pw"), "invalid address"),
        (("account", "add", "dave@example.org", "--password", ""), "password must not be empty"),
        (("account", "passwd", "ghost@example.org", "--password", "x"), "no account"),
        (("alias", "add", "x@example.org", "ghost@example.org"), "no account"),
        (("domain", "remove", "example.org"), "still has accounts"),
        (("mail", "list", "alice@example.org", "--mailbox", "Nope"), "does not exist"),
        (("account", "add", "erin@example.org", "--password", "pw", "--quota", "1Q"), "not a size"),
        (("--set", "store.backend=bogus", "domain", "list"), "unknown store backend"),
    ]
    for args, message in cases:
        result = rookery(*args, data=data, check=False)
        assert result.returncode == 1, (args, result.stdout, result.stderr)
        assert message in result.stderr, (args, result.stderr)
        assert "Traceback" not in result.stderr, (args, result.stderr)
    (tmp_path / "file").write_text("")  # a data directory that cannot be made
    unwritable = rookery("domain", "list", data=tmp_path / "file" / "data", check=False)
    assert unwritable.returncode == 1 and "Traceback" not in unwritable.stderr, unwritable.stderr
    usage = rookery("account", "frobnicate", data=data, check=False)
    assert usage.returncode == 2


def test_mail_list_prints_uid_flags_size_date_and_decoded_subject_page_by_page(tmp_path: Path) -> None:
    from storage import Storage

    data = tmp_path / "data"
    rookery("domain", "add", "example.org", data=data)
    rookery("account", "add", "alice@example.org", "--password", "pw", data=data)
    messages = [
        (b"Subject: plain\r\n\r\nx\r\n", ("\\Seen",), 1700000000),
        (b"Subject: =?utf-8?q?Caf=C3=A9_au_lait?=\r\n\r\nxy\r\n", ("\\Flagged", "\\Seen"), 1700000061),
        (b"Subject: =?ISO-8859-1?Q?Gr=FC=DFe?= =?ISO-8859-1?Q?_aus?= Wien\r\n\r\n\r\n", (), 1600000000),
        (b"From: a@b.test\r\n\r\nno subject\r\n", ("$Label1",), 1700003600),
        (b"Subject: tab\there\r\n\r\nz\r\n", ("\\Answered",), 1700086400),
    ]

    async def fill() -> None:
        s = Storage.open("embedded", data_dir=data)
        try:
            acct = (await s.directory.get("alice@example.org")).id
            for raw, flags, when in messages:
                await s.mail.append(acct, "INBOX", raw, flags, when)
        finally:
            await s.close()

    asyncio.run(fill())
    expected = [
        f"1\t\\Seen\t{len(messages[0][0])}\t2023-11-14 22:13:20\tplain",
        f"2\t\\Flagged \\Seen\t{len(messages[1][0])}\t2023-11-14 22:14:21\tCafé au lait",
        f"3\t-\t{len(messages[2][0])}\t2020-09-13 12:26:40\tGrüße aus Wien",
        f"4\t$Label1\t{len(messages[3][0])}\t2023-11-14 23:13:20\t",
        f"5\t\\Answered\t{len(messages[4][0])}\t2023-11-15 22:13:20\ttab here",
    ]
    for page in ("1", "2", "5", "500"):
        listing = rookery("mail", "list", "alice@example.org", "--page", page, data=data).stdout
        assert listing.split("\n") == expected + [""], (page, listing)
    assert rookery("mail", "list", "alice@example.org", data=data).stdout.split("\n") == expected + [""]
    bad = rookery("mail", "list", "alice@example.org", "--page", "0", data=data, check=False)
    assert bad.returncode == 2 and "must be at least 1" in bad.stderr


def test_help_and_config_listing() -> None:
    assert "serve" in rookery("--help").stdout
    assert "ROOKERY_LISTEN_SMTP" in rookery("config").stdout


def _queue_some(data: Path) -> tuple[str, str]:
    """Two queued messages in the store under ``data``: one for a.test due
    in an hour, one for b.test due now. Returns their queue ids."""
    from storage import Storage
    from storage.queue import Queue

    async def fill() -> tuple[str, str]:
        s = Storage.open("embedded", data_dir=data)
        try:
            queue = Queue(s.db)
            later = await queue.enqueue("alice@example.org", ["x@a.test"], b"Subject: a\r\n\r\nx\r\n",
                                        now=time.time() + 3600)
            now = await queue.enqueue("alice@example.org", ["y@b.test", "z@b.test"], b"Subject: b\r\n\r\ny\r\n")
            return later.qid, now.qid
        finally:
            await s.close()

    return asyncio.run(fill())


@pytest.mark.parametrize("form", ["environment", "--set"])
async def test_queue_flush_follows_routes_and_throttles_given_outside_the_file(tmp_path: Path, form: str) -> None:
    """[routes] and [throttle] set by ROOKERY_ROUTES / ROOKERY_THROTTLE, or by
    --set entries, steer a real delivery: a.test through its own route and
    held to one message an hour, b.test through the "*" route."""
    from aiosmtpd.smtp import SMTP as SinkSMTP

    from storage import Storage
    from storage.queue import Queue

    data = tmp_path / "data"
    s = Storage.open("embedded", data_dir=data)
    try:
        queue = Queue(s.db)
        for rcpt in ("x@a.test", "y@a.test", "z@b.test"):
            await queue.enqueue("alice@example.org", [rcpt], f"Subject: to {rcpt}\r\n\r\nhi\r\n".encode())
    finally:
        await s.close()

    got: dict[str, list[str]] = {"a": [], "star": []}

    class Handler:
        def __init__(self, name: str) -> None:
            self.name = name

        async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
            got[self.name].extend(envelope.rcpt_tos)
            return "250 2.0.0 OK"

    loop = asyncio.get_running_loop()
    a_server = await loop.create_server(lambda: SinkSMTP(Handler("a")), "127.0.0.1", 0)
    star_server = await loop.create_server(lambda: SinkSMTP(Handler("star")), "127.0.0.1", 0)
    a_port, star_port = (srv.sockets[0].getsockname()[1] for srv in (a_server, star_server))
    try:
        env: dict[str, str] = {}
        args: list[str] = []
        if form == "environment":
            env["ROOKERY_ROUTES"] = json.dumps({"a.test": f"127.0.0.1:{a_port}", "*": {"host": f"127.0.0.1:{star_port}"}})
            env["ROOKERY_THROTTLE"] = '{"a.test": {"per_hour": 1}}'
        else:
            args += ["--set", f"routes.a.test=127.0.0.1:{a_port}", "--set", f'routes.*={{"host": "127.0.0.1", "port": {star_port}}}',
                     "--set", 'throttle.a.test={"connections": 1, "per_hour": 1}']
        flushed = await asyncio.to_thread(rookery, "queue", "flush", *args, data=data, env=env)
        assert flushed.stdout.strip() == "3 message(s) handled", flushed.stdout
    finally:
        for srv in (a_server, star_server):
            srv.close()
            await srv.wait_closed()
    assert len(got["a"]) == 1 and got["a"][0] in ("x@a.test", "y@a.test"), got
    assert got["star"] == ["z@b.test"], got
    left = (await asyncio.to_thread(rookery, "queue", "list", data=data)).stdout
    assert "-- 1 message(s)" in left and "a.test" in left, left


def test_bad_config_from_environment_or_set_exits_2_with_the_reason(tmp_path: Path) -> None:
    cases = [
        ({"ROOKERY_LISTEN_SMPT": "127.0.0.1:25"}, (), "$ROOKERY_LISTEN_SMPT: unknown option [listen] (did you mean $ROOKERY_LISTEN_SMTP?)"),
        ({"ROOKERY_THROTTLE": "gmail.com=2"}, (), "bad [throttle] table"),
        ({}, ("--set", "throttle.gmail.com=2"), "bad [throttle] table"),
        ({"ROOKERY_CLUSTER_PEERS": '["a:1"'}, (), "$ROOKERY_CLUSTER_PEERS: bad value"),
    ]
    for env, args, message in cases:
        result = rookery(*args, "domain", "list", data=tmp_path / "data", env=env, check=False)
        assert result.returncode == 2, (env, args, result.stderr)
        assert message in result.stderr and "Traceback" not in result.stderr, (env, args, result.stderr)
    ok = rookery("domain", "list", data=tmp_path / "data", env={"ROOKERY_CLUSTER_PEERS": '["a:1", "b:2"]',
                                                                  "ROOKERY_FDB_CLUSTER_FILE": "/nowhere"})
    assert ok.returncode == 0


def _next_attempt(data: Path, qid: str) -> float:
    from storage import Storage
    from storage.queue import Queue

    async def read() -> float:
        s = Storage.open("embedded", data_dir=data)
        try:
            return (await Queue(s.db).show(qid)).next_attempt
        finally:
            await s.close()

    return asyncio.run(read())


def test_queue_list_show_retry_delete(tmp_path: Path) -> None:
    data = tmp_path / "data"
    rookery("domain", "add", "example.org", data=data)
    a, b = _queue_some(data)
    listing = rookery("queue", "list", data=data).stdout
    assert a in listing and b in listing and "-- 2 message(s)" in listing
    only_b = rookery("queue", "list", "--domain", "B.test", data=data).stdout
    assert b in only_b and a not in only_b and "y@b.test" in only_b and "-- 1 message(s)" in only_b

    shown = rookery("queue", "show", a, data=data).stdout
    assert f"id:        {a}" in shown and "sender:    <alice@example.org>" in shown
    assert "pending   x@a.test" in shown and "attempts:  0" in shown
    missing = rookery("queue", "show", "00000000000000FF", data=data, check=False)
    assert missing.returncode == 1 and "no queued message" in missing.stderr

    assert _next_attempt(data, a) > time.time() + 3000
    assert rookery("queue", "retry", a, data=data).stdout.strip() == "1 message(s) due now"
    assert _next_attempt(data, a) <= time.time()
    assert rookery("queue", "retry", "--all", data=data).stdout.strip() == "2 message(s) due now"
    usage = rookery("queue", "retry", data=data, check=False)
    assert usage.returncode == 2 and "needs an ID or --all" in usage.stderr

    assert rookery("queue", "delete", a, data=data).stdout.strip() == f"deleted {a}"
    listing = rookery("queue", "list", data=data).stdout
    assert a not in listing and b in listing and "-- 1 message(s)" in listing
    again = rookery("queue", "delete", a, data=data, check=False)
    assert again.returncode == 1 and "no queued message" in again.stderr


def test_dkim_generate_prints_the_record_and_stores_the_key(tmp_path: Path) -> None:
    data = tmp_path / "data"
    rookery("domain", "add", "example.org", data=data)
    record = rookery("dkim", "generate", "example.org", "--selector", "s1", data=data).stdout.strip()
    assert record.startswith("s1._domainkey.example.org. IN TXT (") and "v=DKIM1" in record and "p=" in record
    # Stored: `dkim show` derives the same record from the key in the store.
    assert rookery("dkim", "show", "example.org", data=data).stdout.strip() == record
    again = rookery("dkim", "generate", "example.org", data=data, check=False)
    assert again.returncode == 1 and "already has a DKIM key" in again.stderr
    replaced = rookery("dkim", "generate", "example.org", "--replace", data=data).stdout.strip()
    assert replaced != record and rookery("dkim", "show", "example.org", data=data).stdout.strip() == replaced
    unknown = rookery("dkim", "generate", "other.test", data=data, check=False)
    assert unknown.returncode == 1 and "not hosted" in unknown.stderr


def test_serve_banner_commands_work_as_printed(tmp_path: Path) -> None:
    """What `rookery serve` prints once ready is what a newcomer runs: the
    printed CLI lines add an account, the printed Python lines send a message
    and read it over IMAP, with the ports really bound (the config says 0)."""
    config = tmp_path / "node.toml"
    config.write_text(
        f'[server]\ndata_dir = "{tmp_path / "data"}"\nhostname = "localhost"\n'
        '[listen]\nsmtp = "127.0.0.1:0"\nimap = "127.0.0.1:0"\n'
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "server.cli", "serve", "--config", str(config)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )
    try:
        assert proc.stdout is not None
        banner = []
        for line in proc.stdout:
            banner.append(line.strip())
            if line.startswith("Or list it:"):
                break
        assert not any(line.endswith(":0") for line in banner), banner
        for line in banner:
            if line.startswith(".venv/bin/rookery ") or line.startswith("echo secret | .venv/bin/rookery "):
                command = line.replace(".venv/bin/rookery", f"{sys.executable} -m server.cli")
                subprocess.run(command, shell=True, cwd=ROOT, check=True, capture_output=True, timeout=60)
        python_lines = [line for line in banner if line.startswith("python3 -c ")]
        assert len(python_lines) == 2
        for line in python_lines:
            out = subprocess.run(line.replace("python3", sys.executable, 1), shell=True, capture_output=True,
                                 text=True, timeout=60, check=True)
        assert "Subject: hi" in out.stdout
    finally:
        proc.terminate()
        proc.communicate(timeout=30)
