"""Long range scans across several transactions, on any backend.

A transaction lives at most 5 seconds (FoundationDB developer guide), so a
range too long to read in one is read in batches, each in its own
:meth:`Database.read`, resuming after the last key returned.
"""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator

from .base import Database, KeyValue, ReadTransaction, TransactionTooOld


def _read_batch(begin: bytes, end: bytes, limit: int, tr: ReadTransaction) -> list[KeyValue]:
    return tr.get_range(begin, end, limit=limit)


async def scan_range(db: Database, begin: bytes, end: bytes, batch_size: int = 1000) -> AsyncIterator[KeyValue]:
    """Yield every ``(key, value)`` with ``begin <= key < end`` in key order.

    Each batch of at most ``batch_size`` pairs is read in its own read
    transaction, starting just after the last key of the previous batch, so
    the scan as a whole is not one snapshot: keys written meanwhile may or may
    not appear, but none appears twice. A batch that outlives its transaction
    (:class:`TransactionTooOld`) is read again at half the size.

    Raises :class:`ValueError` if ``batch_size`` < 1, and whatever
    :meth:`Database.read` raises (:class:`TransactionTooOld` only if a single
    pair cannot be read in time).
    """
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    size = batch_size
    after = begin
    while after < end:
        try:
            batch = await db.read(functools.partial(_read_batch, after, end, size))
        except TransactionTooOld:
            if size == 1:
                raise
            size = max(1, size // 2)
            continue
        for pair in batch:
            yield pair
        if len(batch) < size:
            return
        # The smallest key after the last one returned.
        after = batch[-1][0] + b"\x00"
