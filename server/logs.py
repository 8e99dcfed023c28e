"""Structured logging: ``key=value`` text or one JSON object per line.

Protocol code logs with ``extra={"peer": ...}`` so every protocol line names
its connection peer.
"""

from __future__ import annotations

import atexit
import json
import logging
import logging.handlers
import queue
import sys
import time

_RESERVED = set(vars(logging.makeLogRecord({})))


def _fields(record: logging.LogRecord) -> dict[str, object]:
    return {k: v for k, v in vars(record).items() if k not in _RESERVED and not k.startswith("_")}


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        extra = " ".join(f"{k}={v}" for k, v in _fields(record).items())
        line = f"{stamp} {record.levelname.lower()} {record.name}: {record.getMessage()}"
        if extra:
            line += " " + extra
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, object] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        doc.update({k: str(v) for k, v in _fields(record).items()})
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc)


class PeerFromArgs(logging.Filter):
    """aiosmtpd's lines name the peer as their first argument (``"%r
    unrecognised: %s", session.peer, ...``): give them the ``peer`` field our
    own lines carry, so every protocol line has it."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == "mail.log" and not hasattr(record, "peer"):
            args = record.args
            if isinstance(args, tuple) and args:
                first = args[0]
                if isinstance(first, tuple) and len(first) >= 2 and isinstance(first[1], int):
                    record.peer = f"{first[0]}:{first[1]}"
                elif isinstance(first, str) and first.startswith(("unix:", "/")):
                    record.peer = first
        return True


class _Handoff(logging.handlers.QueueHandler):
    """Hands records to a writer thread, so that nothing on the event loop
    waits on stderr (DESIGN.md principle 6: a pipe to a slow log collector
    blocks its writer when full). The message is merged with its arguments
    here, as they may change later; the formatting and the write happen in
    the writer thread."""

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        record.msg = record.getMessage()
        record.args = None
        return record


_listener: logging.handlers.QueueListener | None = None


def setup(level: str = "info", fmt: str = "text") -> None:
    global _listener
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    records: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()
    handoff = _Handoff(records)
    handoff.addFilter(PeerFromArgs())
    if _listener is not None:
        _listener.stop()
    _listener = logging.handlers.QueueListener(records, handler)
    _listener.start()
    atexit.unregister(flush)
    atexit.register(flush)
    root = logging.getLogger()
    root.handlers[:] = [handoff]
    root.setLevel(level.upper())
    # aiosmtpd logs every command line at INFO; ours already name the peer.
    logging.getLogger("mail.log").setLevel(logging.DEBUG if level.lower() == "debug" else logging.WARNING)
    # Lines name their logger, not their source line: no stack walk per record.
    logging._srcfile = None  # the documented switch (logging/__init__.py)
    logging.logProcesses = logging.logThreads = logging.logMultiprocessing = False


def flush() -> None:
    """Write out every line logged so far and stop the writer thread (at exit)."""
    global _listener
    if _listener is not None:
        _listener.stop()
        _listener = None
