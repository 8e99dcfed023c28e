"""Keep the node's Python threads on one CPU.

A node's threads (the event loop, the store's writer, syncer and readers,
the log writer) share one interpreter lock. Every SQLite statement, socket
write or fsync lets go of it and must take it back, and when the thread
holding it meanwhile runs on another CPU, taking it back waits for that CPU
to be told and to switch: on this kind of virtual machine 0.1-0.8 ms each
time, while the same hand-over between threads on one CPU takes
microseconds. An IMAP command makes dozens of such hand-overs, so the node
pins its threads to one CPU (``[server] cpu``), as nginx, HAProxy and Envoy
let their workers be pinned. The threads could not run Python at the same
time anyway; what one CPU costs is the SQLite and kernel work they could
have done beside the loop, and measured, that is much the smaller part
(``tests/bench/imap.py``, 10 clients: ~45 % more commands per second;
``tests/bench/smtp_inbound.py``, 8 clients: ~25 % more messages).

Work that runs outside the interpreter lock for long, password hashing
(argon2 with its own threads), is given :func:`unpinned_executor`, whose
threads may use every CPU the node was allowed. Parsing what is stored, pure
Python that would hold the lock, runs in worker processes on the CPUs the
node's threads leave free (:func:`parse_workers`, storage/parsing.py).
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor


class CpuSettingError(ValueError):
    """``[server] cpu`` names no CPU this process may use."""


def allowed_cpus() -> frozenset[int]:
    """The CPUs this process may run on (all of them where the platform
    cannot say)."""
    if hasattr(os, "sched_getaffinity"):
        return frozenset(os.sched_getaffinity(0))
    return frozenset(range(os.cpu_count() or 1))


def choose(setting: str, allowed: frozenset[int], pid: int) -> int | None:
    """The CPU ``setting`` picks from ``allowed``: ``off`` none; ``auto``
    one of them, by process id, so nodes started side by side on one host
    tend to take different ones (none when there is only one); else the
    CPU numbered so."""
    setting = setting.strip().lower()
    if setting == "off":
        return None
    cpus = sorted(allowed)
    if setting == "auto":
        return cpus[pid % len(cpus)] if len(cpus) > 1 else None
    try:
        cpu = int(setting)
    except ValueError:
        raise CpuSettingError(f"[server] cpu must be auto, off or a CPU number, not {setting!r}") from None
    if cpu not in allowed:
        raise CpuSettingError(f"[server] cpu {cpu} is not one this process may use ({', '.join(map(str, cpus))})")
    return cpu


def pin(setting: str, allowed: frozenset[int]) -> int | None:
    """Pin the calling thread, and so every thread it starts from now on,
    to the CPU ``setting`` picks from ``allowed`` (:func:`choose`). Returns
    that CPU, or None where nothing was pinned (``off``, one CPU, or no
    affinity on this platform). Call it before the node starts any thread."""
    cpu = choose(setting, allowed, os.getpid())
    if cpu is None or not hasattr(os, "sched_setaffinity"):
        return None
    os.sched_setaffinity(0, {cpu})  # 0: this thread (Linux)
    return cpu


def unpinned_executor(allowed: frozenset[int], name: str) -> ThreadPoolExecutor:
    """A thread pool whose threads may run on every CPU of ``allowed`` (the
    set from before :func:`pin`, which succeeded), for work outside the
    interpreter lock."""
    return ThreadPoolExecutor(thread_name_prefix=name, initializer=os.sched_setaffinity, initargs=(0, allowed))


#: Parser workers ``auto`` starts at most (each is a whole interpreter).
MAX_AUTO_PARSE_WORKERS = 4


def parse_workers(setting: str, allowed: frozenset[int], pinned: int | None) -> tuple[int, frozenset[int] | None]:
    """How many ingest parser workers to start (storage/parsing.py) and the
    CPUs they may use: those of ``allowed`` but the one the node's threads
    are pinned to (all of ``allowed`` when that leaves none)."""
    setting = setting.strip().lower()
    cpus = ((allowed - {pinned}) or allowed) if pinned is not None else None
    if setting == "auto":
        count = max(0, min(MAX_AUTO_PARSE_WORKERS, len(allowed) - 1))
    elif setting in ("off", "none"):
        count = 0
    else:
        try:
            count = int(setting)
        except ValueError:
            raise CpuSettingError(f"[server] parse_workers must be auto, 0 or a number, not {setting!r}") from None
        if count < 0:
            raise CpuSettingError(f"[server] parse_workers must not be negative, not {count}")
    return count, cpus
