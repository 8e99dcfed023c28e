"""The FoundationDB backend's answer to ``commit_unknown_result`` (1021).

No FoundationDB cluster runs here, so this drives the backend's real retry
loop (``FoundationDBDatabase._run``) over a small in-memory stand-in for the
binding that can fail a commit with 1021 either after applying it (the commit
landed, the client was not told) or before (it did not). A body must take
effect exactly once either way, and the caller must get the result of the
attempt that landed.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from storage import keys
from storage.kv import foundationdb as fdbmod
from storage.kv.base import Transaction, decode_counter


class FakeError(Exception):
    def __init__(self, code: int) -> None:
        super().__init__(f"fdb error {code}")
        self.code = code


class _Done:
    def __init__(self, value: Any = None) -> None:
        self.value = value

    def wait(self) -> Any:
        return self.value


class _Value:
    def __init__(self, raw: bytes | None) -> None:
        self.raw = raw

    def present(self) -> bool:
        return self.raw is not None

    def __bytes__(self) -> bytes:
        assert self.raw is not None
        return self.raw


class FakeTransaction:
    def __init__(self, db: FakeDatabase) -> None:
        self.db = db
        self.writes: list[tuple[str, bytes, Any]] = []

    @property
    def snapshot(self) -> FakeTransaction:
        return self

    def get(self, key: bytes) -> _Done:
        return _Done(_Value(self.db.data.get(key)))

    def set(self, key: bytes, value: bytes) -> None:
        self.writes.append(("set", key, value))

    def add(self, key: bytes, operand: bytes) -> None:
        self.writes.append(("add", key, operand))

    def clear_range(self, begin: bytes, end: bytes) -> None:
        self.writes.append(("clear_range", begin, end))

    def commit(self) -> _Done:
        outcome = self.db.outcomes.pop(0) if self.db.outcomes else "ok"
        if outcome in ("ok", "landed"):
            for op, key, arg in self.writes:
                if op == "set":
                    self.db.data[key] = arg
                elif op == "add":
                    total = decode_counter(self.db.data.get(key)) + decode_counter(arg)
                    self.db.data[key] = total.to_bytes(8, "little", signed=True)
                else:
                    for k in [k for k in self.db.data if key <= k < arg]:
                        del self.db.data[k]
        self.writes = []
        if outcome != "ok":
            raise FakeError(fdbmod.COMMIT_UNKNOWN_RESULT)
        return _Done()

    def on_error(self, error: FakeError) -> _Done:
        if error.code != fdbmod.COMMIT_UNKNOWN_RESULT:
            raise error
        self.writes = []
        return _Done()


class FakeDatabase:
    def __init__(self) -> None:
        self.data: dict[bytes, bytes] = {}
        self.outcomes: list[str] = []

    def create_transaction(self) -> FakeTransaction:
        return FakeTransaction(self)


class FakeFdb:
    FDBError = FakeError


@pytest.fixture
def backend() -> Any:
    db = object.__new__(fdbmod.FoundationDBDatabase)
    db._fdb = FakeFdb()
    db._db = FakeDatabase()
    db._want_all = None
    db._executor = ThreadPoolExecutor(1)
    db._closed = False
    db.retry_limit = 10
    yield db
    db._executor.shutdown()


COUNTER = keys.pack(("test", "counter"))


def bump(tr: Transaction) -> int:
    """Add one to a counter; return what this attempt saw (differs per attempt)."""
    seen = decode_counter(tr.get(COUNTER))
    tr.add(COUNTER, 1)
    return seen


async def test_commit_that_landed_is_not_applied_twice(backend: Any) -> None:
    backend._db.outcomes = ["landed"]
    calls = []

    def body(tr: Transaction) -> int:
        calls.append(1)
        return bump(tr)

    assert await backend.transact(body) == 0
    assert len(calls) == 1  # the marker showed the first attempt landed
    assert decode_counter(backend._db.data[COUNTER]) == 1


async def test_commit_that_did_not_land_is_run_again(backend: Any) -> None:
    backend._db.outcomes = ["lost"]
    calls = []

    def body(tr: Transaction) -> int:
        calls.append(1)
        return bump(tr)

    assert await backend.transact(body) == 0
    assert len(calls) == 2
    assert decode_counter(backend._db.data[COUNTER]) == 1


async def test_lost_then_landed_returns_the_result_of_the_attempt_that_landed(backend: Any) -> None:
    backend._db.data[COUNTER] = (5).to_bytes(8, "little", signed=True)
    backend._db.outcomes = ["lost", "landed"]
    results = []

    def body(tr: Transaction) -> int:
        seen = bump(tr)
        results.append(seen)
        return seen * 100 + len(results)

    # Attempt 1 (lost) and attempt 2 (landed) both saw 5; attempt 2's result comes back.
    assert await backend.transact(body) == 502
    assert decode_counter(backend._db.data[COUNTER]) == 6


async def test_reads_leave_no_marker(backend: Any) -> None:
    await backend.read(lambda tr: tr.get(COUNTER))
    assert not any(k.startswith(keys.pack(("x",))) for k in backend._db.data)


async def test_old_markers_are_swept(backend: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    now = int(time.time()) // 3600
    old = keys.commit_marker(now - fdbmod.MARKER_KEEP_HOURS - 1, b"\x01" * 16)
    recent = keys.commit_marker(now - fdbmod.MARKER_KEEP_HOURS, b"\x02" * 16)
    backend._db.data[old] = b"0"
    backend._db.data[recent] = b"0"
    monkeypatch.setattr(fdbmod, "MARKER_SWEEP_EVERY", 1)
    await backend.transact(bump)
    assert old not in backend._db.data
    assert recent in backend._db.data
    markers = [k for k in backend._db.data if k.startswith(keys.pack(("x",)))]
    assert len(markers) == 2  # the recent one and this write's own
