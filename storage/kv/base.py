"""The ordered, transactional key-value contract every backend implements.

The contract is FoundationDB's, on purpose (DESIGN.md principle 4): a
transaction body is a plain synchronous function ``fn(tr)`` that reads and
writes through ``tr``; :meth:`Database.transact` runs it off the event loop and
retries it on retryable errors, so bodies must be idempotent and free of side
effects (no network, no peer messages, no cache writes). Side effects belong
after ``await db.transact(...)`` returns.

Keys are ``bytes`` produced by :mod:`storage.keys` (``fdb.tuple`` packing), so
every backend orders them identically. Limits are FoundationDB's and hold on
every backend:

* key ≤ 10,000 bytes, value ≤ 100,000 bytes;
* ≤ 10,000,000 bytes written (keys + values) per transaction;
* a transaction lives ≤ 5 seconds.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol, TypeVar

T = TypeVar("T")

MAX_KEY_SIZE = 10_000
MAX_VALUE_SIZE = 100_000
MAX_TRANSACTION_SIZE = 10_000_000
MAX_TRANSACTION_SECONDS = 5.0

#: Size of a completed versionstamp: 8 bytes commit version, 2 bytes batch order.
VERSIONSTAMP_SIZE = 10


class KVError(Exception):
    """Base class of every storage-contract error."""


class LimitExceeded(KVError):
    """A FoundationDB limit was exceeded (key, value, transaction size or age).

    Not retryable: the body itself must change (chunk the value, split the
    transaction, resume the scan from the last key).
    """


class RetryableError(KVError):
    """The transaction conflicted or timed out in a retryable way."""


class NotCommitted(RetryableError):
    """A conflicting write committed first (FoundationDB error 1020)."""


class TransactionTooOld(LimitExceeded):
    """The transaction outlived the 5 s limit (FoundationDB error 1007)."""


class RetryLimitReached(KVError):
    """``transact`` gave up after its configured number of retries."""


class StoreUnavailable(KVError):
    """The backend cannot be reached (closed, cluster unreachable)."""


KeyValue = tuple[bytes, bytes]


class ReadTransaction(Protocol):
    """Reads. Used directly for snapshot reads (``tr.snapshot``)."""

    def get(self, key: bytes) -> bytes | None:
        """Return the value at ``key`` or ``None``."""

    def get_range(
        self,
        begin: bytes,
        end: bytes,
        limit: int = 0,
        reverse: bool = False,
    ) -> list[KeyValue]:
        """Return pairs with ``begin <= key < end`` in key order.

        ``limit`` 0 means no limit; ``reverse`` walks from ``end`` down and the
        limit then applies to the highest keys. Large scans belong in several
        transactions, resuming after the last key returned.
        """


class Transaction(ReadTransaction, Protocol):
    """A read-write transaction: serializable, all or nothing."""

    @property
    def snapshot(self) -> ReadTransaction:
        """Reads that add no read conflict (FoundationDB snapshot reads)."""

    def set(self, key: bytes, value: bytes) -> None:
        """Write ``value`` at ``key``. Raises :class:`LimitExceeded`."""

    def clear(self, key: bytes) -> None:
        """Remove ``key`` if present."""

    def clear_range(self, begin: bytes, end: bytes) -> None:
        """Remove every key with ``begin <= key < end``."""

    def add(self, key: bytes, delta: int) -> None:
        """Atomically add ``delta`` to the little-endian signed 64-bit integer at
        ``key`` (absent counts as 0), without a read conflict."""

    def set_versionstamped_key(self, key: bytes, value: bytes) -> None:
        """Write with a key completed at commit by a versionstamp.

        ``key`` comes from ``fdb.tuple.pack_with_versionstamp``: its last four
        bytes give, little-endian, the offset of the ten placeholder bytes to
        fill. Versionstamps are unique and increase in commit order across the
        whole database.
        """


def decode_counter(raw: bytes | None) -> int:
    """Decode a value written by :meth:`Transaction.add`."""
    if raw is None:
        return 0
    return int.from_bytes(raw[:8].ljust(8, b"\0"), "little", signed=True)


def encode_counter(value: int) -> bytes:
    return value.to_bytes(8, "little", signed=True)


class Database(Protocol):
    """An open store. Every method is safe to call from the event loop."""

    async def transact(self, fn: Callable[[Transaction], T]) -> T:
        """Run ``fn(tr)`` in a read-write transaction, retrying on conflict.

        ``fn`` runs in a worker thread and may run several times; its result
        after the successful commit is returned. Raises
        :class:`LimitExceeded`, :class:`RetryLimitReached`,
        :class:`StoreUnavailable`, or whatever ``fn`` raises (in which case
        nothing it wrote is committed).
        """

    async def read(self, fn: Callable[[ReadTransaction], T]) -> T:
        """Run ``fn(tr)`` in a read-only transaction (a consistent snapshot)."""

    async def close(self) -> None:
        """Wait for work in flight, then release the backend."""


def check_key(key: bytes) -> None:
    if len(key) > MAX_KEY_SIZE:
        raise LimitExceeded(f"key of {len(key)} bytes exceeds {MAX_KEY_SIZE}")


def check_value(value: bytes) -> None:
    if len(value) > MAX_VALUE_SIZE:
        raise LimitExceeded(f"value of {len(value)} bytes exceeds {MAX_VALUE_SIZE}")


def strinc(prefix: bytes) -> bytes:
    """The first key after every key starting with ``prefix`` (fdb.strinc)."""
    stripped = prefix.rstrip(b"\xff")
    if not stripped:
        raise ValueError("prefix must contain a byte other than 0xff")
    return stripped[:-1] + bytes([stripped[-1] + 1])


def range_of(prefix: bytes) -> tuple[bytes, bytes]:
    """``(begin, end)`` covering every key that extends the packed tuple ``prefix``.

    Mirrors ``fdb.tuple.range``: ``prefix + 0x00`` .. ``prefix + 0xff``.
    """
    return prefix + b"\x00", prefix + b"\xff"
