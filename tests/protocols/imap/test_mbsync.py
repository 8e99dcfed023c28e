"""A real client: mbsync (Debian's isync) syncs Rookery with a local Maildir
both ways: new messages, flag changes and deletions."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from pathlib import Path

from helpers import make_account, node_config, running_node

from server.node import ServerState

MBSYNC = shutil.which("mbsync")


def message(n: int) -> bytes:
    return f"From: sender{n}@remote.test\r\nTo: alice@example.org\r\nSubject: sync {n}\r\nMessage-ID: <sync{n}@remote.test>\r\n\r\nbody {n}\r\n".encode()


def write_config(path: Path, port: int, maildir: Path) -> None:
    path.write_text(
        f"""IMAPAccount rookery
Host 127.0.0.1
Port {port}
User alice@example.org
Pass secret
SSLType None
AuthMechs LOGIN

IMAPStore remote
Account rookery

MaildirStore local
Path {maildir}/
Inbox {maildir}/INBOX
SubFolders Verbatim

Channel sync
Far :remote:
Near :local:
Patterns INBOX Archive
Create Both
Expunge Both
SyncState *
"""
    )


def mbsync(config: Path) -> None:
    assert MBSYNC is not None, "mbsync (Debian package isync) is not installed; `make test` installs it"
    result = subprocess.run([MBSYNC, "-c", str(config), "-a"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def local_messages(maildir: Path, box: str = "INBOX") -> dict[str, tuple[Path, str]]:
    """Subject -> (file, maildir flags)."""
    out = {}
    for sub in ("new", "cur"):
        for f in (maildir / box / sub).glob("*"):
            # mbsync stores Maildir files with LF line ends.
            lines = f.read_bytes().replace(b"\r\n", b"\n").split(b"\n")
            subject = next(line for line in lines if line.startswith(b"Subject: "))
            flags = f.name.rpartition(":2,")[2] if ":2," in f.name else ""
            out[subject[9:].decode()] = (f, flags)
    return out


async def server_messages(state: ServerState, box: str = "INBOX") -> dict[str, tuple[str, ...]]:
    from storage import mime

    acct = (await state.storage.directory.get("alice@example.org")).id
    out = {}
    for msg, email in await state.storage.mail.list_messages(acct, box):
        assert email is not None and email.structure is not None
        out[mime.decode_words(email.structure.envelope.subject or "")] = msg.flags
    return out


async def test_mbsync_two_way_sync(tmp_path: Path) -> None:
    async with running_node(node_config(tmp_path / "data", ("smtp", "imap"))) as state:
        acct = await make_account(state.storage, "alice@example.org", "secret")
        for n in range(1, 5):
            await state.storage.mail.deliver([acct], message(n))
        await state.storage.mail.append(acct, "Archive", message(100))
        maildir = tmp_path / "Maildir"
        maildir.mkdir()
        config = tmp_path / "mbsyncrc"
        write_config(config, state.ports["imap"], maildir)

        await asyncio.to_thread(mbsync, config)
        local = local_messages(maildir)
        assert sorted(local) == ["sync 1", "sync 2", "sync 3", "sync 4"]
        assert list(local_messages(maildir, "Archive")) == ["sync 100"]

        # Local changes: read one, delete one, add one.
        f, _ = local["sync 1"]
        cur = maildir / "INBOX" / "cur"
        f.rename(cur / (f.name.partition(":2,")[0] + ":2,S"))
        local["sync 2"][0].unlink()
        (maildir / "INBOX" / "new" / "1700000000.local.host").write_bytes(message(5))
        await asyncio.to_thread(mbsync, config)
        remote = await server_messages(state)
        assert sorted(remote) == ["sync 1", "sync 3", "sync 4", "sync 5"]
        assert "\\Seen" in remote["sync 1"]

        # Server changes: flag one (as another client would), expunge one, deliver one.
        box = await state.storage.mail.mailbox(acct, "INBOX")
        uids = {s: m.uid for m, e in await state.storage.mail.list_messages(acct, "INBOX")
                for s in [(e.structure.envelope.subject if e and e.structure else "")]}
        await state.storage.mail.store_flags(acct, box.id, [uids["sync 3"]], "add", ["\\Flagged"])
        await state.storage.mail.store_flags(acct, box.id, [uids["sync 4"]], "add", ["\\Deleted"])
        await state.storage.mail.expunge(acct, box.id)
        await state.storage.mail.deliver([acct], message(6))
        await asyncio.to_thread(mbsync, config)
        local = local_messages(maildir)
        assert sorted(local) == ["sync 1", "sync 3", "sync 5", "sync 6"]
        assert "F" in local["sync 3"][1] and "S" in local["sync 1"][1]

        # A second run with nothing changed changes nothing.
        await asyncio.to_thread(mbsync, config)
        assert sorted(local_messages(maildir)) == ["sync 1", "sync 3", "sync 5", "sync 6"]
        assert sorted(await server_messages(state)) == ["sync 1", "sync 3", "sync 5", "sync 6"]
