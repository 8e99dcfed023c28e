"""Structured log lines: fields as key=value or JSON, the peer on protocol lines."""

from __future__ import annotations

import json
import logging

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
