"""Structured log lines: fields as key=value or JSON, the peer on protocol lines."""

from __future__ import annotations

import io
import json
import logging
import sys
import threading
from collections.abc import Callable, Iterator

import pytest

from server import logs
from server.logs import JsonFormatter, PeerFromArgs, TextFormatter


def record(msg: str, *args: object, logger: str = "mail.log", **extra: object) -> logging.LogRecord:
    rec = logging.LogRecord(logger, logging.WARNING, __file__, 1, msg, args, None)
    rec.__dict__.update(extra)
    PeerFromArgs().filter(rec)
    return rec


def test_aiosmtpd_lines_get_the_peer_of_their_first_argument() -> None:
    rec = record("%r unrecognised: %s", ("127.0.0.1", 40312), "FOO")
    assert TextFormatter().format(rec).endswith("mail.log: ('127.0.0.1', 40312) unrecognised: FOO peer=127.0.0.1:40312")
    doc = json.loads(JsonFormatter().format(rec))
    assert doc["peer"] == "127.0.0.1:40312" and doc["level"] == "warning"


def test_a_peer_given_is_kept_and_lines_without_one_get_none() -> None:
    assert record("%r x", ("10.0.0.1", 25), peer="192.0.2.1:99").peer == "192.0.2.1:99"  # type: ignore[attr-defined]
    assert not hasattr(record("plain line %s", "text"), "peer")
    assert not hasattr(record("no args"), "peer")
    # Only aiosmtpd's logger: other lines' arguments are not read as peers.
    assert not hasattr(record("%r x", ("10.0.0.1", 25), logger="storage.kv"), "peer")


class Stalled(io.StringIO):
    """A stderr that blocks its writer until released (a full pipe)."""

    def __init__(self) -> None:
        super().__init__()
        self.release = threading.Event()

    def write(self, text: str) -> int:
        assert self.release.wait(10)
        return super().write(text)


@pytest.fixture
def stalled(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[], Stalled]]:
    """Starts ``logs.setup`` writing to a stuck stderr (inside the test: pytest
    sets its own stderr between set-up and the test); the root logger is put
    back as it was after."""
    stream = Stalled()

    def start() -> Stalled:
        monkeypatch.setattr(sys, "stderr", stream)
        logs.setup("info", "text")
        return stream

    root = logging.getLogger()
    saved = root.handlers[:], root.level, logging.getLogger("mail.log").level
    for name in ("_srcfile", "logProcesses", "logThreads", "logMultiprocessing"):
        monkeypatch.setattr(logging, name, getattr(logging, name))
    try:
        yield start
    finally:
        stream.release.set()
        logs.flush()
        root.handlers[:], level, mail_level = saved
        root.setLevel(level)
        logging.getLogger("mail.log").setLevel(mail_level)


def test_lines_are_written_off_the_caller_and_flushed_at_exit(stalled: Callable[[], Stalled]) -> None:
    stream = stalled()
    args = ["first"]
    logging.getLogger("storage.kv").info("value %s", args)
    args[0] = "changed"  # the line keeps what was logged
    try:
        raise ValueError("boom")
    except ValueError:
        logging.getLogger("storage.kv").exception("failed")
    assert stream.getvalue() == ""  # the caller went on while stderr was stuck
    stream.release.set()
    logs.flush()
    out = stream.getvalue()
    assert "storage.kv: value ['first']" in out
    assert "failed" in out and "ValueError: boom" in out


def test_lines_past_the_pending_limit_are_dropped_and_counted(
    stalled: Callable[[], Stalled], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(logs, "MAX_PENDING", 3)
    stream = stalled()
    # The writer takes the first line and sticks on it; three more wait.
    logging.getLogger("storage.kv").warning("line 0")
    for _ in range(100):
        if not logs._handoff._records:  # type: ignore[union-attr]
            break
        threading.Event().wait(0.01)
    for i in range(1, 7):
        logging.getLogger("storage.kv").info("line %d", i)
    stream.release.set()
    logs.flush()
    out = stream.getvalue()
    assert [f"line {i}" in out for i in range(7)] == [True, True, True, True, False, False, False]
    assert "3 log lines dropped" in out
