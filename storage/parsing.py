"""Ingest parsing in worker processes, beside the node's interpreter lock.

Every message stored (SMTP delivery, IMAP APPEND, JMAP import) is parsed
once, at ingest: :func:`storage.mime.parse`, its encoding, and the sha256
that names its blob. That is the largest piece of pure-Python work a
delivery costs, and in the node it competes for the one interpreter lock
with every session and with the store's writer (server/cpu.py keeps them all
on one CPU). A :class:`ParserPool` runs it in worker processes on the CPUs
the node's threads leave free, as Postfix hands a message from ``smtpd`` to
``cleanup``: the node's loop only writes the bytes to a pipe and reads the
answer back, a fraction of the parse's cost, and a 50 MB message no longer
takes the lock from every session for as long as it parses.

A worker holds no state: it answers each request with what
:func:`parse_here` gives, in order. One that fails or exits fails only the
requests it held, and :class:`~storage.mail.MailStore` then parses those in
the node, as it does without a pool; the next request starts a new worker.

The protocol on the worker's stdin and stdout, one frame per request and per
answer: a 4-byte big-endian length, then the raw message; the answer's
length, a status byte (0: a :mod:`marshal` of :class:`Parsed`'s fields;
1: the error's text). :func:`main` is a worker's program.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import marshal
import os
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import BinaryIO

from . import blobs, mime

log = logging.getLogger("rookery.parsing")

_HEAD = 4
_OK, _FAILED = 0, 1
#: Answers larger than this are a worker gone wrong, not a structure.
MAX_ANSWER = 1 << 30
#: Seconds a worker may take over a message, plus as many per megabyte
#: (mime.parse keeps hostile input to about a second per 10 MB): past that
#: it is stopped, as hung, and what it held is parsed in the node.
TIMEOUT = 30.0
TIMEOUT_PER_MB = 2.0
#: Seconds between two looks at whether a worker is past a deadline.
WATCHDOG_INTERVAL = 1.0


@dataclass(frozen=True, slots=True)
class Parsed:
    """What ingest needs of a message: its stored structure, its blob name,
    and the ids that thread it."""

    structure: bytes
    digest: bytes
    message_id: str | None
    references: tuple[str, ...]


def parse_here(raw: bytes, digest: Callable[[bytes], bytes] = blobs.digest_of) -> Parsed:
    """Parse ``raw`` in this process (what a worker runs, and the node when
    no worker answers), naming its blob with ``digest``. Never raises for
    any input: :func:`mime.parse` gives a last-resort structure instead."""
    msg = mime.parse(raw)
    return Parsed(mime.encode(msg), digest(raw), msg.message_id, tuple(msg.references))


class WorkerFailed(Exception):
    """A worker could not answer (it failed or exited): parse in the node."""


class _Worker(asyncio.SubprocessProtocol):
    """One worker process and the requests it holds, answered in order."""

    def __init__(self) -> None:
        self.transport: asyncio.SubprocessTransport | None = None
        self.stdin: asyncio.WriteTransport | None = None
        self.waiting: collections.deque[asyncio.Future[Parsed]] = collections.deque()
        #: Loop time by which the request at the head of ``waiting`` must be
        #: answered, one per request, and the timer that checks it.
        self.deadlines: collections.deque[float] = collections.deque()
        self._watchdog: asyncio.TimerHandle | None = None
        self.buffer = bytearray()
        self.alive = True
        self.exited: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.SubprocessTransport)
        self.transport = transport
        stdin = transport.get_pipe_transport(0)
        assert isinstance(stdin, asyncio.WriteTransport)
        self.stdin = stdin

    def send(self, raw: bytes, future: asyncio.Future[Parsed]) -> None:
        if not self.alive or self.stdin is None or self.stdin.is_closing():
            raise WorkerFailed("parser worker gone")
        loop = asyncio.get_running_loop()
        self.waiting.append(future)
        self.deadlines.append(loop.time() + TIMEOUT + TIMEOUT_PER_MB * len(raw) / 1e6)
        self.stdin.writelines((len(raw).to_bytes(_HEAD, "big"), raw))
        if self._watchdog is None:
            self._watchdog = loop.call_later(WATCHDOG_INTERVAL, self._check)

    def _check(self) -> None:
        """A worker past the deadline of the request it works on is hung:
        stopped, and what it held is parsed in the node."""
        self._watchdog = None
        if not self.waiting or not self.alive:
            return
        loop = asyncio.get_running_loop()
        if loop.time() > self.deadlines[0]:
            log.warning("parser worker hung over a message: stopped")
            self.fail("parser worker timed out")
        else:
            self._watchdog = loop.call_later(WATCHDOG_INTERVAL, self._check)

    def pipe_data_received(self, fd: int, data: bytes) -> None:
        if fd != 1:
            log.warning("parser worker: %s", data.decode("utf-8", "replace").rstrip())
            return
        buffer = self.buffer
        buffer += data
        while len(buffer) >= _HEAD + 1:
            size = int.from_bytes(buffer[:_HEAD], "big")
            if size > MAX_ANSWER or not self.waiting:
                self.fail("parser worker sent what nobody asked for")
                return
            end = _HEAD + 1 + size
            if len(buffer) < end:
                return
            status, body = buffer[_HEAD], bytes(buffer[_HEAD + 1 : end])
            del buffer[:end]
            future = self.waiting.popleft()
            self.deadlines.popleft()
            if future.done():
                continue
            if status == _OK:
                try:
                    structure, digest, message_id, references = marshal.loads(body)
                    future.set_result(Parsed(structure, digest, message_id, tuple(references)))
                except (ValueError, TypeError, EOFError) as exc:
                    future.set_exception(WorkerFailed(f"unreadable answer: {exc}"))
            else:
                future.set_exception(WorkerFailed(body.decode("utf-8", "replace")))

    def fail(self, why: str) -> None:
        """Fail every request held and stop the worker."""
        self.alive = False
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        self.deadlines.clear()
        while self.waiting:
            future = self.waiting.popleft()
            if not future.done():
                future.set_exception(WorkerFailed(why))
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()  # kills the process if it still runs

    def process_exited(self) -> None:
        assert self.transport is not None
        code = self.transport.get_returncode()
        if self.waiting:
            log.warning("parser worker exited (%s) holding %d messages: parsing them in the node", code, len(self.waiting))
        self.fail(f"parser worker exited ({code})")
        if not self.exited.done():
            self.exited.set_result(None)


class ParserPool:
    """Worker processes that parse messages for this node (module docstring).

    ``cpus``: the CPUs the workers may run on (None: wherever this process may).
    """

    def __init__(self, workers: int, cpus: frozenset[int] | None = None) -> None:
        if workers < 1:
            raise ValueError("a parser pool needs at least one worker")
        self.size = workers
        self.cpus = cpus
        self._workers: list[_Worker | None] = [None] * workers
        self._starting: list[asyncio.Task[_Worker] | None] = [None] * workers
        self._closed = False
        self.started = 0  # workers started, for tests and metrics
        self.failures = 0  # messages no worker could answer for

    def _command(self) -> list[str]:
        # Not ``-m storage.parsing``: the package imports this module first.
        command = [sys.executable, "-c", "import sys; from storage.parsing import main; sys.exit(main())"]
        if self.cpus:
            command += ["--cpus", ",".join(map(str, sorted(self.cpus)))]
        return command

    async def _spawn(self) -> _Worker:
        loop = asyncio.get_running_loop()
        # The worker imports this package the way the node did.
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p))
        _, worker = await loop.subprocess_exec(
            _Worker, *self._command(), stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE, env=env,
        )
        self.started += 1
        return worker

    async def _worker(self, index: int) -> _Worker:
        worker = self._workers[index]
        if worker is not None and worker.alive:
            return worker
        task = self._starting[index]
        if task is None:
            task = self._starting[index] = asyncio.ensure_future(self._spawn())
        try:
            worker = await asyncio.shield(task)
        finally:
            if self._starting[index] is task and task.done():
                self._starting[index] = None
        self._workers[index] = worker
        return worker

    async def start(self) -> None:
        """Start every worker now rather than at the first message. One that
        cannot start is only logged: messages are parsed in the node then."""
        for index in range(self.size):
            try:
                await self._worker(index)
            except OSError as exc:
                log.warning("cannot start a parser worker, parsing in the node: %s", exc)

    async def parse(self, raw: bytes) -> Parsed:
        """Parse ``raw`` in a worker. Raises :class:`WorkerFailed` when none
        could answer; the caller parses it itself then."""
        try:
            return await self._parse(raw)
        except WorkerFailed:
            self.failures += 1
            raise

    async def _parse(self, raw: bytes) -> Parsed:
        if self._closed:
            raise WorkerFailed("parser pool is closed")
        if len(raw) >= 1 << (8 * _HEAD):
            raise WorkerFailed("message too large for a parser worker's frame")
        # The worker holding the fewest messages (a new one counts as none).
        index = min(range(self.size), key=lambda i: len(w.waiting) if (w := self._workers[i]) is not None and w.alive else 0)
        try:
            worker = await self._worker(index)
        except OSError as exc:
            raise WorkerFailed(f"cannot start a parser worker: {exc}") from exc
        future: asyncio.Future[Parsed] = asyncio.get_running_loop().create_future()
        worker.send(raw, future)
        return await future

    def pids(self) -> list[int]:
        return [w.transport.get_pid() for w in self._workers if w is not None and w.alive and w.transport is not None]

    async def close(self) -> None:
        """Let every worker finish what it holds and exit (it reads EOF)."""
        self._closed = True
        workers = [w for w in self._workers if w is not None]
        for task in self._starting:
            if task is not None:
                # Started meanwhile: its waiter may not have taken it yet.
                started, = await asyncio.gather(task, return_exceptions=True)
                if isinstance(started, _Worker) and started not in workers:
                    workers.append(started)
        workers = [w for w in workers if w.transport is not None]
        for worker in workers:
            if worker.stdin is not None:
                worker.stdin.close()
        for worker in workers:
            assert worker.transport is not None
            try:
                await asyncio.wait_for(asyncio.shield(worker.exited), 5.0)
            except asyncio.TimeoutError:
                log.warning("parser worker %s did not exit: killed", worker.transport.get_pid())
            worker.transport.close()  # kills it if it still runs


# -- the worker --------------------------------------------------------------------


def _read_exactly(stream: BinaryIO, size: int) -> bytes | None:
    data = stream.read(size)
    return data if len(data) == size else None


def serve(stdin: BinaryIO, stdout: BinaryIO) -> None:
    """Answer requests from ``stdin`` until it ends (the worker's loop)."""
    while (head := _read_exactly(stdin, _HEAD)) is not None:
        raw = _read_exactly(stdin, int.from_bytes(head, "big"))
        if raw is None:
            return
        try:
            p = parse_here(raw)
            status, body = _OK, marshal.dumps((p.structure, p.digest, p.message_id, p.references))
        except Exception as exc:  # noqa: BLE001 - the node parses it itself then
            status, body = _FAILED, repr(exc).encode("utf-8", "replace")
        stdout.write(len(body).to_bytes(_HEAD, "big") + bytes([status]) + body)
        stdout.flush()


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    # The node's SIGINT (Ctrl-C in its terminal) reaches the whole process
    # group: the node shuts down and closes the pipe, which ends the worker.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if len(args) == 2 and args[0] == "--cpus" and hasattr(os, "sched_setaffinity"):
        try:
            os.sched_setaffinity(0, {int(c) for c in args[1].split(",") if c})
        except (OSError, ValueError):
            pass  # any CPU will do
    serve(sys.stdin.buffer, sys.stdout.buffer)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
