"""Structured logging: ``key=value`` text or one JSON object per line.

Protocol code logs with ``extra={"peer": ...}`` so every protocol line names
its connection peer.
"""

from __future__ import annotations

import atexit
import collections
import json
import logging
import sys
import threading
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


class _Handoff(logging.Handler):
    """Hands records to a writer thread, so that nothing on the event loop
    waits on stderr (DESIGN.md principle 6: a pipe to a slow log collector
    blocks its writer when full). The message is merged with its arguments
    here, as they may change later; the formatting and the write happen in
    the writer thread, which wakes every :data:`FLUSH_INTERVAL` seconds (at
    once for a warning or worse) and writes every record gathered meanwhile:
    a wake-up per record cost a thread switch per delivered message. Past
    :data:`MAX_PENDING` waiting records (stderr stuck for a long time) new
    ones are dropped and counted, and the count is logged once it drains."""

    def __init__(self, target: logging.Handler) -> None:
        super().__init__()
        self.target = target
        self._records: collections.deque[logging.LogRecord] = collections.deque()
        self._wake = threading.Event()
        self._stopping = False
        self.dropped = 0
        self._thread = threading.Thread(target=self._run, name="rookery-log-writer", daemon=True)
        self._thread.start()

    def handle(self, record: logging.LogRecord) -> bool:
        # No handler lock: deque.append is atomic, and emit keeps no state.
        if not self.filter(record):
            return False
        self.emit(record)
        return True

    def emit(self, record: logging.LogRecord) -> None:
        if len(self._records) >= MAX_PENDING:
            self.dropped += 1
            return
        try:
            record.msg = record.getMessage()
        except Exception:  # a bad format string must not cost the caller its work
            record.msg = f"{record.msg!r} {record.args!r}"
        record.args = None
        self._records.append(record)
        if record.levelno >= logging.WARNING:
            self._wake.set()

    def _run(self) -> None:
        records = self._records
        while True:
            self._wake.wait(FLUSH_INTERVAL)
            self._wake.clear()
            stopping = self._stopping
            while records:
                self._write(records.popleft())
            if self.dropped:
                lost, self.dropped = self.dropped, 0
                self._write(logging.makeLogRecord({
                    "name": __name__, "levelno": logging.WARNING, "levelname": "WARNING",
                    "msg": f"{lost} log lines dropped: the log output was stuck",
                }))
            if stopping:
                return

    def _write(self, record: logging.LogRecord) -> None:
        try:
            self.target.handle(record)
        except Exception:  # the writer outlives any one record
            pass

    def stop(self) -> None:
        """Write out every record so far, then end the thread."""
        self._stopping = True
        self._wake.set()
        self._thread.join()


#: How long a record may wait for the writer thread, in seconds.
FLUSH_INTERVAL = 0.05
#: Records waiting for the writer thread past which new ones are dropped.
MAX_PENDING = 100_000

_handoff: _Handoff | None = None


def setup(level: str = "info", fmt: str = "text") -> None:
    global _handoff
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    if _handoff is not None:
        _handoff.stop()
    _handoff = _Handoff(handler)
    _handoff.addFilter(PeerFromArgs())
    atexit.unregister(flush)
    atexit.register(flush)
    root = logging.getLogger()
    root.handlers[:] = [_handoff]
    root.setLevel(level.upper())
    # aiosmtpd logs every command line at INFO; ours already name the peer.
    logging.getLogger("mail.log").setLevel(logging.DEBUG if level.lower() == "debug" else logging.WARNING)
    # Lines name their logger, not their source line: no stack walk per record.
    logging._srcfile = None  # the documented switch (logging/__init__.py)
    logging.logProcesses = logging.logThreads = logging.logMultiprocessing = False


def flush() -> None:
    """Write out every line logged so far and stop the writer thread (at exit)."""
    global _handoff
    if _handoff is not None:
        _handoff.stop()
        _handoff = None
