"""Content-addressed blobs (message bodies, DAV resources).

A blob is named by the SHA-256 of its bytes and stored in chunks of at most
:data:`CHUNK_SIZE` bytes (FoundationDB values are ≤ 100 kB). The same bytes
delivered to many local recipients are stored once; each user of a blob
writes a reference ``("br", digest, account, email)``.

Writing: a small blob is written inside the transaction that links it, which
is atomic and well within the 10 MB / 5 s limits. A large blob is written
first in transactions of its own, each marking it possibly orphaned, and only
then linked (DESIGN.md "Blobs"). A blob whose last reference goes is marked
orphaned too. The purger deletes blobs marked longer ago than a grace period
that still have no reference; a blob written but not yet linked is therefore
never taken while its writer is still working.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import struct
import time
from collections.abc import AsyncIterator

from . import keys
from .kv.base import Database, ReadTransaction, Transaction

CHUNK_SIZE = 96 * 1024
#: Blobs up to this size are written in the linking transaction.
INLINE_MAX = 1024 * 1024
#: Inline blobs up to this size are written without a look for them first.
BLIND_MAX = 64 * 1024
#: Bytes of chunks per transaction when writing a large blob separately.
WRITE_BATCH = 4 * 1024 * 1024
#: An orphan younger than this is left alone (its writer may still link it).
GRACE_SECONDS = 3600


#: Bodies up to this size are hashed on the calling thread (the event
#: loop's), bigger ones in a worker thread so that the loop never stalls on one.
HASH_INLINE_MAX = 256 * 1024
#: hashlib lets go of the GIL while it hashes 2 kB or more in one call.
_GIL_HELD_PIECE = 2047


def digest_of(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def digest_holding_gil(data: bytes) -> bytes:
    """:func:`digest_of`, fed in pieces too small for hashlib to let go of
    the GIL. On the event loop's thread, letting go gains nothing (the
    node's threads share one CPU) and costs a wait to get it back: the
    store's writer or a reader takes it meanwhile and may keep it for up to
    the switch interval. A few µs more for 20 kB, and no such wait."""
    if len(data) <= _GIL_HELD_PIECE:
        return hashlib.sha256(data).digest()
    h = hashlib.sha256()
    view = memoryview(data)
    for start in range(0, len(data), _GIL_HELD_PIECE):
        h.update(view[start : start + _GIL_HELD_PIECE])
    return h.digest()


async def digest(data: bytes) -> bytes:
    """The blob name of ``data``, computed without holding up the event loop."""
    if len(data) > HASH_INLINE_MAX:
        return await asyncio.get_running_loop().run_in_executor(None, digest_of, data)
    return digest_holding_gil(data)


def exists(tr: ReadTransaction, digest: bytes) -> bool:
    return tr.get(keys.blob_meta(digest)) is not None


def size_of(tr: ReadTransaction, digest: bytes) -> int | None:
    raw = tr.get(keys.blob_meta(digest))
    return None if raw is None else int(struct.unpack(">QI", raw)[0])


def write_chunks(tr: Transaction, digest: bytes, data: bytes, first: int, last: int) -> None:
    """Write chunks ``first..last-1`` of ``data``."""
    for index in range(first, last):
        tr.set(keys.blob_chunk(digest, index), data[index * CHUNK_SIZE : (index + 1) * CHUNK_SIZE])


def chunk_count(size: int) -> int:
    return max(1, -(-size // CHUNK_SIZE))


def put_inline(tr: Transaction, digest: bytes, data: bytes) -> None:
    """Store a small blob in the caller's transaction.

    Up to :data:`BLIND_MAX` bytes it is written blind, without looking
    whether it is there: the same digest is the same bytes, so rewriting a
    blob changes nothing, and a delivery spends no read on it (a larger one
    is looked for first: a read costs less than rewriting it). A purge
    racing with a blind write cannot win either way: on FoundationDB, a
    purge committing first is undone by these writes (they read nothing it
    wrote), and one committing after conflicts on the reference the caller
    writes beside them, and finds it on its retry."""
    if len(data) > BLIND_MAX and exists(tr, digest):
        return
    write_chunks(tr, digest, data, 0, chunk_count(len(data)))
    tr.set(keys.blob_meta(digest), struct.pack(">QI", len(data), chunk_count(len(data))))


async def put_large(db: Database, digest: bytes, data: bytes) -> None:
    """Store a large blob before it is linked, in transactions of its own."""
    if await db.read(lambda tr: exists(tr, digest)):
        return
    total = chunk_count(len(data))
    per_batch = max(1, WRITE_BATCH // CHUNK_SIZE)
    now = int(time.time())
    for first in range(0, total, per_batch):
        last = min(total, first + per_batch)

        def fn(tr: Transaction, first: int = first, last: int = last) -> None:
            write_chunks(tr, digest, data, first, last)
            tr.set(keys.blob_orphan(now, digest), b"")

        await db.transact(fn)

    def finish(tr: Transaction) -> None:
        tr.set(keys.blob_meta(digest), struct.pack(">QI", len(data), total))

    await db.transact(finish)


def link(tr: Transaction, digest: bytes, acct: int, email_id: int) -> None:
    tr.set(keys.blob_ref(digest, acct, email_id), b"")


def unlink(tr: Transaction, digest: bytes, acct: int, email_id: int) -> None:
    """Drop one reference; mark the blob orphaned if it was the last."""
    tr.clear(keys.blob_ref(digest, acct, email_id))
    if not tr.get_range(*keys.blob_refs(digest), limit=1):
        tr.set(keys.blob_orphan(int(time.time()), digest), b"")


def put_structure(tr: Transaction, digest: bytes, structure: bytes) -> None:
    """Store the parsed structure of blob ``digest`` once, beside the blob,
    for all the emails of its bytes (no-op if present). It is purged with
    the blob."""
    if tr.get(keys.blob_structure(digest, 0)) is not None:
        return
    for index, start in enumerate(range(0, len(structure), CHUNK_SIZE)):
        tr.set(keys.blob_structure(digest, index), structure[start : start + CHUNK_SIZE])


def get_structure(tr: ReadTransaction, digest: bytes) -> bytes:
    return b"".join(v for _, v in tr.get_range(*keys.blob_structures(digest)))


def read_range(
    tr: ReadTransaction, digest: bytes, start: int = 0, length: int | None = None, size: int | None = None
) -> bytes:
    """Bytes ``start .. start+length`` of a blob, reading only the chunks
    needed. ``size``: the blob's size when the caller has just read it."""
    if size is None:
        size = size_of(tr, digest)
    if size is None:
        return b""
    end = size if length is None else min(size, start + length)
    if start >= end:
        return b""
    first, last = start // CHUNK_SIZE, (end - 1) // CHUNK_SIZE
    rows = tr.get_range(keys.blob_chunk(digest, first), keys.blob_chunk(digest, last + 1))
    data = b"".join(v for _, v in rows)
    offset = start - first * CHUNK_SIZE
    return data[offset : offset + (end - start)]


async def read(db: Database, digest: bytes, start: int = 0, length: int | None = None) -> bytes:
    """Read a (part of a) blob: one transaction when it fits in one piece
    (nearly every message), several for large ones."""

    def first(tr: ReadTransaction) -> tuple[int | None, bytes]:
        size = size_of(tr, digest)
        if size is None:
            return None, b""
        end = size if length is None else min(size, start + length)
        return end, read_range(tr, digest, start, min(end - start, WRITE_BATCH), size)

    end, head = await db.read(first)
    if end is None or start + len(head) >= end:
        return head
    parts = [head] + [part async for part in stream(db, digest, start + len(head), end)]
    return b"".join(parts)


async def stream(
    db: Database, digest: bytes, start: int, end: int, step: int = WRITE_BATCH
) -> AsyncIterator[bytes]:
    """Yield bytes ``start..end`` in pieces of at most ``step`` bytes (a few
    MB by default), one read transaction each. Pieces after the first end on
    chunk boundaries, so no chunk is read twice."""
    step = max(CHUNK_SIZE, step - step % CHUNK_SIZE)
    pos = start
    while pos < end:
        n = min(step - pos % CHUNK_SIZE, end - pos)
        yield await db.read(functools.partial(_read_piece, digest=digest, start=pos, length=n))
        pos += n


def _read_piece(tr: ReadTransaction, *, digest: bytes, start: int, length: int) -> bytes:
    return read_range(tr, digest, start, length)


def purge_orphans(tr: Transaction, now: float, limit: int = 100) -> int:
    """Delete up to ``limit`` blobs orphaned before ``now - GRACE_SECONDS`` that
    still have no reference. Returns how many markers were handled."""
    rows = tr.get_range(*keys.blob_orphans_before(int(now - GRACE_SECONDS)), limit=limit)
    for key, _ in rows:
        digest = keys.unpack(key)[2]
        tr.clear(key)
        if tr.get_range(*keys.blob_refs(digest), limit=1):
            continue
        tr.clear_range(*keys.blob_chunks(digest))
        tr.clear_range(*keys.blob_structures(digest))
        tr.clear(keys.blob_meta(digest))
    return len(rows)
